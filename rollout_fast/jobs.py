"""End-to-end jobs behind the CLI: rollout over image files, teacher evaluation on a folder."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .explain import AttentionRollout

__all__ = [
    "IMAGE_EXTENSIONS",
    "ROLLOUT_OUTPUTS",
    "RolloutJobResult",
    "class_names_of",
    "collect_images",
    "evaluate_folder",
    "rollout_images",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# what rollout_images writes, as glob patterns in its output folder (an earlier run's are refused or removed)
ROLLOUT_OUTPUTS = ("rollout.npz", "grid.png", "overlays/[0-9][0-9][0-9][0-9][0-9]_*.png")


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


@dataclass
class RolloutJobResult:
    """What :func:`rollout_images` wrote and skipped."""

    out: Path
    files: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    npz: Path | None = None
    grid: Path | None = None
    overlays: list[Path] = field(default_factory=list)


def _load_rgb(path: Path):
    from .data import load_image

    return load_image(path)


def _check_request(batch_size: int, method: str, target, model: torch.nn.Module) -> None:
    """The arguments of :func:`rollout_images`, checked once before any file is read."""
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


def _batches(files: Sequence, transform, batch_size: int, skipped: list, bar):
    """``(images (b, 3, H, W), files)`` batches of the readable files; unreadable ones are warned about,
    appended to ``skipped`` as ``(file, reason)`` and counted on ``bar``."""
    batch, batch_files = [], []
    for f in files:
        try:
            img = _load_rgb(Path(f))
        except Exception as e:  # PIL raises OSError, UnidentifiedImageError, ValueError, ...
            # stacklevel 3: the warning points at the caller of rollout_images
            warnings.warn(f"skipping unreadable image {str(f)!r}: {type(e).__name__}: {e}", stacklevel=3)
            skipped.append((str(f), f"{type(e).__name__}: {e}"))
            bar.update(1)
            continue
        batch.append(transform(img))
        batch_files.append(f)
        if len(batch) == batch_size:
            yield torch.stack(batch), batch_files
            batch, batch_files = [], []
    if batch:
        yield torch.stack(batch), batch_files


class _RolloutWriter:
    """Collects the maps of each batch, writes the overlays as it goes and ``rollout.npz`` + ``grid.png`` at
    the end (:meth:`finish`).

    Overlays are drawn and encoded by a pool of :attr:`WORKERS` threads (numpy/PIL release the GIL) while the
    next batch is explained; at most :attr:`MAX_PENDING` wait. A worker's error is raised in the calling
    thread (by the next :meth:`add` or by :meth:`finish`); :meth:`finish` waits for every overlay before the
    grid; :meth:`close` cancels what is left (an error elsewhere) and waits for the running writes."""

    WORKERS = 2
    MAX_PENDING = 64

    def __init__(self, out: Path, data_config: dict, names: list[str] | None, method: str, overlays: bool,
                 earlier: Sequence[Path] = (), bar=None):
        self.result = RolloutJobResult(out)
        self.bar = bar  # advanced once per image written and once for the grid
        self.earlier = list(earlier)  # an earlier run's outputs, removed before the first write
        self.data_config, self.names, self.method, self.overlays = data_config, names, method, overlays
        self.maps, self.classes, self.probs, self.targets, self.student_maps = [], [], [], [], []
        self.shown: list[tuple] = []
        self.pool, self.pending = None, []

    def _overlay(self, image: np.ndarray, rollout_map: np.ndarray, path: Path, title: str) -> None:
        """Queue one overlay PNG for the writer threads."""
        from concurrent.futures import ThreadPoolExecutor

        from .viz import overlay_renderer

        if self.pool is None:
            self.renderer = overlay_renderer(image.shape[:2])  # its frame drawn here, once
            self.pool = ThreadPoolExecutor(self.WORKERS, thread_name_prefix="rollout-overlay")
        self.pending.append(self.pool.submit(self.renderer.save, image, rollout_map, path, title))
        self.result.overlays.append(path)

    def _collect(self, wait: bool = False) -> None:
        """Count the written overlays on the bar (one step per file) and raise a writer's error; ``wait``: all
        of them, else those done (first waiting for the oldest beyond MAX_PENDING)."""
        from concurrent.futures import as_completed
        from concurrent.futures import wait as wait_for

        if wait:
            done = as_completed(list(self.pending))  # the bar advances as each is written
        else:
            wait_for(self.pending[:max(0, len(self.pending) - self.MAX_PENDING)])
            done = [f for f in self.pending if f.done()]
        for f in done:
            self.pending.remove(f)
            f.result()  # a writer's exception, raised here
            if self.bar is not None:
                self.bar.update(1)

    def close(self) -> None:
        """Cancel the queued overlays and wait for those being written (no thread writes after the job)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def _label(self, c: int) -> str:
        return self.names[c] if self.names else str(c)

    def add(self, x: torch.Tensor, files: Sequence, maps: torch.Tensor, logits: torch.Tensor,
            target: int | None, student_maps: torch.Tensor | None) -> None:
        from .checkpoint import remove_outputs
        from .viz import denormalize

        if self.earlier:
            remove_outputs(self.result.out, self.earlier)
            self.earlier = []
        p, c = logits.float().softmax(-1).max(-1)
        t = c if target is None else torch.full_like(c, target)
        maps_np = maps.cpu().numpy()
        if student_maps is not None:
            self.student_maps.append(student_maps.float().cpu().numpy())
        imgs = denormalize(x, self.data_config["mean"], self.data_config["std"])
        for i, f in enumerate(files):
            idx = len(self.result.files)
            label = self._label(int(c[i]))
            if self.method == "grad":
                label += f"; grad for {self._label(int(t[i]))}"
            if self.overlays:
                self._overlay(imgs[i], maps_np[i], self.result.out / "overlays" / f"{idx:05d}_{Path(f).stem}.png",
                              f"{Path(f).name}: {label} ({float(p[i]):.2f})")
            if len(self.shown) < 16:
                self.shown.append((imgs[i], maps_np[i], f"{Path(f).name}: {label}"))
            self.result.files.append(str(f))
        if self.overlays:
            self._collect()
        elif self.bar is not None:
            self.bar.update(len(files))
        self.maps.append(maps_np)
        self.classes.append(c.cpu().numpy())
        self.probs.append(p.cpu().numpy())
        self.targets.append(t.cpu().numpy())

    def finish(self) -> RolloutJobResult:
        from .viz import save_grid

        result = self.result
        self._collect(wait=True)
        self.close()
        if self.bar is not None:
            self.bar.set_description("rollout: rollout.npz, grid.png")
        result.out.mkdir(parents=True, exist_ok=True)
        classes = np.concatenate(self.classes).astype(np.int64)
        result.npz = result.out / "rollout.npz"
        extra = {"target_class": np.concatenate(self.targets).astype(np.int64)} if self.method == "grad" else {}
        columns = []
        if self.student_maps:
            extra["student_maps"] = np.concatenate(self.student_maps).astype(np.float32)
            columns = [("student", list(extra["student_maps"][:len(self.shown)]))]
        np.savez(result.npz, maps=np.concatenate(self.maps).astype(np.float32),
                 files=np.array(result.files), predicted_class=classes,
                 probability=np.concatenate(self.probs).astype(np.float32),
                 predicted_label=np.array([self._label(c) for c in classes]),
                 method=np.array(self.method), **extra)
        result.grid = save_grid([s[0] for s in self.shown], [s[1] for s in self.shown], result.out / "grid.png",
                                titles=[s[2] for s in self.shown], extra=columns)
        if self.bar is not None:
            self.bar.update(1)
        return result


def rollout_images(files: Sequence[str | os.PathLike], out: str | os.PathLike, model: torch.nn.Module,
                   data_config: dict, *, head_fusion: str = "mean", discard_ratio: float = 0.0,
                   batch_size: int = 32, device: str | torch.device = "cpu", progress: bool = True,
                   overlays: bool = True, method: str = "attention", target: int | None = None,
                   student: torch.nn.Module | None = None, overwrite: bool = False) -> RolloutJobResult:
    """Attention rollout over image files; write overlays, ``rollout.npz`` and ``grid.png`` to ``out``.

    Each file is read with :func:`rollout_fast.data.load_image` (any size and mode, EXIF orientation
    applied, 16-bit and other high bit depths scaled to 8 bits, converted to RGB) and passed through timm's eval
    transform for ``data_config`` (``timm.data.create_transform``). Unreadable files are skipped with a
    warning naming them.

    ``method``: 'attention' (attention rollout, ``head_fusion``) or 'grad' (class-specific gradient
    rollout, REFERENCE.md section 2, for class ``target``; default each image's predicted class).
    ``student``: a :class:`rollout_fast.students.RolloutStudent` of this teacher; its predicted maps (from
    the same input batch) are saved as ``student_maps`` and drawn beside the rollout in ``grid.png``. Its
    grid and input size are checked against the explainer's maps and input on the first batch, before
    anything is written.

    ``out`` is checked before any image is read: it must be writable and hold no earlier run
    (:data:`ROLLOUT_OUTPUTS`) unless ``overwrite``; then the earlier run's files are removed before the first
    new one is written, so the folder always matches its ``rollout.npz``.

    ``progress``: a bar over the whole job, one step per file (done once its map and overlay are written)
    and one for ``rollout.npz`` + ``grid.png``, so it reaches 100% when everything is written.

    Writes:
        ``out/overlays/NNNNN_<name>.png``: the model input with the rollout heatmap and a colour bar;
        ``out/rollout.npz``: ``maps`` float32 (num_images, gh, gw), ``files``, ``predicted_class``
        int64, ``probability`` float32, ``predicted_label``, ``method``; for 'grad' also
        ``target_class`` int64 (the class each map explains);
        ``out/grid.png``: rows of input | rollout (| student) (first 16 images).

    Raises:
        ValueError: ``batch_size`` < 1, unknown ``method``, ``target`` given without method 'grad' or
            outside the model's classes, a student of another grid or input size, or no file could be read
            (nothing is written then).
        TypeError: ``target`` not an int.
        FileExistsError: ``out`` holds an earlier run and ``overwrite`` is False.
        NotADirectoryError / PermissionError: ``out`` is a file, or cannot be written.
    """
    from timm.data import create_transform

    from .checkpoint import check_output_dir

    _check_request(batch_size, method, target, model)
    earlier = check_output_dir(out, ROLLOUT_OUTPUTS, overwrite=overwrite)
    device = torch.device(device)
    explainer = AttentionRollout(model, head_fusion=head_fusion, discard_ratio=discard_ratio)
    if student is not None:
        student = student.to(device).eval()
    bar = _progress_bar(len(files) + 1, progress)
    writer = _RolloutWriter(Path(out), data_config, class_names_of(model), method, overlays, earlier, bar)
    try:
        for x, batch_files in _batches(files, create_transform(**data_config), batch_size, writer.result.skipped,
                                       bar):
            x = x.to(device)
            maps, logits = explainer.explain_grad(x, target) if method == "grad" else explainer.explain(x)
            student_maps = None
            if student is not None:
                if not writer.result.files:  # the explainer's grid and input, once
                    from .students import check_student_grid

                    check_student_grid(student, tuple(maps.shape[-2:]), tuple(x.shape[-2:]))
                with torch.no_grad():
                    student_maps = student.maps(x)
            writer.add(x, batch_files, maps, logits, target, student_maps)
        if not writer.result.files:
            raise ValueError(f"images: none of the {len(files)} inputs could be read")
        return writer.finish()
    finally:
        writer.close()
        bar.close()


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
