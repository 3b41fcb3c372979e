"""Which device a command computes on: `--device auto|cpu|cuda` (auto: a CUDA GPU when torch
sees one, else the CPU), checked once, with the one error a user can act on."""

from __future__ import annotations

import torch

from calibration.errors import OptionError

AUTO = "auto"
DEVICES = (AUTO, "cpu", "cuda")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """torch.device for "auto" (or None), "cpu", "cuda" or "cuda:N"; an OptionError for any
    other, and for cuda where torch sees no CUDA device."""
    if device is None or device == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise OptionError(f"--device must be one of {', '.join(DEVICES)}; got {device!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "torch.cuda.is_available() is False"
        raise OptionError(f"--device {device}: no CUDA device here ({why}); use --device cpu or auto")
    return resolved


def device_name(device: torch.device) -> str:
    """'cpu', or 'cuda:0 (NVIDIA H100 80GB HBM3)': what a report says it ran on."""
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)
