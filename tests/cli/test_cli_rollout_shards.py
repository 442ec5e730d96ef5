"""``rollout-fast rollout --shards`` (and --workers, --precision, --overlays) from the command line with the embedded
teacher on generated PNGs: the same maps as rollout.npz, one-line errors, two gloo processes under torchrun writing
the maps of one process, and a run killed mid-way resumed to the uninterrupted result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from rollout_fast.cli import main
from rollout_fast.shards import open_maps, shard_paths


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder of 13 files: 12 random 32 x 32 PNGs and an unreadable one (sorted: position 5)."""
    d = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(3)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:02d}.png")
    (d / "04b.png").write_bytes(b"\x89PNG truncated")
    return d


@contextmanager
def _one_thread():
    """One intra-op thread, as in the worker processes that torchrun starts (OMP_NUM_THREADS=1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    """rollout.npz of the folder at batch 2 (one thread)."""
    out = tmp_path_factory.mktemp("ref") / "o"
    with _one_thread(), pytest.warns(UserWarning, match="04b.png"):
        assert main(["rollout", str(folder), "--out", str(out), "--batch-size", "2", "--no-overlays",
                     "--no-progress"]) == 0
    with np.load(out / "rollout.npz") as z:
        return {k: z[k] for k in z.files}


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def test_shards_from_the_command_line(folder, reference, tmp_path, capsys):
    out = tmp_path / "s"
    argv = ["rollout", str(folder), "--out", str(out), "--shards", "--shard-size", "4", "--batch-size", "2",
            "--no-progress", "--workers", "2"]
    with _one_thread(), pytest.warns(UserWarning, match="04b.png"):
        assert main([*argv, "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert "rollout of 12 image(s) in 4 shard(s) written to" in printed and "skipped 1 unreadable file(s)" in printed
    files, maps, table = open_maps(out)
    assert files == reference["files"].tolist()
    np.testing.assert_array_equal(np.asarray(maps), reference["maps"])
    np.testing.assert_array_equal(table["predicted_label"], reference["predicted_label"])
    assert len(list((out / "overlays").iterdir())) == 12 and (out / "grid.png").is_file()  # sample: the first 16
    with _one_thread(), pytest.warns(UserWarning, match="04b.png"):  # float16 (the default), no overlays
        assert main([*argv, "--out", str(tmp_path / "h"), "--overlays", "none"]) == 0
    _, maps16, _ = open_maps(tmp_path / "h")
    np.testing.assert_array_equal(np.asarray(maps16), reference["maps"].astype(np.float16))
    assert not (tmp_path / "h" / "overlays").exists()


@pytest.mark.parametrize("extra, message", [
    (["--shard-size", "8"], "--shard-size: used only with --shards"),
    (["--resume", "--dtype", "float32"], "--dtype, --resume: used only with --shards"),
    (["--shards", "--student"], "--student is not used with --shards (the shards hold the teacher's maps)"),
    (["--shards", "--shard-size", "0"], "--shard-size: expected an int >= 1, got 0"),
    (["--shards", "--resume", "--overwrite"],
     "--resume, --overwrite: pass one of them (--resume continues the shards, --overwrite replaces them)"),
    (["--no-overlays", "--overlays", "all"], "--no-overlays contradicts --overlays all"),
    (["--workers", "-1"], "--workers: expected an int >= 0, got -1"),
    (["--precision", "fp16", "--device", "cpu"], "--precision fp16 needs a CUDA device (here cpu); use bf16 or fp32"),
])
def test_option_errors_are_one_line(folder, tmp_path, capsys, extra, message):
    assert main(["rollout", str(folder), "--out", str(tmp_path / "o"), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert err == f"rollout-fast rollout: {message}\n"
    assert not (tmp_path / "o").exists()


def test_resume_refuses_shards_of_other_settings_in_one_line(folder, tmp_path, capsys):
    out = tmp_path / "s"
    argv = ["rollout", str(folder), "--out", str(out), "--shards", "--shard-size", "20", "--no-progress"]
    with pytest.warns(UserWarning, match="04b.png"):
        assert main([*argv, "--overlays", "none"]) == 0
    capsys.readouterr()
    assert main([*argv, "--resume", "--head-fusion", "max", "--discard-ratio", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"rollout-fast rollout: resume: '{out}' holds shards of another run:")
    assert "head_fusion 'mean' there, 'max' here; discard_ratio 0.0 there, 0.5 here" in err
    assert main(argv) == 2  # without --resume: refused, the way to continue named
    assert ("holds an earlier run (grid.png, index.npz, manifest.json, shards); pass --resume to continue its shards, "
            "or --overwrite to replace it" in capsys.readouterr().err)


def test_two_gloo_processes_write_the_maps_of_one(folder, reference, tmp_path):
    """torchrun --nproc-per-node 2: each process writes its shards (0, 2 and 1, 3), rank 0 the index; the maps
    are the bits of the one-process npz and every image is in the index exactly once."""
    out = tmp_path / "two"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "rollout_fast.cli", "rollout", str(folder), "--out", str(out), "--shards",
                          "--shard-size", "4", "--batch-size", "2", "--dtype", "float32", "--device", "cpu",
                          "--no-progress"], env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("rollout of 12 image(s) in 4 shard(s)") == 1  # rank 0 reports
    files, maps, table = open_maps(out)
    assert files == reference["files"].tolist() and len(set(files)) == 12
    np.testing.assert_array_equal(np.asarray(maps), reference["maps"])
    np.testing.assert_array_equal(table["probability"], reference["probability"])
    assert open_maps(out).skipped[0][0] == str(folder / "04b.png")


SLOW_RUN = """
import sys, time
from rollout_fast import shards
write = shards.write_shard
def slow(*a, **k):
    path = write(*a, **k)
    time.sleep(1.0)
    return path
shards.write_shard = slow
from rollout_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_run_resumes_to_the_uninterrupted_result(folder, reference, tmp_path):
    """The process is killed (SIGKILL) once its first shard is written; --resume finishes the others: every image
    exactly once, the maps of the uninterrupted run."""
    out = tmp_path / "s"
    argv = ["rollout", str(folder), "--out", str(out), "--shards", "--shard-size", "2", "--batch-size", "2",
            "--dtype", "float32", "--overlays", "none", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN, *argv], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not shard_paths(out, 0)[1].exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert shard_paths(out, 0)[1].exists() and not (out / "index.npz").exists()
    with _one_thread(), pytest.warns(UserWarning, match="04b.png"):
        assert main([*argv, "--resume"]) == 0
    files, maps, _ = open_maps(out)
    assert files == reference["files"].tolist()
    np.testing.assert_array_equal(np.asarray(maps), reference["maps"])


def test_python_m_rollout_fast_cli_lists_the_big_run_options():
    res = subprocess.run([sys.executable, "-m", "rollout_fast.cli", "rollout", "--help"], env=_env(),
                         capture_output=True, text=True, timeout=120, check=True)
    for option in ("--shards", "--shard-size", "--dtype", "--resume", "--workers", "--precision", "--overlays"):
        assert option in res.stdout
