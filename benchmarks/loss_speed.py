"""Forward + backward time and peak memory of the loss family against a floor measured in the same run.

    .venv/bin/python benchmarks/loss_speed.py                    # B = 512, 4096, 16384; V = 2; D = 128
    .venv/bin/python benchmarks/loss_speed.py --batch-sizes 512 4096 --repeats 5

The floor is the three (2B x D)(D x 2B)-sized matrix products that any exact implementation's forward and
backward need (S = Z Z^T, then G Z and G^T Z). "plain dense" is NT-Xent as commonly written: the full
(2B, 2B) cosine matrix, a -inf diagonal and cross-entropy. Times are medians over rounds that run every
implementation in turn; peak memory is the resident-set growth of one step in a fresh process.
Targets: at B = 16384, protoclr at most 1.5x the floor with under 1 GiB memory growth; at B = 512 no slower
than plain dense.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

DENSE_MAX_B = 4096  # plain dense at B = 16384 needs several (2B)^2 float buffers: about 16 GiB


def _plain_dense(z: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    B = z.shape[1]
    zz = F.normalize(torch.cat([z[0], z[1]]), dim=1)
    logits = (zz @ zz.T / temperature).masked_fill(torch.eye(2 * B, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(B, 2 * B), torch.arange(B)])
    return F.cross_entropy(logits, target)


def _steps(B: int, D: int) -> dict:
    """Name -> a zero-argument forward+backward step on one (2, B, D) input."""
    from protoclr.losses import balanced_contrastive_loss, nt_xent_loss

    torch.manual_seed(0)
    z = torch.randn(2, B, D, requires_grad=True)
    flat = z.detach().reshape(2 * B, D).clone()

    def floor():
        s = flat @ flat.T
        s @ flat
        s.T @ flat

    steps = {
        "floor (3 matmuls)": floor,
        "protoclr nt_xent": lambda: nt_xent_loss(z, temperature=0.5).backward(),
        "protoclr balanced": lambda: balanced_contrastive_loss(z, alpha=2.0).backward(),
    }
    if B <= DENSE_MAX_B:
        steps["plain dense nt_xent"] = lambda: _plain_dense(z).backward()
    return steps


def _peak_memory_mib(kind: str, B: int, D: int) -> float:
    """Peak resident memory growth of one step over what the inputs hold, in a fresh process.

    Linux: writing 5 to /proc/self/clear_refs resets the high-water mark VmHWM, so the import of torch and
    the set-up do not count.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys; sys.path.insert(0, {here!r}); import loss_speed as m; "
        f"s = m._steps({B}, {D})[{kind!r}]; print(m._step_peak_mib(s))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _step_peak_mib(step) -> float:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - base) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[512, 4096, 16384])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 30, 7, 3 by size)")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; V=2, D={args.dim}")
    print("times: medians over rounds that run every implementation in turn (shared machines are noisy)")
    header = f"{'B':>6}  {'implementation':<22}{'fwd+bwd s':>10}{'peak MiB':>10}{'vs floor':>10}{'vs dense':>10}"
    print(header)
    print("-" * len(header))
    for B in args.batch_sizes:
        repeats = args.repeats or (30 if B <= 1024 else 7 if B <= 4096 else 3)
        steps = _steps(B, args.dim)
        times: dict[str, list[float]] = {k: [] for k in steps}
        for step in steps.values():
            step()  # warm-up
        for _ in range(repeats):
            for kind, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[kind].append(time.perf_counter() - t0)
        del steps
        median = {k: statistics.median(v) for k, v in times.items()}
        floor, dense = median["floor (3 matmuls)"], median.get("plain dense nt_xent")
        for kind, seconds in median.items():
            vs_dense = f"{seconds / dense:.2f}x" if dense else "n/a"
            mib = _peak_memory_mib(kind, B, args.dim)
            print(f"{B:>6}  {kind:<22}{seconds:>10.4f}{mib:>10.0f}{seconds / floor:>9.2f}x{vs_dense:>10}", flush=True)
        if dense is None:
            print(f"{B:>6}  {'plain dense nt_xent':<22}  skipped: needs about 16 GiB", flush=True)


if __name__ == "__main__":
    main()
