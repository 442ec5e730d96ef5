"""The one backend registry of the rollout_fast ops, keyed by (op, backend), and the one "is Triton usable" check.

Each op module (:mod:`.rollout`, :mod:`.gather`, :mod:`.attention`) registers its backends here with
:func:`register`; :func:`pick` resolves a requested backend ('auto' or a name) for tensors on a device, the
only place backends are decided. "auto" tries :data:`AUTO_ORDER` for the device type and takes the first
available backend that runs there. Triton is never chosen automatically for CPU tensors: there it runs in
Triton's interpreter (``TRITON_INTERPRET=1``), which is for tests, not speed.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = ["AUTO_ORDER", "Backend", "available", "backends", "entry", "pick", "register", "triton_installed",
           "triton_interpret", "triton_interpreted", "triton_usable"]


class Backend(NamedTuple):
    """A registry entry: ``available() -> bool`` (cheap; this install has it), ``supports(device) -> bool``
    (it runs on tensors of ``device``), ``run`` (the op's calling convention), and the checks ``run`` makes
    itself while it reads its input, so the op skips its own separate pass: ``checks_values(device) ->
    bool``, True where ``run`` raises the reference's ValueError on NaN/inf or negative input;
    ``checks_rows(device) -> bool``, True where it raises the reference's ValueError on rows that do not sum
    to 1 (when the call asks for that check)."""

    available: Callable[[], bool]
    supports: Callable[[torch.device], bool]
    run: Callable
    checks_values: Callable[[torch.device], bool] = lambda device: False
    checks_rows: Callable[[torch.device], bool] = lambda device: False


_REGISTRY: dict[tuple[str, str], Backend] = {}

AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "rollout": {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")},
    "topk_gather": {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")},
    "fused_attention": {"cuda": ("triton", "chunked"), "cpu": ("chunked",)},
}
_FALLBACK = {"rollout": "reference", "topk_gather": "reference", "fused_attention": "chunked"}


def register(op: str, name: str, backend: Backend) -> None:
    """Add (or replace) backend ``name`` of ``op``."""
    _REGISTRY[(op, name)] = backend


def backends(op: str) -> tuple[str, ...]:
    """Every registered backend name of ``op``, in registration order."""
    return tuple(name for (o, name) in _REGISTRY if o == op)


def entry(op: str, name: str) -> Backend | None:
    """The registry entry of ``op``'s backend ``name`` (None when not registered)."""
    return _REGISTRY.get((op, name))


def available(op: str, device: torch.device | str | None = None) -> list[str]:
    """Backends of ``op`` usable in this install (and, with ``device``, on tensors of that device)."""
    dev = None if device is None else torch.device(device)
    return [name for name in backends(op)
            if _REGISTRY[(op, name)].available() and (dev is None or _REGISTRY[(op, name)].supports(dev))]


def pick(op: str, name: str, device: torch.device) -> tuple[str, Backend] | None:
    """``(name, entry)`` of the backend ``name`` means for ``op`` on ``device`` ('auto': the first of
    :data:`AUTO_ORDER` available there), or None when ``name`` is not registered, not available or does
    not run on ``device`` (the op raises its own ValueError, naming what went wrong)."""
    if name == "auto":
        order = AUTO_ORDER[op].get(device.type, (_FALLBACK[op],))
        for candidate in order:
            found = _REGISTRY.get((op, candidate))
            if found is not None and found.available() and found.supports(device):
                return candidate, found
        name = _FALLBACK[op]
    found = _REGISTRY.get((op, name))
    if found is None or not found.available() or not found.supports(device):
        return None
    return name, found


# --------------------------------------------------------------------------------------------- Triton
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # looked up once: ops are hot paths


def triton_installed() -> bool:
    """Triton can be imported (``pip install '.[triton]'``)."""
    return _TRITON_INSTALLED


def triton_interpret() -> bool:
    """``TRITON_INTERPRET=1`` is set: Triton kernels run in its interpreter on CPU tensors (tests)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def triton_interpreted() -> bool:
    """True when this process's Triton kernels were built for the interpreter (imports them on first call)."""
    from .. import triton as rt

    return rt.interpreted()


def triton_usable(device: torch.device | str | None = None) -> bool:
    """Triton is installed and can run here: a CUDA device, or ``TRITON_INTERPRET=1`` (CPU). With ``device``:
    the kernels run on tensors of that device (CUDA with compiled kernels; CPU with interpreted ones)."""
    if not _TRITON_INSTALLED:
        return False
    if device is None:
        return torch.cuda.is_available() or triton_interpret()
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and not triton_interpreted()
    return device.type == "cpu" and triton_interpret() and triton_interpreted()
