"""``protoclr evaluate RUN_DIR_OR_CHECKPOINT``: kNN and linear-probe accuracy of a run's frozen backbone features.

    protoclr evaluate runs/simclr-0 --knn --linear cached
    protoclr evaluate runs/simclr-0/checkpoint.pt --dataset cifar10_zip --train-subset 10000

The protocol of protoclr.measure (weighted kNN with its k and T, the cached or augmented linear probe, the
evaluation crop) on the full splits: fitted on every training image (or ``--train-subset`` N of them, the fixed
draw ``splits.EVAL_FIT``), scored on every test image. Those are not final_metrics' draws, so the numbers go to
runs.db under the full protocol's keys (``measure.command_metrics``: ``eval_knn_top1_full``, ...), and in full to
``eval.json`` in the run folder. Accuracies are fractions in [0, 1]; the table prints percentages.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import torch

from protoclr import atomic, splits
from protoclr import measure as M
from protoclr.commands import command_console, open_run, run_parser
from protoclr.data import same_images
from protoclr.errors import UserError
from protoclr.evaluate import feature_cache_path
from protoclr.runs import record_final_metrics
from protoclr.splits import class_groups
from protoclr.views import config_view_spec


def _parser() -> Any:
    p = run_parser(
        "protoclr evaluate",
        "kNN and linear-probe accuracy of a pretrained encoder's frozen backbone features. Writes "
        "eval.json in the run folder and records the numbers in the run's row of runs.db.",
    )
    p.add_argument("--knn", action="store_true", help="weighted kNN (the default when nothing is chosen)")
    p.add_argument(
        "--linear",
        choices=("cached", "augmented"),
        help="cached: features once, preconditioned L-BFGS along the decay path, weight decay picked on 10%% of "
        "train (tens of seconds on CPU for 60,000 rows); "
        "augmented: crop + flip every epoch, SGD cosine (the standard protocol; needs many encoder passes)",
    )
    p.add_argument("--k", type=int, default=M.KNN_K, help="kNN neighbours (InstDisc: 200; DINO on ImageNet: 20)")
    p.add_argument("--temperature", type=float, default=M.KNN_TEMPERATURE, help="kNN weight exp(sim / T)")
    p.add_argument("--epochs", type=int, default=100, help="augmented linear probe epochs")
    p.add_argument("--lr", type=float, default=0.1, help="augmented linear probe lr per 256 images")
    p.add_argument("--train-subset", type=int, default=0, help="use N training images (seeded); 0 = all")
    p.add_argument("--no-cache", action="store_true", help="recompute features instead of using features/ cache")
    return p


def cli_main(argv: list[str]) -> int:
    """``protoclr evaluate``: see ``--help``."""
    from rich.table import Table

    args = _parser().parse_args(argv)
    if args.k <= 0 or args.temperature <= 0 or args.batch_size <= 0 or args.epochs <= 0:
        raise UserError("--k, --temperature, --batch-size and --epochs must be positive")
    do_knn = args.knn or not args.linear
    run = open_run(args)
    d, name = run.cfg.data, run.dataset
    what = run.root if name == "image_folder" and run.root else name
    if same_images(name, root=run.root, split_a=d.train_split, split_b=d.test_split):
        raise UserError(f"{what} has no {d.test_split} split apart from the training images (no {d.test_split}/ or "
                        f"{d.test_split}.zip beside {d.train_split}/), so accuracy would be scored on the training "
                        f"images; add a held-out {d.test_split}/ folder, or pass --dataset / --root of a labeled set")
    full_train = run.load(d.train_split)
    test = run.load(d.test_split)
    if len(test.classes) < 2:
        raise UserError(f"{what} has one class ({', '.join(test.classes)}): kNN and linear accuracy would be 100% "
                        "whatever the encoder; evaluate on a labeled set with --dataset / --root")
    train = splits.draw(full_train, args.train_subset, seed=splits.EVAL_FIT)
    spec = config_view_spec(d)
    num_classes = len(test.classes)

    def features(data: Any, split: str) -> Any:
        cache = None
        if not args.no_cache:
            key = f"{name}:{split}:{len(data)}:{args.train_subset if split == d.train_split else 0}"
            cache = feature_cache_path(run.run_dir / "features", run.checkpoint, split=key, feature="backbone")
        return M.backbone_features(run.encoder.backbone, data, spec, batch_size=args.batch_size, device=args.device,
                                   cache=cache, progress=True)

    counts = torch.bincount(torch.as_tensor(train.labels).long(), minlength=num_classes)
    # Per-group accuracy only for long-tailed training sets: a random subset of a balanced set is uneven by
    # sampling noise alone, which is not what many / medium / few means.
    groups = class_groups(counts) if int(counts.max()) >= 2 * max(int(counts.min()), 1) else None
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    if do_knn or args.linear == "cached":
        f_tr, y_tr = features(train, d.train_split)
        f_te, y_te = features(test, d.test_split)
    if do_knn:
        results["knn"] = M.knn_scores(f_tr, y_tr, f_te, y_te, num_classes=num_classes, k=args.k,
                                      temperature=args.temperature, groups=groups, progress=True)
    if args.linear == "cached":
        results["linear_cached"] = M.cached_probe_scores(f_tr, y_tr, f_te, y_te, num_classes=num_classes,
                                                         groups=groups, progress=True)
        results["linear_cached"]["val_top1"] = {f"{k:g}": v for k, v in results["linear_cached"]["val_top1"].items()}
    elif args.linear == "augmented":
        results["linear_augmented"] = M.augmented_probe_scores(
            run.encoder.backbone, train, test, spec, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
            device=args.device, groups=groups, progress=True)
    record = {
        "checkpoint": str(run.checkpoint),
        "dataset": name,
        "train_images": len(train),
        "test_images": len(test),
        "seconds": round(time.perf_counter() - t0, 1),
        **results,
    }
    out_path = run.run_dir / "eval.json"
    previous = json.loads(out_path.read_text()) if out_path.is_file() else {}
    atomic.write_json(out_path, {**previous, **record})

    flat = M.command_metrics(results, fit_images=0 if train is full_train else len(train), k=args.k,
                             temperature=args.temperature, dataset=None if run.own_dataset else name)
    where = record_final_metrics(run.run_dir, flat)

    title = f"protoclr evaluate: {run.run_dir.name} on {name} ({len(train)} train / {len(test)} test)"
    table = Table()  # the title on a line of its own: a table this narrow would wrap it
    for col in ("method", "top-1", "top-5", *(groups or {})):
        table.add_column(col, justify="right")
    for method, res in results.items():
        top5 = f"{100 * res['top5']:.2f}%" if len(test.classes) > 5 else "-"  # 5 or fewer classes: always 100%
        cells = [f"{100 * res['top1']:.2f}%", top5]
        cells += [f"{100 * res['groups'][g]:.2f}%" if math.isfinite(res["groups"][g]) else "-" for g in groups or {}]
        table.add_row(method, *cells)
    console = command_console()
    console.print(title)
    console.print(table)
    console.print(f"wrote {out_path}; {where}")
    return 0


__all__ = ["cli_main"]
