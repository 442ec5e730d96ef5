"""The project's own ImageNet-subset encoder for the saliency models (issue 15): the classifier command trains a timm
ResNet18 on Imagenette (recipe imagenette-resnet18, arch type 'timm'), and its weights initialise a saliency
student's encoder exactly; bad timm architectures are refused with one line."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from imagenette_testing import NAMES, make_tiny_imagenette
from saliency_testing import TINY_SPEC

from rollout_fast.checkpoint import load_weights
from rollout_fast.models import create_model
from rollout_fast.saliency import create_saliency_model
from rollout_fast.teacher import RECIPES, train_teacher
from rollout_fast.zoo import load_teacher


def test_the_recipe_trains_a_timm_resnet18_whose_weights_initialise_a_saliency_encoder(tmp_path):
    r = RECIPES["imagenette-resnet18"]
    assert (r.arch, r.optimizer, r.schedule, r.augment, r.eval_split) == (
        {"type": "timm", "name": "resnet18", "num_classes": 10, "img_size": 112}, "sgd", "cosine", "rrc", "val")
    data = make_tiny_imagenette(tmp_path / "data", train_per_class=2, val_per_class=1)
    cfg = replace(r, epochs=1, batch_size=10, workers=0, arch=dict(r.arch, img_size=64))
    card = train_teacher(data, tmp_path / "run", cfg, device="cpu", progress=False)
    assert card["architecture"] == "timm.create_model('resnet18')" and card["class_names"] == NAMES
    weights = load_weights(tmp_path / "run" / "teacher.safetensors")
    assert "fc.weight" in weights and weights["fc.weight"].shape == (10, 512)
    model, data_config = load_teacher(str(tmp_path / "run" / "teacher.safetensors"))
    assert type(model).__name__ == "ResNet" and data_config["input_size"] == (3, 64, 64)
    net = create_saliency_model(TINY_SPEC, init_from=tmp_path / "run" / "teacher.safetensors")
    for k, v in net.encoder.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_timm_arch_errors():
    with pytest.raises(ValueError, match=r"arch\['name'\]: expected a timm model name .*got 'resnet-nope'"):
        create_model({"type": "timm", "name": "resnet-nope", "num_classes": 10})
    with pytest.raises(ValueError, match=r"arch\['num_classes'\]: expected a positive integer, got 0"):
        create_model({"type": "timm", "name": "resnet18", "num_classes": 0})
    with pytest.raises(ValueError, match=r"arch: unknown keys \['depth'\] for type 'timm'"):
        create_model({"type": "timm", "name": "resnet18", "num_classes": 10, "depth": 3})
    with pytest.raises(ValueError, match=r"arch\['type'\]: expected 'vit', 'attnvgg' or 'timm', got 'cnn'"):
        create_model({"type": "cnn"})
    m = create_model({"type": "timm", "name": "resnet18", "num_classes": 7, "kwargs": {"drop_rate": 0.1}})
    assert m.fc.out_features == 7 and m.drop_rate == 0.1
