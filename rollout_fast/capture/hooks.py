"""Temporary hooks on a ViT's attention blocks: the SDPA interception, the attn_drop tap, the per-model lock."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .model import UnsupportedModelError

__all__ = ["SDPACall", "Tap", "check_complete", "check_probs", "model_lock", "sdpa_call", "summary"]

_SDPA = F.scaled_dot_product_attention
_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def model_lock(mods: Sequence[nn.Module]):
    """Hold one re-entrant lock per attention module (taken in a fixed order, so models sharing blocks, as a
    pruned copy and its original do, cannot deadlock): captures of one model from several threads run one
    after the other, each with its own hooks, and the model's train/eval flags are restored between them."""
    with _LOCKS_GUARD:
        locks = [_LOCKS.setdefault(m, threading.RLock()) for m in sorted(set(mods), key=id)]
    with contextlib.ExitStack() as stack:
        for lock in locks:
            stack.enter_context(lock)
        yield


class SDPACall(tuple):
    """``(q, k, v, attn_mask, scale)`` of a self-attention SDPA call the capture can reproduce exactly."""

    __slots__ = ()


def sdpa_call(args, kwargs) -> SDPACall | str:
    """The SDPA call's ``(q, k, v, attn_mask, scale)`` when its attention is ``softmax(q k^T * scale + mask)``
    of (B, H, N, D) self-attention (any float mask or bool mask, no dropout, not causal, no GQA), else the
    reason it is not (a string)."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults = (None, None, None, None, 0.0, False, None, False)
    call = dict(zip(names, defaults))
    call.update(zip(names, args))
    call.update(kwargs)
    q, k, v, mask = call["query"], call["key"], call["value"], call["attn_mask"]
    if call["is_causal"] or call["dropout_p"] or call["enable_gqa"]:
        return "SDPA was called causal, with dropout or with grouped-query attention"
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point() for t in (q, k, v)):
        return "SDPA was called with q, k, v that are not (B, H, N, D) float tensors"
    if q.shape != k.shape or k.shape[:3] != v.shape[:3]:
        return f"SDPA was called with q {tuple(q.shape)}, k {tuple(k.shape)}: not self-attention"
    if mask is not None and not (isinstance(mask, torch.Tensor) and (mask.dtype == torch.bool
                                                                     or mask.is_floating_point())):
        return "SDPA was called with an attn_mask that is neither bool nor float"
    scale = call["scale"]
    return SDPACall((q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else float(scale)))


def check_probs(probs, idx: int) -> str | None:
    """None when ``probs`` read at ``attn_drop`` is a (B, H, N, N) probability tensor (non-negative rows
    summing to 1), else why not."""
    if not isinstance(probs, torch.Tensor) or probs.dim() != 4 or probs.shape[-1] != probs.shape[-2] \
            or not probs.is_floating_point():
        return f"attn_drop received {type(probs).__name__} {tuple(getattr(probs, 'shape', ()))}, not (B, H, N, N)"
    p = probs.detach().float()
    tol = 1e-5 * probs.shape[-1] if probs.dtype == torch.float32 else 1e-2
    if bool(p.amin() < 0) or bool(((p.sum(-1) - 1).abs() > tol).any()):
        return "the tensor attn_drop received is not post-softmax attention (rows do not sum to 1)"
    return None


class _SDPAIntercept(TorchFunctionMode):
    """Answers ``F.scaled_dot_product_attention`` calls with ``handler(layer, *args, **kwargs)`` while
    active (a handler returning None lets SDPA run); every other function passes through."""

    def __init__(self, handler):
        super().__init__()
        self.handler = handler
        self.layer = -1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            out = self.handler(self.layer, *args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


class Tap:
    """Temporary hooks on every block's attention (a context manager; all removed on exit).

    ``sdpa(layer, q, k, v, **sdpa_kwargs) -> Tensor | None`` sees the block's SDPA call (with the q and k
    the model really uses: after q/k norm and any rotary embedding) and may answer it (None: SDPA runs);
    ``on_probs(layer, probs) -> Tensor | None`` is a forward hook on ``attn_drop`` (timm's explicit path:
    the exact post-softmax attention, bias, mask and RoPE included), whose result replaces the
    probabilities. Handlers set ``captured[layer]`` when they took a layer's attention and record in
    ``unsupported[layer]`` why they could not. Only the thread that entered the Tap is tapped.
    """

    def __init__(self, mods: Sequence[nn.Module], *, sdpa=None, on_probs=None):
        self.mods = list(mods)
        self.mode = _SDPAIntercept(sdpa) if sdpa is not None else None
        self.on_probs = on_probs
        self.captured = [False] * len(self.mods)
        self.unsupported: dict[int, str] = {}
        self._mode_on = False
        self._thread = None
        self._handles = []

    def _mine(self) -> bool:
        return torch.compiler.is_compiling() or threading.get_ident() == self._thread

    def _pre(self, idx):
        def hook(module, args):
            if self.mode is not None and not self._mode_on and self._mine():
                self.mode.layer = idx
                self.mode.__enter__()
                self._mode_on = True
        return hook

    def _post(self, module, args, output):
        if self._mine():
            self._exit_mode()

    def _exit_mode(self):
        if self._mode_on:
            self._mode_on = False
            self.mode.__exit__(None, None, None)

    def _probs(self, idx):
        def hook(module, args, output):
            if self.captured[idx] or not self._mine():
                return None
            return self.on_probs(idx, output)
        return hook

    def __enter__(self):
        self._thread = threading.get_ident()
        try:
            for i, attn in enumerate(self.mods):
                self._handles.append(attn.register_forward_pre_hook(self._pre(i)))
                self._handles.append(attn.register_forward_hook(self._post))
                if self.on_probs is not None and isinstance(getattr(attn, "attn_drop", None), nn.Module):
                    self._handles.append(attn.attn_drop.register_forward_hook(self._probs(i)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        self._exit_mode()  # a forward that raised inside an attention block left the mode pushed
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False


def check_complete(tap: Tap, got: Sequence, what: str) -> None:
    """Raise UnsupportedModelError naming the blocks whose attention was not captured, and why."""
    missing = [i for i, a in enumerate(got) if a is None]
    if missing:
        why = sorted({tap.unsupported[i] for i in missing if i in tap.unsupported})
        raise UnsupportedModelError(f"model.blocks{missing}: {what}"
                                    + (f" ({'; '.join(why)})" if why else "")
                                    + "; this model's attention cannot be captured exactly")


def summary(paths: Sequence[str]) -> str:
    distinct = list(dict.fromkeys(paths))
    return distinct[0] if len(distinct) == 1 else "+".join(distinct)
