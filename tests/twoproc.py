"""Run one pretraining in one process and the same one under torchrun with 2 CPU processes (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys

from protoclr.train import cli_main


def pretrain_one_and_two(common: list[str]) -> None:
    """``protoclr pretrain *common`` as run ``one`` (1 process) and run ``two`` (torchrun, 2 processes, DDP)."""
    assert cli_main([*common, "train.run_name=one"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "protoclr.cli", "pretrain", *common, "train.run_name=two", "trainer.devices=2",
           "trainer.strategy=ddp"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
