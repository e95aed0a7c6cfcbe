"""The job queue behind ``protoclr sweep``: claims, heartbeats, a pool of local worker processes, SLURM scripts.

No machine learning here: a run is executed by a function the caller passes in (``protoclr.sweep.execute_run``).

Workers claim runs through the ``sweep_runs`` table of ``runs.db`` (protoclr.runs; one ``BEGIN IMMEDIATE``
transaction per claim). A claim names the worker's host, pid and process start time and is refreshed by a
heartbeat; a claim whose process is gone (or, across hosts, whose heartbeat is older than ``STALE_SECONDS``) is
taken over, so a run left ``running`` by a killed worker is resumed, never duplicated. A run whose workers died
``MAX_ATTEMPTS`` times is recorded as failed.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protoclr import atomic, runs

HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 600.0  # a claim from another host is taken over after this long without a heartbeat
MAX_ATTEMPTS = 3  # claims of one run whose worker died; then the run is recorded as failed


def proc_start(pid: int) -> str:
    """The process's start time (field 22 of /proc/PID/stat), which tells a reused pid apart; "" if unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def alive(row: Any) -> bool:
    """Whether the process named by a claim (``host``, ``pid``, ``pid_start``, ``heartbeat``) still runs."""
    host, pid, pid_start, heartbeat = row["host"], row["pid"], row["pid_start"], row["heartbeat"]
    if pid is None:
        return False
    if host != socket.gethostname():
        return heartbeat is not None and time.time() - heartbeat < STALE_SECONDS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not pid_start or proc_start(pid) == pid_start


def claim(db_path: Path, rid: str, *, retry_failed: bool = False) -> bool:
    """Take run ``rid`` for this process if it is not done and no live process holds it."""
    me = os.getpid()
    return runs.claim_run(db_path, rid, host=socket.gethostname(), pid=me, pid_start=proc_start(me), alive=alive,
                          retry_failed=retry_failed, max_attempts=MAX_ATTEMPTS)


def states(db_path: Path, ids: list[str]) -> dict[str, dict[str, Any]]:
    """run_id -> {state, attempts, message, status (the engine's), alive, ...} for the given runs."""
    return {rid: {**dict(row), "alive": alive(row)} for rid, row in runs.sweep_rows(db_path, ids).items()}


def _heartbeat(db_path: Path, rid: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        try:
            runs.beat(db_path, rid, os.getpid())
        except sqlite3.Error:
            pass  # the next beat retries; a missed one only matters across hosts after STALE_SECONDS


def worker_loop(db_path: Path, ids: list[str], execute: Callable[[Path, str], str], *,
                retry_failed: bool = False) -> int:
    """Claim and ``execute(db_path, rid)`` runs of ``ids`` (it returns ``done`` or ``failed``) until none is left
    to claim; returns how many this worker ran."""
    done = 0
    while True:
        for rid in ids:
            if claim(db_path, rid, retry_failed=retry_failed):
                stop = threading.Event()
                threading.Thread(target=_heartbeat, args=(db_path, rid, stop), daemon=True).start()
                try:
                    state = execute(db_path, rid)
                finally:
                    stop.set()
                runs.release_run(db_path, rid, state, None if state == "done" else "see the runs table")
                done += 1
                break
        else:
            return done


def run_local(db_path: Path, ids: list[str], *, workers: int, retry_failed: bool, log_dir: Path,
              worker_cmd: list[str], watch: Callable[[dict[str, dict[str, Any]], dict[int, Path]], None] | None = None
              ) -> None:
    """``workers`` processes ``worker_cmd + [db_path, plan]`` (each running :func:`worker_loop` over the runs
    listed in ``plan``); a worker that dies is replaced (its run is taken over through the stale claim) while
    claimable runs remain. Threads are split evenly: ``PROTOCLR_THREADS`` and ``OMP_NUM_THREADS`` per worker.

    ``watch(states, logs)`` is called every half second and once after the last worker ends, with
    :func:`states` of ``ids`` and each worker's log file by pid (a claim's ``pid`` names its worker): the parent
    follows the runs through the queue, the workers need no other channel."""
    log_dir.mkdir(parents=True, exist_ok=True)
    plan = log_dir / f"plan-{os.getpid()}.json"
    atomic.write_text(plan, json.dumps(ids))
    threads = max(1, (os.cpu_count() or 1) // workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PROTOCLR_THREADS": str(threads)}
    cmd = [*worker_cmd, str(db_path), str(plan), *(["--retry-failed"] if retry_failed else [])]
    procs: dict[int, subprocess.Popen] = {}
    logs: dict[int, Path] = {}
    started = 0

    def spawn() -> None:
        nonlocal started
        path = log_dir / f"worker-{os.getpid()}-{started}.log"
        with open(path, "ab") as log:
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        procs[p.pid], logs[p.pid] = p, path
        started += 1

    for _ in range(min(workers, len(ids))):
        spawn()
    try:
        while procs:
            time.sleep(0.5)
            if watch is not None:
                watch(states(db_path, ids), logs)
            for pid, p in list(procs.items()):
                if p.poll() is None:
                    continue
                del procs[pid]
                if p.returncode != 0:
                    print(f"worker {pid} exited with {p.returncode}; its run will be taken over", file=sys.stderr)
                    left = [r for r, s in states(db_path, ids).items() if s["state"] == "pending" and not s["alive"]]
                    if left and started < len(ids) * MAX_ATTEMPTS + workers:
                        spawn()
        if watch is not None:
            watch(states(db_path, ids), logs)
    except KeyboardInterrupt:
        for p in procs.values():
            p.terminate()
        raise
    finally:
        plan.unlink(missing_ok=True)


def slurm_scripts(ids: list[str], *, out: Path, job_cmd: list[str], partition: str = "", time_min: int = 240,
                  gpus: int = 1, cpus: int = 10, mem_gb: int = 64, setup: str = "") -> dict[str, str]:
    """One sbatch script per run (file name -> text) running ``job_cmd + [job_dir, rid, trainer.devices=G]``.
    Job ``rid`` writes to its own ``<out>/jobs/<rid>/runs.db`` (no SQLite locking over a network filesystem);
    ``protoclr sweep --merge OUT`` folds them into runs.db."""
    scripts = {}
    for rid in ids:
        job_dir = out / "jobs" / rid
        lines = ["#!/bin/bash", f"#SBATCH --job-name={rid[:64]}", f"#SBATCH --output={job_dir}/slurm-%j.out",
                 f"#SBATCH --time={time_min}", f"#SBATCH --cpus-per-task={cpus}", f"#SBATCH --mem={mem_gb}G",
                 "#SBATCH --nodes=1", "#SBATCH --ntasks=1", "#SBATCH --signal=USR1@120"]
        if gpus:
            lines.append(f"#SBATCH --gres=gpu:{gpus}")
        if partition:
            lines.append(f"#SBATCH --partition={partition}")
        lines += ["set -euo pipefail", f"cd {Path.cwd()}"]
        if setup:
            lines.append(setup)
        lines.append(f"exec {' '.join(job_cmd)} {job_dir} {rid} trainer.devices={gpus or 1}")
        scripts[f"{rid}.sbatch"] = "\n".join(lines) + "\n"
    return scripts


def prepare_jobs(db_path: Path, ids: list[str], *, out: Path) -> None:
    """Each run's ``sweep_runs`` row copied into its job database ``<out>/jobs/<rid>/runs.db``."""
    for rid in ids:
        runs.copy_sweep_rows(db_path, runs.database(out / "jobs" / rid), [rid])


__all__ = ["HEARTBEAT_SECONDS", "MAX_ATTEMPTS", "STALE_SECONDS", "alive", "claim", "prepare_jobs", "proc_start",
           "run_local", "slurm_scripts", "states", "worker_loop"]
