"""The shipped saliency student `osie-resnet18` (issue 15): its card, its float16 weights loaded exactly into float32,
a probability map on a shipped photograph, and (with ../shared/data/osie) better than the centre prior on the first
20 OSIE val images on KLD, CC and NSS."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rollout_fast.checkpoint import load_weights
from rollout_fast.saliency import SALIENCY_MODELS, SaliencyNet, load_saliency_model

REPO = Path(__file__).resolve().parents[2]
OSIE_ROOT = Path(os.environ.get("ROLLOUT_FAST_SHARED", REPO.parent / "shared")) / "data" / "osie"
WEIGHTS = SALIENCY_MODELS["osie-resnet18"].with_suffix(".safetensors")


def test_card_and_weights():
    model, card = load_saliency_model("osie-resnet18")
    assert isinstance(model, SaliencyNet) and not model.training
    assert card["name"] == "osie-resnet18" and card["model"]["encoder"] == "resnet18"
    assert card["model"]["input_size"] == [240, 320] and card["run"] in {f"{m}-s{s}" for m in "AB" for s in range(3)}
    for key in ("kld", "cc", "nss", "auc_judd", "sauc", "sim", "ig"):
        assert isinstance(card["eval"][key], float), key
    assert "/work/" not in WEIGHTS.with_suffix(".json").read_text()  # no path of the machine that trained it
    stored = load_weights(WEIGHTS)
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    for k, v in model.state_dict().items():
        assert v.dtype == (torch.float32 if v.is_floating_point() else stored[k].dtype), k
        assert torch.equal(v, stored[k].to(v.dtype)), k


def test_map_of_a_shipped_photograph_is_a_probability_map():
    from torchvision.transforms.functional import normalize, resize, to_tensor

    from rollout_fast.data import load_image

    model, card = load_saliency_model("osie-resnet18")
    image = load_image(REPO / "rollout_fast" / "assets" / "samples" / "astronaut.jpg")
    x = normalize(to_tensor(resize(image, card["model"]["input_size"], antialias=True)),
                  card["model"]["mean"], card["model"]["std"])[None]
    with torch.no_grad():
        log_p = model(x)
    assert log_p.shape == (1, 240, 320) and log_p.dtype == torch.float32
    torch.testing.assert_close(log_p.exp().sum(), torch.tensor(1.0), rtol=0, atol=1e-4)
    torch.testing.assert_close(model.predict(x), log_p.exp())


def test_better_than_the_centre_prior_on_osie_val_images():
    pytest.importorskip("scipy.io", reason="scipy reads the .mat files (pip install -e '.[saliency]')")
    if not (OSIE_ROOT / "data" / "eye" / "fixations.mat").is_file():
        pytest.skip(f"OSIE data not found at {OSIE_ROOT} (set ROLLOUT_FAST_SHARED to the shared/ folder)")
    from rollout_fast.saliency import OSIE_SIGMA_PX, load_split
    from rollout_fast.saliency.evaluate import evaluate_saliency
    from rollout_fast.saliency.sources import parse_map_specs

    val = load_split("val")
    result = evaluate_saliency(OSIE_ROOT, val[:20], parse_map_specs("centre-prior,osie-resnet18"), split_names=val,
                               train_names=load_split("train"), sigma=OSIE_SIGMA_PX)
    rows = {r["map"]: r for r in result.rows}
    model, prior = rows["osie-resnet18"], rows["centre-prior"]
    assert model["images"] == prior["images"] == 20
    assert model["kld"] < prior["kld"] and model["cc"] > prior["cc"] and model["nss"] > prior["nss"], (model, prior)
