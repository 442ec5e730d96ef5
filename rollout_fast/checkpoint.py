"""Atomic, safe checkpoint I/O shared by the training commands.

Writes go to a temporary file in the target folder followed by ``os.replace``, so an interrupted
write never leaves a truncated checkpoint. Reads never unpickle code: safetensors files, or
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

__all__ = [
    "atomic_write",
    "load_training_state",
    "load_weights",
    "save_training_state",
    "save_weights",
    "write_json",
]


def atomic_write(path: str | os.PathLike, write_fn) -> Path:
    """Call ``write_fn(tmp_path)`` then atomically move ``tmp_path`` onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are ordinary files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    def _w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    return atomic_write(path, _w)


def save_training_state(path: str | os.PathLike, state: dict) -> Path:
    """Save a resumable training state (tensors, numbers, strings, nested dicts), atomically."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: str | os.PathLike) -> dict:
    """Load a state written by :func:`save_training_state` with ``weights_only=True``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is corrupt or not a training state.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated / foreign files
        raise ValueError(f"resume: {str(path)!r} is corrupt or not a rollout_fast checkpoint "
                         f"({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise ValueError(f"resume: {str(path)!r} is not a rollout_fast training checkpoint")
    return state


def save_weights(path: str | os.PathLike, state_dict: dict, metadata: dict | None = None) -> Path:
    """Save a model ``state_dict`` as safetensors (contiguous CPU copies), atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_weights(path: str | os.PathLike) -> dict:
    """Load a model state dict from safetensors, or from a torch file with ``weights_only=True``.

    A torch file may hold the state dict itself or a dict with a ``"model"``/``"state_dict"`` key.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: unreadable file, or no state dict inside.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no file at {str(path)!r}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint: cannot read {str(path)!r} safely "
                         f"({type(e).__name__}: {e})") from e
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint: {str(path)!r} holds no model state dict")
    return obj
