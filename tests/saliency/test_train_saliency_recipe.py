"""python/train_saliency.py (issue 15's recipe), without training: models A and B get one identical budget, the
smoke mode's limits, and the targets in RESULTS.md checked against the numbers (met / NOT met, and a difference
within the seeds' spread said so)."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[2] / "python" / "train_saliency.py"


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("train_saliency", RECIPE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_and_b_share_one_budget(recipe, tmp_path):
    args = recipe.parse_args(["--out", str(tmp_path), "--epochs", "7", "--input-size", "192", "256"])
    runs = recipe.configs(args)
    assert list(runs) == ["teacher", "A-s0", "B-s0", "A-s1", "B-s1", "A-s2", "B-s2"]
    for seed in (0, 1, 2):
        a, b = asdict(runs[f"A-s{seed}"]), asdict(runs[f"B-s{seed}"])
        differ = {k for k in a if a[k] != b[k]}
        assert differ == {"heads", "teacher"} and b["heads"] == 2 and a["seed"] == seed
        assert b["teacher"] == str(tmp_path / "teacher" / "model.safetensors") and b["teacher_weight"] == 2.5
        assert a["epochs"] == 7 and a["input_size"] == [192, 256] and a["lr"] == 1e-3 and a["batch_size"] == 8
        assert a["encoder"] == "resnet18" and a["schedule"] == "constant" and a["weight_decay"] == 0.0
    t = asdict(runs["teacher"])
    assert t["encoder"] == "resnet50" and t["epochs"] == 20 and t["heads"] == 1 and t["input_size"] == [192, 256]
    smoke = recipe.configs(recipe.parse_args(["--out", str(tmp_path), "--smoke"]))
    assert list(smoke) == ["teacher", "A-s0", "B-s0"]
    assert all(c.epochs == 1 and c.train_images == 48 and c.val_images == 4 for c in smoke.values())


def _row(name, kld, nss, cc=0.3, auc=0.73):
    return {"map": name, "kld": kld, "cc": cc, "nss": nss, "auc_judd": auc, "sauc": 0.5, "sim": 0.37, "ig": 0.0}


def test_results_state_the_targets_plainly(recipe, tmp_path):
    args = recipe.parse_args(["--out", str(tmp_path), "--seeds", "0", "1"])
    rows = [_row("teacher", 1.2, 0.9, 0.35, 0.75), _row("A-s0", 1.30, 0.80), _row("A-s1", 1.32, 0.82),
            _row("B-s0", 1.25, 0.90), _row("B-s1", 1.26, 0.91), _row("centre-prior", 1.3, 0.85, 0.3, 0.74),
            _row("uniform", 1.6, 0.0, 0.0, 0.5)]
    md = "\n".join(recipe.results_md(args, rows))
    assert "| A | 1.310 ± 0.014 |" in md and "| B | 1.255 ± 0.007 |" in md and "| uniform | 1.600 | 0.000 |" in md
    assert "teacher beats the centre prior on NSS, CC and AUC-Judd: met" in md
    assert "model B beats model A on val KLD and NSS: met (KLD 1.2550 vs 1.3100, NSS 0.9050 vs 0.8100; means over " \
           "seeds)" in md
    rows[3], rows[4] = _row("B-s0", 1.31, 0.80), _row("B-s1", 1.315, 0.815)
    rows[0] = _row("teacher", 1.2, 0.8, 0.35, 0.75)
    md = "\n".join(recipe.results_md(args, rows))
    assert "teacher beats the centre prior on NSS, CC and AUC-Judd: NOT met" in md
    assert "model B beats model A on val KLD and NSS: NOT met" in md
    assert "within one standard deviation across seeds" in md
