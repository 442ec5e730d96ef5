"""One-line errors (rollout_fast.cli.main): the package's errors about the input become one line on stderr naming
the argument, exit status 2 (usage) or 1 (failure), no traceback unless --debug; outputs are checked before any
compute."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from rollout_fast.cli import main


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.fixture
def image(tmp_path):
    f = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(f)
    return str(f)


@pytest.fixture
def evil(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    return str(path)


def _one_line(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("argv, needles", [
    (["rollout", "{tmp}/missing.png", "--out", "{tmp}/o"], ["rollout-fast rollout: images:", "missing.png",
                                                             "does not exist"]),
    (["rollout", "{image}", "--out", "{tmp}/o", "--model", "no_such_model_xyz"], ["model:", "no_such_model_xyz"]),
    (["rollout", "{image}", "--out", "{tmp}/o", "--model", "vit_tiny_patch16_224", "--checkpoint", "{tmp}/w.pt"],
     ["checkpoint: no file at", "w.pt"]),
    (["rollout", "{image}", "--out", "{image}"], ["out:", "a.png' is a file"]),
    (["rollout", "{image}", "--out", "{image}/sub"], ["out: cannot create folder"]),
    (["train-teacher", "--data", "{tmp}/nowhere", "--out", "{tmp}/t"], ["rollout-fast train-teacher: data:"]),
    (["train-teacher", "--data", "{tmp}/empty", "--out", "{tmp}/t"], ["data:", "train/"]),
    (["eval-teacher", "--data", "{tmp}/nowhere"], ["rollout-fast eval-teacher: data:", "does not exist"]),
    (["eval-teacher", "--data", "{tmp}/empty"], ["data:", "not an ImageFolder tree"]),
    (["prune-eval", "--data", "{tmp}/nowhere", "--out", "{tmp}/p", "--scorers", "random"],
     ["rollout-fast prune-eval: data:", "does not exist"]),
    (["prune-eval", "--data", "{tmp}/empty", "--out", "{tmp}/p", "--scorers", "random"],
     ["data:", "not an ImageFolder tree"]),
])
def test_bad_input_is_one_line_with_status_2(argv, needles, image, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = [a.format(tmp=tmp_path, image=image) for a in argv]
    assert main(argv) == 2
    _one_line(capsys, *needles)
    assert not (tmp_path / "t").exists() and not (tmp_path / "o").exists() and not (tmp_path / "p").exists()


@pytest.mark.parametrize("command", [
    ["rollout", "{image}", "--out", "{tmp}/o", "--model", "vit_tiny_patch16_224"],
    ["eval-teacher", "--data", "{tmp}", "--model", "vit_tiny_patch16_224"],
    ["prune-eval", "--data", "{tmp}", "--out", "{tmp}/p", "--model", "vit_tiny_patch16_224", "--scorers", "random"],
])
def test_a_refused_pickle_says_how_to_convert_a_trusted_one(command, image, evil, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, image=image) for a in command] + ["--checkpoint", evil]
    assert main(argv) == 2
    err = _one_line(capsys, "checkpoint:", "evil.pth' is not a safe checkpoint", "If you trust its source, convert",
                    "safetensors", "evil.safetensors")
    assert "Weights only load failed" not in err and "pwned" not in err  # not torch's text, and nothing ran


def test_a_corrupt_checkpoint_and_an_unwritable_out(image, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"truncated garbage")
    assert main(["rollout", image, "--out", str(tmp_path / "o"), "--model", "vit_tiny_patch16_224",
                 "--checkpoint", str(bad)]) == 2
    _one_line(capsys, "checkpoint:", "bad.pth' is corrupt or not a torch file")
    import rollout_fast.cli.rollout as command
    from rollout_fast import checkpoint

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    def fail(args):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(command, "load_model", fail)
    assert main(["rollout", image, "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, "out: cannot write in", "Permission denied")


def test_other_os_errors_are_failures_with_status_1(image, tmp_path, capsys, monkeypatch):
    import rollout_fast.cli.rollout as command

    def broken(args):
        raise OSError(5, "Input/output error", "/dev/sdz")

    monkeypatch.setattr(command, "load_model", broken)
    assert main(["rollout", image, "--out", str(tmp_path / "o")]) == 1
    _one_line(capsys, "rollout-fast rollout: [Errno 5] Input/output error: '/dev/sdz'")


def test_debug_shows_the_traceback_and_bugs_keep_theirs(tmp_path, capsys, monkeypatch):
    for argv in (["--debug", "rollout", str(tmp_path / "x.png"), "--out", str(tmp_path / "o")],
                 ["rollout", str(tmp_path / "x.png"), "--out", str(tmp_path / "o"), "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "FileNotFoundError" in err
        assert err.rstrip().splitlines()[-1].startswith("rollout-fast rollout: images:")
    from rollout_fast import jobs

    monkeypatch.setattr(jobs, "collect_images", lambda inputs: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a bug is not dressed up as a user error
        main(["rollout", "a.png", "--out", str(tmp_path / "o")])


def test_the_installed_command_prints_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "rollout_fast.cli", "rollout", str(tmp_path / "missing.png"),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, check=False)
    assert res.returncode == 2 and res.stdout == ""
    want = f"rollout-fast rollout: images: '{tmp_path / 'missing.png'}' does not exist"
    assert res.stderr.strip().splitlines() == [want]
