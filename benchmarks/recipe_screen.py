"""Screen recipe levers by accuracy at a step budget: many configs, several processes, one machine.

    python benchmarks/recipe_screen.py plan.json --out screen/ --workers 6
    python benchmarks/recipe_screen.py plan.json --out screen/ --workers 1 --limit 1      # a quick local check
    python benchmarks/recipe_screen.py plan.json --out screen/ --set data.root=/data/cifar10-jpeg  # another copy

``plan.json``: ``{"base": [overrides...], "runs": [{"name": ..., "overrides": [...], "steps": N}, ...]}``. Each
run is ``protoclr.train.pretrain`` with ``train.steps=N`` (its whole schedule), then the full protocol of
``protoclr.measure`` (kNN k=200 and the cached linear probe on every training image, scored on the held-out
split). Workers take runs in plan order from a shared counter, so the first runs of the plan finish first; each
result is appended to ``<out>/results.jsonl`` as soon as it exists, so a screen cut short keeps what it did.

Accuracy after N steps does not depend on the device (same code, same seeds, up to float rounding), while the
steps a wall-clock budget buys do: the CPU recipe study (docs/results/cpu/recipe.md) measures each lever's CPU
throughput with benchmarks/time_to_accuracy.py's calibration, converts the budget to steps, and may run the
accuracy side here on an accelerator; the winners are then re-run on the CPU in wall-clock time.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

QUIET = ["eval.every=0", "trainer.progress=false", "trainer.loggers=[]", "train.checkpoint_every=0"]


def _next(counter: Path, total: int) -> int | None:
    """Claim the next run index (a counter file under an exclusive lock); None when all are taken."""
    with open(counter, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        i = int(f.read() or 0)
        if i >= total:
            return None
        f.seek(0)
        f.truncate()
        f.write(str(i + 1))
        return i


def worker(plan_path: Path, out: Path, k: int, limit: int, extra_base: list[str]) -> None:
    import torch

    from protoclr.config import load_config
    from protoclr.measure import backbone_features, score_features
    from protoclr.runs import load_run
    from protoclr.splits import load_data
    from protoclr.train import pretrain
    from protoclr.views import config_view_spec

    plan = json.loads(plan_path.read_text())
    plan["base"] = [*plan["base"], *extra_base]
    runs = plan["runs"][:limit] if limit else plan["runs"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    extra = ["trainer.accelerator=cuda", "trainer.devices=1"] if device == "cuda" else []
    data = None
    while (i := _next(out / ".counter", len(runs))) is not None:
        r = runs[i]
        rec: dict = {"name": r["name"], "steps": r["steps"], "overrides": r["overrides"], "device": device}
        t0 = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = load_config(None, [*plan["base"], *r["overrides"], *QUIET, *extra, f"train.out_dir={tmp}",
                                         f"train.run_name={r['name']}", f"train.steps={r['steps']}"])
                run = pretrain(cfg)
                rec["train_seconds"] = time.perf_counter() - t0
                encoder, cfg = load_run(run)
                if data is None or data[0] != cfg.data.dataset:  # every run of a plan shares its dataset
                    full = load_config(None, [*plan["base"], "data.train_subset=0"])
                    data = (cfg.data.dataset, *load_data(full))
                _, train, test, _ = data
                spec = config_view_spec(cfg.data)  # the run's own evaluation crop and normalisation
                encoder.to(device)
                f_tr, y_tr = backbone_features(encoder.backbone, train, spec, device=device)
                f_te, y_te = backbone_features(encoder.backbone, test, spec, device=device)
                rec.update(score_features(f_tr.to(device), y_tr.to(device), f_te.to(device), y_te.to(device),
                                          num_classes=len(test.classes)))
        except Exception as e:  # a failed run is a result too (e.g. diverged); the screen goes on
            rec["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        rec["seconds"] = time.perf_counter() - t0
        with open(out / "results.jsonl", "a") as f:  # one line per run, appended under a lock
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(json.dumps({"worker": k, **rec}) + "\n")
        print(json.dumps(rec), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plan")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0 = cores / workers)")
    p.add_argument("--limit", type=int, default=0, help="only the first N runs of the plan")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override added to the plan's base for every run (repeatable), e.g. data.root=...")
    p.add_argument("--worker", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    if args.worker >= 0:
        worker(Path(args.plan), out, args.worker, args.limit, args.set)
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / ".counter").unlink(missing_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen([sys.executable, __file__, args.plan, "--out", str(out), "--worker", str(k),
                               "--limit", str(args.limit),
                               *[f"--set={o}" for o in args.set]], env=env) for k in range(args.workers)]
    for proc in procs:
        proc.wait()


if __name__ == "__main__":
    main()
