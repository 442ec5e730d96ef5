"""The prune-eval study (rollout_fast.prune.prune_eval) and its evaluation data, on real images (skipped when
../shared is absent)."""

from __future__ import annotations

import pytest
import timm
import torch

from rollout_fast.prune import prune_tokens


def test_prune_eval_keep_one_predictions_equal_unpruned(imagenet_sample):
    """keep 1.0 gives exactly the unpruned model's predictions (logits) on real photos."""
    from rollout_fast.prune import load_eval_data

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=64, depth=2).eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    cfg["input_size"] = (3, 64, 64)
    x, y = load_eval_data(imagenet_sample, cfg, limit=6)
    assert x.shape == (6, 3, 64, 64) and y.dtype == torch.int64 and int(y.max()) < 1000
    with torch.no_grad():
        for scorer in ("random", "cls-attention"):
            assert torch.equal(prune_tokens(model, 1.0, scorer)(x), model(x))


@pytest.mark.slow
def test_shipped_pruning_student_selects_better_than_the_rollout_oracle(cifar10_test):
    """The shipped pruning student on 1,000 real CIFAR-10 test images (every 10th): at keep 0.1 it keeps more
    accuracy than the teacher's own attention-rollout oracle and than random selection (10,000 images:
    0.6652 vs 0.5875 and 0.5054), and at keep 0.5 it stays within 3 points of the unpruned model (-1.4)."""
    from rollout_fast.prune import load_eval_data, prune_eval
    from rollout_fast.students import load_student
    from rollout_fast.zoo import load_teacher

    model, cfg = load_teacher("cifar10-vit")
    images, labels = load_eval_data(cifar10_test, cfg)
    images, labels = images[::10], labels[::10]
    res = prune_eval(model, images, labels, scorers=["random", "rollout", "student"], keeps=[0.5, 0.1], seeds=1,
                     throughput_batches=(), student=load_student("cifar10-vit-prune")[0], progress=False)
    top1 = {(r["scorer"], r["keep_ratio"]): r["top1"] for r in res["rows"]}
    assert top1[("student", 0.1)] > top1[("rollout", 0.1)] + 0.03
    assert top1[("student", 0.1)] > top1[("random", 0.1)] + 0.08
    assert top1[("student", 0.5)] >= res["meta"]["full_top1"] - 0.03


def _result(rows: bool) -> dict:
    row = {"scorer": "random", "keep_ratio": 0.5, "tokens_kept": 2, "num_patches": 4, "dropped_fraction": 0.5,
           "top1": 0.5, "top1_std": 0.0, "seeds": 1, "images": 2}
    tp = {"scorer": "full", "keep_ratio": 1.0, "batch": 1, "images_per_s": 10.0, "speedup": 1.0}
    return {"rows": [row] if rows else [], "throughput": [tp], "meta": {"full_top1": 0.5, "images": 2}}


def test_write_prune_eval_refuses_an_earlier_run_and_overwrite_removes_it(tmp_path):
    from rollout_fast.prune import write_prune_eval

    out = tmp_path / "out"
    write_prune_eval(_result(rows=True), out)
    assert (out / "prune_top1.png").is_file() and (out / "results.csv").is_file()
    with pytest.raises(FileExistsError, match="holds an earlier run .*prune_top1.png"):
        write_prune_eval(_result(rows=False), out)
    assert (out / "results.csv").is_file()
    paths = write_prune_eval(_result(rows=False), out, overwrite=True)  # a throughput-only run
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths) == [
        "results.json", "results.md", "throughput.csv"]
    with pytest.raises(NotADirectoryError, match="is a file"):
        write_prune_eval(_result(rows=True), out / "results.md")
