"""A report of a results database next to the paper's numbers: ``report.md`` with PNG plots and a
self-contained ``report.html`` (the same plots embedded as base64).

    protoclr report runs/sweeps/cpu/runs.db --out docs/results/cpu

Runs are grouped by (sweep, grid point); every number is mean ± std over the seeds of a point with the
number of runs ``n`` (std is the sample standard deviation, "-" for one run). Accuracy is the cached linear
probe's top-1 on backbone features (``eval_linear_top1``, written by ``protoclr sweep``), bias the angle in
degrees between an image's surrogate prototype and its class prototype (``diag_bias_angle_deg``, normalised
backbone features, held-out probe set). Sections with no runs say so; nothing is filled in.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protoclr import atomic
from protoclr.claims import FAMILY_ALPHA, MIN_N, NOT_TESTED, PAPER, POWER, RESULT_STATUSES, answer, baseline_arm, sig3
from protoclr.measure import (
    ATTRACTION_GAP,
    ATTRACTION_SSL,
    ATTRACTION_SUP,
    ATTRACTION_SURROGATE,
    BIAS,
    BIAS_DEBIASED,
    BIAS_PROJ,
    EVAL_KNN,
    EVAL_LINEAR,
    KNN,
    NU1_VIOLATES,
    REPULSION_GAP,
    REPULSION_GAP_NU1,
    REPULSION_SSL,
    REPULSION_SUP,
    last_good,
    short_name,
)
from protoclr.runs import RunDir, read_all

ACC = EVAL_LINEAR

# ----------------------------------------------------------------------------------------------------------
# loading and statistics


@dataclass
class Group:
    """The runs of one grid point of one sweep (its seeds)."""

    sweep: str
    study: str
    point: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)  # runs-table rows (config, final_metrics, status)
    epochs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # run_id -> epoch rows
    source: str = ""
    command: str = ""

    @property
    def label(self) -> str:
        return ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt_value(v)}" for k, v in self.point.items()) or "base"

    @property
    def config(self) -> dict[str, Any]:
        return self.runs[0]["config"]

    @property
    def diverged(self) -> int:
        """How many of this point's runs diverged."""
        return sum(r["status"] == "diverged" for r in self.runs)

    def values(self, key: str) -> list[float]:
        """``key`` of the final metrics over this point's finished or diverged runs (finite values only)."""
        out = []
        for r in self.runs:
            v = (r["final_metrics"] or {}).get(key)
            if r["status"] in RESULT_STATUSES and isinstance(v, (int, float)) and math.isfinite(v):
                out.append(float(v))
        return out


def _fmt_value(v: Any) -> str:
    if isinstance(v, list):
        return "+".join(map(str, v)) or "none"
    return f"{v:g}" if isinstance(v, float) else str(v)


def load_groups(db_path: str | Path) -> tuple[list[Group], dict[str, int]]:
    """Groups of runs from ``runs.db`` and the count of runs per status. Runs outside any sweep form one
    group each (point = {})."""
    runs, meta, epochs = read_all(db_path)
    groups: dict[tuple[str, str], Group] = {}
    counts: dict[str, int] = {}
    for r in runs:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
        m = meta.get(r["run_id"])
        if m is None:
            key = (r["run_id"], "{}")
            g = groups.setdefault(key, Group(sweep=r["run_id"], study="", point={},
                                             source=str(RunDir(str(r["run_dir"])).config)))
        else:
            spec = json.loads(m["spec"])
            key = (m["sweep"], m["point"])
            g = groups.setdefault(key, Group(sweep=m["sweep"], study=m["study"], point=json.loads(m["point"]),
                                             source=spec.get("source") or spec.get("base") or "the built-in defaults",
                                             command=spec.get("command", "")))
        g.runs.append(r)
        g.epochs[r["run_id"]] = epochs.get(r["run_id"], [])
    return list(groups.values()), counts


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (nan for one value) and count."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    m = sum(values) / n
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return m, s, n


def fmt(values: list[float], *, scale: float = 1.0, digits: int = 2, empty: str = "no runs") -> str:
    """``"mean ± std (n=k)"``; ``empty`` for none."""
    m, s, n = mean_std([scale * v for v in values])
    if n == 0:
        return empty
    return f"{m:.{digits}f} ± {s:.{digits}f} (n={n})" if n > 1 else f"{m:.{digits}f} ± - (n=1)"


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan below 3 points or for a constant input."""
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length ({len(x)} vs {len(y)})")
    if len(x) < 3:
        return math.nan

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


# ----------------------------------------------------------------------------------------------------------
# document blocks, rendered to markdown and HTML


@dataclass
class Doc:
    blocks: list[tuple[str, Any]] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", (header, rows)))

    def image(self, name: str, png: bytes, alt: str) -> None:
        self.images[name] = png
        self.blocks.append(("img", (name, alt)))

    def markdown(self) -> str:
        out = []
        for kind, b in self.blocks:
            if kind == "h":
                out.append("#" * b[0] + " " + b[1])
            elif kind == "p":
                out.append(b)
            elif kind == "table":
                header, rows = b
                cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
                out.append("\n".join(["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
                                     + ["| " + " | ".join(map(cell, r)) + " |" for r in rows]))
            elif kind == "img":
                out.append(f"![{b[1]}]({b[0]})")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
               "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
               "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;"
               "padding:4px 8px;text-align:left}th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3;"
               "padding:1px 3px}</style></head><body>"]
        for kind, b in self.blocks:
            if kind == "h":
                out.append(f"<h{b[0]}>{html.escape(b[1])}</h{b[0]}>")
            elif kind == "p":
                out.append(f"<p>{_inline_code(html.escape(b))}</p>")
            elif kind == "table":
                header, rows = b
                out.append("<table><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in header) + "</tr>"
                           + "".join("<tr>" + "".join(f"<td>{_inline_code(html.escape(str(c)))}</td>" for c in r)
                                     + "</tr>" for r in rows) + "</table>")
            elif kind == "img":
                data = base64.b64encode(self.images[b[0]]).decode()
                out.append(f"<p><img alt='{html.escape(b[1])}' src='data:image/png;base64,{data}'></p>")
        return "\n".join(out) + "</body></html>\n"


def _inline_code(text: str) -> str:
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


# ----------------------------------------------------------------------------------------------------------
# plots


def _png(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(groups: list[Group], title: str) -> bytes:
    """Mean accuracy over (alpha, lam), each cell annotated mean ± std (n)."""
    plt = _plt()
    alphas = sorted({g.config["loss"]["alpha"] for g in groups})
    lams = sorted({g.config["loss"]["lam"] for g in groups})
    grid = [[math.nan] * len(alphas) for _ in lams]
    text = [[""] * len(alphas) for _ in lams]
    for g in groups:
        i, j = lams.index(g.config["loss"]["lam"]), alphas.index(g.config["loss"]["alpha"])
        m, s, n = mean_std([100 * v for v in g.values(ACC)])
        grid[i][j] = m
        text[i][j] = "no runs" if n == 0 else f"{m:.1f}\n± {s:.1f}\nn={n}" if n > 1 else f"{m:.1f}\nn=1"
    fig, ax = plt.subplots(figsize=(1.3 * len(alphas) + 2, 1.1 * len(lams) + 1.5))
    im = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    finite = [v for row in grid for v in row if math.isfinite(v)]
    mid = (min(finite) + max(finite)) / 2 if finite else 0
    for i in range(len(lams)):
        for j in range(len(alphas)):
            dark = math.isfinite(grid[i][j]) and grid[i][j] < mid
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_yticks(range(len(lams)), [f"{v:g}" for v in lams])
    ax.set_xlabel("alpha (inverse temperature)")
    ax.set_ylabel("lam (repulsion weight)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="linear top-1 (%)")
    return _png(fig)


def bar_chart(groups: list[Group], title: str) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(groups) + 1), 3.5))
    for i, g in enumerate(groups):
        vals = [100 * v for v in g.values(ACC)]
        m, s, n = mean_std(vals)
        if n:
            ax.bar(i, m, yerr=s if n > 1 else 0, capsize=4, color="C0", alpha=0.8)
            ax.scatter([i] * n, vals, color="k", s=10, zorder=3)
        diverged = sum(r["status"] == "diverged" for r in g.runs)
        note = f"n={n}" + (f"\n{diverged} diverged" if diverged else "")
        ax.text(i, (m if n else 0) + 1, note, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(groups)), [g.label for g in groups], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("linear top-1 (%)")
    ax.set_title(title, fontsize=10)
    return _png(fig)


def bias_scatter(groups: list[Group], title: str) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, g in enumerate(groups):
        (bm, bs, bn), (am, as_, an) = mean_std(g.values(BIAS)), mean_std([100 * v for v in g.values(ACC)])
        if bn and an:
            ax.errorbar(bm, am, xerr=bs if bn > 1 else None, yerr=as_ if an > 1 else None, fmt="o", capsize=3,
                        color=f"C{i % 10}", label=g.label)
    ax.set_xlabel("prototype bias (angle, degrees)")
    ax.set_ylabel("linear top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return _png(fig)


BOUND_PANELS = (
    ("attraction", ((ATTRACTION_SUP, "supervised -s(z, mu_y)"),
                    (ATTRACTION_SURROGATE, "surrogate -s(z, mu~_x)"),
                    (ATTRACTION_SSL, "self-supervised -E s(z, z')"))),
    ("attraction gap", ((ATTRACTION_GAP, "ssl - surrogate"),)),
    ("repulsion", ((REPULSION_SUP, "supervised max s(z, mu_y')"), (REPULSION_SSL, "self-supervised"))),
    ("repulsion gap", ((REPULSION_GAP, "ssl - supervised"),)),
)


def _epoch_band(g: Group, key: str) -> tuple[list[int], list[float], list[float]]:
    """``(steps, means, stds)`` of ``key`` over the point's runs, one entry per training step with a record (the
    step-0 record first where runs have one); records without a step fall back to their epoch number."""
    by_step: dict[int, list[float]] = {}
    for rows in g.epochs.values():
        for row in rows:
            v = row.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                by_step.setdefault(int(row.get("step", row["epoch"])), []).append(float(v))
    xs = sorted(by_step)
    stats = [mean_std(by_step[x]) for x in xs]
    return xs, [m for m, _, _ in stats], [0.0 if n < 2 else s for _, s, n in stats]


def curves(groups: list[Group], panels, title: str) -> bytes:
    """One subplot per panel: each key's mean over seeds per epoch with a ±std band. Colours are grid points
    (legend below the figure), line styles the panel's terms (legend in the panel)."""
    plt = _plt()
    from matplotlib.lines import Line2D

    cols = 2 if len(panels) > 2 else len(panels)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.2 * rows), squeeze=False)
    styles = ("-", "--", ":")
    for ax, (name, keys) in zip(axes.flat, panels, strict=False):
        for gi, g in enumerate(groups):
            for ki, (key, _) in enumerate(keys):
                xs, ms, ss = _epoch_band(g, key)
                if not xs:
                    continue
                ax.plot(xs, ms, styles[ki % 3], color=f"C{gi % 10}", marker="o", ms=3)
                ax.fill_between(xs, [m - s for m, s in zip(ms, ss, strict=True)],
                                [m + s for m, s in zip(ms, ss, strict=True)], color=f"C{gi % 10}", alpha=0.15)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("training step")
        if len(keys) > 1:
            ax.legend([Line2D([], [], color="k", ls=styles[i % 3]) for i in range(len(keys))],
                      [label for _, label in keys], fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [Line2D([], [], color=f"C{gi % 10}", marker="o") for gi in range(len(groups))]
    several = len({g.sweep for g in groups}) > 1  # the same point label from two sweeps must stay apart
    labels = [f"{g.sweep}: {g.label}" if several else g.label for g in groups]
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(groups)), fontsize=8,
               bbox_to_anchor=(0.5, -0.02 - 0.035 * math.ceil(len(groups) / 3)))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


# ----------------------------------------------------------------------------------------------------------
# sections


def _provenance(doc: Doc, groups: list[Group]) -> None:
    seen = []
    for g in groups:
        item = (g.source, g.command)
        if item not in seen:
            seen.append(item)
    for source, command in seen:
        doc.p(f"Config: `{source}`" + (f"; command: `{command}`" if command else ""))


def _stat_row(g: Group) -> list[str]:
    other = [r["status"] for r in g.runs if r["status"] not in RESULT_STATUSES]
    status = f"{len(g.runs) - len(other)}/{len(g.runs)} done" + (f", {g.diverged} diverged" if g.diverged else "")
    if other:
        status += ", " + ", ".join(f"{other.count(s)} {s}" for s in sorted(set(other)))
    ended = len(g.runs) - len(other)
    empty = "no runs" if not ended else "diverged" if g.diverged == ended else "not measured"  # ended without it

    def acc(key: str) -> str:  # a diverged run's probes are its last good checkpoint's, said so
        if not g.values(key) and g.values(last_good(key)):
            return f"diverged; last good checkpoint {fmt(g.values(last_good(key)), scale=100)}"
        return fmt(g.values(key), scale=100, empty=empty)

    return [g.sweep, g.label, acc(ACC), acc(EVAL_KNN), fmt(g.values(BIAS), empty=empty),
            fmt(g.values(BIAS_DEBIASED), empty=empty), status]


STAT_HEADER = ["sweep", "point", "linear top-1 (%)", "kNN top-1 (%)", "bias (deg)", "bias, debiased (deg)", "runs"]


def _dataset(g: Group) -> str:
    return g.config["data"]["dataset"]


def _by(groups: list[Group], key: Callable[[Group], Any]) -> dict[Any, list[Group]]:
    out: dict[Any, list[Group]] = {}
    for g in groups:
        out.setdefault(key(g), []).append(g)
    return out


def claims_table(groups: list[Group]) -> tuple[list[str], list[list[str]], str]:
    """The claims table (header, rows) and a one-sentence tally of its verdicts."""
    results = answer(groups)
    rows = []
    for r in results:
        c, t = r.claim, r.test
        what = "pairs" if c.kind == "paired" else "runs"
        ours = "-" if t.n == 0 else (sig3(t.mean) + (f" [{sig3(t.lo)}, {sig3(t.hi)}]" if t.n > 1 else "")
                                     + f" ({t.n} {what})")
        margin = f" (margin ±{c.margin:g})" if c.sign == 0 else ""
        p = "-" if not math.isfinite(r.p_holm) else (f"{r.p_holm:.3g}" if r.p_holm >= 1e-4 else "<1e-4")
        rows.append([c.claim, c.paper, c.arms, ours + (f" {c.unit}" if c.unit and t.n else ""),
                     (sig3(r.mde, sign=False) if math.isfinite(r.mde) else "-") + margin, p, r.verdict])
    tally: dict[str, int] = {}
    for r in results:
        tally[r.verdict] = tally.get(r.verdict, 0) + 1
    sentence = f"Of {len(results)} claims: " + ", ".join(f"{n} {v}" for v, n in sorted(tally.items(),
                                                                                      key=lambda kv: -kv[1])) + "."
    header = ["claim", "paper", "comparison (A vs B)", "ours: mean [95% CI] (n)", "MDE", "p (Holm)", "verdict"]
    return header, rows, sentence


def section_claims(doc: Doc, groups: list[Group]) -> None:
    doc.h(2, "The paper's claims")
    header, rows, sentence = claims_table(groups)
    doc.p(sentence + " The rule, fixed before the runs (protoclr.claims, docs/results/cpu/plan.md): runs pair when "
          "they share the seed and every config value but the treatment; the mean of A - B over pairs (or of a "
          "per-run change: last epoch record minus the step-0 record) with its two-sided 95% t-interval; p-values "
          f"Holm-adjusted across the directional claims with n >= {MIN_N}; reproduced / contradicted when the "
          f"adjusted p < {FAMILY_ALPHA:g} on the claimed / other side; otherwise no effect larger than the MDE when "
          f"the interval lies inside ±MDE (the effect found with {POWER:.0%} power at the Bonferroni level), else "
          "inconclusive. A claim of no difference is reproduced when its interval lies inside the margin. Only "
          "finished runs count (a diverged run with its last good checkpoint where the claim says so).")
    doc.table(header, rows)
    doc.p("Not tested here: " + "; ".join(f"{what} ({why})" for what, why in NOT_TESTED) + ".")


def section_paper(doc: Doc, groups: list[Group]) -> None:
    doc.h(2, "Against the paper")
    doc.p("Paper: top-1 linear accuracy (%), ResNet-50 on ImageNet, 100 epochs, batch 512 unless the dataset "
          "column says otherwise. Here: mean ± std over seeds (n runs) of this database's runs of the same study "
          "and setting, on whatever dataset and scale they used (named in the row). Best-of-grid rows take the "
          "grid point with the highest mean.")
    rows = []
    for ref in PAPER:
        chosen = [g for g in groups if g.study == ref["study"] and g.runs and ref["select"](g.config)]
        shared = not chosen and ref.get("shared", False)  # the baseline setting: the shared arm stands for it
        if shared:
            chosen = [g for g in groups if g.runs and ref["select"](g.config) and baseline_arm(g.config)]
        paper = f"{ref['acc']:.2f}" + (f" (bias {ref['bias']:.2f})" if ref.get("bias") is not None else "")
        if not chosen:
            rows.append([ref["study"], ref["setting"], ref["dataset"], paper, "-", "no runs", "-"])
            continue
        for ds, gs in _by(chosen, _dataset).items():
            if ref.get("best"):
                scored = [g for g in gs if g.values(ACC)]
                gs = [max(scored, key=lambda g: mean_std(g.values(ACC))[0])] if scored else gs[:1]
            for g in gs:
                here = fmt(g.values(ACC), scale=100)
                if not g.values(ACC) and g.diverged:
                    last = g.values(last_good(ACC))
                    here = f"diverged in {g.diverged} of {len(g.runs)} runs" + (
                        f" (last good checkpoint: {fmt(last, scale=100)})" if last else "")
                elif g.diverged:
                    here += f"; {g.diverged} of {len(g.runs)} runs diverged"
                if ref.get("bias") is not None and g.values(BIAS):
                    here += f"; bias {fmt(g.values(BIAS))}"
                point = f"{ds}: {g.label}" + (" (the shared baseline arm)" if shared else "")
                rows.append([ref["study"], ref["setting"], ref["dataset"], paper, point, here,
                             f"{g.sweep} ({g.source})"])
    doc.table(["study", "setting", "paper dataset", "paper", "here (dataset: point)", "here", "sweep (config)"],
              rows)


def section_loss_balance(doc: Doc, groups: list[Group]) -> None:
    doc.h(2, "Balancing the loss: accuracy over (alpha, lam)")
    gs = [g for g in groups if g.study == "loss_balance"]
    if not gs:
        doc.p("No runs of this study in the database (sweeps with `study: loss_balance`).")
        return
    for (ds, loss, scale), sub in _by(gs, lambda g: (_dataset(g), g.config["loss"]["name"],
                                                     g.config["loss"].get("scale", "preset"))).items():
        what = loss if scale == "preset" else f"{loss}, scale {scale}"  # a matched-scale control
        doc.h(3, f"{what} on {ds}")
        name = f"heatmap_{ds}_{loss}{'' if scale == 'preset' else '_' + scale}.png"
        doc.image(name, heatmap(sub, f"{what} on {ds}: linear top-1 (%), mean ± std over seeds"), name)
        doc.table(STAT_HEADER, [_stat_row(g) for g in sub])
        _provenance(doc, sub)


def section_augmentation(doc: Doc, groups: list[Group]) -> None:
    doc.h(2, "Augmentations and prototype bias")
    gs = [g for g in groups if g.study == "augmentation"]
    paper = [(r["bias"], r["acc"]) for r in PAPER if r["study"] == "augmentation" and r.get("bias") is not None]
    baseline_views = next(r["select"] for r in PAPER if r["id"] == "baseline")
    if gs and not any(baseline_views(g.config) for g in gs):  # the baseline views: the plan's shared arm
        gs += [g for g in groups if g.study != "augmentation" and g.runs and baseline_arm(g.config)]
    rho_paper = spearman([b for b, _ in paper], [a for _, a in paper])
    if not gs:
        doc.p("No runs of this study in the database (sweeps with `study: augmentation`).")
        return
    for ds, sub in _by(gs, _dataset).items():
        doc.h(3, f"{ds}")
        pts = [(mean_std(g.values(BIAS))[0], mean_std(g.values(ACC))[0]) for g in sub]
        pts = [(b, a) for b, a in pts if math.isfinite(b) and math.isfinite(a)]
        rho = spearman([b for b, _ in pts], [a for _, a in pts])
        doc.p(f"Spearman rank correlation of mean bias and mean accuracy over the {len(pts)} augmentation sets: "
              f"{rho:.2f} (paper, over its {len(paper)} sets with a reported bias: {rho_paper:.2f}). "
              "The paper's claim is a negative correlation: more bias, lower accuracy."
              + (" Fewer than 3 sets: no correlation computed." if len(pts) < 3 else "")
              + (" The baseline views are the plan's shared baseline arm (its own sweep, named in the table)."
                 if any(g.study != "augmentation" for g in sub) else ""))
        name = f"bias_vs_accuracy_{ds}.png"
        doc.image(name, bias_scatter(sub, f"{ds}: accuracy vs prototype bias (mean ± std over seeds)"), name)
        doc.table(STAT_HEADER, [_stat_row(g) for g in sub])
        _provenance(doc, sub)


def _bar_section(doc: Doc, groups: list[Group], study: str, title: str, what: str) -> None:
    doc.h(2, title)
    gs = [g for g in groups if g.study == study]
    if not gs:
        doc.p(f"No runs of this study in the database (sweeps with `study: {study}`). {what}")
        return
    for ds, sub in _by(gs, _dataset).items():
        doc.h(3, ds)
        name = f"{study}_{ds}.png"
        doc.image(name, bar_chart(sub, f"{ds}: {title.lower()} (bars: mean ± std, dots: seeds)"), name)
        doc.table(STAT_HEADER, [_stat_row(g) for g in sub])
        _provenance(doc, sub)


def section_class_balance(doc: Doc, groups: list[Group]) -> None:
    """Long-tailed vs uniform at one image budget: the balanced-probe accuracy (the comparison) and, where
    recorded, the same probes fitted on the profiled pretraining set (what an imbalanced probe adds)."""
    _bar_section(doc, groups, "class_balance", "Class balance", "")
    gs = [g for g in groups if g.study == "class_balance"]
    if not any(g.values(EVAL_LINEAR + "_pretrain_set") for g in gs):
        return
    doc.p("Linear and kNN top-1 above: probes fitted on a class-balanced draw of the training split before "
          "profiling, the same for both points (protoclr.sweep.probe_train_set). Below, the same probes fitted "
          "on each run's own pretraining set (long-tailed or uniform), for contrast.")
    doc.table(["sweep", "point", "linear, balanced probe (%)", "linear, pretraining-set probe (%)",
               "kNN, balanced probe (%)", "kNN, pretraining-set probe (%)"],
              [[g.sweep, g.label, fmt(g.values(ACC), scale=100),
                fmt(g.values(EVAL_LINEAR + "_pretrain_set"), scale=100),
                fmt(g.values(EVAL_KNN), scale=100), fmt(g.values(EVAL_KNN + "_pretrain_set"), scale=100)]
               for g in gs])


def section_bounds(doc: Doc, groups: list[Group]) -> None:
    doc.h(2, "Bound terms and gaps over training")
    gs = [g for g in groups if any(any(ATTRACTION_GAP in e for e in rows) for rows in g.epochs.values())]
    preferred = [g for g in gs if g.study == "bounds"] or [g for g in gs if len(g.epochs) and all(
        len(rows) > 2 for rows in g.epochs.values())]  # a bounds sweep, else the points measured every epoch
    gs = preferred or gs[:6]
    if not gs:
        doc.p("No run in the database recorded per-epoch bound terms (runs record them with "
              "`eval.diagnostics=true` and `eval.every` > 0).")
        return
    doc.p("Per epoch, on a class-balanced held-out probe set, L2-normalised projector outputs; the repulsion "
          "bound at the run's own inverse temperature and at nu = the smallest class-prototype norm on the probe "
          "set, the largest nu its assumption nu <= ||mu_y|| allows (protoclr.diagnostics.bound_terms). The table "
          "adds the repulsion gap at nu = 1 and how many epochs violate that assumption there. Lines: mean over "
          "seeds, bands: ± std." + ("" if preferred else " No `study: bounds` sweep: showing up to 6 points "
                                    "of other sweeps."))
    name = "bounds.png"
    doc.image(name, curves(gs, BOUND_PANELS, "bound terms over training"), name)
    rows = []
    for g in gs:
        epoch_rows = [row for rows_ in g.epochs.values() for row in rows_]
        head, tail = REPULSION_GAP_NU1.split("{alpha:g}")  # measure owns the key's format; the alpha varies by run
        nu1 = sorted({k for row in epoch_rows for k in row if k.startswith(head) and k.endswith(tail)})
        flags = [row[NU1_VIOLATES] for row in epoch_rows if isinstance(row.get(NU1_VIOLATES), (int, float))]
        violates = f"{sum(f == 1 for f in flags)} of {len(flags)}" if flags else "-"
        for key in (ATTRACTION_GAP, REPULSION_GAP, *nu1):
            xs, ms, ss = _epoch_band(g, key)
            if xs:
                last = f"{ms[-1]:.4f} ± {ss[-1]:.4f}"
                name = "repulsion_gap at nu = 1" if key in nu1 else short_name(key)
                rows.append([g.sweep, g.label, name, f"{ms[0]:.4f}", last, str(len(g.runs)),
                             violates if key in nu1 else ""])
    doc.table(["sweep", "point", "gap", "first record (mean)", "last record (mean ± std)", "runs",
               "epochs where nu = 1 violates nu <= min ||mu_y||"], rows)
    _provenance(doc, gs)


def section_targets(doc: Doc, groups: list[Group]) -> None:
    """Prototype estimators: accuracy and bias per target branch, then the bound gaps they are meant to shrink."""
    title = "Prototype estimators (target branch)"
    _bar_section(doc, groups, "targets", title, "No shipped sweep file runs it (a sweep over target.name does).")
    gs = [g for g in groups if g.study == "targets"]
    if not gs:
        return
    doc.p("Bound gaps and bias at the end of training (final metrics; the attraction gap is the self-supervised "
          "attraction minus the surrogate one, the repulsion gap the self-supervised repulsion bound minus the "
          "supervised term): a better estimator of mu~_x should shrink the attraction gap and the bias.")
    keys = (ATTRACTION_GAP, REPULSION_GAP, BIAS, BIAS_PROJ)
    rows = [[g.sweep, g.label, *(fmt(g.values(k), digits=4 if "gap" in k else 2) for k in keys)] for g in gs]
    doc.table(["sweep", "point", "attraction gap", "repulsion gap", "bias backbone (deg)", "bias projector (deg)"],
              rows)
    name = "targets_bounds.png"
    doc.image(name, curves(gs, BOUND_PANELS, "bound terms over training, per target branch"), name)
    _provenance(doc, gs)


def section_training(doc: Doc, groups: list[Group]) -> None:
    doc.h(2, "Training curves")
    gs = [g for g in groups if any(g.epochs.values())]
    if not gs:
        doc.p("No per-epoch metrics in the database.")
        return
    for sweep, sub in _by(gs, lambda g: g.sweep).items():
        doc.h(3, sweep)
        name = f"training_{sweep}.png"
        panels = (("loss", (("loss", "loss"),)), ("online kNN top-1", ((KNN, "kNN"),)))
        doc.image(name, curves(sub[:10], panels, f"{sweep}: training loss and online kNN (mean ± std over seeds)"),
                  name)
        _provenance(doc, sub[:1])


def section_all(doc: Doc, groups: list[Group], counts: dict[str, int]) -> None:
    doc.h(2, "Every point")
    doc.table(STAT_HEADER, [_stat_row(g) for g in groups])
    doc.p("Runs by status: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ".")


# The study sections: (study, section); each is drawn only when the database holds runs of its study.
STUDY_SECTIONS: list[tuple[str, Callable[[Doc, list[Group]], None]]] = [
    ("loss_balance", lambda doc, gs: section_loss_balance(doc, gs)),
    ("augmentation", lambda doc, gs: section_augmentation(doc, gs)),
    ("similarity", lambda doc, gs: _bar_section(doc, gs, "similarity", "Similarity measure", "")),
    ("decoupled", lambda doc, gs: _bar_section(doc, gs, "decoupled", "Decoupled contrastive loss against NT-Xent", "")),
    ("class_balance", lambda doc, gs: section_class_balance(doc, gs)),
    ("targets", lambda doc, gs: section_targets(doc, gs)),
]


def build_report(db_path: str | Path, *, title: str = "protoclr results", note: str = "",
                 paper: bool | None = None) -> Doc:
    """The whole report as a :class:`Doc`. With studies in the database (sweep files with ``study:``, or
    ``paper=True``): the claims table first, then the paper's table and each study that has runs; without: the
    user's runs and curves first, and no paper sections."""
    groups, counts = load_groups(db_path)
    studies = {g.study for g in groups if g.study}
    paper = bool(studies) if paper is None else paper
    doc = Doc()
    doc.h(1, title)
    doc.p(f"Database: `{db_path}`, {sum(counts.values())} runs in {len(groups)} points; generated "
          f"{time.strftime('%Y-%m-%d %H:%M')} by `protoclr report {db_path}`. Accuracy: cached linear probe "
          "top-1 on frozen backbone features; bias: angle (degrees) between surrogate and class prototypes.")
    if note:
        doc.p(note)
    if not paper:
        section_all(doc, groups, counts)
        section_training(doc, groups)
        section_bounds(doc, groups)
        doc.p("The paper's claims and studies are left out: no run here belongs to a study (a sweep file with "
              "`study:`); `protoclr report DB --out DIR --paper` adds them.")
        return doc
    section_claims(doc, groups)
    section_paper(doc, groups)
    for study, section in STUDY_SECTIONS:
        if study in studies:
            section(doc, groups)
    section_bounds(doc, groups)
    section_training(doc, groups)
    section_all(doc, groups, counts)
    missing = [study for study, _ in STUDY_SECTIONS if study not in studies]
    if missing:
        doc.p("Studies with no runs in this database: " + ", ".join(missing) + ".")
    return doc


def write_report(db_path: str | Path, out: str | Path, *, title: str = "protoclr results", note: str = "",
                 paper: bool | None = None) -> Path:
    """Write ``report.md`` + PNGs and ``report.html`` into ``out``; returns the markdown path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = build_report(db_path, title=title, note=note, paper=paper)
    for name, png in doc.images.items():
        atomic.write_bytes(out / name, png)
    atomic.write_text(out / "report.md", doc.markdown())
    atomic.write_text(out / "report.html", doc.html(title))
    return out / "report.md"


def cli_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="protoclr report", description=__doc__.split("\n\n")[0])
    p.add_argument("db", help="a runs.db (from protoclr sweep or pretrain)")
    p.add_argument("--out", required=True, help="folder for report.md, report.html and the PNG plots")
    p.add_argument("--title", default="protoclr results")
    p.add_argument("--note", default="", help="a paragraph placed under the title (e.g. 'partial: ...')")
    p.add_argument("--paper", action="store_true", default=None,
                   help="the paper's claims and study sections even when no run belongs to a study")
    args = p.parse_args(argv)
    md = write_report(args.db, args.out, title=args.title, note=args.note, paper=args.paper)
    print(f"wrote {md} and {md.with_name('report.html')}")
    return 0


__all__ = ["PAPER", "Doc", "Group", "build_report", "cli_main", "fmt", "load_groups", "mean_std", "spearman",
           "write_report"]
