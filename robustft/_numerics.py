r"""The numerical core every public module shares: one dtype rule, one fast-path predicate, kernels.

One home per idea (STYLE "One home per idea"):

- :func:`compute_dtype` -- the dtype every reduction, loss, score, metric and accumulator computes
  in: the promoted input dtype, at least float32 (bf16/fp16 sums lose digits, bf16 scores tie).
- :func:`full_precision` -- a region where autocast is off, so a function that documents float32
  results returns float32 under ``torch.autocast(dtype=torch.bfloat16)`` too.
- :func:`foreach_ok` -- whether the ``torch._foreach_*`` fast paths may run; :func:`values_readable`
  -- whether reading a tensor's values costs no device sync and breaks no trace.
- Kernels on the last axis, exact via log-softmax/logsumexp and finite at masked (``-inf``)
  classes: :func:`log_msp`, :func:`entropy`, :func:`kl_rows`, :func:`normalize`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from robustft._checks import is_functorch_wrapped

__all__ = [
    "compute_dtype",
    "energy_gap_rows",
    "entropy",
    "foreach_ok",
    "full_precision",
    "kl_rows",
    "log_msp",
    "normalize",
    "plain_tensor",
    "values_readable",
    "zero_neginf",
]


def compute_dtype(*dtypes_or_tensors: torch.dtype | Tensor) -> torch.dtype:
    """The promoted dtype of the arguments, at least float32 (float64 stays float64).

    >>> compute_dtype(torch.bfloat16)
    torch.float32
    >>> compute_dtype(torch.zeros(1, dtype=torch.float16), torch.float64)
    torch.float64
    """
    dtype = torch.float32
    for x in dtypes_or_tensors:
        dtype = torch.promote_types(dtype, x.dtype if isinstance(x, Tensor) else x)
    return dtype


def full_precision(*tensors: Tensor) -> contextlib.AbstractContextManager[object]:
    """A context with autocast off on the tensors' device types, for the enclosed computation.

    Under ``torch.autocast(dtype=torch.bfloat16)`` a matmul of float32 inputs runs (and returns) in
    bf16; inside this region it runs in the inputs' dtype, so a function that casts to
    :func:`compute_dtype` first returns float32 as documented. A ``nullcontext`` when autocast is
    off. Returns plain context managers (no generator), so ``torch.compile(fullgraph=True)``
    traces it.
    """
    kinds = sorted({t.device.type for t in tensors} or {"cpu"})
    active = [kind for kind in kinds if torch.is_autocast_enabled(kind)]
    if not active:
        return contextlib.nullcontext()
    if len(active) == 1:
        return torch.autocast(active[0], enabled=False)
    stack = contextlib.ExitStack()
    for kind in active:
        stack.enter_context(torch.autocast(kind, enabled=False))
    return stack


def plain_tensor(t: Tensor) -> bool:
    """A plain ``Tensor`` or ``Parameter`` (not a ``DTensor`` or another subclass)."""
    return type(t) in (Tensor, torch.nn.Parameter)


def foreach_ok(tensors: Sequence[Tensor]) -> bool:
    """Whether the ``torch._foreach_*`` fast path may be used for these tensors.

    Not when autograd must record a graph through them, nor for ``torch.func`` wrappers (the
    foreach kernels have no batching rules); yes inside ``torch.compile`` (inductor lowers them).
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if torch.compiler.is_compiling():  # inductor lowers foreach ops; dynamo can't trace the probe
        return True
    return not any(is_functorch_wrapped(t) for t in tensors)


def values_readable(t: Tensor) -> bool:
    """Whether reading ``t``'s values costs no device sync and breaks no trace.

    True for plain CPU tensors in eager mode; False under ``torch.compile`` tracing, inside
    ``torch.func`` transforms (batched or gradient-tracking wrappers) and on accelerators.
    """
    if torch.compiler.is_compiling():
        return False
    if is_functorch_wrapped(t) or not plain_tensor(t):
        return False
    return t.device.type == "cpu"


def normalize(x: Tensor, dtype: torch.dtype) -> Tensor:
    """L2-normalise the last axis in ``dtype`` (idempotent up to rounding; a zero row stays 0)."""
    return F.normalize(x.to(dtype), dim=-1)


def zero_neginf(logp: Tensor) -> Tensor:
    """``log p`` with ``-inf`` (p = 0) replaced by 0, so ``p * log p`` and its gradient are 0."""
    return torch.where(torch.isneginf(logp), torch.zeros_like(logp), logp)


def log_msp(z: Tensor) -> Tensor:
    r"""Log of the maximum softmax probability over the last axis: :math:`\max_c z_c - \mathrm{lse}(z)`.

    The one MSP kernel (``scores.msp``, ``scores.mcm``, ``losses.ueo_confidence``). ``z`` is
    already scaled and in its compute dtype.
    """
    return z.amax(dim=-1) - torch.logsumexp(z, dim=-1)


def entropy(z: Tensor, dim: int = -1) -> Tensor:
    r"""Exact Shannon entropy :math:`-\sum_k p_k \log p_k` of ``softmax(z)`` along ``dim``.

    Via log-softmax (no :math:`\epsilon`); a class of probability 0 (logit ``-inf``) contributes
    exactly 0 with a finite gradient. ``z`` is already in its compute dtype.
    """
    logp = torch.log_softmax(z, dim=dim)
    return -(logp.exp() * zero_neginf(logp)).sum(dim)


def kl_rows(teacher: Tensor, student: Tensor) -> Tensor:
    r"""Row-wise :math:`\mathrm{KL}(\mathrm{softmax}(t) \| \mathrm{softmax}(z))` over the last axis.

    Exact via log-softmax; a class the teacher masks (``t = -inf``, :math:`q = 0`) contributes
    exactly 0 (by continuity, :math:`0 \log 0 = 0`), so a masked teacher gives a finite loss with
    a finite gradient. A class the *student* masks where the teacher has mass gives ``+inf``, the
    true KL.
    """
    log_q = torch.log_softmax(teacher, dim=-1)
    log_p = torch.log_softmax(student, dim=-1)
    diff = torch.where(torch.isneginf(log_q), torch.zeros_like(log_q), log_q - log_p)
    return (log_q.exp() * diff).sum(-1)


def energy_gap_rows(features: Tensor, reference: Tensor, texts: Tensor, scale: object) -> Tensor:
    r"""Per-row Lipsum-FT energy gap :math:`\frac{s^2}{2M}\sum_m \langle \hat f - \hat f^0,
    \hat t_m\rangle^2` in :func:`compute_dtype`, autocast off.

    The one kernel of ``losses.energy_gap`` (the regulariser) and ``metrics.energy_gap`` (the
    diagnostic); inputs are raw features (normalised here), ``scale`` a number or a 0-d tensor.
    """
    dtype = compute_dtype(features, reference, texts)
    with full_precision(features, reference, texts):
        delta = normalize(features, dtype) - normalize(reference, dtype)
        inner = delta @ normalize(texts, dtype).T  # [batch, texts]
        s = scale.to(dtype) if isinstance(scale, Tensor) else scale
        return inner.square().sum(-1) * (s**2 / (2 * texts.shape[0]))  # type: ignore[operator]
