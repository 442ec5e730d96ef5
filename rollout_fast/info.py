"""``python -m rollout_fast.info``: versions, available backends, and where the embedded teacher is."""

from __future__ import annotations

import platform
import sys


def collect() -> dict:
    """Return a dict of versions, devices, rollout backends (and each op's backends) and embedded-model locations."""
    import torch

    from . import __version__
    from .ops import available_backends, registry
    from .zoo import EMBEDDED_TEACHERS, teacher_card

    info = {
        "rollout_fast": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "backends": available_backends(),
        "op_backends": {op: registry.available(op) for op in registry.AUTO_ORDER},
    }
    for mod in ("timm", "triton", "safetensors", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # optional or broken install: report, don't fail
            info[mod] = f"not available ({type(e).__name__})"
    teachers = {}
    for name, base in EMBEDDED_TEACHERS.items():
        weights = base.with_suffix(".safetensors")
        try:
            acc = teacher_card(name).get("test_top1")
        except FileNotFoundError:
            acc = None
        teachers[name] = {"weights": str(weights), "present": weights.is_file(), "test_top1": acc}
    info["embedded_teachers"] = teachers
    return info


def main() -> None:
    for key, value in collect().items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
