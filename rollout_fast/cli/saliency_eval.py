"""``rollout-fast saliency-eval``: every map source scored against human fixations
(:func:`rollout_fast.saliency.evaluate_saliency`): a markdown table, a CSV per map and per image, and a figure
(image | fixations | each map)."""

from __future__ import annotations

import argparse

__all__ = ["register", "run"]

MAPS_HELP = ("comma-separated map sources: centre-prior, mean-map, uniform (fitted to / averaged over the train "
             "split; chance); rollout:MODEL, grad-rollout:MODEL (a ViT's attention rollout / gradient rollout of "
             "its predicted class; MODEL: cifar10-vit, a teacher .safetensors with its card, a timm name, or a "
             "teacher installed in rollout_fast/assets such as imagenette-vit); ltpa:MODEL (a Learn to Pay "
             "Attention model's attention maps; an AttnVGG card path or asset name); LABEL:PATH for a saliency "
             "model (e.g. student-a:runs/sal/A-s0/model.safetensors, teacher:..., or osie-resnet18). The photo is "
             "resized to each model's input size (whole image, aspect not kept); every map is upsampled "
             "bilinearly to the photo's size and scored there")


def register(subparsers) -> None:
    """Add the ``saliency-eval`` sub-command (``func`` = :func:`run`)."""
    p = subparsers.add_parser(
        "saliency-eval", help="score saliency maps, ViT rollout and LTPA attention against human fixations",
        description="Score each map source against the fixations of a fixation dataset (OSIE layout) with NSS, CC, "
                    "AUC-Judd, shuffled AUC, KLD, SIM and information gain over the centre prior; write table.md, "
                    "metrics.csv, per_image.csv, figure.png and settings.json to --out.")
    p.add_argument("--data", required=True, help="dataset root with data/stimuli/ and data/eye/fixations.mat "
                                                 "(e.g. ../shared/data/osie)")
    p.add_argument("--split", default="val", choices=["train", "val", "all"], help="the split scored (default val)")
    p.add_argument("--split-file", default=None,
                   help="JSON with 'train' and 'val' image lists (default: the packaged OSIE 600/100 split)")
    p.add_argument("--maps", required=True, help=MAPS_HELP)
    p.add_argument("--out", required=True, help="output folder (checked before any compute)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out (removed first)")
    p.add_argument("--images", type=int, default=None,
                   help="score only the first N images of the split (sAUC negatives still from the whole split)")
    p.add_argument("--figure-images", type=int, default=4, help="rows of the figure (default 4)")
    p.add_argument("--head-fusion", choices=["mean", "max", "min"], default="mean", help="for rollout:MODEL")
    p.add_argument("--discard-ratio", type=float, default=0.0, help="for rollout:MODEL and grad-rollout:MODEL")
    p.add_argument("--sigma", type=float, default=None,
                   help="fixation density Gaussian in pixels (default: one degree on OSIE, 24 px)")
    p.add_argument("--stimuli", default="data/stimuli", help="stimuli folder under --data")
    p.add_argument("--fixations", default="data/eye/fixations.mat", help="fixations .mat under --data")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the arguments and the output folder, build every source, score, write, print the table.

    Errors about the input (bad --maps, data, models, output folder) raise and become one line naming the item
    (:func:`rollout_fast.cli.main`)."""
    from pathlib import Path

    from ..checkpoint import check_output_dir, remove_outputs
    from ..saliency.data import OSIE_SIGMA_PX, SPLIT_FILE, load_split
    from ..saliency.evaluate import OUTPUTS, evaluate_saliency, markdown_table, write_results
    from ..saliency.sources import parse_map_specs
    from .common import device

    specs = parse_map_specs(args.maps)
    for name in ("images", "figure_images", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "figure_images" else 1):
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive number, got {v}")
    if not Path(args.data).is_dir():
        raise FileNotFoundError(f"data: dataset folder not found: {str(args.data)!r}")
    earlier = check_output_dir(args.out, OUTPUTS, overwrite=args.overwrite, hint="--overwrite")
    split_file = args.split_file or SPLIT_FILE
    split = load_split(args.split, split_file)
    train = load_split("train", split_file) if args.split != "train" else split
    sigma = args.sigma or OSIE_SIGMA_PX
    result = evaluate_saliency(args.data, split[:args.images], specs, split_names=split, train_names=train,
                               sigma=sigma, device=device(args.device), batch_size=args.batch_size,
                               figure_images=args.figure_images, head_fusion=args.head_fusion,
                               discard_ratio=args.discard_ratio, progress=not args.no_progress,
                               stimuli=args.stimuli, fixations=args.fixations)
    remove_outputs(args.out, earlier)
    settings = {"data": str(args.data), "split": args.split, "split_file": str(split_file), "images": len(
        split[:args.images]), "maps": args.maps, "sigma_px": sigma, "head_fusion": args.head_fusion,
        "discard_ratio": args.discard_ratio}
    paths = write_results(Path(args.out), result, settings)
    print(markdown_table(result.rows), end="")
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0
