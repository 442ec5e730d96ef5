"""The ``distill`` sub-command (rollout_fast.cli.distill), and two gloo processes under torchrun
(``python -m rollout_fast.distill``) training the same model as one process with the same global batch."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch
from distill_testing import VIT

from rollout_fast.checkpoint import load_weights
from rollout_fast.cli.distill import config_from_args, register, run


def test_cli_subcommand(tiny_cifar, tiny_teacher, tmp_path, capsys):
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command"))
    args = p.parse_args(["distill", "--teacher", tiny_teacher, "--student", "vit-tiny", "--strategy", "mask",
                         "--factor", "2", "--data", str(tiny_cifar), "--out", str(tmp_path / "o"),
                         "--loss", "mse", "--head-fusion", "max", "--discard-ratio", "0.9", "--cache-targets",
                         "--student-option", "depth=1", "--student-option", "embed_dim=32"])
    c = config_from_args(args)
    assert (c.strategy, c.loss, c.head_fusion, c.discard_ratio, c.cache_targets) == ("mask", "mse", "max", 0.9, True)
    assert c.student_options == {"depth": 1, "embed_dim": 32} and args.func is run
    args = p.parse_args(["distill", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"),
                         "--teacher", tiny_teacher])
    assert run(args) == 1
    assert "data" in capsys.readouterr().err


def test_two_gloo_processes_train_the_same_model_as_one(tiny_cifar, tiny_teacher, tmp_path):
    common = ["--teacher", tiny_teacher, "--student", "vit-tiny", "--strategy", "lowres", "--factor", "2",
              "--data", str(tiny_cifar), "--batch-size", "8", "--head-epochs", "1", "--epochs", "1",
              "--val-images", "4", "--workers", "0", "--device", "cpu", "--no-amp", "--no-progress",
              "--cache-dir", str(tmp_path / "cache"), "--student-option", "depth=1",
              "--student-option", "embed_dim=32", "--student-option", "num_heads=2"]
    from rollout_fast.distill.__main__ import main

    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "rollout_fast.distill", *common, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300, check=False)
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
