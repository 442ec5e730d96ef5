"""Overlay PNGs written by a small thread pool while the next batch is explained (numpy/PIL release the GIL)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["OverlayQueue"]


class OverlayQueue:
    """Overlays (:class:`rollout_fast.viz.OverlayRenderer`) drawn and encoded by :attr:`WORKERS` threads named
    ``rollout-overlay*``; at most :attr:`MAX_PENDING` wait.

    A worker's error is raised in the calling thread (by the next :meth:`collect`); :meth:`collect` with
    ``wait`` waits for every queued overlay; :meth:`close` cancels what is left (an error elsewhere) and waits
    for the running writes, so no thread writes after the job. ``bar``: advanced by one per overlay written."""

    WORKERS = 2
    MAX_PENDING = 64

    def __init__(self, bar=None):
        self.bar = bar
        self.pool, self.pending, self.renderer = None, [], None

    def submit(self, image: np.ndarray, rollout_map: np.ndarray, path: Path, title: str) -> Path:
        """Queue one overlay PNG: ``image`` (H, W, 3) float in [0, 1], ``rollout_map`` (gh, gw), written to
        ``path`` with ``title``."""
        from concurrent.futures import ThreadPoolExecutor

        from .viz import overlay_renderer

        if self.pool is None:
            self.renderer = overlay_renderer(image.shape[:2])  # its frame drawn here, once
            self.pool = ThreadPoolExecutor(self.WORKERS, thread_name_prefix="rollout-overlay")
        self.pending.append(self.pool.submit(self.renderer.save, image, rollout_map, path, title))
        return path

    def collect(self, wait: bool = False) -> int:
        """Count the written overlays on the bar and raise a writer's error; ``wait``: all of them, else those
        done (first waiting for the oldest beyond MAX_PENDING). Returns how many were counted."""
        from concurrent.futures import as_completed
        from concurrent.futures import wait as wait_for

        if wait:
            done = as_completed(list(self.pending))  # the bar advances as each is written
        else:
            wait_for(self.pending[:max(0, len(self.pending) - self.MAX_PENDING)])
            done = [f for f in self.pending if f.done()]
        n = 0
        for f in done:
            self.pending.remove(f)
            f.result()  # a writer's exception, raised here
            n += 1
            if self.bar is not None:
                self.bar.update(1)
        return n

    def close(self) -> None:
        """Cancel the queued overlays and wait for those being written."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
