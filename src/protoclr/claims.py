"""The paper's claims as paired comparisons of runs, with 95% intervals and a verdict (the report's first table).

    diffs = claim_pairs(groups, CLAIMS[0])          # A - B per pair of runs (same seed, same config but the treatment)
    mean, lo, hi, n = paired_interval(diffs)        # two-sided 95% t-interval over pairs
    verdict(lo, hi, sign=+1)                        # reproduced | contradicted | not shown | too few pairs

``groups``: ``protoclr.report.Group`` objects (``study``, ``runs`` rows with ``config``, ``status`` and
``final_metrics``, ``epochs`` per run id).
"""

from __future__ import annotations

import json
import math
from typing import Any

from protoclr.measure import ATTRACTION_GAP, BIAS, EVAL_LINEAR, last_good

RESULT_STATUSES = ("finished", "diverged")  # the runs whose final metrics count (a diverged run: its last good one)

# The paper's claims, each checked by a paired comparison: a run of setting A and a run of setting B pair when
# they share the seed and every config value but the ``treatment`` keys; the claim is about the mean of
# ``metric`` (A) - ``metric`` (B) over pairs (``sign`` +1: A above B, -1: A below B, 0: no difference larger than
# ``margin``). ``within`` claims compare two epochs of the same run instead (first and last epoch record).
CLAIMS: list[dict[str, Any]] = [
    dict(study="loss_balance", claim="the balanced loss beats generalized NT-Xent (same alpha, lam; each at its own "
         "scale, as the paper compares them)", paper="67.40 vs 66.85 (ImageNet best points); 86.08 vs 85.85 (CIFAR-10)",
         metric=EVAL_LINEAR, scale=100, sign=1, treatment=("loss.name", "loss.scale"),
         a=lambda c: c["loss"]["name"] == "balanced" and c["loss"]["scale"] == "preset",
         b=lambda c: c["loss"]["name"] == "generalized_nt_xent" and c["loss"]["scale"] == "preset"),
    dict(study="loss_balance", claim="the balanced loss beats generalized NT-Xent at the same loss scale (the "
         "matched control: both times 1/alpha, so SGD takes steps of the same size)", paper="(not run in the paper)",
         metric=EVAL_LINEAR, scale=100, sign=1, treatment=("loss.name", "loss.scale"),
         a=lambda c: c["loss"]["name"] == "balanced",
         b=lambda c: c["loss"]["name"] == "generalized_nt_xent" and c["loss"]["scale"] == "inverse_alpha"),
    dict(study="augmentation", claim="removing Gaussian blur lowers accuracy", paper="64.57 vs 65.98",
         metric=EVAL_LINEAR, scale=100, sign=-1, treatment=("data.view_modifiers",),
         a=lambda c: c["data"]["view_modifiers"] == ["no_blur"], b=lambda c: c["data"]["view_modifiers"] == []),
    dict(study="augmentation", claim="adding random rotation lowers accuracy", paper="63.30 vs 65.98",
         metric=EVAL_LINEAR, scale=100, sign=-1, treatment=("data.view_modifiers",),
         a=lambda c: c["data"]["view_modifiers"] == ["add_rotation"], b=lambda c: c["data"]["view_modifiers"] == []),
    dict(study="augmentation", claim="removing colour distortion lowers accuracy", paper="62.56 vs 65.98",
         metric=EVAL_LINEAR, scale=100, sign=-1, treatment=("data.view_modifiers",),
         a=lambda c: c["data"]["view_modifiers"] == ["no_color"], b=lambda c: c["data"]["view_modifiers"] == []),
    dict(study="augmentation", claim="adding random cutout changes accuracy by less than 1 point",
         paper="65.76 vs 65.98", metric=EVAL_LINEAR, scale=100, sign=0, margin=1.0, treatment=("data.view_modifiers",),
         a=lambda c: c["data"]["view_modifiers"] == ["add_cutout"], b=lambda c: c["data"]["view_modifiers"] == []),
    dict(study="augmentation", claim="an augmentation set that raises the prototype bias (rotation) raises it",
         paper="bias 38.11 vs 36.72", metric=BIAS, scale=1, sign=1, treatment=("data.view_modifiers",),
         a=lambda c: c["data"]["view_modifiers"] == ["add_rotation"], b=lambda c: c["data"]["view_modifiers"] == []),
    dict(study="similarity", claim="cosine similarity beats the unnormalized dot product", paper="65.98 vs 0.43",
         metric=EVAL_LINEAR, scale=100, sign=1, treatment=("loss.similarity",), last_good=True,
         a=lambda c: c["loss"]["similarity"] == "cosine", b=lambda c: c["loss"]["similarity"] == "dot"),
    dict(study="similarity", claim="cosine similarity beats negative Euclidean distance", paper="65.98 vs 10.63",
         metric=EVAL_LINEAR, scale=100, sign=1, treatment=("loss.similarity",), last_good=True,
         a=lambda c: c["loss"]["similarity"] == "cosine", b=lambda c: c["loss"]["similarity"] == "neg_euclidean"),
    dict(study="class_balance", claim="a uniform class distribution beats a long tail of the same size",
         paper="20.82 vs 13.65 (ImageNet-LT budget)", metric=EVAL_LINEAR, scale=100, sign=1,
         treatment=("data.class_profile", "data.dataset", "data.uniform_total", "data.test_split"),
         a=lambda c: c["data"]["class_profile"] == "uniform",
         b=lambda c: c["data"]["class_profile"] == "longtail" or c["data"]["dataset"] == "imagenet_lt"),
    dict(study=None, claim="the attraction gap shrinks during training (last epoch below the first; every run with "
         "per-epoch diagnostics)",
         paper="shrinks, then stabilizes", metric=ATTRACTION_GAP, scale=1, sign=-1, within=True,
         a=lambda c: True, b=lambda c: True),
    dict(study="targets", claim="a momentum target lowers the attraction gap (a better prototype estimate)",
         paper="(the paper's reading of MoCo/BYOL; no number)", metric=ATTRACTION_GAP, scale=1, sign=-1,
         treatment=("target.name", "target.momentum_start"),
         a=lambda c: c["target"]["name"] == "momentum", b=lambda c: c["target"]["name"] == "shared"),
]

# t quantiles t_{0.975, df} for df = 1..30 (two-sided 95% intervals); beyond, the Cornish-Fisher expansion.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table to 30, then z + (z^3 + z)/(4 df))."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    z = 1.959964
    return _T975[df - 1] if df <= 30 else z + (z**3 + z) / (4 * df)


def paired_interval(diffs: list[float]) -> tuple[float, float, float, int]:
    """``(mean, lo, hi, n)``: the mean of paired differences and its two-sided 95% t-interval (nan for n < 2)."""
    n = len(diffs)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    m = sum(diffs) / n
    if n < 2:
        return m, math.nan, math.nan, n
    half = t975(n - 1) * math.sqrt(sum((d - m) ** 2 for d in diffs) / (n - 1) / n)
    return m, m - half, m + half, n


def verdict(lo: float, hi: float, *, sign: int, margin: float = 0.0) -> str:
    """``reproduced`` when the interval lies on the claimed side of 0 (inside ``[-margin, margin]`` for a claim
    of no difference), ``contradicted`` when it lies on the other side (entirely outside the margin), else
    ``not shown`` (the interval is too wide to tell), or ``too few pairs``."""
    if math.isnan(lo):
        return "too few pairs"
    if sign == 0:
        return "reproduced" if -margin <= lo and hi <= margin else \
            ("contradicted" if lo > margin or hi < -margin else "not shown")
    lo, hi = (lo, hi) if sign > 0 else (-hi, -lo)
    return "reproduced" if lo > 0 else ("contradicted" if hi < 0 else "not shown")


def _without(config: dict[str, Any], keys: tuple[str, ...]) -> str:
    c = json.loads(json.dumps(config))
    for key in keys:
        sec, _, name = key.partition(".")
        c.get(sec, {}).pop(name, None)
    c.get("train", {}).pop("out_dir", None)
    c.get("train", {}).pop("run_name", None)
    return json.dumps(c, sort_keys=True)


def claim_pairs(groups: list[Any], claim: dict[str, Any]) -> list[float]:
    """The paired differences (A - B, times ``scale``) of ``claim`` over this database's runs of its study."""
    studies = (claim["study"],) if claim["study"] else {g.study for g in groups}
    runs = [r for g in groups if g.study in studies for r in g.runs if r["status"] in RESULT_STATUSES]
    metric, scale = claim["metric"], claim["scale"]

    def value(r: dict[str, Any]) -> float | None:
        fm = r["final_metrics"] or {}
        v = fm.get(metric, fm.get(last_good(metric)) if claim.get("last_good") else None)
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    if claim.get("within"):  # first vs last epoch record of each run
        out = []
        for g in groups:
            if g.study not in studies:
                continue
            for r in g.runs:
                rows = [e for e in g.epochs.get(r["run_id"], []) if isinstance(e.get(metric), (int, float))]
                if len(rows) >= 2 and claim["a"](r["config"]):
                    out.append(scale * (rows[-1][metric] - rows[0][metric]))
        return out
    treat = claim["treatment"]
    b_runs = {}
    for r in runs:
        if claim["b"](r["config"]) and value(r) is not None:
            b_runs.setdefault(_without(r["config"], treat), []).append(r)
    diffs = []
    for r in runs:
        if claim["a"](r["config"]) and not claim["b"](r["config"]) and value(r) is not None:
            for other in b_runs.get(_without(r["config"], treat), []):
                diffs.append(scale * (value(r) - value(other)))
    return diffs
