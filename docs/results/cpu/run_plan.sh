#!/usr/bin/env bash
# The plan of docs/results/cpu/plan.md, in its order: each sweep resumes where it stopped (finished runs are
# skipped, interrupted ones resume from their checkpoint), so running this again after a kill continues the plan.
# Run it from a worktree at the plan's commit (plan.md names it), then copy runs/study/runs.db to
# docs/results/cpu/runs.db and regenerate the report:
#   protoclr report docs/results/cpu/runs.db --out docs/results/cpu
set -euo pipefail
cd "$(dirname "$0")/../../.."
PYTHON=${PYTHON:-python3}  # a Python with protoclr installed (e.g. .venv/bin/python)
for study in balance augmentation similarity class_balance; do
    "$PYTHON" -m protoclr.cli sweep "configs/cpu/$study.yaml" --out runs/study --workers 2
done
