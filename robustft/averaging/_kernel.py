r"""The one stateless kernel every running average shares: a lerp with a time-varying weight.

EMA, the Beta moving average and the uniform average differ only in the weight :math:`w_t` they
fold the new iterate in with,

.. math:: \bar\theta \leftarrow \bar\theta + w_t\,(\theta_t - \bar\theta),

so they all call :func:`fold` (pure) or :func:`fold_` (in place). Weights are Python floats
computed on the host from Python-int counters: no device synchronisation per step.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from robustft import tree
from robustft._checks import describe
from robustft.tree._structure import _fmt_keys

__all__ = [
    "check_accumulator_dtype",
    "check_params",
    "fold",
    "fold_",
    "make_average",
    "resolve_device",
]


def check_params(fn: str, params: object, name: str = "params") -> Mapping[str, Tensor]:
    """Check ``params`` is a tree of floating-point tensors (integer/bool buffers are rejected)."""
    params = tree.check_tree(params, fn=fn, name=name)
    bad = [k for k, v in params.items() if not v.is_floating_point()]
    if bad:
        dtypes = sorted({str(params[k].dtype) for k in bad})
        raise TypeError(
            f"{fn}: {name} must hold floating-point tensors only, got {', '.join(dtypes)} at keys "
            f"{_fmt_keys(bad)}; integer and bool buffers (e.g. BatchNorm's num_batches_tracked) "
            "cannot be averaged: leave them out (robustft.tree.partition) and copy them yourself"
        )
    return params


def resolve_device(fn: str, device: object) -> torch.device | None:
    """Validate a ``device`` argument (``None``, a ``str`` or a ``torch.device``)."""
    if device is None:
        return None
    if isinstance(device, torch.device):
        return device
    if isinstance(device, str):
        try:
            return torch.device(device)
        except RuntimeError as err:
            raise ValueError(
                f"{fn}: device must name a torch device (e.g. 'cpu', 'cuda:0'), got {device!r}"
            ) from err
    raise TypeError(f"{fn}: device must be None, a str or a torch.device, got {describe(device)}")


def check_accumulator_dtype(fn: str, dtype: object) -> torch.dtype:
    """Validate ``accumulator_dtype``: a floating-point ``torch.dtype``."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"{fn}: accumulator_dtype must be a floating-point torch.dtype (e.g. torch.float32), "
            f"got {describe(dtype)}"
        )
    return dtype


def make_average(
    params: Mapping[str, Tensor], dtype: torch.dtype, device: torch.device | None
) -> dict[str, Tensor]:
    """A detached copy of ``params`` in the wider of each tensor's dtype and ``dtype``.

    Always a copy (``copy=True``), so the average never aliases the caller's tensors.
    """
    with torch.no_grad():
        return {
            k: v.detach().to(
                device=device if device is not None else v.device,
                dtype=torch.promote_types(v.dtype, dtype),
                copy=True,
            )
            for k, v in params.items()
        }


def _check_pair(fn: str, average: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> None:
    check_params(fn, params)
    tree.check_same_structure(
        average, params, what=fn, names=("state.average", "params"), dtypes=False
    )


def fold(
    average: Mapping[str, Tensor], params: Mapping[str, Tensor], weight: float, *, fn: str
) -> dict[str, Tensor]:
    r"""Pure kernel: a new tree :math:`\bar\theta + w\,(\theta - \bar\theta)`; inputs untouched.

    ``params`` is converted to each accumulator's dtype and device first. Tensors sharing type,
    device and dtype with their accumulator go through one ``torch._foreach_lerp`` per group.
    """
    _check_pair(fn, average, params)
    with torch.no_grad():
        same: list[str] = []
        out: dict[str, Tensor] = {}
        for k, a in average.items():
            p = params[k]
            if p.dtype == a.dtype and p.device == a.device and type(p) is type(a):
                same.append(k)
            else:
                out[k] = torch.lerp(a, p.to(device=a.device, dtype=a.dtype), weight)
        if same:
            out.update(
                tree.lerp({k: average[k] for k in same}, {k: params[k] for k in same}, weight)
            )
    return {k: out[k] for k in average}


def fold_(
    average: Mapping[str, Tensor], params: Mapping[str, Tensor], weight: float, *, fn: str
) -> None:
    r"""In-place kernel: ``average[k] += w * (params[k] - average[k])`` for every key.

    Only ``average``'s own buffers are written; runs under ``torch.no_grad`` (no graph is recorded
    even when ``params`` require grad).
    Same-dtype groups use one ``torch._foreach_lerp_`` each (fused multi-tensor kernels on CUDA,
    no temporaries); other dtypes or devices are converted one chunk at a time by
    :func:`robustft.tree.lerp_`.
    """
    _check_pair(fn, average, params)
    with torch.no_grad():  # no graph, even for parameters that require grad: no detach needed
        tree.lerp_(average, params, weight)
