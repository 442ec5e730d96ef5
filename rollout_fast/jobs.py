"""End-to-end jobs behind the CLI: rollout over image files, teacher evaluation on a folder."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .explain import AttentionRollout
from .shards import SHARD_OUTPUTS

__all__ = [
    "IMAGE_EXTENSIONS",
    "OVERLAY_MODES",
    "ROLLOUT_OUTPUTS",
    "RolloutJobResult",
    "caption",
    "check_request",
    "class_names_of",
    "collect_images",
    "evaluate_folder",
    "label_of",
    "overlay_mode",
    "rollout_images",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# what the rollout jobs write (rollout_images; rollout_fast.shard_job.rollout_shards: SHARD_OUTPUTS too), as glob
# patterns in the output folder (an earlier run's are refused or removed, whichever of the two wrote it)
ROLLOUT_OUTPUTS = ("rollout.npz", "grid.png", *(f"overlays/{'[0-9]' * n}_*.png" for n in (5, 6, 7, 8)),
                   *SHARD_OUTPUTS)
OVERLAY_MODES = ("all", "sample", "none")


def collect_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named in ``inputs`` plus image files (by extension) found recursively in named folders.

    Raises:
        FileNotFoundError: an input path does not exist.
    """
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()
                                and f.suffix.lower() in IMAGE_EXTENSIONS))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"images: {str(p)!r} does not exist")
    return files


def class_names_of(model: torch.nn.Module) -> list[str] | None:
    """Class names from the model's pretrained_cfg, or ImageNet-1k's for 1000-class timm models."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("label_names"):
        return list(cfg["label_names"])
    if getattr(model, "num_classes", None) == 1000:
        try:
            from timm.data import ImageNetInfo

            info = ImageNetInfo()
            return [info.index_to_description(i) for i in range(1000)]
        except Exception:  # label files missing in an unusual timm install: fall back to indices
            return None
    return None


def label_of(names: Sequence[str] | None, c: int) -> str:
    """Class ``c``'s name, or its index when the model has no class names."""
    return names[c] if names else str(c)


def caption(names: Sequence[str] | None, method: str, c: int, t: int) -> str:
    """An overlay's label: the predicted class ``c`` (and for 'grad' the class ``t`` its map explains)."""
    label = label_of(names, c)
    return label + f"; grad for {label_of(names, t)}" if method == "grad" else label


@dataclass
class RolloutJobResult:
    """What :func:`rollout_images` wrote and skipped."""

    out: Path
    files: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    npz: Path | None = None
    grid: Path | None = None
    overlays: list[Path] = field(default_factory=list)


def check_request(batch_size: int, method: str, target, model: torch.nn.Module) -> None:
    """The arguments of a rollout job (:func:`rollout_images`, :func:`rollout_fast.shard_job.rollout_shards`),
    checked once before any file is read.

    Raises:
        ValueError / TypeError: see :func:`rollout_images`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    if method not in ("attention", "grad"):
        raise ValueError(f"method: expected 'attention' or 'grad', got {method!r}")
    if target is None:
        return
    if method != "grad":
        raise ValueError("target: a target class is used only with method 'grad'")
    if isinstance(target, bool) or not isinstance(target, int):
        raise TypeError(f"target: expected an int class index, got {target!r}")
    num_classes = getattr(model, "num_classes", None)
    if target < 0 or (isinstance(num_classes, int) and num_classes > 0 and target >= num_classes):
        raise ValueError(f"target: class {target} is outside the model's classes [0, {num_classes})")


def _progress_bar(total: int, enabled: bool):
    """The job's progress bar: one step per input file (done once its map and overlay are written, or it is
    skipped), then one for ``rollout.npz`` + ``grid.png``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="rollout", unit="step", disable=not enabled)


class _RolloutWriter:
    """Collects the maps of each batch, writes the overlays as it goes (:class:`~rollout_fast.overlay_queue.
    OverlayQueue`: by threads while the next batch is explained) and ``rollout.npz`` + ``grid.png`` at the end
    (:meth:`finish`, after every overlay); :meth:`close` cancels what is left (an error elsewhere)."""

    def __init__(self, out: Path, data_config: dict, names: list[str] | None, method: str, overlays: str,
                 earlier: Sequence[Path] = (), bar=None, map_title: str = "rollout",
                 columns: dict[str, str] | None = None, constants: dict | None = None):
        from .overlay_queue import OverlayQueue

        self.result = RolloutJobResult(out)
        self.bar = bar  # advanced once per image written and once for the grid
        self.earlier = list(earlier)  # an earlier run's outputs, removed before the first write
        self.data_config, self.names, self.method, self.overlays = data_config, names, method, overlays
        self.map_title = map_title  # the grid's column of ``maps``
        # further maps per image: npz name -> the grid's column title (e.g. student_maps -> student)
        self.columns = dict(columns or {})
        self.constants = dict(constants or {})  # saved as they are in the npz (e.g. ltpa_variant)
        self.maps, self.classes, self.probs, self.targets = [], [], [], []
        self.extra: dict[str, list[np.ndarray]] = {key: [] for key in self.columns}
        self.shown: list[tuple] = []
        self.queue = OverlayQueue(bar)

    def close(self) -> None:
        """Cancel the queued overlays and wait for those being written (no thread writes after the job)."""
        self.queue.close()

    def _label(self, c: int) -> str:
        return label_of(self.names, c)

    def add(self, x: torch.Tensor, files: Sequence, maps: torch.Tensor, logits: torch.Tensor,
            target: int | None, extra: dict[str, torch.Tensor] | None = None) -> None:
        """One batch: ``maps`` (b, gh, gw); ``extra``: a (b, h, w) tensor for each name of ``columns``."""
        from .checkpoint import remove_outputs
        from .viz import denormalize

        if self.earlier:
            remove_outputs(self.result.out, self.earlier)
            self.earlier = []
        p, c = logits.float().softmax(-1).max(-1)
        t = c if target is None else torch.full_like(c, target)
        maps_np = maps.cpu().numpy()
        for key in self.columns:
            self.extra[key].append(extra[key].float().cpu().numpy())
        first = len(self.result.files)
        drawn = len(files) if self.overlays == "all" else max(0, min(len(files), 16 - first))
        imgs = denormalize(x[:drawn], self.data_config["mean"], self.data_config["std"]) if drawn else None
        for i, f in enumerate(files):
            idx = first + i
            if i < drawn:
                label = caption(self.names, self.method, int(c[i]), int(t[i]))
                if self.overlays != "none":
                    path = self.result.out / "overlays" / f"{idx:05d}_{Path(f).stem}.png"
                    title = f"{Path(f).name}: {label} ({float(p[i]):.2f})"
                    self.result.overlays.append(self.queue.submit(imgs[i], maps_np[i], path, title))
                if len(self.shown) < 16:
                    self.shown.append((imgs[i], maps_np[i], f"{Path(f).name}: {label}"))
            self.result.files.append(str(f))
        if self.bar is not None:
            self.bar.update(len(files) - (drawn if self.overlays != "none" else 0))
        self.queue.collect()
        self.maps.append(maps_np)
        self.classes.append(c.cpu().numpy())
        self.probs.append(p.cpu().numpy())
        self.targets.append(t.cpu().numpy())

    def finish(self) -> RolloutJobResult:
        from .viz import save_grid

        result = self.result
        self.queue.collect(wait=True)
        self.close()
        if self.bar is not None:
            self.bar.set_description("rollout: rollout.npz, grid.png")
        result.out.mkdir(parents=True, exist_ok=True)
        classes = np.concatenate(self.classes).astype(np.int64)
        result.npz = result.out / "rollout.npz"
        extra = {"target_class": np.concatenate(self.targets).astype(np.int64)} if self.method == "grad" else {}
        columns = []
        for key, title in self.columns.items():
            extra[key] = np.concatenate(self.extra[key]).astype(np.float32)
            columns.append((title, list(extra[key][:len(self.shown)])))
        np.savez(result.npz, maps=np.concatenate(self.maps).astype(np.float32),
                 files=np.array(result.files), predicted_class=classes,
                 probability=np.concatenate(self.probs).astype(np.float32),
                 predicted_label=np.array([self._label(c) for c in classes]),
                 method=np.array(self.method), **extra,
                 **{k: np.array(v) for k, v in self.constants.items()})
        result.grid = save_grid([s[0] for s in self.shown], [s[1] for s in self.shown], result.out / "grid.png",
                                titles=[s[2] for s in self.shown], extra=columns, map_title=self.map_title)
        if self.bar is not None:
            self.bar.update(1)
        return result


def overlay_mode(overlays: bool | str) -> str:
    """``overlays`` as one of :data:`OVERLAY_MODES` (True: 'all', False: 'none').

    Raises:
        ValueError: another value.
    """
    if overlays is True or overlays is False:
        return "all" if overlays else "none"
    if overlays not in OVERLAY_MODES:
        raise ValueError(f"overlays: expected one of {OVERLAY_MODES}, got {overlays!r}")
    return overlays


def rollout_images(files: Sequence[str | os.PathLike], out: str | os.PathLike, model: torch.nn.Module,
                   data_config: dict, *, head_fusion: str = "mean", discard_ratio: float = 0.0,
                   batch_size: int = 32, device: str | torch.device = "cpu", progress: bool = True,
                   overlays: bool | str = True, method: str = "attention", target: int | None = None,
                   student: torch.nn.Module | None = None, overwrite: bool = False, workers: int = 0,
                   precision: str = "fp32", grid=None) -> RolloutJobResult:
    """Attention rollout over image files; write overlays, ``rollout.npz`` and ``grid.png`` to ``out``.

    ``model`` is a ViT (attention rollout), or an attention-gated Learn to Pay Attention
    :class:`~rollout_fast.ltpa.AttnVGG` (Jetley et al., ICLR 2018), whose own maps are written the same way on
    ``grid`` (only for it; ``head_fusion`` and ``discard_ratio`` do not apply): see :func:`_job_explainer`.

    Each file is read with :func:`rollout_fast.data.load_image` (any size and mode, EXIF orientation
    applied, 16-bit and other high bit depths scaled to 8 bits, converted to RGB) and passed through timm's eval
    transform for ``data_config`` (``timm.data.create_transform``), in ``workers`` DataLoader processes (0: in
    this one; :mod:`rollout_fast.pipeline`). Unreadable files are skipped with a warning naming them. Batches
    are fixed runs of ``batch_size`` files (fewer where some cannot be read), so the maps do not depend on
    ``workers``.

    ``method``: 'attention' (attention rollout, ``head_fusion``) or 'grad' (class-specific gradient
    rollout, REFERENCE.md section 2, for class ``target``; default each image's predicted class).
    ``precision``: 'fp32', 'bf16' or 'fp16' (:func:`rollout_fast.pipeline.precision_setup`: autocast on CUDA,
    a bf16 copy of the model on the CPU; fp16 needs CUDA).
    ``student``: a :class:`rollout_fast.students.RolloutStudent` of this teacher; its predicted maps (from
    the same input batch) are saved as ``student_maps`` and drawn beside the rollout in ``grid.png``. Its
    grid and input size are checked against the explainer's maps and input on the first batch, before
    anything is written.
    ``overlays``: 'all' (True, default), 'sample' (the first 16 images) or 'none' (False).

    ``out`` is checked before any image is read: it must be writable and hold no earlier run
    (:data:`ROLLOUT_OUTPUTS`) unless ``overwrite``; then the earlier run's files are removed before the first
    new one is written, so the folder always matches its ``rollout.npz``.

    ``progress``: a bar over the whole job, one step per file (once its map and overlay are written) and one
    for ``rollout.npz`` + ``grid.png``.

    Writes:
        ``out/overlays/NNNNN_<name>.png``: the model input with the rollout heatmap and a colour bar;
        ``out/rollout.npz``: ``maps`` float32 (num_images, gh, gw), ``files``, ``predicted_class``
        int64, ``probability`` float32, ``predicted_label``, ``method``; for 'grad' also
        ``target_class`` int64 (the class each map explains); LTPA models: see above;
        ``out/grid.png``: rows of input | rollout (| student) (first 16 images).

    Raises:
        ValueError: ``batch_size`` < 1, unknown ``method``, ``target`` given without method 'grad' or
            outside the model's classes, a bad ``overlays``, ``workers`` or ``precision`` (fp16 off CUDA), a
            student of another grid or input size, no file could be read (nothing is written then); for an
            LTPA model method 'grad', a student, the VGG baseline or a bad ``grid``; ``grid`` with a ViT.
        TypeError: ``target`` not an int.
        FileExistsError: ``out`` holds an earlier run and ``overwrite`` is False.
        NotADirectoryError / PermissionError: ``out`` is a file, or cannot be written.
    """
    from timm.data import create_transform

    from .checkpoint import check_output_dir
    from .pipeline import image_batches, plan_batches, precision_setup

    ltpa = _check_job_request(model, batch_size, method, target, student, grid)
    overlays = overlay_mode(overlays)
    device = torch.device(device)
    run_model, autocast, input_dtype = precision_setup(model, device, precision)
    earlier = check_output_dir(out, ROLLOUT_OUTPUTS, overwrite=overwrite)
    explainer, writer_args = _job_explainer(model, run_model, ltpa, grid, head_fusion, discard_ratio, method,
                                            student is not None)
    student = student.to(device).eval() if student is not None else None
    bar = _progress_bar(len(files) + 1, progress)
    writer = _RolloutWriter(Path(out), data_config, class_names_of(model), overlays=overlays, earlier=earlier,
                            bar=bar, **writer_args)
    batches = image_batches(files, create_transform(**data_config), plan_batches(len(files), batch_size),
                            device=device, workers=workers)
    try:
        for batch in batches:
            _write_batch(batch, writer, explainer, files, (method, target, autocast, input_dtype), ltpa, student)
        if not writer.result.files:
            raise ValueError(f"images: none of the {len(files)} inputs could be read")
        return writer.finish()
    finally:
        batches.close()
        writer.close()
        bar.close()


def _write_batch(batch, writer: _RolloutWriter, explainer, files: Sequence, how: tuple, ltpa: bool, student) -> None:
    """One batch of :func:`rollout_images`: its unreadable files noted, its maps (and the LTPA levels or the
    student's maps) computed and handed to ``writer``; ``how``: (method, target, autocast, input_dtype)."""
    from .pipeline import explain_result

    method, target, autocast, input_dtype = how
    writer.result.skipped += [(str(files[i]), why) for i, why in batch.skipped]
    if writer.bar is not None:
        writer.bar.update(len(batch.skipped))
    if batch.images is None:
        return
    res = explain_result(explainer, batch.images, method, target, autocast, input_dtype)
    maps, logits = res.maps.float(), res.logits.float()
    if ltpa:
        extra = {f"level_{i + 1}": m for i, m in enumerate(res.levels)}
    else:
        extra = {"student_maps": _student_maps(student, batch.images, maps, first=not writer.result.files)}
    writer.add(batch.images, [files[i] for i in batch.index], maps, logits, target, extra)


def _check_job_request(model, batch_size: int, method: str, target, student, grid) -> bool:
    """:func:`rollout_images`'s argument checks (ValueError / TypeError naming the argument); True for a Learn
    to Pay Attention model."""
    from .ltpa import AttnVGG

    check_request(batch_size, method, target, model)
    if isinstance(model, AttnVGG):
        _check_ltpa_request(model, method, student, grid)
        return True
    if grid is not None:
        raise ValueError("grid: used only with a Learn to Pay Attention model (a ViT's maps are on its patch grid)")
    return False


def _job_explainer(model, run_model, ltpa: bool, grid, head_fusion: str, discard_ratio: float, method: str,
                   with_student: bool) -> tuple:
    """The explainer of a rollout job on ``run_model`` (``model`` as :func:`~rollout_fast.pipeline.precision_setup`
    prepared it) and the keyword arguments of its writer: an AttentionRollout for a ViT (the student's maps as a
    column when there is one), or for a Learn to Pay Attention :class:`~rollout_fast.ltpa.AttnVGG` (e.g.
    ``load_teacher("cifar10-ltpa")``) an :class:`~rollout_fast.ltpa.LTPAExplainer`: ``maps`` is the levels'
    combination (:func:`~rollout_fast.ltpa.ltpa_saliency`, each level summing to 1, averaged) on ``grid``
    (``(gh, gw)`` or an int; default the finest level's size; e.g. 8 for the ViT teacher's patch grid), and
    ``rollout.npz`` also holds ``level_1``, ``level_2``, ``level_3`` (float32 (num_images, h_i, w_i), the raw
    maps) and ``ltpa_variant``; ``method`` is saved as 'ltpa'; the grid shows input | LTPA | level 1-3."""
    if ltpa:
        from .ltpa import LTPAExplainer

        columns = {f"level_{i + 1}": f"level {i + 1}" for i in range(len(model.map_sizes))}
        return LTPAExplainer(run_model, grid), {"method": "ltpa", "map_title": f"LTPA ({model.variant})",
                                                "columns": columns, "constants": {"ltpa_variant": model.variant}}
    return (AttentionRollout(run_model, head_fusion=head_fusion, discard_ratio=discard_ratio),
            {"method": method, "columns": {"student_maps": "student"} if with_student else {}})


def _check_ltpa_request(model, method: str, student, grid) -> None:
    """The arguments of a rollout job that an LTPA model cannot take (ValueError naming the argument)."""
    from .ltpa import LTPAExplainer

    if method != "attention":
        raise ValueError(f"method: {method!r} (gradient rollout) needs a ViT; a Learn to Pay Attention model gives "
                         "its own attention maps (method 'attention')")
    if student is not None:
        raise ValueError("student: a rollout student predicts a ViT's rollout; not used with a Learn to Pay "
                         "Attention model")
    LTPAExplainer(model, grid)  # the plain VGG baseline, a bad grid


def _student_maps(student, x: torch.Tensor, maps: torch.Tensor, first: bool) -> torch.Tensor | None:
    """The student's maps of ``x`` (float32 input), or None without a student; ``first``: check its grid and input
    size against the explainer's ``maps`` and ``x`` first."""
    if student is None:
        return None
    if first:
        from .students import check_student_grid

        check_student_grid(student, tuple(maps.shape[-2:]), tuple(x.shape[-2:]))
    with torch.no_grad():
        return student.maps(x.float())


def evaluate_folder(model: torch.nn.Module, data_config: dict, root: str | os.PathLike, *,
                    batch_size: int = 256, device: str | torch.device = "cpu", indices=None,
                    progress: bool = True, workers: int = 0) -> float:
    """Top-1 accuracy (in [0, 1]) of ``model`` on an ImageFolder tree with timm's eval transform.

    ``indices`` restricts to a subset of the folder's (sorted) samples.

    Raises:
        FileNotFoundError / ValueError: missing or empty folder.
    """
    from timm.data import create_transform
    from torch.utils.data import DataLoader, Subset

    from .data import image_folder
    from .teacher import evaluate

    ds = image_folder(root, create_transform(**data_config))
    if indices is not None:
        ds = Subset(ds, list(indices))
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers)
    return evaluate(model.to(device), loader, device, progress=progress)
