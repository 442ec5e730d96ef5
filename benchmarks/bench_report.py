"""What the benchmark scripts share for ``benchmarks/gpu_check.py``: an incrementally written JSON report, a
wall-clock budget, and the ``--dry-run`` convention.

- :class:`Report` (``--json PATH``): ``{"script", "argv", "dry_run", "plan", "rows", "markdown", "complete",
  "stopped"}`` rewritten (atomically) after every measured group, so a script killed at its time limit still
  leaves every figure it measured.
- :meth:`Report.error`: a measurement that raises is recorded (``errors``) and the run goes on; the script
  then exits 1.
- :class:`Budget` (``--budget-s S``): the script starts no new group after ``S`` seconds and says so in
  ``stopped`` (``complete`` false) instead of running past its caller's time limit.
- ``--dry-run``: the script prints the plan for the sizes it was given (shapes, bytes, providers, reps:
  :func:`print_plan`; no GPU needed), then measures its ``--smoke`` variant on the CPU, so a machine without a
  GPU proves that the same command line parses and the code runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--json``, ``--budget-s`` and ``--dry-run``, the same in every script."""
    p.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="write the rows and the markdown table to this JSON file (rewritten after each group)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        metavar="S",
        help="start no new measurement after S seconds (what was measured is kept)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan for these sizes (no GPU needed), then run the --smoke variant on the CPU",
    )


class Budget:
    """Seconds since construction against an optional limit."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def spent(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds


def _clean(value):
    """JSON-safe: NaN/inf -> None (json.dumps would write NaN, which is not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class Report:
    """Rows of one benchmark run, written to ``path`` (if any) after every :meth:`add`."""

    def __init__(
        self,
        path: str | os.PathLike | None,
        script: str,
        argv: list[str],
        *,
        dry_run: bool = False,
        plan: list[dict] | None = None,
        env: dict | None = None,
        table=None,
    ):
        self.path = Path(path) if path else None
        self.data = {
            "script": script,
            "argv": list(argv),
            "dry_run": dry_run,
            "plan": plan or [],
            "env": env or {},
            "rows": [],
            "markdown": "",
            "complete": False,
            "stopped": None,
            "errors": [],
            "extra": {},
        }
        self.table = table
        self.flush()

    @property
    def rows(self) -> list[dict]:
        return self.data["rows"]

    def add(self, rows: list[dict]) -> None:
        self.data["rows"].extend(rows)
        self.flush()

    def error(self, where: str, exc: BaseException) -> None:
        """Record a measurement that raised (the traceback goes to stderr) and go on with the next one: one
        failing provider or shape costs only its own figures. :meth:`exit_code` is then 1."""
        traceback.print_exception(type(exc), exc, exc.__traceback__)
        self.data["errors"].append({"where": where, "error": f"{type(exc).__name__}: {exc}"[:1000]})
        print(f"# error in {where}: {type(exc).__name__}: {exc}", file=sys.stderr)
        if type(exc).__name__ == "OutOfMemoryError":
            import torch

            torch.cuda.empty_cache()
        self.flush()

    def exit_code(self) -> int:
        return 1 if self.data["errors"] else 0

    def stop(self, reason: str) -> None:
        """Record why the run ended early (printed to stderr too)."""
        self.data["stopped"] = reason
        print(f"# stopped: {reason}", file=sys.stderr)
        self.flush()

    def finish(self, **extra) -> None:
        self.data["extra"].update(extra)
        self.data["complete"] = self.data["stopped"] is None
        self.flush()

    def flush(self) -> None:
        if self.table is not None and self.data["rows"]:
            self.data["markdown"] = self.table(self.data["rows"])
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(_clean(self.data), indent=1, default=str))
        os.replace(tmp, self.path)


def print_plan(title: str, plan: list[dict]) -> None:
    """The dry run's account of what a real run would measure."""
    print(f"# dry run: {title}: {len(plan)} measurement groups at the given sizes")
    for item in plan:
        print("#   " + ", ".join(f"{k} {v}" for k, v in item.items()))
