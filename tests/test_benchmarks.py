"""The recipe study's tools: the screen runs a plan end to end, the table computes what it says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from recipe_speeds import batch_size
from recipe_table import table
from test_cli import _tiny_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]


def test_table_deltas_are_against_the_base_run_and_missing_or_failed_runs_say_so():
    plan = {
        "runs": [
            {"name": "base", "overrides": [], "img_per_s": 1000, "steps": 100},
            {"name": "a8", "overrides": ["loss.alpha=8"], "img_per_s": 1000, "steps": 100},
            {"name": "bad", "overrides": ["optim.base_lr=99"], "steps": 100},
            {"name": "later", "overrides": ["train.batch_size=128"], "steps": 200},
        ]
    }
    results = [
        {"name": "a8", "knn_top1": 0.5586, "linear_top1": 0.6323},
        {"name": "base", "knn_top1": 0.5367, "linear_top1": 0.6198},
        {"name": "bad", "error": "RuntimeError: diverged at step 3"},
    ]
    rows = table(plan, results).splitlines()
    assert rows[2] == "| base | (the base) | 1000 | 100 | 53.67% | 61.98% | +0.00 | +0.00 |"
    assert rows[3] == "| a8 | `loss.alpha=8` | 1000 | 100 | 55.86% | 63.23% | +2.19 | +1.25 |"
    assert rows[4].startswith("| bad | `optim.base_lr=99` | - | 100 | failed: RuntimeError: diverged at step 3")
    assert rows[5].startswith("| later | `train.batch_size=128` | - | 200 | not run")
    with pytest.raises(SystemExit, match="'base'"):
        table(plan, results[:1])


def test_batch_size_is_read_from_the_overrides():
    assert batch_size(["loss.alpha=8"]) == 256
    assert batch_size(["data.dataset=x", "train.batch_size=128"]) == 128


@pytest.mark.slow
def test_screen_trains_each_run_for_its_steps_and_scores_it(tmp_path):
    _tiny_fashion_mnist(tmp_path / "fm")
    small = [
        "model.convnet_widths=8,16",
        "model.projector_hidden_dim=32",
        "model.projector_dim=16",
        "train.batch_size=50",
    ]
    plan = {
        "base": ["data.dataset=fashion_mnist", f"data.root={tmp_path / 'fm'}", *small],
        "runs": [
            {"name": "base", "overrides": [], "steps": 3},
            {"name": "nan", "overrides": ["optim.base_lr=1e30", "train.on_nonfinite=stop"], "steps": 3},
        ],
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "recipe_screen.py"),
            str(tmp_path / "plan.json"),
            "--out",
            str(tmp_path / "scr"),
            "--workers",
            "1",
            "--threads",
            "1",
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    res = {r["name"]: r for r in map(json.loads, (tmp_path / "scr" / "results.jsonl").read_text().splitlines())}
    assert res["base"]["steps"] == 3 and 0.1 <= res["base"]["knn_top1"] <= 1 and "linear_top1" in res["base"]
    assert "error" in res["nan"], res["nan"]
    out = table(plan, list(res.values()))
    assert f"{100 * res['base']['knn_top1']:.2f}%" in out and "| nan |" in out


@pytest.mark.slow
def test_eval_speed_runs_every_stage_and_prints_the_ratios(tmp_path):
    _tiny_fashion_mnist(tmp_path / "fm")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "eval_speed.py"), "--root", str(tmp_path / "fm"),
         "--train-images", "200", "--test-images", "50", "--train-steps", "1"],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    ).stdout
    for line in ("forward + backward", "now / before", "now / NCHW weights", "float64 on the same features",
                 "probe / one sklearn fit", "probe / previous"):
        assert line in out, out


def test_measurement_share_reads_wall_from_the_db_and_training_from_the_step_records(tmp_path):
    """Two runs: one finished (wall 100 s; steps 10 and 20 at 256 images / 64 img/s and 128 img/s: 40 + 20 s of
    training), one still running (left out)."""
    from eval_speed import measurement_share

    from protoclr.config import Config
    from protoclr.runs import ResultsDB

    db = ResultsDB(tmp_path / "runs.db")
    cfg = Config()
    cfg.train.batch_size = 256
    for rid in ("done", "busy"):
        db.start_run(rid, config=cfg.to_dict(), run_dir=tmp_path / rid)
        (tmp_path / rid).mkdir()
        (tmp_path / rid / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
            {"kind": "step", "step": 10, "img_per_s": 64.0}, {"kind": "epoch", "epoch": 0, "step": 10},
            {"kind": "step", "step": 20, "img_per_s": 128.0})) + "\n")
    db.finish_run("done", "finished", {})
    import sqlite3

    con = sqlite3.connect(tmp_path / "runs.db")
    con.execute("UPDATE runs SET created = 1000, updated = 1100 WHERE run_id = 'done'")
    con.commit()
    con.close()
    assert measurement_share(tmp_path) == [("done", 100.0, pytest.approx(10 * 256 / 64 + 10 * 256 / 128))]
