"""Which arithmetic a device runs fast: the one owner of ``precision="auto"``, for training and inference alike.

    precision = resolve_precision("auto", "cpu")          # "bf16-mixed" on a CPU with bf16 units, else "32-true"
    with autocast("cpu", precision):                      # bf16 matmuls / convolutions under bf16-mixed
        h = backbone(x.contiguous(memory_format=torch.channels_last))
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

# the precisions inference understands (Fabric's names; training accepts any Fabric precision string)
PRECISIONS = ("auto", "bf16-mixed", "32-true")


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX tiles or AVX512-BF16), where bf16 autocast
    runs a convnet about twice as fast as float32; elsewhere bf16 is emulated and slower."""
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported())
    except AttributeError:  # an older torch without the probes
        return False


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``precision`` with ``"auto"`` resolved: ``"bf16-mixed"`` on a GPU or a CPU with bf16 units, else
    ``"32-true"``; any other string is returned unchanged."""
    if precision != "auto":
        return precision
    on_gpu = str(device).split(":")[0] in ("cuda", "gpu")
    return "bf16-mixed" if on_gpu or cpu_has_bf16() else "32-true"


def autocast(device: str | torch.device, precision: str) -> Any:
    """The autocast context of ``precision`` (one of :data:`PRECISIONS`) on ``device``: bf16 under
    ``"bf16-mixed"`` (``"auto"`` resolved first), a no-op under ``"32-true"``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    if resolve_precision(precision, device) == "32-true":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


__all__ = ["PRECISIONS", "autocast", "cpu_has_bf16", "resolve_precision"]
