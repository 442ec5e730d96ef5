"""Fixtures of the distillation tests: a tiny teacher saved with its card."""

from __future__ import annotations

import pytest
import torch
from distill_testing import TINY_ARCH

from rollout_fast.checkpoint import save_weights, write_json
from rollout_fast.teacher import teacher_data_config


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """Path of a tiny random conv-stem ViT teacher (.safetensors with its .json card beside it)."""
    from rollout_fast.models import create_vit

    torch.manual_seed(0)
    model = create_vit(TINY_ARCH)
    path = tmp_path_factory.mktemp("teacher") / "tiny.safetensors"
    save_weights(path, model.state_dict())
    write_json(path.with_suffix(".json"), {"name": "tiny", "arch": TINY_ARCH, "data_config": teacher_data_config(32)})
    return str(path)
