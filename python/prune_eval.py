"""Recipe: the token-pruning study on an embedded teacher (issue 6; ``--teacher imagenette-vit``: issue 13), written
to runs/prune/ (runs/prune-imagenette/), and the comparison with the field's token-reduction methods (issue 16),
written to runs/compare/ (runs/compare-imagenette/).

Runs the same code as ``rollout-fast prune-eval`` (rollout_fast.cli.prune_eval, which calls
rollout_fast.prune.prune_eval): top-1 on the evaluation images (``cifar10-vit``: the 10,000 CIFAR-10 test
images; ``imagenette-vit``: the 3,925 Imagenette val photographs, 197 tokens over 6 blocks) when the patch
tokens with the lowest scores are dropped before the blocks, for each scorer and keep ratio (``random``
averaged over 3 seeds, mean and spread), and images/s of the full and the pruned model, scorer included, at
batch 1 and 256. Writes results.csv / results.json / results.md (the README table), throughput.csv and
prune_top1.png (the seeds' chart on our teacher). Scorer ``student`` is the teacher's shipped pruning student
(``cifar10-vit-prune``, ``imagenette-vit-prune``; ``--student NAME_OR_PATH`` for another).

    python python/prune_eval.py --data ../shared/data/cifar10/test --out runs/prune
    python python/prune_eval.py --scorers random,cls-attention   # a subset
    python python/prune_eval.py --teacher imagenette-vit          # ../shared/data/imagenette/val

``--compare`` runs ``prune-eval --methods`` with the teacher's operating points (:data:`COMPARISON`,
:data:`IMAGENETTE_COMPARISON`) instead (rollout_fast.prune.study.compare_methods): ToMe, EViT, ATS (at EViT's
stages, and at every block from the second as ATS is released for DeiT-S), random and the student before the
blocks, and the student's pre-selection followed by ToMe or by score-guided merging (smerge), each at its operating points, top-1 and images/s
(batch 1 and 256, method's cost included) against the full model in the same run; methods.csv / methods.json
/ methods.md (the README table) and methods_top1_speedup.png. ``--methods SPEC ...`` gives other methods (see
``rollout-fast prune-eval -h``).

    python python/prune_eval.py --compare --out runs/compare
    python python/prune_eval.py --teacher imagenette-vit --compare
    python python/prune_eval.py --out runs/compare --methods tome:r=2,4,6,8 student+tome:keep=0.75:r=2,4
    python python/prune_eval.py --compare --scorer-model runs/cifar10-vit-small/teacher.safetensors
        # adds model-rollout (a second, smaller ViT's rollout picks the tokens) to the comparison

``--teacher-weights PATH`` reads the teacher from a ``.safetensors`` with its card instead of the installed one
(before installation; the tests' tiny teacher); the student is then still the teacher's shipped pruning student
unless ``--student`` is given. Extra arguments are passed to ``rollout-fast prune-eval`` as they are (e.g.
``--limit 2000``).
"""

from __future__ import annotations

import argparse
import sys

from rollout_fast.cli import prune_eval as prune_eval_command
from rollout_fast.zoo import pruning_student_name

# the embedded teacher has 64 patches + the class token over 6 blocks: a constant ToMe r fits up to 9
# student+smerge (issue 16): the student's pre-selection with the dropped tokens merged into their most similar kept
# token and proportional attention after (rollout_fast.prune.smerge), alone and with a second stage at block 1;
# ToMe also with per-block r schedules (r front-loaded), which reach 1.9x-2.7x where a constant r stops at r = 9.
COMPARISON = ["random:keep=0.75,0.5,0.25", "student:keep=0.9,0.75,0.5,0.4,0.25",
              "tome:r=2,4,6,8,9,[24,12,6,4,2,1],[32,16,8,4,2,1]",
              "evit:keep=0.9,0.7,0.5,0.3:blocks=[1,2,3]", "evit:keep=0.5,0.3,0.2:blocks=[0,1,2]",
              "ats:keep=1.0,0.7,0.5,0.3:blocks=[1,2,3]", "ats:keep=1.0,0.9:blocks=[1,2,3,4,5]",
              "student+tome:keep=0.75,0.5:r=2,4", "student+smerge:keep=0.625,0.5,0.375,0.25,0.1875",
              "student+smerge:keep=[0.375,0.125],[0.25,0.125]:blocks=[1]"]
# imagenette-vit: 196 patches + the class token over 6 blocks (DeiT's token layout at depth 6). A constant ToMe r
# fits up to 28 (block 6 sees 197 - 5 r tokens and merges at most half of its 196 - 5 r patch tokens: 7 r <= 196;
# 29 tokens are left after the last block), r = 6 ... 28 spans the CIFAR points x3 (3x the patches); EViT and ATS at
# the same blocks as on CIFAR (same depth); student + ToMe: r = 6, 12 after keeping 147 or 98 patches (r fits up
# to 21 and 14 there).
IMAGENETTE_COMPARISON = ["random:keep=0.75,0.5,0.25", "student:keep=0.9,0.75,0.5,0.4,0.25", "tome:r=6,12,18,24,28",
                         "evit:keep=0.9,0.7,0.5,0.3:blocks=[1,2,3]", "evit:keep=0.5,0.3,0.2:blocks=[0,1,2]",
                         "ats:keep=1.0,0.7,0.5,0.3:blocks=[1,2,3]", "ats:keep=1.0,0.9:blocks=[1,2,3,4,5]",
                         "student+tome:keep=0.75,0.5:r=6,12", "student+smerge:keep=0.625,0.5,0.375,0.25,0.1875",
                         "student+smerge:keep=[0.375,0.125],[0.25,0.125]:blocks=[1]"]
# with --scorer-model (the cross-model scorer; see the README for training the small second ViT)
SCORER_MODEL_COMPARISON = ["model-rollout:keep=0.75,0.5,0.4,0.25"]
# per teacher: default evaluation images, comparison methods, default output folders (study, comparison)
TEACHERS = {
    "cifar10-vit": {"data": "../shared/data/cifar10/test", "comparison": COMPARISON,
                    "out": ("runs/prune", "runs/compare")},
    "imagenette-vit": {"data": "../shared/data/imagenette/val", "comparison": IMAGENETTE_COMPARISON,
                       "out": ("runs/prune-imagenette", "runs/compare-imagenette")},
}


def cli_args(argv: list[str] | None = None) -> list[str]:
    """The ``rollout-fast prune-eval`` arguments this recipe runs (``argv``: the recipe's own; None: sys.argv)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="cifar10-vit", choices=sorted(TEACHERS))
    p.add_argument("--teacher-weights", default=None, metavar="PATH",
                   help="read the teacher from this .safetensors (its .json card beside it) instead of the installed one")
    p.add_argument("--data", default=None,
                   help="default ../shared/data/cifar10/test (imagenette-vit: ../shared/data/imagenette/val)")
    p.add_argument("--out", default=None, help="default runs/prune (runs/compare with --compare/--methods; "
                                               "imagenette-vit: runs/prune-imagenette, runs/compare-imagenette)")
    p.add_argument("--scorers", default="random,rollout,grad-rollout,cls-attention,student")
    p.add_argument("--keep", default="1.0,0.9,0.75,0.5,0.4,0.25,0.1")
    p.add_argument("--compare", action="store_true", help="compare the teacher's methods (COMPARISON; issue 16)")
    p.add_argument("--methods", nargs="+", default=None, metavar="SPEC", help="compare these methods")
    args, extra = p.parse_known_args(argv)

    spec = TEACHERS[args.teacher]
    methods = args.methods or (spec["comparison"] if args.compare else None)
    if args.compare and not args.methods and any(e.split("=")[0] == "--scorer-model" for e in extra):
        methods = spec["comparison"] + SCORER_MODEL_COMPARISON
    out = args.out or spec["out"][1 if methods else 0]
    study = ["--methods", *methods] if methods else ["--scorers", args.scorers, "--keep", args.keep, "--seeds", "3"]
    model = ["--model", args.teacher]
    if args.teacher_weights is not None:
        model = ["--model", args.teacher_weights]
        if not any(e.split("=")[0] == "--student" for e in extra):  # the path's own name has no shipped student
            model += ["--student", pruning_student_name(args.teacher)]
    return ["prune-eval", *model, "--data", args.data or spec["data"], "--out", out,
            "--throughput-batches", "1,256", *extra, *study]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rollout-fast")
    prune_eval_command.register(parser.add_subparsers(dest="command", required=True))
    cli = parser.parse_args(cli_args(argv))
    return cli.func(cli)


if __name__ == "__main__":
    sys.exit(main())
