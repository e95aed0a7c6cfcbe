"""Time to accuracy: what a config reaches on the CIFAR-10 copy within a wall-clock (or step) budget.

    python benchmarks/time_to_accuracy.py --config configs/cpu_cifar10.yaml --minutes 15
    python benchmarks/time_to_accuracy.py --minutes 15 trainer.precision=32-true     # one lever changed
    python benchmarks/time_to_accuracy.py --steps 500 --points 1 --no-floors --json out.json

Protocol (protoclr.measure, the same as `protoclr demo`): all 50,000 training images as the kNN bank and the
linear probe's training set, all 10,000 test images scored; weighted kNN k=200 T=0.1 and the cached linear
probe, on backbone features. Beside the curve: the same protocol on raw centered pixels and on the run's encoder
at step 0 (random init, same seed).

``--minutes M``: the loop's throughput is measured on ``--calibrate`` steps first (a throwaway run), then the run
gets ``M * 60 * img_per_s / batch`` steps as its whole schedule (``train.steps``); the pretraining time reported
is the run's own wall clock (evaluation excluded), so it shows how well the budget was met. ``--steps N`` fixes
the schedule instead. Evaluation points: ``--points`` epoch ends spread over the run, always including the last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from protoclr.config import load_config
from protoclr.measure import evaluate_backbone, random_init_floor, raw_pixel_floor
from protoclr.splits import load_data
from protoclr.train import pretrain

# The study's dataset and views unless the config or the overrides say otherwise.
BASE = ["data.dataset=cifar10_zip", "data.views=simclr_cifar"]
QUIET = ["eval.every=0", "trainer.progress=false", "trainer.loggers=[]"]


def calibrate(config: str | None, overrides: list[str], *, steps: int) -> float:
    """Median images/s of the loop over ``steps`` steps (the first 5 dropped), in a throwaway run folder."""
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(config, [*overrides, *QUIET, f"train.out_dir={out}", "train.run_name=calibrate",
                                   "train.log_every=1", "train.checkpoint_every=0", f"train.max_steps={steps}"])
        run = pretrain(cfg)
        rates = [r["img_per_s"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                 if r["kind"] == "step" and r["step"] > 5]
    return statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--config", help="YAML config (default: the CPU default on the CIFAR-10 copy)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="wall-clock budget of pretraining")
    budget.add_argument("--steps", type=int, help="optimizer steps of the schedule")
    p.add_argument("--points", type=int, default=4, help="evaluations along the run (epoch ends, last included)")
    p.add_argument("--calibrate", type=int, default=30, help="steps of the throughput measurement (--minutes)")
    p.add_argument("--no-floors", action="store_true", help="skip the raw-pixel and random-init rows")
    p.add_argument("--no-linear", action="store_true", help="kNN only (the linear probe takes ~1 min per point)")
    p.add_argument("--json", help="also write the rows and the settings to this file")
    p.add_argument("--out", default="", help="keep the run folder here (default: a temporary folder)")
    args = p.parse_args()
    overrides = [*BASE, *args.overrides]
    cfg0 = load_config(args.config, overrides)
    B = cfg0.train.batch_size
    ips = None
    if args.minutes is not None:
        ips = calibrate(args.config, overrides, steps=args.calibrate)
        steps = max(1, int(args.minutes * 60 * ips / B))
    else:
        steps = args.steps
    train, test, spec = load_data(load_config(args.config, [*overrides, "data.train_subset=0"]))
    linear = not args.no_linear
    rows: list[dict] = []
    if not args.no_floors:
        t = time.perf_counter()
        rows.append({"what": "raw pixels (centered)", **raw_pixel_floor(train, test, linear=linear)})
        rows.append({"what": "random-init encoder", "step": 0,
                     **random_init_floor(cfg0, train, test, spec, linear=linear)})
        print(f"floors measured in {time.perf_counter() - t:.0f} s", flush=True)

    steps_per_epoch = len(train) // B
    epochs = -(-steps // steps_per_epoch)
    marks = {epochs - 1 - round(i * epochs / max(args.points, 1)) for i in range(args.points)} - {-1}
    eval_seconds = 0.0
    t_start = time.perf_counter()

    def on_epoch_end(encoder, metrics):
        nonlocal eval_seconds
        if metrics["epoch"] not in marks:
            return {}
        t = time.perf_counter()
        res = evaluate_backbone(encoder.backbone, train, test, spec, linear=linear,
                                device=next(encoder.parameters()).device)  # where training put it (a GPU)
        eval_seconds += time.perf_counter() - t
        minutes = (time.perf_counter() - t_start - eval_seconds) / 60
        rows.append({"what": f"pretrained, epoch {metrics['epoch'] + 1}", "step": metrics["step"],
                     "minutes": minutes, **res})
        print(f"step {metrics['step']}: {minutes:.1f} min of pretraining, " +
              ", ".join(f"{k} {100 * v:.2f}%" for k, v in res.items()), flush=True)
        return {f"eval_{k}": v for k, v in res.items()}

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        cfg = load_config(args.config, [*overrides, *QUIET, f"train.out_dir={out}", "train.run_name=time_to_acc",
                                        f"train.steps={steps}", "train.checkpoint_every=0"])
        t_start = time.perf_counter()
        run = pretrain(cfg, on_epoch_end=on_epoch_end)
        wall = time.perf_counter() - t_start - eval_seconds
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        step_rates = [r["img_per_s"] for r in recs if r["kind"] == "step"]
    m = cfg.model
    print(f"\nconfig: {args.config or 'CPU default'} {' '.join(args.overrides)}")
    print(f"  {m.backbone} {m.convnet_widths if m.backbone == 'convnet' else ''}, batch {B}, "
          f"{cfg.data.num_views} views + {cfg.data.local_views} local, {cfg.loss.name} loss, {cfg.optim.name} "
          f"lr {cfg.lr():.3g}, precision {cfg.trainer.precision}, {torch.get_num_threads()} threads")
    budget = f"{args.minutes} min -> " if args.minutes is not None else ""
    print(f"  budget: {budget}{steps} steps ({steps * B / len(train):.2f} epochs of {len(train)} images)"
          + (f"; calibrated {ips:.0f} img/s" if ips else ""))
    print(f"  pretraining wall clock {wall / 60:.2f} min ({steps * B / wall:.0f} img/s over the whole run, "
          f"median step {statistics.median(step_rates):.0f} img/s); evaluation {eval_seconds / 60:.1f} min")
    print(f"\n| {'representation':<28} | step | min | kNN top-1 | linear top-1 |")
    print("|---|---|---|---|---|")
    for r in rows:
        lin = f"{100 * r['linear_top1']:.2f}%" if "linear_top1" in r else "-"
        mins = f"{r['minutes']:.1f}" if "minutes" in r else "-"
        print(f"| {r['what']:<28} | {r.get('step', '-')} | {mins} | {100 * r['knn_top1']:.2f}% | {lin} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": " ".join(sys.argv), "config": cfg.to_dict(), "steps": steps, "calibrated_img_per_s": ips,
            "pretraining_seconds": wall, "median_step_img_per_s": statistics.median(step_rates),
            "evaluation_seconds": eval_seconds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
