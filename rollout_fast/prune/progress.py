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

__all__ = ["PROGRESS_FILE", "AccuracyCheckpoint", "data_fingerprint"]

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
