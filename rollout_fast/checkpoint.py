"""Atomic, safe checkpoint I/O shared by the training commands, and the output-folder checks of every writer.

Writes go to a temporary file in the target folder followed by ``os.replace``, so an interrupted
write never leaves a truncated checkpoint. Reads never unpickle code: safetensors files, or
``torch.load(..., weights_only=True)``. :func:`check_output_dir` checks, before any compute, that an output
folder can be written and holds no earlier outputs of the command (unless they are to be overwritten);
:func:`remove_outputs` then removes those, so a folder always matches what the command last wrote.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = [
    "UnsafeCheckpointError",
    "atomic_write",
    "check_output_dir",
    "check_writable_dir",
    "load_training_state",
    "load_weights",
    "remove_outputs",
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


def check_writable_dir(path: str | os.PathLike, what: str = "out") -> Path:
    """Check that ``path`` is a writable folder, or can be created as one; creates nothing.

    The nearest existing folder on the way to ``path`` gets a probe file (created and removed at once).

    Raises:
        NotADirectoryError: ``path`` or one of its parents is a file.
        PermissionError: the folder (or the parent it would be created in) cannot be written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what}: {str(path)!r} is a file, not a folder")
    anchor = path
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise NotADirectoryError(f"{what}: cannot create folder {str(path)!r}: {str(anchor)!r} is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=anchor)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"{what}: cannot write in {str(anchor)!r} ({e.strerror or e})") from None
    return path


def check_output_dir(out: str | os.PathLike, outputs, *, overwrite: bool = False, what: str = "out",
                     hint: str = "overwrite=True (--overwrite)") -> list[Path]:
    """Check an output folder before any compute: writable (:func:`check_writable_dir`) and free of the
    command's earlier outputs unless ``overwrite``. Creates and removes nothing.

    Args:
        out: the output folder.
        outputs: the command's outputs, as glob patterns relative to ``out`` (e.g. ``"overlays/*.png"``).
        overwrite: allow earlier outputs (remove them with :func:`remove_outputs` before writing).

    Returns:
        The earlier outputs found (empty when there are none), for :func:`remove_outputs`.

    Raises:
        NotADirectoryError / PermissionError: see :func:`check_writable_dir`.
        FileExistsError: earlier outputs are present and ``overwrite`` is False (the message names them).
    """
    out = check_writable_dir(out, what)
    earlier = sorted({p for pattern in outputs for p in out.glob(pattern) if p.is_file()}) if out.is_dir() else []
    if earlier and not overwrite:
        names = sorted({str(p.relative_to(out).parts[0]) for p in earlier})
        raise FileExistsError(f"{what}: {str(out)!r} holds an earlier run ({', '.join(names)}); pass {hint} "
                              "to replace it, or choose another folder")
    return earlier


def remove_outputs(out: str | os.PathLike, paths) -> None:
    """Remove the earlier outputs ``paths`` that :func:`check_output_dir` found in ``out``, and the
    sub-folders of ``out`` they leave empty (``out`` itself stays)."""
    out = Path(out).resolve()
    folders = set()
    for p in paths:
        p = Path(p)
        p.unlink(missing_ok=True)
        folders.add(p.parent.resolve())
    for d in sorted(folders, key=lambda d: len(d.parts), reverse=True):
        if d != out and out in d.parents and d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    def _w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    return atomic_write(path, _w)


class UnsafeCheckpointError(ValueError):
    """A torch file that holds pickled Python objects besides tensors, which ``weights_only`` loading refuses
    (reading it would run code from the file)."""


def _refusal(path: Path, what: str) -> UnsafeCheckpointError:
    target = path.with_suffix(".safetensors")
    return UnsafeCheckpointError(
        f"{what}: {str(path)!r} is not a safe checkpoint: it holds pickled Python objects besides tensors, and "
        "rollout_fast never runs code from a file. If you trust its source, convert it once to safetensors: "
        "python -c \"import torch; from safetensors.torch import save_file; "
        f"sd = torch.load('{path}', map_location='cpu', weights_only=False); "
        "sd = sd.get('state_dict', sd.get('model', sd)); "
        f"save_file({{k: v.contiguous() for k, v in sd.items()}}, '{target}')\" and pass {str(target)!r}")


def _torch_load(path: Path, what: str):
    """``torch.load(path, weights_only=True)`` on the CPU.

    Raises:
        UnsafeCheckpointError: the file holds pickled objects that weights_only loading refuses.
        ValueError: the file is corrupt or not a torch file.
    """
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol of a file it then refuses
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise _refusal(path, what) from e
        raise ValueError(f"{what}: {str(path)!r} is corrupt or not a torch file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from e
    except Exception as e:  # torch raises several types for truncated / foreign files
        raise ValueError(f"{what}: {str(path)!r} is corrupt or not a torch file ({type(e).__name__}: {e})") from e


def save_training_state(path: str | os.PathLike, state: dict) -> Path:
    """Save a resumable training state (tensors, numbers, strings, nested dicts), atomically."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: str | os.PathLike) -> dict:
    """Load a state written by :func:`save_training_state` with ``weights_only=True``.

    Raises:
        FileNotFoundError: no file at ``path``.
        UnsafeCheckpointError (a ValueError): the file holds pickled objects ``weights_only`` refuses.
        ValueError: the file is corrupt or not a training state.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {str(path)!r}")
    state = _torch_load(path, "resume")
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
        UnsafeCheckpointError (a ValueError): a torch file with pickled objects ``weights_only`` refuses; the
            message says how to convert a trusted one to safetensors.
        ValueError: unreadable file, or no state dict inside.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no file at {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise ValueError(f"checkpoint: cannot read {str(path)!r} safely ({type(e).__name__}: {e})") from e
    obj = _torch_load(path, "checkpoint")
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint: {str(path)!r} holds no model state dict")
    return obj
