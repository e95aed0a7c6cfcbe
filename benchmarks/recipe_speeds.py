"""Each lever's CPU throughput, and the steps a wall-clock budget buys it: the first half of the recipe study.

    python benchmarks/recipe_speeds.py benchmarks/recipe_plan.json --minutes 15        # rewrites the plan in place
    python benchmarks/recipe_speeds.py benchmarks/recipe_plan.json --minutes 15 --only base,fp32

For every run of the plan (``{"base": [...], "runs": [{"name", "overrides", ...}]}``, the format of
benchmarks/recipe_screen.py) the loop's median images/s is measured on this machine with
benchmarks/time_to_accuracy.py's calibration (a throwaway run of ``--calibrate`` steps, the first 5 dropped),
one lever after the other, and written back as ``img_per_s`` with ``steps = minutes * 60 * img_per_s / batch``.
The accuracy side (recipe_screen.py) then trains each lever for its own steps, on any device: accuracy after N
steps does not depend on where the steps ran, the steps a CPU-minute buys do. Run it on a quiet machine; levers
that change no compute (the lr, alpha, crop scale) share one rate, the median of theirs, with ``--same``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from time_to_accuracy import calibrate


def batch_size(overrides: list[str], default: int = 256) -> int:
    for o in overrides:
        if o.startswith("train.batch_size="):
            return int(o.split("=", 1)[1])
    return default


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plan")
    p.add_argument("--minutes", type=float, required=True, help="the wall-clock budget the steps are sized to")
    p.add_argument("--calibrate", type=int, default=25, help="steps of each throughput measurement")
    p.add_argument("--only", default="", help="comma-separated run names (default: all)")
    p.add_argument("--same", default="", help="comma-separated names that change no compute: one shared rate")
    args = p.parse_args()
    path = Path(args.plan)
    plan = json.loads(path.read_text())
    only = set(filter(None, args.only.split(",")))
    for r in plan["runs"]:
        if only and r["name"] not in only:
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            r["img_per_s"] = round(calibrate(None, [*plan["base"], *r["overrides"]], steps=args.calibrate))
        print(json.dumps({"name": r["name"], "img_per_s": r["img_per_s"]}), flush=True)
    same = [r for r in plan["runs"] if r["name"] in set(filter(None, args.same.split(",")))]
    if same:
        shared = round(statistics.median(r["img_per_s"] for r in same))
        for r in same:
            r["img_per_s"] = shared
    for r in plan["runs"]:
        if "img_per_s" in r:
            r["steps"] = int(args.minutes * 60 * r["img_per_s"] / batch_size(plan["base"] + r["overrides"]))
    plan["minutes"] = args.minutes
    path.write_text(json.dumps(plan, indent=1) + "\n")


if __name__ == "__main__":
    main()
