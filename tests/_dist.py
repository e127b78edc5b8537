"""Run a test body in several gloo processes on CPU, with a bounded time and clean-up.

Usage (``fn`` must be a module-level function of the test module so ``spawn`` can import it)::

    def _body(rank, world_size, tmp): ...            # asserts inside; may return a picklable value
    results = run_distributed(_body, world_size=2, args=(tmp_path,))

Each worker joins a fresh gloo group on a free loopback port; a worker's exception is re-raised in
the parent with its traceback; workers still alive after ``timeout`` seconds are killed.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...], out: Any
) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=60),
        )
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        out.put((rank, "ok", result))
    except BaseException:  # report every failure to the parent
        out.put((rank, "error", traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    *,
    world_size: int = 2,
    args: tuple[Any, ...] = (),
    timeout: float = 120.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results by rank."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, out), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            try:
                rank, status, value = out.get(timeout=timeout)
            except queue.Empty:
                errors.append(f"timed out after {timeout}s waiting for workers")
                break
            if status == "ok":
                results[rank] = value
            else:
                errors.append(f"rank {rank} failed:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=10)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        out.close()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
