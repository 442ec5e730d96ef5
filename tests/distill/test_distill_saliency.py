"""Saliency distillation through the one loop (seed 004) on a tiny generated fixation dataset: model A and model B
runs (log, checkpoint, card, loadable model), the teacher's cached maps, flips aligned across image, density and
teacher map inside a batch, bit-exact resume, and clear errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("scipy.io", reason="scipy writes and reads the .mat files (pip install -e '.[saliency]')")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "saliency"))  # the saliency tests' helpers
from saliency_testing import save_tiny_saliency_model, write_fixation_dataset

from rollout_fast.checkpoint import load_training_state, load_weights
from rollout_fast.distill import SaliencyConfig, distill_saliency
from rollout_fast.saliency import load_saliency_model, validation_metrics


@pytest.fixture(scope="module")
def tiny_osie(tmp_path_factory):
    """(root, split file): 6 photos of 48 x 64, 4 train and 2 val."""
    return write_fixation_dataset(tmp_path_factory.mktemp("osie") / "tiny")


def cfg(split, **kw) -> SaliencyConfig:
    base = {"decoder": [8, 8, 8, 8], "input_size": [24, 32], "epochs": 1, "batch_size": 2, "amp": False,
            "sigma": 4.0, "split_file": str(split)}
    return SaliencyConfig(**{**base, **kw})


def test_model_a_run_writes_log_checkpoint_card_and_a_loadable_model(tiny_osie, tmp_path):
    root, split = tiny_osie
    metrics = distill_saliency(root, tmp_path / "A", cfg(split, epochs=2), device="cpu", progress=False)
    run = tmp_path / "A"
    lines = (run / "log.csv").read_text().strip().splitlines()
    assert lines[0] == "epoch,phase,train_loss,val_kld,val_cc,val_nss,lr,seconds" and len(lines) == 3
    assert [ln.split(",")[6] for ln in lines[1:]] == ["0.001", "0.001"]  # Adam at a constant 1e-3, as the seed
    assert json.loads((run / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["train_images"] == 4 and metrics["val_images"] == 2 and metrics["val"]["images"] == 2
    model, card = load_saliency_model(str(run / "model.safetensors"))
    assert card["model"]["heads"] == 1 and card["training"]["lr"] == 1e-3 and card["metrics"]["val"] == metrics["val"]
    state = load_training_state(run / "last.pt")
    assert state["epoch"] == 2 and [str(v) for v in state["log"][-1]] == lines[-1].split(",")
    for k, v in load_weights(run / "model.safetensors").items():
        assert torch.equal(v, state["model"][k]), k
    # the logged validation is validation_metrics of the model's maps at the images' resolution
    from rollout_fast.saliency import OSIE
    from rollout_fast.saliency.prepare import load_stimulus, normalize_images

    val = OSIE(root, json.loads(split.read_text())["val"])
    x = torch.stack([load_stimulus(root / "data" / "stimuli" / r.name, (24, 32)) for r in val.records])
    probs = model.predict(normalize_images(x, model.spec["mean"], model.spec["std"]))
    want = validation_metrics(probs, val.records, [r.density(4.0) for r in val.records])
    assert want == pytest.approx(metrics["val"], rel=1e-6)
    assert f"{want['kld']:.4f}" == lines[-1].split(",")[3]


def test_model_b_trains_on_the_cached_teacher_maps(tiny_osie, tmp_path):
    root, split = tiny_osie
    teacher_path = save_tiny_saliency_model(tmp_path / "teacher.safetensors", seed=3)
    c = cfg(split, heads=2, teacher=str(teacher_path))
    metrics = distill_saliency(root, tmp_path / "B", c, device="cpu", progress=False, cache_dir=tmp_path / "cache")
    assert metrics["model"]["heads"] == 2
    teacher, _ = load_saliency_model(str(teacher_path))
    from rollout_fast.distill.saliency import _split

    train, _ = _split(root, c, json.loads(split.read_text())["train"], tmp_path / "cache", False)
    from rollout_fast.saliency.prepare import normalize_images

    want = teacher.predict(normalize_images(train.images, teacher.spec["mean"], teacher.spec["std"]))
    cached = [torch.load(p, weights_only=True) for p in (tmp_path / "cache").glob("salteacher_*.pt")]
    assert len(cached) == 1 and torch.allclose(cached[0], want, atol=1e-6)
    _, card = load_saliency_model(str(tmp_path / "B" / "model.safetensors"))
    assert card["training"]["teacher"] == str(teacher_path) and card["training"]["teacher_weight"] == 2.5


def test_a_batch_flips_image_density_and_teacher_map_together(tiny_osie):
    """Inside the task's batches: one marked pixel in the image, the density and the teacher map stays one
    place in all three whatever the epoch's flips."""
    from rollout_fast.distill.saliency import SaliencyTask
    from rollout_fast.saliency.prepare import SaliencySplit

    _, split = tiny_osie
    n, H, W = 8, 4, 6
    images = torch.zeros(n, 3, H, W, dtype=torch.uint8)
    images[:, :, 1, 0] = 255
    dens = torch.zeros(n, H, W)
    dens[:, 1, 0] = 1.0
    task = SaliencyTask(cfg(split, input_size=[H, W]), "cpu", SaliencySplit([str(i) for i in range(n)], images, dens, []),
                        SaliencySplit([], images[:0], dens[:0], []), dens.clone(), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    seen = set()
    for epoch in range(3):
        task.start_epoch(epoch)
        x, (gt, t) = task.batch(torch.arange(n), epoch)
        for b in range(n):
            where = x[b, 0].nonzero().tolist()
            assert where == gt[b].nonzero().tolist() == t[b].nonzero().tolist() and len(where) == 1
            seen.add(tuple(where[0]))
    assert seen == {(1, 0), (1, W - 1), (H - 2, 0), (H - 2, W - 1)}  # every flip combination occurred


def test_resume_is_bit_exact(tiny_osie, tmp_path, monkeypatch):
    import rollout_fast.distill.loop as mod  # where the checkpoint is written

    root, split = tiny_osie
    c = cfg(split, epochs=2)
    distill_saliency(root, tmp_path / "full", c, device="cpu", progress=False, cache_dir=tmp_path / "cache")

    class Stop(Exception):
        pass

    real = mod.save_training_state

    def save_then_stop(path, state):
        real(path, state)
        raise Stop

    monkeypatch.setattr(mod, "save_training_state", save_then_stop)
    with pytest.raises(Stop):
        distill_saliency(root, tmp_path / "part", c, device="cpu", progress=False, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(mod, "save_training_state", real)
    with pytest.raises(FileExistsError, match="resume"):
        distill_saliency(root, tmp_path / "part", c, device="cpu", progress=False, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="different configuration"):
        distill_saliency(root, tmp_path / "part", cfg(split, epochs=3), device="cpu", progress=False, resume=True,
                         cache_dir=tmp_path / "cache")
    distill_saliency(root, tmp_path / "part", c, device="cpu", progress=False, resume=True,
                     cache_dir=tmp_path / "cache")
    got = load_training_state(tmp_path / "part" / "last.pt")["model"]
    want = load_training_state(tmp_path / "full" / "last.pt")["model"]
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    assert (tmp_path / "part" / "log.csv").read_text().count("\n") == 3


def test_bad_input_is_named(tiny_osie, tmp_path):
    root, split = tiny_osie
    with pytest.raises(ValueError, match=r"teacher: model B \(heads=2\) needs a saliency teacher"):
        distill_saliency(root, tmp_path / "x", cfg(split, heads=2), progress=False)
    with pytest.raises(ValueError, match="model A .* takes none"):
        distill_saliency(root, tmp_path / "x", cfg(split, teacher="t.safetensors"), progress=False)
    wrong = save_tiny_saliency_model(tmp_path / "t16.safetensors", input_size=[16, 16])
    with pytest.raises(ValueError, match=r"teacher: '.*t16.safetensors' gives maps of 16 x 16 .* this run trains at "
                                         r"24 x 32"):
        distill_saliency(root, tmp_path / "x", cfg(split, heads=2, teacher=str(wrong)), progress=False)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"train": ["1001.jpg"], "val": []}))
    with pytest.raises(ValueError, match=r"split 'val' in .*empty.json is empty"):
        distill_saliency(root, tmp_path / "x", cfg(empty), progress=False)
    with pytest.raises(ValueError, match=r"batch_size: 8 exceeds the 4 training images"):
        distill_saliency(root, tmp_path / "x", cfg(split, batch_size=8), progress=False)
    for bad, msg in [({"encoder": "vgg"}, "encoder: expected one of"), ({"schedule": "step"}, "schedule: expected"),
                     ({"lr": 0}, "lr: expected > 0"), ({"epochs": 0}, "head_epochs \\+ epochs must be >= 1"),
                     ({"input_size": [24]}, "input_size: expected")]:
        with pytest.raises(ValueError, match=msg):
            distill_saliency(root, tmp_path / "x", cfg(split, **bad), progress=False)
    with pytest.raises(FileNotFoundError, match="data: dataset folder not found"):
        distill_saliency(tmp_path / "none", tmp_path / "x", cfg(split), progress=False)
    assert not (tmp_path / "x" / "last.pt").exists()
