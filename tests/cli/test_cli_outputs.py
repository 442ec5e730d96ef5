"""The commands' output folders (rollout_fast.cli): an earlier run is refused unless --overwrite, which removes it
first; the folder is checked before the model is loaded."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rollout_fast.cli import main


@pytest.fixture
def two_images(tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for i in range(2):
        f = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(f)
        files.append(str(f))
    return files


def test_rollout_overwrite_replaces_an_earlier_run(two_images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert main(["rollout", *two_images, "--out", str(out), "--no-progress"]) == 0
    import rollout_fast.cli.rollout as command

    def fail(args):
        raise AssertionError("the model was loaded before the output folder was checked")

    with monkeypatch.context() as m:
        m.setattr(command, "load_model", fail)
        with pytest.raises(FileExistsError, match="--overwrite"):
            command.run(command_args(["rollout", two_images[0], "--out", str(out)]))
    assert main(["rollout", two_images[0], "--out", str(out), "--no-progress", "--overwrite"]) == 0
    assert np.load(out / "rollout.npz")["files"].tolist() == [two_images[0]]
    assert [p.name for p in (out / "overlays").iterdir()] == ["00000_img0.png"]


def command_args(argv):
    from rollout_fast.cli import build_parser

    return build_parser().parse_args(argv)


def test_prune_eval_checks_its_output_folder_before_loading(tmp_path, monkeypatch):
    from rollout_fast import zoo

    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")

    def fail(*a, **k):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(zoo, "load_teacher", fail)
    args = command_args(["prune-eval", "--data", str(tmp_path), "--out", str(out), "--scorers", "random"])
    with pytest.raises(FileExistsError, match="earlier run .*results.json.*--overwrite"):
        args.func(args)
    args = command_args(["prune-eval", "--data", str(tmp_path), "--out", str(out / "results.json" / "x"),
                         "--scorers", "random", "--overwrite"])
    with pytest.raises(NotADirectoryError, match="results.json' is a file"):
        args.func(args)
