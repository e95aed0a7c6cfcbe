"""Atomic checkpoint files and the RNG state that makes a resumed run bit-identical.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over the final
name with ``os.replace`` (atomic on POSIX and Windows): a crash at any point leaves either the previous
checkpoint or the new one under ``checkpoint.pt``, never a half-written file. Loading always uses
``torch.load(..., weights_only=True)``, so a checkpoint holds only tensors and plain Python containers.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from protoclr import atomic
from protoclr.errors import NotACheckpoint


def atomic_save(obj: dict[str, Any], path: str | Path) -> None:
    """``torch.save(obj, path)`` such that ``path`` is always either the old file or the complete new one."""
    atomic.torch_save(obj, path)


REQUIRED_KEYS = ("model", "config", "in_channels")


def load(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by :func:`atomic_save` (tensors and containers only: ``weights_only=True``).

    Raises :class:`~protoclr.errors.NotACheckpoint` naming ``path`` for a missing file, a file torch cannot
    read, or a readable file that lacks a protoclr checkpoint's keys."""
    path = Path(path)
    if not path.is_file():
        raise NotACheckpoint(f"{path}: no such checkpoint file; pass a run folder holding checkpoint.pt or the file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors all mean "not one of ours"
        raise NotACheckpoint(f"{path} is not a protoclr checkpoint (torch cannot read it as a weights-only file: "
                             f"{type(e).__name__}); pass the checkpoint.pt of a run") from e
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise NotACheckpoint(f"{path} is a torch file but not a protoclr checkpoint (it lacks "
                             f"{', '.join(REQUIRED_KEYS)}); pass the checkpoint.pt of a run")
    return state


def rng_state() -> dict[str, Any]:
    """Python, torch CPU and (where present) CUDA generator states, all ``weights_only``-loadable."""
    version, state, gauss = random.getstate()
    out: dict[str, Any] = {"python": [version, list(state), gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    version, inner, gauss = state["python"]
    random.setstate((version, tuple(inner), gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
