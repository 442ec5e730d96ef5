"""Temporary hooks on a ViT's attention blocks: the SDPA interception and the q/k and attn_drop taps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .model import UnsupportedModelError

__all__ = ["Tap", "check_complete", "plain_sdpa", "sdpa_scale", "summary"]

_SDPA = F.scaled_dot_product_attention


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


def plain_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False) -> bool:
    """An unmasked, dropout-free self-attention call of equal-shaped float16/bfloat16/float32 q, k, v."""
    return (attn_mask is None and not is_causal and not dropout_p and not enable_gqa
            and all(isinstance(t, torch.Tensor) and t.dim() == 4 and t.dtype in (torch.float16, torch.bfloat16,
                                                                                  torch.float32) for t in (q, k, v))
            and q.shape == k.shape and k.shape[:3] == v.shape[:3] and q.dtype == k.dtype == v.dtype)


class Tap:
    """Temporary hooks on every block's attention (a context manager; all removed on exit).

    ``sdpa(layer, q, k, v, **sdpa_kwargs) -> Tensor | None`` answers the block's SDPA call (None: SDPA runs);
    ``on_qk(layer, attn, q, k)`` runs after a block whose SDPA call was not answered, with the q and k seen
    by ``q_norm``/``k_norm``; ``on_probs(layer, probs) -> Tensor | None`` is a forward hook on ``attn_drop``
    (timm's non-fused path), whose result replaces the probabilities. Masked attention is recorded in
    ``masked`` (the caller raises).
    """

    def __init__(self, mods: Sequence[nn.Module], *, sdpa=None, on_qk=None, on_probs=None):
        self.mods = list(mods)
        self.mode = _SDPAIntercept(sdpa) if sdpa is not None else None
        self.on_qk = on_qk
        self.on_probs = on_probs
        self.answered = [False] * len(self.mods)
        self.masked: list[int] = []
        self._mode_on = False
        self._q = self._k = None
        self._handles = []

    def _pre(self, idx):
        def hook(module, args, kwargs):
            mask = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
            if mask is not None or kwargs.get("is_causal", False):
                self.masked.append(idx)
            self._q = self._k = None
            if self.mode is not None and not self._mode_on:
                self.mode.layer = idx
                self.mode.__enter__()
                self._mode_on = True
        return hook

    def _post(self, idx, attn):
        def hook(module, args, output):
            self._exit_mode()
            q, k = self._q, self._k
            self._q = self._k = None
            if not self.answered[idx] and self.on_qk is not None and q is not None and k is not None:
                self.on_qk(idx, attn, q, k)
        return hook

    def _exit_mode(self):
        if self._mode_on:
            self._mode_on = False
            self.mode.__exit__(None, None, None)

    def _set_q(self, module, args, output):
        self._q = output

    def _set_k(self, module, args, output):
        self._k = output

    def _probs(self, idx):
        def hook(module, args, output):
            return self.on_probs(idx, output)
        return hook

    def __enter__(self):
        try:
            for i, attn in enumerate(self.mods):
                self._handles.append(attn.register_forward_pre_hook(self._pre(i), with_kwargs=True))
                self._handles.append(attn.register_forward_hook(self._post(i, attn)))
                if self.on_qk is not None:
                    self._handles.append(attn.q_norm.register_forward_hook(self._set_q))
                    self._handles.append(attn.k_norm.register_forward_hook(self._set_k))
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
        self._q = self._k = None
        return False


def sdpa_scale(args, kwargs):
    """The ``scale`` argument of an SDPA call (None when not given)."""
    return kwargs.get("scale", args[6] if len(args) > 6 else None)


def check_complete(tap: Tap, got: Sequence, what: str) -> None:
    if tap.masked:
        raise UnsupportedModelError(f"model.blocks{tap.masked}: attention ran with a mask; masked "
                                    "attention is not supported by rollout")
    missing = [i for i, a in enumerate(got) if a is None]
    if missing:
        raise UnsupportedModelError(f"model.blocks{missing}: {what}; this model's attention implementation "
                                    "cannot be captured")


def summary(paths: Sequence[str]) -> str:
    distinct = list(dict.fromkeys(paths))
    return distinct[0] if len(distinct) == 1 else "+".join(distinct)
