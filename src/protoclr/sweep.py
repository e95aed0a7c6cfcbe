"""Sweeps: the cartesian product of config overrides times seeds, each run a pretraining plus final probes.

    protoclr sweep configs/cifar10_resnet18.yaml --grid loss.alpha=0.5,1,2,4 --grid loss.lam=0.5,1,2,4 --seeds 3
    protoclr sweep configs/cpu/balance.yaml --workers 2               # a sweep file (below)
    protoclr sweep configs/cpu/balance.yaml --plan                    # list the runs and their status, run nothing
    protoclr sweep configs/paper/imagenet_balance_grid.yaml --dry-run # + the engine's 2-step dry run per point
    protoclr sweep configs/paper/imagenet_balance_grid.yaml --submit slurm --out runs/paper   # sbatch scripts
    protoclr sweep --merge runs/paper                                 # fold the jobs' databases into runs.db

A sweep file names its base config and holds only what the sweep changes::

    base: ../fashion_mnist_convnet.yaml   # relative to this file; omit for the built-in defaults
    study: loss_balance                   # what protoclr.report draws (see STUDIES); optional
    seeds: 2                              # train.seed = 0 .. seeds-1
    overrides: {train.epochs: 5, eval.diagnostics: true}   # applied to every run (section.key: value)
    grid: {loss.alpha: [1, 2, 4], loss.lam: [1, 2, 4]}

A grid key without a dot names a list of override sets applied together, for points that are not a product:
``grid: {loss.name: [balanced, generalized_nt_xent], point: [{loss.alpha: 2, loss.lam: 1}, {loss.alpha: 4,
loss.lam: 2}]}`` is 2 x 2 points, each set's keys recorded in the point as if they were grid keys.

A run is ``protoclr.train.pretrain`` (folder ``<out>/<run_id>/``, row in ``<out>/runs.db``; per-epoch
measurements, diagnostics included, come from the loop as the ``eval`` config says) followed by
``protoclr.measure.final_metrics`` (weighted kNN and the cached linear probe, merged into the run's final
metrics). A run id is ``<sweep>-<point>-s<seed>-<hash>`` where the hash covers the resolved config, so the same
command finds the same runs: finished (and diverged) ones are skipped, interrupted ones resume from their
checkpoint, failed ones are retried only with ``--retry-failed``. The queue (claims, heartbeats, workers, SLURM)
is protoclr.jobs; its table lives in runs.db (protoclr.runs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from protoclr import atomic, jobs, runs, splits
from protoclr import measure as M
from protoclr.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    load_config,
    read_yaml,
    without_keys,
)
from protoclr.errors import UserError
from protoclr.measure import final_metrics
from protoclr.runs import ResultsDB, load_run
from protoclr.train import TrainingDiverged, pretrain

# What protoclr.report draws for a sweep; "" = training curves only.
STUDIES = ("", "loss_balance", "augmentation", "similarity", "class_balance", "bounds", "targets", "decoupled")
SWEEP_FILE_KEYS = ("base", "study", "seeds", "overrides", "grid", "name")
# Config keys that say where or how a run executes, not what it computes: left out of the run id.
_ID_EXCLUDED = ("train.out_dir", "train.run_name", "data.root", "data.num_workers", "data.download", "trainer")


class SweepError(UserError, ValueError):
    """A malformed sweep (the message names the offending argument or file key)."""


@dataclass(frozen=True)
class Sweep:
    name: str
    base: Path | None  # base config file; None = built-in defaults
    grid: dict[str, list[Any]]  # key -> values, in the order given
    seeds: int
    overrides: list[str] = field(default_factory=list)  # key=value applied to every run, before the grid
    study: str = ""
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
        hint = " (what is measured is the config's eval section: put eval.* keys under overrides:)" \
            if unknown[0] == "evaluate" else " (config values go under overrides: or grid:)"
        raise SweepError(f"{path}: unknown key {unknown[0]!r}; a sweep file holds {', '.join(SWEEP_FILE_KEYS)}{hint}")
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
                  study=str(data.get("study") or ""), source=str(path))
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
                apply_overrides(config_from_dict(base.to_dict()), _point_overrides(key, v)).validate()
            except ConfigError as e:
                raise SweepError(f"{where(key)}: {e}") from None
    return sweep


def _point_overrides(key: str, value: Any) -> list[str]:
    """``key=value`` for a grid key; for a named set (a key without a dot) one override per key of the mapping."""
    if "." in key:
        return [_override(key, value)]
    if not isinstance(value, dict) or not value or not all("." in str(k) for k in value):
        raise ConfigError(f"grid.{key}: a grid key without a dot lists override sets, each a mapping of "
                          f"section.key to a value; got {value!r}")
    return [_override(str(k), v) for k, v in value.items()]


def _base_config(sweep: Sweep) -> Config:
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
    return without_keys(config, _ID_EXCLUDED)


def run_id(name: str, point: dict[str, Any], seed: int, config: dict[str, Any]) -> str:
    """``<name>-<point>-s<seed>-<hash8>``; the hash covers what the run computes and measures, not where it runs."""
    blob = json.dumps({"config": _identity(config)}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:8]
    slug = _slug(point)
    return f"{name}-{slug + '-' if slug else ''}s{seed}-{digest}"


def expand(sweep: Sweep, *, extra: list[str] | None = None) -> list[RunSpec]:
    """Every (grid point, seed) as a :class:`RunSpec`, points in grid order, seeds innermost.

    ``extra``: overrides applied last (e.g. ``trainer.devices=8``); keys in ``_ID_EXCLUDED`` keep the ids.
    """
    import itertools

    keys = list(sweep.grid)
    specs = []
    for combo in itertools.product(*(sweep.grid[k] for k in keys)):
        point: dict[str, Any] = {}
        for k, v in zip(keys, combo, strict=True):
            point.update(v if "." not in k else {k: v})  # a named set's keys join the point as grid keys do
        for seed in range(sweep.seeds):
            grid_ov = [o for k, v in zip(keys, combo, strict=True) for o in _point_overrides(k, v)]
            ov = [*sweep.overrides, *grid_ov, f"train.seed={seed}", *(extra or [])]
            try:
                cfg = apply_overrides(config_from_dict(_base_config(replace(sweep, overrides=[])).to_dict()), ov)
                cfg.validate()
            except ConfigError as e:
                raise SweepError(f"{sweep.source or 'sweep'}: point {point}: {e}") from None
            config = cfg.to_dict()
            rid = run_id(sweep.name, point, seed, config)
            specs.append(RunSpec(run_id=rid, overrides=ov, point=point, seed=seed, config=config))
    return specs


# ----------------------------------------------------------------------------------------------------------
# registering and running


def init_db(db_path: str | Path) -> Path:
    """Create ``runs.db`` with every table (the engine's and ``sweep_runs``) in one transaction."""
    db_path = Path(db_path)
    ResultsDB(db_path)
    return db_path


def register(db_path: Path, sweep: Sweep, specs: list[RunSpec], *, command: str) -> None:
    """Insert the sweep's runs as ``pending``; a run already there keeps its row (state, claim, and the command
    that first registered it)."""
    runs.register_runs(db_path, [
        {"run_id": r.run_id, "sweep": sweep.name, "study": sweep.study, "point": r.point, "seed": r.seed,
         "spec": {"config": r.config, "overrides": r.overrides, "base": portable(sweep.base) if sweep.base else None,
                  "source": portable(sweep.source) if sweep.source else "", "command": command}} for r in specs])


def portable(path: str | Path) -> str:
    """``path`` relative to the working directory (the repository, where sweeps are run from), never a machine's
    absolute path: what a database committed with the code stores."""
    return Path(os.path.relpath(Path(path).resolve(), Path.cwd().resolve())).as_posix()


def execute_run(db_path: Path, rid: str) -> str:
    """Pretrain run ``rid`` of ``sweep_runs`` (resuming its checkpoint; the loop records the per-epoch
    measurements), then record the final probes of the last good checkpoint; returns the queue state (``done``
    or ``failed``). The caller holds the claim."""
    cfg = config_from_dict(runs.run_spec(db_path, rid)["config"])
    cfg.train.out_dir, cfg.train.run_name = str(db_path.parent), rid
    db = ResultsDB(db_path)
    try:
        diverged = False
        try:
            run_dir = pretrain(cfg)
        except TrainingDiverged as e:
            diverged, run_dir = True, e.run_dir
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # the last good checkpoint when diverged; its config is the run's, with the views fitted to the data
        encoder, cfg = load_run(run_dir, map_location=device)
        split, test, spec = splits.load_data(cfg, class_profile=False)
        fit_sets = {"": splits.probe_fit_set(split, cfg)}
        if cfg.data.class_profile != "none":  # the same probes fitted on the (imbalanced) pretraining set, for contrast
            train = splits.class_profiled(split, cfg.data, seed=cfg.train.seed)
            fit_sets[M.PRETRAIN_SET] = splits.draw(train, cfg.eval.train_images,
                                                    seed=cfg.train.seed + splits.PROBE_FIT)
        final = final_metrics(encoder.to(device), fit_sets, test, spec, cfg, device=device)
        if diverged:
            final = M.as_last_good(final)
        row = db.get_run(rid)
        diag_last = M.diagnostics_only((db.epochs(rid) or [{}])[-1])
        db.finish_run(rid, row["status"], {**(row["final_metrics"] or {}), **diag_last, **final},
                      message=row["message"])
        return "done"
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        try:
            row = db.get_run(rid)
        except KeyError:
            db.start_run(rid, config=cfg.to_dict(), run_dir=db_path.parent / rid)
            row = {"status": "running"}
        if row["status"] != "failed":
            db.finish_run(rid, "failed", {}, message=msg)
        traceback.print_exc()
        return "failed"


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
    if args.config is None and not args.grid:
        raise SweepError("name a sweep file or a base config, or give --grid KEY=V1,V2 to sweep the defaults (or use "
                         "--merge OUT)")
    if args.config is None:  # a grid over the built-in defaults (with --set)
        sweep, is_sweep_file = Sweep(name="sweep", base=None, grid={}, seeds=1), False
    else:
        path = Path(args.config)
        if not path.is_file():
            raise SweepError(f"{path} does not exist")
        try:
            raw = read_yaml(path)
        except ConfigError as e:
            raise SweepError(str(e)) from None
        if not raw:  # an empty file (or only comments) would be one run of the defaults, which nobody means
            raise SweepError(f"{path} is empty; a sweep file holds grid: (with base:, seeds:, overrides:) and a base "
                             "config its sections (docs/experiments.md)")
        is_sweep_file = isinstance(raw, dict) and "grid" in raw
        sweep = load_sweep_file(path) if is_sweep_file else \
            Sweep(name=path.stem, base=path.resolve(), grid={}, seeds=1)
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


def _print_plan(specs: list[RunSpec], states: dict[str, dict[str, Any]]) -> None:
    for r in specs:
        s = states.get(r.run_id, {})
        status = s.get("status") or "new"
        state = s.get("state", "pending")
        print(f"  {r.run_id:<60} {state:<8} {status:<12} {' '.join(r.overrides[-len(r.point) - 1:])}")


class Progress:
    """What a person follows while local workers run a sweep: a line as each run starts (its point, seed and
    worker log) and ends (minutes, the headline probes or the failure), then :meth:`table` of every run. Called by
    ``jobs.run_local`` with the queue's states, so the parent prints it and the workers need no other channel."""

    HEADLINE = ((M.EVAL_LINEAR, "linear"), (M.EVAL_KNN, "kNN"))

    def __init__(self, specs: list[RunSpec], db_path: Path, states: dict[str, dict[str, Any]], *, out=None):
        self.specs = {r.run_id: r for r in specs}
        self.db = ResultsDB(db_path)
        self.before = {rid: s["state"] for rid, s in states.items()}  # the queue as this command found it
        self.holder: dict[str, int] = {}  # run -> the worker pid seen holding its claim
        self.began: dict[str, float] = {}
        self.minutes: dict[str, float] = {}
        self.out = out or sys.stdout

    def _print(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def where(self, rid: str) -> str:
        r = self.specs[rid]
        return " ".join([*(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in r.point.items()),
                         f"seed {r.seed}"])

    def headline(self, rid: str) -> dict[str, float | None]:
        """label -> the run's final probe (on the last good checkpoint for a diverged run), None if missing."""
        fm = self.db.get_run(rid)["final_metrics"] or {}
        return {label: fm.get(key, fm.get(M.last_good(key))) for key, label in self.HEADLINE}

    def outcome(self, rid: str, state: dict[str, Any]) -> str:
        try:
            row = self.db.get_run(rid)
        except KeyError:
            row = {"status": "failed", "message": None}
        if state["state"] == "failed" or row["status"] == "failed":
            msg = " ".join(str(row.get("message") or state.get("message") or "no message").split())
            return f"failed: {msg[:200]}"
        scores = "  ".join(f"{label} {v:.2%}" for label, v in self.headline(rid).items() if v is not None)
        return f"{row['status']}  {scores}".rstrip()

    def __call__(self, states: dict[str, dict[str, Any]], logs: dict[int, Path]) -> None:
        for rid, s in states.items():
            pid = s["pid"]
            if s["state"] == "pending" and pid is not None and self.holder.get(rid) != pid:
                verb = "resume" if rid in self.holder else "start "
                self.holder[rid] = pid
                self.began.setdefault(rid, time.time())
                self._print(f"  {verb} {rid}  {self.where(rid)}  (log: {logs.get(pid, '?')})")
            elif (s["state"] in ("done", "failed") and rid not in self.minutes
                  and (rid in self.holder or s["state"] != self.before.get(rid))):
                if rid in self.began:
                    self.minutes[rid] = (time.time() - self.began[rid]) / 60
                else:  # started and ended between two polls: its start line now, its time from its own record
                    self._print(f"  start  {rid}  {self.where(rid)}")
                    try:
                        row = self.db.get_run(rid)
                        self.minutes[rid] = (row["updated"] - row["created"]) / 60
                    except KeyError:  # its worker died before the run began
                        self.minutes[rid] = 0.0
                log = f"  (log: {logs[self.holder[rid]]})" if s["state"] == "failed" and rid in self.holder else ""
                self._print(f"  end    {rid}  {self.minutes[rid]:.1f} min  {self.outcome(rid, s)}{log}")

    def table(self, states: dict[str, dict[str, Any]]) -> None:
        """Every run of the sweep: id, status, minutes (this command's runs), the headline probes."""
        width = max(len(rid) for rid in states)
        labels = "  ".join(f"{lb:>7}" for _, lb in self.HEADLINE)
        self._print(f"  {'run':<{width}}  {'status':<18} {'min':>5}  {labels}")
        for rid, s in states.items():
            try:
                status = self.db.get_run(rid)["status"]
                scores = self.headline(rid)
            except KeyError:
                status, scores = "not started", {}
            status = s["state"] if s["state"] != "done" else status
            if rid not in self.minutes and s["state"] == "done":
                status += " (before)"
            minutes = f"{self.minutes[rid]:.1f}" if rid in self.minutes else "-"
            cells = "  ".join(f"{scores[lb]:>7.2%}" if scores.get(lb) is not None else f"{'-':>7}"
                              for _, lb in self.HEADLINE)
            self._print(f"  {rid:<{width}}  {status:<18} {minutes:>5}  {cells}")


def cli_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.merge:
        out = Path(args.merge)
        sources = sorted(out.glob(f"jobs/*/{runs.DB_FILE}"))
        n = runs.merge_databases(runs.database(out), sources)
        print(f"merged {n} runs from {len(sources)} job databases into {runs.database(out)}")
        return 0
    sweep = build_sweep(args)  # user errors reach protoclr.cli, which prints them as one line
    specs = expand(sweep, extra=args.set)
    if args.workers < 1:
        raise SweepError(f"--workers {args.workers}: must be >= 1")
    out = Path(args.out or f"runs/sweeps/{sweep.name}")
    points = len(specs) // sweep.seeds
    print(f"sweep {sweep.name}: {points} point(s) x {sweep.seeds} seed(s) = {len(specs)} runs -> {runs.database(out)}")
    if args.dry_run:
        seen = set()
        for r in specs:  # one per code path: data, model, loss and similarity (grid values only rescale)
            c = r.config
            key = json.dumps([c["data"], c["model"], c["loss"]["name"], c["loss"]["similarity"]], sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            t0 = time.perf_counter()
            pretrain(config_from_dict(r.config), dry_run=True)
            print(f"  dry run ok ({time.perf_counter() - t0:.0f} s): {r.run_id}")
        return 0
    db_path = init_db(runs.database(out))
    command = " ".join(["protoclr", "sweep", *(a for a in argv if a not in ("--plan", "--retry-failed",
                                                                            "--reevaluate"))])
    register(db_path, sweep, specs, command=command)
    ids = [r.run_id for r in specs]
    if args.plan:
        _print_plan(specs, jobs.states(db_path, ids))
        return 0
    if args.reevaluate:
        print(f"re-evaluating {runs.reopen_finished(db_path, ids)} finished run(s)")
    if args.submit:
        states = jobs.states(db_path, ids)
        todo = [rid for rid in ids if states[rid]["state"] == "pending"
                or (args.retry_failed and states[rid]["state"] == "failed")]
        jobs.prepare_jobs(db_path, todo, out=out)
        scripts = jobs.slurm_scripts(todo, out=out, job_cmd=[sys.executable, "-m", "protoclr.sweep", "_job"],
                                     partition=args.slurm_partition, time_min=args.slurm_time, gpus=args.slurm_gpus,
                                     cpus=args.slurm_cpus, setup=args.slurm_setup)
        for name, text in scripts.items():
            atomic.write_text(out / "slurm" / name, text)
        submit = "\n".join(f"sbatch {out / 'slurm' / n}" for n in scripts)
        atomic.write_text(out / "slurm" / "submit_all.sh", "#!/bin/bash\nset -e\n" + submit + "\n")
        print(f"wrote {len(scripts)} sbatch scripts to {out / 'slurm'}; submit with `bash "
              f"{out / 'slurm' / 'submit_all.sh'}`, then `protoclr sweep --merge {out}`")
        return 0
    progress = Progress(specs, db_path, jobs.states(db_path, ids))
    jobs.run_local(db_path, ids, workers=args.workers, retry_failed=args.retry_failed, log_dir=out / "logs",
                   worker_cmd=[sys.executable, "-m", "protoclr.sweep", "_worker"], watch=progress)
    states = jobs.states(db_path, ids)
    counts: dict[str, int] = {}
    for s in states.values():
        key = s["status"] if s["state"] == "done" else s["state"]
        counts[key] = counts.get(key, 0) + 1
    print("done: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    progress.table(states)
    print(f"worker logs: {out / 'logs'}/ (one file per worker process); results: {db_path}")
    failed = [rid for rid, s in states.items() if s["state"] == "failed"]
    for rid in failed:
        print(f"  failed: {rid}: {states[rid].get('message')}", file=sys.stderr)
    return 1 if failed else 0


def _internal_main(argv: list[str]) -> int:
    """``_worker DB PLAN [--retry-failed]`` (a local worker of protoclr.jobs.run_local) and ``_job JOB_DIR RUN_ID
    [overrides]`` (a cluster job: one run in its own database)."""
    threads = os.environ.get("PROTOCLR_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    if argv[0] == "_worker":
        ids = json.loads(Path(argv[2]).read_text())
        jobs.worker_loop(Path(argv[1]), ids, execute_run, retry_failed="--retry-failed" in argv)
        return 0
    if argv[0] == "_job":
        job_db = init_db(runs.database(argv[1]))
        rid, extra = argv[2], argv[3:]
        if extra:  # e.g. trainer.devices from the job's allocation; not part of the run id
            spec = runs.run_spec(job_db, rid)
            spec["config"] = apply_overrides(config_from_dict(spec["config"]), extra).to_dict()
            runs.set_run_spec(job_db, rid, spec)
        jobs.worker_loop(job_db, [rid], execute_run)
        return 0
    raise SystemExit(f"unknown internal command {argv[0]!r}")


__all__ = ["STUDIES", "Progress", "RunSpec", "Sweep", "SweepError", "check_sweep", "cli_main", "execute_run", "expand",
           "init_db", "load_sweep_file", "parse_grid_arg", "register", "run_id"]

if __name__ == "__main__":
    sys.exit(_internal_main(sys.argv[1:]))
