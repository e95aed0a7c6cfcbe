"""Atomic file writes: every result, cache and checkpoint file is either the old one or the complete new one.

Each writer goes to a temporary file in the target's folder, is flushed and fsynced, then renamed over the
final name with ``os.replace`` (atomic on POSIX and Windows); a failure removes the temporary file and
re-raises. Readers therefore never see a half-written file, whatever kills the writer.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def _mode_for(path: Path) -> int:
    """The permission bits of an existing ``path``, else ``0o666`` less the process umask."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def _write_via(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, _mode_for(path))  # mkstemp makes 0600; the result gets what a plain open() would give
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some filesystems (and Windows) cannot fsync a directory


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _write_via(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def json_clean(value: Any) -> Any:
    """``value`` with non-finite floats as ``None`` (strict JSON has no NaN / Infinity) and string keys."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_clean(v) for v in value]
    return value


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Strict JSON (non-finite numbers as null), indented, newline-terminated."""
    write_text(path, json.dumps(json_clean(obj), indent=2, allow_nan=False) + "\n")


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` atomically; load it back with ``torch.load(..., weights_only=True)``."""
    _write_via(path, lambda f: torch.save(obj, f))
