"""Load and faults (issue 18): resume with DataLoader workers is bit-exact, a run killed before its first
checkpoint can be started again, and (slow) a small version of benchmarks/soak.py on real CIFAR-10 images."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from paths import CIFAR10, REPO

from rollout_fast.checkpoint import load_training_state
from rollout_fast.teacher import TeacherConfig, train_teacher

TINY_ARCH = {"img_size": 32, "patch_size": 4, "num_classes": 10, "embed_dim": 32, "depth": 1, "num_heads": 2,
             "embed_layer": {"name": "conv_stem", "convs_per_stage": 1}}


class Stop(Exception):
    pass


def _stop_at_checkpoint(monkeypatch, after_write: bool):
    """The process 'dies' at the first checkpoint write: right after it, or before anything is written."""
    import rollout_fast.teacher as teacher_mod

    real_save = teacher_mod.save_training_state

    def save(path, state):
        if after_write:
            real_save(path, state)
        raise Stop
    monkeypatch.setattr(teacher_mod, "save_training_state", save)


def test_resume_with_dataloader_workers_is_bit_exact(tiny_cifar, tmp_path, monkeypatch):
    """Persistent workers drew their seed once per process, so a resumed epoch got other augmentations and
    another sample order; each epoch's workers are now seeded from the checkpointed generator."""
    cfg = TeacherConfig(epochs=3, batch_size=8, workers=2, arch=dict(TINY_ARCH))
    train_teacher(tiny_cifar, tmp_path / "full", cfg, device="cpu", progress=False)
    with monkeypatch.context() as m:
        _stop_at_checkpoint(m, after_write=True)
        with pytest.raises(Stop):
            train_teacher(tiny_cifar, tmp_path / "part", cfg, device="cpu", progress=False)
    assert load_training_state(tmp_path / "part" / "last.pt")["epoch"] == 1
    train_teacher(tiny_cifar, tmp_path / "part", cfg, device="cpu", progress=False, resume=True)
    got, want = (load_training_state(tmp_path / r / "last.pt") for r in ("part", "full"))
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v), k
    assert torch.equal(got["rng_loader"], want["rng_loader"])


def test_a_run_killed_before_its_first_checkpoint_starts_again(tiny_cifar, tmp_path, monkeypatch):
    """No log.csv before the first checkpoint: a fresh run may reuse the folder (--resume has nothing)."""
    cfg = TeacherConfig(epochs=1, batch_size=8, workers=0, arch=dict(TINY_ARCH))
    with monkeypatch.context() as m:
        _stop_at_checkpoint(m, after_write=False)
        with pytest.raises(Stop):
            train_teacher(tiny_cifar, tmp_path / "run", cfg, device="cpu", progress=False)
    (tmp_path / "run" / ".last.pt.abc123").write_bytes(b"x")  # a write cut short by the kill
    assert not [p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")]
    train_teacher(tiny_cifar, tmp_path / "run", cfg, device="cpu", progress=False)
    assert load_training_state(tmp_path / "run" / "last.pt")["epoch"] == 1
    assert not list((tmp_path / "run").glob(".last.pt.*"))


@pytest.mark.slow
def test_soak_small(tmp_path):
    """200 real images in one process and from 4 threads sharing a model (maps equal, memory and handles
    flat, no hooks left); a tiny training run killed 3 times and resumed, with 0 and 2 workers, ends
    bit-identical to an uninterrupted one."""
    if not (CIFAR10 / "test").is_dir() or not (CIFAR10 / "train").is_dir():
        pytest.skip(f"real CIFAR-10 data not found at {CIFAR10} (set ROLLOUT_FAST_SHARED)")
    out = tmp_path / "soak"
    cmd = [sys.executable, str(REPO / "benchmarks" / "soak.py"), "--data", str(CIFAR10), "--limit", "200",
           "--batch", "20", "--warmup-images", "100", "--window-images", "50", "--rounds", "3",
           "--warmup-rounds", "1", "--rss-tol-mb", "64", "--no-overlays",
           "--kills", "3", "--workers", "0", "2", "--epochs", "3", "--per-class", "10", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads((out / "soak.json").read_text())
    r = res["rollout"]
    assert r["images"] == 200 and r["maps_equal"] and r["maps_max_abs_diff"] == 0.0
    assert r["hooks_unchanged"] and r["hooks_after_threads"]["forward_hooks"] == r["hooks_before"]["forward_hooks"]
    for part in ("single", "threaded"):
        assert r[part]["flat"], r[part]
    assert [f["workers"] for f in res["faults"]] == [0, 2]
    for f in res["faults"]:
        assert f["kills"] == 3 and f["last_pt_identical"] and f["teacher_safetensors_identical"], f
        assert f["final_launch"]["rc"] == 0
    assert subprocess.run(cmd, capture_output=True, check=False).returncode == 2  # --out exists: refused
