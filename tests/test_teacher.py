"""train-teacher: a tiny run trains, checkpoints atomically, resumes to the same weights, and writes a
card that load_teacher reads."""

from __future__ import annotations

import json

import pytest
import torch

from rollout_fast import load_teacher
from rollout_fast.checkpoint import load_training_state
from rollout_fast.teacher import TeacherConfig, train_teacher

TINY_ARCH = {"img_size": 32, "patch_size": 4, "num_classes": 10, "embed_dim": 32, "depth": 1, "num_heads": 2,
             "embed_layer": {"name": "conv_stem", "convs_per_stage": 1}}


def _cfg(epochs):
    return TeacherConfig(epochs=epochs, batch_size=8, workers=0, arch=dict(TINY_ARCH))


def test_training_is_seeded_and_writes_log_card_and_weights(tiny_cifar, tmp_path):
    first = train_teacher(tiny_cifar, tmp_path / "a", _cfg(2), device="cpu", progress=False)
    train_teacher(tiny_cifar, tmp_path / "b", _cfg(2), device="cpu", progress=False)
    a, b = load_training_state(tmp_path / "a" / "last.pt"), load_training_state(tmp_path / "b" / "last.pt")
    assert a["epoch"] == 2
    for k, v in a["model"].items():  # same seed -> identical runs
        assert torch.equal(v, b["model"][k]), k
    lines = (tmp_path / "a" / "log.csv").read_text().strip().splitlines()
    assert lines[0].startswith("epoch,train_loss") and len(lines) == 3
    card = json.loads((tmp_path / "a" / "teacher.json").read_text())
    assert card["arch"] == TINY_ARCH and card["test_top1"] == first["test_top1"]
    assert card["class_names"][0] == "airplane" and "command" in card and "data_source" in card
    model, cfg = load_teacher(str(tmp_path / "a" / "teacher.safetensors"))
    assert cfg["input_size"] == (3, 32, 32) and not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, a["model"][k]), k


def test_interrupted_run_resumes_bit_exactly(tiny_cifar, tmp_path):
    full = tmp_path / "full"
    train_teacher(tiny_cifar, full, _cfg(2), device="cpu", progress=False)
    part = tmp_path / "part"

    class Stop(Exception):
        pass

    import rollout_fast.teacher as teacher_mod

    real_save = teacher_mod.save_training_state

    def save_then_stop(path, state):
        real_save(path, state)
        raise Stop  # the process dies right after epoch 1's checkpoint

    teacher_mod.save_training_state = save_then_stop
    try:
        with pytest.raises(Stop):
            train_teacher(tiny_cifar, part, _cfg(2), device="cpu", progress=False)
    finally:
        teacher_mod.save_training_state = real_save
    assert load_training_state(part / "last.pt")["epoch"] == 1
    train_teacher(tiny_cifar, part, _cfg(2), device="cpu", progress=False, resume=True)
    got, want = load_training_state(part / "last.pt"), load_training_state(full / "last.pt")
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v), k
    assert len((part / "log.csv").read_text().strip().splitlines()) == 3


def test_resume_errors_are_clear_and_overwrite_nothing(tiny_cifar, tmp_path):
    with pytest.raises(FileNotFoundError, match="resume"):
        train_teacher(tiny_cifar, tmp_path / "none", _cfg(1), progress=False, resume=True)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "last.pt").write_bytes(b"truncated garbage")
    with pytest.raises(ValueError, match="corrupt"):
        train_teacher(tiny_cifar, bad, _cfg(1), progress=False, resume=True)
    assert (bad / "last.pt").read_bytes() == b"truncated garbage"
    with pytest.raises(FileNotFoundError, match="data"):
        train_teacher(tmp_path / "missing", tmp_path / "x", _cfg(1), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="data"):
        train_teacher(tmp_path / "empty", tmp_path / "x", _cfg(1), progress=False)


def test_init_from_starts_at_the_given_weights(tiny_cifar, tmp_path):
    """A warm restart (init_from) starts from the weights given; a mismatched file is a clear error."""
    from dataclasses import replace

    train_teacher(tiny_cifar, tmp_path / "a", _cfg(1), device="cpu", progress=False)
    weights = tmp_path / "a" / "teacher.safetensors"
    start = load_training_state(tmp_path / "a" / "last.pt")["model"]
    cfg = replace(_cfg(1), lr=1e-12, init_from=str(weights))  # (almost) no step: stays at the start
    train_teacher(tiny_cifar, tmp_path / "b", cfg, device="cpu", progress=False)
    got = load_training_state(tmp_path / "b" / "last.pt")["model"]
    for k, v in start.items():
        if v.is_floating_point() and "running" not in k:  # BatchNorm statistics move without the lr
            torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)
    assert any(not torch.equal(v, start[k]) for k, v in got.items() if "running" in k), "no epoch ran"
    other = dict(TINY_ARCH, embed_dim=16)
    with pytest.raises(ValueError, match="init_from"):
        train_teacher(tiny_cifar, tmp_path / "c", replace(cfg, arch=other), device="cpu", progress=False)


def test_an_earlier_run_is_refused_without_resume_and_left_untouched(tiny_cifar, tmp_path):
    run = tmp_path / "run"
    train_teacher(tiny_cifar, run, _cfg(1), device="cpu", progress=False)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(FileExistsError, match="--resume"):
        train_teacher(tiny_cifar, run, _cfg(1), device="cpu", progress=False)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_interrupted_write_temp_files_are_cleaned_and_log_matches_checkpoint(tiny_cifar, tmp_path):
    run = tmp_path / "run"
    train_teacher(tiny_cifar, run, _cfg(1), device="cpu", progress=False)
    (run / ".last.pt.abc123").write_bytes(b"x" * 100)  # left by a kill during a checkpoint write
    (run / "log.csv").write_text("epoch,train_loss\n1,0\n1,0\n")  # a stale log with a duplicate row
    state = load_training_state(run / "last.pt")
    train_teacher(tiny_cifar, run, _cfg(1), device="cpu", progress=False, resume=True)
    assert not list(run.glob(".last.pt.*"))
    rows = (run / "log.csv").read_text().strip().splitlines()
    assert rows[0] == "epoch,train_loss,train_acc,test_acc,lr,seconds" and len(rows) == 2
    assert rows[1].split(",")[3] == f"{state['test_acc']:.4f}"


def test_bad_data_and_architecture_are_clear_errors(tiny_cifar, tmp_path):
    from dataclasses import replace

    with pytest.raises(ValueError, match="img_size must be a multiple of patch_size"):
        train_teacher(tiny_cifar, tmp_path / "a", replace(_cfg(1), arch=dict(TINY_ARCH, patch_size=5)),
                      progress=False)
    with pytest.raises(ValueError, match="no val/ split"):
        train_teacher(tiny_cifar, tmp_path / "b", replace(_cfg(1), eval_split="val"), progress=False)
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(tiny_cifar, odd)
    shutil.rmtree(odd / "test" / "class9")
    with pytest.raises(ValueError, match="classes of test/ differ"):
        train_teacher(odd, tmp_path / "c", _cfg(1), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()  # nothing created


def test_recipes_load_by_name_or_file_with_overrides(tmp_path):
    from rollout_fast.teacher import RECIPES, load_recipe

    cifar = load_recipe("cifar10-vit")
    assert cifar == TeacherConfig()  # the CIFAR recipe is the shipped teacher's configuration
    net = load_recipe("imagenette-vit", epochs=3, workers=None)
    assert net.epochs == 3 and net.workers == RECIPES["imagenette-vit"].workers
    assert net.arch["img_size"] // net.arch["patch_size"] == 14 and net.augment == "rrc"
    path = tmp_path / "r.json"
    path.write_text('{"epochs": 2, "mean": [0.5, 0.5, 0.5]}')
    got = load_recipe(path)
    assert got.epochs == 2 and got.mean == (0.5, 0.5, 0.5)
    path.write_text('{"epoch": 2}')
    with pytest.raises(ValueError, match="unknown fields"):
        load_recipe(path)
    with pytest.raises(ValueError, match="recipe"):
        load_recipe("no-such-recipe")


def test_class_names_come_from_classes_txt(tiny_cifar, tmp_path):
    import shutil
    from dataclasses import replace

    root = tmp_path / "data"
    shutil.copytree(tiny_cifar, root)
    (root / "classes.txt").write_text("".join(f"class{i}\tname {i}\n" for i in range(10)))
    card = train_teacher(root, tmp_path / "run", replace(_cfg(1), class_names=None), device="cpu",
                         progress=False)
    assert card["class_names"][3] == "name 3" and card["wnids"][3] == "class3"


def test_ltpa_classifier_trains_with_sgd_and_step_decay(tiny_cifar, tmp_path):
    """The same trainer trains a Learn to Pay Attention model (tuple output) with SGD + step decay."""
    from dataclasses import replace

    from rollout_fast.teacher import RECIPES

    cfg = replace(RECIPES["cifar10-ltpa"], epochs=2, batch_size=8, workers=0, step_epochs=(1,), warmup_epochs=0,
                  arch=dict(RECIPES["cifar10-ltpa"].arch, width=1 / 16))
    card = train_teacher(tiny_cifar, tmp_path / "ltpa", cfg, device="cpu", progress=False)
    assert card["architecture"] == "rollout_fast.ltpa.AttnVGG" and card["arch"]["type"] == "attnvgg"
    state = load_training_state(tmp_path / "ltpa" / "last.pt")
    assert state["optimizer"]["param_groups"][0]["momentum"] == 0.9
    rows = (tmp_path / "ltpa" / "log.csv").read_text().strip().splitlines()[1:]
    assert [float(r.split(",")[4]) for r in rows] == pytest.approx([0.01, 0.01])  # x0.1 after epoch 1
    assert 0.0 <= card["test_top1"] <= 1.0


def test_step_schedule_multiplies_at_each_milestone():
    from rollout_fast.training import step_lr_lambda

    f = step_lr_lambda(2, [5, 8], 0.5)
    assert [f(s) for s in range(10)] == [0.5, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]


def test_resume_accepts_a_checkpoint_from_before_a_config_field_was_added(tiny_cifar, tmp_path):
    from dataclasses import asdict

    from rollout_fast.checkpoint import save_training_state

    run = tmp_path / "run"
    train_teacher(tiny_cifar, run, _cfg(1), device="cpu", progress=False)
    state = load_training_state(run / "last.pt")
    old = {k: v for k, v in asdict(_cfg(1)).items() if k not in ("optimizer", "schedule")}
    save_training_state(run / "last.pt", {**state, "config": old})
    train_teacher(tiny_cifar, run, _cfg(1), device="cpu", progress=False, resume=True)  # defaults: fine
    from dataclasses import replace

    with pytest.raises(ValueError, match="optimizer"):
        train_teacher(tiny_cifar, run, replace(_cfg(1), optimizer="sgd"), device="cpu", progress=False,
                      resume=True)


def test_a_trained_ltpa_model_loads_through_load_teacher(tiny_cifar, tmp_path):
    from dataclasses import replace

    from rollout_fast.teacher import RECIPES

    cfg = replace(RECIPES["cifar10-ltpa"], epochs=1, batch_size=8, workers=0,
                  arch=dict(RECIPES["cifar10-ltpa"].arch, width=1 / 16))
    train_teacher(tiny_cifar, tmp_path / "ltpa", cfg, device="cpu", progress=False)
    model, data_config = load_teacher(str(tmp_path / "ltpa" / "teacher.safetensors"))
    state = load_training_state(tmp_path / "ltpa" / "last.pt")["model"]
    assert type(model).__name__ == "AttnVGG" and data_config["input_size"] == (3, 32, 32)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    logits, maps = model(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 10) and len(maps) == 3


def test_train_teacher_cli_takes_arch_overrides(tiny_cifar, tmp_path):
    from rollout_fast.cli import main

    out = tmp_path / "cli"
    assert main(["train-teacher", "--data", str(tiny_cifar), "--out", str(out), "--recipe", "cifar10-ltpa",
                 "--epochs", "1", "--batch-size", "8", "--workers", "0", "--no-progress", "--device", "cpu",
                 "--arch", "variant=dp-sigmoid-after", "--arch", "width=0.0625"]) == 0
    card = json.loads((out / "teacher.json").read_text())
    assert card["arch"]["variant"] == "dp-sigmoid-after" and card["arch"]["width"] == 0.0625
    assert main(["train-teacher", "--data", str(tiny_cifar), "--out", str(tmp_path / "x"),
                 "--arch", "width"]) == 2
