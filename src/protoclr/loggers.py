"""Experiment loggers: the ``trainer.loggers`` table (Lightning Fabric loggers writing into a run folder).

    loggers = [LOGGERS[name](run_dir) for name in cfg.trainer.loggers]

tensorboard and csv come with Lightning; wandb and mlflow need their extras (``pip install 'protoclr[wandb]'``),
checked when the logger is built, not when the config is validated: a run logged to W&B must still load
(evaluate, export) where wandb is not installed. ``protoclr.config`` validates the names against :data:`LOGGERS`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protoclr import extras


def _tensorboard(run_dir: Path) -> Any:
    from lightning.fabric.loggers import TensorBoardLogger

    # no hp_metric placeholder scalar next to the hyperparameters
    return TensorBoardLogger(root_dir=run_dir, name="tensorboard", version="", default_hp_metric=False)


def _csv(run_dir: Path) -> Any:
    from lightning.fabric.loggers import CSVLogger

    # one csv/version_N per launch: the CSV logger rewrites an existing file, so a resume gets its own
    return CSVLogger(root_dir=run_dir, name="csv")


def _wandb(run_dir: Path) -> Any:
    extras.require("wandb", why="trainer.loggers=wandb")
    from lightning.pytorch.loggers import WandbLogger  # Fabric takes Lightning's loggers; it has no W&B one

    # offline (no account, no network; `wandb sync <run>/wandb/offline-run-*` uploads later) unless the user
    # chose a mode or gave a key
    offline = not (os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"))

    class Logger(WandbLogger):
        def finalize(self, status: str) -> None:
            super().finalize(status)
            if self._experiment is not None:  # else the next run in this process would join this one
                self._experiment.finish(exit_code=0 if status == "success" else 1)

    return Logger(save_dir=str(run_dir), name=run_dir.name, offline=offline,
                  project=os.environ.get("WANDB_PROJECT", "protoclr"))


def _mlflow(run_dir: Path) -> Any:
    extras.require("mlflow", why="trainer.loggers=mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    # MLflow 3 refuses its plain-file store; a SQLite file in the run folder is the local store that needs no server
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
    return MLFlowLogger(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "protoclr"), run_name=run_dir.name,
                        tracking_uri=uri, artifact_location=(run_dir.resolve() / "mlartifacts").as_uri())


# trainer.loggers name -> constructor(run_dir); protoclr.config validates trainer.loggers against it
LOGGERS: dict[str, Callable[[Path], Any]] = {"tensorboard": _tensorboard, "csv": _csv, "wandb": _wandb,
                                             "mlflow": _mlflow}


__all__ = ["LOGGERS"]
