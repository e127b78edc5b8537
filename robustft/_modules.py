"""Private helpers over ``nn.Module`` shared by the modules that run a model (clip, merging)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own ``training`` flag.

    Restoring per submodule (not ``model.train(flag)``) keeps a mixed state intact, e.g. UEO's
    visual tower in eval mode inside a model otherwise in training mode.

    >>> m = nn.Sequential(nn.Dropout(), nn.Dropout())
    >>> _ = m[1].eval()
    >>> with eval_mode(m):
    ...     [c.training for c in m]
    [False, False]
    >>> [c.training for c in m]
    [True, False]
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
