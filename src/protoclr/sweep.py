"""Sweeps: the cartesian product of config overrides times seeds, run by local workers or cluster jobs.

    protoclr sweep configs/cifar10_resnet18.yaml --grid loss.alpha=0.5,1,2,4 --grid loss.lam=0.5,1,2,4 --seeds 3
    protoclr sweep configs/cpu/balance_grid.yaml --workers 2          # a sweep file (below)
    protoclr sweep configs/cpu/balance_grid.yaml --plan               # list the runs and their status, run nothing
    protoclr sweep configs/paper/imagenet_balance_grid.yaml --dry-run # + the engine's 2-step dry run per point
    protoclr sweep configs/paper/imagenet_balance_grid.yaml --submit slurm --out runs/paper   # sbatch scripts
    protoclr sweep --merge runs/paper                                 # fold the jobs' databases into runs.db

A sweep file names its base config and holds only what the sweep changes::

    base: ../fashion_mnist_convnet.yaml   # relative to this file; omit for the built-in defaults
    study: loss_balance                   # what protoclr.report draws (see STUDIES); optional
    seeds: 2                              # train.seed = 0 .. seeds-1
    overrides: {train.epochs: 5}          # applied to every run (section.key: value)
    grid: {loss.alpha: [1, 2, 4], loss.lam: [1, 2, 4]}
    evaluate: {train_images: 10000}       # EvalOptions fields

Every run is a normal ``pretrain`` run (folder ``<out>/<run_id>/``, row in ``<out>/runs.db``) followed by the
evaluation this module adds: per-epoch diagnostics (prototype bias, bound terms) merged into the epoch rows,
then a cached linear probe and weighted kNN merged into the run's final metrics. A run id is
``<sweep>-<point>-s<seed>-<hash>`` where the hash covers the resolved config and the evaluation options, so
the same command finds the same runs: finished (and diverged) ones are skipped, interrupted ones resume from
their checkpoint, failed ones are retried only with ``--retry-failed``.

Workers claim runs through the ``sweep_runs`` table of ``runs.db`` (one ``BEGIN IMMEDIATE`` transaction per
claim). A claim names the worker's host, pid and process start time and is refreshed by a heartbeat; a claim
whose process is gone (or, across hosts, whose heartbeat is older than ``STALE_SECONDS``) is taken over, so a
run left ``running`` by a killed worker is resumed, never duplicated.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from protoclr import atomic
from protoclr.config import Config, ConfigError, apply_overrides, config_from_dict, read_yaml
from protoclr.errors import NotADatabase, UserError
from protoclr.results import ResultsDB, connect, has_schema, transaction

# What protoclr.report draws for a sweep; "" = training curves only.
STUDIES = ("", "loss_balance", "augmentation", "similarity", "class_balance", "bounds", "targets")
SWEEP_FILE_KEYS = ("base", "study", "seeds", "overrides", "grid", "evaluate", "name")
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 600.0  # a claim from another host is taken over after this long without a heartbeat
MAX_ATTEMPTS = 3  # claims of one run whose worker died; then the run is recorded as failed
# Config keys that say where or how a run executes, not what it computes: left out of the run id.
_ID_EXCLUDED = ("train.out_dir", "train.run_name", "data.root", "data.num_workers", "data.download", "trainer")


class SweepError(UserError, ValueError):
    """A malformed sweep (the message names the offending argument or file key)."""


@dataclass(frozen=True)
class EvalOptions:
    """What a sweep measures after (and during) pretraining, beyond the engine's online monitors."""

    linear: bool = True  # cached linear probe (L-BFGS, weight decay picked on 10% of train) on backbone features
    knn: bool = True  # weighted kNN, k=200, T=0.1 (Wu et al. 2018)
    train_images: int = 10000  # train images the final probes fit on (seeded subset; see probe_train_set); 0 = all
    test_images: int = 0  # test images scored; 0 = all
    diagnostics_every: int = 1  # epochs between diagnostics (bias, bound terms) on the probe set; 0 = last only
    probe_images: int = 1000  # held-out images (class-balanced, seeded) for the diagnostics
    probe_views: int = 8  # K augmentations per probe image (the surrogate prototype is their mean)
    batch_size: int = 512  # feature extraction batch


@dataclass(frozen=True)
class Sweep:
    name: str
    base: Path | None  # base config file; None = built-in defaults
    grid: dict[str, list[Any]]  # key -> values, in the order given
    seeds: int
    overrides: list[str] = field(default_factory=list)  # key=value applied to every run, before the grid
    study: str = ""
    evaluate: EvalOptions = field(default_factory=EvalOptions)
    source: str = ""  # the sweep file, or "" for a command-line sweep


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    overrides: list[str]  # everything applied to the base config, in order
    point: dict[str, Any]  # the grid values of this run
    seed: int
    config: dict[str, Any]  # resolved (Config.to_dict())


# ----------------------------------------------------------------------------------------------------------
# parsing


def _split_values(text: str) -> list[str]:
    """Split on commas outside brackets: ``a,[b,c],d`` -> ``["a", "[b,c]", "d"]``."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return out


def _override(key: str, value: Any) -> str:
    """``key=value`` that ``apply_overrides`` parses back to ``value`` (JSON is YAML flow syntax)."""
    if isinstance(value, str) and yaml.safe_load(value) == value and "," not in value:
        return f"{key}={value}"
    return f"{key}={json.dumps(value)}"


def parse_grid_arg(arg: str) -> tuple[str, list[Any]]:
    """``"loss.alpha=0.5,1,2"`` -> ``("loss.alpha", [0.5, 1, 2])``; values are YAML scalars or flow lists."""
    key, sep, raw = arg.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", key):
        raise SweepError(f"--grid {arg!r}: expected section.key=v1,v2,... (e.g. --grid loss.alpha=0.5,1,2)")
    parts = _split_values(raw)
    if not raw.strip() or any(not p.strip() for p in parts):
        raise SweepError(f"--grid {arg!r}: empty value; list the values separated by commas")
    try:
        values = [yaml.safe_load(p) for p in parts]
    except yaml.YAMLError as e:
        raise SweepError(f"--grid {arg!r}: cannot parse a value ({e.__class__.__name__})") from None
    if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
        raise SweepError(f"--grid {arg!r}: a value is repeated")
    return key, values


def _eval_options(values: Any, where: str) -> EvalOptions:
    if not isinstance(values, dict):
        raise SweepError(f"{where}: expected a mapping of {', '.join(f.name for f in fields(EvalOptions))}")
    known = {f.name: f.type for f in fields(EvalOptions)}
    for k, v in values.items():
        if k not in known:
            raise SweepError(f"{where}.{k}: unknown option; choose from {', '.join(known)}")
        if known[k] in ("bool", bool) and not isinstance(v, bool):
            raise SweepError(f"{where}.{k}: expected true or false, got {v!r}")
        if known[k] in ("int", int) and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise SweepError(f"{where}.{k}: expected a non-negative integer, got {v!r}")
    opts = EvalOptions(**values)
    if opts.probe_views < 2 or opts.batch_size < 1:
        raise SweepError(f"{where}: probe_views must be >= 2 and batch_size >= 1")
    return opts


def load_sweep_file(path: str | Path) -> Sweep:
    """A :class:`Sweep` from a YAML sweep file (see the module docstring); ``base`` is relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} does not exist")
    try:
        data = read_yaml(path) or {}
    except ConfigError as e:
        raise SweepError(str(e)) from None
    if not isinstance(data, dict):
        raise SweepError(f"{path}: expected a mapping with keys {', '.join(SWEEP_FILE_KEYS)}")
    unknown = [k for k in data if k not in SWEEP_FILE_KEYS]
    if unknown:
        raise SweepError(f"{path}: unknown key {unknown[0]!r}; a sweep file holds {', '.join(SWEEP_FILE_KEYS)} "
                         "(config values go under overrides: or grid:)")
    base = (path.parent / data["base"]).resolve() if data.get("base") else None
    grid = data.get("grid") or {}
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        raise SweepError(f"{path}: grid must map section.key to a non-empty list of values")
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise SweepError(f"{path}: overrides must map section.key to a value")
    seeds = data.get("seeds", 1)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise SweepError(f"{path}: seeds must be a positive integer, got {seeds!r}")
    sweep = Sweep(name=str(data.get("name") or path.stem), base=base, grid={str(k): v for k, v in grid.items()},
                  seeds=seeds, overrides=[_override(str(k), v) for k, v in overrides.items()],
                  study=str(data.get("study") or ""), evaluate=_eval_options(data.get("evaluate") or {},
                                                                             f"{path}: evaluate"), source=str(path))
    return check_sweep(sweep, where=lambda key: f"{path}: grid.{key}")


def check_sweep(sweep: Sweep, *, where: Any = None) -> Sweep:
    """Validate every key and value against the config (errors name ``where(key)``, default ``--grid key=...``)."""
    where = where or (lambda key: f"--grid {key}={','.join(map(str, sweep.grid[key]))}")
    if sweep.study not in STUDIES:
        raise SweepError(f"{sweep.source or 'sweep'}: study {sweep.study!r} is not one of {', '.join(STUDIES[1:])}")
    if sweep.base is not None and not sweep.base.is_file():
        raise SweepError(f"{sweep.source or 'sweep'}: base config {sweep.base} does not exist")
    base = _base_config(sweep)
    for key, values in sweep.grid.items():
        for v in values:
            try:
                apply_overrides(config_from_dict(base.to_dict()), [_override(key, v)]).validate()
            except ConfigError as e:
                raise SweepError(f"{where(key)}: {e}") from None
    return sweep


def _base_config(sweep: Sweep) -> Config:
    from protoclr.config import load_config

    try:
        return load_config(sweep.base, sweep.overrides)
    except ConfigError as e:
        raise SweepError(f"{sweep.source or sweep.base or 'sweep'}: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# expansion and run ids


def _slug(point: dict[str, Any]) -> str:
    parts = []
    for key, v in point.items():
        text = "+".join(map(str, v)) if isinstance(v, list) else str(v)
        parts.append(f"{key.rsplit('.', 1)[-1]}{text or 'none'}")
    return re.sub(r"[^A-Za-z0-9.+_-]", "", "-".join(parts))[:80]


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    cfg = json.loads(json.dumps(config))
    for key in _ID_EXCLUDED:
        sec, _, name = key.partition(".")
        if name:
            cfg.get(sec, {}).pop(name, None)
        else:
            cfg.pop(sec, None)
    return cfg


def run_id(name: str, point: dict[str, Any], seed: int, config: dict[str, Any], evaluate: EvalOptions) -> str:
    """``<name>-<point>-s<seed>-<hash8>``; the hash covers what the run computes, not where it runs."""
    blob = json.dumps({"config": _identity(config), "evaluate": asdict(evaluate)}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:8]
    slug = _slug(point)
    return f"{name}-{slug + '-' if slug else ''}s{seed}-{digest}"


def expand(sweep: Sweep, *, extra: list[str] | None = None) -> list[RunSpec]:
    """Every (grid point, seed) as a :class:`RunSpec`, points in grid order, seeds innermost.

    ``extra``: overrides applied last (e.g. ``trainer.devices=8``); keys in ``_ID_EXCLUDED`` keep the ids.
    """
    import itertools

    keys = list(sweep.grid)
    runs = []
    for combo in itertools.product(*(sweep.grid[k] for k in keys)):
        point = dict(zip(keys, combo, strict=True))
        for seed in range(sweep.seeds):
            ov = [*sweep.overrides, *(_override(k, v) for k, v in point.items()), f"train.seed={seed}",
                  *(extra or [])]
            try:
                cfg = apply_overrides(config_from_dict(_base_config(replace(sweep, overrides=[])).to_dict()), ov)
                cfg.validate()
            except ConfigError as e:
                raise SweepError(f"{sweep.source or 'sweep'}: point {point}: {e}") from None
            config = cfg.to_dict()
            rid = run_id(sweep.name, point, seed, config, sweep.evaluate)
            runs.append(RunSpec(run_id=rid, overrides=ov, point=point, seed=seed, config=config))
    return runs


# ----------------------------------------------------------------------------------------------------------
# the claims table


def init_db(db_path: str | Path) -> Path:
    """Create ``runs.db`` with every table (the engine's and ``sweep_runs``) in one transaction."""
    db_path = Path(db_path)
    ResultsDB(db_path)
    return db_path


def register(db_path: Path, sweep: Sweep, runs: list[RunSpec], *, command: str) -> None:
    """Insert the sweep's runs as ``pending``; a run already there keeps its row (state, claim, and the
    command that first registered it)."""
    now = time.time()
    with transaction(db_path) as con:
        for r in runs:
            spec = {"config": r.config, "evaluate": asdict(sweep.evaluate), "overrides": r.overrides,
                    "base": str(sweep.base) if sweep.base else None, "source": sweep.source, "command": command}
            con.execute(
                "INSERT INTO sweep_runs (run_id, sweep, study, point, seed, spec, state, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, 'pending', ?) ON CONFLICT(run_id) DO NOTHING",
                (r.run_id, sweep.name, sweep.study, json.dumps(r.point), r.seed, json.dumps(spec), now),
            )


def _proc_start(pid: int) -> str:
    """The process's start time (field 22 of /proc/PID/stat), which tells a reused pid apart; "" if unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(host: str | None, pid: int | None, pid_start: str | None, heartbeat: float | None) -> bool:
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
    return not pid_start or _proc_start(pid) == pid_start


def claim(db_path: Path, rid: str, *, retry_failed: bool = False) -> bool:
    """Take run ``rid`` for this process if it is not done and no live process holds it."""
    me = os.getpid()
    with transaction(db_path) as con:
        row = con.execute("SELECT * FROM sweep_runs WHERE run_id=?", (rid,)).fetchone()
        if row is None or row["state"] == "done" or (row["state"] == "failed" and not retry_failed):
            return False
        if row["pid"] is not None and row["pid"] != me and _alive(row["host"], row["pid"], row["pid_start"],
                                                                  row["heartbeat"]):
            return False
        if row["pid"] is not None and row["attempts"] >= MAX_ATTEMPTS and row["state"] == "pending":
            msg = f"the worker running it died {row['attempts']} times (killed, out of memory?)"
            con.execute("UPDATE sweep_runs SET state='failed', message=?, pid=NULL, updated=? WHERE run_id=?",
                        (msg, time.time(), rid))
            con.execute("UPDATE runs SET status='failed', message=?, updated=? WHERE run_id=? AND status='running'",
                        (msg, time.time(), rid))
            return False
        con.execute("UPDATE sweep_runs SET state='pending', host=?, pid=?, pid_start=?, heartbeat=?,"
                    " attempts=attempts+1, updated=? WHERE run_id=?",
                    (socket.gethostname(), me, _proc_start(me), time.time(), time.time(), rid))
    return True


def reopen_finished(db_path: Path, ids: list[str]) -> int:
    """Mark the done runs among ``ids`` whose training finished as pending again (``--reevaluate``): a worker
    then finds the final checkpoint, trains nothing and records fresh final probes. Returns how many."""
    wanted = set(ids)
    with transaction(db_path) as con:
        todo = [r["run_id"] for r in con.execute(
            "SELECT s.run_id FROM sweep_runs s JOIN runs r ON r.run_id = s.run_id "
            "WHERE s.state='done' AND r.status='finished'") if r["run_id"] in wanted]
        con.executemany("UPDATE sweep_runs SET state='pending', attempts=0, pid=NULL, updated=? WHERE run_id=?",
                        [(time.time(), rid) for rid in todo])
    return len(todo)


def release(db_path: Path, rid: str, state: str, message: str | None = None) -> None:
    with transaction(db_path) as con:
        con.execute("UPDATE sweep_runs SET state=?, message=?, pid=NULL, host=NULL, attempts=0, updated=?"
                    " WHERE run_id=?", (state, message, time.time(), rid))


def _heartbeat(db_path: Path, rid: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        try:
            with transaction(db_path) as con:
                con.execute("UPDATE sweep_runs SET heartbeat=? WHERE run_id=? AND pid=?", (time.time(), rid,
                                                                                          os.getpid()))
        except sqlite3.Error:
            pass  # the next beat retries; a missed one only matters across hosts after STALE_SECONDS


def sweep_states(db_path: Path, ids: list[str]) -> dict[str, dict[str, Any]]:
    """run_id -> {state, attempts, message, status (the engine's), alive} for the given runs."""
    con = connect(db_path)
    try:
        out = {}
        for rid in ids:
            row = con.execute("SELECT s.*, r.status FROM sweep_runs s LEFT JOIN runs r USING (run_id)"
                              " WHERE s.run_id=?", (rid,)).fetchone()
            if row is not None:
                out[rid] = {**dict(row), "alive": _alive(row["host"], row["pid"], row["pid_start"], row["heartbeat"])}
        return out
    finally:
        con.close()


# ----------------------------------------------------------------------------------------------------------
# one run: pretrain (epoch by epoch), diagnostics, final probes


def _device(encoder) -> str:
    """The first GPU when there is one (the encoder is moved there), else the CPU."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    encoder.to(dev)
    return dev


def _diagnostics(encoder, probe_set, spec, cfg: Config, opts: EvalOptions) -> dict[str, float]:
    """Bias, bound terms (at the run's own inverse temperature, nu = 1) and geometry of ``encoder`` on the
    probe set: the flat ``diag_*`` scalars of :func:`protoclr.diagnostics.track`."""
    from protoclr.diagnostics import loss_alpha, track

    return track(encoder, probe_set, spec=spec, views=opts.probe_views, alphas=(loss_alpha(cfg.loss),), nus=(1.0,),
                 seed=cfg.train.seed, batch_size=opts.batch_size, device=_device(encoder))


def _final_probes(encoder, trains: dict[str, Any], test, spec, cfg: Config, opts: EvalOptions) -> dict[str, float]:
    """Weighted kNN and cached linear probe of the backbone, fitted on each of ``trains`` (key: the suffix of
    its metric names, "" for the headline set) and scored on one extraction of ``test``."""
    import torch

    from protoclr.evaluate import extract_features, knn_accuracy, linear_probe_cached
    from protoclr.views import eval_images

    if opts.test_images and opts.test_images < len(test):
        from protoclr.train import held_out_indices  # a seeded draw: the CIFAR-10 copy is stored in class order

        test = test.subset(held_out_indices(len(test), samples=opts.test_images))
    C = len(test.classes)

    def prep(x):
        return eval_images(x, spec)

    def features(data):
        return extract_features(encoder.backbone, data, batch_size=opts.batch_size, preprocess=prep, device=dev)

    dev = _device(encoder)
    f_te, y_te = features(test)
    out: dict[str, float] = {"eval_test_images": float(len(test))}
    fitted = {}
    for suffix, train in trains.items():
        if opts.train_images and opts.train_images < len(train):
            g = torch.Generator().manual_seed(cfg.train.seed + 2)
            train = train.subset(torch.randperm(len(train), generator=g)[: opts.train_images].sort().values)
        out[f"eval_train_images{suffix}"] = float(len(train))
        fitted[suffix] = features(train)
    if not (torch.isfinite(f_te).all() and all(torch.isfinite(f).all() for f, _ in fitted.values())):
        out["eval_nonfinite_features"] = 1.0  # a diverged encoder: no accuracy to report
        return out
    for suffix, (f_tr, y_tr) in fitted.items():
        if opts.knn:
            out[f"eval_knn_top1{suffix}"] = knn_accuracy(f_tr, y_tr, f_te, y_te, num_classes=C, k=min(200, len(f_tr)),
                                                         temperature=0.1)["top1"]
        if opts.linear:
            out[f"eval_linear_top1{suffix}"] = linear_probe_cached(f_tr, y_tr, f_te, y_te, num_classes=C)["top1"]
    return out


def probe_train_set(cfg: Config, split, opts: EvalOptions):
    """The images the final probes fit on, from ``split`` (the training split before ``data.class_profile``):
    the split itself (the pretraining set) unless the run is class-profiled (longtail or uniform); then a
    class-balanced seeded draw of ``opts.train_images`` images (0 = as many as the smallest class allows), so
    that a long-tailed and a uniform run are scored by the same balanced protocol and the comparison measures
    their representations, not an imbalanced classifier."""
    if cfg.data.class_profile == "none":
        return split
    from protoclr.data import uniform_subset

    pool = split
    C = len(pool.classes)
    most = C * int(pool.class_counts(C).min())
    return uniform_subset(pool, total=min(opts.train_images or most, most), seed=cfg.train.seed + 2)


def execute_run(db_path: Path, rid: str) -> str:
    """Pretrain run ``rid`` of ``sweep_runs`` epoch by epoch (resuming its checkpoint), diagnose each epoch,
    probe the result; returns the state recorded (``done`` or ``failed``). The caller holds the claim."""
    from protoclr import checkpoint as ckpt
    from protoclr.data import uniform_subset
    from protoclr.train import TrainingDiverged, class_profiled, load_data, load_run, pretrain

    con = connect(db_path)
    try:
        spec = json.loads(con.execute("SELECT spec FROM sweep_runs WHERE run_id=?", (rid,)).fetchone()["spec"])
    finally:
        con.close()
    opts = EvalOptions(**spec["evaluate"])
    out_dir = db_path.parent
    cfg = config_from_dict(spec["config"])
    cfg.train.out_dir, cfg.train.run_name = str(out_dir), rid
    db = ResultsDB(db_path)
    run_dir = out_dir / rid
    try:
        split, test, view_spec_ = load_data(cfg, class_profile=False)
        train = class_profiled(split, cfg)
        probe_pool = probe_train_set(cfg, split, opts)
        C = len(test.classes)  # a class-balanced probe set: the repulsion bound's log n term assumes one
        probe_set = uniform_subset(test, total=min(opts.probe_images, C * int(test.class_counts(C).min())), seed=0)
        steps_per_epoch = len(train) // cfg.train.batch_size
        cap = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
        every = opts.diagnostics_every
        stops = sorted({min(steps_per_epoch * e, cap) for e in range(every, cfg.train.epochs + 1, every or 1)}
                       | {cap}) if every else [cap]
        ckpt_file = run_dir / "checkpoint.pt"
        done_steps = int(ckpt.load(ckpt_file)["step"]) if ckpt_file.is_file() else 0

        def diagnose_last_epoch() -> None:
            epochs = db.epochs(rid)
            if epochs:
                encoder, _ = load_run(run_dir)
                db.log_epoch(rid, epochs[-1]["epoch"],
                             {**epochs[-1], **_diagnostics(encoder, probe_set, view_spec_, cfg, opts)})

        # A worker killed between an epoch's end and its diagnostics left the checkpoint at that epoch's end.
        epochs = db.epochs(rid) if done_steps else []
        if epochs and "diag_attraction_gap" not in epochs[-1] and epochs[-1].get("step") == done_steps:
            diagnose_last_epoch()
        diverged = None
        for stop in [s for s in stops if s > done_steps]:
            chunk = config_from_dict(cfg.to_dict())
            chunk.train.max_steps = 0 if stop == cap and not cfg.train.max_steps else stop
            try:
                pretrain(chunk)
            except TrainingDiverged as e:
                diverged = str(e)
            diagnose_last_epoch()
            if diverged:
                break
        encoder, _ = load_run(run_dir)  # the last good checkpoint when diverged
        trains = {"": probe_pool}
        if probe_pool is not train:  # the same probes fitted on the (imbalanced) pretraining set, for contrast
            trains["_pretrain_set"] = train
        final = _final_probes(encoder, trains, test, view_spec_, cfg, opts)
        if diverged:
            final = {f"{k}_last_good" if k.startswith("eval_") and k.endswith("top1") else k: v
                     for k, v in final.items()}
        row = db.get_run(rid)
        diag_last = {k: v for k, v in (db.epochs(rid) or [{}])[-1].items() if k.startswith("diag_")}
        db.finish_run(rid, row["status"], {**(row["final_metrics"] or {}), **diag_last, **final},
                      message=row["message"])
        return "done"
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        try:
            row = db.get_run(rid)
        except KeyError:
            db.start_run(rid, config=cfg.to_dict(), run_dir=run_dir)
            row = {"status": "running"}
        if row["status"] != "failed":
            db.finish_run(rid, "failed", {}, message=msg)
        traceback.print_exc()
        return "failed"


def worker_loop(db_path: Path, ids: list[str], *, retry_failed: bool = False) -> int:
    """Claim and execute runs of ``ids`` until none is left to claim; returns how many this worker ran."""
    done = 0
    while True:
        for rid in ids:
            if claim(db_path, rid, retry_failed=retry_failed):
                stop = threading.Event()
                beat = threading.Thread(target=_heartbeat, args=(db_path, rid, stop), daemon=True)
                beat.start()
                try:
                    state = execute_run(db_path, rid)
                finally:
                    stop.set()
                release(db_path, rid, state, None if state == "done" else "see the runs table")
                done += 1
                break
        else:
            return done


# ----------------------------------------------------------------------------------------------------------
# local execution


def run_local(db_path: Path, ids: list[str], *, workers: int, retry_failed: bool, log_dir: Path) -> None:
    """``workers`` processes each running :func:`worker_loop`; a worker that dies is replaced (its run is
    taken over through the stale claim) while claimable runs remain."""
    log_dir.mkdir(parents=True, exist_ok=True)
    plan = log_dir / f"plan-{os.getpid()}.json"
    atomic.write_text(plan, json.dumps(ids))
    threads = max(1, (os.cpu_count() or 1) // workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PROTOCLR_SWEEP_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "protoclr.sweep", "_worker", str(db_path), str(plan)]
    if retry_failed:
        cmd.append("--retry-failed")
    procs: dict[int, subprocess.Popen] = {}
    started = 0

    def spawn() -> None:
        nonlocal started
        log = open(log_dir / f"worker-{os.getpid()}-{started}.log", "ab")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        procs[p.pid] = p
        started += 1

    for _ in range(min(workers, len(ids))):
        spawn()
    try:
        while procs:
            time.sleep(0.5)
            for pid, p in list(procs.items()):
                if p.poll() is None:
                    continue
                del procs[pid]
                if p.returncode != 0:
                    print(f"worker {pid} exited with {p.returncode}; its run will be taken over", file=sys.stderr)
                    states = sweep_states(db_path, ids)
                    left = [r for r, s in states.items() if s["state"] == "pending" and not s["alive"]]
                    if left and started < len(ids) * MAX_ATTEMPTS + workers:
                        spawn()
    except KeyboardInterrupt:
        for p in procs.values():
            p.terminate()
        raise
    finally:
        plan.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------
# cluster submission


def slurm_scripts(runs: list[RunSpec], *, out: Path, partition: str = "", time_min: int = 240, gpus: int = 1,
                  cpus: int = 10, mem_gb: int = 64, setup: str = "") -> dict[str, str]:
    """One sbatch script per run (file name -> text). Job ``rid`` writes to its own ``<out>/jobs/<rid>/runs.db``
    (no SQLite locking over a network filesystem); ``protoclr sweep --merge OUT`` folds them into runs.db."""
    scripts = {}
    for r in runs:
        job_dir = out / "jobs" / r.run_id
        lines = ["#!/bin/bash", f"#SBATCH --job-name={r.run_id[:64]}", f"#SBATCH --output={job_dir}/slurm-%j.out",
                 f"#SBATCH --time={time_min}", f"#SBATCH --cpus-per-task={cpus}", f"#SBATCH --mem={mem_gb}G",
                 "#SBATCH --nodes=1", "#SBATCH --ntasks=1", "#SBATCH --signal=USR1@120"]
        if gpus:
            lines.append(f"#SBATCH --gres=gpu:{gpus}")
        if partition:
            lines.append(f"#SBATCH --partition={partition}")
        lines += ["set -euo pipefail", f"cd {Path.cwd()}"]
        if setup:
            lines.append(setup)
        lines.append(f"exec {sys.executable} -m protoclr.sweep _job {job_dir} {r.run_id} "
                     f"trainer.devices={gpus or 1}")
        scripts[f"{r.run_id}.sbatch"] = "\n".join(lines) + "\n"
    return scripts


def prepare_jobs(db_path: Path, runs: list[RunSpec], *, out: Path) -> None:
    """Copy each run's ``sweep_runs`` row into its job database ``<out>/jobs/<rid>/runs.db``."""
    src = connect(db_path)
    try:
        for r in runs:
            row = dict(src.execute("SELECT * FROM sweep_runs WHERE run_id=?", (r.run_id,)).fetchone())
            job_db = init_db(out / "jobs" / r.run_id / "runs.db")
            with transaction(job_db) as con:
                cols = ", ".join(row)
                con.execute(f"INSERT OR REPLACE INTO sweep_runs ({cols}) VALUES ({', '.join('?' * len(row))})",
                            tuple(row.values()))
    finally:
        src.close()


def merge_databases(target: Path, sources: list[Path]) -> int:
    """Fold ``runs``, ``epochs`` and ``sweep_runs`` rows of ``sources`` into ``target`` (a row replaces the
    target's when its ``updated`` time is newer); returns how many runs were merged."""
    init_db(target)
    merged = 0
    for s in sources:
        probe = connect(s)
        try:
            if not has_schema(probe):
                raise NotADatabase(f"{s} holds no protoclr tables; remove it or rerun its job")
        except sqlite3.DatabaseError:
            raise NotADatabase(f"{s} is not an SQLite database; remove it or rerun its job") from None
        finally:
            probe.close()
        con = connect(target)
        try:
            con.execute("ATTACH DATABASE ? AS src", (str(s),))
            con.execute("BEGIN IMMEDIATE")
            try:
                newer = [r[0] for r in con.execute(
                    "SELECT s.run_id FROM src.runs s LEFT JOIN main.runs m USING (run_id)"
                    " WHERE m.run_id IS NULL OR s.updated > m.updated")]
                for rid in newer:
                    con.execute("INSERT OR REPLACE INTO main.runs SELECT * FROM src.runs WHERE run_id=?", (rid,))
                    con.execute("DELETE FROM main.epochs WHERE run_id=?", (rid,))
                    con.execute("INSERT INTO main.epochs SELECT * FROM src.epochs WHERE run_id=?", (rid,))
                    con.execute("INSERT OR REPLACE INTO main.sweep_runs SELECT * FROM src.sweep_runs"
                                " WHERE run_id=?", (rid,))
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            merged += len(newer)
            con.execute("DETACH DATABASE src")
        finally:
            con.close()
    return merged


# ----------------------------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="protoclr sweep",
        description="Run the cartesian product of --grid overrides x seeds as pretraining + evaluation runs "
        "recorded in OUT/runs.db. Re-running the same command skips finished runs and resumes interrupted ones.",
        epilog="Grid values are YAML scalars or flow lists: --grid data.view_modifiers=[],[no_blur] "
        "--grid loss.name=balanced,generalized_nt_xent. Sweep files: see docs/experiments.md.")
    p.add_argument("config", nargs="?", help="a sweep file (with grid:) or a base config (then use --grid)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="repeatable")
    p.add_argument("--seeds", type=int, help="seeds per point, train.seed = 0..N-1 (sweep file default, else 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every run after the grid (e.g. trainer.devices=8)")
    p.add_argument("--name", help="sweep name, the run id prefix (default: the file's stem)")
    p.add_argument("--out", help="where run folders and runs.db go (default: runs/sweeps/<name>)")
    p.add_argument("--workers", type=int, default=1, help="local worker processes (CPU threads are split)")
    p.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    p.add_argument("--reevaluate", action="store_true",
                   help="score finished runs again with the current evaluation code (final probes; no training: "
                   "each resumes at its last checkpoint); diverged and failed runs are left as they are")
    p.add_argument("--plan", action="store_true", help="list the runs and their status; run nothing")
    p.add_argument("--dry-run", action="store_true",
                   help="validate every run and do the engine's 2-step dry run (full model, fake data) once per "
                   "distinct data / model / loss / similarity")
    p.add_argument("--submit", choices=("slurm",), help="write one sbatch script per pending run instead of running")
    p.add_argument("--slurm-partition", default="")
    p.add_argument("--slurm-time", type=int, default=240, help="minutes per job")
    p.add_argument("--slurm-gpus", type=int, default=1)
    p.add_argument("--slurm-cpus", type=int, default=10)
    p.add_argument("--slurm-setup", default="", help="shell line run before the job (e.g. 'source .venv/bin/activate')")
    p.add_argument("--merge", metavar="OUT", help="merge OUT/jobs/*/runs.db into OUT/runs.db and exit")
    return p


def build_sweep(args: argparse.Namespace) -> Sweep:
    """The sweep an argument list describes (a sweep file, or a base config plus --grid/--seeds)."""
    if args.config is None:
        raise SweepError("name a sweep file or a base config (or use --merge OUT)")
    path = Path(args.config)
    if not path.is_file():
        raise SweepError(f"{path} does not exist")
    try:
        raw = read_yaml(path)
    except ConfigError as e:
        raise SweepError(str(e)) from None
    is_sweep_file = isinstance(raw, dict) and "grid" in raw
    sweep = load_sweep_file(path) if is_sweep_file else Sweep(name=path.stem, base=path.resolve(), grid={}, seeds=1)
    grid = dict(sweep.grid)
    for arg in args.grid:
        key, values = parse_grid_arg(arg)
        if key in grid and not is_sweep_file:
            raise SweepError(f"--grid {arg!r}: {key} is given twice")
        try:
            base = _base_config(sweep)
            for v in values:
                apply_overrides(config_from_dict(base.to_dict()), [_override(key, v)]).validate()
        except ConfigError as e:
            raise SweepError(f"--grid {arg!r}: {e}") from None
        grid[key] = values
    for item in args.set:
        try:
            apply_overrides(config_from_dict(_base_config(sweep).to_dict()), [item]).validate()
        except ConfigError as e:
            raise SweepError(f"--set {item!r}: {e}") from None
    if args.seeds is not None and args.seeds < 1:
        raise SweepError(f"--seeds {args.seeds}: must be >= 1")
    return replace(sweep, grid=grid, seeds=args.seeds or sweep.seeds, name=args.name or sweep.name)


def _print_plan(runs: list[RunSpec], states: dict[str, dict[str, Any]]) -> None:
    for r in runs:
        s = states.get(r.run_id, {})
        status = s.get("status") or "new"
        state = s.get("state", "pending")
        print(f"  {r.run_id:<60} {state:<8} {status:<12} {' '.join(r.overrides[-len(r.point) - 1:])}")


def cli_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.merge:
        out = Path(args.merge)
        sources = sorted(out.glob("jobs/*/runs.db"))
        n = merge_databases(out / "runs.db", sources)
        print(f"merged {n} runs from {len(sources)} job databases into {out / 'runs.db'}")
        return 0
    sweep = build_sweep(args)  # user errors reach protoclr.cli, which prints them as one line
    runs = expand(sweep, extra=args.set)
    if args.workers < 1:
        raise SweepError(f"--workers {args.workers}: must be >= 1")
    out = Path(args.out or f"runs/sweeps/{sweep.name}")
    points = len(runs) // sweep.seeds
    print(f"sweep {sweep.name}: {points} point(s) x {sweep.seeds} seed(s) = {len(runs)} runs -> {out}/runs.db")
    if args.dry_run:
        from protoclr.train import pretrain

        seen = set()
        for r in runs:  # one per code path: data, model, loss and similarity (grid values only rescale)
            c = r.config
            key = json.dumps([c["data"], c["model"], c["loss"]["name"], c["loss"]["similarity"]], sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            cfg = config_from_dict(r.config)
            t0 = time.perf_counter()
            pretrain(cfg, dry_run=True)
            print(f"  dry run ok ({time.perf_counter() - t0:.0f} s): {r.run_id}")
        return 0
    db_path = init_db(out / "runs.db")
    command = " ".join(["protoclr", "sweep", *(a for a in argv if a not in ("--plan", "--retry-failed",
                                                                            "--reevaluate"))])
    register(db_path, sweep, runs, command=command)
    ids = [r.run_id for r in runs]
    if args.plan:
        _print_plan(runs, sweep_states(db_path, ids))
        return 0
    if args.reevaluate:
        print(f"re-evaluating {reopen_finished(db_path, ids)} finished run(s)")
    if args.submit:
        states = sweep_states(db_path, ids)
        todo = [r for r in runs if states[r.run_id]["state"] == "pending"
                or (args.retry_failed and states[r.run_id]["state"] == "failed")]
        prepare_jobs(db_path, todo, out=out)
        scripts = slurm_scripts(todo, out=out, partition=args.slurm_partition, time_min=args.slurm_time,
                                gpus=args.slurm_gpus, cpus=args.slurm_cpus, setup=args.slurm_setup)
        for name, text in scripts.items():
            atomic.write_text(out / "slurm" / name, text)
        submit = "\n".join(f"sbatch {out / 'slurm' / n}" for n in scripts)
        atomic.write_text(out / "slurm" / "submit_all.sh", "#!/bin/bash\nset -e\n" + submit + "\n")
        print(f"wrote {len(scripts)} sbatch scripts to {out / 'slurm'}; submit with `bash "
              f"{out / 'slurm' / 'submit_all.sh'}`, then `protoclr sweep --merge {out}`")
        return 0
    run_local(db_path, ids, workers=args.workers, retry_failed=args.retry_failed, log_dir=out / "logs")
    states = sweep_states(db_path, ids)
    counts: dict[str, int] = {}
    for s in states.values():
        key = s["status"] if s["state"] == "done" else s["state"]
        counts[key] = counts.get(key, 0) + 1
    print("done: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    failed = [rid for rid, s in states.items() if s["state"] == "failed"]
    for rid in failed:
        print(f"  failed: {rid}: {states[rid].get('message')}", file=sys.stderr)
    return 1 if failed else 0


def _internal_main(argv: list[str]) -> int:
    """``_worker DB PLAN [--retry-failed]`` (a local worker) and ``_job JOB_DIR RUN_ID [overrides]`` (a cluster
    job: one run in its own database)."""
    threads = os.environ.get("PROTOCLR_SWEEP_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    if argv[0] == "_worker":
        ids = json.loads(Path(argv[2]).read_text())
        worker_loop(Path(argv[1]), ids, retry_failed="--retry-failed" in argv)
        return 0
    if argv[0] == "_job":
        job_db = init_db(Path(argv[1]) / "runs.db")
        rid, extra = argv[2], argv[3:]
        if extra:  # e.g. trainer.devices from the job's allocation; not part of the run id
            with transaction(job_db) as con:
                spec = json.loads(con.execute("SELECT spec FROM sweep_runs WHERE run_id=?", (rid,)).fetchone()[0])
                spec["config"] = apply_overrides(config_from_dict(spec["config"]), extra).to_dict()
                con.execute("UPDATE sweep_runs SET spec=? WHERE run_id=?", (json.dumps(spec), rid))
        worker_loop(job_db, [rid])
        return 0
    raise SystemExit(f"unknown internal command {argv[0]!r}")


__all__ = ["STUDIES", "EvalOptions", "RunSpec", "Sweep", "SweepError", "check_sweep", "claim", "cli_main",
           "execute_run", "expand", "init_db", "load_sweep_file", "merge_databases", "parse_grid_arg", "register",
           "release", "run_id", "run_local", "slurm_scripts", "sweep_states", "worker_loop"]

if __name__ == "__main__":
    sys.exit(_internal_main(sys.argv[1:]))
