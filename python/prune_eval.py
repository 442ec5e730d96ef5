"""Recipe: the token-pruning study on the embedded CIFAR-10 teacher (issue 6), written to runs/prune/.

Runs the same code as ``rollout-fast prune-eval`` (rollout_fast.cli.prune_eval, which calls
rollout_fast.prune.prune_eval): top-1 on the 10,000 CIFAR-10 test images when the patch tokens with the
lowest scores are dropped before the blocks, for each scorer and keep ratio (``random`` averaged over 3
seeds, mean and spread), and images/s of the full and the pruned model, scorer included, at batch 1 and
256. Writes results.csv / results.json / results.md (the README table), throughput.csv and prune_top1.png
(the seeds' chart on our teacher). Scorer ``student`` is the shipped pruning student ``cifar10-vit-prune``
(``--student NAME_OR_PATH`` for another).

    python python/prune_eval.py --data ../shared/data/cifar10/test --out runs/prune
    python python/prune_eval.py --scorers random,cls-attention   # a subset

Extra arguments are passed to ``rollout-fast prune-eval`` as they are (e.g. ``--limit 2000``).
"""

from __future__ import annotations

import argparse
import sys

from rollout_fast.cli import prune_eval as prune_eval_command


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/cifar10/test")
    p.add_argument("--out", default="runs/prune")
    p.add_argument("--scorers", default="random,rollout,grad-rollout,cls-attention,student")
    p.add_argument("--keep", default="1.0,0.9,0.75,0.5,0.4,0.25,0.1")
    args, extra = p.parse_known_args()

    parser = argparse.ArgumentParser(prog="rollout-fast")
    prune_eval_command.register(parser.add_subparsers(dest="command", required=True))
    cli = parser.parse_args(["prune-eval", "--model", "cifar10-vit", "--data", args.data, "--out", args.out,
                             "--scorers", args.scorers, "--keep", args.keep, "--seeds", "3",
                             "--throughput-batches", "1,256", *extra])
    return cli.func(cli)


if __name__ == "__main__":
    sys.exit(main())
