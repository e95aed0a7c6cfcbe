"""The recipe study's table: each lever's accuracy at its budget beside its CPU throughput and the base's.

    python benchmarks/recipe_table.py benchmarks/recipe_plan.json docs/results/cpu/recipe_screen.jsonl

Reads the plan (levers, their CPU images/s and the steps the budget buys, from benchmarks/recipe_speeds.py) and
the screen's results (benchmarks/recipe_screen.py, one JSON line per run) and prints a Markdown table in plan
order: lever, overrides, images/s, steps, kNN and linear top-1, and both deltas against the run named ``base``.
Runs that failed print their error; runs not in the results are listed as not run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def table(plan: dict, results: list[dict], base: str = "base") -> str:
    by = {r["name"]: r for r in results}
    if base not in by or "knn_top1" not in by[base]:
        raise SystemExit(f"no result for the base run {base!r} in the results; the deltas need it")
    b = by[base]
    lines = [
        "| lever | overrides | CPU img/s | steps | kNN top-1 | linear top-1 | kNN vs base | linear vs base |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in plan["runs"]:
        name, ov = r["name"], " ".join(f"`{o}`" for o in r["overrides"]) or "(the base)"
        res = by.get(name)
        head = f"| {name} | {ov} | {r.get('img_per_s', '-')} | {r['steps']} |"
        if res is None:
            lines.append(f"{head} not run | | | |")
        elif "error" in res:
            lines.append(f"{head} failed: {res['error'][:80]} | | | |")
        else:
            k, lin = 100 * res["knn_top1"], 100 * res["linear_top1"]
            dk, dl = k - 100 * b["knn_top1"], lin - 100 * b["linear_top1"]
            lines.append(f"{head} {k:.2f}% | {lin:.2f}% | {dk:+.2f} | {dl:+.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plan")
    p.add_argument("results")
    p.add_argument("--base", default="base")
    args = p.parse_args()
    plan = json.loads(Path(args.plan).read_text())
    results = [json.loads(x) for x in Path(args.results).read_text().splitlines() if x.strip()]
    print(table(plan, results, args.base))


if __name__ == "__main__":
    main()
