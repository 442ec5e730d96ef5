"""The sample photographs shipped in the package (what `make demo` uses where ../shared is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import rollout_fast

SAMPLES = Path(rollout_fast.__file__).parent / "assets" / "samples"


def test_samples_are_shipped_with_their_sources():
    photos = sorted(SAMPLES.glob("*.jpg"))
    assert len(photos) == 5 and (SAMPLES / "SOURCES.txt").is_file()
    sources = (SAMPLES / "SOURCES.txt").read_text()
    assert all(p.name in sources for p in photos)  # every photo's origin and licence is stated


def test_the_main_job_runs_on_the_samples(tmp_path):
    """`make demo` without ../shared: the default teacher (imagenette-vit, 14 x 14 patches) and its student."""
    from rollout_fast.cli import main

    out = tmp_path / "demo"
    assert main(["rollout", str(SAMPLES), "--out", str(out), "--student", "--no-overlays", "--no-progress"]) == 0
    res = np.load(out / "rollout.npz")
    assert res["maps"].shape == res["student_maps"].shape == (5, 14, 14) and np.isfinite(res["maps"]).all()
    assert np.allclose(res["maps"].reshape(5, -1).max(1), 1.0)  # max-normalised per image
    # Imagenette's 10 classes only: what the README says the teacher calls these photographs
    assert [Path(f).name for f in res["files"]] == ["astronaut.jpg", "chelsea_cat.jpg", "coffee.jpg",
                                                    "grace_hopper.jpg", "rocket.jpg"]
    assert list(res["predicted_label"]) == ["gas pump", "French horn", "golf ball", "tench", "church"]
