"""protoclr.report: statistics against hand-computed values, every section rendered from a synthetic
database (numbers traced to their runs), empty studies said plainly, self-contained HTML."""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from pathlib import Path

import pytest

from protoclr import claims as C
from protoclr import report as R
from protoclr import sweep as S
from protoclr.config import Config
from protoclr.runs import ResultsDB


def test_mean_std_and_fmt():
    m, s, n = R.mean_std([0.5, 0.7])
    assert (m, n) == (pytest.approx(0.6), 2) and s == pytest.approx(math.sqrt(0.02))  # sample std
    assert R.fmt([0.5, 0.7], scale=100) == "60.00 ± 14.14 (n=2)"
    assert R.fmt([0.5], scale=100) == "50.00 ± - (n=1)"
    assert R.fmt([]) == "no runs"


def test_spearman():
    assert R.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert R.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert R.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    assert R.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # ties: average ranks
    assert math.isnan(R.spearman([1, 2], [2, 1]))
    with pytest.raises(ValueError, match="differ in length"):
        R.spearman([1, 2, 3], [1, 2])


def _add(db_path: Path, sweep: str, study: str, point: dict, seed: int, config: Config, *, acc: float | None,
         status: str = "finished", bias: float = 30.0, epochs: int = 2, extra: dict | None = None) -> None:
    digest = hashlib.sha256(json.dumps(point, sort_keys=True).encode()).hexdigest()[:8]  # the same in every process
    rid = f"{sweep}-{digest}-s{seed}"
    db = ResultsDB(db_path)
    db.start_run(rid, config=config.to_dict(), run_dir=db_path.parent / rid)
    for e in range(epochs):
        db.log_epoch(rid, e, {"epoch": e, "loss": 5.0 - e - 0.1 * seed, "knn_top1": 0.3 + 0.1 * e,
                              "diag_attraction_sup": -0.5, "diag_attraction_surrogate": -0.6 - 0.01 * e,
                              "diag_attraction_ssl": -0.55, "diag_attraction_gap": 0.05 / (e + 1),
                              "diag_repulsion_sup": 0.4, "diag_repulsion_ssl": 1.2, "diag_repulsion_gap": 0.8,
                              "diag_repulsion_gap/alpha2_nu1": 1.5 + 0.1 * e + 0.01 * seed,
                              "diag_nu1_violates": float(e == 0)})
    final = {"diag_bias_angle_deg": bias, "diag_attraction_gap": 0.05 / epochs + 0.01 * seed}
    final |= {"eval_linear_top1": acc} if acc is not None else {}
    final |= extra or {}
    db.finish_run(rid, status, final)
    con = sqlite3.connect(db_path)
    spec = {"config": config.to_dict(), "source": f"configs/cpu/{sweep}.yaml", "command": f"protoclr sweep {sweep}"}
    con.execute("INSERT INTO sweep_runs (run_id, sweep, study, point, seed, spec, state, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, 'done', 0)", (rid, sweep, study, json.dumps(point), seed, json.dumps(spec)))
    con.commit()
    con.close()


@pytest.fixture
def synthetic_db(tmp_path) -> Path:
    path = S.init_db(tmp_path / "runs.db")
    for loss in ("balanced", "generalized_nt_xent"):
        for alpha in (1.0, 2.0):
            for lam in (1.0, 4.0):
                for seed in (0, 1):
                    c = Config()
                    c.loss.name, c.loss.alpha, c.loss.lam = loss, alpha, lam
                    acc = 0.5 + 0.05 * alpha + 0.01 * lam + 0.02 * seed + (0.1 if loss == "balanced" else 0)
                    _add(path, "grid", "loss_balance", {"loss.name": loss, "loss.alpha": alpha, "loss.lam": lam}, seed,
                         c, acc=acc)
    for i, mods in enumerate(([], ["add_rotation"], ["no_color"])):
        for seed in (0, 1):
            c = Config()
            c.data.view_modifiers = mods
            _add(path, "aug", "augmentation", {"data.view_modifiers": mods}, seed, c, acc=0.8 - 0.1 * i,
                 bias=30.0 + 5 * i + seed)
    for sim in ("cosine", "dot"):
        for seed in (0, 1):
            c = Config()
            c.loss.similarity = sim
            diverged = sim == "dot" and seed == 1
            _add(path, "sim", "similarity", {"loss.similarity": sim}, seed, c,
                 acc=None if diverged else (0.7 if sim == "cosine" else 0.2), status="diverged" if diverged else
                 "finished")
    for target in ("shared", "momentum"):
        for seed in (0, 1):
            c = Config()
            c.target.name = target
            _add(path, "tg", "targets", {"target.name": target}, seed, c, acc=0.6 if target == "shared" else 0.65)
    return path


def test_class_balance_section_shows_both_probes(tmp_path):
    path = S.init_db(tmp_path / "runs.db")
    for profile, pre in (("longtail", 0.30), ("uniform", 0.52)):
        for seed in (0, 1):
            c = Config()
            c.data.class_profile = profile
            _add(path, "cb", "class_balance", {"data.class_profile": profile}, seed, c,
                 acc=0.50 - (0.05 if profile == "longtail" else 0) + 0.01 * seed,
                 extra={"eval_linear_top1_pretrain_set": pre + 0.02 * seed, "eval_knn_top1": 0.4})
    md = R.write_report(path, tmp_path / "r").read_text()
    section = md[md.index("## Class balance"):]
    assert "| cb | class_profile=longtail | 45.50 ± 0.71 (n=2) | 31.00 ± 1.41 (n=2) | 40.00 ± 0.00 (n=2) | no runs |" \
        in section
    assert "| cb | class_profile=uniform | 50.50 ± 0.71 (n=2) | 53.00 ± 1.41 (n=2) |" in section
    assert "| class_balance | long-tailed (ImageNet-LT) | ImageNet-LT | 13.65 | cifar10_zip" not in md  # F-MNIST
    assert "| class_balance | long-tailed (ImageNet-LT) | ImageNet-LT | 13.65 | fashion_mnist: " in md


def test_paper_table_says_when_every_run_diverged(tmp_path):
    path = S.init_db(tmp_path / "runs.db")
    for seed in (0, 1):
        c = Config()
        c.loss.similarity = "dot"
        _add(path, "sim", "similarity", {"loss.similarity": "dot"}, seed, c, acc=None, status="diverged",
             extra={"eval_linear_top1_last_good": 0.10 + 0.02 * seed})
    md = R.write_report(path, tmp_path / "r").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| similarity | dot product"))
    assert "diverged in 2 of 2 runs (last good checkpoint: 11.00 ± 1.41 (n=2))" in row


def test_report_every_section_with_traceable_numbers(synthetic_db, tmp_path):
    out = tmp_path / "report"
    md = R.write_report(synthetic_db, out).read_text()
    for heading in ("## Against the paper", "## Balancing the loss", "## Augmentations and prototype bias",
                    "## Similarity measure", "## Class balance", "## Bound terms and gaps over training",
                    "## Training curves", "## Every point", "## Prototype estimators (target branch)"):
        assert heading in md
    # balanced, alpha=2, lam=4: seeds 0.74 and 0.76 -> 75.00 ± 1.41 (n=2), the best of its grid
    assert "| grid | name=balanced, alpha=2, lam=4 | 75.00 ± 1.41 (n=2) |" in md
    best = [line for line in md.splitlines() if line.startswith("| loss_balance | balanced loss, best (paper: alpha=4")]
    assert best and "alpha=2, lam=4" in best[0] and "75.00 ± 1.41 (n=2)" in best[0] and "67.40" in best[0]
    # bias decreasing accuracy: rank correlation -1 here and in the paper's three sets
    assert "over the 3 augmentation sets: -1.00 (paper, over its 3 sets with a reported bias: -1.00)" in md
    # the diverged dot-product seed is counted, not averaged in
    assert "| sim | similarity=dot | 20.00 ± - (n=1) |" in md and "2/2 done, 1 diverged" in md
    assert "| fashion_mnist: similarity=dot | 20.00 ± - (n=1); 1 of 2 runs diverged |" in md  # paper table
    # targets: accuracy, then the final attraction gaps of seeds 0 and 1 (0.025, 0.035) with the bias
    assert "| tg | name=momentum | 65.00 ± 0.00 (n=2) |" in md
    assert "| tg | name=shared | 0.0300 ± 0.0071 (n=2) |" in md and "targets_bounds.png" in md
    # bounds: the repulsion gap at nu = 1 beside the one at nu = min ||mu_y||, with the epochs violating nu = 1
    # (flagged at epoch 0 of each of the 2 runs: 2 of 4); last epoch 1.5 + 0.1 + 0.01 * seed -> 1.6050 ± 0.0071
    assert ("| grid | name=balanced, alpha=1, lam=1 | repulsion_gap at nu = 1 | 1.5050 | 1.6050 ± 0.0071 | 2 | "
            "2 of 4 |") in md
    # empty study: said, not filled
    assert "No runs of this study in the database (sweeps with `study: class_balance`)" in md
    assert "| class_balance | uniform class distribution | ImageNet-LT budget | 20.82 | - | no runs | - |" in md
    # provenance under every table
    assert md.count("Config: `configs/cpu/grid.yaml`; command: `protoclr sweep grid`") >= 2
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"heatmap_fashion_mnist_balanced.png", "bias_vs_accuracy_fashion_mnist.png", "bounds.png",
            "similarity_fashion_mnist.png"} <= set(pngs)
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in md
    html = (out / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") == len(pngs) and "src='http" not in html
    assert "<h2>Class balance</h2>" in html


def test_empty_database_says_so(tmp_path):
    path = S.init_db(tmp_path / "runs.db")
    md = R.write_report(path, tmp_path / "r").read_text()
    assert md.count("No runs of this study") == 6  # balance, augmentation, similarity, decoupled, classes, targets
    assert "No run in the database recorded per-epoch bound terms" in md
    assert not list((tmp_path / "r").glob("*.png"))


def test_missing_database_is_a_clear_error(tmp_path, capsys):
    from protoclr.cli import main

    assert main(["report", str(tmp_path / "nope.db"), "--out", str(tmp_path / "r")]) == 2
    assert "nope.db does not exist" in capsys.readouterr().err


def test_t_quantiles_and_paired_interval_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 9, 30, 31, 60, 200):
        assert C.t975(df) == pytest.approx(stats.t.ppf(0.975, df), rel=2e-3 if df > 30 else 1e-3)
    diffs = [1.2, 0.4, 2.0, 0.9, 1.5]
    m, lo, hi, n = C.paired_interval(diffs)
    ref = stats.t.interval(0.95, len(diffs) - 1, loc=stats.tmean(diffs), scale=stats.sem(diffs))
    assert (m, n) == (pytest.approx(1.2), 5)
    assert (lo, hi) == (pytest.approx(ref[0], rel=1e-3), pytest.approx(ref[1], rel=1e-3))
    assert C.verdict(lo, hi, sign=1) == "reproduced" and C.verdict(lo, hi, sign=-1) == "contradicted"
    assert C.verdict(-0.5, 0.7, sign=1) == "not shown" and C.verdict(-0.5, 0.7, sign=0, margin=1) == "reproduced"
    assert C.verdict(-0.5, 1.7, sign=0, margin=1) == "not shown"
    assert C.verdict(1.2, 1.7, sign=0, margin=1) == "contradicted"
    assert C.paired_interval([0.3])[3] == 1 and math.isnan(C.paired_interval([0.3])[1])


def test_claims_pair_runs_by_seed_and_config(tmp_path):
    """Pairs are the runs that differ only in the treatment keys, the seed shared; A - B per pair, averaged."""
    path = S.init_db(tmp_path / "runs.db")
    truth = {0: (0.61, 0.60), 1: (0.64, 0.60), 2: (0.60, 0.61)}  # seed -> (balanced, generalized at its own scale)
    for seed, (bal, gen) in truth.items():
        for name, acc in (("balanced", bal), ("generalized_nt_xent", gen)):
            c = Config()
            c.loss.name, c.loss.alpha, c.train.seed = name, 2.0, seed
            _add(path, "g", "loss_balance", {"loss.name": name}, seed, c, acc=acc)
        c = Config()  # a run with another alpha pairs with nothing
        c.loss.name, c.loss.alpha, c.train.seed = "balanced", 4.0, seed
        _add(path, "g", "loss_balance", {"loss.name": "balanced", "loss.alpha": 4.0}, seed, c, acc=0.9)
    groups, _ = R.load_groups(path)
    diffs = C.claim_pairs(groups, C.CLAIMS[0])
    assert sorted(diffs) == pytest.approx(sorted(100 * (b - g) for b, g in truth.values()))
    assert C.claim_pairs(groups, C.CLAIMS[1]) == []  # no generalized run at the balanced loss's scale
    md = R.write_report(path, tmp_path / "r").read_text()
    m, lo, hi, _ = C.paired_interval(diffs)
    assert md.index("## The paper's claims") < md.index("## Against the paper")
    assert f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}] (n=3) | not shown |" in md
