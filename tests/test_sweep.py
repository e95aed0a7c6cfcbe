"""protoclr.sweep: grid parsing and errors, run ids, claims under dead and live workers, a database that
survives a killed writer, SLURM job scripts and database merging, and a tiny sweep end to end with a killed
worker and a resume (no duplicated or lost rows)."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from protoclr import measure as M
from protoclr import splits
from protoclr import sweep as S
from protoclr.measure import final_metrics
from protoclr.runs import ResultsDB, has_schema, load_run

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------
# a tiny image-folder dataset: 4 classes, 24 train / 8 test images each, 28x28


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("test", 8)):
        for c in range(4):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = np.zeros((28, 28, 3), np.uint8)
                img[:, :, c % 3] = 60 * (c + 1)
                img = np.clip(img + rng.integers(0, 60, (28, 28, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def _sweep_file(tmp: Path, data: Path, *, epochs: int = 2, extra: dict | None = None) -> Path:
    spec = {
        "study": "loss_balance",
        "seeds": 2,
        "overrides": {"data.dataset": "image_folder", "data.root": str(data), "train.batch_size": 16,
                      "train.epochs": epochs, "model.projector_hidden_dim": 32, "model.projector_dim": 16,
                      "trainer.progress": False, "trainer.loggers": [], "trainer.precision": "32-true",
                      "eval.train_images": 0, "eval.diagnostics": True, "eval.diag_images": 16, "eval.diag_views": 2,
                      "eval.batch_size": 64},
        "grid": {"loss.lam": [1, 2]},
        **(extra or {}),
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "PROTOCLR_CACHE": str(tmp / "cache"), "PYTHONPATH": str(REPO / "src")}


# ----------------------------------------------------------------------------------------------------------
# parsing and errors


def test_parse_grid_arg_values_and_brackets():
    assert S.parse_grid_arg("loss.alpha=0.5,1,2") == ("loss.alpha", [0.5, 1, 2])
    assert S.parse_grid_arg("data.view_modifiers=[],[no_blur,add_cutout]") == (
        "data.view_modifiers", [[], ["no_blur", "add_cutout"]])
    assert S.parse_grid_arg("loss.name=balanced,nt_xent") == ("loss.name", ["balanced", "nt_xent"])


@pytest.mark.parametrize("arg, why", [
    ("alpha", "expected section.key=v1,v2"),
    ("loss.alpha", "expected section.key=v1,v2"),
    ("loss.alpha=", "empty value"),
    ("loss.alpha=1,,2", "empty value"),
    ("loss.alpha=1,1", "repeated"),
    ("loss.alph=1,2", "unknown config key 'loss.alph'"),
    ("loss.alpha=-1,2", "loss.alpha: must be > 0"),
    ("loss.alpha=fast", "expected a number"),
])
def test_bad_grid_names_the_argument(arg, why, capsys):
    from protoclr.cli import main

    rc = main(["sweep", "--grid", arg, "--plan", "--out", "/nonexistent/never-created", str(_base_config_file())])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"--grid {arg!r}" in err and why in err


def test_a_grid_without_a_file_sweeps_the_defaults_and_no_grid_says_how(tmp_path, capsys):
    from protoclr.cli import main

    out = tmp_path / "lam"
    assert main(["sweep", "--grid", "loss.lam=1,2", "--seeds", "2", "--set", "train.steps=3", "--plan", "--out",
                 str(out)]) == 0
    lines = [ln.split()[0] for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ")]
    assert len(lines) == 4 and all(rid.startswith("sweep-lam") for rid in lines), lines
    assert main(["sweep", "--plan"]) == 2
    err = capsys.readouterr().err
    assert "give --grid KEY=V1,V2 to sweep the defaults" in err and len(err.strip().splitlines()) == 1


def _base_config_file() -> Path:
    path = Path(os.environ.get("PYTEST_TMP_BASE", "/tmp")) / "protoclr_sweep_base.yaml"
    path.write_text("loss: {name: balanced}\n")
    return path


@pytest.mark.parametrize("text, why", [
    ("grid: {loss.alpha: [1]}\nepochs: 3\n", "unknown key 'epochs'"),
    ("grid: {loss.alpha: 2}\n", "non-empty list"),
    ("grid: {loss.temp: [1, 2]}\n", r"grid.loss.temp: unknown config key 'loss.temp'"),
    ("grid: {loss.alpha: [1]}\nevaluate: {probe_views: 4}\n",
     r"unknown key 'evaluate'.*put eval\.\* keys under overrides"),
    ("overrides:\n  train.epochs: 4\n  loss.lam: 2\n  train.epochs: 8\ngrid: {loss.alpha: [1]}\n",
     r"bad\.yaml: line 4: key 'train.epochs' is given twice \(first at line 2\)"),
    ("grid: {loss.alpha: [1]\n", r"bad\.yaml: not valid YAML"),
    ("base: missing.yaml\ngrid: {loss.alpha: [1]}\n", r"base config .*missing\.yaml does not exist"),
], ids=["unknown-key", "scalar-grid", "unknown-config-key", "unknown-eval-option", "duplicate-key", "bad-yaml",
        "missing-base"])
def test_sweep_file_errors(tmp_path, text, why):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(S.SweepError, match=why):
        S.load_sweep_file(bad)


def test_run_ids_deterministic_and_distinct(tmp_path, tiny_data):
    sweep = S.load_sweep_file(_sweep_file(tmp_path, tiny_data))
    a, b = S.expand(sweep), S.expand(sweep)
    assert [r.run_id for r in a] == [r.run_id for r in b]
    assert len({r.run_id for r in a}) == 4
    assert [(r.point["loss.lam"], r.seed) for r in a] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    # where a run executes does not change what it is; what it computes does
    moved = S.expand(sweep, extra=["trainer.devices=2", "data.num_workers=1"])
    assert [r.run_id for r in moved] == [r.run_id for r in a]
    longer = S.expand(sweep, extra=["train.epochs=3"])
    assert not {r.run_id for r in longer} & {r.run_id for r in a}


# ----------------------------------------------------------------------------------------------------------
# claims


SWEEP_FILES = sorted((REPO / "configs").glob("*/*.yaml"))


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_sweep_files_expand(path):
    """Every sweep file under configs/cpu and configs/paper loads, names a study the report draws, and expands
    to distinct valid runs; the CPU studies have at least 2 seeds per point (the report's mean +- std)."""
    sweep = S.load_sweep_file(path)
    assert sweep.study in S.STUDIES[1:], f"{path}: study {sweep.study!r}"
    runs = S.expand(sweep)
    points = int(np.prod([len(v) for v in sweep.grid.values()]))
    assert len({r.run_id for r in runs}) == len(runs) == sweep.seeds * points
    assert all(r.config["train"]["seed"] == r.seed for r in runs)
    if path.parent.name == "cpu":
        assert sweep.seeds >= 2


def test_sweep_files_cover_every_study():
    """configs/paper has a sweep for every study but targets (no paper number); configs/cpu holds the CPU plan's
    four files (docs/results/cpu/plan.md: the bounds claims read the baseline arm of balance.yaml)."""
    studies = {S.load_sweep_file(p).study for p in SWEEP_FILES}
    have = {folder: {S.load_sweep_file(p).study for p in SWEEP_FILES if p.parent.name == folder}
            for folder in ("cpu", "paper")}
    assert have["paper"] == set(S.STUDIES[1:]) - {"targets"}
    assert have["cpu"] == {"loss_balance", "augmentation", "similarity", "class_balance"}
    assert studies <= set(S.STUDIES[1:])


@pytest.mark.parametrize("profile", ["longtail", "uniform"])
def test_class_profiled_runs_probe_on_a_balanced_draw(tiny_data, profile):
    """A long-tailed and a uniform run fit their final probes on the same balanced draw of the unprofiled
    split; an unprofiled run fits them on its own pretraining set."""
    from protoclr.config import load_config
    from protoclr.splits import class_profiled, load_data, longtail_counts, probe_fit_set

    base = ["data.dataset=image_folder", f"data.root={tiny_data}", "data.imbalance_ratio=4"]
    cfg = load_config(None, [*base, f"data.class_profile={profile}", "eval.train_images=40"])
    split, train = load_data(cfg, class_profile=False)[0], load_data(cfg)[0]
    pool = probe_fit_set(split, cfg)
    assert pool.class_counts(4).tolist() == [10, 10, 10, 10]
    assert len(train) == sum(longtail_counts(24, 4, imbalance_ratio=4))  # the long tail or its uniform twin
    assert torch.equal(class_profiled(split, cfg.data, seed=0).labels, train.labels)  # drawn from the split
    every = load_config(None, [*base, f"data.class_profile={profile}", "eval.train_images=0"])
    everything = probe_fit_set(split, every)
    assert everything.class_counts(4).tolist() == [24] * 4  # 0 = as many as the smallest class allows
    other = probe_fit_set(split, load_config(None, [*base, "data.class_profile=longtail", "eval.train_images=40"]))
    assert torch.equal(other.labels, pool.labels) and other.files == pool.files  # same draw for both profiles
    plain = load_config(None, [*base, "eval.train_images=0"])
    assert probe_fit_set(split, plain) is split


# ----------------------------------------------------------------------------------------------------------
# cluster jobs


def test_slurm_scripts_and_merge(tmp_path, tiny_data):
    from protoclr import jobs, runs

    sweep = S.load_sweep_file(_sweep_file(tmp_path, tiny_data))
    specs = S.expand(sweep)
    out = tmp_path / "out"
    rc = S.cli_main([str(tmp_path / "tiny.yaml"), "--out", str(out), "--submit", "slurm", "--slurm-partition", "gpu",
                     "--slurm-gpus", "4", "--slurm-setup", "source .venv/bin/activate"])
    assert rc == 0
    scripts = sorted((out / "slurm").glob("*.sbatch"))
    assert [p.stem for p in scripts] == sorted(r.run_id for r in specs)
    text = scripts[0].read_text()
    rid = scripts[0].stem
    for line in ("#SBATCH --gres=gpu:4", "#SBATCH --partition=gpu", "source .venv/bin/activate",
                 f"-m protoclr.sweep _job {out / 'jobs' / rid} {rid} trainer.devices=4"):
        assert line in text
    assert (out / "slurm" / "submit_all.sh").read_text().count("sbatch ") == 4
    # each job database holds its run's spec; a finished job's rows merge back, newer rows win
    for r in specs:
        job_db = out / "jobs" / r.run_id / "runs.db"
        assert jobs.states(job_db, [r.run_id])[r.run_id]["state"] == "pending"
        assert runs.run_spec(job_db, r.run_id)["config"] == r.config
        jdb = ResultsDB(job_db)
        jdb.start_run(r.run_id, config=r.config, run_dir=out / "jobs" / r.run_id / r.run_id)
        for e in range(2):
            jdb.log_epoch(r.run_id, e, {"loss": 1.0 - e})
        jdb.finish_run(r.run_id, "finished", {"eval_linear_top1": 0.5})
        runs.release_run(job_db, r.run_id, "done")
    assert S.cli_main(["--merge", str(out)]) == 0
    main = ResultsDB(out / "runs.db")
    assert len(main.runs()) == 4 and all(r["status"] == "finished" for r in main.runs())
    assert all(len(main.epochs(r.run_id)) == 2 for r in specs)
    assert all(s["state"] == "done" for s in jobs.states(out / "runs.db", [r.run_id for r in specs]).values())
    assert runs.merge_databases(out / "runs.db", sorted(out.glob("jobs/*/runs.db"))) == 0  # idempotent


# ----------------------------------------------------------------------------------------------------------
# end to end


def _rows(db_path: Path) -> tuple[list[tuple], list[tuple]]:
    """(runs, epochs) rows; both empty while the sweep has opened the file but not yet created its tables."""
    con = sqlite3.connect(db_path)
    try:
        if not has_schema(con):
            return [], []
        runs = con.execute("SELECT run_id, status FROM runs ORDER BY run_id").fetchall()
        epochs = con.execute("SELECT run_id, epoch FROM epochs ORDER BY run_id, epoch").fetchall()
    finally:
        con.close()
    return runs, epochs


@pytest.mark.slow
def test_tiny_sweep_killed_then_resumed_then_reported(tmp_path, tiny_data):
    path = _sweep_file(tmp_path, tiny_data, epochs=3)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "protoclr.cli", "sweep", str(path), "--out", str(out), "--workers", "2"]
    proc = subprocess.Popen(cmd, env=_env(tmp_path), cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while time.time() < deadline:  # kill every process of the sweep once the first epoch is in the database
        time.sleep(0.1)
        if (out / "runs.db").is_file() and any(e >= 0 for _, e in _rows(out / "runs.db")[1]):  # past step 0
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    runs, _ = _rows(out / "runs.db")
    assert runs and any(status != "finished" for _, status in runs), "the sweep finished before it was killed"

    done = subprocess.run(cmd, env=_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 finished" in done.stdout
    runs, epochs = _rows(out / "runs.db")
    ids = [r.run_id for r in S.expand(S.load_sweep_file(path))]
    assert runs == [(rid, "finished") for rid in sorted(ids)]  # no lost or duplicated runs
    assert epochs == [(rid, e) for rid in sorted(ids) for e in range(-1, 3)]  # step 0, then every epoch once
    db = ResultsDB(out / "runs.db")
    final = {rid: db.get_run(rid)["final_metrics"] for rid in ids}
    for rid in ids:
        assert all("diag_attraction_gap" in e for e in db.epochs(rid))  # diagnostics merged into every epoch
    # a run's final metrics are measure.final_metrics of its checkpoint, recomputed here
    encoder, cfg = load_run(out / ids[0])
    split, test, spec = splits.load_data(cfg, class_profile=False)
    again = final_metrics(encoder, {"": splits.probe_fit_set(split, cfg)}, test, spec, cfg)
    assert {M.EVAL_KNN, M.EVAL_LINEAR} <= set(again) and {k: final[ids[0]][k] for k in again} == again

    again = subprocess.run(cmd, env=_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and _rows(out / "runs.db") == (runs, epochs)  # nothing re-run

    # --reevaluate: fresh final probes for every finished run, no training, nothing duplicated
    stamp = {rid: db.get_run(rid)["updated"] for rid in ids}
    steps = {rid: [e["step"] for e in db.epochs(rid)] for rid in ids}
    rev = subprocess.run([*cmd, "--reevaluate"], env=_env(tmp_path), cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert rev.returncode == 0 and "re-evaluating 4 finished run(s)" in rev.stdout, rev.stdout + rev.stderr
    assert _rows(out / "runs.db") == (runs, epochs)
    for rid in ids:
        row = db.get_run(rid)
        assert row["updated"] > stamp[rid] and row["final_metrics"] == final[rid]  # reproduced exactly
        assert [e["step"] for e in db.epochs(rid)] == steps[rid]

    from protoclr.report import write_report

    md = write_report(out / "runs.db", tmp_path / "report").read_text()
    assert "## Augmentations and prototype bias" not in md  # a study without runs gets no section
    for heading in ("## The paper's claims", "## Against the paper", "## Balancing the loss", "## Bound terms",
                    "## Training curves", "## Every point"):
        assert heading in md
    assert "(n=2)" in md and os.path.relpath(path.resolve(), REPO.resolve()) in md  # the sweep ran from REPO


def test_named_override_sets_make_points_that_are_not_a_product(tmp_path):
    path = tmp_path / "sets.yaml"
    path.write_text("seeds: 2\ngrid:\n  loss.name: [balanced, generalized_nt_xent]\n"
                    "  point: [{loss.alpha: 2, loss.lam: 1}, {loss.alpha: 4, loss.lam: 2}]\n")
    specs = S.expand(S.load_sweep_file(path))
    got = [(r.config["loss"]["name"], r.config["loss"]["alpha"], r.config["loss"]["lam"], r.seed) for r in specs]
    assert got == [(n, a, lam, s) for n in ("balanced", "generalized_nt_xent") for a, lam in ((2, 1), (4, 2))
                   for s in (0, 1)]  # 2 names x 2 sets, not the 2 x 2 x 2 product of alpha and lam
    assert specs[2].point == {"loss.name": "balanced", "loss.alpha": 4, "loss.lam": 2}
    assert len({r.run_id for r in specs}) == 8
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: {point: [{alpha: 2}]}\n")
    with pytest.raises(S.SweepError, match=r"grid\.point: a grid key without a dot lists override sets"):
        S.load_sweep_file(bad)
    bad.write_text("grid: {point: [{loss.alpha: -1}]}\n")
    with pytest.raises(S.SweepError, match=r"loss\.alpha: must be > 0"):
        S.load_sweep_file(bad)


def test_registered_specs_store_paths_relative_to_the_working_directory(tmp_path, tiny_data, monkeypatch):
    """A committed runs.db names its sweep file and base config relative to where the sweep ran, never by the
    machine's absolute path, and the stored path leads back to the same file."""
    from protoclr import runs

    (tmp_path / "configs" / "cpu").mkdir(parents=True)
    (tmp_path / "configs" / "base.yaml").write_text("train:\n  steps: 3\n")
    sweep_file = _sweep_file(tmp_path / "configs" / "cpu", tiny_data, extra={"base": "../base.yaml"})
    monkeypatch.chdir(tmp_path)
    sweep = S.load_sweep_file(sweep_file.resolve())  # typed as an absolute path
    specs = S.expand(sweep)
    db = S.init_db(tmp_path / "out" / "runs.db")
    S.register(db, sweep, specs, command="protoclr sweep")
    spec = runs.run_spec(db, specs[0].run_id)
    assert (spec["base"], spec["source"]) == ("configs/base.yaml", "configs/cpu/tiny.yaml")
    assert (tmp_path / spec["base"]).resolve() == (tmp_path / "configs" / "base.yaml").resolve()
    assert str(tmp_path) not in json.dumps(spec["base"]) + json.dumps(spec["source"])


# ----------------------------------------------------------------------------------------------------------
# what a person sees while a sweep runs


def test_sweep_prints_each_run_as_it_starts_and_ends_then_a_table_and_the_logs(tmp_path, tiny_data):
    path = _sweep_file(tmp_path, tiny_data, epochs=1, extra={"seeds": 1})  # 2 runs: loss.lam = 1, 2
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "protoclr.cli", "sweep", str(path), "--out", str(out)],
                          env=_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    db = ResultsDB(out / "runs.db")
    specs = S.expand(S.load_sweep_file(path))
    assert len(specs) == 2
    for r in specs:
        start = [ln for ln in lines if ln.split()[:2] == ["start", r.run_id]]
        assert len(start) == 1, done.stdout
        assert f"loss.lam={r.point['loss.lam']} seed 0" in start[0]
        if "(log: " in start[0]:  # absent only for a run that started and ended between two polls
            log = Path(start[0].split("(log: ")[1].rstrip(")"))
            assert log.parent == out / "logs" and log.is_file()
        end = [ln for ln in lines if ln.split()[:2] == ["end", r.run_id]]
        assert len(end) == 1 and lines.index(end[0]) > lines.index(start[0]), done.stdout
        fm = db.get_run(r.run_id)["final_metrics"]
        words = end[0].split()
        assert float(words[2]) >= 0 and words[3] == "min" and words[4] == "finished"
        # the printed probes are the database's (as percentages with two decimals)
        assert float(words[words.index("linear") + 1].rstrip("%")) == round(100 * fm["eval_linear_top1"], 2)
        assert float(words[words.index("kNN") + 1].rstrip("%")) == round(100 * fm["eval_knn_top1"], 2)
        row = [ln for ln in lines if ln.split()[:1] == [r.run_id]]  # the closing table
        assert len(row) == 1 and row[0].split()[1] == "finished"
        assert row[0].split()[-2:] == [f"{fm['eval_linear_top1']:.2%}", f"{fm['eval_knn_top1']:.2%}"]
    assert sum("(log: " in ln for ln in lines if ln.split()[:1] == ["start"]) >= 1, done.stdout
    assert "done: 2 finished" in done.stdout
    assert f"worker logs: {out / 'logs'}/" in done.stdout


def test_progress_names_a_failure_and_its_log(tmp_path):
    db_path = S.init_db(tmp_path / "runs.db")
    sweep = S.Sweep(name="f", base=None, grid={"loss.lam": [1, 2]}, seeds=1)
    specs = S.expand(sweep)
    S.register(db_path, sweep, specs, command="protoclr sweep f")
    ok, bad = (r.run_id for r in specs)
    db = ResultsDB(db_path)
    for rid in (ok, bad):
        db.start_run(rid, config={}, run_dir=tmp_path / rid)
    db.finish_run(ok, "finished", {"eval_linear_top1": 0.61234, "eval_knn_top1": 0.5})
    db.finish_run(bad, "failed", {}, message="RuntimeError: out of memory\n  at step 3")

    def state(rid, st, pid):
        return {"state": st, "pid": pid, "message": None, "status": None}

    buf = io.StringIO()
    progress = S.Progress(specs, db_path, {ok: state(ok, "pending", None), bad: state(bad, "pending", None)}, out=buf)
    logs = {11: tmp_path / "logs/worker-1-0.log", 12: tmp_path / "logs/worker-1-1.log"}
    progress({ok: state(ok, "pending", 11), bad: state(bad, "pending", 12)}, logs)
    progress({ok: state(ok, "done", None), bad: state(bad, "failed", None)}, logs)
    progress({ok: state(ok, "done", None), bad: state(bad, "failed", None)}, logs)  # nothing printed twice
    progress.table({ok: state(ok, "done", None), bad: state(bad, "failed", None)})
    text = buf.getvalue()
    assert text.count(f"start  {ok}  loss.lam=1 seed 0  (log: {logs[11]})") == 1
    assert text.count(f"end    {ok}") == 1 and "finished  linear 61.23%  kNN 50.00%" in text
    assert f"failed: RuntimeError: out of memory at step 3  (log: {logs[12]})" in text
    table = text.splitlines()[-2:]
    assert table[0].split()[:2] == [ok, "finished"] and table[0].split()[-2:] == ["61.23%", "50.00%"]
    assert table[1].split()[:2] == [bad, "failed"] and table[1].split()[-2:] == ["-", "-"]
