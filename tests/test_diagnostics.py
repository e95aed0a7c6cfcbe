"""Tests for protoclr.diagnostics: hand-computed bias, the bounds as property tests, flagged violations."""

from __future__ import annotations

import math

import pytest
import torch

from protoclr import diagnostics as dg


def _bias_reference(feats, labels, *, num_classes, normalize, leave_one_out=True):
    """Loops over images in float64: mean of K views, class mean of those (without the image itself for
    leave-one-out), three distances."""
    f = feats.double()
    if normalize:
        f = f / f.norm(dim=-1, keepdim=True)
    k, n, _ = f.shape
    mu_x = [sum(f[v, i] for v in range(k)) / k for i in range(n)]
    eu, co, an = [], [], []
    for i in range(n):
        members = [j for j in range(n) if int(labels[j]) == int(labels[i]) and (j != i or not leave_one_out)]
        a, b = mu_x[i], sum(f[v, j] for j in members for v in range(k)) / (k * len(members))
        eu.append(float((a - b).norm()))
        c = float(a @ b / (a.norm() * b.norm()))
        co.append(1 - c)
        an.append(math.degrees(math.acos(max(-1.0, min(1.0, c)))))
    return {"euclidean": sum(eu) / n, "cosine": sum(co) / n, "angle_deg": sum(an) / n}


def test_bias_hand_computed_value():
    # one class, two images, one view each, in 2-D: with the image itself mu_y = (0.5, 0.5) (45 degrees away);
    # leave-one-out, each image's prototype is the other image (90 degrees away)
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (K=1, N=2, D=2)
    out = dg.bias_from_features(feats, torch.tensor([0, 0]), num_classes=1, normalize=False, leave_one_out=False)
    assert out["euclidean"] == pytest.approx(math.sqrt(0.5))
    assert out["cosine"] == pytest.approx(1 - math.sqrt(0.5))
    assert out["angle_deg"] == pytest.approx(45.0)
    assert out["per_class"]["angle_deg"].tolist() == pytest.approx([45.0])
    loo = dg.bias_from_features(feats, torch.tensor([0, 0]), num_classes=1, normalize=False)
    assert loo["euclidean"] == pytest.approx(math.sqrt(2)) and loo["angle_deg"] == pytest.approx(90.0)
    with pytest.raises(ValueError, match="at least 2 images per class"):
        dg.bias_from_features(feats, torch.tensor([0, 1]), num_classes=2)


@pytest.mark.parametrize("leave_one_out", [True, False])
@pytest.mark.parametrize("normalize", [False, True])
def test_bias_matches_float64_reference(normalize, leave_one_out):
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(3, 12, 5, generator=g), torch.arange(12) % 4
    got = dg.bias_from_features(feats, labels, num_classes=4, normalize=normalize, leave_one_out=leave_one_out)
    want = _bias_reference(feats, labels, num_classes=4, normalize=normalize, leave_one_out=leave_one_out)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-4)
    if leave_one_out:  # 3 images per class: the image's own share shrinks every distance by exactly 2/3
        inc = dg.bias_from_features(feats, labels, num_classes=4, normalize=normalize, leave_one_out=False)
        assert inc["euclidean"] == pytest.approx(got["euclidean"] * 2 / 3, rel=1e-6)
    # per-class values average to the overall value on a balanced set
    assert got["per_class"]["euclidean"].mean().item() == pytest.approx(got["euclidean"], rel=1e-5)


def _debiased_reference(feats, labels, *, num_classes, normalize):
    """The debiased bias in float64 with explicit loops over distinct pairs: A over view pairs v != w of x, B with
    the mean of every view of the other images of x's class, C over pairs j != j' of those other images."""
    f = feats.double()
    if normalize:
        f = f / f.norm(dim=-1, keepdim=True)
    k, n, _ = f.shape
    mu_x = [sum(f[v, i] for v in range(k)) / k for i in range(n)]
    a, b, c, sq, var = [], [], [], [], []
    for i in range(n):
        others = [j for j in range(n) if j != i and int(labels[j]) == int(labels[i])]
        m = len(others)
        a.append(sum(float(f[v, i] @ f[w, i]) for v in range(k) for w in range(k) if v != w) / (k * (k - 1)))
        p = sum(mu_x[j] for j in others) / m
        b.append(float(mu_x[i] @ p))
        c.append(sum(float(mu_x[j] @ mu_x[jj]) for j in others for jj in others if j != jj) / (m * (m - 1)))
        sq.append(a[-1] - 2 * b[-1] + c[-1])
        var.append(sum(float((f[v, i] - mu_x[i]).norm()) ** 2 for v in range(k)) / (k - 1))
    angles, cosines, share = [], [], []
    for y in range(num_classes):
        members = [i for i in range(n) if int(labels[i]) == y]
        cos = sum(b[i] for i in members) / math.sqrt(max(len(members) * sum(a[i] * c[i] for i in members), 1e-12))
        cos = max(-1.0, min(1.0, cos))
        cosines.append(1 - cos)
        angles.append(math.degrees(math.acos(cos)))
        share.append(len(members) / n)
    return {"sq_euclidean_debiased": sum(sq) / n, "view_variance": sum(var) / n,
            "cosine_debiased": sum(w * v for w, v in zip(share, cosines, strict=True)),
            "angle_deg_debiased": sum(w * v for w, v in zip(share, angles, strict=True)),
            "per_class_angle": angles}


@pytest.mark.parametrize("normalize", [False, True])
def test_debiased_bias_matches_float64_reference(normalize):
    """Unequal classes (3, 4, 5 images), 3 views: every debiased field equals the pairwise loop. Catches K in place
    of K - 1 (in A or in the view variance), x left inside its prototype, C without the pair correction (||p||^2)."""
    g = torch.Generator().manual_seed(13)
    labels = torch.tensor([0, 1, 2, 2, 1, 2, 0, 2, 1, 2, 0, 1])
    centers = 2 * torch.randn(3, 5, generator=g)
    feats = centers[labels] + torch.randn(1, 12, 5, generator=g) + 0.7 * torch.randn(3, 12, 5, generator=g)
    got = dg.bias_from_features(feats, labels, num_classes=3, normalize=normalize)
    want = _debiased_reference(feats, labels, num_classes=3, normalize=normalize)
    for key in ("sq_euclidean_debiased", "view_variance", "cosine_debiased", "angle_deg_debiased"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-4), key
    assert got["per_class"]["angle_deg_debiased"].tolist() == pytest.approx(want["per_class_angle"], rel=1e-4)
    # the plain squared distance exceeds the debiased one on average (view noise); undefined cases are nan
    assert got["sq_euclidean"] > got["sq_euclidean_debiased"]
    two = dg.bias_from_features(feats[:, :6], torch.tensor([0, 0, 1, 1, 2, 2]), num_classes=3)
    assert math.isnan(two["angle_deg_debiased"]) and math.isfinite(two["view_variance"])
    one_view = dg.bias_from_features(feats[:1], labels, num_classes=3)
    assert math.isnan(one_view["sq_euclidean_debiased"]) and math.isnan(one_view["view_variance"])
    with pytest.raises(ValueError, match="at least 3 images per class"):
        dg.debiased_bias_terms(feats[:, :6], torch.tensor([0, 0, 1, 1, 2, 2]), num_classes=3)


def _noisy_views(seed, *, k, sigma, num_classes=20, per_class=20, d=16, tau=0.5, center=2.0):
    """Raw features with a known truth: class means c_y ~ center * N(0, I), image means mu_x = c_y + tau N(0, I)
    (so E ||mu_x - mu_y||^2 = tau^2 d), views mu_x + sigma N(0, I) (view variance sigma^2 d). The image means
    depend on ``seed`` only, so K and sigma change the views and nothing else."""
    g = torch.Generator().manual_seed(seed)
    c = center * torch.randn(num_classes, d, generator=g, dtype=torch.float64)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    mu = c[labels] + tau * torch.randn(len(labels), d, generator=g, dtype=torch.float64)
    noise = torch.Generator().manual_seed(1000 * seed + k)
    feats = mu[None] + sigma * torch.randn(k, *mu.shape, generator=noise, dtype=torch.float64)
    true_angle = torch.rad2deg(torch.arccos(c.norm(dim=-1) / (c.pow(2).sum(-1) + tau**2 * d).sqrt()))  # (C,)
    return feats, labels, true_angle


def _sq_se(*, n, d, tau, sigma, k):
    """Standard error of the mean of A - 2B + C over n images (delta method, first order in 1 / n_y): the image
    means' own spread (2 tau^4 d), the view noise's linear part (4 sigma^2 tau^2 d / K) and its pair part."""
    return math.sqrt((2 * tau**4 * d + 4 * sigma**2 * tau**2 * d / k + 2 * sigma**4 * d / (k * (k - 1))) / n)


@pytest.mark.parametrize("seed", [0, 1])
def test_debiased_bias_recovers_the_true_distance_and_angle(seed):
    k, sigma, d, tau, n_img, per_class = 8, 1.0, 16, 0.5, 400, 20
    feats, labels, true_angle = _noisy_views(seed, k=k, sigma=sigma)
    b = dg.bias_from_features(feats, labels, num_classes=20, normalize=False)
    se = _sq_se(n=n_img, d=d, tau=tau, sigma=sigma, k=k)
    # the view variance: sigma^2 d, SE sigma^2 sqrt(2 d / ((K - 1) N)) (chi-square with d (K - 1) dof per image)
    assert b["view_variance"] == pytest.approx(sigma**2 * d, abs=4 * sigma**2 * math.sqrt(2 * d / ((k - 1) * n_img)))
    # plain: inflated by the view noise over K and the class mean's noise over m = n_y - 1
    m = per_class - 1
    inflation = (sigma**2 * d / k + tau**2 * d) / m + sigma**2 * d / k  # = 2.21 here, 8 x the SE
    assert b["sq_euclidean"] - tau**2 * d == pytest.approx(inflation, abs=4 * se)
    assert b["sq_euclidean_debiased"] == pytest.approx(tau**2 * d, abs=4 * se)
    # angle per class: arccos(||c_y|| / sqrt(||c_y||^2 + tau^2 d)); tolerance 4 SE of the per-class errors' mean
    err = b["per_class"]["angle_deg_debiased"] - true_angle
    assert abs(err.mean().item()) < 4 * err.std().item() / math.sqrt(len(err))
    assert b["angle_deg"] - true_angle.mean().item() > 10 * err.std().item() / math.sqrt(len(err))


@pytest.mark.parametrize("change", ["views", "sigma"])
def test_debiased_bias_does_not_move_with_the_view_noise(change):
    """Same image means, the views' number (K = 4 vs 32) or spread (sigma = 0.5 vs 1.5) changed: the debiased
    distance and angle stay within their noise, the plain ones move by many times it."""
    (k1, s1), (k2, s2) = ((4, 1.0), (32, 1.0)) if change == "views" else ((8, 0.5), (8, 1.5))
    f1, labels, _ = _noisy_views(3, k=k1, sigma=s1)
    f2, _, _ = _noisy_views(3, k=k2, sigma=s2)  # at the same K, the same noise draw scaled
    b1 = dg.bias_from_features(f1, labels, num_classes=20, normalize=False)
    b2 = dg.bias_from_features(f2, labels, num_classes=20, normalize=False)
    tol = 4 * math.hypot(_sq_se(n=400, d=16, tau=0.5, sigma=s1, k=k1), _sq_se(n=400, d=16, tau=0.5, sigma=s2, k=k2))
    assert b1["sq_euclidean_debiased"] == pytest.approx(b2["sq_euclidean_debiased"], abs=tol)
    assert abs(b1["sq_euclidean"] - b2["sq_euclidean"]) > 3 * tol
    d1 = b1["per_class"]["angle_deg_debiased"] - b2["per_class"]["angle_deg_debiased"]
    angle_tol = 4 * d1.std().item() / math.sqrt(len(d1))
    assert abs(b1["angle_deg_debiased"] - b2["angle_deg_debiased"]) < angle_tol
    assert abs(b1["angle_deg"] - b2["angle_deg"]) > 3 * angle_tol


def test_headline_keeps_the_debiased_bias_under_measure_keys():
    """measure.headline: the debiased angle (backbone and projector), the squared distances and the view variance
    of normalized features under their measure constants, nan (not an error) with 2 images per class."""
    from protoclr import measure as M

    g = torch.Generator().manual_seed(14)
    labels = torch.arange(12) % 3
    feats = {"backbone": torch.randn(3, 12, 6, generator=g) + 2 * torch.randn(3, 6, generator=g)[labels],
             "projector": torch.randn(3, 12, 4, generator=g) + 2 * torch.randn(3, 4, generator=g)[labels]}
    report = dg.diagnose_features(feats, labels, num_classes=3, alphas=(2.0,), nus=(1.0,))
    out = M.headline(report, alpha=2.0)
    bb, bp = report["bias"]["backbone"]["normalized"], report["bias"]["projector"]["normalized"]
    want = {M.BIAS_DEBIASED: bb["angle_deg_debiased"], M.BIAS_PROJ_DEBIASED: bp["angle_deg_debiased"],
            M.BIAS_SQ: bb["sq_euclidean"], M.BIAS_SQ_DEBIASED: bb["sq_euclidean_debiased"],
            M.VIEW_VARIANCE: bb["view_variance"]}
    assert {key: out[key] for key in want} == want and all(math.isfinite(v) for v in want.values())
    assert out[M.BIAS_DEBIASED] != out[M.BIAS]  # a different estimate, not a copy of the plain key
    few = dg.diagnose_features({k: v[:, :6] for k, v in feats.items()}, labels[:6], num_classes=3, alphas=(2.0,))
    small = M.headline(few, alpha=2.0)
    assert math.isnan(small[M.BIAS_DEBIASED]) and math.isfinite(small[M.BIAS]) and math.isfinite(small[M.VIEW_VARIANCE])


def test_bias_zero_when_views_collapse_and_grows_with_spread():
    g = torch.Generator().manual_seed(1)
    protos = torch.randn(3, 8, generator=g)
    labels = torch.arange(30) % 3
    collapsed = protos[labels].expand(4, 30, 8)  # every view of every image on its class prototype
    out = dg.bias_from_features(collapsed, labels, num_classes=3)
    assert out["euclidean"] < 1e-6 and out["cosine"] < 1e-6 and out["angle_deg"] < 1e-2
    assert abs(out["sq_euclidean_debiased"]) < 1e-6 and out["view_variance"] < 1e-9 and out["angle_deg_debiased"] < 1e-2
    noise = torch.randn(1, 30, 8, generator=g)  # image-level offset (views agree, images differ)
    small = dg.bias_from_features(collapsed + 0.1 * noise, labels, num_classes=3)
    large = dg.bias_from_features(collapsed + 0.5 * noise, labels, num_classes=3)
    for key in ("euclidean", "cosine", "angle_deg"):
        assert 0 < small[key] < large[key]


def test_bias_invariant_to_image_and_view_order():
    g = torch.Generator().manual_seed(2)
    feats, labels = torch.randn(4, 20, 6, generator=g), torch.arange(20) % 5
    base = dg.bias_from_features(feats, labels, num_classes=5)
    perm, vperm = torch.randperm(20, generator=g), torch.randperm(4, generator=g)
    moved = dg.bias_from_features(feats[vperm][:, perm], labels[perm], num_classes=5)
    for key in ("euclidean", "cosine", "angle_deg"):
        assert moved[key] == pytest.approx(base[key], rel=1e-6)
    torch.testing.assert_close(moved["per_class"]["cosine"], base["per_class"]["cosine"])


def test_bias_report_has_every_variant():
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(8) % 2
    rep = dg.bias_report(
        {"backbone": torch.randn(2, 8, 5, generator=g), "projector": torch.randn(2, 8, 3)}, labels, num_classes=2
    )
    for head in ("backbone", "projector"):
        for variant in ("raw", "normalized"):
            assert set(rep[head][variant]) == {"euclidean", "cosine", "angle_deg", "per_class", "sq_euclidean",
                                               "sq_euclidean_debiased", "cosine_debiased", "angle_deg_debiased",
                                               "view_variance"}
            assert len(rep[head][variant]["per_class"]["euclidean"]) == 2


@pytest.mark.parametrize(
    "args,match",
    [
        (dict(feats=torch.randn(5, 4)), r"\(K, N, D\)"),
        (dict(labels=torch.arange(5) % 3), "labels must be an integer tensor of shape"),
        (dict(labels=torch.tensor([0, 1, 0, 1, 0, 5])), "labels must lie"),
        (dict(labels=torch.tensor([0, 1, 0, 1, 0, 1])), "classes \\[2\\] have no images"),
        (dict(num_classes=0), "num_classes"),
    ],
)
def test_bias_bad_inputs_raise(args, match):
    kw = dict(feats=torch.randn(2, 6, 4), labels=torch.arange(6) % 3, num_classes=3)
    kw.update(args)
    with pytest.raises(ValueError, match=match):
        dg.bias_from_features(kw["feats"], kw["labels"], num_classes=kw["num_classes"])


# ---------------------------------------------------------------------------------------------------------
# bounds


def _terms_reference(feats, labels, *, num_classes, alpha, nu):
    """Per-anchor terms in float64 with explicit loops; features already unit norm. The supervised attraction
    compares the anchor with the mean of every view of the other images of its class; the repulsion with the
    full prototypes of the other classes."""
    f = feats.double()
    k, n, _ = f.shape
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    mu = torch.stack([f[:, labels == c].mean(dim=(0, 1)) for c in range(num_classes)])

    def class_mates(i):  # mean of all K views of every image j != i of i's class
        members = [j for j in range(n) if j != i and int(labels[j]) == int(labels[i])]
        return sum(f[u, j] for j in members for u in range(k)) / (k * len(members))

    keys = ("sup_attr", "surrogate", "ssl_attr", "sup_rep", "ssl_rep")
    out = {key: torch.zeros(k, n, dtype=torch.float64) for key in keys}
    for v in range(k):
        for i in range(n):
            z = f[v, i]
            others = [u for u in range(k) if u != v]
            out["sup_attr"][v, i] = -cos(z, class_mates(i))
            out["ssl_attr"][v, i] = -sum(cos(z, f[u, i]) for u in others) / len(others)
            out["surrogate"][v, i] = -cos(z, sum(f[u, i] for u in others) / len(others))
            out["sup_rep"][v, i] = max(cos(z, mu[c]) for c in range(num_classes) if c != int(labels[i]))
            inner = [math.log(sum(math.exp(alpha * cos(z, f[t, j])) for j in range(n)) / n) for t in range(k)]
            out["ssl_rep"][v, i] = (sum(inner) / k + math.log(num_classes)) / (nu * alpha)
    return out


def test_bound_terms_match_float64_reference():
    g = torch.Generator().manual_seed(4)
    feats = torch.nn.functional.normalize(torch.randn(3, 9, 4, generator=g), dim=-1)
    labels = torch.arange(9) % 3
    got = dg.bound_terms_per_anchor(feats, labels, num_classes=3, alpha=2.0, nu=0.5, chunk_size=4)
    want = _terms_reference(feats, labels, num_classes=3, alpha=2.0, nu=0.5)
    torch.testing.assert_close(got["sup_attraction"].double(), want["sup_attr"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["surrogate_attraction"].double(), want["surrogate"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["ssl_attraction"].double(), want["ssl_attr"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["sup_repulsion"].double(), want["sup_rep"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["ssl_repulsion"].double(), want["ssl_rep"], rtol=1e-5, atol=1e-5)


def test_supervised_attraction_leaves_the_anchors_image_out():
    """Unequal classes (2, 3, 5 images) and 3 views: -s(z, mean of the other images' views), as the float64 loop.
    Catches the full prototype mu_y (x's views inside it), leaving out only the anchor's own view, and a count
    shared across classes; a class with one image is an error, as for the bias."""
    g = torch.Generator().manual_seed(12)
    feats = torch.nn.functional.normalize(torch.randn(3, 10, 4, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.tensor([0, 1, 2, 2, 1, 2, 0, 2, 1, 2])
    got = dg.bound_terms_per_anchor(feats, labels, num_classes=3, alpha=1.0, nu=1.0)["sup_attraction"]
    want = _terms_reference(feats, labels, num_classes=3, alpha=1.0, nu=1.0)["sup_attr"]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # class 0 has two images: each one's prototype is the other image's views alone
    other = feats[:, 6].mean(0)
    want0 = -(feats[:, 0] @ other) / other.norm()
    torch.testing.assert_close(got[:, 0], want0, rtol=1e-10, atol=1e-10)
    full = -(feats[:, 0] @ feats[:, [0, 6]].mean((0, 1))) / feats[:, [0, 6]].mean((0, 1)).norm()
    assert (got[:, 0] - full).abs().min() > 1e-2  # the oracle tells the two apart on this data
    with pytest.raises(ValueError, match="at least 2 images per class"):
        dg.bound_terms_per_anchor(feats, torch.tensor([0] * 9 + [1]), num_classes=2, alpha=1.0, nu=1.0)


def test_bound_means_and_bias_gap_match_float64_reference():
    """The aggregated report: every mean, the gaps and the bias gap (supervised minus surrogate attraction) are
    the float64 loop's averages; nu rescales only the self-supervised repulsion."""
    g = torch.Generator().manual_seed(5)
    feats = torch.nn.functional.normalize(torch.randn(3, 12, 4, generator=g), dim=-1)
    labels = torch.arange(12) % 4
    rep = dg.bound_terms(feats, labels, num_classes=4, alphas=(2.0, 7.0), nus=(1.0, 0.5))
    for alpha in (2.0, 7.0):
        want = _terms_reference(feats, labels, num_classes=4, alpha=alpha, nu=1.0)
        for nu in (1.0, 0.5):
            r = rep["repulsion"][f"alpha={alpha:g},nu={nu:g}"]
            ssl = want["ssl_rep"] / nu
            assert r["supervised"] == pytest.approx(want["sup_rep"].mean().item(), abs=1e-6)
            assert r["self_supervised"] == pytest.approx(ssl.mean().item(), abs=1e-6)
            assert r["gap"] == pytest.approx((ssl - want["sup_rep"]).mean().item(), abs=1e-6)
            assert r["gap_min"] == pytest.approx((ssl - want["sup_rep"]).min().item(), abs=1e-6)
    a = rep["attraction"]
    assert a["supervised"] == pytest.approx(want["sup_attr"].mean().item(), abs=1e-6)
    assert a["surrogate"] == pytest.approx(want["surrogate"].mean().item(), abs=1e-6)
    assert a["self_supervised"] == pytest.approx(want["ssl_attr"].mean().item(), abs=1e-6)
    assert a["gap"] == pytest.approx((want["ssl_attr"] - want["surrogate"]).mean().item(), abs=1e-6)
    assert a["bias_gap"] == pytest.approx((want["sup_attr"] - want["surrogate"]).mean().item(), abs=1e-6)


def _clustered(g, *, n_per_class, num_classes, k, d, spread, shift=0.0):
    centers = torch.randn(num_classes, d, generator=g, dtype=torch.float64) + shift
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    image = centers[labels] + spread * torch.randn(len(labels), d, generator=g, dtype=torch.float64)
    feats = image[None] + 0.5 * spread * torch.randn(k, len(labels), d, generator=g, dtype=torch.float64)
    return feats, labels


@pytest.mark.parametrize("seed", range(6))
def test_bounds_hold_wherever_assumptions_hold(seed):
    g = torch.Generator().manual_seed(seed)
    feats, labels = _clustered(g, n_per_class=6, num_classes=4, k=3, d=5, spread=[0.3, 1.0, 3.0][seed % 3])
    checked = 0
    for alpha in (0.5, 4.0, 20.0):
        for nu in (0.2, 0.6, 1.0):
            t = dg.bound_terms_per_anchor(feats, labels, num_classes=4, alpha=alpha, nu=nu)
            attr_ok = t["positive_mean"] >= 0
            assert (t["attraction_gap"][attr_ok] >= -1e-10).all()
            rep_ok = (t["nearest_class_balance"] >= 1) & (t["nearest_prototype_norm"] >= nu)
            rep_ok &= t["sup_repulsion"] >= 0
            assert (t["repulsion_gap"][rep_ok] >= -1e-10).all()
            checked += int(rep_ok.sum()) + int(attr_ok.sum())
    assert checked > 100  # the property is not vacuous


def test_bound_report_clean_when_assumptions_hold():
    g = torch.Generator().manual_seed(10)
    # centres in one half-space, so every nearest-prototype similarity is positive
    feats, labels = _clustered(g, n_per_class=8, num_classes=3, k=4, d=6, spread=0.3, shift=2.0)
    rep = dg.bound_terms(feats, labels, num_classes=3, alphas=(1.0, 10.0), nus=(0.5,))
    assert rep["violations"] == []
    assert rep["attraction"]["holds_fraction"] == 1.0 and rep["attraction"]["gap"] >= 0
    for key in ("alpha=1,nu=0.5", "alpha=10,nu=0.5"):
        assert rep["repulsion"][key]["holds_fraction"] == 1.0 and rep["repulsion"][key]["gap_min"] >= 0
    assert rep["assumptions"]["balance_ratio"] == 1.0 and rep["assumptions"]["class_counts"] == [8, 8, 8]


def test_unnormalized_features_break_the_attraction_bound_and_are_flagged():
    # anchor along e1; its other views: a long vector near -e1+e2 and a short one along e1. The raw mean
    # points away from the anchor while the mean cosine is positive: -s(z, mu~) > -E s(z, f).
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    img = torch.stack([e1, 10 * (-0.3 * e1 + e2), e1])  # (K=3, D) views of image 0
    other = torch.stack([e2, e2, e2])
    feats = torch.stack([img, other, -img, -other], dim=1).double()  # (K, N=4, D)
    labels = torch.tensor([0, 1, 0, 1])
    t = dg.bound_terms_per_anchor(feats, labels, num_classes=2, alpha=1.0, nu=1.0, normalize=False)
    assert t["positive_mean"][0, 0] > 0 and t["attraction_gap"][0, 0] < -0.1
    rep = dg.bound_terms(feats, labels, num_classes=2, normalize=False)
    assert rep["attraction"]["holds_fraction"] < 1
    assert any("not unit norm" in v for v in rep["violations"])
    fixed = dg.bound_terms_per_anchor(feats, labels, num_classes=2, alpha=1.0, nu=1.0, normalize=True)
    assert fixed["attraction_gap"][0, 0] >= 0


def test_imbalanced_probe_set_breaks_the_repulsion_bound_and_is_flagged():
    # 30 images of class 0, two of class 1 (the fewest the leave-one-out attraction term allows). Two class-0
    # images point along a, like both class-1 images; the other 28 point along b. For an anchor along a the nearest
    # other prototype (class 1) has s = 1, but class 1 is 2/32 of E_X', so n * p_1 = 1/8 << 1 and the log n term
    # no longer pays for it: gap = (log(4/32) + log 2) / 10 = -0.139.
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    feats = torch.cat([a.expand(2, 2, 3), b.expand(2, 28, 3), a.expand(2, 2, 3)], dim=1).double()  # (2, 32, 3)
    labels = torch.tensor([0] * 30 + [1] * 2)
    t = dg.bound_terms_per_anchor(feats, labels, num_classes=2, alpha=10.0, nu=1.0)
    assert (t["nearest_class"][:, :2] == 1).all() and (t["sup_repulsion"][:, :2] > 0.999).all()
    assert (t["nearest_class_balance"][:, :2] < 1).all() and (t["repulsion_gap"][:, :2] < -0.1).all()
    rep = dg.bound_terms(feats, labels, num_classes=2, alphas=(10.0,), nus=(1.0,))
    assert rep["repulsion"]["alpha=10,nu=1"]["holds_fraction"] < 1
    assert rep["assumptions"]["balance_ratio"] == pytest.approx(4 / 32)
    assert any("imbalanced" in v for v in rep["violations"])
    # the same geometry on a balanced probe set (as many class-1 copies as class-0 images) satisfies it
    balanced = torch.cat([feats, a.expand(2, 28, 3).double()], dim=1)
    t_bal = dg.bound_terms_per_anchor(balanced, torch.tensor([0] * 30 + [1] * 30), num_classes=2, alpha=10.0, nu=1.0)
    assert (t_bal["repulsion_gap"][:, :2] >= 0).all()


def test_nu_above_prototype_norm_is_flagged():
    g = torch.Generator().manual_seed(11)
    feats, labels = _clustered(g, n_per_class=5, num_classes=3, k=2, d=4, spread=3.0)
    rep = dg.bound_terms(feats, labels, num_classes=3, nus=(1.0,))
    assert rep["assumptions"]["prototype_norm_min"] < 1
    assert any("nu=1 exceeds" in v for v in rep["violations"])


def test_bound_bad_inputs_raise():
    feats, labels = torch.randn(2, 6, 3), torch.arange(6) % 2
    with pytest.raises(ValueError, match="views >= 2"):
        dg.bound_terms_per_anchor(feats[:1], labels, num_classes=2, alpha=1.0, nu=1.0)
    with pytest.raises(ValueError, match="alpha"):
        dg.bound_terms_per_anchor(feats, labels, num_classes=2, alpha=0.0, nu=1.0)
    with pytest.raises(ValueError, match="nu"):
        dg.bound_terms_per_anchor(feats, labels, num_classes=2, alpha=1.0, nu=-1.0)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        dg.bound_terms_per_anchor(feats, labels * 0, num_classes=1, alpha=1.0, nu=1.0)


# ---------------------------------------------------------------------------------------------------------
# geometry


def test_alignment_uniformity_hand_values():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert dg.alignment(z, z).item() == pytest.approx(0.0)
    assert dg.alignment(z, -z).item() == pytest.approx(4.0)  # ||2 e||^2
    # two orthogonal unit vectors: ||zi - zj||^2 = 2 -> log exp(-4) = -4
    assert dg.uniformity(z).item() == pytest.approx(-4.0)


def test_effective_rank_extremes():
    g = torch.Generator().manual_seed(12)
    line = torch.randn(50, 1, generator=g) * torch.tensor([[1.0, 2.0, 3.0]])
    assert dg.effective_rank(line) == pytest.approx(1.0, abs=1e-6)
    iso = torch.cat([torch.eye(4), -torch.eye(4)])  # covariance proportional to identity
    assert dg.effective_rank(iso) == pytest.approx(4.0, rel=1e-9)


def test_geometry_on_perfect_views():
    g = torch.Generator().manual_seed(13)
    base = torch.nn.functional.normalize(torch.randn(10, 16, generator=g), dim=-1)
    feats = base.expand(3, 10, 16)
    geo = dg.geometry(feats)
    assert geo["alignment"] == pytest.approx(0.0, abs=1e-6)
    assert geo["positive_similarity"] == pytest.approx(1.0, abs=1e-6)
    assert geo["contrastive_top1"] == 1.0
    assert -4.0 <= geo["uniformity"] <= 0 and 1 <= geo["effective_rank"] <= 10
    sims = base @ base.T
    assert geo["negative_similarity"] == pytest.approx(sims[~torch.eye(10, dtype=torch.bool)].mean().item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# from an encoder


class _ToyEncoder(torch.nn.Module):
    """forward(x) -> (h, z): h the per-channel mean (B, C), z a fixed linear map of h (B, 2)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 2, bias=False)
        torch.nn.init.eye_(self.proj.weight)

    def forward(self, x):
        h = x.mean(dim=(2, 3))
        return h, self.proj(h)


class _Images:
    def __init__(self, images, labels):
        self.images, self.labels, self.classes = images, labels, [str(c) for c in range(int(labels.max()) + 1)]

    def __len__(self):
        return self.images.shape[0]

    def get_images(self, idx):
        return self.images[idx]


def _brightness_views(images, *, num_views, seed, indices):
    """View v of image i scaled by a factor that depends only on (seed, i, v)."""
    g = torch.Generator().manual_seed(seed)
    table = 0.5 + torch.rand(10_000, num_views, generator=g)  # (N_max, K)
    return images.float()[None] / 255 * table[indices].T[:, :, None, None, None]  # (K, B, C, H, W)


def test_view_features_and_prototype_bias_from_an_encoder():
    g = torch.Generator().manual_seed(20)
    labels = torch.arange(12) % 3
    images = torch.randint(0, 256, (12, 3, 4, 4), dtype=torch.uint8, generator=g)
    data = _Images(images, labels)
    enc = _ToyEncoder().eval()
    feats = dg.view_features(enc, data, views=3, recipe=_brightness_views, batch_size=5)
    assert feats["backbone"].shape == (3, 12, 3) and feats["projector"].shape == (3, 12, 2)
    want = _brightness_views(images, num_views=3, seed=0, indices=torch.arange(12)).mean(dim=(3, 4))
    torch.testing.assert_close(feats["backbone"], want)
    bias = dg.prototype_bias(enc, data, views=3, recipe=_brightness_views, feature="projector", normalize=False)
    ref = dg.bias_from_features(feats["projector"], labels, num_classes=3, normalize=False)
    assert bias["euclidean"] == pytest.approx(ref["euclidean"])
    with pytest.raises(ValueError, match="feature must be"):
        dg.prototype_bias(enc, data, recipe=_brightness_views, feature="z")
    report = dg.diagnose_features(feats, labels, num_classes=3, alphas=(2.0,), nus=(0.5,))
    flat = dg.flat_metrics(report, prefix="diag/")
    assert flat["diag/bias/backbone/normalized/angle_deg"] == pytest.approx(
        report["bias"]["backbone"]["normalized"]["angle_deg"]
    )
    assert flat["diag/bounds/repulsion/alpha=2,nu=0.5/gap"] == report["bounds"]["repulsion"]["alpha=2,nu=0.5"]["gap"]
    assert flat["diag/bounds/violations"] == len(report["bounds"]["violations"])
    assert all(math.isfinite(v) for v in flat.values())
