"""The paper's claims as tests fixed before the runs (docs/results/cpu/plan.md): each claim's one comparison, its
95% interval, a Holm-adjusted p-value across the claims, the minimum detectable effect and a verdict.

    rows = answer(groups)                       # one ClaimResult per claim of CLAIMS, in order
    test = paired_test([0.4, 0.1, 0.3])         # mean, 95% t-interval, sd, two-sided p of a one-sample t-test
    holm([0.01, 0.04, 0.2])                     # Holm (1979) step-down adjusted p-values
    mde(sd=0.1, n=5, level=0.05 / 13)           # the smallest true mean difference found with 80% power

``groups``: ``protoclr.report.Group`` objects (``runs`` rows with ``config``, ``status`` and ``final_metrics``,
``epochs`` per run id). Only finished (and, for claims on a diverged arm, diverged) runs count: a running,
interrupted or failed run has no final metrics and its last epoch record is not the end of training.

Kinds of claim:
* ``paired``: runs of arm A and arm B pair when they share the seed and every config value except the treatment
  keys and the keys that say only how a run executes or what is monitored while it trains
  (:data:`NOT_A_TREATMENT`: per-epoch measurements do not change training, ``tests/test_train.py`` checks it);
  the statistic is the mean of A - B over pairs.
* ``change``: per run, the metric at its last epoch record minus the step-0 record (``eval.initial``); runs
  without a step-0 record do not count.
* ``flat``: per run, ``|slope over the last 3 records| - FLAT_RATIO * |slope over the first 3|`` (slopes per
  1000 steps, least squares): below 0 when the curve has flattened to under a quarter of its early rate.
* ``value``: per run, a quantity of the last epoch record (e.g. one gap minus another) against 0.

Decision rule (fixed in plan.md before the runs): a directional claim's p-values are Holm-adjusted over every
directional claim with at least :data:`MIN_N` units; ``reproduced`` when the adjusted p < 0.05 and the mean lies
on the claimed side, ``contradicted`` when it lies on the other; otherwise ``no effect larger than the MDE`` when the
95% interval lies inside +-MDE, else ``inconclusive``. A claim of no difference (``sign`` 0) is ``reproduced`` when
its interval lies inside +-margin, ``contradicted`` when it lies outside, else ``inconclusive`` (not in the Holm
family). Fewer than :data:`MIN_N` units: ``too few runs``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protoclr.config import without_keys
from protoclr.measure import (
    ATTRACTION_GAP,
    ATTRACTION_SSL,
    ATTRACTION_SUP,
    BIAS_DEBIASED,
    EVAL_LINEAR,
    REPULSION_GAP,
    last_good,
)

RESULT_STATUSES = ("finished", "diverged")  # the runs whose final metrics count (a diverged run: its last good one)
FAMILY_ALPHA = 0.05  # family-wise error rate of the Holm procedure
POWER = 0.8  # the minimum detectable effect's power
MIN_N = 3  # units (pairs or runs) a claim needs before it is answered
FLAT_RATIO = 0.25  # "stabilizes": the late slope under this fraction of the early one
# Config keys that say where or how a run executes, or what is monitored while it trains: never a treatment.
NOT_A_TREATMENT = ("train.out_dir", "train.run_name", "trainer", "data.root", "data.num_workers", "data.download",
                   "eval.every", "eval.initial", "eval.batch_size")


# ----------------------------------------------------------------------------------------------------------
# statistics (no scipy at run time; tests/test_report.py checks each against scipy.stats)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbeta) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t (bisection on :func:`t_cdf`, to 1e-10)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > q:
        lo *= 2.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    while hi - lo > 1e-10 * max(1.0, abs(hi)):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Test:
    """A one-sample t-test of ``mean == 0`` over ``n`` units: the mean, its two-sided 95% interval, the sample
    standard deviation and the two-sided p-value (nan where ``n < 2`` or every unit is equal)."""

    mean: float
    lo: float
    hi: float
    sd: float
    p: float
    n: int


def paired_test(diffs: list[float]) -> Test:
    """:class:`Test` of paired differences (or per-run changes) ``diffs``."""
    n = len(diffs)
    nan = math.nan
    if n == 0:
        return Test(nan, nan, nan, nan, nan, 0)
    m = sum(diffs) / n
    if n < 2:
        return Test(m, nan, nan, nan, nan, n)
    sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    half = t_ppf(0.975, n - 1) * se
    p = 2.0 * (1.0 - t_cdf(abs(m) / se, n - 1)) if se > 0 else (1.0 if m == 0 else 0.0)
    return Test(m, m - half, m + half, sd, p, n)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): sorted ascending, ``p_(i) * (m - i)`` made
    monotone and capped at 1. Rejecting where the adjusted p < alpha controls the family-wise error at alpha."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, pvalues[i] * (m - rank)))
        out[i] = running
    return out


def t_test_power(*, shift: float, n: int, level: float) -> float:
    """The power of a two-sided one-sample t-test at ``level`` with ``n`` units when the true mean is ``shift``
    standard deviations from 0: the noncentral t tail, integrated over the chi-square of the sample variance
    (``u = sqrt(V)``, V ~ chi2(n - 1); Simpson's rule on 2000 intervals)."""
    df = n - 1
    crit, delta = t_ppf(1.0 - level / 2.0, df), shift * math.sqrt(n)
    phi = lambda x: 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))  # noqa: E731
    log_norm = (df / 2.0) * math.log(2.0) + math.lgamma(df / 2.0)
    top = math.sqrt(df + 12.0 * math.sqrt(2.0 * df) + 60.0)
    steps, total = 2000, 0.0
    for i in range(steps + 1):
        u = top * i / steps
        dens = 0.0 if u == 0 else 2.0 * u * math.exp((df / 2.0 - 1.0) * math.log(u * u) - u * u / 2.0 - log_norm)
        c = crit * u / math.sqrt(df)
        w = 1 if i in (0, steps) else (4 if i % 2 else 2)
        total += w * dens * (phi(delta - c) + phi(-c - delta))
    return total * top / steps / 3.0


def mde(*, sd: float, n: int, level: float, power: float = POWER) -> float:
    """The smallest true mean difference that a two-sided one-sample t-test at ``level`` detects with ``power``,
    for ``n`` units of standard deviation ``sd`` (:func:`t_test_power` solved by bisection)."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    lo, hi = 0.0, 1.0
    while t_test_power(shift=hi, n=n, level=level) < power:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-6 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_test_power(shift=mid, n=n, level=level) < power else (lo, mid)
    return 0.5 * (lo + hi) * sd


def sig3(x: float, *, sign: bool = True) -> str:
    """``x`` with 3 significant digits (``-0.00990``, ``+0.230``, ``+12.3``); "-" for nan."""
    if not math.isfinite(x):
        return "-"
    return f"{x:+#.3g}" if sign else f"{x:#.3g}"


# ----------------------------------------------------------------------------------------------------------
# the claims


def _mods(*names: str) -> Callable[[dict[str, Any]], bool]:
    return lambda c: list(c["data"]["view_modifiers"]) == list(names)


def _similarity(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda c: c["loss"]["similarity"] == name


def _profile(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda c: c["data"].get("class_profile") == name


def _loss(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda c: c["loss"]["name"] == name


def baseline_arm(c: dict[str, Any]) -> bool:
    """The plan's shared baseline arm (docs/results/cpu/plan.md: the recipe, balanced lam = 1 at its alpha, cosine,
    the baseline views, every class): one sweep runs it, and every comparison that needs it pairs with it."""
    lo, d = c["loss"], c["data"]
    return (lo["name"] == "balanced" and lo["lam"] == 1 and lo.get("scale", "preset") == "preset"
            and lo["similarity"] == "cosine" and not d["view_modifiers"] and d.get("class_profile", "none") == "none")


# The paper's results, the one table of its figures (the claims below and protoclr.report read it): top-1
# linear accuracy (%), ResNet-50 on ImageNet for 100 epochs at batch 512 unless the dataset says otherwise.
# ``select`` picks this setting's runs from a run's config; ``best`` rows take the grid point with the highest mean;
# ``shared`` rows are the baseline setting, read from the shared baseline arm when their study ran no such arm.
PAPER: list[dict[str, Any]] = [
    dict(id="baseline", study="augmentation", setting="SimCLR augmentations (baseline)", dataset="ImageNet",
         acc=65.98, bias=36.72, select=_mods(), shared=True),
    dict(id="no_blur", study="augmentation", setting="no Gaussian blur", dataset="ImageNet", acc=64.57, bias=37.43,
         select=_mods("no_blur")),
    dict(id="rotation", study="augmentation", setting="add random rotation", dataset="ImageNet", acc=63.30,
         bias=38.11, select=_mods("add_rotation")),
    dict(id="no_color", study="augmentation", setting="no color distortion", dataset="ImageNet", acc=62.56, bias=None,
         select=_mods("no_color")),
    dict(id="cutout", study="augmentation", setting="add random cutout", dataset="ImageNet", acc=65.76, bias=None,
         select=_mods("add_cutout")),
    dict(id="cosine", study="similarity", setting="cosine + normalization", dataset="ImageNet", acc=65.98,
         select=_similarity("cosine"), shared=True),
    dict(id="dot", study="similarity", setting="dot product (no normalization: our reading)", dataset="ImageNet",
         acc=0.43, select=_similarity("dot")),
    dict(id="neg_euclidean", study="similarity", setting="negative Euclidean distance (no normalization: our "
         "reading)", dataset="ImageNet", acc=10.63, select=_similarity("neg_euclidean")),
    dict(id="uniform", study="class_balance", setting="uniform class distribution",
         dataset="ImageNet-LT budget (our reading)", acc=20.82, select=_profile("uniform")),
    dict(id="longtail", study="class_balance", setting="long-tailed (ImageNet-LT)", dataset="ImageNet-LT", acc=13.65,
         select=lambda c: _profile("longtail")(c) or c["data"]["dataset"] == "imagenet_lt"),
    dict(id="balanced_imagenet", study="loss_balance", setting="balanced loss, best (paper: alpha=4, lam=2)",
         dataset="ImageNet", acc=67.40, best=True, select=_loss("balanced")),
    dict(id="generalized_imagenet", study="loss_balance", setting="generalized NT-Xent, best (point not stated)",
         dataset="ImageNet", acc=66.85, best=True, select=_loss("generalized_nt_xent")),
    dict(id="nt_xent", study="loss_balance", setting="standard NT-Xent (alpha=2: our reading; lam=1)",
         dataset="ImageNet", acc=65.98,
         select=lambda c: c["loss"]["name"] == "nt_xent" or (c["loss"]["name"] == "generalized_nt_xent"
                                                             and c["loss"]["alpha"] == 2 and c["loss"]["lam"] == 1)),
    dict(id="balanced_cifar10", study="loss_balance", setting="balanced loss, best (paper: alpha=1, lam=4)",
         dataset="CIFAR-10", acc=86.08, best=True, select=_loss("balanced")),
    dict(id="generalized_cifar10", study="loss_balance", setting="generalized NT-Xent, best (point not stated)",
         dataset="CIFAR-10", acc=85.85, best=True, select=_loss("generalized_nt_xent")),
]
_FIG = {row["id"]: row for row in PAPER}


def fig(row: str, what: str = "acc") -> str:
    """A figure of :data:`PAPER` as the paper prints it (``fig("no_color")`` -> ``"62.56"``)."""
    return f"{_FIG[row][what]:.2f}"


def _gap_sup(r: dict[str, Any]) -> float | None:
    """The supervised reading of the attraction bound: the supervised attraction term minus its self-supervised
    bound (sup - ssl)."""
    a, b = r.get(ATTRACTION_SUP), r.get(ATTRACTION_SSL)
    return a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None


def _rep_minus_attr(r: dict[str, Any]) -> float | None:
    a, b = r.get(REPULSION_GAP), r.get(ATTRACTION_GAP)
    return a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None


def _baseline_losses(c: dict[str, Any]) -> bool:
    """Every arm whose loss and views are the baseline's kind: the bounds claims read its per-epoch records."""
    return c["loss"]["name"] == "balanced" and c["loss"]["similarity"] == "cosine"


@dataclass(frozen=True)
class Claim:
    """One claim of the paper and the one comparison that decides it (see the module docstring for ``kind``)."""

    id: str
    claim: str
    paper: str
    metric: str | Callable[[dict[str, Any]], float | None]  # a key, or a function of an epoch record
    kind: str = "paired"  # paired | change | flat | value
    sign: int = 1  # +1: A above B (or the quantity above 0), -1: below, 0: no difference larger than margin
    scale: float = 1.0  # the reported unit: 100 for accuracy in points
    unit: str = ""
    a: Callable[[dict[str, Any]], bool] = lambda c: True  # arm A (paired), or which runs count (other kinds)
    b: Callable[[dict[str, Any]], bool] = lambda c: False  # arm B (paired)
    treatment: tuple[str, ...] = ()
    margin: float = 0.0  # sign 0: the equivalence margin (in the reported unit)
    last_good: bool = False  # a diverged run counts with its last good checkpoint's final metrics
    arms: str = ""  # A vs B in words, for the table


CLAIMS: list[Claim] = [
    Claim("balance", "balancing the loss (lam > 1) beats the unbalanced loss (lam = 1) at the same alpha",
          f"best points have lam > 1: ImageNet alpha=4 lam=2 ({fig('balanced_imagenet')}), CIFAR-10 alpha=1 lam=4 "
          f"({fig('balanced_cifar10')}); the same-alpha test is ours", EVAL_LINEAR,
          scale=100, unit="points", treatment=("loss.lam",), arms="balanced lam=2 vs lam=1",
          a=lambda c: c["loss"]["name"] == "balanced" and c["loss"]["lam"] > 1,
          b=lambda c: c["loss"]["name"] == "balanced" and c["loss"]["lam"] == 1),
    Claim("balanced_vs_ntxent", "the balanced loss beats generalized NT-Xent at the same alpha, lam and loss scale",
          f"{fig('balanced_imagenet')} vs {fig('generalized_imagenet')} (ImageNet best points), "
          f"{fig('balanced_cifar10')} vs {fig('generalized_cifar10')} (CIFAR-10); the matched scale is our control",
          EVAL_LINEAR, scale=100, unit="points", treatment=("loss.name", "loss.scale"),
          arms="balanced vs generalized NT-Xent x 1/alpha",
          a=lambda c: c["loss"]["name"] == "balanced" and c["loss"]["scale"] == "preset",
          b=lambda c: c["loss"]["name"] == "generalized_nt_xent" and c["loss"]["scale"] == "inverse_alpha"),
    Claim("cosine_vs_dot", "cosine similarity beats the unnormalized dot product",
          f"{fig('cosine')} vs {fig('dot')} (ImageNet)", EVAL_LINEAR,
          scale=100, unit="points", treatment=("loss.similarity",), last_good=True,
          arms="cosine vs dot (last good checkpoint)",
          a=_similarity("cosine"), b=_similarity("dot")),
    Claim("cosine_vs_euclidean", "cosine similarity beats negative Euclidean distance",
          f"{fig('cosine')} vs {fig('neg_euclidean')} (ImageNet)", EVAL_LINEAR,
          scale=100, unit="points", treatment=("loss.similarity",), last_good=True,
          arms="cosine vs neg. Euclidean",
          a=_similarity("cosine"), b=_similarity("neg_euclidean")),
    Claim("no_color", "removing colour distortion lowers accuracy",
          f"{fig('no_color')} vs {fig('baseline')} (ImageNet)", EVAL_LINEAR, sign=-1,
          scale=100, unit="points", treatment=("data.view_modifiers",), arms="no colour vs baseline views",
          a=_mods("no_color"), b=_mods()),
    Claim("rotation", "adding random rotation lowers accuracy",
          f"{fig('rotation')} vs {fig('baseline')} (ImageNet)", EVAL_LINEAR, sign=-1,
          scale=100, unit="points", treatment=("data.view_modifiers",), arms="+ rotation vs baseline views",
          a=_mods("add_rotation"), b=_mods()),
    Claim("cutout", "adding random cutout changes accuracy by less than 1 point",
          f"{fig('cutout')} vs {fig('baseline')} (ImageNet)", EVAL_LINEAR, sign=0, margin=1.0,
          scale=100, unit="points", treatment=("data.view_modifiers",),
          arms="+ cutout vs baseline views", a=_mods("add_cutout"), b=_mods()),
    Claim("rotation_bias", "adding rotation raises the prototype bias (debiased for the view variance)",
          f"bias {fig('rotation', 'bias')} vs {fig('baseline', 'bias')} (ImageNet; unit not stated)", BIAS_DEBIASED,
          scale=1, unit="degrees",
          treatment=("data.view_modifiers",), arms="+ rotation vs baseline views",
          a=_mods("add_rotation"), b=_mods()),
    Claim("class_balance", "a uniform class distribution beats a long tail of the same size",
          f"{fig('uniform')} vs {fig('longtail')} (ImageNet-LT; the equal image budget is our reading)", EVAL_LINEAR,
          scale=100, unit="points",
          treatment=("data.class_profile",), arms="uniform vs long tail, same image budget",
          a=_profile("uniform"), b=_profile("longtail")),
    Claim("attraction_slack", "the attraction gap shrinks during training (Jensen slack: ssl - surrogate)",
          "shrinks, then stabilizes", ATTRACTION_GAP, kind="change", sign=-1, unit="similarity",
          arms="last record - step 0", a=_baseline_losses),
    Claim("attraction_supervised", "the supervised attraction term approaches its self-supervised bound "
          "(sup - ssl shrinks)", "shrinks, then stabilizes", _gap_sup, kind="change", sign=-1, unit="similarity",
          arms="last record - step 0", a=_baseline_losses),
    Claim("attraction_stabilizes", "the attraction gap stabilizes (late slope under a quarter of the early one)",
          "shrinks, then stabilizes", ATTRACTION_GAP, kind="flat", sign=-1, unit="per 1000 steps",
          arms="|late slope| - |early slope| / 4", a=_baseline_losses),
    Claim("repulsion_larger", "the repulsion gap is larger than the attraction gap (nu = min ||mu_y||)",
          "larger but bounded", _rep_minus_attr, kind="value", unit="similarity",
          arms="repulsion gap - attraction gap, last record", a=_baseline_losses),
    Claim("repulsion_holds", "the repulsion bound holds (gap >= 0 at nu = min ||mu_y||, where its assumption holds)",
          "larger but bounded", REPULSION_GAP, kind="value", unit="similarity", arms="repulsion gap, last record",
          a=_baseline_losses),
]

# Claims of the paper this plan does not test, and why (docs/results/cpu/plan.md says more).
NOT_TESTED: list[tuple[str, str]] = [
    ("absolute accuracies (65.98% ImageNet, 86.08% CIFAR-10)", "a 4-layer convnet for 1000 steps on 2 CPU cores "
     "reaches about 60% linear on CIFAR-10; only differences between arms are comparable"),
    ("where the (alpha, lam) optimum lies", "a grid of 9+ points x 5 seeds is beyond this plan's budget; lam is "
     "tested at the recipe's alpha only"),
    ("removing Gaussian blur lowers accuracy", "the CIFAR-10 SimCLR views have no blur at 32 pixels (as in SimCLR's "
     "CIFAR-10 setting): there is nothing to remove"),
    ("a momentum target lowers the attraction gap", "our reading of the paper, which gives no number; not in "
     "this plan's budget"),
    ("the decoupled loss against NT-Xent", "not a claim of the paper's tables; not in this plan's budget"),
]


@dataclass
class ClaimResult:
    claim: Claim
    units: list[float] = field(default_factory=list)  # pairs' differences or per-run quantities, in the reported unit
    test: Test = field(default_factory=lambda: paired_test([]))
    p_holm: float = math.nan
    mde: float = math.nan
    verdict: str = "too few runs"


def _without(config: dict[str, Any], keys: tuple[str, ...]) -> str:
    return json.dumps(without_keys(config, (*keys, *NOT_A_TREATMENT)), sort_keys=True)


def _metric(record: dict[str, Any], metric: str | Callable[[dict[str, Any]], float | None]) -> float | None:
    v = metric(record) if callable(metric) else record.get(metric)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _slope(rows: list[dict[str, Any]], metric: Any) -> float:
    """Least-squares slope of ``metric`` against the step, per 1000 steps."""
    xs = [r["step"] / 1000 for r in rows]
    ys = [_metric(r, metric) for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0


def claim_units(groups: list[Any], claim: Claim) -> list[float]:
    """The units of ``claim`` over the database's runs: A - B per pair (``paired``), or one quantity per run."""
    runs = [(r, g.epochs.get(r["run_id"], [])) for g in groups for r in g.runs
            if r["status"] == "finished" or (claim.last_good and r["status"] == "diverged")]
    if claim.kind != "paired":
        out = []
        for r, epochs in runs:
            if r["status"] != "finished" or not claim.a(r["config"]):
                continue
            rows = [e for e in epochs if _metric(e, claim.metric) is not None and isinstance(e.get("step"), int)]
            if claim.kind == "change" and len(rows) >= 2 and rows[0]["step"] == 0:
                out.append(claim.scale * (_metric(rows[-1], claim.metric) - _metric(rows[0], claim.metric)))
            elif claim.kind == "flat" and len(rows) >= 6:
                out.append(claim.scale * (abs(_slope(rows[-3:], claim.metric))
                                          - FLAT_RATIO * abs(_slope(rows[:3], claim.metric))))
            elif claim.kind == "value" and rows:
                out.append(claim.scale * _metric(rows[-1], claim.metric))
        return out

    def value(r: dict[str, Any]) -> float | None:
        fm = r["final_metrics"] or {}
        v = _metric(fm, claim.metric)
        if v is None and claim.last_good and isinstance(claim.metric, str):
            v = _metric(fm, last_good(claim.metric))
        return v

    b_runs: dict[str, list[dict[str, Any]]] = {}
    for r, _ in runs:
        if claim.b(r["config"]) and value(r) is not None:
            b_runs.setdefault(_without(r["config"], claim.treatment), []).append(r)
    diffs = []
    for r, _ in runs:
        if claim.a(r["config"]) and not claim.b(r["config"]) and value(r) is not None:
            for other in b_runs.get(_without(r["config"], claim.treatment), []):
                diffs.append(claim.scale * (value(r) - value(other)))
    return diffs


def verdict(test: Test, *, sign: int, p_holm: float, mde_: float, margin: float = 0.0) -> str:
    """The decision rule of the module docstring."""
    if test.n < MIN_N:
        return "too few runs"
    if sign == 0:
        if -margin < test.lo and test.hi < margin:
            return "reproduced"
        return "contradicted" if test.lo > margin or test.hi < -margin else "inconclusive"
    if p_holm < FAMILY_ALPHA:
        return "reproduced" if sign * test.mean > 0 else "contradicted"
    return "no effect larger than the MDE" if -mde_ < test.lo and test.hi < mde_ else "inconclusive"


def answer(groups: list[Any], claims: list[Claim] | None = None) -> list[ClaimResult]:
    """Every claim's units, test, Holm-adjusted p-value (over the directional claims with ``MIN_N`` units or
    more), minimum detectable effect at the Bonferroni level ``FAMILY_ALPHA / m`` with m the number of directional
    claims (13 in :data:`CLAIMS`, answered yet or not: the level the first claim of Holm's sequence must reach
    once all are answered, so a bound on every later one's) and verdict."""
    results = []
    for c in claims if claims is not None else CLAIMS:
        units = claim_units(groups, c)
        results.append(ClaimResult(c, units, paired_test(units)))
    family = [r for r in results if r.claim.sign != 0 and r.test.n >= MIN_N]
    for r, p in zip(family, holm([r.test.p if math.isfinite(r.test.p) else 1.0 for r in family]), strict=True):
        r.p_holm = p
    level = FAMILY_ALPHA / max(sum(r.claim.sign != 0 for r in results), 1)  # the plan's family, answered or not
    for r in results:
        r.mde = mde(sd=r.test.sd, n=r.test.n, level=level if r.claim.sign else FAMILY_ALPHA)
        r.verdict = verdict(r.test, sign=r.claim.sign, p_holm=r.p_holm, mde_=r.mde, margin=r.claim.margin)
    return results


__all__ = [
    "CLAIMS",
    "FAMILY_ALPHA",
    "NOT_A_TREATMENT",
    "NOT_TESTED",
    "PAPER",
    "RESULT_STATUSES",
    "Claim",
    "ClaimResult",
    "Test",
    "answer",
    "baseline_arm",
    "claim_units",
    "fig",
    "holm",
    "mde",
    "paired_test",
    "sig3",
    "t_cdf",
    "t_ppf",
    "t_test_power",
    "verdict",
]
