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
    final = {"diag_bias_angle_deg": bias, "diag_attraction_gap": 0.05 / max(epochs, 1) + 0.01 * seed}
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
    headings = ("## The paper's claims", "## Against the paper", "## Balancing the loss",
                "## Augmentations and prototype bias", "## Similarity measure",
                "## Prototype estimators (target branch)", "## Bound terms and gaps over training",
                "## Training curves", "## Every point")
    assert [md.index(h) for h in headings] == sorted(md.index(h) for h in headings)  # each once, in this order
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
    # a study without runs: no empty section, one line at the end
    assert "## Class balance" not in md and "Studies with no runs in this database: decoupled, class_balance." in md
    row = "| class_balance | uniform class distribution | ImageNet-LT budget (our reading) | 20.82 | - | no runs | - |"
    assert row in md
    # provenance under every table
    assert md.count("Config: `configs/cpu/grid.yaml`; command: `protoclr sweep grid`") >= 2
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"heatmap_fashion_mnist_balanced.png", "bias_vs_accuracy_fashion_mnist.png", "bounds.png",
            "similarity_fashion_mnist.png"} <= set(pngs)
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in md
    html = (out / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") == len(pngs) and "src='http" not in html
    assert "<h2>Similarity measure</h2>" in html


def test_empty_database_says_so(tmp_path):
    path = S.init_db(tmp_path / "runs.db")
    md = R.write_report(path, tmp_path / "r").read_text()
    assert "## The paper's claims" not in md and "--paper" in md  # no study here: no paper sections
    assert "No run in the database recorded per-epoch bound terms (runs record them with `eval.diagnostics=true`" in md
    assert not list((tmp_path / "r").glob("*.png"))
    md = R.write_report(path, tmp_path / "r", paper=True).read_text()
    assert "## The paper's claims" in md and "Studies with no runs in this database: loss_balance, augmentation" in md


def test_a_users_own_runs_come_first_with_not_measured_where_a_metric_was_off(tmp_path):
    """A database of runs outside any study: the runs table and curves open the report, no claims or paper
    rows saying "no runs", "not measured" for a metric the run did not record, curves against the step."""
    path = S.init_db(tmp_path / "runs.db")
    db = ResultsDB(path)
    db.start_run("mine", config=Config().to_dict(), run_dir=tmp_path / "mine")
    for epoch, step in ((-1, 0), (0, 10), (1, 20)):
        db.log_epoch("mine", epoch, {"epoch": epoch, "step": step, "loss": 1.0 - 0.1 * step, "knn_top1": 0.5})
    db.finish_run("mine", "finished", {"eval_linear_top1": 0.7, "eval_knn_top1": 0.6})
    groups, _ = R.load_groups(path)
    assert R._epoch_band(groups[0], "knn_top1")[0] == [0, 10, 20]  # x: the training step, step 0 first
    md = R.write_report(path, tmp_path / "r").read_text()
    assert md.index("## Every point") < md.index("## Training curves")
    assert "no runs" not in md and "## Against the paper" not in md
    row = next(line for line in md.splitlines() if line.startswith("| mine |"))
    assert "| 70.00 ± - (n=1) | 60.00 ± - (n=1) | not measured | not measured | 1/1 done |" in row


def test_missing_database_is_a_clear_error(tmp_path, capsys):
    from protoclr.cli import main

    assert main(["report", str(tmp_path / "nope.db"), "--out", str(tmp_path / "r")]) == 2
    assert "nope.db does not exist" in capsys.readouterr().err


def test_t_distribution_paired_test_and_mde_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 4, 9, 30, 31, 60, 200):
        for t in (-3.1, -0.4, 0.0, 0.7, 2.5, 12.0):
            assert C.t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), abs=1e-10)
        for q in (0.8, 0.975, 0.99808):
            assert C.t_ppf(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-7)
    diffs = [1.2, 0.4, 2.0, 0.9, 1.5]
    t = C.paired_test(diffs)
    ref = stats.t.interval(0.95, len(diffs) - 1, loc=stats.tmean(diffs), scale=stats.sem(diffs))
    assert (t.mean, t.n) == (pytest.approx(1.2), 5) and t.sd == pytest.approx(stats.tstd(diffs))
    assert (t.lo, t.hi) == (pytest.approx(ref[0], rel=1e-7), pytest.approx(ref[1], rel=1e-7))
    assert t.p == pytest.approx(stats.ttest_1samp(diffs, 0.0).pvalue, rel=1e-7)
    assert C.paired_test([0.3]).n == 1 and math.isnan(C.paired_test([0.3]).lo)
    # the MDE is the effect a two-sided t-test at the level detects with 80% power (scipy's noncentral t)
    for n, level in ((3, 0.05), (3, 0.05 / 13), (5, 0.05 / 13), (10, 0.01)):
        d = C.mde(sd=0.4, n=n, level=level)
        crit, nc = stats.t.ppf(1 - level / 2, n - 1), d / 0.4 * math.sqrt(n)
        assert stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc) == pytest.approx(0.8, abs=2e-3)


def test_holm_against_hand_computation():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone: 0.02, 0.03, 0.06, 0.06
    assert C.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert C.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and C.holm([]) == []


def _t(mean, lo, hi, n=5):
    return C.Test(mean, lo, hi, 1.0, math.nan, n)


def test_verdicts_follow_the_rule_fixed_before_the_runs():
    # a claim of a decrease whose interval straddles zero is not reproduced, whatever its mean says
    assert C.verdict(_t(-0.4, -0.9, 0.1), sign=-1, p_holm=0.2, mde_=2.0) == "no effect larger than the MDE"
    assert C.verdict(_t(-0.4, -0.9, 0.1), sign=-1, p_holm=0.2, mde_=0.5) == "inconclusive"
    assert C.verdict(_t(-0.4, -0.6, -0.2), sign=-1, p_holm=0.01, mde_=0.5) == "reproduced"
    assert C.verdict(_t(-0.4, -0.6, -0.2), sign=1, p_holm=0.01, mde_=0.5) == "contradicted"
    # significant before the correction, not after it: not reproduced
    assert C.verdict(_t(-0.4, -0.6, -0.2), sign=-1, p_holm=0.08, mde_=0.5) == "inconclusive"
    assert C.verdict(_t(-0.4, -0.6, -0.2, n=2), sign=-1, p_holm=0.001, mde_=0.5) == "too few runs"
    assert C.verdict(_t(0.1, -0.5, 0.7), sign=0, p_holm=math.nan, mde_=1, margin=1) == "reproduced"
    assert C.verdict(_t(0.6, -0.5, 1.7), sign=0, p_holm=math.nan, mde_=1, margin=1) == "inconclusive"
    assert C.verdict(_t(1.4, 1.2, 1.7), sign=0, p_holm=math.nan, mde_=1, margin=1) == "contradicted"
    assert C.sig3(-0.0099) == "-0.00990" and C.sig3(-0.0144) == "-0.0144" and C.sig3(0.23) == "+0.230"


def _cfg(seed: int, run_name: str, **kw) -> Config:
    c = Config()
    c.train.seed, c.train.run_name = seed, run_name
    for key, v in kw.items():
        sec, name = key.split("__")
        setattr(getattr(c, sec), name, v)
    return c


def test_claims_pair_runs_by_seed_and_config_across_sweeps(tmp_path):
    """Pairs: same seed, same config but the treatment; every run its own run name and the arms measured on
    different schedules (eval.every), as in a real sweep; unfinished runs never count."""
    path = S.init_db(tmp_path / "runs.db")
    truth = {0: (0.61, 0.60), 1: (0.64, 0.60), 2: (0.60, 0.615)}  # seed -> (lam 2, lam 1) linear accuracy
    for seed, (lam2, lam1) in truth.items():
        _add(path, "base", "bounds", {}, seed, _cfg(seed, f"base-s{seed}", loss__name="balanced", loss__alpha=8.0,
                                                     eval__every=1), acc=lam1)
        _add(path, "bal", "loss_balance", {"loss.lam": 2}, seed,
             _cfg(seed, f"bal-s{seed}", loss__name="balanced", loss__alpha=8.0, loss__lam=2.0, eval__every=0),
             acc=lam2)
        _add(path, "bal", "loss_balance", {"loss.lam": 2, "loss.alpha": 4}, seed,  # another alpha: pairs with none
             _cfg(seed, f"bal4-s{seed}", loss__name="balanced", loss__alpha=4.0, loss__lam=2.0), acc=0.9)
    _add(path, "bal", "loss_balance", {"loss.lam": 2}, 3,  # a seed-3 pair whose A run is still running
         _cfg(3, "bal-s3", loss__name="balanced", loss__alpha=8.0, loss__lam=2.0), acc=0.99, status="running")
    _add(path, "base", "bounds", {}, 3, _cfg(3, "base-s3", loss__name="balanced", loss__alpha=8.0), acc=0.5)
    groups, _ = R.load_groups(path)
    balance = next(c for c in C.CLAIMS if c.id == "balance")
    diffs = C.claim_units(groups, balance)
    assert sorted(diffs) == pytest.approx(sorted(100 * (a - b) for a, b in truth.values()))
    md = R.write_report(path, tmp_path / "r").read_text()
    t = C.paired_test(diffs)
    assert md.index("## The paper's claims") < md.index("## Against the paper")
    row = next(line for line in md.splitlines() if line.startswith("| balancing the loss"))
    assert f"{C.sig3(t.mean)} [{C.sig3(t.lo)}, {C.sig3(t.hi)}] (3 pairs) points" in row
    assert "inconclusive" in row or "no effect larger" in row  # n = 3 with this spread: nothing reproduced


def _epochs(db_path: Path, rid: str, steps: list[int], gaps: list[float]) -> None:
    db = ResultsDB(db_path)
    for e, (step, gap) in enumerate(zip(steps, gaps, strict=True)):
        db.log_epoch(rid, e - 1, {"epoch": e - 1, "step": step, "diag_attraction_gap": gap,
                                  "diag_attraction_sup": -0.4 + 0.01 * e, "diag_attraction_ssl": -0.7,
                                  "diag_repulsion_gap": 0.5})


def test_within_run_claims_read_last_minus_step_0_over_finished_runs_only(tmp_path):
    path = S.init_db(tmp_path / "runs.db")
    steps = [0, 195, 390, 585, 780, 975, 1000]
    curves = {0: [0.20, 0.15, 0.12, 0.110, 0.108, 0.107, 0.107], 1: [0.21, 0.14, 0.12, 0.112, 0.111, 0.110, 0.110],
              2: [0.19, 0.16, 0.13, 0.115, 0.112, 0.112, 0.111]}
    for seed, gaps in curves.items():
        _add(path, "base", "bounds", {}, seed, _cfg(seed, f"b{seed}", loss__name="balanced"), acc=0.6, epochs=0)
        _epochs(path, f"base-{hashlib.sha256(b'{}').hexdigest()[:8]}-s{seed}", steps, gaps)
    _add(path, "late", "bounds", {"x": 1}, 7, _cfg(7, "b7", loss__name="balanced"), acc=None, status="running",
         epochs=0)  # its last record is not the end of training: a large "shrink" that must not count
    _epochs(path, f"late-{hashlib.sha256(json.dumps({'x': 1}).encode()).hexdigest()[:8]}-s7", steps[:3],
            [0.9, 0.1, 0.05])
    groups, _ = R.load_groups(path)
    by_id = {c.id: c for c in C.CLAIMS}
    shrink = C.claim_units(groups, by_id["attraction_slack"])
    assert sorted(shrink) == pytest.approx(sorted(g[-1] - g[0] for g in curves.values()))  # last - first, < 0
    sup = C.claim_units(groups, by_id["attraction_supervised"])
    assert sup == pytest.approx([0.06] * 3)  # (sup - ssl) rises by 6 x 0.01: the supervised reading grows

    def slope(xs, ys):
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)

    flat = C.claim_units(groups, by_id["attraction_stabilizes"])
    want = [abs(slope([s / 1000 for s in steps[-3:]], g[-3:])) - 0.25 * abs(slope([s / 1000 for s in steps[:3]], g[:3]))
            for g in curves.values()]
    assert sorted(flat) == pytest.approx(sorted(want))
    res = {r.claim.id: r for r in C.answer(groups)}
    assert res["attraction_slack"].verdict == "reproduced" and res["attraction_supervised"].verdict == "contradicted"
    assert res["repulsion_larger"].test.mean == pytest.approx(0.5 - sum(g[-1] for g in curves.values()) / 3)




def test_the_papers_figures_live_in_one_table_that_claims_and_report_read():
    """Every number a claim's paper column prints is a figure of claims.PAPER (no second copy to drift), and the
    report's paper table is that same object."""
    import re

    figures = {f"{row[k]:.2f}" for row in C.PAPER for k in ("acc", "bias") if row.get(k) is not None}
    for claim in C.CLAIMS:
        for number in re.findall(r"\d+\.\d\d", claim.paper):
            assert number in figures, (claim.id, number)
    assert R.PAPER is C.PAPER
    assert C.fig("no_color") == "62.56" and C.fig("rotation", "bias") == "38.11"  # the paper's table, by hand


def test_the_mde_is_at_the_level_of_the_whole_planned_family_while_few_claims_are_answered(tmp_path):
    """Only the 5 bounds claims answered (3 runs), 13 directional claims planned: each MDE is at 0.05 / 13, the
    plan's level, not at 0.05 / 5."""
    path = S.init_db(tmp_path / "runs.db")
    steps = [0, 195, 390, 585, 780, 975, 1000]
    for seed, end in enumerate((0.107, 0.110, 0.111)):
        _add(path, "base", "bounds", {}, seed, _cfg(seed, f"b{seed}", loss__name="balanced"), acc=0.6, epochs=0)
        _epochs(path, f"base-{hashlib.sha256(b'{}').hexdigest()[:8]}-s{seed}", steps,
                [0.2, 0.15, 0.12, 0.11, 0.109, end, end])
    groups, _ = R.load_groups(path)
    res = {r.claim.id: r for r in C.answer(groups)}
    assert sum(r.test.n >= 3 for r in res.values()) == 5
    r = res["attraction_slack"]
    assert r.mde == pytest.approx(C.mde(sd=r.test.sd, n=3, level=0.05 / 13))
    assert r.mde > C.mde(sd=r.test.sd, n=3, level=0.05 / 5)


def test_a_sweep_over_the_defaults_names_them_as_its_config(tmp_path):
    """`protoclr sweep --grid ...` without a file registers no source and no base: the report says the defaults
    (it printed "Config: `None`")."""
    path = tmp_path / "runs.db"
    _add(path, "sweep", "", {"loss.lam": 1}, 0, Config(), acc=0.5)
    con = sqlite3.connect(path)
    con.execute("UPDATE sweep_runs SET spec = ?", (json.dumps({"config": Config().to_dict(), "source": "",
                                                               "base": None, "command": "protoclr sweep --grid"}),))
    con.commit()
    con.close()
    md = R.write_report(path, tmp_path / "r").read_text()
    assert "Config: `the built-in defaults`; command: `protoclr sweep --grid`" in md and "`None`" not in md


def test_the_paper_tables_baseline_rows_read_the_shared_baseline_arm(tmp_path):
    """The plan runs its baseline once (in the balance sweep) and pairs every comparison with it: the paper table's
    baseline-views and cosine rows show that arm, labelled so (they said "no runs"), and a study that ran its own
    baseline arm keeps it."""
    path = tmp_path / "runs.db"
    base, lam2, no_color = Config(), Config(), Config()
    lam2.loss.lam = 2.0
    no_color.data.view_modifiers = ["no_color"]
    for seed in (0, 1):
        _add(path, "balance", "loss_balance", {"loss.lam": 1}, seed, base, acc=0.60 + 0.01 * seed)
        _add(path, "balance", "loss_balance", {"loss.lam": 2}, seed, lam2, acc=0.70)
        _add(path, "augmentation", "augmentation", {"data.view_modifiers": ["no_color"]}, seed, no_color, acc=0.5)
    md = R.write_report(path, tmp_path / "r").read_text()
    rows = {line.split(" | ")[1]: line for line in md.splitlines() if line.startswith("| augmentation |")
            or line.startswith("| similarity |")}
    for setting in ("SimCLR augmentations (baseline)", "cosine + normalization"):
        assert "lam=1 (the shared baseline arm) | 60.50 ± 0.71 (n=2)" in rows[setting], rows[setting]
    assert "| 50.00 ± 0.00 (n=2) |" in rows["no color distortion"] and "shared" not in rows["no color distortion"]
    # the augmentation section sets the no-colour arm beside the shared baseline arm, and says where it comes from
    aug = md.split("## Augmentations and prototype bias")[1].split("\n## ")[0]
    assert "over the 2 augmentation sets" in aug and "the plan's shared baseline arm" in aug
    assert "| balance | lam=1 | 60.50 ± 0.71 (n=2) |" in aug and "| augmentation | view_modifiers=no_color |" in aug


def test_a_point_whose_runs_all_diverged_says_so_with_its_last_good_checkpoint(tmp_path):
    path = tmp_path / "runs.db"
    dot = Config()
    dot.loss.similarity = "dot"
    for seed in (0, 1):
        _add(path, "sim", "similarity", {"loss.similarity": "dot"}, seed, dot, acc=None, status="diverged",
             extra={"eval_linear_top1_last_good": 0.40 + 0.02 * seed, "eval_knn_top1_last_good": 0.30})
    md = R.write_report(path, tmp_path / "r").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| sim | similarity=dot | "))
    assert row.startswith("| sim | similarity=dot | diverged; last good checkpoint 41.00 ± 1.41 (n=2) | diverged; "
                          "last good checkpoint 30.00 ± 0.00 (n=2) |"), row
    assert "not measured" not in row and "2/2 done, 2 diverged" in row
