"""Which device a model runs on: one setting (``auto`` | ``cpu`` | ``cuda[:n]``) for every model.

``auto`` takes the first CUDA device when there is one, else the CPU. The setting comes from an
explicit argument, else ``MATLOOP_DEVICE`` (so a work pool's or a deployment's job variables can
set it), else ``auto``: an explicit ``auto`` also defers to ``MATLOOP_DEVICE``, so a deployment can pin
the CPU for models whose configs say ``auto``. :func:`device_label` is what the jobs and models rows record.
"""

from __future__ import annotations

import torch

from core.settings import get_settings


def resolve_device(name: str | None = None) -> torch.device:
    """The torch device for a setting (None or ``auto``: ``MATLOOP_DEVICE``). Raises for CUDA where there is none."""
    if not name or name.strip().lower() == "auto":
        name = get_settings().device
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:<n>") from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:<n>")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def device_label(device: torch.device | str) -> str:
    """``cpu`` or ``cuda:0 (NVIDIA H200)``: the device and, for a GPU, its name."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
