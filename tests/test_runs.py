"""ResultsDB: round trip, resume semantics, statuses, and many concurrent writer processes."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

import pytest

from protoclr.runs import MetricsLog, ResultsDB, RunDir, checkpoint_file, write_run_files


def test_round_trip_and_resume(tmp_path):
    db = ResultsDB(tmp_path / "runs.db")
    db.start_run("a", config={"train": {"epochs": 2}}, run_dir=tmp_path / "a")
    db.log_epoch("a", 0, {"loss": 3.0, "knn_top1": 0.5})
    db.log_epoch("a", 1, {"loss": float("nan")})
    db.log_epoch("a", 1, {"loss": 2.0})  # a resumed run rewrites the epoch it was in
    assert db.get_run("a")["status"] == "running"
    db.finish_run("a", "finished", {"knn_top1": 0.7})
    run = db.get_run("a")
    assert run["status"] == "finished" and run["final_metrics"] == {"knn_top1": 0.7}
    assert run["config"] == {"train": {"epochs": 2}}
    assert db.epochs("a") == [{"epoch": 0, "loss": 3.0, "knn_top1": 0.5}, {"epoch": 1, "loss": 2.0}]
    db.start_run("a", config={"train": {"epochs": 2}})  # resumed: same row, running again, epochs kept
    assert db.get_run("a")["status"] == "running" and len(db.epochs("a")) == 2
    db.finish_run("a", "diverged", message="non-finite loss at step 7")
    assert [r["run_id"] for r in db.runs(status="diverged")] == ["a"]
    assert db.get_run("a")["message"] == "non-finite loss at step 7"
    with pytest.raises(ValueError):
        db.finish_run("a", "exploded")
    with pytest.raises(KeyError):
        db.get_run("missing")
    mode = sqlite3.connect(tmp_path / "runs.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def _writer(path: str, worker: int, n: int) -> None:
    db = ResultsDB(path)
    run_id = f"w{worker}"
    db.start_run(run_id, config={"worker": worker})
    for e in range(n):
        db.log_epoch(run_id, e, {"loss": float(e), "worker": worker})
    db.finish_run(run_id, "finished", {"epochs": n})


def test_concurrent_writers(tmp_path):
    path, workers, n = str(tmp_path / "runs.db"), 4, 30
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, w, n)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * workers
    db = ResultsDB(path)
    assert len(db.runs(status="finished")) == workers
    for w in range(workers):
        rows = db.epochs(f"w{w}")
        assert [r["epoch"] for r in rows] == list(range(n)) and {r["worker"] for r in rows} == {w}


_SCHEMA_READER = """
import sqlite3, sys, time
from pathlib import Path
folder, n = Path(sys.argv[1]), int(sys.argv[2])
seen = []
for i in range(n):
    path = folder / f"{i}.db"
    (folder / f"{i}.ready").touch()  # the creator starts only once this reader polls
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        except sqlite3.OperationalError:
            continue  # not created yet
        try:
            names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.OperationalError:
            continue
        finally:
            con.close()
        seen.append(len(names))
        if len(names) == 3:
            break
print(" ".join(map(str, seen)))
"""


@pytest.mark.slow
def test_schema_appears_all_at_once_to_another_process(tmp_path):
    """A reader polling while another process creates runs.db sees no table or every table, never some."""
    import subprocess
    import sys
    import time

    from protoclr.runs import TABLES

    assert len(TABLES) == 3
    n = 25
    reader = subprocess.Popen([sys.executable, "-c", _SCHEMA_READER, str(tmp_path), str(n)], stdout=subprocess.PIPE,
                              text=True)
    for i in range(n):
        deadline = time.time() + 60
        while not (tmp_path / f"{i}.ready").exists() and time.time() < deadline:
            time.sleep(0.001)
        time.sleep(0.005)  # let the reader reach its polling loop
        ResultsDB(tmp_path / f"{i}.db")
    out, _ = reader.communicate(timeout=120)
    seen = [int(x) for x in out.split()]
    assert seen.count(3) == n, "the reader never saw some database complete"
    assert set(seen) <= {0, 3}, f"partial schemas seen: {sorted(set(seen) - {0, 3})} tables"


def test_reader_of_a_database_without_tables_gets_a_clear_error(tmp_path):
    from protoclr.errors import NotADatabase
    from protoclr.report import load_groups

    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()  # a file a writer has opened but not yet filled
    with pytest.raises(NotADatabase, match="holds no protoclr tables"):
        load_groups(empty)
    junk = tmp_path / "junk.db"
    junk.write_text("not a database at all, just some text that is long enough" * 20)
    with pytest.raises(NotADatabase, match="is not an SQLite database"):
        load_groups(junk)


def test_run_dir_names_the_files_and_reads_the_records_the_log_wrote(tmp_path):
    run = RunDir(tmp_path / "r")
    names = (run.config.name, run.meta.name, run.checkpoint.name, run.metrics_file.name, run.db.name)
    assert names == ("config.yaml", "meta.json", "checkpoint.pt", "metrics.jsonl", "runs.db")
    assert run.db == tmp_path / "runs.db" and checkpoint_file(tmp_path / "x.pt") == tmp_path / "x.pt"
    write_run_files(run.path, config_yaml="a: 1\n", meta={"x": 1})
    assert checkpoint_file(run.path) == run.checkpoint and run.read_meta() == {"x": 1}
    assert run.records() == [] and run.epochs() == []  # no metrics.jsonl yet
    written = [{"kind": "step", "step": 1, "loss": 2.0}, {"kind": "epoch", "epoch": 0, "step": 1},
               {"kind": "step", "step": 2, "loss": 1.5}]
    log = MetricsLog(run.metrics_file)
    for record in written:
        log.write(record)
    log.close()
    with open(run.metrics_file, "a") as f:
        f.write('{"kind": "epoch", "ep')  # a line cut short by a kill
    assert run.records() == written and run.epochs() == [written[1]]
    MetricsLog(run.metrics_file, resume_step=1, resume_epoch=0).close()  # resumed from step 1, inside epoch 0
    assert run.records() == written[:1]
