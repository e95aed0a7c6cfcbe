"""Optional dependencies: which ``pip install 'protoclr[EXTRA]'`` brings which package, and the one way to import
them, so that a missing one is a one-line user error naming the extra instead of a traceback.

    timm = require("timm", why="model.backbone=timm/vit_tiny_patch16_224")

The extras themselves are listed in ``pyproject.toml`` (``[project.optional-dependencies]``); a test checks that
every entry of :data:`EXTRAS` names one that lists its package.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from protoclr.errors import MissingExtra

# import name -> the protoclr extra that installs it
EXTRAS: dict[str, str] = {
    "timm": "timm",
    "safetensors": "export",
    "onnx": "export",
    "onnxscript": "export",
    "onnxruntime": "export",
    "wandb": "wandb",
    "mlflow": "mlflow",
}


def require(module: str, *, why: str) -> ModuleType:
    """``module`` imported, or :class:`~protoclr.errors.MissingExtra` naming ``why`` it is needed and the extra."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:  # the package is there but one of its own dependencies is not: not ours to name
            raise
        raise MissingExtra(f"{why} needs the {module} package, which is not installed: "
                           f"pip install 'protoclr[{EXTRAS[module]}]'") from None


__all__ = ["EXTRAS", "require"]
