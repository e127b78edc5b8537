"""How :func:`~robustft.recipes._loop.train` stops a run cleanly, the same step on every rank.

The two exceptions it raises (:class:`Interrupted`, :class:`NonFiniteLoss`), the handler that
records SIGINT/SIGTERM (:class:`Stop`), the one per-step collective in which the ranks agree on
the stop signal and on non-finite steps (:func:`agree`), and the finiteness check of weights
(:func:`finite`, on each rank's :func:`local` shard). The protocol is described in
:mod:`robustft.recipes._loop`.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from robustft.recipes._runfolder import RunError
from robustft.recipes._runtime import Agreed, Runtime

__all__ = [
    "Interrupted",
    "NonFiniteLoss",
    "Stop",
    "agree",
    "finite",
    "local",
]


class Interrupted(Agreed, BaseException):
    """SIGINT or SIGTERM stopped :func:`train` at a step boundary, after saving the checkpoint.

    Every rank raises it at the same step. A :class:`BaseException`, like the
    ``KeyboardInterrupt`` it replaces: an ``except Exception`` around a run (a retry loop, a
    logging wrapper) must not swallow a request to stop.

    Args:
        signum: the signal (``signal.SIGINT`` or ``signal.SIGTERM``; under several ranks the
            largest number any rank received).
        step: the optimiser steps completed, which the checkpoint holds.
        checkpoint: the checkpoint saved (``checkpoint.pt`` or ``checkpoint.dcp``), or ``None``
            without a run folder.

    Attributes:
        exit_status: ``128 + signum`` (130 for SIGINT, 143 for SIGTERM), the shell's convention.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        name = signal.Signals(signum).name
        saved = f"; saved {checkpoint}" if checkpoint is not None else "; nothing saved"
        super().__init__(f"stopped by {name} at step {step}{saved}")
        self.signum, self.step, self.checkpoint = int(signum), int(step), checkpoint
        self.exit_status = 128 + int(signum)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.signum, self.step, self.checkpoint))


class NonFiniteLoss(Agreed, RunError):  # noqa: N818 (the name the command line documents)
    """A NaN or infinite loss (or gradient norm, or weights) stopped :func:`train` at a step.

    Raised on every rank at the same step, before that step's update is applied, so the last
    checkpoint saved holds finite weights (non-finite weights are never written). A
    :class:`~robustft.recipes._runfolder.RunError`: the command prints its one line and exits
    with status 1.

    Args:
        step: the optimiser step (1-based, as the log lines count) whose loss was non-finite.
        checkpoint: the last checkpoint saved (the last good one), or ``None``.
        checkpoint_step: the step that checkpoint holds.
        what: what was non-finite (``"loss (nan)"``, ``"gradient norm (inf)"``, ``"weights"``).
    """

    def __init__(
        self,
        step: int,
        checkpoint: Path | None,
        *,
        checkpoint_step: int | None = None,
        what: str = "loss",
    ):
        if checkpoint is None:
            good = "no checkpoint was saved before it"
        else:
            at = f" (step {checkpoint_step})" if checkpoint_step is not None else ""
            good = f"the last good checkpoint is {checkpoint}{at}"
        super().__init__(
            f"non-finite {what} at step {step}; {good} — to continue, lower --lr, set "
            f"--grad-clip, or pass --nonfinite skip to skip such steps"
        )
        self.step, self.checkpoint = int(step), checkpoint
        self.checkpoint_step, self.what = checkpoint_step, what

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _nonfinite,
            (self.step, self.checkpoint, self.checkpoint_step, self.what),
        )


def _nonfinite(
    step: int, checkpoint: Path | None, checkpoint_step: int | None, what: str
) -> NonFiniteLoss:
    return NonFiniteLoss(step, checkpoint, checkpoint_step=checkpoint_step, what=what)


class Stop:
    """The first SIGINT/SIGTERM received while :func:`train` runs (``signum`` 0: none).

    A context manager: installs its handler for both signals in the main thread (elsewhere
    Python forbids it, and nothing is installed) and restores the previous handlers on exit. A
    second signal restores them at once and hands the signal to the previous handler
    (``KeyboardInterrupt`` for SIGINT; the default action, the end of the process, for SIGTERM).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> Stop:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self.previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self.previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.signum:
            self.signum = signum  # stop at the next step boundary
            return
        previous = self.previous.get(signum)
        self._restore()  # a second signal: abort now
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.raise_signal(signum)


def agree(bad: Tensor, signum: int, runtime: Runtime) -> tuple[bool, int]:
    """Whether a step was non-finite on any rank, and the stop signal (the largest received).

    The loop's one collective per step: a 2-element MAX all-reduce, then one host read (on one
    process only the read of ``bad``).
    """
    if runtime.world == 1:
        return bool(bad), signum
    flags = torch.stack((bad.to(torch.float32), torch.full((), float(signum), device=bad.device)))
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=runtime.group)
    any_bad, largest = flags.tolist()
    return any_bad > 0, int(largest)


def local(t: Tensor) -> Tensor:
    """This rank's part of ``t`` (a ``DTensor``'s local shard), detached."""
    to_local = getattr(t, "to_local", None)
    return (to_local() if callable(to_local) else t).detach()


def finite(tensors: list[Tensor]) -> Tensor:
    """0-d bool: every element of every tensor is finite."""
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()
