"""``rollout-fast prune-eval``: top-1 and throughput of token-pruned inference: scorers x keep ratios
(:func:`rollout_fast.prune.prune_eval`), or ``--methods`` at their operating points
(:func:`rollout_fast.prune.study.compare_methods`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import key_values

__all__ = ["register", "run"]

DEFAULT_SCORERS = "random,rollout,cls-attention,student"
DEFAULT_KEEP = "1.0,0.9,0.75,0.5,0.4,0.25,0.1"
METHODS_HELP = (
    "compare token-reduction methods instead of --scorers/--keep: each SPEC is NAME[:KEY=V1,V2,...]..., NAME "
    "a pre-block scorer ({scorers}), an in-network method ({methods}) or SCORER+METHOD (pre-select, then "
    "reduce inside, e.g. student+tome); KEY=V1,V2 the operating points of one setting (scorers: keep, seed, "
    "stratify = true for stratified top-k, the best patches of every window of the grid first; "
    "ToMe: r, prop_attn; EViT: keep, blocks, fuse; ATS: keep, blocks; smerge, only after a scorer, whose "
    "tokens it keeps by the scorer's scores and merges the others into the kept: keep (a ratio or a list, the "
    "first before the blocks), blocks, rest, prop_attn, e.g. student+smerge:keep=0.375,[0.375,0.125]... "
    "with blocks=[1]; JSON values, [1,2,3] a list; several "
    "keys: every combination; METHOD.KEY for a key both parts have). E.g. --methods tome:r=2,4,6,8 "
    "'evit:keep=0.7,0.5:blocks=[1,2,3]' 'ats:keep=1.0,0.5:blocks=[1,2,3]' student:keep=0.75,0.5 "
    "student+tome:keep=0.75:r=2,4 model-rollout:keep=0.5 (with --scorer-model). Writes "
    "methods.csv/json/md and methods_top1_speedup.png (top-1 against speed-up)")
MODEL_SCORERS = ("model-rollout", "model-grad-rollout")  # a ViT --scorer-model
LTPA_SCORERS = ("ltpa",)  # a Learn to Pay Attention --scorer-model


def register(subparsers) -> None:
    from ..prune import method_names, scorer_names

    p = subparsers.add_parser(
        "prune-eval", help="top-1 and throughput of token-pruned inference against the fraction of tokens dropped",
        description="Prune patch tokens before the blocks with several scorers and keep ratios; write "
                    "results.csv/json, prune_top1.png and throughput.csv to --out. With --methods: compare "
                    "token-reduction methods (ToMe, EViT, scorers, scorer + ToMe) at their operating points.")
    p.add_argument("--model", default="cifar10-vit",
                   help="'cifar10-vit' (embedded teacher), a timm model name, or a rollout_fast .safetensors")
    p.add_argument("--checkpoint", default=None, help="local weights for a timm model")
    p.add_argument("--timm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model argument for a timm name (JSON value), e.g. img_size=64")
    p.add_argument("--data", required=True, help="ImageFolder split, or a folder with labels.csv + images/")
    p.add_argument("--scorers", default=None,
                   help=f"comma-separated, from {', '.join(scorer_names())} (grad-rollout: a second oracle, "
                        f"the model's gradient rollout for its predicted class; model-rollout / "
                        f"model-grad-rollout: --scorer-model's rollout; ltpa: --scorer-model's Learn to Pay "
                        f"Attention maps); default {DEFAULT_SCORERS}")
    p.add_argument("--keep", default=None, help=f"keep ratios in (0, 1]; default {DEFAULT_KEEP}")
    p.add_argument("--methods", nargs="+", default=None, metavar="SPEC",
                   help=METHODS_HELP.format(scorers=", ".join(scorer_names()), methods=", ".join(method_names())))
    p.add_argument("--out", required=True, help="output folder (checked before any compute)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in --out (its results and plot are removed first)")
    p.add_argument("--resume", action="store_true",
                   help="continue the top-1 pass of a run killed in --out (its progress.json, saved after every "
                        "batch; refused if made with other settings); timing is not resumed")
    p.add_argument("--seeds", type=int, default=3,
                   help="random-scorer seeds averaged (0 .. n-1); with --methods: random:seed=0,1,2")
    p.add_argument("--limit", type=int, default=None, help="evaluate on this many images only")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch and the large throughput batch")
    p.add_argument("--throughput-batches", default="1,256", help="batch sizes timed ('' to skip timing)")
    p.add_argument("--throughput-time", type=float, default=1.0, help="seconds per timing (median of runs)")
    p.add_argument("--student", default=None,
                   help="student name or path for scorer 'student' (default: MODEL's shipped pruning student, "
                        "e.g. cifar10-vit-prune, else MODEL's student)")
    p.add_argument("--student-thumbnail", type=int, default=None, help="resize images to this side for the student")
    p.add_argument("--student-precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="run the student under bfloat16 / float16 autocast (rollout_fast.precision.AutocastModule; "
                        "about twice as fast on CPUs with AVX512-BF16 and on GPUs; the ranking may change, so top-1 "
                        "is measured with it and --top1-from needs a run made with the same precision); the model "
                        "keeps its precision (default: fp32)")
    p.add_argument("--scorer-model", default=None, metavar="NAME_OR_PATH",
                   help="the ViT whose attention rollout (scorer model-rollout) or gradient rollout "
                        "(model-grad-rollout) picks the tokens: 'cifar10-vit', a timm name, or a rollout_fast "
                        ".safetensors with its card; it must have the pruned model's patch grid; images are "
                        "resized to its input size when it differs (and re-normalised to its mean/std); its "
                        "forward is part of the timed cost. For scorer ltpa: a Learn to Pay Attention model "
                        "('cifar10-ltpa', 'cifar10-ltpa-thumb' once installed, or an AttnVGG .safetensors with "
                        "its card), any grid; the images are resized to its input size")
    p.add_argument("--scorer-checkpoint", default=None, help="local weights for a timm --scorer-model")
    p.add_argument("--scorer-timm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model argument for a timm --scorer-model (JSON value)")
    p.add_argument("--cls-block", type=int, default=0, help="block whose class-token attention 'cls-attention' uses")
    p.add_argument("--rollout-discard", type=float, default=0.9, help="discard ratio of the 'rollout' scorer")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--throughput-only", action="store_true", help="only time the models (no top-1)")
    p.add_argument("--top1-from", default=None, metavar="DIR",
                   help="only time here (as --throughput-only) and take top-1 from the finished top-1 run in DIR "
                        "(same model, data, student and scorer model; every method setting, or scorer and keep "
                        "ratio, timed here): top-1 on a busy machine, timing on a quiet one")
    p.add_argument("--fuse-conv-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="fold every BatchNorm2d into the convolution before it in the model (a convolutional stem) "
                        "and the student, with channels-last weights (rollout_fast.fuse.fuse_conv_bn; the same "
                        "outputs up to float rounding, checked): the full and the pruned models both run fused; "
                        "a network without BatchNorm2d is left as it is (default: on)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (torch.set_num_threads); 1 gives stable timings on a shared machine")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate the arguments (exit status 2 with a message when one is bad), load, evaluate, time, write."""
    try:
        opts = _options(args)
    except ValueError as e:
        print(f"rollout-fast prune-eval: {e}", file=sys.stderr)
        return 2
    args.throughput_only = args.throughput_only or args.top1_from is not None
    import torch

    from ..checkpoint import check_output_dir
    from ..prune.progress import PROGRESS_FILE
    from ..prune.report import PRUNE_OUTPUTS
    from ..zoo import load_teacher

    if not Path(args.data).is_dir():  # before any compute, like the output folder
        raise FileNotFoundError(f"data: folder {str(args.data)!r} does not exist")
    check_output_dir(args.out, PRUNE_OUTPUTS, overwrite=args.overwrite, hint="--overwrite")
    if (Path(args.out) / PROGRESS_FILE).is_file() and not (args.resume or args.overwrite or args.throughput_only):
        raise FileExistsError(f"out: {str(args.out)!r} holds the progress of an unfinished run ({PROGRESS_FILE}); "
                              "pass --resume to continue it, --overwrite to start again, or choose another folder")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, data_config = load_teacher(args.model, checkpoint=args.checkpoint, device=device, **opts["timm_kwargs"])
    if args.fuse_conv_bn:
        model, opts["student"], opts["conv_bn_folded"] = _fuse_conv_bn(model, opts["student"], data_config,
                                                                       args.student_thumbnail, device)
    try:
        scorer_model = _load_scorer_model(args, opts, model, data_config, device)
    except ValueError as e:
        print(f"rollout-fast prune-eval: {e}", file=sys.stderr)
        return 2
    common = {"batch_size": args.batch_size, "throughput_batches": opts["batches"],
              "throughput_time": args.throughput_time, "device": device, "student": opts["student"],
              "thumbnail": args.student_thumbnail, "block": args.cls_block,
              "rollout_discard_ratio": args.rollout_discard, "progress": not args.no_progress,
              "accuracy": not args.throughput_only, "scorer_model": scorer_model,
              "image_norm": (tuple(data_config["mean"]), tuple(data_config["std"])) if scorer_model else None}
    meta = {"model": args.model, "checkpoint": args.checkpoint, "data": str(args.data),
            "student": opts["student_name"], "scorer_model": args.scorer_model}
    if args.student_precision != "fp32" and opts["student"] is not None:  # fp32 left out: older runs' keys
        from ..precision import with_precision

        common["student"] = opts["student"] = with_precision(opts["student"], args.student_precision)
        meta["student_precision"] = args.student_precision
    common["checkpoint"] = None if args.throughput_only else _progress(args, meta, device)
    meta["fuse_conv_bn"] = bool(args.fuse_conv_bn)  # recorded, not a top-1 key: fusion changes logits by ~1e-6
    meta["conv_bn_folded"] = opts.get("conv_bn_folded")
    if opts["methods"] is not None:
        return _run_methods(args, opts["methods"], model, data_config, common, meta)
    from ..data import load_eval_data
    from ..prune import format_table, prune_eval, write_prune_eval
    from ..prune.progress import merge_top1

    try:
        earlier = _top1_run(args, meta, scorers=opts["scorers"], keeps=opts["keeps"])
    except ValueError as e:
        print(f"rollout-fast prune-eval: {e}", file=sys.stderr)
        return 2
    images, labels = load_eval_data(args.data, data_config, args.limit)
    result = prune_eval(model, images, labels, scorers=opts["scorers"], keeps=opts["keeps"], seeds=args.seeds,
                        **common)
    result["meta"].update(meta)
    if earlier is not None:
        merge_top1(result, earlier, args.top1_from, scorers=opts["scorers"], keeps=opts["keeps"])
    paths = write_prune_eval(result, args.out, overwrite=args.overwrite)
    if common["checkpoint"] is not None:
        common["checkpoint"].finish()
    print(format_table(result))
    print("written: " + ", ".join(str(p) for p in paths))
    return 0


def _run_methods(args: argparse.Namespace, methods: list, model, data_config: dict, common: dict,
                 meta: dict) -> int:
    """``--methods``: every method built on the model first (a bad setting: one line, exit status 2, before
    the data is read), then :func:`compare_methods`, the files and the table."""
    from ..capture import UnsupportedModelError
    from ..data import load_eval_data
    from ..prune.progress import merge_top1
    from ..prune.report import format_methods_table, write_methods
    from ..prune.study import build_methods, compare_methods

    size = tuple(data_config["input_size"][-2:])
    scorer_opts = {k: common[k] for k in ("student", "thumbnail", "block", "rollout_discard_ratio", "scorer_model",
                                          "image_norm")}
    try:
        runs = build_methods(model, methods, size, **scorer_opts)
    except (ValueError, UnsupportedModelError) as e:
        print(f"rollout-fast prune-eval: --methods {e}", file=sys.stderr)
        return 2
    try:
        earlier = _top1_run(args, meta, methods=[(r.method, r.setting) for r in runs])
    except ValueError as e:
        print(f"rollout-fast prune-eval: {e}", file=sys.stderr)
        return 2
    images, labels = load_eval_data(args.data, data_config, args.limit)
    result = compare_methods(model, images, labels, methods, **common)
    result["meta"].update(meta)
    if earlier is not None:
        merge_top1(result, earlier, args.top1_from)
    paths = write_methods(result, args.out, overwrite=args.overwrite)
    if common["checkpoint"] is not None:
        common["checkpoint"].finish()
    print(format_methods_table(result))
    print("written: " + ", ".join(str(p) for p in paths))
    return 0


def _top1_run(args: argparse.Namespace, meta: dict, **covers) -> dict | None:
    """The earlier top-1 run named by ``--top1-from`` (None without it), checked to cover this run's methods
    or scorers and keep ratios (:func:`~rollout_fast.prune.progress.read_top1_run`; ValueError otherwise)."""
    from ..prune.progress import read_top1_run

    return None if args.top1_from is None else read_top1_run(args.top1_from, meta, **covers)


def _progress(args: argparse.Namespace, meta: dict, device: str):
    """The top-1 pass's :class:`AccuracyCheckpoint` in ``--out`` (resumed with ``--resume``), keyed by every
    option that changes the counts."""
    from ..prune.progress import PROGRESS_FILE, AccuracyCheckpoint

    key = {**meta, "timm_args": args.timm_arg, "limit": args.limit, "seeds": args.seeds,
           "student_thumbnail": args.student_thumbnail, "scorer_checkpoint": args.scorer_checkpoint,
           "cls_block": args.cls_block, "rollout_discard": args.rollout_discard, "device": device,
           "fuse_conv_bn": bool(args.fuse_conv_bn)}
    return AccuracyCheckpoint(Path(args.out) / PROGRESS_FILE, key, resume=args.resume)


def _options(args: argparse.Namespace) -> dict:
    """The parsed lists, methods and the student of ``args``; ValueError naming the option at fault."""
    from ..prune import check_keep_ratio, scorer_names

    methods = _methods(args)
    keeps = [check_keep_ratio(v) for v in _parse_floats(args.keep or DEFAULT_KEEP, "--keep")]
    batches = [int(v) for v in _parse_floats(args.throughput_batches, "--throughput-batches")] \
        if args.throughput_batches.strip() else []
    scorers = [s.strip() for s in (args.scorers or DEFAULT_SCORERS).split(",") if s.strip()]
    bad = [s for s in scorers if s not in scorer_names()]
    if bad or not scorers:
        raise ValueError(f"--scorers: expected names from {scorer_names()}, got {args.scorers!r}")
    timm_kwargs = key_values(args.timm_arg, "--timm-arg")
    scorer_timm_kwargs = key_values(args.scorer_timm_arg, "--scorer-timm-arg")
    if args.seeds < 1:
        raise ValueError("--seeds: expected >= 1")
    clash = [o for o, on in (("--overwrite", args.overwrite), ("--throughput-only", args.throughput_only),
                             ("--top1-from", args.top1_from)) if on]
    if args.resume and clash:
        raise ValueError(f"--resume: continues a top-1 pass; not with {clash[0]}")
    if args.top1_from is not None and not batches:
        raise ValueError("--top1-from: this run only times, but --throughput-batches is empty")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads: expected >= 1")
    used = {m.scorer for m in methods} if methods is not None else set(scorers)
    option = "--methods" if methods is not None else "--scorers"
    student, student_name = _student(args, option) if "student" in used else (None, None)
    uses_model = sorted(used & set(MODEL_SCORERS))
    uses_ltpa = sorted(used & set(LTPA_SCORERS))
    if uses_model and uses_ltpa:
        raise ValueError(f"{option}: {uses_model[0]!r} (a ViT) and {uses_ltpa[0]!r} (a Learn to Pay Attention "
                         "model) both read --scorer-model; run them in separate prune-eval runs")
    if uses_model and args.scorer_model is None:
        raise ValueError(f"{option}: scorer {uses_model[0]!r} needs --scorer-model NAME_OR_PATH (the ViT whose "
                         "rollout picks the tokens)")
    if uses_ltpa and args.scorer_model is None:
        raise ValueError(f"{option}: scorer {uses_ltpa[0]!r} needs --scorer-model NAME_OR_PATH (the Learn to Pay "
                         "Attention model whose attention picks the tokens, e.g. cifar10-ltpa or cifar10-ltpa-thumb)")
    if args.scorer_model is not None and not (uses_model or uses_ltpa):
        raise ValueError(f"--scorer-model: no scorer uses it; add {', '.join(MODEL_SCORERS)} or "
                         f"{' or '.join(LTPA_SCORERS)} to {option}")
    return {"keeps": keeps, "batches": batches, "scorers": scorers, "timm_kwargs": timm_kwargs,
            "student": student, "student_name": student_name, "methods": methods,
            "scorer_timm_kwargs": scorer_timm_kwargs, "uses_scorer_model": bool(uses_model or uses_ltpa),
            "scorer_model_kind": "ltpa" if uses_ltpa else "vit"}


def _load_scorer_model(args: argparse.Namespace, opts: dict, model, data_config: dict, device):
    """``(scorer model, its data config)`` for --scorer-model (None when no scorer uses one), checked against the
    pruned model's patch grid before any compute; ValueError naming the option otherwise. Says on stderr when
    the images will be resized for it."""
    if not opts["uses_scorer_model"]:
        return None
    from ..capture import UnsupportedModelError
    from ..prune.cross import LTPAScorer, ModelRolloutScorer
    from ..zoo import load_teacher

    try:
        net, config = load_teacher(args.scorer_model, checkpoint=args.scorer_checkpoint, device=device,
                                   **opts["scorer_timm_kwargs"])
        scorer = LTPAScorer(net) if opts["scorer_model_kind"] == "ltpa" else ModelRolloutScorer(net)
    except (ValueError, OSError, UnsupportedModelError) as e:
        raise ValueError(f"--scorer-model: cannot use {args.scorer_model!r}: {e}") from None
    try:
        scorer.check_model(model)
    except ValueError as e:
        raise ValueError(f"--scorer-model {args.scorer_model}: {e}") from None
    size = tuple(int(v) for v in data_config["input_size"][-2:])
    if scorer.input_size != size:
        print(f"rollout-fast prune-eval: note: --scorer-model {args.scorer_model} takes {scorer.input_size[0]}x"
              f"{scorer.input_size[1]} images; the {size[0]}x{size[1]} inputs are resized for it", file=sys.stderr)
    return net, config


def _methods(args: argparse.Namespace) -> list | None:
    """The parsed ``--methods`` specs (None without the option)."""
    from ..prune.study import parse_method

    if args.methods is None:
        return None
    if args.scorers is not None or args.keep is not None:
        raise ValueError("--methods: give the scorers as methods (e.g. random:keep=0.5,0.25), not with "
                         "--scorers/--keep")
    try:
        return [parse_method(m) for m in args.methods]
    except ValueError as e:
        raise ValueError(f"--methods {e}") from None


def _parse_floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise ValueError(f"{what}: empty list")
    return vals


def _student(args: argparse.Namespace, option: str = "--scorers"):
    """``(student module, its name)`` for scorer 'student', resolved first: a missing student fails before
    any work."""
    from ..prune import StudentScorer, make_scorer
    from ..students import pruning_student_name

    name = args.student or pruning_student_name(args.model)
    try:
        student = make_scorer("student", student=name).student
    except (ValueError, OSError) as e:
        raise ValueError(f"{option} student: no student for {name!r} ({e}); "
                         "pass --student NAME_OR_PATH or leave 'student' out") from None
    try:
        StudentScorer(student, thumbnail=args.student_thumbnail)
    except ValueError as e:
        raise ValueError(f"--student-thumbnail: {e}") from None
    return student, name


def _fuse_conv_bn(model, student, data_config: dict, thumbnail: int | None, device):
    """``--fuse-conv-bn``: ``(model, student, {"model": n, "student": m})``, each network that has a BatchNorm2d
    with its BatchNorms folded (:func:`rollout_fast.fuse.fuse_conv_bn`, checked on two random images of its input
    size; n, m: the BatchNorms folded), the others as they are (0)."""
    import torch

    from ..fuse import fuse_conv_bn

    h, w = (int(s) for s in data_config["input_size"][-2:])
    gen = torch.Generator().manual_seed(0)
    folded = {"model": 0, "student": 0}

    def has_bn(net) -> bool:
        return isinstance(net, torch.nn.Module) and any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())

    if has_bn(model):
        model, folded["model"] = fuse_conv_bn(model, torch.randn(2, 3, h, w, generator=gen).to(device))
    if has_bn(student):
        side = (h, w) if thumbnail is None else (thumbnail, thumbnail)
        param = next(student.parameters(), None)
        example = torch.randn(2, 3, *side, generator=gen).to(param.device if param is not None else "cpu")
        student, folded["student"] = fuse_conv_bn(student, example)
    return model, student, folded