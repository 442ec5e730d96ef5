"""The prune-eval command (rollout_fast.cli.prune_eval) end to end on tiny random models and the real photos of
../shared/data/imagenet-sample (skipped when ../shared is absent), --methods on a tiny ImageFolder made here,
and its argument errors."""

from __future__ import annotations

import argparse
import json

import pytest
import timm
import torch

from rollout_fast.cli import prune_eval as prune_eval_command
from rollout_fast.prune import method_names, scorer_names


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
    (["--scorers", "random,model-rollout"], "--scorers: scorer 'model-rollout' needs --scorer-model NAME_OR_PATH"),
    (["--scorer-timm-arg", "depth"], "--scorer-timm-arg: expected KEY=VALUE"),
])
def test_prune_eval_bad_arguments(argv, match, tmp_path, capsys):
    rc = _run(["prune-eval", "--data", str(tmp_path), "--out", str(tmp_path / "o"), *argv])
    assert rc == 2
    assert match in capsys.readouterr().err


@pytest.fixture
def tiny_folder(tmp_path):
    """An ImageFolder of 4 random 32 x 32 PNGs in 2 classes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "data" / f"class{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / "data" / f"class{c}" / f"{i}.png")
    return tmp_path / "data"


TINY = ["--model", "vit_tiny_patch16_224", "--timm-arg", "img_size=32", "--timm-arg", "patch_size=8",
        "--timm-arg", "depth=2"]  # 16 patches + a class token, 2 blocks, random weights
# a second, smaller random ViT on the same 4x4 grid at its own 64 px input (one block)
SCORER_MODEL = ["--scorer-model", "vit_tiny_patch16_224", "--scorer-timm-arg", "img_size=64", "--scorer-timm-arg",
                "depth=1"]


def test_prune_eval_methods_on_a_tiny_vit(tiny_folder, tmp_path, capsys):
    """--methods: one table (method, setting, top-1, images/s, speed-up) for in-network methods, scorers and a
    scorer + ToMe, each at its operating points; every no-reduction setting scores the full model's top-1."""
    import csv

    out = tmp_path / "out"
    rc = _run(["prune-eval", *TINY, "--data", str(tiny_folder), "--batch-size", "3", "--throughput-batches", "2",
               "--throughput-time", "0", "--out", str(out), "--no-progress", "--methods", "tome:r=0,2",
               "evit:keep=1.0,0.5", "random:keep=1.0,0.5", "cls-attention+tome:keep=1.0,0.5:r=0,1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| method | setting | tokens/block | top-1 | Δ top-1 | images/s (batch 2) | speed-up (batch 2) |" in printed
    assert sorted(p.name for p in out.iterdir()) == ["methods.csv", "methods.json", "methods.md",
                                                     "methods_top1_speedup.png"]
    res = json.loads((out / "methods.json").read_text())
    assert res["methods"] == ["tome:r=0,2", "evit:keep=1.0,0.5", "random:keep=1.0,0.5",
                              "cls-attention+tome:keep=1.0,0.5:r=0,1"]
    assert res["meta"]["images"] == 4 and res["meta"]["num_tokens"] == 17 and res["meta"]["model"] == TINY[1]
    # conv-BN fusion is on by default and leaves a network without BatchNorm2d (plain patch embedding) alone
    assert res["meta"]["fuse_conv_bn"] is True and res["meta"]["conv_bn_folded"] == {"model": 0, "student": 0}
    with open(out / "methods.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["method", "setting", "batch", "tokens", "top1", "images_per_s", "speedup"]
    assert [(r["method"], r["setting"]) for r in table] == [
        ("full", "-"), ("tome", "r=0"), ("tome", "r=2"), ("evit", "keep=1.0"), ("evit", "keep=0.5"),
        ("random", "keep=1.0"), ("random", "keep=0.5"), ("cls-attention+tome", "keep=1.0 r=0"),
        ("cls-attention+tome", "keep=1.0 r=1"), ("cls-attention+tome", "keep=0.5 r=0"),
        ("cls-attention+tome", "keep=0.5 r=1")]
    full = res["meta"]["full_top1"]
    for r in res["rows"]:
        assert r["batch"] == 2 and r["images_per_s"] > 0 and r["speedup"] > 0
        if r["setting"] in ("-", "r=0", "keep=1.0", "keep=1.0 r=0"):
            assert r["top1"] == full and r["tokens"] == 17.0, r
    assert (out / "methods.md").read_text().startswith("| method | setting |")


@pytest.mark.parametrize("argv, message", [
    (["--methods", "tome:r=2", "foo"], (f"--methods foo: unknown method 'foo'; expected a scorer "
     f"({', '.join(scorer_names())}), an in-network method ({', '.join(method_names())}) or SCORER+METHOD (e.g. "
     "student+tome)")),
    (["--methods", "evit:keep=0.7,1.5"], ("--methods evit:keep=0.7,1.5: keep_ratio: expected a number in (0, 1], "
     "got 1.5")),
    (["--methods", "random:keep=0"], "--methods random:keep=0: keep_ratio: expected a number in (0, 1], got 0"),
    (["--methods", "tome:r=2,6"], ("--methods tome:r=2,6: r=6: r: 6 tokens to merge at block 1, but its 11 tokens "
     "(1 protected) allow at most 5; lower r")),
    (["--methods", "random+tome:keep=0.5:r=3"], ("--methods random+tome:keep=0.5:r=3: keep=0.5 r=3: r: 3 tokens to "
     "merge at block 1, but its 6 tokens (1 protected) allow at most 2; lower r (after pre-selection keeps 8 of 16 "
     "patch tokens)")),
    (["--methods", "tome:depth=2"], ("--methods tome:depth=2: unknown setting 'depth'; expected one of ['r', "
     "'prop_attn']")),
    (["--methods", "tome:r=2", "--keep", "0.5"], ("--methods: give the scorers as methods (e.g. "
     "random:keep=0.5,0.25), not with --scorers/--keep")),
    (["--methods", "student+tome:r=2", "--student", "/nonexistent/s.safetensors"], ("--methods student: no student "
     "for '/nonexistent/s.safetensors'")),
    (["--methods", "ats:keep=0.5,1.5"], "--methods ats:keep=0.5,1.5: keep_ratio: expected a number in (0, 1], got 1.5"),
    (["--methods", "ats:blocks=[2]:keep=0.5"], ("--methods ats:blocks=[2]:keep=0.5: blocks=[2] keep=0.5: blocks: "
     "expected increasing block indices in [0, 2), got [2]")),
    (["--methods", "model-rollout:keep=0.5"], ("--methods: scorer 'model-rollout' needs --scorer-model NAME_OR_PATH "
     "(the ViT whose rollout picks the tokens)")),
    (["--methods", "tome:r=2", "--scorer-model", "vit_tiny_patch16_224"], ("--scorer-model: no scorer uses it; add "
     "model-rollout, model-grad-rollout or ltpa to --methods")),
    (["--methods", "model-rollout:keep=0.5", *SCORER_MODEL[:2], "--scorer-timm-arg", "img_size=32",
      "--scorer-timm-arg", "patch_size=4"], ("--scorer-model vit_tiny_patch16_224: scorer model: its patch grid is "
     "8x8 at its 32x32 input, the pruned model's is 4x4; use a scorer model with the same patch grid")),
])
def test_prune_eval_methods_bad_settings_are_one_line_errors(argv, message, tiny_folder, tmp_path, capsys):
    from rollout_fast.cli import main

    rc = main(["prune-eval", *TINY, "--data", str(tiny_folder), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("rollout-fast prune-eval: " + message)
    if "no student" not in message:  # that one ends with the loader's own reason
        assert err == f"rollout-fast prune-eval: {message}\n"
    assert not (tmp_path / "o").exists()


def test_prune_eval_ats_and_a_scorer_model_on_a_tiny_vit(tiny_folder, tmp_path, capsys):
    """--methods ats (adaptive token counts: the measured mean tokens/block) and model-rollout /
    model-grad-rollout with --scorer-model (a 64 px ViT on the same 4x4 grid: the images are resized for it, and
    the command says so); the no-reduction settings score the full model's top-1."""
    out = tmp_path / "out"
    rc = _run(["prune-eval", *TINY, "--data", str(tiny_folder), "--batch-size", "3", "--throughput-batches", "2",
               "--throughput-time", "0", "--out", str(out), "--no-progress", *SCORER_MODEL, "--methods",
               "ats:keep=1.0,0.5:blocks=[0,1]", "ats:keep=1.0:blocks=[]", "model-rollout:keep=1.0,0.5",
               "model-grad-rollout:keep=0.5", "model-rollout+ats:keep=0.5:ats.keep=1.0:blocks=[0]"])
    captured = capsys.readouterr()
    assert rc == 0
    assert captured.err == ("rollout-fast prune-eval: note: --scorer-model vit_tiny_patch16_224 takes 64x64 images; "
                            "the 32x32 inputs are resized for it\n")
    res = json.loads((out / "methods.json").read_text())
    assert res["meta"]["scorer_model"] == "vit_tiny_patch16_224"
    rows = {(r["method"], r["setting"]): r for r in res["rows"]}
    assert list(rows) == [("full", "-"), ("ats", "keep=1.0 blocks=[0,1]"), ("ats", "keep=0.5 blocks=[0,1]"),
                          ("ats", "keep=1.0 blocks=[]"), ("model-rollout", "keep=1.0"), ("model-rollout", "keep=0.5"),
                          ("model-grad-rollout", "keep=0.5"), ("model-rollout+ats", "keep=0.5 ats.keep=1.0 blocks=[0]")]
    full = res["meta"]["full_top1"]
    for key in (("ats", "keep=1.0 blocks=[]"), ("model-rollout", "keep=1.0")):
        assert rows[key]["top1"] == full and rows[key]["tokens"] == 17.0
    assert rows[("ats", "keep=0.5 blocks=[0,1]")]["tokens"] <= (17 + 9) / 2  # 8 quantiles of 16 at block 0
    assert rows[("model-rollout", "keep=0.5")]["tokens"] == 9.0
    assert all(r["images_per_s"] > 0 for r in res["rows"])


def test_prune_eval_scorers_with_a_scorer_model(tiny_folder, tmp_path):
    out = tmp_path / "out"
    rc = _run(["prune-eval", *TINY, "--data", str(tiny_folder), "--batch-size", "3", "--throughput-batches", "2",
               "--throughput-time", "0", "--out", str(out), "--no-progress", *SCORER_MODEL, "--scorers",
               "random,model-rollout", "--keep", "1.0,0.5", "--seeds", "1"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    rows = {(r["scorer"], r["keep_ratio"]): r for r in res["rows"]}
    assert rows[("model-rollout", 1.0)]["top1"] == res["meta"]["full_top1"]
    assert rows[("model-rollout", 0.5)]["tokens_kept"] == 8
    assert {(t["scorer"], t["keep_ratio"]) for t in res["throughput"]} == {("full", 1.0), ("random", 0.5),
                                                                           ("model-rollout", 0.5)}


@pytest.fixture
def conv_stem_teacher(tmp_path):
    """(teacher path, student path, teacher module, student module): a tiny conv-stem ViT saved with its card and
    a tiny ResNet student for it, their BatchNorm running statistics far from the identity."""
    from rollout_fast.checkpoint import save_weights, write_json
    from rollout_fast.models import create_vit
    from rollout_fast.teacher import teacher_data_config

    torch.manual_seed(0)
    arch = {"img_size": 32, "patch_size": 8, "num_classes": 2, "embed_dim": 32, "depth": 1, "num_heads": 2,
            "embed_layer": {"name": "conv_stem", "convs_per_stage": 1}}
    model = create_vit(arch)
    for m in model.modules():  # running statistics far from the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "tiny.safetensors"
    save_weights(path, model.state_dict())
    write_json(path.with_suffix(".json"), {"name": "tiny", "arch": arch, "data_config": teacher_data_config(32)})
    from rollout_fast.students import create_student, save_student

    student = create_student("resnet-cifar", factor=2, input_size=(32, 32), grid=(4, 4), channels=[4, 4, 8, 8])
    for m in student.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
    st_path, _ = save_student(tmp_path / "student.safetensors", student.eval(), {"teacher": "tiny"})
    return path, st_path, model, student


def test_prune_eval_fuse_conv_bn_on_a_conv_stem_teacher(conv_stem_teacher, tiny_folder, tmp_path, monkeypatch):
    """--fuse-conv-bn (the default): the same top-1 as --no-fuse-conv-bn (the folded model computes the same
    logits), recorded in meta with the BatchNorms folded; a tiny conv-stem ViT saved with its card, a student."""
    path, st_path, model, student = conv_stem_teacher
    import rollout_fast.fuse

    folded = []
    real = rollout_fast.fuse.fuse_conv_bn

    def spy(module, example, **kw):
        fused, count = real(module, example, **kw)
        folded.append((type(module).__name__, count))
        return fused, count

    monkeypatch.setattr(rollout_fast.fuse, "fuse_conv_bn", spy)
    results = {}
    for flag in (["--no-fuse-conv-bn"], []):
        out = tmp_path / f"out{len(flag)}"
        rc = _run(["prune-eval", "--model", str(path), "--data", str(tiny_folder), "--batch-size", "3",
                   "--throughput-batches", "2", "--throughput-time", "0", "--out", str(out), "--no-progress",
                   "--methods", "random:keep=1.0,0.5", "student:keep=0.5", "--student", str(st_path), *flag])
        assert rc == 0
        results[not flag] = json.loads((out / "methods.json").read_text())
    n_bn = [sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) for net in (model, student)]
    assert folded == [("VisionTransformer", n_bn[0]), ("RolloutStudent", n_bn[1])] and min(n_bn) >= 3
    assert results[True]["meta"]["fuse_conv_bn"] is True and results[False]["meta"]["fuse_conv_bn"] is False
    assert results[True]["meta"]["conv_bn_folded"] == {"model": n_bn[0], "student": n_bn[1]}
    assert results[False]["meta"]["conv_bn_folded"] is None
    assert [r["top1"] for r in results[True]["rows"]] == [r["top1"] for r in results[False]["rows"]]


def test_prune_eval_student_precision_bf16(conv_stem_teacher, tiny_folder, tmp_path, capsys):
    """--student-precision bf16: the student runs under bfloat16 autocast (its scores as a bf16 run gives them, so
    its top-1 is its own), recorded in meta; --top1-from refuses a top-1 run made at another student precision,
    and a run that records none counts as fp32."""
    from rollout_fast.precision import AutocastModule
    from rollout_fast.students import load_student

    path, st_path, _, _ = conv_stem_teacher
    base = ["prune-eval", "--model", str(path), "--data", str(tiny_folder), "--batch-size", "3", "--no-progress",
            "--throughput-batches", "", "--methods", "student:keep=0.5", "--student", str(st_path)]
    outs = {p: tmp_path / p for p in ("fp32", "bf16")}
    for precision, out in outs.items():
        assert _run([*base, "--out", str(out), "--student-precision", precision]) == 0
    res = {p: json.loads((out / "methods.json").read_text()) for p, out in outs.items()}
    assert "student_precision" not in res["fp32"]["meta"] and res["bf16"]["meta"]["student_precision"] == "bf16"
    # the bf16 run's scores: the student's own output under autocast, kept tokens as the pruned model keeps them
    student = load_student(str(st_path))
    student = student[0] if isinstance(student, tuple) else student
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = student.eval()(x).float()
    assert torch.equal(AutocastModule(student)(x), want)
    timed = [*base[:-6], "--throughput-batches", "2", "--throughput-time", "0", "--methods", "student:keep=0.5",
             "--student", str(st_path), "--out", str(tmp_path / "timed")]
    capsys.readouterr()
    assert _run([*timed, "--top1-from", str(outs["fp32"]), "--student-precision", "bf16"]) == 2
    src = str(outs["fp32"] / "methods.json")
    assert capsys.readouterr().err == (f"rollout-fast prune-eval: --top1-from: {src!r} was made with another "
                                       "student_precision ('fp32', now 'bf16')\n")
    assert _run([*timed, "--top1-from", str(outs["bf16"]), "--student-precision", "bf16", "--overwrite"]) == 0
