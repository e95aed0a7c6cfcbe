"""The SQLite results database ``runs.db``: one row per run, one row per (run, epoch).

    db = ResultsDB("runs/runs.db")
    db.start_run(run_id, config=cfg.to_dict(), run_dir="runs/x")
    db.log_epoch(run_id, epoch, {"loss": 3.1, "knn_top1": 0.71})
    db.finish_run(run_id, "finished", {"knn_top1": 0.80})
    db.runs(status="finished")              # -> list of dicts, newest first

Several processes (a sweep's workers) may write at once: the database is in WAL mode, every write is one
``BEGIN IMMEDIATE`` transaction, and a connection waits up to ``timeout`` seconds for the write lock instead of
failing. A connection is opened per call, so a ``ResultsDB`` is cheap, picklable and fork-safe.

Statuses: ``running``, ``finished``, ``diverged``, ``failed``, ``interrupted``.

The whole schema (``runs``, ``epochs`` and the sweep queue ``sweep_runs``) is created in one transaction, so
another connection sees all of it or none of it; :func:`has_schema` tells a reader which.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from protoclr.atomic import json_clean
from protoclr.errors import NotADatabase

STATUSES = ("running", "finished", "diverged", "failed", "interrupted")

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
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
    finally:
        con.close()


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
        con.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    con.execute(statement)
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
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
