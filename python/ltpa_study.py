"""Recipe (issue 14): Learn to Pay Attention maps against the ViT teacher's rollout and gradient rollout, and the
entropy of each attention level (rollout_fast.ltpa_study; Jetley et al., "Learn to Pay Attention", ICLR 2018).

For each LTPA model: each level alone and the three combined, on the teacher's patch grid, scored against the
teacher's attention rollout and gradient rollout (CC, top-50% recall, Spearman; rollout_fast.metrics), beside the
centre prior and the mean map fitted to the same maps; and each level's mean normalised entropy and the attention
mass in its top 5% locations (the seed saw level 1 be ~zero almost everywhere). Writes OUT/ltpa_study.json (every
number, the settings) and OUT/ltpa_study.md (the README tables).

    python python/ltpa_study.py --data ../shared/data/cifar10/test --ltpa cifar10-ltpa --teacher cifar10-vit \\
        --limit 1000 --out runs/ltpa-study
    python python/ltpa_study.py --ltpa runs/ltpa-cifar10/pc-softmax-after/teacher.safetensors \\
        runs/ltpa-cifar10/dp-softmax-after/teacher.safetensors --out runs/ltpa-study-variants

--ltpa takes installed names (cifar10-ltpa, cifar10-ltpa-thumb ...) or AttnVGG .safetensors files with their
card; --teacher a name or file for rollout_fast.load_teacher. Errors are one line naming the option.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUTPUTS = ("ltpa_study.json", "ltpa_study.md")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/cifar10/test",
                   help="an ImageFolder split (or a folder with labels.csv + images/)")
    p.add_argument("--ltpa", nargs="+", default=["cifar10-ltpa"], metavar="MODEL",
                   help="LTPA models: installed names or AttnVGG .safetensors with their card")
    p.add_argument("--teacher", default="cifar10-vit", help="the ViT teacher (name or .safetensors with its card)")
    p.add_argument("--limit", type=int, default=1000, help="images, spread over the split (0: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--top", type=float, default=0.05, help="fraction of locations for the top-mass column")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--out", default="runs/ltpa-study")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier study in --out")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Load, compute, write; returns the result. ValueError / OSError name the option at fault."""
    import torch

    from rollout_fast.checkpoint import check_output_dir, remove_outputs
    from rollout_fast.data import load_eval_data
    from rollout_fast.ltpa import check_attention_model
    from rollout_fast.ltpa_study import agreement_study, study_markdown
    from rollout_fast.zoo import load_teacher

    if args.limit < 0 or args.batch_size < 1:
        raise ValueError(f"--limit / --batch-size: expected >= 0 / >= 1, got {args.limit} / {args.batch_size}")
    if not Path(args.data).is_dir():
        raise FileNotFoundError(f"--data: folder {args.data!r} does not exist")
    out = Path(args.out)
    earlier = check_output_dir(out, OUTPUTS, overwrite=args.overwrite, what="--out", hint="--overwrite")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        teacher, tdc = load_teacher(args.teacher, device=device)
    except (ValueError, OSError) as e:
        raise ValueError(f"--teacher: {e}") from None
    models = {}
    for name in args.ltpa:
        try:
            model, dc = load_teacher(name, device=device)
            check_attention_model(model, name)
        except (ValueError, OSError) as e:
            raise ValueError(f"--ltpa: {e}") from None
        label = _label(name)
        if label in models:
            raise ValueError(f"--ltpa: two models are labelled {label!r}; give distinct files")
        models[label] = (model, dc)
    images, _ = load_eval_data(args.data, tdc, args.limit or None)
    result = agreement_study(teacher, tdc, models, images, batch_size=args.batch_size, top=args.top,
                             progress=not args.no_progress)
    result["meta"].update({"teacher": args.teacher, "ltpa": args.ltpa, "data": str(args.data)})
    remove_outputs(out, earlier)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ltpa_study.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "ltpa_study.md").write_text(study_markdown(result))
    return result


def _label(name: str) -> str:
    """A model's label in the tables: an installed name as it is; a file by its stem, or by its folder for
    train-teacher's ``.../VARIANT/teacher.safetensors``."""
    path = Path(name)
    if path.suffix != ".safetensors":
        return name
    return path.parent.name if path.stem == "teacher" and path.parent.name else path.stem


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (ValueError, OSError) as e:
        print(f"ltpa_study: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    from rollout_fast.ltpa_study import study_markdown

    print(study_markdown(result))
    print(f"written: {Path(args.out) / 'ltpa_study.json'}, {Path(args.out) / 'ltpa_study.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
