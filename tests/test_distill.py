"""Distillation: losses, deterministic augmentation views, a tiny end-to-end run (card, metrics, loadable
student), cached targets, bit-exact resume, clear errors that overwrite nothing, the CLI sub-command, and
two gloo processes under torchrun training the same model as one process with the same global batch."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from rollout_fast.checkpoint import load_training_state, load_weights, save_weights, write_json
from rollout_fast.distill import (
    DistillConfig,
    add_distill_parser,
    config_from_args,
    distill,
    distill_loss,
    run_distill,
    view_params,
)
from rollout_fast.students import load_student
from rollout_fast.teacher import teacher_data_config

TINY_ARCH = {"img_size": 32, "patch_size": 4, "num_classes": 10, "embed_dim": 32, "depth": 1, "num_heads": 2,
             "embed_layer": {"name": "conv_stem", "convs_per_stage": 1}}
VIT = {"depth": 1, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    from rollout_fast.models import create_vit

    torch.manual_seed(0)
    model = create_vit(TINY_ARCH)
    path = tmp_path_factory.mktemp("teacher") / "tiny.safetensors"
    save_weights(path, model.state_dict())
    write_json(path.with_suffix(".json"), {"name": "tiny", "arch": TINY_ARCH, "data_config": teacher_data_config(32)})
    return str(path)


def cfg(teacher, **kw):
    base = dict(teacher=teacher, student="vit-tiny", strategy="lowres", factor=2, head_epochs=1, epochs=1,
                batch_size=8, lr=3e-3, val_images=8, workers=0, amp=False, student_options=dict(VIT))
    base.update(kw)
    return DistillConfig(**base)


def test_losses():
    logits = torch.zeros(2, 2, 2)
    onehot = torch.zeros(2, 2, 2)
    onehot[:, 0, 0] = 3.0  # any scale: normalised to sum 1
    assert distill_loss(logits, onehot, "kld").item() == pytest.approx(math.log(4), abs=1e-6)
    target = torch.rand(2, 2, 2)
    assert distill_loss(torch.log(target), target, "kld").item() == pytest.approx(0.0, abs=1e-6)
    t_max = target / target.amax(dim=(1, 2), keepdim=True)
    z = torch.randn(2, 2, 2)
    assert distill_loss(z, target, "bce").item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(z, t_max).item(), abs=1e-6)
    assert distill_loss(z, target, "mse").item() == pytest.approx(((z.sigmoid() - t_max) ** 2).mean().item(), abs=1e-6)
    with pytest.raises(ValueError, match="grid"):
        distill_loss(torch.zeros(2, 4, 4), torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="loss"):
        distill_loss(logits, onehot, "l1")


def test_views_are_deterministic_and_view0_is_identity():
    dx, dy, fl = view_params(0, 0, 5, 4, True)
    assert not dx.any() and not dy.any() and not fl.any()
    a, b = view_params(3, 2, 100, 4, True), view_params(3, 2, 100, 4, True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].abs().max() <= 4 and a[0].abs().max() > 0 and a[2].any()
    assert not torch.equal(a[0], view_params(3, 1, 100, 4, True)[0])


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
    from rollout_fast.distill import _Normalizer, load_split_tensor

    c = cfg(tiny_teacher, cache_targets=True, views=2, head_epochs=0, epochs=1, head_fusion="max",
            discard_ratio=0.5)
    distill(tiny_cifar, tmp_path / "run", c, device="cpu", progress=False)
    teacher, dc = load_teacher(tiny_teacher)
    images, _, _ = load_split_tensor(tiny_cifar / "train", (32, 32))
    params = view_params(0, 1, len(images), c.max_shift, c.flip)
    want = AttentionRollout(teacher, head_fusion="max", discard_ratio=0.5)(
        _Normalizer(dc["mean"], dc["std"], "cpu")(images, *params))
    cached = [torch.load(p, weights_only=True) for p in (tmp_path / "run" / "cache").glob("maps_*.pt")]
    assert any(m.shape == want.shape and torch.allclose(m, want, atol=1e-6) for m in cached)


def test_grad_rollout_targets_are_the_teachers_gradient_rollout(tiny_cifar, tiny_teacher, tmp_path):
    """target='grad-rollout': the cached maps are the teacher's gradient rollout (predicted class) of the
    same augmented images, cached apart from the attention-rollout maps, and the card says which."""
    from rollout_fast import AttentionRollout, load_teacher
    from rollout_fast.distill import _Normalizer, load_split_tensor

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
    x = _Normalizer(dc["mean"], dc["std"], "cpu")(images, *view_params(0, 0, len(images), c.max_shift, c.flip))
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

    import rollout_fast.distill as mod

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


def test_cli_subcommand(tiny_cifar, tiny_teacher, tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_distill_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["distill", "--teacher", tiny_teacher, "--student", "vit-tiny", "--strategy", "mask",
                         "--factor", "2", "--data", str(tiny_cifar), "--out", str(tmp_path / "o"),
                         "--loss", "mse", "--head-fusion", "max", "--discard-ratio", "0.9", "--cache-targets",
                         "--student-option", "depth=1", "--student-option", "embed_dim=32"])
    c = config_from_args(args)
    assert (c.strategy, c.loss, c.head_fusion, c.discard_ratio, c.cache_targets) == ("mask", "mse", "max", 0.9, True)
    assert c.student_options == {"depth": 1, "embed_dim": 32} and args.func is run_distill
    args = p.parse_args(["distill", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"),
                         "--teacher", tiny_teacher])
    assert run_distill(args) == 1
    assert "data" in capsys.readouterr().err


def test_two_gloo_processes_train_the_same_model_as_one(tiny_cifar, tiny_teacher, tmp_path):
    common = ["--teacher", tiny_teacher, "--student", "vit-tiny", "--strategy", "lowres", "--factor", "2",
              "--data", str(tiny_cifar), "--batch-size", "8", "--head-epochs", "1", "--epochs", "1",
              "--val-images", "4", "--workers", "0", "--device", "cpu", "--no-amp", "--no-progress",
              "--cache-dir", str(tmp_path / "cache"), "--student-option", "depth=1",
              "--student-option", "embed_dim=32", "--student-option", "num_heads=2"]
    from rollout_fast.distill import main

    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "rollout_fast.distill", *common, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    one = load_weights(tmp_path / "one" / "student.safetensors")
    two = load_weights(tmp_path / "two" / "student.safetensors")
    init = None
    for k, v in one.items():
        assert torch.allclose(two[k], v, atol=2e-5, rtol=1e-4), (k, (two[k] - v).abs().max())
    # and the runs did train (not trivially equal because nothing moved)
    torch.manual_seed(0)
    from rollout_fast.students import create_student

    init = create_student("vit-tiny", strategy="lowres", factor=2, **VIT).state_dict()
    assert any(not torch.allclose(init[k], v) for k, v in one.items())
