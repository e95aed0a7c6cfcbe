"""A run's folder and the results database ``runs.db``: every file layout and every SQL statement of protoclr.

    run = RunDir(Path(cfg.train.out_dir) / run_name(cfg))  # run.checkpoint, .config, .meta, .metrics_file, .db
    run.epochs()                                            # the epoch records of its metrics.jsonl
    encoder, cfg = load_run(run_dir)                        # or a checkpoint file
    db = ResultsDB("runs/runs.db")
    db.start_run(run_id, config=cfg.to_dict(), run_dir="runs/x")
    db.log_epoch(run_id, epoch, {"loss": 3.1, KNN: 0.71})  # metric keys: protoclr.measure
    db.finish_run(run_id, "finished", {EVAL_KNN: 0.80})
    db.runs(status="finished")              # -> list of dicts, newest first

Several processes (a sweep's workers) may write at once: the database is in WAL mode, every write is one
``BEGIN IMMEDIATE`` transaction, and a connection waits up to ``timeout`` seconds for the write lock instead of
failing. A connection is opened per call, so a ``ResultsDB`` is cheap, picklable and fork-safe.

Statuses: ``running``, ``finished``, ``diverged``, ``failed``, ``interrupted``. The sweep queue (``sweep_runs``:
a run's grid point, spec, claim and state) is read and written by the functions at the end of this module; the
liveness of a claim's process is the caller's (protoclr.jobs), passed in as a function.

The whole schema (``runs``, ``epochs`` and the sweep queue ``sweep_runs``) is created in one transaction, so
another connection sees all of it or none of it; :func:`has_schema` tells a reader which.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from protoclr import atomic, checkpoint
from protoclr.atomic import json_clean
from protoclr.config import ConfigError, config_from_dict
from protoclr.custom import PYTHON, encoder_with
from protoclr.errors import NotACheckpoint, NotADatabase, UserError
from protoclr.models import build_encoder

SKIPPED = "skipped_files.txt"  # in a run folder: the bad image files data.on_bad=skip left out, one per line
STATUSES = ("running", "finished", "diverged", "failed", "interrupted")


# ----------------------------------------------------------------------------------------------------------
# the run folder

DB_FILE = "runs.db"  # the results database of a folder of runs (protoclr pretrain's train.out_dir, a sweep's --out)


def database(out_dir: str | Path) -> Path:
    """The results database of the runs in ``out_dir``."""
    return Path(out_dir) / DB_FILE


def _jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(line, record)`` for each JSON object line of ``path``; a line cut short by a kill is left out."""
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            yield line, record


class RunDir:
    """A run's folder ``<out_dir>/<run_name>/``, the one place its layout is spelled: ``config.yaml`` (the resolved
    config), ``meta.json`` (version, commit, command, precision), ``checkpoint.pt`` (latest, atomic), ``best.pt``
    (``train.keep=best``),
    ``metrics.jsonl`` (one record per line, protoclr.runs.MetricsLog); ``db`` is the results database beside it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = self.path.name
        self.config = self.path / "config.yaml"
        self.meta = self.path / "meta.json"
        self.checkpoint = self.path / "checkpoint.pt"
        self.best = self.path / "best.pt"  # train.keep=best: the epoch end with the highest online kNN top-1
        self.metrics_file = self.path / "metrics.jsonl"
        self.db = database(self.path.parent)

    def read_meta(self) -> dict[str, Any]:
        return json.loads(self.meta.read_text())

    def records(self) -> list[dict[str, Any]]:
        """Every record of ``metrics.jsonl`` in order (none when the file is absent)."""
        return [record for _, record in _jsonl(self.metrics_file)] if self.metrics_file.is_file() else []

    def epochs(self) -> list[dict[str, Any]]:
        """The epoch records (``"kind": "epoch"``) of ``metrics.jsonl``."""
        return [r for r in self.records() if r.get("kind") == "epoch" and "epoch" in r]


def checkpoint_file(path: str | Path) -> Path:
    """The checkpoint a user names by its run folder or by the file itself."""
    path = Path(path)
    return RunDir(path).checkpoint if path.is_dir() else path


def run_name(cfg: Any) -> str:
    """``train.run_name``, or ``<dataset>-<backbone>-<loss>-<time>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return cfg.train.run_name or f"{cfg.data.dataset}-{cfg.model.backbone}-{cfg.loss.name}-{stamp}"


def git_commit() -> str | None:
    """The commit of the protoclr checkout this code runs from, if it is one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


# What must match between a run's saved config and the one resuming it (the rest may change, e.g. devices).
RESUME_FIXED = ("data", "model", "loss", "target", "optim", "train.epochs", "train.steps", "train.batch_size",
                "train.seed")


def check_resumable(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise :class:`~protoclr.config.ConfigError` naming every ``RESUME_FIXED`` key two config dicts disagree on."""
    diffs = []
    for key in RESUME_FIXED:
        sec, _, name = key.partition(".")
        if name:
            diffs += [(key, saved[sec][name], current[sec][name])] if saved[sec][name] != current[sec][name] else []
        else:
            diffs += [(f"{sec}.{k}", saved[sec][k], current[sec].get(k)) for k in saved[sec]
                      if saved[sec][k] != current[sec].get(k)]
    if diffs:
        what = "; ".join(f"{key}: {old!r} at the start, {new!r} now" for key, old, new in diffs)
        raise ConfigError(f"cannot resume: the run was started with other values ({what}); use a new "
                          "train.run_name or the run's own config.yaml")


def write_run_files(run_dir: Path, *, config_yaml: str, meta: dict[str, Any]) -> None:
    """``config.yaml`` (the resolved config) and ``meta.json`` (version, commit, command, ...), atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(RunDir(run_dir).config, config_yaml)
    atomic.write_text(RunDir(run_dir).meta, json.dumps(json_clean(meta), indent=2))


class MetricsLog:
    """``metrics.jsonl``: one JSON record per line (``kind``: step, epoch, skip, diverged). Opened for a resume at
    ``step``, it first drops the records a killed run wrote after its last checkpoint (steps beyond ``step``,
    epochs from ``epoch`` on), so that the resumed run's records follow without duplicates."""

    def __init__(self, path: Path, *, resume_step: int | None = None, resume_epoch: int = 0):
        self.path = path
        if resume_step is not None and path.is_file():
            keep = [line for line, rec in _jsonl(path) if not _late(rec, resume_step, resume_epoch)]
            atomic.write_text(path, "".join(x + "\n" for x in keep))
        self.file = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(json_clean(record)) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _late(record: dict[str, Any], step: int, epoch: int) -> bool:
    """A record written after the checkpoint of ``step`` (in epoch ``epoch``) a run resumes from."""
    return record.get("step", 0) > step or (record.get("kind") == "epoch" and record["epoch"] >= epoch)


def flat_config(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as one level of ``section.key`` names (``{"optim.base_lr": 0.3, ...}``): what the
    experiment trackers get as hyperparameters."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        out.update(flat_config(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


class Recorder:
    """What a run writes besides its checkpoints, on the process that writes (``enabled``): ``config.yaml`` and
    ``meta.json`` at the start, ``metrics.jsonl`` records, the run's ``runs.db`` row and epoch rows, one console
    line per epoch (``say``), and to the Lightning ``loggers`` (TensorBoard, CSV, W&B, MLflow) the resolved config
    as hyperparameters, every step and epoch record as scalars, and the run's end (``finalize``)."""

    def __init__(self, run_dir: Path, cfg: Any, *, enabled: bool, loggers: Sequence[Any] = (),
                 say: Callable[[str], None] = print, meta: dict[str, Any] | None = None,
                 resume_step: int | None = None, resume_epoch: int = 0, console_keys: Sequence[str] | None = None):
        self.run_dir, self.enabled, self.say = run_dir, enabled, say
        self.console_keys = console_keys  # what an epoch's console line shows (None: every key)
        self.loggers = list(loggers) if enabled else []
        self.db, self.log = None, None
        if enabled:
            write_run_files(run_dir, config_yaml=cfg.to_yaml(), meta=meta or {})
            self.db = ResultsDB(database(cfg.train.out_dir))
            self.db.start_run(run_dir.name, config=cfg.to_dict(), run_dir=run_dir)
            self.log = MetricsLog(RunDir(run_dir).metrics_file, resume_step=resume_step, resume_epoch=resume_epoch)
        # Lightning's loggers drop an empty list (read as a list of dicts to flatten): it is sent as "[]"
        params = {k: "[]" if v == [] else v for k, v in flat_config(cfg.to_dict()).items()}
        for logger in self.loggers:
            try:
                logger.log_hyperparams(params)
            except NotImplementedError:  # Lightning's CSV logger takes none; config.yaml holds them
                pass

    def skipped(self, files: Sequence[str], *, where: str) -> None:
        """Bad image files left out of the run (``data.on_bad=skip``): listed one per line in ``SKIPPED``, and
        counted in one console line that names that file. Runs on every process; only the writer writes."""
        if not files:
            return
        listing = self.run_dir / SKIPPED
        if self.enabled:
            atomic.write_text(listing, "".join(f"{f}\n" for f in files))
        self.say(f"skipped {len(files)} bad image file(s) in {where} (data.on_bad=skip); listed in {listing}")

    def log_dict(self, metrics: dict[str, Any], *, step: int) -> None:
        """Scalars to every logger (the trackers show the last value of each key as the run's summary)."""
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    def event(self, record: dict[str, Any]) -> None:
        """A ``metrics.jsonl`` record (``kind``: step, skip, diverged)."""
        if self.log is not None:
            self.log.write(record)

    def step(self, step: int, metrics: dict[str, Any], **extra: Any) -> None:
        """A step record: ``metrics.jsonl`` (with ``extra``) and the loggers' ``train/*`` scalars."""
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, step=step)
        self.event({"kind": "step", "step": step, **metrics, **extra})

    def epoch(self, metrics: dict[str, Any]) -> None:
        """An epoch record everywhere: ``metrics.jsonl``, ``runs.db``, the loggers' ``epoch/*``, the console."""
        self.log_dict({f"epoch/{k}": v for k, v in metrics.items()}, step=metrics["step"])
        self.event({"kind": "epoch", **metrics})
        if self.db is not None:
            self.db.log_epoch(self.run_dir.name, metrics["epoch"], metrics)
        shown = {k: v for k, v in metrics.items() if self.console_keys is None or k in self.console_keys}
        line = " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
        if len(shown) < len(metrics):
            line += f" | +{len(metrics) - len(shown)} more in {RunDir(self.run_dir).metrics_file.name}"
        self.say(line)

    def finish(self, status: str, final: dict[str, Any], message: str | None = None) -> None:
        """The run's end: its status and final metrics (the last epoch record) in ``runs.db``; the loggers
        finalized, the trackers' runs marked finished (``finished``, or ``interrupted`` by ``train.max_steps`` or
        the user: resumable) or failed (``diverged``, ``failed``)."""
        if self.db is not None:
            self.db.finish_run(self.run_dir.name, status, final, message=message)
        if self.log is not None:
            self.log.close()
        for logger in self.loggers:
            logger.finalize("success" if status in ("finished", "interrupted") else "failed")


def load_run(path: str | Path, *, map_location: Any = "cpu", backbone: nn.Module | None = None) -> tuple[Any, Any]:
    """``(encoder, cfg)`` from a run folder or a checkpoint file; the encoder is in eval mode and
    ``encoder.backbone`` gives the features evaluation uses. ``backbone``: for a run trained with a backbone
    passed from Python (``model.backbone: python``), a module of the same class, which receives the weights."""
    path, file = Path(path), checkpoint_file(path)
    if path.is_dir() and not file.is_file():
        raise NotACheckpoint(f"{path} holds no checkpoint.pt; pass a run folder or a checkpoint file")
    state = checkpoint.load(file, map_location=map_location)
    cfg = config_from_dict(state["config"])
    torch.manual_seed(0)  # construction only; every weight is overwritten by the checkpoint
    if cfg.model.backbone == PYTHON:
        name = state.get("python", {}).get("backbone", "a module")
        if backbone is None:
            raise UserError(f"{path} was trained with a backbone passed from Python ({name}); a command cannot "
                            f"rebuild it: build one and load the weights with load_run({str(path)!r}, backbone=...)")
        encoder = encoder_with(backbone, int(state["feature_dim"]), cfg.model)
        try:
            encoder.load_state_dict(state["model"])
        except RuntimeError as e:
            raise UserError(f"the backbone passed to load_run does not hold {path}'s weights (trained with {name}): "
                            f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
        return encoder.eval(), cfg
    encoder = build_encoder(cfg.model, in_channels=int(state["in_channels"]))
    encoder.load_state_dict(state["model"])
    return encoder.eval(), cfg

def record_final_metrics(run_dir: Path, metrics: dict[str, float]) -> str:
    """Merge ``metrics`` into the final metrics of this run's row in ``runs.db`` (parent folder); returns a
    sentence saying where they went (or why only the JSON file holds them)."""
    db_path = RunDir(run_dir).db
    if not db_path.is_file():
        return f"no {db_path}; results are in the JSON file only"
    db = ResultsDB(db_path)
    try:
        row = db.get_run(run_dir.name)
    except KeyError:
        return f"no run {run_dir.name!r} in {db_path}; results are in the JSON file only"
    db.finish_run(run_dir.name, row["status"], {**(row["final_metrics"] or {}), **metrics}, message=row["message"])
    return f"recorded in {db_path} (run {run_dir.name})"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    run_dir TEXT,
    config TEXT NOT NULL,          -- resolved config as JSON
    status TEXT NOT NULL,
    final_metrics TEXT,            -- JSON, NULL until the run ends
    message TEXT,                  -- why it stopped, for diverged / failed runs
    created REAL NOT NULL,         -- unix time
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    epoch INTEGER NOT NULL,
    metrics TEXT NOT NULL,         -- JSON
    time REAL NOT NULL,
    PRIMARY KEY (run_id, epoch)
);
CREATE TABLE IF NOT EXISTS sweep_runs (
    run_id TEXT PRIMARY KEY,
    sweep TEXT NOT NULL,
    study TEXT NOT NULL,
    point TEXT NOT NULL,           -- JSON grid values
    seed INTEGER NOT NULL,
    spec TEXT NOT NULL,            -- JSON: config, evaluate, overrides, base, source, command
    state TEXT NOT NULL,           -- pending | done | failed
    host TEXT, pid INTEGER, pid_start TEXT, heartbeat REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    message TEXT,
    updated REAL NOT NULL
);
"""
TABLES = ("runs", "epochs", "sweep_runs")


def connect(path: str | Path, *, timeout: float = 60.0) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) that waits ``timeout`` s for a lock."""
    con = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    con.row_factory = sqlite3.Row
    con.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
    return con


@contextmanager
def transaction(path: str | Path, *, timeout: float = 60.0) -> Iterator[sqlite3.Connection]:
    """``with transaction(path) as con``: one write transaction; the lock is taken up front (``BEGIN
    IMMEDIATE``) so concurrent writers queue, never deadlock; rolled back on any exception."""
    con = connect(path, timeout=timeout)
    try:
        with _immediate(con):
            yield con
    finally:
        con.close()


@contextmanager
def _immediate(con: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` on an open connection, ``ROLLBACK`` on any exception."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def create_schema(path: str | Path, *, timeout: float = 60.0) -> None:
    """Create every table of ``runs.db`` in one transaction (``executescript`` would commit each statement on
    its own, and a reader could see ``runs`` without ``epochs``)."""
    try:
        con = connect(path, timeout=timeout)
    except sqlite3.OperationalError as e:  # a folder, or a path that cannot be created
        raise NotADatabase(f"{path}: cannot open it as a results database ({e}); pass a runs.db file path") from None
    try:
        try:
            con.execute("PRAGMA journal_mode=WAL")  # persistent; cannot change inside a transaction
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
                raise
            raise NotADatabase(f"{path} is not an SQLite database; pass the runs.db a sweep or pretraining wrote, "
                               "or a path where none exists yet") from None
        with _immediate(con):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    con.execute(statement)
    finally:
        con.close()


def has_schema(con: sqlite3.Connection) -> bool:
    """Whether ``con``'s database holds the results tables (``runs`` and ``epochs``; ``sweep_runs`` is absent
    from databases written before it joined the schema). False for a database another process is still
    creating; a file that is not SQLite raises ``sqlite3.DatabaseError``."""
    names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    return {"runs", "epochs"} <= names


def _json(value: Any) -> str:
    # NaN / inf are not JSON; stored as null so every reader can parse the row.
    return json.dumps(json_clean(value), sort_keys=True)


class ResultsDB:
    """Runs and their per-epoch metrics in one SQLite file (created on first use)."""

    def __init__(self, path: str | Path, *, timeout: float = 60.0):
        self.path = Path(path)
        self.timeout = timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        create_schema(self.path, timeout=timeout)

    def _connect(self) -> sqlite3.Connection:
        return connect(self.path, timeout=self.timeout)

    def _write(self):
        return transaction(self.path, timeout=self.timeout)

    def start_run(self, run_id: str, *, config: dict[str, Any], run_dir: str | Path | None = None) -> None:
        """Record a run as ``running``; a resumed run keeps its row and epochs and is marked running again."""
        now = time.time()
        with self._write() as con:
            con.execute(
                "INSERT INTO runs (run_id, run_dir, config, status, created, updated) VALUES (?, ?, ?, 'running', ?, ?)"
                " ON CONFLICT(run_id) DO UPDATE SET status='running', config=excluded.config,"
                " run_dir=excluded.run_dir, message=NULL, updated=excluded.updated",
                (run_id, str(run_dir) if run_dir is not None else None, _json(config), now, now),
            )

    def log_epoch(self, run_id: str, epoch: int, metrics: dict[str, Any]) -> None:
        """Store (or, after a resume, replace) the metrics of ``epoch``."""
        now = time.time()
        with self._write() as con:
            con.execute(
                "INSERT OR REPLACE INTO epochs (run_id, epoch, metrics, time) VALUES (?, ?, ?, ?)",
                (run_id, int(epoch), _json(metrics), now),
            )
            con.execute("UPDATE runs SET updated=? WHERE run_id=?", (now, run_id))

    def finish_run(
        self, run_id: str, status: str, final_metrics: dict[str, Any] | None = None, *, message: str | None = None
    ) -> None:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        with self._write() as con:
            cur = con.execute(
                "UPDATE runs SET status=?, final_metrics=?, message=?, updated=? WHERE run_id=?",
                (status, _json(final_metrics or {}), message, time.time(), run_id),
            )
            if cur.rowcount != 1:
                raise KeyError(f"no run {run_id!r} in {self.path}")

    def _row(self, row: sqlite3.Row) -> dict[str, Any]:
        out = dict(row)
        out["config"] = json.loads(out["config"])
        out["final_metrics"] = json.loads(out["final_metrics"]) if out["final_metrics"] else None
        return out

    def get_run(self, run_id: str) -> dict[str, Any]:
        con = self._connect()
        try:
            row = con.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        finally:
            con.close()
        if row is None:
            raise KeyError(f"no run {run_id!r} in {self.path}")
        return self._row(row)

    def runs(self, *, status: str | None = None) -> list[dict[str, Any]]:
        """All runs (optionally with one status), newest first."""
        con = self._connect()
        try:
            if status is None:
                rows = con.execute("SELECT * FROM runs ORDER BY created DESC").fetchall()
            else:
                rows = con.execute("SELECT * FROM runs WHERE status=? ORDER BY created DESC", (status,)).fetchall()
        finally:
            con.close()
        return [self._row(r) for r in rows]

    def epochs(self, run_id: str) -> list[dict[str, Any]]:
        """Per-epoch metrics of a run, in epoch order: ``[{"epoch": 0, "loss": ..., ...}, ...]``."""
        con = self._connect()
        try:
            rows = con.execute("SELECT epoch, metrics FROM epochs WHERE run_id=? ORDER BY epoch", (run_id,)).fetchall()
        finally:
            con.close()
        return [{"epoch": r["epoch"], **json.loads(r["metrics"])} for r in rows]


# ----------------------------------------------------------------------------------------------------------
# the sweep queue (protoclr.sweep registers runs, protoclr.jobs claims and runs them)


def register_runs(db_path: Path, rows: list[dict[str, Any]]) -> None:
    """Insert runs as ``pending`` (``run_id, sweep, study, point, seed, spec``); a run already there keeps its
    row (state, claim, and the spec that first registered it)."""
    now = time.time()
    with transaction(db_path) as con:
        for r in rows:
            con.execute("INSERT INTO sweep_runs (run_id, sweep, study, point, seed, spec, state, updated)"
                        " VALUES (?, ?, ?, ?, ?, ?, 'pending', ?) ON CONFLICT(run_id) DO NOTHING",
                        (r["run_id"], r["sweep"], r["study"], json.dumps(r["point"]), r["seed"],
                         json.dumps(r["spec"]), now))


def claim_run(db_path: Path, rid: str, *, host: str, pid: int, pid_start: str,
              alive: Callable[[sqlite3.Row], bool], retry_failed: bool = False, max_attempts: int = 3) -> bool:
    """Take run ``rid`` for process (``host``, ``pid``) if it is not done (nor failed, unless ``retry_failed``)
    and no live process holds it (``alive(row)``); a run whose holders died ``max_attempts`` times is recorded as
    failed instead. One ``BEGIN IMMEDIATE`` transaction: two workers never take the same run."""
    with transaction(db_path) as con:
        row = con.execute("SELECT * FROM sweep_runs WHERE run_id=?", (rid,)).fetchone()
        if row is None or row["state"] == "done" or (row["state"] == "failed" and not retry_failed):
            return False
        if row["pid"] is not None and row["pid"] != pid and alive(row):
            return False
        if row["pid"] is not None and row["attempts"] >= max_attempts and row["state"] == "pending":
            msg = f"the worker running it died {row['attempts']} times (killed, out of memory?)"
            con.execute("UPDATE sweep_runs SET state='failed', message=?, pid=NULL, updated=? WHERE run_id=?",
                        (msg, time.time(), rid))
            con.execute("UPDATE runs SET status='failed', message=?, updated=? WHERE run_id=? AND status='running'",
                        (msg, time.time(), rid))
            return False
        con.execute("UPDATE sweep_runs SET state='pending', host=?, pid=?, pid_start=?, heartbeat=?,"
                    " attempts=attempts+1, updated=? WHERE run_id=?",
                    (host, pid, pid_start, time.time(), time.time(), rid))
    return True


def release_run(db_path: Path, rid: str, state: str, message: str | None = None) -> None:
    """End a claim: the run is ``done``, ``failed`` or ``pending`` again."""
    with transaction(db_path) as con:
        con.execute("UPDATE sweep_runs SET state=?, message=?, pid=NULL, host=NULL, attempts=0, updated=?"
                    " WHERE run_id=?", (state, message, time.time(), rid))


def beat(db_path: Path, rid: str, pid: int) -> None:
    """Refresh the heartbeat of ``pid``'s claim on ``rid``."""
    with transaction(db_path) as con:
        con.execute("UPDATE sweep_runs SET heartbeat=? WHERE run_id=? AND pid=?", (time.time(), rid, pid))


def reopen_finished(db_path: Path, ids: list[str]) -> int:
    """Mark the done runs among ``ids`` whose training finished as pending again (``sweep --reevaluate``);
    returns how many."""
    wanted = set(ids)
    with transaction(db_path) as con:
        todo = [r["run_id"] for r in con.execute(
            "SELECT s.run_id FROM sweep_runs s JOIN runs r ON r.run_id = s.run_id "
            "WHERE s.state='done' AND r.status='finished'") if r["run_id"] in wanted]
        con.executemany("UPDATE sweep_runs SET state='pending', attempts=0, pid=NULL, updated=? WHERE run_id=?",
                        [(time.time(), rid) for rid in todo])
    return len(todo)


def sweep_rows(db_path: Path, ids: list[str]) -> dict[str, sqlite3.Row]:
    """run_id -> its ``sweep_runs`` row joined with the engine's ``status``, for the given runs."""
    con = connect(db_path)
    try:
        out = {}
        for rid in ids:
            row = con.execute("SELECT s.*, r.status FROM sweep_runs s LEFT JOIN runs r USING (run_id)"
                              " WHERE s.run_id=?", (rid,)).fetchone()
            if row is not None:
                out[rid] = row
        return out
    finally:
        con.close()


def run_spec(db_path: Path, rid: str) -> dict[str, Any]:
    """The spec a run was registered with (config, overrides, command, ...)."""
    con = connect(db_path)
    try:
        return json.loads(con.execute("SELECT spec FROM sweep_runs WHERE run_id=?", (rid,)).fetchone()["spec"])
    finally:
        con.close()


def set_run_spec(db_path: Path, rid: str, spec: dict[str, Any]) -> None:
    with transaction(db_path) as con:
        con.execute("UPDATE sweep_runs SET spec=? WHERE run_id=?", (json.dumps(spec), rid))


def copy_sweep_rows(src_path: Path, dst_path: Path, ids: list[str]) -> None:
    """Copy the ``sweep_runs`` rows of ``ids`` from one database into another (a cluster job's own)."""
    src = connect(src_path)
    try:
        rows = [dict(src.execute("SELECT * FROM sweep_runs WHERE run_id=?", (rid,)).fetchone()) for rid in ids]
    finally:
        src.close()
    ResultsDB(dst_path)
    with transaction(dst_path) as con:
        for row in rows:
            con.execute(f"INSERT OR REPLACE INTO sweep_runs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                        tuple(row.values()))


def merge_databases(target: Path, sources: list[Path]) -> int:
    """Fold ``runs``, ``epochs`` and ``sweep_runs`` rows of ``sources`` into ``target`` (a row replaces the
    target's when its ``updated`` time is newer); returns how many runs were merged."""
    ResultsDB(target)
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


def read_all(db_path: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Everything a report reads, read-only: ``(runs, sweep rows by run id, epoch records by run id)``; runs
    newest last, configs and metrics parsed. Raises :class:`~protoclr.errors.NotADatabase` for a missing file, a
    file that is not SQLite, or a database whose tables do not exist yet."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise NotADatabase(f"{db_path} does not exist; pass the runs.db a sweep or pretraining wrote")
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        try:
            complete = has_schema(con)
        except sqlite3.DatabaseError:
            raise NotADatabase(f"{db_path} is not an SQLite database; pass the runs.db a sweep or pretraining "
                               "wrote") from None
        if not complete:
            raise NotADatabase(f"{db_path} holds no protoclr tables (yet): pass the runs.db a sweep or pretraining "
                               "wrote, or wait until the sweep creating it has started")
        runs = [dict(r) for r in con.execute("SELECT * FROM runs ORDER BY created")]
        # databases written before the sweep table joined the schema have none
        has_sweeps = con.execute("SELECT 1 FROM sqlite_master WHERE name='sweep_runs'").fetchone() is not None
        meta = {r["run_id"]: dict(r) for r in con.execute("SELECT * FROM sweep_runs")} if has_sweeps else {}
        epochs: dict[str, list[dict[str, Any]]] = {}
        for r in con.execute("SELECT run_id, epoch, metrics FROM epochs ORDER BY run_id, epoch"):
            epochs.setdefault(r["run_id"], []).append({**json.loads(r["metrics"]), "epoch": r["epoch"]})
    finally:
        con.close()
    for r in runs:
        r["config"] = json.loads(r["config"])
        r["final_metrics"] = json.loads(r["final_metrics"]) if r["final_metrics"] else {}
    return runs, meta, epochs


__all__ = [
    "DB_FILE",
    "RESUME_FIXED",
    "STATUSES",
    "TABLES",
    "MetricsLog",
    "Recorder",
    "ResultsDB",
    "RunDir",
    "beat",
    "check_resumable",
    "checkpoint_file",
    "claim_run",
    "connect",
    "copy_sweep_rows",
    "create_schema",
    "database",
    "flat_config",
    "git_commit",
    "has_schema",
    "load_run",
    "merge_databases",
    "read_all",
    "record_final_metrics",
    "register_runs",
    "release_run",
    "reopen_finished",
    "run_name",
    "run_spec",
    "set_run_spec",
    "sweep_rows",
    "transaction",
    "write_run_files",
]
