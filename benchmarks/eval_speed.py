"""Evaluation cost on CPU, stage by stage, against scikit-learn and the training loop, in one run.

    .venv/bin/python benchmarks/eval_speed.py                                        # 10,000 / 2,000 images, minutes
    .venv/bin/python benchmarks/eval_speed.py --train-images 0 --test-images 0       # the full 60,000 / 10,000
    .venv/bin/python benchmarks/eval_speed.py --checkpoint runs/demo --train-images 0 --test-images 0

The encoder is the demo's (protoclr.demo.RECIPE: Fashion-MNIST, convnet with a 2x2 pooled grid, F = 1024) at
its seeded initialisation, or a pretrained run's with ``--checkpoint``. Stages, each timed once in this process:
  train     a few steps of the bare encoder's forward + backward on a batch of two views (train_speed.ceiling,
            the loop's ceiling; the loop runs at >= 0.9 of it), images per second.
  extract   protoclr.measure-style backbone features: ``extract_features`` as it runs now (precision auto, channels
            last input and weights, batch 512) against float32 / contiguous / batch 256 (how it ran before the
            issue) and against channels-last input through NCHW weights at batch 1024 (the revision before this
            one: the module passed behind a lambda, so its weights stay as stored).
  knn       weighted kNN (k=200, T=0.1) on the features; top-1 against a float64 run on the same features, and on
            the float32-extracted features (what bf16 extraction changes).
  probe     ``linear_probe_cached`` (decay search included) against one scikit-learn ``LogisticRegression(lbfgs)``
            fit at the decay it chose, on the same standardized features (default tol 1e-4, max_iter 1000), and
            against the previous probe (5 plain L-BFGS fits + refit, each to 300 iterations or |grad| <= 1e-6),
            kept here as :func:`old_linear_probe_cached` (``--skip-old`` to leave it out).
Targets (issue "Answers in minutes"): probe / one sklearn fit <= 0.5; top-1 within 0.3 points of sklearn and within
0.2 of the old probe; extraction at least as fast per image as training's forward + backward of two views; with
``--study``, measurements <= 15% of a study run's wall time. The demo's evaluation against its pretraining (<= 0.5)
is the last line ``protoclr demo`` prints.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import ceiling

from protoclr import splits
from protoclr.config import load_config
from protoclr.demo import RECIPE
from protoclr.evaluate import extract_features, knn_accuracy, linear_probe_cached, topk_accuracy
from protoclr.models import build_encoder
from protoclr.precision import resolve_precision
from protoclr.runs import load_run
from protoclr.views import eval_images, train_views


def _old_fit(x, y, *, num_classes, weight_decay, max_iter=300):
    """The probe's fit before the issue: autograd, no preconditioner, tolerance 1e-6 (float32), from zero."""
    weight = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-8)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach()


def old_linear_probe_cached(f_tr, y_tr, f_te, y_te, *, num_classes, weight_decays=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2)):
    """The previous ``linear_probe_cached``: the same split (seed 0), standardization and choice rule; six fits."""
    mean, std = f_tr.mean(0), f_tr.std(0).clamp_min(1e-6)
    x, xt = (f_tr - mean) / std, (f_te - mean) / std
    n_val = round(0.1 * len(x))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    val, fit = perm[:n_val], perm[n_val:]
    val_top1 = {}
    for wd in weight_decays:
        w, b = _old_fit(x[fit], y_tr[fit], num_classes=num_classes, weight_decay=wd)
        val_top1[wd] = topk_accuracy(x[val] @ w.T + b, y_tr[val], ks=(1,))["top1"]
    best = max(weight_decays, key=lambda wd: (val_top1[wd], wd))
    w, b = _old_fit(x, y_tr, num_classes=num_classes, weight_decay=best)
    return {**topk_accuracy(xt @ w.T + b, y_te), "weight_decay": best}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def measurement_share(out: Path) -> list[tuple[str, float, float]]:
    """``(run id, wall seconds, training seconds)`` of every finished run of a sweep folder ``out`` (its runs.db
    and run folders): wall is the run's row from creation to its last update (final probes included); training is
    the sum over step records of steps x batch / the images per second logged for them. The rest is measurement
    (step-0, per-epoch and final) and start-up."""
    import json
    import sqlite3

    con = sqlite3.connect(f"file:{out / 'runs.db'}?mode=ro", uri=True)
    rows = []
    for rid, status, created, updated, config in con.execute(
            "SELECT run_id, status, created, updated, config FROM runs ORDER BY created"):
        log = out / rid / "metrics.jsonl"
        if status != "finished" or not log.is_file():
            continue
        batch, prev, train = json.loads(config)["train"]["batch_size"], 0, 0.0
        for line in log.read_text().splitlines():
            r = json.loads(line)
            if r["kind"] == "step" and r.get("img_per_s"):
                train += (r["step"] - prev) * batch / r["img_per_s"]
                prev = r["step"]
        rows.append((rid, updated - created, train))
    con.close()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-images", type=int, default=10_000, help="0 = all 60,000")
    p.add_argument("--test-images", type=int, default=2_000, help="0 = all 10,000")
    p.add_argument("--checkpoint", help="a run folder or checkpoint (default: the demo encoder, seeded init)")
    p.add_argument("--root", help="Fashion-MNIST location (default: the system copy or ./data)")
    p.add_argument("--train-steps", type=int, default=6, help="timed forward + backward steps (after 2 warm-up)")
    p.add_argument("--skip-old", action="store_true", help="leave out the previous probe (six slow fits)")
    p.add_argument("--skip-sklearn", action="store_true")
    p.add_argument("--study", metavar="OUT", help="also: the share of each finished run's wall time spent outside "
                   "training steps, for a sweep folder (e.g. runs/study of docs/results/cpu/run_plan.sh)")
    args = p.parse_args()
    if args.study:
        rows = measurement_share(Path(args.study))
        for rid, wall, train in rows:
            print(f"  study  {rid}: {wall:.0f} s, training {train:.0f} s, measurement and start-up "
                  f"{100 * (wall - train) / wall:.1f}%")
        if rows:
            wall, train = sum(r[1] for r in rows), sum(r[2] for r in rows)
            print(f"    all {len(rows)} runs: measurement and start-up {100 * (wall - train) / wall:.1f}% of their "
                  "wall time (target <= 15%)")
    overrides = [*RECIPE, *([f"data.root={args.root}"] if args.root else [])]
    cfg = load_config(None, overrides)
    train, test, spec = splits.load_data(cfg)
    train = splits.draw(train, args.train_images, seed=0)
    test = splits.draw(test, args.test_images, seed=0)
    if args.checkpoint:
        encoder, _ = load_run(args.checkpoint)
    else:
        torch.manual_seed(cfg.train.seed)
        encoder = build_encoder(cfg.model, in_channels=spec.channels)
    backbone = encoder.backbone.eval()
    C = len(test.classes)
    print(f"{len(train)} train / {len(test)} test Fashion-MNIST images, {cfg.model.backbone} "
          f"({'pretrained: ' + args.checkpoint if args.checkpoint else 'seeded init'}), {torch.get_num_threads()} "
          f"threads, precision auto = {resolve_precision('auto', 'cpu')}")

    # train: the loop's ceiling (bf16 autocast and channels_last as the config resolves them), images per second
    train_rate = ceiling(cfg, train_views(cfg.data), steps=args.train_steps, warmup=2)
    print(f"  train  forward + backward, batch {cfg.train.batch_size} x 2 views : {train_rate:8.0f} img/s")

    def extract(data, **kw):
        return extract_features(backbone, data, preprocess=lambda x: eval_images(x, spec), **kw)

    old_kw = {"precision": "32-true", "channels_last": False, "batch_size": 256}
    extract(train.subset(torch.arange(min(512, len(train)))))  # warm-up: first-call kernel selection
    (f_tr, y_tr), t_new = timed(lambda: extract(train))
    f_te, y_te = extract(test)
    (f32_tr, _), t_old = timed(lambda: extract(train, **old_kw))
    f32_te, _ = extract(test, **old_kw)
    _, t_nchw = timed(lambda: extract_features(lambda x: backbone(x), train, batch_size=1024,
                                               preprocess=lambda x: eval_images(x, spec)))
    new_rate, old_rate, nchw_rate = len(train) / t_new, len(train) / t_old, len(train) / t_nchw
    print(f"  extract now (auto, channels-last weights, 512)    : {new_rate:8.0f} img/s  ({t_new:.1f} s)")
    print(f"  extract before (float32, contiguous, batch 256)   : {old_rate:8.0f} img/s  ({t_old:.1f} s)")
    print(f"  extract NCHW weights (auto, batch 1024)           : {nchw_rate:8.0f} img/s  ({t_nchw:.1f} s)")
    print(f"    now / before {new_rate / old_rate:.2f}; now / NCHW weights {new_rate / nchw_rate:.2f}; now / training "
          f"{new_rate / train_rate:.2f}; before / training {old_rate / train_rate:.2f}")

    knn = {"k": min(200, len(f_tr)), "temperature": 0.1, "num_classes": C}
    acc, t_knn = timed(lambda: knn_accuracy(f_tr, y_tr, f_te, y_te, **knn)["top1"])
    acc64 = knn_accuracy(f_tr.double(), y_tr, f_te.double(), y_te, **knn)["top1"]
    acc32 = knn_accuracy(f32_tr, y_tr, f32_te, y_te, **knn)["top1"]
    print(f"  knn    {len(f_te)} x {len(f_tr)}, F={f_tr.shape[1]}: {t_knn:.1f} s ({len(f_te) / t_knn:.0f} queries/s), "
          f"top-1 {100 * acc:.2f}%; float64 on the same features {100 * (acc - acc64):+.2f} points; "
          f"features extracted in float32 {100 * (acc32 - acc):+.2f} points")

    probe, t_probe = timed(lambda: linear_probe_cached(f_tr, y_tr, f_te, y_te, num_classes=C))
    wd = probe["weight_decay"]
    print(f"  probe  linear_probe_cached: {t_probe:.1f} s, top-1 {100 * probe['top1']:.2f}%, decay {wd:g}, "
          f"val top-1 {', '.join(f'{k:g}: {100 * v:.1f}' for k, v in probe['val_top1'].items())}")
    if not args.skip_sklearn:
        from sklearn.linear_model import LogisticRegression

        mean, std = f_tr.mean(0), f_tr.std(0).clamp_min(1e-6)
        x, xt = ((f_tr - mean) / std).numpy(), ((f_te - mean) / std).numpy()
        clf, t_sk = timed(lambda: LogisticRegression(C=1 / (wd * len(x)), max_iter=1000).fit(x, y_tr.numpy()))
        sk_top1 = float((clf.predict(xt) == y_te.numpy()).mean())
        print(f"  probe  sklearn LogisticRegression(lbfgs) at {wd:g}: {t_sk:.1f} s ({int(clf.n_iter_[0])} iterations), "
              f"top-1 {100 * sk_top1:.2f}%")
        print(f"    probe / one sklearn fit {t_probe / t_sk:.3f} (target <= 0.5); top-1 ours - sklearn "
              f"{100 * (probe['top1'] - sk_top1):+.2f} points (target within 0.3)")
    if not args.skip_old:
        old, t_oldp = timed(lambda: old_linear_probe_cached(f_tr, y_tr, f_te, y_te, num_classes=C))
        print(f"  probe  previous probe: {t_oldp:.1f} s, top-1 {100 * old['top1']:.2f}%, decay {old['weight_decay']:g}")
        print(f"    probe / previous {t_probe / t_oldp:.3f}; top-1 ours - previous "
              f"{100 * (probe['top1'] - old['top1']):+.2f} points (target within 0.2)")


if __name__ == "__main__":
    main()
