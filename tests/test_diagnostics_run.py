"""Diagnostics of a briefly pretrained encoder (Fashion-MNIST, convnet, 8 steps): the bounds as properties on
real features, in-training tracking, and the ``protoclr diagnose`` command end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from protoclr import diagnose
from protoclr import diagnostics as dg
from protoclr import measure as M
from protoclr.errors import NotACheckpoint
from protoclr.runs import load_run
from protoclr.splits import balanced_draw, load_data
from protoclr.train import pretrain

ALPHAS = (1.0, 2.0, 10.0, 20.0)


def _cfg(tmp, root, extra=()):
    from protoclr.config import load_config

    return load_config(
        None,
        [f"train.out_dir={tmp}", "train.run_name=tiny", "train.epochs=2", "train.batch_size=64",
         "data.train_subset=256", "eval.every=0", f"data.root={root}", "trainer.accelerator=cpu",
         "trainer.progress=false", "trainer.loggers=[]", *extra],
    )  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory, fashion_mnist_dir):
    """A 2-epoch run trained in two calls (as a loop with tracking would see it), with ``track`` records
    appended to metrics.jsonl after each epoch; returns (run_dir, probe, spec)."""
    tmp = tmp_path_factory.mktemp("runs")
    _, test, spec = load_data(_cfg(tmp, fashion_mnist_dir))
    probe = balanced_draw(test, 200, seed=0)
    for epoch, steps in enumerate((4, 8)):
        run_dir = pretrain(_cfg(tmp, fashion_mnist_dir, [f"train.max_steps={steps}"]))
        encoder, _ = load_run(run_dir)
        rec = M.diagnostics_metrics(encoder, probe, spec=spec, views=4, alphas=(2.0, 10.0), nus=(1.0, 0.5))
        with open(run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"kind": "epoch", "epoch": epoch, **rec}) + "\n")
    return run_dir, probe, spec


@pytest.fixture(scope="module")
def feats(run):
    run_dir, probe, spec = run
    encoder, _ = load_run(run_dir)
    return dg.view_features(encoder, probe, views=4, recipe=spec, seed=0), probe.labels


def test_bounds_hold_on_a_trained_encoder_wherever_their_assumptions_hold(feats):
    f, labels = feats
    z = f["projector"].double()
    rep = dg.bound_terms(z, labels, num_classes=10, alphas=(1.0,), nus=(1.0,))
    norm_min = rep["assumptions"]["prototype_norm_min"]
    checked = 0
    for alpha in ALPHAS:
        for nu in (0.5, norm_min, 1.0):
            t = dg.bound_terms_per_anchor(z, labels, num_classes=10, alpha=alpha, nu=nu)
            attr_ok = t["positive_mean"] >= 0
            assert (t["attraction_gap"][attr_ok] >= -1e-10).all()
            rep_ok = (t["nearest_class_balance"] >= 1) & (t["nearest_prototype_norm"] >= nu) & (t["sup_repulsion"] >= 0)
            assert (t["repulsion_gap"][rep_ok] >= -1e-10).all()
            checked += int(attr_ok.sum()) + int(rep_ok.sum())
    assert checked > 4 * 2 * z.shape[0] * z.shape[1]  # most anchors, most (alpha, nu): not vacuous
    # the report says the same: at nu <= the smallest prototype norm every assumption holds and so does the bound
    clean = dg.bound_terms(z, labels, num_classes=10, alphas=ALPHAS, nus=(norm_min,))
    assert clean["violations"] == []
    assert clean["attraction"]["holds_fraction"] == 1.0
    assert all(r["holds_fraction"] == 1.0 for r in clean["repulsion"].values())


def test_dropping_an_assumption_breaks_a_bound_on_the_trained_encoder(feats):
    f, labels = feats
    z = f["projector"].double()
    # nu = 1 above the smallest prototype norm (the features of a class are not collapsed) is flagged; the
    # synthetic tests in test_diagnostics.py show the bound failing there
    rep = dg.bound_terms(z, labels, num_classes=10, alphas=(10.0,), nus=(1.0,))
    assert rep["assumptions"]["prototype_norm_min"] < 1
    assert any("nu=1 exceeds" in v for v in rep["violations"])
    # unnormalised features: the same trained directions with each view rescaled by its own positive factor
    # (cosines unchanged). The raw mean of the other views then leans to the longest one, and the attraction
    # "bound" fails for anchors whose longest other view is their least similar one; normalising restores it
    g = torch.Generator().manual_seed(0)
    scaled = z * torch.exp(2 * torch.randn(*z.shape[:2], 1, generator=g, dtype=z.dtype))  # (K, N, D)
    raw = dg.bound_terms(scaled, labels, num_classes=10, alphas=(1.0,), nus=(0.5,), normalize=False)
    assert any("not unit norm" in v for v in raw["violations"])
    assert raw["attraction"]["holds_fraction"] < 0.95 and raw["attraction"]["gap_min"] < 0
    fixed = dg.bound_terms(scaled, labels, num_classes=10, alphas=(1.0,), nus=(0.5,))
    assert fixed["attraction"]["holds_fraction"] == 1.0
    # an imbalanced probe set (one class down to two images, the fewest the leave-one-out attraction allows) is
    # flagged: n * min_y p_y = 10 * 2 / 182
    keep = torch.cat([(labels != 3).nonzero().flatten(), (labels == 3).nonzero().flatten()[:2]]).sort().values
    imb = dg.bound_terms(z[:, keep], labels[keep], num_classes=10, alphas=(10.0,), nus=(0.5,))
    assert imb["assumptions"]["balance_ratio"] == pytest.approx(20 / len(keep)) and 20 / len(keep) < 0.12
    assert any("imbalanced" in v for v in imb["violations"])


def test_trained_encoder_diagnostics_are_finite_and_in_range(feats):
    f, labels = feats
    report = dg.diagnose_features(f, labels, num_classes=10, alphas=(2.0,), nus=(0.5,))
    for head in ("backbone", "projector"):
        b = report["bias"][head]["normalized"]
        assert 0 < b["euclidean"] <= 2 and 0 < b["cosine"] <= 2 and 0 < b["angle_deg"] <= 180
        assert 0 < report["bias"][head]["raw"]["euclidean"] < math.inf
    g = report["geometry"]
    assert 0 <= g["alignment"] <= 4 and -4 <= g["uniformity"] <= 0 and 1 <= g["effective_rank"] <= 128
    assert -1 <= g["negative_similarity"] < g["positive_similarity"] <= 1 and 0 <= g["contrastive_top1"] <= 1
    assert all(math.isfinite(v) for v in dg.flat_metrics(report).values())


def test_track_is_deterministic_leaves_the_encoder_and_rng_alone_and_matches_the_report(run):
    run_dir, probe, spec = run
    encoder, _ = load_run(run_dir)
    encoder.train()
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    a = M.diagnostics_metrics(encoder, probe, spec=spec, views=4, alphas=(2.0, 10.0), nus=(1.0, 0.5), seed=7)
    assert torch.equal(torch.get_rng_state(), rng) and encoder.training
    b = M.diagnostics_metrics(encoder, probe, spec=spec, views=4, alphas=(2.0, 10.0), nus=(1.0, 0.5), seed=7)
    assert a == b
    encoder.eval()
    f = dg.view_features(encoder, probe, views=4, recipe=spec, seed=7)
    report = dg.diagnose_features(f, probe.labels, num_classes=10, alphas=(2.0, 10.0), nus=(1.0, 0.5))
    nu_min = report["bounds"]["assumptions"]["prototype_norm_min"]
    want = M.headline(report, alpha=2.0, nu="min")
    # the plain repulsion keys are at the largest nu the assumption allows; nu = 1 is kept beside them
    assert a["diag_bound_nu"] == pytest.approx(nu_min) and 0 < nu_min < 1 and a["diag_nu1_violates"] == 1.0
    t = dg.bound_terms_per_anchor(f["projector"], probe.labels, num_classes=10, alpha=2.0, nu=nu_min)
    assert bool((t["nearest_prototype_norm"] >= nu_min - 1e-6).all())  # nu <= ||mu_y'|| for every anchor
    assert any(v.startswith("nu=1 exceeds") for v in report["bounds"]["violations"])
    assert a["diag_repulsion_gap/alpha2_nu1"] == pytest.approx(report["bounds"]["repulsion"]["alpha=2,nu=1"]["gap"])
    assert a.keys() == want.keys()
    for key, value in want.items():
        assert a[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert a["diag_repulsion_gap/alpha10_nu0.5"] == pytest.approx(
        report["bounds"]["repulsion"]["alpha=10,nu=0.5"]["gap"]
    )
    assert a["diag_bias_euclidean"] == pytest.approx(report["bias"]["backbone"]["raw"]["euclidean"])
    other_seed = M.diagnostics_metrics(encoder, probe, spec=spec, views=4, seed=8)
    assert other_seed["diag_bias_euclidean"] != a["diag_bias_euclidean"]  # the views do depend on the seed
    with pytest.raises(ValueError, match="views must be an int >= 2"):
        M.diagnostics_metrics(encoder, probe, spec=spec, views=1)


def test_history_reads_the_tracked_epochs(run):
    run_dir, _, _ = run
    hist = diagnose.history(run_dir)
    assert [e for e, _ in hist["diag_attraction_gap"]] == [0, 1]
    assert [e for e, _ in hist["diag_repulsion_gap/alpha10_nu0.5"]] == [0, 1]
    assert "loss" not in hist and all(k.startswith("diag_") for k in hist)


def test_diagnose_cli_prints_writes_json_plots_and_records(run, capsys):
    from protoclr.runs import ResultsDB

    run_dir, _, _ = run
    argv = [str(run_dir), "--probe-images", "200", "--views", "4", "--alphas", "2,10", "--nus", "1,0.5"]
    assert diagnose.cli_main(argv) == 0
    text = capsys.readouterr().out
    for what in ("prototype representation bias", "bound terms", "assumptions", "geometry", "nu=1 exceeds"):
        assert what in text
    out = json.loads((run_dir / "diagnostics.json").read_text())
    assert out["probe_images"] == 200 and out["views"] == 4 and out["alphas"] == [2.0, 10.0]
    assert set(out["bounds"]["repulsion"]) == {f"alpha={a},nu={nu}" for a in (2, 10) for nu in (1, 0.5, "min")}
    assert len(out["bias"]["backbone"]["normalized"]["per_class"]["angle_deg"]) == 10
    # the same probe set, views and seed as the last tracked epoch: the same numbers
    last = {k: v[-1][1] for k, v in diagnose.history(run_dir).items()}
    assert out["headline"]["diag_attraction_gap"] == pytest.approx(last["diag_attraction_gap"], rel=1e-5)
    assert out["plots"] == {
        "over_epochs": "diagnostics_over_epochs.png",
        "bias_per_class": "diagnostics_bias_per_class.png",
    }
    for name in out["plots"].values():
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    row = ResultsDB(run_dir.parent / "runs.db").get_run(run_dir.name)["final_metrics"]
    # under keys that name diagnose's probe (200 images x 4 views), never the monitor's plain keys
    assert not any(k.startswith("diag_") and not k.endswith("_probe200x4") for k in row)
    assert row["diag_bias_angle_deg_probe200x4"] == out["headline"]["diag_bias_angle_deg"]
    assert row["diag_repulsion_gap_probe200x4"] == out["bounds"]["repulsion"]["alpha=2,nu=min"]["gap"]
    assert row["diag_repulsion_gap/alpha2_nu1_probe200x4"] == out["bounds"]["repulsion"]["alpha=2,nu=1"]["gap"]
    assert [p.name for p in run_dir.glob(".diagnostics.json*")] == []  # no temporary file left


def test_diagnose_cli_says_so_when_nothing_was_tracked(run, tmp_path, capsys):
    import shutil

    run_dir, _, _ = run
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run_dir / "checkpoint.pt", bare / "checkpoint.pt")  # no metrics.jsonl, no runs.db
    assert diagnose.cli_main([str(bare / "checkpoint.pt"), "--probe-images", "100", "--views", "2"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "no bound or bias terms were tracked" in text and "JSON file only" in text
    assert "train with eval.diagnostics=true to track them" in text
    assert "attraction" in text and "supervised" in text  # not cut to "attra…" at rich's 80 columns: output is no tty
    assert not (bare / "diagnostics_over_epochs.png").exists() and (bare / "diagnostics_bias_per_class.png").exists()
    assert "over_epochs" not in json.loads((bare / "diagnostics.json").read_text())["plots"]
    with pytest.raises(NotACheckpoint):
        diagnose.cli_main([str(tmp_path / "missing")])
    with pytest.raises(SystemExit):
        diagnose.cli_main([str(bare), "--nus", "0,1"])


def test_probe_subset_is_balanced_and_fixed(run):
    _, probe, _ = run
    assert probe.class_counts(10).tolist() == [20] * 10
    again = balanced_draw(probe, 55, seed=0)
    assert again.class_counts(10).tolist() == [5] * 10
    assert torch.equal(again.labels, balanced_draw(probe, 55, seed=0).labels)
    with pytest.raises(ValueError, match="give no image per class"):
        balanced_draw(probe, 1, seed=0)


def test_headline_keys_are_measures_constants():
    """Every key headline writes is one of measure's constants (or their formats / the diag_ prefix + geometry),
    so that no reader spells a key the writer could rename."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(8)  # (32,), 4 classes
    feats = {h: torch.nn.functional.normalize(torch.randn(3, 32, 6, generator=g), dim=-1) for h in ("backbone",
                                                                                                     "projector")}
    report = dg.diagnose_features(feats, labels, num_classes=4, alphas=(2.0, 10.0), nus=(1.0, 0.5))
    keys = set(M.headline(report, alpha=2.0))
    named = {v for k, v in vars(M).items() if k.isupper() and isinstance(v, str) and M.is_diagnostic(v)}
    pairs = {fmt.format(alpha=a, nu=nu) for fmt in (M.REPULSION_GAP_PAIR, M.REPULSION_HOLDS_PAIR)
             for a in (2.0, 10.0) for nu in (1.0, 0.5)}
    geometry = {M.DIAG + k for k in report["geometry"]}
    assert keys - named - pairs - geometry == set()
    assert M.REPULSION_GAP_NU1.format(alpha=2.0) in keys and M.BOUND_ALPHA in keys
