"""The one module that touches ``torch.distributed``.

Everything degrades to rank 0 / world size 1 when no process group is initialized, so every code path runs
on a laptop. The context is passed explicitly (as in open_clip's ``loss.py``) so that a single-process test is
simply ``DistContext(rank=0, world_size=1)``.

Gradient convention of :func:`all_gather_with_grad`: the backward pass sums, over all ranks, the gradients
that reach each rank's slice and hands that sum to its owner. With DDP's gradient *averaging*, a loss on rank
``r`` must therefore be this rank's share of the global objective times the world size (see
``protoclr.losses.contrastive_loss``) for W processes to reproduce one process exactly.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` in ``[0, world_size)``."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def current_context() -> DistContext:
    """The initialized default process group as a :class:`DistContext`; rank 0 of 1 when there is none."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size())
    return DistContext()


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device))
    return [int(s.item()) for s in sizes]


def _gather_padded(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All-gather along dim 0 where ranks may hold different sizes: pad to the largest, gather, unpad."""
    n_max = max(sizes)
    if x.shape[0] < n_max:
        pad = x.new_zeros((n_max - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad], dim=0)
    out = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(out, x.contiguous())
    return torch.cat([o[:s] for o, s in zip(out, sizes, strict=True)], dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:  # type: ignore[override]
        ctx.sizes, ctx.rank = sizes, rank
        return _gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def all_gather_with_grad(x: torch.Tensor, ctx: DistContext | None = None) -> tuple[torch.Tensor, int]:
    """Concatenate ``x`` ``(n_r, ...)`` from every rank along dim 0, keeping gradients.

    Returns ``(gathered (sum_r n_r, ...), offset)`` where ``offset`` is where this rank's rows start.
    Ranks may hold different ``n_r`` (an uneven last batch). Backward: the sum over ranks of the gradient of
    this rank's slice (see the module docstring for the DDP convention).
    """
    ctx = ctx or current_context()
    if not ctx.is_distributed:
        return x, 0
    sizes = _gather_sizes(x.shape[0], x.device)
    return _AllGatherWithGrad.apply(x, sizes, ctx.rank), sum(sizes[: ctx.rank])


def all_gather_no_grad(x: torch.Tensor, ctx: DistContext | None = None) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 without gradient (features for kNN, queues)."""
    ctx = ctx or current_context()
    if not ctx.is_distributed:
        return x.detach()
    with torch.no_grad():
        return _gather_padded(x.detach(), _gather_sizes(x.shape[0], x.device))


def shutdown() -> None:
    """Leave the process group, if one was initialized, after every rank has arrived: the collective library's
    threads are then joined, not torn down by the interpreter's exit (which can abort a gloo process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, queue) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        # Serialized to bytes: tensors sent through the queue would share memory with a process about to exit.
        buffer = io.BytesIO()
        torch.save(fn(DistContext(rank, world_size), *args), buffer)
        queue.put((rank, True, buffer.getvalue()))
    except BaseException:
        import traceback

        queue.put((rank, False, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def run_local_processes(fn: Callable[..., Any], world_size: int, *args: Any, port: int | None = None) -> list:
    """Run ``fn(ctx, *args)`` in ``world_size`` CPU processes joined by a gloo group on 127.0.0.1.

    Returns the list of return values ordered by rank (tensors, numbers, strings and containers of them).
    For tests and CPU checks of multi-process equivalence; real launches go through Fabric, torchrun or SLURM.
    """
    import socket

    import torch.multiprocessing as mp

    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    mp_ctx = mp.get_context("spawn")
    queue = mp_ctx.SimpleQueue()
    procs = [mp_ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    for _ in procs:
        rank, ok, value = queue.get()
        if not ok:
            for p in procs:
                p.terminate()
            raise RuntimeError(f"distributed worker {rank} failed:\n{value}")
        results[rank] = torch.load(io.BytesIO(value), weights_only=True)
    for p in procs:
        p.join()
    return [results[r] for r in range(world_size)]
