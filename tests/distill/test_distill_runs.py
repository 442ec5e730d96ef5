"""Distillation end to end on tiny data: card, metrics and a loadable student, cached targets (attention and
gradient rollout), bit-exact resume, clear errors that overwrite nothing."""

from __future__ import annotations

import json
import os

import pytest
import torch
from distill_testing import cfg

from rollout_fast import load_student
from rollout_fast.checkpoint import load_training_state, load_weights
from rollout_fast.distill import distill, view_params


def test_tiny_run_writes_a_loadable_student_card_and_metrics(tiny_cifar, tiny_teacher, tmp_path):
    metrics = distill(tiny_cifar, tmp_path / "run", cfg(tiny_teacher, cache_targets=True, views=2,
                                                         student="resnet-cifar", loss="bce",
                                                         student_options={"channels": [8, 8, 8, 8],
                                                                          "head_width": 8}),
                      device="cpu", progress=False)
    run = tmp_path / "run"
    lines = (run / "log.csv").read_text().strip().splitlines()
    assert lines[0].startswith("epoch,phase,train_loss") and len(lines) == 3
    assert [ln.split(",")[1] for ln in lines[1:]] == ["head", "all"]
    assert json.loads((run / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    for part in ("centred", "shifted"):
        assert set(metrics[part]) >= {"kld", "cc", "sim", "recall@0.25", "recall@0.5", "recall@0.75", "spearman"}
        assert metrics[part]["images"] == 20
    assert set(metrics["baselines"]) == {"centre_prior", "mean_map", "uniform"}
    assert metrics["baselines"]["uniform"]["centred"]["cc"] == pytest.approx(0.0, abs=1e-3)
    assert metrics["object_placement"]["shift_pixels"] == 8
    cost = metrics["cost"]
    assert cost["student"]["macs_per_image"] > 0 and cost["teacher_rollout"]["forward_macs_per_image"] > 0
    student, card = load_student(str(run / "student.safetensors"))
    assert card["teacher"] == tiny_teacher and card["rollout"]["head_fusion"] == "mean"
    assert card["rollout"]["discard_ratio"] == 0.0 and card["student"]["strategy"] == "lowres"
    assert card["metrics"]["centred"] == metrics["centred"] and "command" in card
    assert student(torch.randn(2, 3, 32, 32)).shape == (2, 8, 8)
    state = load_training_state(run / "last.pt")
    for k, v in load_weights(run / "student.safetensors").items():
        assert torch.equal(v, state["model"][k]), k


def test_cached_targets_are_the_teachers_rollout_of_the_augmented_images(tiny_cifar, tiny_teacher, tmp_path):
    from rollout_fast import AttentionRollout, load_teacher
    from rollout_fast.distill.data import Normalizer, load_split_tensor

    c = cfg(tiny_teacher, cache_targets=True, views=2, head_epochs=0, epochs=1, head_fusion="max",
            discard_ratio=0.5)
    distill(tiny_cifar, tmp_path / "run", c, device="cpu", progress=False)
    teacher, dc = load_teacher(tiny_teacher)
    images, _, _ = load_split_tensor(tiny_cifar / "train", (32, 32))
    params = view_params(0, 1, len(images), c.max_shift, c.flip)
    want = AttentionRollout(teacher, head_fusion="max", discard_ratio=0.5)(
        Normalizer(dc["mean"], dc["std"], "cpu")(images, *params))
    cached = [torch.load(p, weights_only=True) for p in (tmp_path / "run" / "cache").glob("maps_*.pt")]
    assert any(m.shape == want.shape and torch.allclose(m, want, atol=1e-6) for m in cached)


def test_grad_rollout_targets_are_the_teachers_gradient_rollout(tiny_cifar, tiny_teacher, tmp_path):
    """target='grad-rollout': the cached maps are the teacher's gradient rollout (predicted class) of the
    same augmented images, cached apart from the attention-rollout maps, and the card says which."""
    from rollout_fast import AttentionRollout, load_teacher
    from rollout_fast.distill.data import Normalizer, load_split_tensor

    cache = tmp_path / "cache"
    plain_metrics = distill(tiny_cifar, tmp_path / "plain", cfg(tiny_teacher, cache_targets=True, views=1,
                                                                head_epochs=0), device="cpu", progress=False,
                            cache_dir=cache)
    before = set(cache.glob("maps_*.pt"))
    c = cfg(tiny_teacher, target="grad-rollout", cache_targets=True, views=1, head_epochs=0)
    metrics = distill(tiny_cifar, tmp_path / "grad", c, device="cpu", progress=False, cache_dir=cache)
    assert metrics["rollout"]["target"] == "grad-rollout"
    # the teacher cost is that of the map the student replaces: a forward and a backward pass
    assert (metrics["cost"]["teacher_rollout"]["macs_per_image"]
            > plain_metrics["cost"]["teacher_rollout"]["macs_per_image"])
    new = set(cache.glob("maps_*.pt")) - before
    assert len(new) == 3  # test centred, test shifted, train view 0: none reused from the plain run
    teacher, dc = load_teacher(tiny_teacher)
    images, _, _ = load_split_tensor(tiny_cifar / "train", (32, 32))
    x = Normalizer(dc["mean"], dc["std"], "cpu")(images, *view_params(0, 0, len(images), c.max_shift, c.flip))
    want = AttentionRollout(teacher).grad_rollout(x)
    plain = AttentionRollout(teacher)(x)
    cached = [torch.load(p, weights_only=True) for p in new]
    assert any(m.shape == want.shape and torch.allclose(m, want, atol=1e-6) for m in cached)
    assert not torch.allclose(want, plain, atol=1e-3)  # a different map, so the test can tell them apart


def test_interrupted_run_resumes_bit_exactly(tiny_cifar, tiny_teacher, tmp_path, monkeypatch):
    c = cfg(tiny_teacher, strategy="mask", head_epochs=0, epochs=2)  # mask: training draws random tokens
    distill(tiny_cifar, tmp_path / "full", c, device="cpu", progress=False)

    class Stop(Exception):
        pass

    import rollout_fast.distill.loop as mod  # where the checkpoint is written

    real = mod.save_training_state

    def save_then_stop(path, state):
        real(path, state)
        raise Stop

    monkeypatch.setattr(mod, "save_training_state", save_then_stop)
    with pytest.raises(Stop):
        distill(tiny_cifar, tmp_path / "part", c, device="cpu", progress=False)
    monkeypatch.setattr(mod, "save_training_state", real)
    assert load_training_state(tmp_path / "part" / "last.pt")["epoch"] == 1
    distill(tiny_cifar, tmp_path / "part", c, device="cpu", progress=False, resume=True)
    got = load_training_state(tmp_path / "part" / "last.pt")["model"]
    want = load_training_state(tmp_path / "full" / "last.pt")["model"]
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    assert len((tmp_path / "part" / "log.csv").read_text().strip().splitlines()) == 3


def test_run_killed_before_its_first_checkpoint_starts_again_and_log_rows_follow_checkpoints(
        tiny_cifar, tiny_teacher, tmp_path, monkeypatch):
    """Issue 18: a run writes no log.csv (or tensorboard/) before its first checkpoint, so a run killed in
    its first epoch starts again without resume; the temp file of an interrupted checkpoint write is removed
    at the next start; an epoch's row is written after its checkpoint, and a kill between the two leaves no
    duplicate row once resumed (the log is rewritten from the rows saved in the checkpoint)."""
    import rollout_fast.distill.loop as mod  # where the checkpoint is written

    class Stop(Exception):
        pass

    real = mod.save_training_state

    def killed_mid_write(path, state):  # what a kill during atomic_write leaves: its temp file only
        (path.parent / f".{path.name}.abc123").write_bytes(b"x" * 100)
        raise Stop

    def save_then_stop(path, state):  # a kill right after the checkpoint, before its log row
        real(path, state)
        raise Stop

    c = cfg(tiny_teacher, head_epochs=0, epochs=2)
    run = tmp_path / "run"
    monkeypatch.setattr(mod, "save_training_state", killed_mid_write)
    with pytest.raises(Stop):
        distill(tiny_cifar, run, c, device="cpu", progress=False)
    assert sorted(p.name for p in run.iterdir()) == [".last.pt.abc123", "cache"]
    (run / ".log.csv.def456").write_text("epoch\n")
    monkeypatch.setattr(mod, "save_training_state", save_then_stop)
    with pytest.raises(Stop):
        distill(tiny_cifar, run, c, device="cpu", progress=False)  # started again: not refused
    assert not list(run.glob(".last.pt.*")) and not list(run.glob(".log.csv.*"))
    assert sorted(p.name for p in run.iterdir()) == ["cache", "last.pt"]  # no row before its checkpoint
    monkeypatch.setattr(mod, "save_training_state", real)
    with pytest.raises(FileExistsError, match="resume"):
        distill(tiny_cifar, run, c, device="cpu", progress=False)
    distill(tiny_cifar, run, c, device="cpu", progress=False, resume=True)
    lines = (run / "log.csv").read_text().strip().splitlines()
    assert lines[0] == ",".join(mod.LOG_COLUMNS) and [ln.split(",")[0] for ln in lines[1:]] == ["1", "2"]
    saved = load_training_state(run / "last.pt")["log"]
    assert [[str(v) for v in r] for r in saved] == [ln.split(",") for ln in lines[1:]]


def test_bad_input_is_refused_and_nothing_is_overwritten(tiny_cifar, tiny_teacher, tmp_path):
    c = cfg(tiny_teacher)
    with pytest.raises(FileNotFoundError, match="resume"):
        distill(tiny_cifar, tmp_path / "none", c, progress=False, resume=True)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "last.pt").write_bytes(b"truncated garbage")
    with pytest.raises(ValueError, match="corrupt"):
        distill(tiny_cifar, bad, c, progress=False, resume=True)
    with pytest.raises(FileExistsError, match="resume"):
        distill(tiny_cifar, bad, c, progress=False)
    assert (bad / "last.pt").read_bytes() == b"truncated garbage" and sorted(os.listdir(bad)) == ["last.pt"]
    with pytest.raises(FileNotFoundError, match="data"):
        distill(tmp_path / "missing", tmp_path / "x", c, progress=False)
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "test").mkdir()
    with pytest.raises(ValueError, match="data"):
        distill(empty, tmp_path / "x", c, progress=False)
    with pytest.raises(ValueError, match="strategy"):
        distill(tiny_cifar, tmp_path / "x", cfg(tiny_teacher, student="resnet-cifar", strategy="mask"), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        distill(tiny_cifar, tmp_path / "x", cfg(tiny_teacher, batch_size=0), progress=False)
    with pytest.raises(ValueError, match="loss"):
        distill(tiny_cifar, tmp_path / "x", cfg(tiny_teacher, loss="l2"), progress=False)
    with pytest.raises(ValueError, match="target"):
        distill(tiny_cifar, tmp_path / "x", cfg(tiny_teacher, target="saliency"), progress=False)
    with pytest.raises(ValueError, match="head_fusion: applies to target 'rollout' only"):
        distill(tiny_cifar, tmp_path / "x", cfg(tiny_teacher, target="grad-rollout", head_fusion="max"),
                progress=False)
