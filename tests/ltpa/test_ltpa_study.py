"""python/ltpa_study.py (rollout_fast.ltpa_study) end to end on a tiny random ViT teacher, two tiny random LTPA
models (32 px, and a 16 px thumbnail one) and four synthetic images: every number checked against a plain
recomputation (numpy / scipy metrics on maps pooled by hand)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ltpa_testing import saved_ltpa, saved_vit, write_images

import rollout_fast
from rollout_fast.data import load_eval_data
from rollout_fast.metrics import centre_prior
from rollout_fast.zoo import load_teacher

RECIPE = Path(__file__).resolve().parents[2] / "python" / "ltpa_study.py"


def _recipe():
    spec = importlib.util.spec_from_file_location("ltpa_study_recipe", RECIPE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _plain_metrics(pred: np.ndarray, target: np.ndarray) -> dict:
    """Mean over images of Pearson CC, top-50% recall and Spearman, written with numpy / scipy."""
    from scipy.stats import spearmanr

    out = {"cc": [], "recall@0.5": [], "spearman": []}
    for p, t in zip(pred.reshape(len(pred), -1).astype(np.float64), target.reshape(len(target), -1)):
        k = round(0.5 * p.size)
        out["cc"].append(np.corrcoef(p, t)[0, 1])
        out["recall@0.5"].append(len(set(np.argsort(-p)[:k]) & set(np.argsort(-t)[:k])) / k)
        out["spearman"].append(spearmanr(p, t).statistic)
    return {k: float(np.mean(v)) for k, v in out.items()}


@pytest.fixture
def study(tmp_path):
    data = write_images(tmp_path / "data", n=4, classes=2)
    vit, full, thumb = saved_vit(tmp_path), saved_ltpa(tmp_path), saved_ltpa(tmp_path, "dp-sigmoid-after", 16, 1)
    out = tmp_path / "out"
    rc = _recipe().main(["--data", str(data), "--teacher", str(vit), "--ltpa", str(full), str(thumb), "--limit", "0",
                         "--out", str(out), "--no-progress"])
    assert rc == 0
    return data, vit, full, thumb, out


def test_agreement_rows_against_a_plain_recomputation(study):
    data, vit, full, thumb, out = study
    res = json.loads((out / "ltpa_study.json").read_text())
    rows = {(r["source"], r["target"]): r for r in res["rows"]}
    teacher, tdc = load_teacher(vit)
    x, _ = load_eval_data(data, tdc)
    explainer = rollout_fast.AttentionRollout(teacher, discard_ratio=0.0)
    targets = {"rollout": explainer(x).numpy(), "grad-rollout": explainer.grad_rollout(x).numpy()}
    a32, _ = load_teacher(full)
    a16, _ = load_teacher(thumb)
    with torch.no_grad():
        _, lv32 = a32(x)
        _, lv16 = a16(F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True, align_corners=False))

    def unit(m):
        return m / m.sum(dim=(1, 2), keepdim=True)

    def up(m):
        return F.interpolate(m[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]

    preds = {  # the 32 px model's 16x16 level 1 averaged over 2x2 cells; its 4x4 level 3 and the 16 px model's
        "ltpa-pc-softmax-after-32 level 1": unit(F.avg_pool2d(lv32[0][:, None], 2)[:, 0]),  # coarse levels:
        "ltpa-pc-softmax-after-32 level 2": unit(lv32[1]),                                 # bilinear upsampling
        "ltpa-pc-softmax-after-32 level 3": unit(up(lv32[2])),
        "ltpa-dp-sigmoid-after-16 level 1": unit(lv16[0]),
        "ltpa-dp-sigmoid-after-16 combined": (unit(lv16[0]) + unit(up(lv16[1])) + unit(up(lv16[2]))) / 3,
    }
    for t, tm in targets.items():
        for source, p in preds.items():
            got = rows[(source, t)]
            for k, v in _plain_metrics(p.numpy(), tm).items():
                assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (source, t, k)
            assert got["images"] == 4
        mean = np.broadcast_to(tm.mean(axis=0), tm.shape)
        for k, v in _plain_metrics(mean, tm).items():
            assert rows[("mean map", t)][k] == pytest.approx(v, rel=1e-5, abs=1e-6)
        prior = np.broadcast_to(centre_prior((8, 8), res["meta"]["centre_prior_sigma"][t]).numpy(), tm.shape)
        assert rows[("centre prior", t)]["cc"] == pytest.approx(_plain_metrics(prior, tm)["cc"], rel=1e-5, abs=1e-6)
    sources = list(dict.fromkeys(r["source"] for r in res["rows"]))
    assert sources == [f"ltpa-{m} {lv}" for m in ("pc-softmax-after-32", "dp-sigmoid-after-16")
                       for lv in ("level 1", "level 2", "level 3", "combined")] + ["centre prior", "mean map"]
    assert res["meta"]["grid"] == [8, 8] and res["meta"]["images"] == 4


def test_entropy_rows_and_markdown(study):
    data, vit, full, _, out = study
    res = json.loads((out / "ltpa_study.json").read_text())
    _, tdc = load_teacher(vit)
    x, _ = load_eval_data(data, tdc)
    model, _ = load_teacher(full)
    with torch.no_grad():
        _, levels = model(x)
    rows = [e for e in res["entropy"] if e["model"] == "ltpa-pc-softmax-after-32"]
    assert [(e["level"], e["map_size"], e["variant"]) for e in rows] == [
        (1, [16, 16], "pc-softmax-after"), (2, [8, 8], "pc-softmax-after"), (3, [4, 4], "pc-softmax-after")]
    for e, a in zip(rows, levels):
        ents, tops = [], []
        for m in a.double().numpy():
            p = m.ravel() / m.sum()
            ents.append(-sum(v * math.log(v) for v in p if v > 0) / math.log(p.size))
            tops.append(np.sort(p)[::-1][:math.ceil(0.05 * p.size - 1e-9)].sum())
        assert e["entropy"] == pytest.approx(np.mean(ents), rel=1e-10)
        assert e["top_mass"] == pytest.approx(np.mean(tops), rel=1e-10)
    md = (out / "ltpa_study.md").read_text()
    assert md.startswith("| source | rollout cc | rollout recall@0.5 | rollout spearman | grad-rollout cc |")
    r = next(r for r in res["rows"] if r["source"] == "mean map" and r["target"] == "rollout")
    assert f"| mean map | {r['cc']:.3f} | {r['recall@0.5']:.3f} | {r['spearman']:.3f} |" in md
    assert f"| ltpa-pc-softmax-after-32 | pc-softmax-after | 1 | 16x16 | {rows[0]['entropy']:.3f} |" in md


def test_errors_are_one_line(tmp_path, capsys):
    data = write_images(tmp_path / "data", n=2, classes=2)
    vit = saved_vit(tmp_path)
    recipe = _recipe()
    assert recipe.main(["--data", str(data), "--teacher", str(vit), "--ltpa", str(vit), "--out",
                        str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (f"ltpa_study: --ltpa: {vit}: expected an attention-gated Learn to Pay "
                                       "Attention model (AttnVGG), got VisionTransformer\n")
    assert recipe.main(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"ltpa_study: --data: folder {str(tmp_path / 'none')!r} does not exist\n"
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "ltpa_study.json").write_text("{}")
    assert recipe.main(["--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith(f"ltpa_study: --out: {str(tmp_path / 'o')!r} holds an earlier run "
                                              "(ltpa_study.json); pass --overwrite")
