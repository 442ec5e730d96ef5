"""Resumable top-1 passes of ``prune-eval``: the running counts saved after every evaluation batch.

A top-1 pass of :func:`~rollout_fast.prune.study.prune_eval` or
:func:`~rollout_fast.prune.study.compare_methods` over 3,925 Imagenette photographs takes hours on a CPU.
:class:`AccuracyCheckpoint` writes its counts (full model, every scorer or method), the random scorers'
generator states and the token counts observed by per-image methods (ATS) to one JSON file after every batch
(atomically), so ``prune-eval --resume`` continues where a killed run stopped and ends with the result an
uninterrupted run gives. Timing is not resumed: it runs, whole, after the top-1 pass.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

__all__ = ["PROGRESS_FILE", "TOP1_KEYS", "AccuracyCheckpoint", "data_fingerprint", "merge_top1", "read_top1_run"]

PROGRESS_FILE = "progress.json"


def data_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """SHA-256 (hex, first 16 digits) of the evaluation images' and labels' bytes: a resumed pass must see the
    same data in the same order."""
    h = hashlib.sha256()
    for t in (images, labels):
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class AccuracyCheckpoint:
    """The counts of a top-1 pass, saved to ``path`` after every batch; read back by ``resume``.

    Args:
        path: the JSON file (``OUT/progress.json`` in ``prune-eval``).
        key: what the counts belong to (JSON-able: model, data, student, ...); the study adds its own
            settings in :meth:`begin`. A saved file whose key differs is refused.
        resume: continue from ``path`` when it exists (else start at the first image).

    Raises:
        ValueError (from :meth:`begin`): ``resume`` and ``path`` holds the counts of another run (the message
            names the first setting that differs), or an unreadable file.
    """

    def __init__(self, path: str | os.PathLike, key: dict | None = None, *, resume: bool = False):
        self.path = Path(path)
        self.key = dict(key or {})
        self.resume = resume
        self.saved: dict | None = None

    def begin(self, study_key: dict) -> dict | None:
        """Add the study's settings to the key; return the saved state (``{"next": first image not yet
        counted, "state": ...}``) when resuming a matching run, else None."""
        self.key = json.loads(json.dumps({**self.key, **study_key}))  # tuples -> lists, as read back
        if not (self.resume and self.path.is_file()):
            return None
        try:
            data = json.loads(self.path.read_text())
            saved_key, nxt, state = data["key"], int(data["next"]), data["state"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--resume: {str(self.path)!r} is not a prune-eval progress file "
                             f"({type(e).__name__}: {e}); remove it or pass --overwrite") from None
        if saved_key != self.key:
            name = next(k for k in sorted(set(saved_key) | set(self.key)) if saved_key.get(k) != self.key.get(k))
            raise ValueError(f"--resume: {str(self.path)!r} was made with another {name} "
                             f"({saved_key.get(name)!r}, now {self.key.get(name)!r}); pass --overwrite to start "
                             "again or choose another --out")
        self.saved = {"next": nxt, "state": state}
        return self.saved

    def save(self, next_start: int, state: dict) -> None:
        """Write the counts after the images ``[0, next_start)`` (atomically)."""
        from ..checkpoint import write_json

        write_json(self.path, {"key": self.key, "next": int(next_start), "state": state})

    def finish(self) -> None:
        """The pass is complete (its results are written by the caller): remove the progress file."""
        self.path.unlink(missing_ok=True)


# what a timing run and the top-1 run it reads must share (prune-eval's meta)
TOP1_KEYS = ("model", "checkpoint", "data", "student", "scorer_model", "student_precision")
TOP1_DEFAULTS = {"student_precision": "fp32"}  # the value of a key a run's meta leaves out


def read_top1_run(folder: str | os.PathLike, meta: dict, *, methods: list[tuple[str, str]] | None = None,
                  scorers: list[str] | None = None, keeps: list[float] | None = None) -> dict:
    """A finished top-1 run of ``prune-eval`` in ``folder``, checked to cover what a timing run measures.

    Top-1 over thousands of photographs takes hours and may run on a busy machine at one thread; timing wants a
    quiet one. ``prune-eval --throughput-only --top1-from FOLDER`` times here and takes top-1 from the earlier
    run (:func:`merge_top1`).

    Args:
        folder: the earlier run's ``--out`` (its ``methods.json`` when ``methods`` is given, else
            ``results.json``).
        meta: this run's model, checkpoint, data, student, scorer model and student precision
            (:data:`TOP1_KEYS`; a key left out means its :data:`TOP1_DEFAULTS` value), which the earlier run must
            share.
        methods: this run's (method, setting) pairs; or ``scorers`` x ``keeps`` (the scorer study).

    Returns:
        dict: the earlier run's result (``rows``, ``meta``, ...), as written.

    Raises:
        ValueError: no readable result in ``folder``, a timing-only run, another model / checkpoint / data /
            student / scorer model / student precision, or a method setting (scorer and keep ratio) the earlier run lacks; the
            message starts with ``--top1-from:``.
    """
    path = Path(folder) / ("methods.json" if methods is not None else "results.json")
    try:
        earlier = json.loads(path.read_text())
        saved, rows = earlier["meta"], earlier["rows"]
        have = {(r["method"], r["setting"]) if methods is not None else (r["scorer"], float(r["keep_ratio"]))
                for r in rows}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--top1-from: {str(path)!r} is not a prune-eval result ({type(e).__name__}: {e})") from None
    if not saved.get("images"):
        raise ValueError(f"--top1-from: {str(path)!r} holds no top-1 (a timing-only run)")
    for k in TOP1_KEYS:
        was, now = saved.get(k, TOP1_DEFAULTS.get(k)), meta.get(k, TOP1_DEFAULTS.get(k))
        if was != now:
            raise ValueError(f"--top1-from: {str(path)!r} was made with another {k} ({was!r}, now {now!r})")
    want = list(methods) if methods is not None else [(s, float(k)) for s in scorers or [] for k in keeps or []]
    missing = [w for w in want if w not in have]
    if missing:
        names = ", ".join(f"{a} {b}" for a, b in missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise ValueError(f"--top1-from: {str(path)!r} has no top-1 for {names}")
    return earlier


def merge_top1(result: dict, earlier: dict, folder: str | os.PathLike, *, scorers: list[str] | None = None,
               keeps: list[float] | None = None) -> dict:
    """``result`` (a timing-only run of :func:`~rollout_fast.prune.study.compare_methods` or
    :func:`~rollout_fast.prune.study.prune_eval`) with top-1 taken from ``earlier``
    (:func:`read_top1_run`): each method's top-1 and observed tokens per block (ATS counts its tokens per
    image), or the scorer study's rows for ``scorers`` x ``keeps``; ``meta`` gets the earlier run's full top-1
    and image count and ``top1_from`` (folder, date, threads and load average of that run). Returns ``result``,
    changed in place."""
    saved = earlier["meta"]
    if "throughput" in result:  # the scorer study: its top-1 rows, for the scorers and keeps timed here
        want = {(s, float(k)) for s in scorers or [] for k in keeps or []}
        result["rows"] = [r for r in earlier["rows"] if (r["scorer"], float(r["keep_ratio"])) in want]
    else:
        by = {(r["method"], r["setting"]): r for r in earlier["rows"]}
        for r in result["rows"]:
            if r["method"] == "full":
                r["top1"] = saved["full_top1"]
            else:
                src = by[(r["method"], r["setting"])]
                r["top1"], r["tokens"] = src["top1"], src["tokens"]
    result["meta"].update(full_top1=saved["full_top1"], images=saved["images"],
                          top1_from={"folder": str(folder), **{k: saved.get(k) for k in
                                                               ("date", "threads", "load_average")}})
    return result
