"""Rollout maps of big runs in shards: the on-disk format, its checks and the reader :func:`open_maps`.

A shard folder (``rollout-fast rollout ... --shards --out DIR``, :func:`rollout_fast.shard_job.rollout_shards`):

- ``manifest.json``, written before any shard: what made the maps (``model``: name, checkpoint, class and
  :func:`state_dict_hash`; ``method``, ``target``, ``head_fusion``, ``discard_ratio``, ``readout``,
  ``normalize``, ``precision``; ``input``: the timm data config and the transform; ``grid`` (gh, gw);
  ``dtype``; ``shard_size``; ``num_files`` and ``files_hash`` (:func:`files_hash` of the file list in order);
  ``num_shards``; ``class_names``; ``cwd``, the folder relative file names are relative to).
- ``shards/shard-KKKKK.npy``: the maps of shard K's readable files, ``(n, gh, gw)`` float16 or float32, a plain
  ``.npy`` that ``np.load(path, mmap_mode='r')`` maps; shard K holds files ``K * shard_size`` up to
  ``(K + 1) * shard_size`` of the list.
- ``shards/shard-KKKKK.json``: its index: ``files`` (all of the shard's files, in order), ``row`` (each file's
  row in the ``.npy``, -1 when it could not be read), ``reason`` (null, or why it could not be read),
  ``predicted_class``, ``probability`` (and ``target_class`` for 'grad'), one per row. Each shard is written
  atomically (temporary file, then ``os.replace``), the ``.npy`` first: a shard is finished when its ``.json``
  is there and agrees with its ``.npy``.
- ``index.npz``, written once every shard is finished: ``files`` (the readable files in list order), ``shard``
  int32 and ``row`` int32 (where each one's map is), ``predicted_class`` int64, ``probability`` float32,
  ``predicted_label`` (and ``target_class`` int64 for 'grad'), ``skipped_files`` and ``skipped_reasons``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["DTYPES", "FORMAT", "INDEX", "MANIFEST", "SETTINGS", "SHARD_OUTPUTS", "ShardSet", "ShardedMaps",
           "files_hash", "finished_shards", "load_manifest", "manifest_differences", "num_shards", "open_maps",
           "read_shard", "shard_paths", "state_dict_hash", "write_index", "write_shard"]

FORMAT = "rollout_fast.shards"
VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.npz"
SHARDS = "shards"
DTYPES = ("float16", "float32")
# a shard folder's files (temporary files of interrupted writes included), as glob patterns in the folder
SHARD_OUTPUTS = (MANIFEST, INDEX, f"{SHARDS}/*", f".{MANIFEST}.*", f".{INDEX}.*")
# the manifest entries a resumed run must agree on ("model": its class and hash; the name is informative)
SETTINGS = ("model", "method", "target", "head_fusion", "discard_ratio", "readout", "normalize", "precision",
            "input", "grid", "dtype", "shard_size", "num_files", "files_hash")


def state_dict_hash(model) -> str:
    """A 16-hex-digit SHA-1 of ``model``'s state dict: every entry's name, dtype, shape and bytes, in name order
    (the same weights give the same hash however they were loaded)."""
    import torch

    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        v = v.detach().cpu().contiguous()
        h.update(f"{k}\0{v.dtype}\0{tuple(v.shape)}\0".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def files_hash(files: Sequence[str | os.PathLike]) -> str:
    """A 16-hex-digit SHA-1 of the file names, in order."""
    h = hashlib.sha1()
    for f in files:
        h.update(str(f).encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()[:16]


def num_shards(num_files: int, shard_size: int) -> int:
    return (num_files + shard_size - 1) // shard_size


def shard_paths(folder: str | os.PathLike, k: int) -> tuple[Path, Path]:
    """``(maps .npy, index .json)`` of shard ``k`` in ``folder``."""
    base = Path(folder) / SHARDS / f"shard-{k:05d}"
    return base.with_suffix(".npy"), base.with_suffix(".json")


def load_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of the shard folder ``folder``.

    Raises:
        ValueError: no ``manifest.json`` there, or not one of this format and version.
    """
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"shards: {str(folder)!r} is not a shard folder (no {MANIFEST})") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"shards: cannot read {str(path)!r} ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"shards: {str(path)!r} is not a {FORMAT} manifest of version {VERSION}")
    return manifest


def _setting(manifest: dict, key: str) -> str:
    v = manifest.get(key)
    if key == "model" and isinstance(v, dict):
        return f"{v.get('class')} {v.get('hash')} ({v.get('name')!r})"
    return json.dumps(v) if isinstance(v, (dict, list)) else repr(v)


def manifest_differences(there: dict, here: dict) -> list[str]:
    """``"KEY X there, Y here"`` for each entry of :data:`SETTINGS` in which two manifests differ ('model':
    class or hash)."""
    out = []
    for key in SETTINGS:
        a, b = there.get(key), here.get(key)
        if key == "model" and isinstance(a, dict) and isinstance(b, dict):
            same = (a.get("class"), a.get("hash")) == (b.get("class"), b.get("hash"))
        else:
            same = json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
        if not same:
            out.append(f"{key} {_setting(there, key)} there, {_setting(here, key)} here")
    return out


def write_shard(folder: str | os.PathLike, k: int, record: dict, maps: np.ndarray, dtype: str) -> tuple[Path, Path]:
    """Write shard ``k``: ``maps`` (n, gh, gw) as ``dtype`` (float16: rounded to nearest) to its ``.npy``, then
    ``record`` (see the module doc; ``rows`` and ``dtype`` added) to its ``.json``, each atomically."""
    from .checkpoint import atomic_write

    arr = np.ascontiguousarray(np.asarray(maps, dtype=np.float32).astype(dtype))
    npy, js = shard_paths(folder, k)

    def save_npy(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to the temporary name
            np.save(f, arr)

    atomic_write(npy, save_npy)
    record = {**record, "shard": k, "rows": int(arr.shape[0]), "dtype": dtype}
    atomic_write(js, lambda tmp: Path(tmp).write_text(json.dumps(record)))
    return npy, js


def read_shard(folder: str | os.PathLike, k: int, manifest: dict, files: Sequence[str] | None = None
               ) -> dict | None:
    """Shard ``k``'s record when it is finished and agrees with ``manifest`` (its files: ``files``' slice when
    given; its ``.npy``: ``(rows, gh, gw)`` of the manifest's dtype, readable with ``mmap_mode='r'``), else
    None."""
    npy, js = shard_paths(folder, k)
    size = manifest["shard_size"]
    try:
        record = json.loads(js.read_text())
        arr = np.load(npy, mmap_mode="r")
        n = sum(r >= 0 for r in record["row"])
        ok = (record["shard"] == k and record["rows"] == n and len(record["files"]) == len(record["row"])
              == len(record["reason"]) and len(record["predicted_class"]) == len(record["probability"]) == n
              and arr.shape == (n, *manifest["grid"]) and arr.dtype == np.dtype(manifest["dtype"]))
    except (OSError, ValueError, KeyError, TypeError):  # missing, truncated or foreign files: not finished
        return None
    if ok and files is not None:
        ok = record["files"] == [str(f) for f in files[k * size:(k + 1) * size]]
    return record if ok else None


def finished_shards(folder: str | os.PathLike, manifest: dict, files: Sequence[str] | None = None) -> list[int]:
    """The shards of ``folder`` that are finished and agree with ``manifest`` (and ``files``)."""
    return [k for k in range(manifest["num_shards"]) if read_shard(folder, k, manifest, files) is not None]


def write_index(folder: str | os.PathLike, manifest: dict) -> Path:
    """Write ``index.npz`` over every shard of ``folder`` (see the module doc), atomically.

    Raises:
        ValueError: a shard is missing or unfinished, or the shards do not hold the manifest's file list
            exactly once (count and :func:`files_hash`).
    """
    from .checkpoint import atomic_write

    cols = {"files": [], "shard": [], "row": [], "predicted_class": [], "probability": [], "target_class": []}
    all_files, skipped = [], []
    for k in range(manifest["num_shards"]):
        rec = read_shard(folder, k, manifest)
        if rec is None:
            raise ValueError(f"shards: shard {k} of {str(folder)!r} is missing or unfinished; run again with "
                             "--resume")
        all_files += rec["files"]
        for f, r, why in zip(rec["files"], rec["row"], rec["reason"]):
            if r < 0:
                skipped.append((f, why))
            else:
                cols["files"].append(f)
                cols["shard"].append(k)
                cols["row"].append(r)
        for c in ("predicted_class", "probability", "target_class"):
            cols[c] += rec.get(c, [])
    if len(all_files) != manifest["num_files"] or files_hash(all_files) != manifest["files_hash"]:
        raise ValueError(f"shards: the shards of {str(folder)!r} do not hold the manifest's {manifest['num_files']} "
                         f"files exactly once ({len(all_files)} files, hash {files_hash(all_files)})")
    names = manifest.get("class_names")
    arrays = {"files": np.array(cols["files"], dtype=str), "shard": np.array(cols["shard"], dtype=np.int32),
              "row": np.array(cols["row"], dtype=np.int32),
              "predicted_class": np.array(cols["predicted_class"], dtype=np.int64),
              "probability": np.array(cols["probability"], dtype=np.float32),
              "predicted_label": np.array([names[c] if names else str(c) for c in cols["predicted_class"]], dtype=str),
              "skipped_files": np.array([f for f, _ in skipped], dtype=str),
              "skipped_reasons": np.array([why for _, why in skipped], dtype=str)}
    if manifest["method"] == "grad":
        arrays["target_class"] = np.array(cols["target_class"], dtype=np.int64)

    def save(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the temporary name
            np.savez(f, **arrays)

    return atomic_write(Path(folder) / INDEX, save)


class ShardedMaps:
    """The maps of every shard as one read-only ``(N, gh, gw)`` array-like, each shard's ``.npy`` memory-mapped
    (``arrays``: the ``np.memmap`` of each shard; nothing is read until indexed).

    Indexing: an int gives one (gh, gw) map; a slice, a list or an integer array gives (k, gh, gw) (rows in the
    order asked); a tuple indexes the rows first, then within them. ``np.asarray(maps)`` reads all of them."""

    def __init__(self, arrays: Sequence[np.ndarray]):
        self.arrays = list(arrays)
        self.offsets = np.concatenate([[0], np.cumsum([len(a) for a in self.arrays])]).astype(np.int64)
        first = self.arrays[0]
        self.shape = (int(self.offsets[-1]), *first.shape[1:])
        self.dtype = first.dtype
        self.ndim = first.ndim

    def __len__(self) -> int:
        return self.shape[0]

    def _row(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"maps: index {i} is out of range for {len(self)} maps")
        i %= len(self)
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.arrays[s][i - self.offsets[s]]

    def __getitem__(self, key):
        if isinstance(key, tuple):
            head = self[key[0]]
            return head[key[1:]] if isinstance(key[0], (int, np.integer)) else head[(slice(None), *key[1:])]
        if isinstance(key, (int, np.integer)):
            return np.asarray(self._row(int(key)))
        if isinstance(key, slice):
            key = range(*key.indices(len(self)))
        idx = np.asarray(key, dtype=np.int64).reshape(-1)
        if len(idx) and not (-len(self) <= idx.min() and idx.max() < len(self)):
            raise IndexError(f"maps: an index is out of range for {len(self)} maps")
        idx = idx % max(1, len(self))
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        out = np.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.arrays[s][idx[sel] - self.offsets[s]]
        return out

    def __array__(self, dtype=None, copy=None):
        whole = np.concatenate([np.asarray(a) for a in self.arrays]) if self.arrays else np.empty(self.shape)
        return whole if dtype is None else whole.astype(dtype)

    def __repr__(self) -> str:
        return f"ShardedMaps(shape={self.shape}, dtype={self.dtype}, shards={len(self.arrays)})"


class ShardSet(tuple):
    """``(files, maps, table)`` of :func:`open_maps`, with ``.files``, ``.maps``, ``.table``, ``.skipped``
    (``(file, reason)`` of the unreadable files), ``.manifest`` and ``.folder``."""

    def __new__(cls, files, maps, table, skipped, manifest, folder):
        self = super().__new__(cls, (files, maps, table))
        self.skipped, self.manifest, self.folder = skipped, manifest, Path(folder)
        return self

    files = property(lambda self: self[0])
    maps = property(lambda self: self[1])
    table = property(lambda self: self[2])


def open_maps(folder: str | os.PathLike) -> ShardSet:
    """Open a finished shard folder: ``(files, maps, table)``.

    Returns:
        ``files``: the readable files (list of str, as given to the job, in list order); ``maps``: a
        :class:`ShardedMaps` ``(len(files), gh, gw)`` of the manifest's dtype, memory-mapped, ``maps[i]`` the map of
        ``files[i]``; ``table``: dict of numpy arrays, one entry per file: ``shard``, ``row``, ``predicted_class``,
        ``probability``, ``predicted_label`` (and ``target_class`` for 'grad'). Also ``.skipped`` and
        ``.manifest`` (:class:`ShardSet`).

    Raises:
        ValueError: not a shard folder, no ``index.npz`` yet (the run has not finished: run it again with
            ``--resume``), or a shard that disagrees with the index.
    """
    folder = Path(folder)
    manifest = load_manifest(folder)
    if not (folder / INDEX).is_file():
        raise ValueError(f"shards: {str(folder)!r} has no {INDEX}: the run has not finished (run it again with "
                         "--resume)")
    with np.load(folder / INDEX, allow_pickle=False) as z:
        index = {k: z[k] for k in z.files}
    arrays = [np.load(shard_paths(folder, k)[0], mmap_mode="r") for k in range(manifest["num_shards"])]
    maps = ShardedMaps(arrays)
    rows = maps.offsets[index["shard"]] + index["row"] if len(index["files"]) else np.empty(0, np.int64)
    if len(maps) != len(index["files"]) or not np.array_equal(rows, np.arange(len(maps))):
        raise ValueError(f"shards: the shards of {str(folder)!r} disagree with its {INDEX}")
    table = {k: v for k, v in index.items() if k not in ("files", "skipped_files", "skipped_reasons")}
    skipped = list(zip(index["skipped_files"].tolist(), index["skipped_reasons"].tolist()))
    return ShardSet(index["files"].tolist(), maps, table, skipped, manifest, folder)
