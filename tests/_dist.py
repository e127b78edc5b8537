"""Run a test body in several gloo processes on CPU, with a bounded time and clean-up.

Usage (``fn`` must be a module-level function of the test module so ``spawn`` can import it)::

    def _body(rank, world_size, tmp): ...            # asserts inside; may return a picklable value
    results = run_distributed(_body, world_size=2, args=(tmp_path,))

Each worker joins a fresh gloo group on a free loopback port; a worker's exception is re-raised in
the parent with its traceback; workers still alive after ``timeout`` seconds are killed.

For tests that need real processes (signals, exit statuses, one rank dying), :func:`launch`
starts a command once per rank as torchrun would (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` /
``MASTER_PORT`` on a free port; each rank in its own session, output to files) and
:func:`finish` waits for them with a deadline, kills what is left and returns what each did::

    procs = launch([sys.executable, "-c", code], world=2, logs=tmp_path)
    ended = finish(procs, logs=tmp_path, timeout=120)   # [Ended(returncode, stdout, stderr, at)]
"""

from __future__ import annotations

import contextlib
import datetime
import os
import queue
import signal
import socket
import subprocess
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

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


_LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launch(
    args: Sequence[str],
    *,
    world: int,
    logs: Path,
    env: Mapping[str, str] | None = None,
) -> list[subprocess.Popen[bytes]]:
    """Start ``args`` once per rank, with torchrun's environment when ``world > 1``.

    Each rank runs in its own session (``os.killpg(proc.pid, sig)`` reaches it and its
    DataLoader workers, and nothing else), with one OpenMP thread, its stdout and stderr in
    ``logs/rank<r>.out`` / ``.err``. Always pair with :func:`finish` (in a ``finally``).
    """
    port = free_port()
    procs = []
    for rank in range(world):
        e = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
        e.update(OMP_NUM_THREADS="1", **(env or {}))
        if world > 1:
            e.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        with (
            open(logs / f"rank{rank}.out", "wb") as out,
            open(logs / f"rank{rank}.err", "wb") as err,
        ):
            procs.append(
                subprocess.Popen(list(args), stdout=out, stderr=err, env=e, start_new_session=True)
            )
    return procs


class Ended(NamedTuple):
    """How a launched rank ended: ``returncode`` ``None`` if :func:`finish` had to kill it."""

    returncode: int | None
    stdout: str
    stderr: str
    at: float  # time.monotonic() when it was seen to end


def finish(
    procs: Sequence[subprocess.Popen[bytes]],
    *,
    logs: Path,
    timeout: float,
    wait: Sequence[int] | None = None,
) -> list[Ended]:
    """Wait for the ranks in ``wait`` (default: all) for at most ``timeout`` seconds, then kill
    every rank still running (its whole session) and return how each ended."""
    deadline = time.monotonic() + timeout
    wanted = range(len(procs)) if wait is None else wait
    codes: dict[int, int] = {}
    at: dict[int, float] = {}
    while time.monotonic() < deadline:
        for r, p in enumerate(procs):
            if r not in codes and p.poll() is not None:
                codes[r], at[r] = p.returncode, time.monotonic()
        if all(r in codes for r in wanted):
            break
        time.sleep(0.02)
    for p in procs:  # what is left of every session (a rank, or a rank's orphaned workers)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    return [
        Ended(
            codes.get(r),
            (logs / f"rank{r}.out").read_text(errors="replace"),
            (logs / f"rank{r}.err").read_text(errors="replace"),
            at.get(r, time.monotonic()),
        )
        for r in range(len(procs))
    ]
