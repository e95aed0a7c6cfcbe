"""protoclr.jobs and the queue half of protoclr.runs: claims under dead and live workers, a run whose workers
keep dying, a database that survives killed writers, a worker loop that runs every claimable run once."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from protoclr import jobs, runs
from protoclr.runs import ResultsDB

REPO = Path(__file__).resolve().parents[1]


def _queue(tmp: Path, n: int = 2) -> tuple[Path, list[str]]:
    db = tmp / "runs.db"
    ResultsDB(db)
    ids = [f"run{i}" for i in range(n)]
    runs.register_runs(db, [{"run_id": rid, "sweep": "s", "study": "", "point": {"i": i}, "seed": 0,
                             "spec": {"config": {}}} for i, rid in enumerate(ids)])
    return db, ids


def _hold(db: Path, rid: str, pid: int, *, attempts: int = 1) -> None:
    con = sqlite3.connect(db)
    con.execute("UPDATE sweep_runs SET host=?, pid=?, pid_start=?, heartbeat=?, attempts=? WHERE run_id=?",
                (os.uname().nodename, pid, jobs.proc_start(pid), time.time(), attempts, rid))
    con.commit()
    con.close()


def test_claim_respects_live_workers_and_takes_over_dead_ones(tmp_path):
    db, (rid, other) = _queue(tmp_path)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        for pid in (live.pid, dead.pid):
            _hold(db, rid, pid)
            assert jobs.claim(db, rid) is (pid == dead.pid)
        assert jobs.states(db, [rid])[rid]["pid"] == os.getpid()
        runs.release_run(db, rid, "done")
        assert not jobs.claim(db, rid)  # done runs are never claimed again
        runs.release_run(db, other, "failed", "boom")
        assert not jobs.claim(db, other) and jobs.claim(db, other, retry_failed=True)
    finally:
        live.kill()
        live.wait()


def test_run_whose_worker_keeps_dying_is_marked_failed(tmp_path):
    db, (rid, _) = _queue(tmp_path)
    ResultsDB(db).start_run(rid, config={})
    _hold(db, rid, 999999999, attempts=jobs.MAX_ATTEMPTS)
    assert not jobs.claim(db, rid)
    state = jobs.states(db, [rid])[rid]
    assert state["state"] == "failed" and "died 3 times" in state["message"]
    assert ResultsDB(db).get_run(rid)["status"] == "failed"


def test_worker_loop_runs_each_claimable_run_once(tmp_path):
    db, ids = _queue(tmp_path, 3)
    runs.release_run(db, ids[1], "done")
    seen = []

    def execute(path, rid):
        seen.append(rid)
        return "failed" if rid == ids[2] else "done"

    assert jobs.worker_loop(db, ids, execute) == 2
    assert seen == [ids[0], ids[2]]
    st = jobs.states(db, ids)
    assert [st[r]["state"] for r in ids] == ["done", "done", "failed"] and not any(s["alive"] for s in st.values())
    assert jobs.worker_loop(db, ids, execute) == 0  # nothing left; failed runs wait for retry_failed


_WRITER = """
import sys, time
from protoclr.runs import ResultsDB
db = ResultsDB(sys.argv[1])
db.start_run(sys.argv[2], config={"x": 1})
for e in range(100000):
    db.log_epoch(sys.argv[2], e, {"loss": float(e), "pad": "x" * 2000})
"""


def _has(db: ResultsDB, rid: str) -> bool:
    try:
        db.get_run(rid)
        return True
    except KeyError:
        return False


def test_database_survives_killed_writers(tmp_path):
    path = tmp_path / "runs.db"
    ResultsDB(path)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), f"w{i}"], env=env) for i in range(2)]
    deadline = time.time() + 120
    db = ResultsDB(path)
    while time.time() < deadline and min(len(db.epochs(f"w{i}")) if _has(db, f"w{i}") else 0 for i in range(2)) < 20:
        time.sleep(0.05)
    for w in writers:
        w.send_signal(signal.SIGKILL)
        w.wait()
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    for i in range(2):
        epochs = [e["epoch"] for e in db.epochs(f"w{i}")]
        assert len(epochs) >= 20 and epochs == list(range(len(epochs)))  # whole transactions, no gaps
    db.finish_run("w0", "interrupted", {"n": 1})  # still writable
    assert db.get_run("w0")["status"] == "interrupted"
