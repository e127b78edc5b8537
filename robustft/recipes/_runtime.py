"""Where a run executes: one process, or torchrun's ranks with DDP or FSDP2; device and autocast.

One process without torchrun needs no set-up. Under ``torchrun`` (``WORLD_SIZE`` > 1 in the
environment) :func:`init` joins the process group that torchrun's rendezvous describes (NCCL on
GPUs, gloo on CPUs), one device per local rank. :func:`wrap` then wraps the method's trained
module in ``DistributedDataParallel``, or shards it with FSDP2's ``fully_shard`` per transformer
block and once at the root; the frozen teacher is sharded the same way under FSDP2 and
replicated under DDP.

**One rank's failure ends the job.** A job runs inside :func:`failfast`, which on success
leaves the process group normally (:func:`shutdown`) and on an exception on one rank ends every
rank within seconds, with the error printed once and a non-zero exit status, never leaving the
others blocked in a collective:

- The failing rank claims "first failure" with one atomic counter in the process group's
  key-value store (torchrun's agent store, or rank 0's), prints
  ``robustft: error: [rank R] <message>`` (one line, :func:`one_line`) only if it was first,
  flushes its output and leaves with ``os._exit`` at once: no barrier, no ``destroy``, no
  waiting for anything. Its sockets close, so every gloo peer's next (or current) collective
  fails within milliseconds with "connection closed by peer"; torchrun's agent also tears the
  other workers down as soon as one exits non-zero.
- A peer whose collective failed because a rank died (or timed out) goes through the same
  path: it is not first, so it exits non-zero without printing. (If the counter cannot be
  reached, because the rank that hosted it died, the peer prints one short line, ``another
  rank stopped: ...``; under torchrun the agent hosts it, so this does not happen.) The same
  error raised on every rank at once (a setting that every rank refuses) is printed once too.
- An exception that every rank raises at the same step after agreeing on it through a
  collective (:class:`Agreed`: an interrupt, a non-finite loss) leaves the group consistent:
  the group is destroyed, rank 0 re-raises it (the command prints its message) and the other
  ranks exit quietly with its status.
- A check or a write that rank 0 alone does (claiming the run folder, writing a checkpoint) is
  shared with a collective (:func:`on_rank0`, :func:`fail_together`): rank 0 raises its own
  error and the other ranks an :class:`EchoError`, which :func:`failfast` never prints, so the
  message printed is always the failing rank's own.
- On one process :func:`failfast` re-raises every exception unchanged.

Exit statuses of a failing rank: 2 for a bad setting or input (``ValueError``, ``TypeError``,
``FileNotFoundError``, as the command line), 130 for ``KeyboardInterrupt``, the code of a
``SystemExit``, 1 otherwise (a peer's failure or a timeout included).

**A stopped or hung rank** (``SIGSTOP``, a deadlock, a dead node) cannot say anything: the
others wait in their collective for at most ``timeout`` seconds (:func:`init`, the command's
``--collective-timeout``, default 600), then fail with one line naming the timeout. The same
limit bounds the start-up rendezvous and any single collective, so it must exceed the longest
work one rank does while the others wait (rank 0 writing a checkpoint, a slow first batch).

**NCCL.** A dead peer is not noticed by NCCL itself: its collectives wait until the timeout,
when the process group's watchdog ends the process (``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``, the
default since torch 2.2, set here if unset; a value you set wins). Under torchrun the agent
ends the remaining workers as soon as the failing one exits, well before that. (Not tested
here: the tests run gloo on CPUs.)

**Signals.** The training loop handles SIGINT and SIGTERM itself (it stops at the next step
boundary, :func:`robustft.recipes._loop.train`); DataLoader workers ignore both
(:func:`quiet_worker`), so a Ctrl-C sent to the whole process group prints no worker traceback.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import multiprocessing
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from robustft.recipes._config import flag_of
from robustft.recipes._nets import shard_units
from robustft.recipes._runfolder import RunError

__all__ = [
    "Agreed",
    "EchoError",
    "Runtime",
    "autocast",
    "exit_status",
    "fail_together",
    "failfast",
    "init",
    "on_rank0",
    "one_line",
    "quiet_worker",
    "shutdown",
    "wrap",
]

_STORE_SECONDS = 5.0  # how long a failing rank may wait for the store to claim "first failure"


class Runtime(NamedTuple):
    """The execution context of a run.

    Attributes:
        device: this rank's device.
        rank: this process's rank (0 on one process).
        world: number of processes.
        strategy: ``"single"``, ``"ddp"`` or ``"fsdp"``.
        group: the process group (``torch.distributed.group.WORLD``) or ``None`` on one process.
        amp_dtype: the autocast dtype (``torch.bfloat16``) or ``None`` for plain fp32.
        timeout: the process group's collective timeout in seconds (:func:`init`), or ``None``
            when unknown (a group made elsewhere).
    """

    device: torch.device
    rank: int = 0
    world: int = 1
    strategy: str = "single"
    group: Any = None
    amp_dtype: torch.dtype | None = None
    timeout: float | None = None

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the rank that writes files and shows progress)."""
        return self.rank == 0


def init(
    *, device: str | None, precision: str, distributed: str, timeout: float = 600.0
) -> Runtime:
    """Set up the run: join torchrun's process group if there is one, pick the device and precision.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``..., or ``None`` for CUDA when available.
        precision: ``"auto"`` (bf16 autocast on CUDA, fp32 elsewhere), ``"fp32"`` or ``"bf16"``.
        distributed: ``"ddp"`` or ``"fsdp"``, used when torchrun started several processes.
        timeout: seconds any collective (and the start-up rendezvous) may wait for the other
            ranks before the job fails (``--collective-timeout``): a stopped or hung rank then
            ends the job after this long. Unused on one process.

    Returns:
        The :class:`Runtime`.

    Raises:
        ValueError: on an unknown precision or strategy, a timeout that is not a positive
            number of seconds, or CUDA asked for and unavailable.
    """
    fn = "init"
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"{fn}: precision must be auto, fp32 or bf16, got {precision!r}")
    if distributed not in ("ddp", "fsdp"):
        raise ValueError(f"{fn}: distributed must be ddp or fsdp, got {distributed!r}")
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ValueError(
            f"{flag_of('collective_timeout')} must be a positive number of seconds, got {timeout!r}"
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if device is None:
        dev = torch.device(
            f"cuda:{local_rank}" if cuda and world > 1 else ("cuda" if cuda else "cpu")
        )
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and world > 1 and dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    if dev.type == "cuda":
        if not cuda:
            raise ValueError(f"{fn}: device is {device!r} but CUDA is not available")
        torch.cuda.set_device(dev)
    amp = None
    if precision == "bf16" or (precision == "auto" and dev.type == "cuda"):
        amp = torch.bfloat16
    seconds: float | None = float(timeout)
    if world == 1:
        return Runtime(dev, amp_dtype=amp, timeout=seconds)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if backend == "nccl":  # the watchdog ends a rank whose collective failed or timed out
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout)))
    else:
        seconds = None  # a group made elsewhere, with its own timeout
    return Runtime(
        dev,
        dist.get_rank(),
        dist.get_world_size(),
        distributed,
        dist.group.WORLD,
        amp,
        seconds,
    )


def shutdown(runtime: Runtime) -> None:
    """Leave the process group after a successful job: a barrier, then ``destroy`` (a no-op on
    one process). After a failure use :func:`failfast`, which never waits for the other ranks."""
    if runtime.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class Agreed:
    """Marks an exception that every rank raises at the same point, after agreeing on it
    through a collective (an interrupt, a non-finite loss): the process group is then still
    consistent, and :func:`failfast` lets rank 0 report it while the others exit quietly.

    Attributes:
        exit_status: the process's exit status for it.
    """

    exit_status: int = 1


def quiet_worker(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores SIGINT and SIGTERM.

    A Ctrl-C (or a scheduler's SIGTERM) sent to the whole process group then reaches only the
    main process, which stops at a step boundary and shuts its workers down; the workers print
    no ``KeyboardInterrupt`` traceback. They still end with the main process (PyTorch's worker
    watchdog).
    """
    del worker_id
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line.

    For an error re-raised from a DataLoader worker (a traceback in its message) it is the
    original error's own message (its last line, without the ``module.Type:`` prefix); other
    multi-line messages are joined with spaces; an empty message gives the type's name.

    >>> one_line(ValueError("a\\n b"))
    'a b'
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if len(lines) > 1 and any("Traceback (most recent call last)" in line for line in lines):
        last = lines[-1]
        head, sep, rest = last.partition(": ")
        return rest if sep and head.replace(".", "").replace("_", "").isalnum() else last
    return " ".join(lines)


def exit_status(error: BaseException) -> int:
    """The exit status of a command that ends with ``error`` (the command line's convention).

    2 for a bad setting or input (``ValueError``, ``TypeError``, ``FileNotFoundError``), 130 for
    ``KeyboardInterrupt``, the code of a ``SystemExit`` (1 if it is not a number),
    ``error.exit_status`` for :class:`Agreed` errors, 1 otherwise.
    """
    if isinstance(error, Agreed):
        return int(error.exit_status)
    if isinstance(error, SystemExit):
        code = error.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    if isinstance(error, KeyboardInterrupt):
        return 128 + int(signal.SIGINT)
    if isinstance(error, (ValueError, TypeError, FileNotFoundError)):
        return 2
    return 1


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the errors it was raised from (at most 8)."""
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in seen and len(seen) < 8:
        seen.append(current)
        yield current
        current = current.__cause__ or current.__context__


# what gloo, NCCL and the store say when a peer went away, or a collective waited too long
_LOST = ("closed by peer", "reset by peer", "broken pipe", "connection refused", "connection was")
_TIMEOUT = (
    "timed out waiting",
    "operation timed out",
    "operation timeout",
    "socket timeout",
    "wait timeout",
)


def _collective_trouble(error: BaseException) -> str | None:
    """``"timeout"`` if ``error`` is a collective that waited too long, ``"lost"`` if it failed
    because another rank went away, ``None`` for this rank's own error."""
    for err in _chain(error):
        if not isinstance(err, RuntimeError):
            continue
        text = str(err).lower()
        if any(key in text for key in _TIMEOUT):
            return "timeout"
        if isinstance(err, dist.DistNetworkError) or any(key in text for key in _LOST):
            return "lost"
    return None


@contextlib.contextmanager
def _silent_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null (the C++ store client logs a trace on a dead host)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _first_failure(runtime: Runtime) -> bool | None:
    """Whether this rank is the job's first to fail (``None``: the store cannot tell)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        key = f"robustft/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        with _silent_stderr():
            store.set_timeout(datetime.timedelta(seconds=_STORE_SECONDS))
            return int(store.add(key, 1)) == 1
    except Exception:  # the store's host is gone (or never was): nobody can tell
        return None


def _message(runtime: Runtime, error: BaseException, trouble: str | None) -> str:
    """The one line a failing rank prints (without the ``robustft: error:`` prefix)."""
    if trouble == "timeout":
        after = f"{runtime.timeout:g} s" if runtime.timeout is not None else "the timeout"
        return (
            f"a collective operation waited longer than {after} (--collective-timeout) for "
            f"another rank, which stopped responding (stopped, hung or far slower); the job ends "
            f"here"
        )
    if trouble == "lost":
        return (
            f"another rank stopped (it failed or was killed; its error, if any, is printed above): "
            f"{_library_line(error)}"
        )
    if isinstance(error, KeyboardInterrupt):
        return (
            "interrupted (SIGINT) outside a training step; the last checkpoint, if any, is intact"
        )
    return one_line(error)


def _library_line(error: BaseException) -> str:
    """The first sentence of a library's message, without its ``[file.cc:123]`` location."""
    text = one_line(error)
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ", 1)[0].rstrip(".")


def _fail(runtime: Runtime, error: BaseException, *, debug: bool) -> None:
    """Print ``error`` if this rank failed first, then leave the process at once."""
    status = 1 if (trouble := _collective_trouble(error)) else exit_status(error)
    first = False if isinstance(error, EchoError) else _first_failure(runtime)
    try:
        if debug:
            traceback.print_exception(error)
        if first is not False:  # first, or nobody can tell: better twice than never
            line = _message(runtime, error, trouble)
            print(f"robustft: error: [rank {runtime.rank}] {line}", file=sys.stderr)
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        # forked DataLoader workers hold copies of the group's sockets: the peers would see
        # them close only when the orphans notice (PyTorch checks every 5 s)
        for child in multiprocessing.active_children():
            with contextlib.suppress(Exception):
                child.kill()
        os._exit(status)


class EchoError(RunError):
    """Another rank's failure, raised on this rank too so that it leaves as well.

    :func:`failfast` never prints it: the rank that failed prints its own error.
    """


def fail_together(error: BaseException | None, runtime: Runtime, other: str) -> None:
    """Raise ``error`` on its rank and an :class:`EchoError` saying ``other`` on every other rank.

    A collective under several processes (one ``all_reduce``; it also orders what comes after
    it behind what came before on every rank, like a barrier), so one rank's failure never leaves
    the others waiting; a no-op without an error on one process.
    """
    if runtime.world > 1:
        flag = torch.tensor(0 if error is None else 1, device=runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=runtime.group)
        if error is None and int(flag):
            raise EchoError(other)
    if error is not None:
        raise error


def on_rank0(runtime: Runtime, work: Callable[[], Any], what: str) -> Any:
    """Run ``work`` on rank 0 only (its side effects happen once) and give its result to every
    rank; if it fails, rank 0 raises its error and every other rank an :class:`EchoError` naming
    ``what`` failed (a collective under several processes)."""
    if runtime.world == 1:
        return work()
    box: list[Any] = [None]
    error: BaseException | None = None
    if runtime.main:
        try:
            box[0] = work()
        except Exception as err:  # every rank must reach the broadcast below
            error = err
    fail_together(error, runtime, f"rank 0 could not {what} (see its error)")
    dist.broadcast_object_list(box, src=0, group=runtime.group)
    return box[0]


@contextlib.contextmanager
def failfast(runtime: Runtime, *, debug: bool = False) -> Iterator[Runtime]:
    """Run a job so that one rank's failure ends every rank at once, its error printed once.

    On success the process group is left normally (:func:`shutdown`). On an exception under
    several processes this rank prints ``robustft: error: [rank R] <message>`` if it is the
    job's first rank to fail (one line, :func:`one_line`; a collective that timed out or lost
    its peer says so), flushes its output and leaves with ``os._exit(status)``
    (:func:`exit_status`), so the other ranks' collectives fail at once and they leave the same
    way, quietly. An :class:`Agreed` exception (raised by every rank at the same point) is
    re-raised on rank 0 and ends the other ranks quietly with ``SystemExit(exit_status)``. On
    one process every exception is re-raised unchanged. See the module's docstring.

    Args:
        runtime: the job's runtime (:func:`init`).
        debug: also print the failing rank's traceback.

    Yields:
        ``runtime``.

    Raises:
        BaseException: on one process, whatever the job raised; under several processes an
            :class:`Agreed` exception on rank 0 (and ``SystemExit`` on the others). Any other
            failure ends the process.

    Example:
        >>> runtime = init(device="cpu", precision="fp32", distributed="ddp")
        >>> with failfast(runtime):
        ...     pass  # the job
    """
    try:
        yield runtime
        shutdown(runtime)  # inside: a peer failing while this rank waits in the barrier
    except BaseException as error:
        if runtime.world == 1 or not dist.is_available() or not dist.is_initialized():
            raise
        if isinstance(error, Agreed):
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            if runtime.main:
                raise
            raise SystemExit(exit_status(error)) from None
        _fail(runtime, error, debug=debug)


def _shard(module: nn.Module) -> nn.Module:
    """``fully_shard`` every transformer block, then the root; 0-d parameters stay replicated.

    FSDP2 cannot shard a 0-d parameter (CLIP's ``logit_scale``): it is left out of the root's
    group (``ignored_params``), which is right for a frozen one. A trained 0-d parameter would then
    get no gradient reduction, so it is refused.
    """
    from torch.distributed.fsdp import fully_shard

    scalars = {p for p in module.parameters() if p.ndim == 0}
    trained = [n for n, p in module.named_parameters() if p.ndim == 0 and p.requires_grad]
    if trained:
        raise ValueError(
            f"wrap: FSDP2 cannot shard the trained 0-d parameter(s) {trained} (fully_shard needs "
            f"at least one dimension); run this method with --distributed ddp"
        )
    for unit in shard_units(module):
        fully_shard(unit)
    fully_shard(module, ignored_params=scalars or None)
    return module


def wrap(
    module: nn.Module, teacher: nn.Module | None, runtime: Runtime
) -> tuple[nn.Module, nn.Module | None]:
    """Move the trained module (and the teacher) to the device and apply the data parallelism.

    Returns:
        ``(trained, teacher)``: the module to call in the loop (DDP wrapper, FSDP2 module or the
        module itself) and the teacher (sharded under FSDP2).
    """
    module = module.to(runtime.device)
    if teacher is not None:
        teacher = teacher.to(runtime.device)
    if runtime.strategy == "ddp":
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids), teacher
    if runtime.strategy == "fsdp":
        return _shard(module), (_shard(teacher) if teacher is not None else None)
    return module, teacher


@contextlib.contextmanager
def no_sync(module: nn.Module, skip: bool) -> Iterator[None]:
    """Skip the gradient all-reduce of a non-final accumulation micro-step (DDP and FSDP2)."""
    if not skip:
        yield
        return
    if isinstance(module, DistributedDataParallel):
        with module.no_sync():
            yield
        return
    setter = getattr(module, "set_requires_gradient_sync", None)
    if setter is None:
        yield
        return
    setter(False)
    try:
        yield
    finally:
        setter(True)


def autocast(runtime: Runtime) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on the run's device when its precision asks for it, else nothing."""
    if runtime.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(runtime.device.type, dtype=runtime.amp_dtype)
