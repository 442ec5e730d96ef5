"""The prune-eval command (rollout_fast.cli.prune_eval) end to end on tiny random models and the real photos of
../shared/data/imagenet-sample (skipped when ../shared is absent), and its argument errors."""

from __future__ import annotations

import argparse
import json

import pytest
import timm
import torch

from rollout_fast.cli import prune_eval as prune_eval_command


def _run(argv):
    parser = argparse.ArgumentParser()
    prune_eval_command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)



def test_prune_eval_cli_on_real_photos(imagenet_sample, tmp_path, capsys):
    """Random-weight timm models on real ImageNet photos: tables, plot, shapes, keep 1.0 = the full model."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2)
    ckpt = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(ckpt))
    out = tmp_path / "out"
    rc = _run(["prune-eval", "--model", "vit_tiny_patch16_224", "--checkpoint", str(ckpt), "--timm-arg", "img_size=64",
               "--timm-arg", "depth=2", "--data", str(imagenet_sample), "--limit", "6", "--scorers",
               "random,rollout,grad-rollout,cls-attention", "--keep", "1.0,0.5,0.1", "--seeds", "2", "--batch-size", "4",
               "--throughput-batches", "1,3", "--throughput-time", "0", "--out", str(out), "--no-progress"])
    assert rc == 0
    assert "| random |" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert {p.name for p in out.iterdir()} >= {"results.csv", "results.json", "results.md", "throughput.csv",
                                               "prune_top1.png"}
    assert res["meta"]["images"] == 6 and res["meta"]["num_patches"] == 16
    rows = {(r["scorer"], r["keep_ratio"]): r for r in res["rows"]}
    assert rows[("random", 0.5)]["tokens_kept"] == 8 and rows[("random", 0.1)]["tokens_kept"] == 2
    assert rows[("random", 0.5)]["seeds"] == 2
    for s in ("random", "rollout", "grad-rollout", "cls-attention"):
        assert rows[(s, 1.0)]["top1"] == res["meta"]["full_top1"] and rows[(s, 1.0)]["top1_std"] == 0.0
    assert {(t["scorer"], t["batch"]) for t in res["throughput"]} == {
        (s, b) for s in ("full", "random", "rollout", "grad-rollout", "cls-attention") for b in (1, 3)}
    assert all(t["images_per_s"] > 0 for t in res["throughput"])
    out2 = tmp_path / "tp"
    rc = _run(["prune-eval", "--model", "vit_tiny_patch16_224", "--timm-arg", "img_size=32", "--timm-arg", "depth=1",
               "--data", str(imagenet_sample), "--limit", "2", "--scorers", "random", "--keep", "0.5",
               "--throughput-only", "--threads", "1", "--throughput-batches", "2", "--throughput-time", "0",
               "--out", str(out2), "--no-progress"])
    tp = json.loads((out2 / "results.json").read_text())
    assert rc == 0 and tp["rows"] == [] and not (out2 / "prune_top1.png").exists()
    assert [(t["scorer"], t["batch"]) for t in tp["throughput"]] == [("full", 2), ("random", 2)]


@pytest.mark.parametrize("argv, match", [
    (["--keep", "0.5,0"], "keep_ratio"),
    (["--keep", "1.2"], "keep_ratio"),
    (["--scorers", "random,entropy"], "--scorers"),
    (["--scorers", "student", "--student", "/nonexistent/student.safetensors"], "no student"),
    (["--scorers", "student", "--student-thumbnail", "16"], "--student-thumbnail: thumbnail: this student makes"),
    (["--timm-arg", "img_size"], "KEY=VALUE"),
    (["--threads", "0"], "--threads"),
    (["--seeds", "0"], "--seeds"),
])
def test_prune_eval_bad_arguments(argv, match, tmp_path, capsys):
    rc = _run(["prune-eval", "--data", str(tmp_path), "--out", str(tmp_path / "o"), *argv])
    assert rc == 2
    assert match in capsys.readouterr().err
