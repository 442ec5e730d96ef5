"""Resumable top-1 passes (rollout_fast.prune.progress, prune-eval --resume): a pass killed after any batch and
resumed ends with exactly the counts, random streams and observed token counts of an uninterrupted pass; a
progress file of other settings is refused; the command's option errors."""

from __future__ import annotations

import argparse
import json

import pytest
import timm
import torch

from rollout_fast.cli import prune_eval as prune_eval_command
from rollout_fast.prune import prune_eval
from rollout_fast.prune.progress import AccuracyCheckpoint, data_fingerprint
from rollout_fast.prune.study import compare_methods


class Killed(Exception):
    """Raised by KillingCheckpoint in place of a SIGKILL."""


class KillingCheckpoint(AccuracyCheckpoint):
    """Saves like AccuracyCheckpoint, then dies right after its ``after``-th save."""

    def __init__(self, *args, after: int, **kw):
        super().__init__(*args, **kw)
        self.after = after

    def save(self, next_start, state):
        super().save(next_start, state)
        self.after -= 1
        if self.after == 0:
            raise Killed


def _setup(n=11, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3).eval()
    g = torch.Generator().manual_seed(seed + 1)
    return model, torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g)


def _scorers(model, x, y, ckpt):
    return prune_eval(model, x, y, scorers=["random", "cls-attention"], keeps=[0.75, 0.25], seeds=2, batch_size=3,
                      throughput_batches=(), progress=False, checkpoint=ckpt)


def _methods(model, x, y, ckpt):
    return compare_methods(model, x, y, ["random:keep=0.5:seed=0,1", "tome:r=2", "ats:keep=0.5:blocks=[1]",
                                         "random+tome:keep=0.75:r=1"], batch_size=4, throughput_batches=(),
                           progress=False, checkpoint=ckpt)


@pytest.mark.parametrize("study", [_scorers, _methods])
@pytest.mark.parametrize("kill_after", [1, 2, 3])
def test_a_killed_pass_resumes_to_the_uninterrupted_result(tmp_path, study, kill_after):
    model, x, y = _setup()
    whole = AccuracyCheckpoint(tmp_path / "whole.json", {"model": "tiny"})
    expected = study(model, x, y, whole)
    with pytest.raises(Killed):
        study(model, x, y, KillingCheckpoint(tmp_path / "p.json", {"model": "tiny"}, after=kill_after))
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["next"] == min(kill_after * (3 if study is _scorers else 4), 11)
    got = study(model, x, y, AccuracyCheckpoint(tmp_path / "p.json", {"model": "tiny"}, resume=True))
    # the final saved state (counts, random generators, ATS's observed tokens) equals the uninterrupted pass's
    assert json.loads((tmp_path / "p.json").read_text()) == json.loads((tmp_path / "whole.json").read_text())
    assert got["rows"] == expected["rows"]
    assert got["meta"]["full_top1"] == expected["meta"]["full_top1"]


def test_resume_of_a_complete_pass_recomputes_nothing(tmp_path):
    model, x, y = _setup()
    expected = _scorers(model, x, y, AccuracyCheckpoint(tmp_path / "p.json", {}))
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    got = _scorers(model, x, y, AccuracyCheckpoint(tmp_path / "p.json", {}, resume=True))
    assert got["rows"] == expected["rows"] and calls == []


def test_without_resume_a_saved_pass_is_ignored_and_replaced(tmp_path):
    model, x, y = _setup()
    with pytest.raises(Killed):
        _scorers(model, x, y, KillingCheckpoint(tmp_path / "p.json", {}, after=1))
    _scorers(model, x, y, AccuracyCheckpoint(tmp_path / "p.json", {}))  # resume=False: from the first image
    assert json.loads((tmp_path / "p.json").read_text())["next"] == 11


@pytest.mark.parametrize("change, name", [
    ({"key": {"model": "other"}}, "model"),
    ({"seeds": 3}, "runs"),
    ({"labels": True}, "data"),
])
def test_a_progress_file_of_other_settings_is_refused(tmp_path, change, name):
    model, x, y = _setup()
    with pytest.raises(Killed):
        _scorers(model, x, y, KillingCheckpoint(tmp_path / "p.json", {"model": "tiny"}, after=1))
    key = change.get("key", {"model": "tiny"})
    if "labels" in change:
        y = (y + 1) % 3
    ckpt = AccuracyCheckpoint(tmp_path / "p.json", key, resume=True)
    with pytest.raises(ValueError, match=rf"^--resume: '.*p\.json' was made with another {name} "):
        prune_eval(model, x, y, scorers=["random", "cls-attention"], keeps=[0.75, 0.25],
                   seeds=change.get("seeds", 2), batch_size=3, throughput_batches=(), progress=False, checkpoint=ckpt)


def test_an_unreadable_progress_file_is_refused(tmp_path):
    (tmp_path / "p.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"^--resume: '.*p\.json' is not a prune-eval progress file \(JSONDecode"):
        AccuracyCheckpoint(tmp_path / "p.json", {}, resume=True).begin({})


def test_data_fingerprint_sees_order_values_and_labels():
    _, x, y = _setup()
    f = data_fingerprint(x, y)
    assert f == data_fingerprint(x.clone(), y.clone()) and len(f) == 16
    assert f != data_fingerprint(x.flip(0), y.flip(0))
    assert f != data_fingerprint(x, (y + 1) % 3)
    x2 = x.clone()
    x2[5, 1, 2, 3] += 1e-3
    assert f != data_fingerprint(x2, y)


def _run(argv):
    parser = argparse.ArgumentParser()
    prune_eval_command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def tiny_cli(tmp_path):
    """A saved tiny timm ViT and a 3-class ImageFolder of 10 random images."""
    from PIL import Image
    from safetensors.torch import save_file

    model, _, _ = _setup()
    ckpt = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    g = torch.Generator().manual_seed(0)
    for i in range(10):
        (tmp_path / "data" / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        px = torch.randint(0, 256, (40, 40, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(px).save(tmp_path / "data" / f"c{i % 3}" / f"{i}.png")
    return ["prune-eval", "--model", "vit_tiny_patch16_224", "--checkpoint", str(ckpt), "--timm-arg", "img_size=32",
            "--timm-arg", "patch_size=8", "--timm-arg", "depth=2", "--timm-arg", "num_classes=3",
            "--data", str(tmp_path / "data"), "--batch-size", "3", "--throughput-batches", "", "--no-progress"]


@pytest.mark.parametrize("extra", [["--scorers", "random,cls-attention", "--keep", "0.5,0.25", "--seeds", "2"],
                                   ["--methods", "random:keep=0.5:seed=0,1", "ats:keep=0.5:blocks=[1]"]])
def test_cli_resume_after_a_kill(tiny_cli, tmp_path, monkeypatch, capsys, extra):
    assert _run([*tiny_cli, *extra, "--out", str(tmp_path / "whole")]) == 0
    assert not (tmp_path / "whole" / "progress.json").exists()  # removed once the results are written
    out = tmp_path / "killed"
    saves, original = [], AccuracyCheckpoint.save

    def save_then_die(self, next_start, state):
        original(self, next_start, state)
        saves.append(next_start)
        if len(saves) == 2:
            raise Killed

    monkeypatch.setattr(AccuracyCheckpoint, "save", save_then_die)
    with pytest.raises(Killed):
        _run([*tiny_cli, *extra, "--out", str(out)])
    monkeypatch.setattr(AccuracyCheckpoint, "save", original)
    assert json.loads((out / "progress.json").read_text())["next"] == 6
    with pytest.raises(FileExistsError, match=r"^out: '.*killed' holds the progress of an unfinished run "
                                              r"\(progress.json\); pass --resume to continue it, --overwrite"):
        _run([*tiny_cli, *extra, "--out", str(out)])  # a killed run is not replaced silently
    assert _run([*tiny_cli, *extra, "--out", str(out), "--resume"]) == 0
    name = "results.json" if extra[0] == "--scorers" else "methods.json"
    got, want = (json.loads((d / name).read_text()) for d in (out, tmp_path / "whole"))
    assert got["rows"] == want["rows"] and got["meta"]["full_top1"] == want["meta"]["full_top1"]
    assert not (out / "progress.json").exists()


@pytest.mark.parametrize("extra, message", [
    (["--resume", "--overwrite"], "--resume: continues a top-1 pass; not with --overwrite"),
    (["--resume", "--throughput-only"], "--resume: continues a top-1 pass; not with --throughput-only"),
])
def test_cli_resume_misuse_is_one_line(tiny_cli, tmp_path, capsys, extra, message):
    assert _run([*tiny_cli, *extra, "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"rollout-fast prune-eval: {message}\n"


@pytest.mark.parametrize("extra, name", [
    (["--scorers", "random,cls-attention", "--keep", "1.0,0.5,0.25", "--seeds", "2"], "results.json"),
    (["--methods", "random:keep=0.5:seed=0,1", "ats:keep=0.5:blocks=[1]", "tome:r=2"], "methods.json")])
def test_cli_top1_from_times_here_and_takes_top1_from_the_earlier_run(tiny_cli, tmp_path, capsys, extra, name):
    assert _run([*tiny_cli, *extra, "--out", str(tmp_path / "top1")]) == 0
    timed = [*tiny_cli, *extra, "--throughput-batches", "2", "--throughput-time", "0.01", "--top1-from",
             str(tmp_path / "top1"), "--out", str(tmp_path / "speed")]
    assert _run(timed) == 0
    top1, got = (json.loads((tmp_path / d / name).read_text()) for d in ("top1", "speed"))
    assert got["meta"]["full_top1"] == top1["meta"]["full_top1"] and got["meta"]["images"] == 10
    assert got["meta"]["top1_from"]["folder"] == str(tmp_path / "top1")
    if name == "results.json":
        assert got["rows"] == top1["rows"]  # every scorer and keep ratio, std of the seeds kept
        assert {(t["scorer"], t["keep_ratio"]) for t in got["throughput"]} == {
            ("full", 1.0), ("random", 0.5), ("random", 0.25), ("cls-attention", 0.5), ("cls-attention", 0.25)}
        assert all(t["images_per_s"] > 0 for t in got["throughput"])
    else:
        want = {(r["method"], r["setting"]): (r["top1"], r["tokens"]) for r in top1["rows"]}
        assert {(r["method"], r["setting"]): (r["top1"], r["tokens"]) for r in got["rows"]} == want
        assert [r["batch"] for r in got["rows"]] == [2] * 5 and all(r["speedup"] > 0 for r in got["rows"])
        table = (tmp_path / "speed" / "methods.md").read_text()
        assert f"top-1 on 10 images (from the run in {tmp_path / 'top1'})" in table


def test_cli_top1_from_refuses_what_the_earlier_run_does_not_cover(tiny_cli, tmp_path, capsys):
    methods = ["--methods", "random:keep=0.5", "tome:r=2"]
    assert _run([*tiny_cli, *methods, "--out", str(tmp_path / "top1")]) == 0
    assert _run([*tiny_cli, *methods, "--throughput-batches", "2", "--throughput-time", "0.01",
                 "--throughput-only", "--out", str(tmp_path / "timing")]) == 0
    capsys.readouterr()
    src = str(tmp_path / "top1" / "methods.json")
    cases = [
        (["--methods", "random:keep=0.5,0.25", "tome:r=2"], tmp_path / "top1",
         f"--top1-from: {src!r} has no top-1 for random keep=0.25"),
        (methods, tmp_path / "timing",
         f"--top1-from: {str(tmp_path / 'timing' / 'methods.json')!r} holds no top-1 (a timing-only run)"),
        (methods, tmp_path / "nowhere",
         f"--top1-from: {str(tmp_path / 'nowhere' / 'methods.json')!r} is not a prune-eval result (FileNotFound"),
        (["--scorers", "random", "--keep", "0.5"], tmp_path / "top1",
         f"--top1-from: {str(tmp_path / 'top1' / 'results.json')!r} is not a prune-eval result (FileNotFoundError"),
    ]
    for i, (argv, folder, message) in enumerate(cases):
        code = _run([*tiny_cli, *argv, "--throughput-batches", "2", "--top1-from", str(folder),
                     "--out", str(tmp_path / f"o{i}")])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"rollout-fast prune-eval: {message}") and err.count("\n") == 1, err
        assert not (tmp_path / f"o{i}").exists()  # refused before any compute or output


def test_cli_top1_from_refuses_another_data_folder(tiny_cli, tmp_path, capsys):
    import shutil

    methods = ["--methods", "random:keep=0.5"]
    assert _run([*tiny_cli, *methods, "--out", str(tmp_path / "top1")]) == 0
    shutil.copytree(tmp_path / "data", tmp_path / "data2")
    argv = [*tiny_cli, *methods, "--throughput-batches", "2", "--top1-from", str(tmp_path / "top1"),
            "--out", str(tmp_path / "o"), "--data", str(tmp_path / "data2")]
    capsys.readouterr()
    assert _run(argv) == 2
    src = str(tmp_path / "top1" / "methods.json")
    assert capsys.readouterr().err == (f"rollout-fast prune-eval: --top1-from: {src!r} was made with another data "
                                       f"({str(tmp_path / 'data')!r}, now {str(tmp_path / 'data2')!r})\n")


@pytest.mark.parametrize("extra, message", [
    (["--resume", "--top1-from", "x"], "--resume: continues a top-1 pass; not with --top1-from"),
    (["--top1-from", "x"], "--top1-from: this run only times, but --throughput-batches is empty"),
])
def test_cli_top1_from_misuse_is_one_line(tiny_cli, tmp_path, capsys, extra, message):
    assert _run([*tiny_cli, "--methods", "random:keep=0.5", *extra, "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"rollout-fast prune-eval: {message}\n"
