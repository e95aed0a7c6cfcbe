"""``protoclr diagnose RUN_DIR_OR_CHECKPOINT``: every theory diagnostic of a run, as tables, JSON and plots.

    protoclr diagnose runs/NAME                     # probe: 1000 class-balanced test images, 8 views each
    protoclr diagnose runs/NAME --alphas 1,2,4 --nus 1,0.5

Prints the prototype representation bias (every head and variant), the bound terms and gaps per
``alpha``/``nu`` beside the assumptions each bound needs, and the geometry; writes ``diagnostics.json`` in the
run folder, records the headline numbers in the run's row of ``runs.db``, and plots the tracked ``diag_*``
metrics over epochs and the bias per class. The maths live in :mod:`protoclr.diagnostics`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from protoclr import measure as M
from protoclr.atomic import write_json
from protoclr.commands import command_console, open_run, run_parser
from protoclr.diagnostics import diagnose_features, view_features
from protoclr.losses import config_alpha
from protoclr.measure import headline
from protoclr.runs import ResultsDB, RunDir, record_final_metrics
from protoclr.splits import HELD_OUT, balanced_draw
from protoclr.views import config_view_spec


def history(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every ``diag_*`` scalar logged per epoch for a run: ``{key: [(epoch, value), ...]}`` sorted by epoch.

    Reads the ``"kind": "epoch"`` records of ``run_dir/metrics.jsonl`` (what the training loop logs) and the
    run's epoch rows in ``run_dir/../runs.db`` (where ``protoclr sweep`` adds them); a later record of the
    same epoch wins. Empty when nothing was tracked.
    """
    run = RunDir(run_dir)
    by_epoch: dict[int, dict[str, Any]] = {}
    for rec in run.epochs():
        by_epoch.setdefault(int(rec["epoch"]), {}).update(rec)
    db_rows = ResultsDB(run.db).epochs(run.name) if run.db.is_file() else []
    for row in db_rows:
        if "epoch" in row:
            by_epoch.setdefault(int(row["epoch"]), {}).update(row)
    out: dict[str, list[tuple[int, float]]] = {}
    for epoch in sorted(by_epoch):
        for key, value in by_epoch[epoch].items():
            if M.is_diagnostic(key) and isinstance(value, int | float) and not isinstance(value, bool):
                out.setdefault(key, []).append((epoch, float(value)))
    return out


# Panels of the over-epochs plot: (title, [(key prefix, label)]); a key prefix matches every
# `prefix/alpha.._nu..` variant too.
_HISTORY_PANELS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("attraction terms", ((M.ATTRACTION_SUP, "supervised -s(z, mu_y)"),
                          (M.ATTRACTION_SURROGATE, "surrogate -s(z, mu~_x)"),
                          (M.ATTRACTION_SSL, "self-supervised -E s(z, f)"))),
    ("repulsion terms", ((M.REPULSION_SUP, "supervised max s(z, mu_y')"),
                         (M.REPULSION_SSL, "self-supervised bound"))),
    ("gaps (bound holds: >= 0)", ((M.ATTRACTION_GAP, "attraction gap"),
                                  (M.REPULSION_GAP + "/", "repulsion gap"),
                                  (M.REPULSION_GAP, "repulsion gap"))),
    ("prototype bias (angle, degrees)", ((M.BIAS, "backbone"), (M.BIAS_PROJ, "projector"),
                                         (M.BIAS_DEBIASED, "backbone, debiased"),
                                         (M.BIAS_PROJ_DEBIASED, "projector, debiased"))),
)  # fmt: skip


def plot_history(hist: dict[str, list[tuple[int, float]]], path: str | Path, *, title: str = "") -> bool:
    """Bound terms, gaps and bias over epochs as a PNG at ``path``; False (and no file) when ``hist`` has
    none of them. ``hist``: :func:`history`."""
    panels = []
    for name, series in _HISTORY_PANELS:
        lines = []
        for prefix, label in series:
            if prefix.endswith("/"):
                for key in sorted(k for k in hist if k.startswith(prefix)):
                    lines.append((key, f"{label} ({key.removeprefix(prefix).replace('_', ', ')})"))
            elif prefix in hist and not any(k.startswith(prefix + "/") for k in hist):
                lines.append((prefix, label))
        if lines:
            panels.append((name, lines))
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (name, lines) in zip(axes[0], panels, strict=True):
        for key, label in lines:
            xs, ys = zip(*hist[key], strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
        if name.startswith("gaps"):
            ax.axhline(0.0, color="black", linewidth=0.8, linestyle="--")
        if name.startswith("repulsion") and M.BOUND_ALPHA in hist and M.BOUND_NU in hist:
            name += f" (alpha={hist[M.BOUND_ALPHA][-1][1]:g}, nu={hist[M.BOUND_NU][-1][1]:g})"
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_bias_per_class(bias: dict[str, Any], classes: list[str], path: str | Path, *, title: str = "") -> None:
    """Bars of the prototype bias per class (angle of backbone and projector, normalised; Euclidean of raw
    backbone features) as a PNG at ``path``. ``bias``: :func:`bias_report` output (per-class lists)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    x = torch.arange(n).tolist()
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 0.75 * n + 4), 4.0))
    w = 0.4
    for j, head in enumerate(("backbone", "projector")):
        vals = bias[head]["normalized"]["per_class"]["angle_deg"]
        axes[0].bar(
            [i + (j - 0.5) * w for i in x],
            vals,
            width=w,
            label=f"{head} (mean {bias[head]['normalized']['angle_deg']:.1f})",
        )
    axes[0].set_ylabel("angle(mu~_x, mu_y), degrees")
    axes[0].set_title("bias per class, normalised features", fontsize=10)
    raw = bias["backbone"]["raw"]["per_class"]["euclidean"]
    axes[1].bar(
        x, raw, width=0.6, color="tab:gray", label=f"backbone (mean {bias['backbone']['raw']['euclidean']:.3g})"
    )
    axes[1].set_ylabel("||mu~_x - mu_y||")
    axes[1].set_title("bias per class, raw backbone features", fontsize=10)
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------
# CLI: protoclr diagnose RUN_DIR_OR_CHECKPOINT


def _floats(text: str) -> tuple[float, ...]:
    vals = tuple(float(v) for v in text.split(",") if v.strip())
    if not vals or any(not v > 0 for v in vals):
        raise ValueError(f"expected comma-separated positive numbers, got {text!r}")
    return vals


def _parser() -> Any:
    p = run_parser(
        "protoclr diagnose",
        "Prototype representation bias, the bound terms with their assumptions, and feature geometry "
        "of a pretrained encoder on a class-balanced probe set of the held-out split. Prints tables, writes "
        "diagnostics.json and PNG plots in the run folder and records headline numbers in runs.db.",
    )
    p.add_argument("--split", help="labeled split to probe (default: the run's test split)")
    p.add_argument("--probe-images", type=int, default=1000, help="class-balanced probe images (seeded)")
    p.add_argument("--views", type=int, default=8, help="K augmentations per image (mu~_x is their mean)")
    p.add_argument("--alphas", help="inverse temperatures of the repulsion bound (default: 1, the run's, 10)")
    p.add_argument("--nus", default="1,0.5", help="nu values; the bound needs nu <= the smallest prototype norm")
    p.add_argument("--seed", type=int, help="view seed (default: the run's train.seed)")
    return p


def _print_report(console: Any, report: dict[str, Any], *, title: str) -> None:
    from rich.table import Table

    t = Table(title=f"{title}: prototype representation bias (mean over probe images)")
    for col in ("head", "features", "euclidean", "cosine distance", "angle (deg)"):
        t.add_column(col, justify="right")
    for head, variants in report["bias"].items():
        for variant, b in variants.items():
            t.add_row(head, variant, f"{b['euclidean']:.4g}", f"{b['cosine']:.4f}", f"{b['angle_deg']:.2f}")
    console.print(t)

    b = report["bounds"]
    a = b["attraction"]
    t = Table(title="bound terms on L2-normalised projector outputs (gap >= 0 where the bound holds)")
    for col in ("bound", "alpha", "nu", "supervised", "surrogate", "self-sup.", "gap", "gap min", "holds"):
        t.add_column(col, justify="right")
    t.add_row("attraction", "-", "-", f"{a['supervised']:.4f}", f"{a['surrogate']:.4f}", f"{a['self_supervised']:.4f}",
              f"{a['gap']:.4f}", f"{a['gap_min']:.4f}", f"{100 * a['holds_fraction']:.1f}%")  # fmt: skip
    for key, r in b["repulsion"].items():
        alpha, nu = (v.split("=")[1] for v in key.split(","))
        t.add_row("repulsion", alpha, nu, f"{r['supervised']:.4f}", "-", f"{r['self_supervised']:.4f}",
                  f"{r['gap']:.4f}", f"{r['gap_min']:.4f}", f"{100 * r['holds_fraction']:.1f}%")  # fmt: skip
    console.print(t)

    asm = b["assumptions"]
    t = Table(title="assumptions")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_column("needed")
    t.add_row("max | ||f|| - 1 |", f"{asm['max_norm_deviation']:.2g}", "0 (unit-norm features)")
    t.add_row("anchors with E_t' s(z, f) >= 0", f"{100 * asm['positive_nonneg_fraction']:.1f}%", "100% (attraction)")
    t.add_row("balance n * min_y p_y", f"{asm['balance_ratio']:.3f}", ">= 1 (repulsion)")
    t.add_row("prototype norm min / mean / max",
              f"{asm['prototype_norm_min']:.3f} / {asm['prototype_norm_mean']:.3f} / {asm['prototype_norm_max']:.3f}",
              ">= nu (repulsion)")  # fmt: skip
    t.add_row("anchors with max s(z, mu_y') >= 0", f"{100 * asm['nearest_similarity_nonneg_fraction']:.1f}%",
              "100% (repulsion, nu < ||mu_y||)")  # fmt: skip
    console.print(t)
    if b["violations"]:
        console.print("[bold]violated assumptions[/bold] (the matching gaps are not guaranteed >= 0):")
        for v in b["violations"]:
            console.print(f"  - {v}")
    else:
        console.print("every assumption holds: each gap above is guaranteed >= 0")

    t = Table(title="geometry of L2-normalised projector outputs")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    for key, value in report["geometry"].items():
        t.add_row(key, f"{value:.4f}")
    console.print(t)


def cli_main(argv: list[str]) -> int:
    """``protoclr diagnose``: see ``--help``."""
    p = _parser()
    args = p.parse_args(argv)
    try:
        nus = _floats(args.nus)
        alphas_arg = _floats(args.alphas) if args.alphas else None
    except ValueError as e:
        p.error(f"--alphas / --nus: {e}")
    if args.views < 2 or args.probe_images < 2 or args.batch_size < 1:
        p.error("--views and --probe-images must be >= 2, --batch-size >= 1.")
    t0 = time.perf_counter()
    run = open_run(args)
    encoder, cfg, run_dir, name = run.encoder, run.cfg, run.run_dir, run.dataset
    split = args.split or cfg.data.test_split
    data = run.load(split)
    probe = balanced_draw(data, min(args.probe_images, len(data)), seed=HELD_OUT)
    labels = torch.as_tensor(probe.labels).long()
    num_classes = len(probe.classes)
    run_alpha = config_alpha(cfg.loss)
    alphas = alphas_arg or tuple(sorted({1.0, run_alpha, 10.0}))
    seed = cfg.train.seed if args.seed is None else args.seed
    spec = config_view_spec(cfg.data)
    feats = view_features(encoder, probe, views=args.views, recipe=spec, seed=seed, batch_size=args.batch_size,
                          device=args.device)  # fmt: skip
    report = diagnose_features(feats, labels, num_classes=num_classes, alphas=alphas, nus=nus)
    head_alpha = run_alpha if run_alpha in alphas else alphas[0]
    scalars = headline(report, alpha=head_alpha, nu="min")  # as the loop records it

    console = command_console()
    title = f"protoclr diagnose: {run_dir.name} on {name}/{split} ({len(probe)} images x {args.views} views)"
    _print_report(console, report, title=title)
    plots = {}
    hist = history(run_dir)
    over_epochs = run_dir / "diagnostics_over_epochs.png"
    if plot_history(hist, over_epochs, title=f"{run_dir.name}: tracked during training"):
        plots["over_epochs"] = over_epochs.name
        console.print(f"over-epochs plot of {len(hist)} tracked keys: {over_epochs}")
    else:
        over_epochs.unlink(missing_ok=True)  # a stale plot from an earlier call would contradict this one
        console.print(f"no bound or bias terms were tracked during training ({RunDir(run_dir).metrics_file} and "
                      "runs.db hold no diag_* epoch metrics: train with eval.diagnostics=true to track them), "
                      "so there is no over-epochs plot")  # fmt: skip
    per_class = run_dir / "diagnostics_bias_per_class.png"
    what = f"prototype bias on {name}/{split}, {len(probe)} images x {args.views} views"
    plot_bias_per_class(report["bias"], list(probe.classes), per_class, title=f"{run_dir.name}: {what}")
    plots["bias_per_class"] = per_class.name
    record = {
        "checkpoint": str(run.checkpoint),
        "dataset": name,
        "split": split,
        "probe_images": len(probe),
        "views": args.views,
        "seed": seed,
        "alphas": list(alphas),
        "nus": list(nus),
        "classes": list(probe.classes),
        "headline": scalars,
        **report,
        "plots": plots,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out_path = run_dir / "diagnostics.json"
    write_json(out_path, record)
    # diagnose's own probe set and views: keys of their own, never the monitor's (the sweep's final diag_* keys)
    flat = {M.on_probe(k, images=len(probe), views=args.views): v for k, v in scalars.items()}
    flat = flat if run.own_dataset else {M.on_dataset(k, name): v for k, v in flat.items()}
    where = record_final_metrics(run_dir, flat)
    console.print(f"wrote {out_path} and {', '.join(plots.values())}; {where}")
    return 0
