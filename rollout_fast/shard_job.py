"""Big rollout runs: maps written in shards (:mod:`rollout_fast.shards`), one shard at a time and atomically,
resumable, spread over the processes of ``torchrun`` (each takes whole shards; rank 0 writes the index).

Processes: rank 0 checks the output folder and writes the manifest (its errors reach every process), works out
which shards are unfinished and hands them out round-robin (rank r takes the r-th, (r+W)-th ... of them: shards
r, r+W, ... in a fresh run), so a resumed run is balanced too. Every process writes its own shards; after a
barrier rank 0 writes ``index.npz``. The output folder must be one folder that every process sees (a shared
file system across nodes).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .explain import AttentionRollout

__all__ = ["ShardJobResult", "rollout_shards"]

SAMPLE = 16  # --overlays sample: the first SAMPLE files of the list; the grid: the first SAMPLE maps of shard 0
_ERRORS = {e.__name__: e for e in (ValueError, TypeError, FileExistsError, FileNotFoundError, NotADirectoryError,
                                   PermissionError, OSError)}


@dataclass
class ShardJobResult:
    """What :func:`rollout_shards` did. ``index``, ``files`` and ``skipped`` (from the index) on rank 0 only;
    ``written``, ``overlays`` and ``grid``: this process's."""

    out: Path
    manifest: Path
    num_files: int
    num_shards: int
    resumed: list[int] = field(default_factory=list)  # shards finished by an earlier run, skipped
    written: list[int] = field(default_factory=list)
    index: Path | None = None
    files: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    overlays: list[Path] = field(default_factory=list)
    grid: Path | None = None


@dataclass(frozen=True)
class _OneProcess:
    """The processes of a run without torchrun (the fields of :class:`rollout_fast.distill.ddp.DistEnv`)."""

    device: torch.device
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    def barrier(self) -> None:
        pass


def _from_rank0(env, fn):
    """``fn()`` run on rank 0, its result (or its error, re-raised with the same type and message) on every
    process."""
    if env.world == 1:
        return fn()
    import torch.distributed as dist

    payload, error = [None], None
    if env.rank == 0:
        try:
            payload = [("ok", fn())]
        except Exception as e:  # noqa: BLE001 -- re-raised here and, by type and message, on every process
            payload, error = [("error", type(e).__name__, str(e))], e
    dist.broadcast_object_list(payload, src=0)
    if payload[0][0] == "ok":
        return payload[0][1]
    if error is not None:
        raise error
    raise _ERRORS.get(payload[0][1], RuntimeError)(payload[0][2])


def _check_files_agree(env, files: list[str]) -> None:
    from .shards import files_hash

    if env.world == 1:
        return
    import torch.distributed as dist

    seen = [None] * env.world
    dist.all_gather_object(seen, (len(files), files_hash(files)))
    if len(set(seen)) > 1:
        raise ValueError("images: the processes see different file lists ("
                         + ", ".join(f"rank {r}: {n} files, hash {h}" for r, (n, h) in enumerate(seen)) + ")")


def _check_args(shard_size, dtype, overlays, resume, overwrite) -> None:
    from .jobs import OVERLAY_MODES
    from .shards import DTYPES

    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size: expected an int >= 1, got {shard_size!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
    if overlays not in OVERLAY_MODES:
        raise ValueError(f"overlays: expected one of {OVERLAY_MODES}, got {overlays!r}")
    if resume and overwrite:
        raise ValueError("resume, overwrite: pass one of them (resume continues the shards, overwrite replaces them)")


def _manifest(model, data_config, explainer, files, *, model_name, checkpoint, method, target, precision, grid,
              dtype, shard_size, transform) -> dict:
    import json

    from .jobs import class_names_of
    from .shards import FORMAT, VERSION, files_hash, num_shards, state_dict_hash

    m = {"format": FORMAT, "version": VERSION,
         "model": {"name": model_name or type(model).__name__, "checkpoint": checkpoint,
                   "class": f"{type(model).__module__}.{type(model).__qualname__}", "hash": state_dict_hash(model)},
         "method": method, "target": target, "head_fusion": explainer.head_fusion if method == "attention" else None,
         "discard_ratio": explainer.discard_ratio, "readout": explainer.readout, "normalize": explainer.normalize,
         "precision": precision, "input": dict(data_config), "transform": repr(transform), "grid": list(grid),
         "dtype": dtype, "shard_size": shard_size, "num_files": len(files), "files_hash": files_hash(files),
         "num_shards": num_shards(len(files), shard_size), "class_names": class_names_of(model), "cwd": os.getcwd()}
    return json.loads(json.dumps(m, default=str))  # as it reads back from the file (tuples as lists)


def _prepare(out: Path, manifest: dict, files: list[str], resume: bool, overwrite: bool) -> tuple[list, list]:
    """Rank 0: check and prepare the folder; ``(unfinished shards, finished shards)``."""
    from .checkpoint import check_output_dir, check_writable_dir, remove_outputs, write_json
    from .jobs import ROLLOUT_OUTPUTS
    from .shards import MANIFEST, SHARDS, finished_shards, load_manifest, manifest_differences

    hint = ("overwrite=True (--overwrite) (it holds no shards to resume)" if resume else
            "resume=True (--resume) to continue its shards, or overwrite=True (--overwrite)")
    if resume and (out / MANIFEST).is_file():
        check_writable_dir(out)
        diffs = manifest_differences(load_manifest(out), manifest)
        if diffs:
            raise ValueError(f"resume: {str(out)!r} holds shards of another run: {'; '.join(diffs)} (pass "
                             "--overwrite to replace them, or choose another folder)")
        for tmp in [*(out / SHARDS).glob(".shard-*"), *out.glob(f".{MANIFEST}.*"), *out.glob(".index.npz.*")]:
            tmp.unlink(missing_ok=True)  # temporary files of writes that a kill interrupted
    else:  # a fresh run (resume of a run killed before its manifest: nothing to continue)
        remove_outputs(out, check_output_dir(out, ROLLOUT_OUTPUTS, overwrite=overwrite, hint=hint))
        write_json(out / MANIFEST, manifest)
    done = set(finished_shards(out, manifest, files))
    return [k for k in range(manifest["num_shards"]) if k not in done], sorted(done)


class _ShardBuffer:
    """The maps and index of one shard while its batches come in."""

    def __init__(self, k: int, files: Sequence[str]):
        self.k, self.files = k, list(files)
        self.row = [-1] * len(files)
        self.reason: list[str | None] = [None] * len(files)
        self.maps, self.classes, self.probs, self.targets = [], [], [], []

    def record(self, method: str) -> dict:
        rec = {"files": self.files, "row": self.row, "reason": self.reason, "predicted_class": self.classes,
               "probability": self.probs}
        return {**rec, "target_class": self.targets} if method == "grad" else rec


class _Writer:
    """One process's shards: batches in, shard files (and overlays, the grid) out."""

    def __init__(self, out: Path, files: list[str], manifest: dict, data_config: dict, overlays: str, bar):
        from .overlay_queue import OverlayQueue

        self.out, self.files, self.manifest, self.data_config = out, files, manifest, data_config
        self.overlays, self.bar, self.names = overlays, bar, manifest["class_names"]
        self.queue, self.buf, self.shown = OverlayQueue(bar), None, []
        self.written, self.drawn, self.grid = [], [], None
        self.width = max(5, len(str(len(files) - 1)))

    def add(self, k: int, batch, maps: torch.Tensor | None, logits: torch.Tensor | None, target) -> None:
        size = self.manifest["shard_size"]
        if self.buf is not None and self.buf.k != k:
            self.flush()
        if self.buf is None:
            self.buf = _ShardBuffer(k, self.files[k * size:(k + 1) * size])
        b = self.buf
        for i, why in batch.skipped:
            b.reason[i - k * size] = why
        self.bar.update(len(batch.skipped))
        if maps is None:
            return
        p, c = logits.softmax(-1).max(-1)
        t = c if target is None else torch.full_like(c, target)
        maps_np = maps.cpu().numpy()
        for j, i in enumerate(batch.index):
            b.row[i - k * size] = len(b.classes)
            b.classes.append(int(c[j]))
            b.probs.append(float(p[j]))
            b.targets.append(int(t[j]))
        b.maps.append(maps_np)
        self._draw(k, batch, maps_np, c, t, p)
        self.queue.collect()

    def _draw(self, k, batch, maps_np, c, t, p) -> None:
        from .jobs import caption
        from .viz import denormalize

        draw = [j for j, i in enumerate(batch.index) if self.overlays == "all"
                or (self.overlays == "sample" and i < SAMPLE)]
        show = [j for j in range(len(batch.index)) if k == 0 and len(self.shown) + j < SAMPLE]
        need = sorted(set(draw) | set(show))
        self.bar.update(len(batch.index) - len(draw))
        if not need:
            return
        imgs = dict(zip(need, denormalize(batch.images[need], self.data_config["mean"], self.data_config["std"])))
        for j in need:
            f, label = Path(self.files[batch.index[j]]), caption(self.names, self.manifest["method"], int(c[j]),
                                                                 int(t[j]))
            if j in draw:
                path = self.out / "overlays" / f"{batch.index[j]:0{self.width}d}_{f.stem}.png"
                self.drawn.append(self.queue.submit(imgs[j], maps_np[j], path, f"{f.name}: {label} ({float(p[j]):.2f})"))
            if j in show:
                self.shown.append((imgs[j], maps_np[j], f"{f.name}: {label}"))

    def flush(self) -> None:
        """Write the buffered shard: its overlays (all written first), for shard 0 the grid, then the shard."""
        from .shards import write_shard
        from .viz import save_grid

        b, self.buf = self.buf, None
        self.queue.collect(wait=True)
        if b.k == 0 and self.shown:
            self.grid = save_grid([s[0] for s in self.shown], [s[1] for s in self.shown], self.out / "grid.png",
                                  titles=[s[2] for s in self.shown])
        grid = tuple(self.manifest["grid"])
        maps = np.concatenate(b.maps) if b.maps else np.zeros((0, *grid), np.float32)
        write_shard(self.out, b.k, b.record(self.manifest["method"]), maps, self.manifest["dtype"])
        self.written.append(b.k)


def _run(env, files, mine, manifest, transform, explain, writer: _Writer, batch_size, workers, target) -> None:
    """This process's shards ``mine``: one stream of batches (cut at the shard boundaries) through the workers."""
    from .pipeline import image_batches, plan_batches

    size, plan, owner = manifest["shard_size"], [], []
    for k in mine:
        for b in plan_batches(min((k + 1) * size, len(files)), batch_size, start=k * size):
            plan.append(b)
            owner.append(k)
    batches = image_batches(files, transform, plan, device=env.device, workers=workers)
    try:
        for k, batch in zip(owner, batches):
            maps, logits = explain(batch.images) if batch.images is not None else (None, None)
            writer.add(k, batch, maps, logits, target)
        if writer.buf is not None:
            writer.flush()
    finally:
        batches.close()
        writer.queue.close()


def rollout_shards(files: Sequence[str | os.PathLike], out: str | os.PathLike, model: torch.nn.Module,
                   data_config: dict, *, model_name: str | None = None, checkpoint: str | None = None,
                   head_fusion: str = "mean", discard_ratio: float = 0.0, method: str = "attention",
                   target: int | None = None, batch_size: int = 64, device: str | torch.device | None = None,
                   precision: str = "fp32", workers: int = 0, shard_size: int = 4096, dtype: str = "float16",
                   overlays: str = "sample", resume: bool = False, overwrite: bool = False, progress: bool = True,
                   env=None) -> ShardJobResult:
    """Rollout over image files into a shard folder ``out`` (format: :mod:`rollout_fast.shards`; read it with
    :func:`rollout_fast.shards.open_maps`).

    Files are read, transformed and explained as in :func:`rollout_fast.jobs.rollout_images` (``workers``,
    ``precision``, ``method``, ``target``, ``head_fusion``, ``discard_ratio``, ``batch_size``); shard k holds
    files ``k * shard_size .. (k + 1) * shard_size - 1`` of the list, explained in batches cut at its ends, so
    with ``shard_size`` a multiple of ``batch_size`` the float32 maps are the bits of ``rollout_images``'
    ``rollout.npz`` (``dtype`` float16: those rounded to nearest). Unreadable files are listed in the shard's
    index and in ``index.npz`` as skipped, with the reason.

    ``overlays``: 'sample' (the first 16 files of the list), 'all' or 'none'; ``grid.png`` shows the first 16
    maps of shard 0. ``resume``: continue the shards in ``out`` (finished ones are skipped; a run killed at any
    moment ends, once resumed, with every file exactly once and the maps of an uninterrupted run); refused when
    ``out`` was written with another model or settings. Without it an earlier run in ``out`` is refused unless
    ``overwrite`` (which removes it first). ``model_name``, ``checkpoint``: how the model was named and loaded,
    recorded in the manifest beside the hash of its state dict.

    ``env``: the processes (:class:`rollout_fast.distill.ddp.DistEnv` of
    :func:`~rollout_fast.distill.ddp.setup_distributed` under torchrun; default one process on ``device``,
    'cpu' when None); ``device`` defaults to ``env.device``.

    Raises:
        ValueError: a bad argument (see :func:`~rollout_fast.jobs.rollout_images`, and ``shard_size`` < 1,
            ``dtype`` not float16/float32, ``resume`` with ``overwrite``), ``out`` holding shards of another run
            on ``resume`` (the message names what differs), processes that see different file lists.
        FileExistsError: ``out`` holds an earlier run, without ``resume`` or ``overwrite``.
        NotADirectoryError / PermissionError: ``out`` is a file, or cannot be written.
    """
    from timm.data import create_transform

    from .capture import token_layout
    from .jobs import check_request, overlay_mode
    from .pipeline import explain_batch, precision_setup

    check_request(batch_size, method, target, model)
    overlays = overlay_mode(overlays)
    _check_args(shard_size, dtype, overlays, resume, overwrite)
    env = env if env is not None else _OneProcess(torch.device(device or "cpu"))
    device = torch.device(device) if device is not None else env.device
    if env.world > 1 and device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives run on the current device
    files, out = [str(f) for f in files], Path(out)
    if not files:
        raise ValueError("images: no image files given")
    run_model, autocast, input_dtype = precision_setup(model, device, precision)
    explainer = AttentionRollout(run_model, head_fusion=head_fusion, discard_ratio=discard_ratio)
    H, W = (int(s) for s in data_config["input_size"][-2:])
    transform = create_transform(**data_config)
    _check_files_agree(env, files)
    manifest = _from_rank0(env, lambda: _manifest(
        model, data_config, explainer, files, model_name=model_name, checkpoint=checkpoint, method=method,
        target=target, precision=precision, grid=token_layout(model, (H, W)).grid, dtype=dtype,
        shard_size=shard_size, transform=transform))
    todo, done = _from_rank0(env, lambda: _prepare(out, manifest, files, resume, overwrite))
    mine = todo[env.rank::env.world]
    size = manifest["shard_size"]
    bar = _bar(sum(min((k + 1) * size, len(files)) - k * size for k in mine) + (env.rank == 0),
               progress and env.rank == 0)
    writer = _Writer(out, files, manifest, data_config, overlays, bar)
    result = ShardJobResult(out, out / "manifest.json", len(files), manifest["num_shards"], resumed=done)
    try:
        _run(env, files, mine, manifest, transform,
             lambda x: explain_batch(explainer, x, method, target, autocast, input_dtype), writer, batch_size,
             workers, target)
        result.written, result.overlays, result.grid = writer.written, writer.drawn, writer.grid
        env.barrier()
        if env.rank == 0:
            _finish(result, manifest, bar)
    finally:
        bar.close()
    return result


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="rollout (shards)", unit="image", disable=not enabled)


def _finish(result: ShardJobResult, manifest: dict, bar) -> None:
    """Rank 0, every shard written: ``index.npz``, and the result's files and skipped ones from it."""
    from .shards import write_index

    bar.set_description("rollout: index.npz")
    result.index = write_index(result.out, manifest)
    with np.load(result.index, allow_pickle=False) as z:
        result.files = z["files"].tolist()
        result.skipped = list(zip(z["skipped_files"].tolist(), z["skipped_reasons"].tolist()))
    if (result.out / "grid.png").is_file():
        result.grid = result.out / "grid.png"
    bar.update(1)
