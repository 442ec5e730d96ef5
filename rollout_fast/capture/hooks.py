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

__all__ = ["SDPACall", "Tap", "check_complete", "check_probs", "mha_self_attention", "model_lock", "sdpa_call",
           "summary"]

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


_MHA = F.multi_head_attention_forward
_SOFTMAX = (F.softmax, torch.softmax, torch.Tensor.softmax)
_MHA_ARGS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
             "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
             "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
             "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")


def mha_self_attention(args, kwargs):
    """An ``F.multi_head_attention_forward`` call (what ``nn.MultiheadAttention`` runs: torchvision's and
    open_clip's ViTs) as the SDPA self-attention it computes: ``(q, k, v, attn_mask, finish)`` with q, k, v
    (B, H, N, D) from the packed input projection, a float (or None) mask broadcastable to (B, H, N, N), and
    ``finish(o)`` turning the (B, H, N, D) attention output into the call's ``(output, None)``; or the
    reason (a string) when the call is not plain batched self-attention (separate projections, key bias,
    zero attention, key padding mask, causal, dropout, ``need_weights=True``)."""
    call = dict(zip(_MHA_ARGS, args))
    call.update(kwargs)
    x, H = call["query"], int(call["num_heads"])
    if not (isinstance(x, torch.Tensor) and x is call["key"] and x is call["value"] and x.dim() == 3):
        return "nn.MultiheadAttention was called with other than one batched (N, B, E) sequence for q, k and v"
    if (call.get("use_separate_proj_weight") or call.get("bias_k") is not None or call.get("add_zero_attn")
            or call.get("key_padding_mask") is not None or call.get("static_k") is not None
            or call.get("is_causal") or (call.get("training", True) and call.get("dropout_p"))):
        return ("nn.MultiheadAttention was called with separate projections, key/value bias, zero attention, a "
                "key padding mask, causal masking or dropout")
    if call.get("need_weights", True):
        return "nn.MultiheadAttention was called with need_weights=True"
    N, B, E = x.shape
    qkv = F.linear(x, call["in_proj_weight"], call["in_proj_bias"])  # (N, B, 3E), as torch's packed projection
    q, k, v = qkv.view(N, B, 3, H, E // H).permute(2, 1, 3, 0, 4).unbind(0)
    mask = call.get("attn_mask")
    if mask is not None:
        if mask.dtype == torch.bool:  # nn.MultiheadAttention: True = not allowed to attend
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
        if mask.dim() == 3:
            mask = mask.view(B, H, N, N)

    def finish(o: torch.Tensor):
        o = o.permute(2, 0, 1, 3).reshape(N * B, E)
        return F.linear(o, call["out_proj_weight"], call["out_proj_bias"]).view(N, B, E), None

    return q, k, v, mask, finish


class _SDPAIntercept(TorchFunctionMode):
    """While active, answers ``F.scaled_dot_product_attention`` calls with ``handler(layer, *args, **kwargs)``
    (a handler returning None lets SDPA run); an ``nn.MultiheadAttention`` call is turned into its
    self-attention SDPA call first (:func:`mha_self_attention`; ``refuse(layer, why)`` when it cannot be);
    with ``on_softmax``, each softmax result is passed to ``on_softmax(layer, probs)``, whose non-None result
    replaces it. Every other function passes through."""

    def __init__(self, handler, refuse, on_softmax=None):
        super().__init__()
        self.handler = handler
        self.refuse = refuse
        self.on_softmax = on_softmax
        self.layer = -1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            out = self.handler(self.layer, *args, **kwargs)
            if out is not None:
                return out
        elif func is _MHA:
            call = mha_self_attention(args, kwargs)
            if isinstance(call, str):
                self.refuse(self.layer, call)
            else:
                q, k, v, mask, finish = call
                out = self.handler(self.layer, q, k, v, attn_mask=mask)
                return finish(_SDPA(q, k, v, attn_mask=mask) if out is None else out)
        elif self.on_softmax is not None and func in _SOFTMAX:
            probs = func(*args, **kwargs)
            out = self.on_softmax(self.layer, probs)
            return probs if out is None else out
        return func(*args, **kwargs)


class Tap:
    """Temporary hooks on every block's attention (a context manager; all removed on exit).

    ``sdpa(layer, q, k, v, **sdpa_kwargs) -> Tensor | None`` sees the block's SDPA call (with the q and k
    the model really uses: after q/k norm and any rotary embedding; an ``nn.MultiheadAttention`` call as
    the SDPA call it makes) and may answer it (None: SDPA runs); ``on_probs(layer, probs) -> Tensor | None``
    sees the explicit path's probabilities (``probs_at='attn_drop'``: a forward hook on timm's
    ``attn_drop``; ``'softmax'``: each softmax result inside the block, e.g. Hugging Face's eager
    attention) and its result replaces them; bias, mask and RoPE are included. Handlers set ``captured[layer]`` when they took a layer's attention and record in
    ``unsupported[layer]`` why they could not. Only the thread that entered the Tap is tapped.
    """

    def __init__(self, mods: Sequence[nn.Module], *, sdpa=None, on_probs=None, probs_at: str = "attn_drop"):
        self.mods = list(mods)
        self.probs_at = probs_at
        softmax = self._softmax if on_probs is not None and probs_at == "softmax" else None
        self.mode = _SDPAIntercept(sdpa, self._refuse, softmax) if sdpa is not None else None
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

    def _refuse(self, idx, why):
        self.unsupported[idx] = why

    def _softmax(self, idx, probs):
        p = probs if isinstance(probs, torch.Tensor) else None
        if self.captured[idx] or p is None or p.dim() != 4 or p.shape[-1] != p.shape[-2]:
            return None  # not a block's (B, H, N, N) attention, or the block's attention is already taken
        return self.on_probs(idx, probs)

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
                if self.on_probs is not None and self.probs_at == "attn_drop" \
                        and isinstance(getattr(attn, "attn_drop", None), nn.Module):
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
