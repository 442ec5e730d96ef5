"""Recipe: the token-pruning study on the embedded CIFAR-10 teacher (issue 6), written to runs/prune/, and the
comparison with the field's token-reduction methods (issue 16), written to runs/compare/.

Runs the same code as ``rollout-fast prune-eval`` (rollout_fast.cli.prune_eval, which calls
rollout_fast.prune.prune_eval): top-1 on the 10,000 CIFAR-10 test images when the patch tokens with the
lowest scores are dropped before the blocks, for each scorer and keep ratio (``random`` averaged over 3
seeds, mean and spread), and images/s of the full and the pruned model, scorer included, at batch 1 and
256. Writes results.csv / results.json / results.md (the README table), throughput.csv and prune_top1.png
(the seeds' chart on our teacher). Scorer ``student`` is the shipped pruning student ``cifar10-vit-prune``
(``--student NAME_OR_PATH`` for another).

    python python/prune_eval.py --data ../shared/data/cifar10/test --out runs/prune
    python python/prune_eval.py --scorers random,cls-attention   # a subset

``--compare`` runs ``prune-eval --methods`` with :data:`COMPARISON` instead (rollout_fast.prune.study.
compare_methods): ToMe, EViT, ATS (at EViT's stages, and at every block from the second as ATS is released for
DeiT-S), random and the student before the blocks, and the student's pre-selection followed by ToMe, each at
its operating points, top-1 and images/s (batch 1 and 256, method's cost included)
against the full model in the same run; methods.csv / methods.json / methods.md (the README table) and
methods_top1_speedup.png. ``--methods SPEC ...`` gives other methods (see ``rollout-fast prune-eval -h``).

    python python/prune_eval.py --compare --out runs/compare
    python python/prune_eval.py --out runs/compare --methods tome:r=2,4,6,8 student+tome:keep=0.75:r=2,4
    python python/prune_eval.py --compare --scorer-model runs/cifar10-vit-small/teacher.safetensors
        # adds model-rollout (a second, smaller ViT's rollout picks the tokens) to the comparison

Extra arguments are passed to ``rollout-fast prune-eval`` as they are (e.g. ``--limit 2000``).
"""

from __future__ import annotations

import argparse
import sys

from rollout_fast.cli import prune_eval as prune_eval_command

# the embedded teacher has 64 patches + the class token over 6 blocks: a constant ToMe r fits up to 9
COMPARISON = ["random:keep=0.75,0.5,0.25", "student:keep=0.9,0.75,0.5,0.4,0.25", "tome:r=2,4,6,8,9",
              "evit:keep=0.9,0.7,0.5,0.3:blocks=[1,2,3]", "ats:keep=1.0,0.7,0.5,0.3:blocks=[1,2,3]",
              "ats:keep=1.0,0.9:blocks=[1,2,3,4,5]", "student+tome:keep=0.75,0.5:r=2,4"]
# with --scorer-model (the cross-model scorer; see the README for training the small second ViT)
SCORER_MODEL_COMPARISON = ["model-rollout:keep=0.75,0.5,0.4,0.25"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/cifar10/test")
    p.add_argument("--out", default=None, help="default runs/prune (runs/compare with --compare/--methods)")
    p.add_argument("--scorers", default="random,rollout,grad-rollout,cls-attention,student")
    p.add_argument("--keep", default="1.0,0.9,0.75,0.5,0.4,0.25,0.1")
    p.add_argument("--compare", action="store_true", help="compare the methods of COMPARISON (issue 16)")
    p.add_argument("--methods", nargs="+", default=None, metavar="SPEC", help="compare these methods")
    args, extra = p.parse_known_args()

    methods = args.methods or (COMPARISON if args.compare else None)
    if args.compare and not args.methods and any(e.split("=")[0] == "--scorer-model" for e in extra):
        methods = COMPARISON + SCORER_MODEL_COMPARISON
    out = args.out or ("runs/compare" if methods else "runs/prune")
    study = ["--methods", *methods] if methods else ["--scorers", args.scorers, "--keep", args.keep, "--seeds", "3"]
    parser = argparse.ArgumentParser(prog="rollout-fast")
    prune_eval_command.register(parser.add_subparsers(dest="command", required=True))
    cli = parser.parse_args(["prune-eval", "--model", "cifar10-vit", "--data", args.data, "--out", out,
                             "--throughput-batches", "1,256", *extra, *study])
    return cli.func(cli)


if __name__ == "__main__":
    sys.exit(main())
