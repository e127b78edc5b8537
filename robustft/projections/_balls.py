r"""Projections of a fine-tuned tree onto per-tensor balls around the pre-trained one (TPGM).

Each tensor is pulled toward its anchor by the branch-free scale
:math:`s = \gamma / \max(\lVert\Delta\rVert, \gamma)` (= :math:`\min(1, \gamma/\lVert\Delta\rVert)`),
which is 1 inside the ball, finite at :math:`\Delta = 0` and differentiable in :math:`\gamma`.
The norm pass reads both trees without a tree-sized temporary (on CPU, large tensors go through one
small reused buffer chunk by chunk; elsewhere one tensor-sized temporary at a time); the write pass
is one ``torch.lerp`` per tensor.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from robustft import tree
from robustft._checks import (
    check_floating_tree,
    check_per_tensor_scalar,
    describe,
    is_functorch_wrapped,
)
from robustft._numerics import compute_dtype, plain_tensor
from robustft.typing import Params, PerTensor, Scalar

__all__ = [
    "apply_scale",
    "check_pair",
    "deviation_norms",
    "l2_ball",
    "l2_ball_",
    "mars_ball",
    "mars_ball_",
    "scale_of",
]

NORMS = ("l2", "mars")

_CHUNK = 1 << 18
"""Elements per chunk of the fused difference-norm pass (1 MiB of float32: stays in L2 cache)."""

_WRITE_CHUNK = 1 << 16
"""Elements per chunk of the in-place bf16/fp16 rescale (three float32 temporaries: 768 KiB)."""

_OFFICIAL_EPS = 1e-8
"""The official TPGM code's scale is ``radius / (norm + 1e-8)``, uncapped (``cap=False``)."""


def check_pair(fn: str, params: Any, anchor: Any) -> None:
    """Both trees floating-point, with the same keys, shapes and dtypes."""
    check_floating_tree(fn, "params", params)
    check_floating_tree(fn, "anchor", anchor)
    tree.check_same_structure(anchor, params, what=fn, names=("anchor", "params"))


def _check_radius(fn: str, radius: Any, keys: list[str], cap: bool) -> Any:
    """``radius >= 0`` per tensor; ``inf`` (no constraint) only for the capped projection."""
    r = check_per_tensor_scalar(fn, "radius", radius, keys, low=0.0, finite=not cap)
    return r


def _check_cap(fn: str, cap: Any) -> bool:
    if not isinstance(cap, bool):
        raise TypeError(f"{fn}: cap must be a bool, got {describe(cap)}")
    return cap


def _rows(x: Tensor) -> Tensor:
    """``[rows, -1]``: dim 0 is the output row; a 0-d or 1-d tensor is one row."""
    return x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)


def _norm(d: Tensor, kind: str, acc: torch.dtype) -> Tensor:
    if kind == "l2":
        return torch.linalg.vector_norm(d, dtype=acc)
    return torch.linalg.vector_norm(_rows(d), ord=1, dim=1, dtype=acc)


def _fused_ok(p: Tensor, a: Tensor) -> bool:
    if torch.compiler.is_compiling():  # the compiler fuses p - a into the norm by itself
        return False
    if (
        not (plain_tensor(p) and plain_tensor(a))
        or is_functorch_wrapped(p)
        or is_functorch_wrapped(a)
    ):
        return False
    if torch.is_grad_enabled() and (p.requires_grad or a.requires_grad):
        return False
    # CPU only: on accelerators a chunk loop costs launches, and the caching allocator makes the
    # one-tensor temporary of ``p - a`` cheap
    return p.device.type == "cpu" and p.is_contiguous() and a.is_contiguous() and p.numel() > _CHUNK


def _fused_norm(p: Tensor, a: Tensor, kind: str, acc: torch.dtype) -> Tensor:
    """The norm of ``p - a`` through a reused chunk buffer (no tensor-sized temporary)."""
    pr, ar = (p.reshape(-1, 1), a.reshape(-1, 1)) if kind == "l2" else (_rows(p), _rows(a))
    rows, width = pr.shape
    # low precision: a quarter of the elements, as widening ``a`` for the subtraction costs one
    # more float32 chunk
    step = max(1, (_CHUNK if p.dtype == acc else _CHUNK // 4) // width)
    # the buffer is in the compute dtype: a bf16 chunk is widened into it (and the difference
    # taken in float32), so the norm reads it without converting a copy
    buf = torch.empty(min(rows, step) * width, dtype=acc, device=p.device)
    parts = []
    for i in range(0, rows, step):
        j = min(i + step, rows)
        d = buf[: (j - i) * width].view(j - i, width)
        if p.dtype == acc:
            torch.sub(pr[i:j], ar[i:j], out=d)
        else:
            d.copy_(pr[i:j]).sub_(ar[i:j])
        if kind == "l2":
            parts.append(torch.linalg.vector_norm(d, dtype=acc).reshape(1))
        else:  # the buffer is ours: abs_ + sum is ~3x faster than vector_norm(ord=1) on CPU
            parts.append(d.abs_().sum(dim=1))
    out = torch.cat(parts)
    return torch.linalg.vector_norm(out) if kind == "l2" else out


def deviation_norms(params: Params, anchor: Params, kind: str) -> dict[str, Tensor]:
    """Per key: ``l2`` the Frobenius norm of ``params - anchor`` (0-d), ``mars`` the L1 norm of
    each output row (``[rows]``); in at least float32; global for sharded tensors."""
    out = {}
    for k, p in params.items():
        a = anchor[k]
        acc = compute_dtype(p.dtype)
        if _fused_ok(p, a):
            out[k] = _fused_norm(p, a, kind, acc)
        else:  # bf16/fp16: the difference in float32, as the fused pass takes it
            out[k] = _norm(p - a if p.dtype == acc else p.to(acc) - a.to(acc), kind, acc)
    return out


def scale_of(norm: Tensor, radius: Any, *, cap: bool = True) -> Tensor:
    r"""The scale of the deviation: :math:`\gamma / \max(n, \gamma)` (``cap``) or the official
    TPGM code's uncapped :math:`\gamma / (n + 10^{-8})`.

    Capped, the denominator is kept above the dtype's ``tiny`` (``n = \gamma = 0`` gives 0, with
    finite gradients), an infinite Python radius gives exactly 1, and a Python radius above the
    norm dtype's largest finite value is clamped to it (same scale, no ``inf / inf``). A tensor
    radius is used in the wider of its and the norm's dtype (a float64 ``1e39`` stays finite).
    """
    if isinstance(radius, Tensor):
        dt = torch.promote_types(norm.dtype, radius.dtype)
        n, rt = norm.to(dt), radius.to(device=norm.device, dtype=dt)
        if not cap:
            return rt / (n + _OFFICIAL_EPS)
        return rt / torch.clamp_min(torch.maximum(n, rt), torch.finfo(dt).tiny)
    r = float(radius)
    if not cap:
        return torch.full_like(norm, r) / (norm + _OFFICIAL_EPS)
    if math.isinf(r):
        return torch.ones_like(norm)
    info = torch.finfo(norm.dtype)
    r = min(r, float(info.max))
    # a tensor numerator: ``float / tensor`` would multiply by a reciprocal (s = 1 not exact)
    return torch.full_like(norm, r) / torch.clamp_min(norm, max(r, float(info.tiny)))


def _row_scale(s: Tensor, p: Tensor, kind: str) -> Tensor:
    """``s`` shaped to broadcast over ``p``: 0-d (l2), ``[rows, 1, ...]`` (mars)."""
    if kind == "mars":
        return s.reshape(p.shape[0], *([1] * (p.ndim - 1))) if p.ndim >= 2 else s.reshape(())
    return s


def apply_scale(a: Tensor, p: Tensor, s: Tensor, kind: str) -> Tensor:
    """``a + s * (p - a)`` as one ``torch.lerp``; ``s`` is 0-d (l2) or per row (mars)."""
    s = _row_scale(s, p, kind)
    acc = compute_dtype(a.dtype)
    if acc != a.dtype:  # bf16/fp16: a bf16 scale would miss the sphere by ~0.4 %
        return torch.lerp(a.to(acc), p.to(acc), s.to(acc)).to(a.dtype)
    return torch.lerp(a, p, s.to(a.dtype))


def _chunks_ok(p: Tensor, a: Tensor) -> bool:
    """Whether the in-place low-precision write may go chunk by chunk through flat views."""
    if torch.compiler.is_compiling():
        return False
    return (
        plain_tensor(p)
        and plain_tensor(a)
        and not is_functorch_wrapped(p)
        and not is_functorch_wrapped(a)
        and p.is_contiguous()
        and a.is_contiguous()
    )


def apply_scale_(p: Tensor, a: Tensor, s: Tensor, kind: str) -> None:
    """``p <- a + s * (p - a)`` in place; at most one chunk (or one tensor) of temporaries.

    float32/float64: ``p.lerp_(a, 1 - s)``, no temporary, and exact where ``s = 1`` (inside the
    ball). bf16/fp16: computed in float32 like :func:`apply_scale`, chunk by chunk
    (``_WRITE_CHUNK`` elements, whole rows for ``mars``) through flat views of contiguous tensors, else through
    one tensor-sized float32 temporary.
    """
    acc = compute_dtype(p.dtype)
    if acc == p.dtype:
        w = 1 - _row_scale(s, p, kind).to(device=p.device, dtype=acc)
        p.lerp_(a, w)
        return
    if not _chunks_ok(p, a) or p.numel() <= _WRITE_CHUNK:
        p.copy_(apply_scale(a, p, s, kind))
        return
    if kind == "l2":
        pr, ar, sr = p.view(-1, 1), a.view(-1, 1), s.to(acc).reshape(1, 1).expand(p.numel(), 1)
    else:
        pr, ar, sr = _rows(p), _rows(a), s.to(acc).reshape(-1, 1)
    rows, width = pr.shape
    step = max(1, _WRITE_CHUNK // width)
    for i in range(0, rows, step):
        j = min(i + step, rows)
        seg = pr[i:j]
        seg.copy_(torch.lerp(ar[i:j].to(acc), seg.to(acc), sr[i:j]))


def _project(
    fn: str, kind: str, params: Params, anchor: Params, radius: Any, cap: bool = True
) -> dict[str, Tensor]:
    check_pair(fn, params, anchor)
    cap = _check_cap(fn, cap)
    radii = _check_radius(fn, radius, list(params), cap)
    norms = deviation_norms(params, anchor, kind)
    out = {}
    for k, p in params.items():
        r = radii[k] if isinstance(radii, dict) else radii
        out[k] = apply_scale(anchor[k], p, scale_of(norms[k], r, cap=cap), kind)
    return out


def _project_(
    fn: str, kind: str, params: Params, anchor: Params, radius: Any, cap: bool = True
) -> Params:
    check_pair(fn, params, anchor)
    cap = _check_cap(fn, cap)
    radii = _check_radius(fn, radius, list(params), cap)
    with torch.no_grad():
        for k, p in params.items():
            a = anchor[k]
            r = radii[k] if isinstance(radii, dict) else radii
            if not cap or not isinstance(r, float) or not math.isinf(r):
                norm = deviation_norms({k: p}, {k: a}, kind)[k]
                apply_scale_(p, a, scale_of(norm, r, cap=cap), kind)
    return params


def l2_ball(params: Params, *, anchor: Params, radius: PerTensor[Scalar]) -> dict[str, Tensor]:
    r"""Project every tensor onto the Frobenius ball of radius :math:`\gamma_k` around the anchor.

    .. math::

        \hat\theta_k = \theta_{0,k} + \frac{\gamma_k}{\max(\lVert\Delta_k\rVert_F, \gamma_k)}
        \,\Delta_k, \qquad \Delta_k = \theta_k - \theta_{0,k},

    i.e. :math:`\theta_{0,k} + \min(1, \gamma_k/\lVert\Delta_k\rVert_F)\,\Delta_k` written without a
    branch: tensors inside the ball are returned exactly, the others land on its sphere. The
    gradient is finite everywhere, also at :math:`\Delta_k = 0` and with respect to a tensor
    radius. Norms of sharded (``DTensor``) trees are global. Runs in two passes over the trees
    (norms, then one lerp per tensor); bf16/fp16 tensors are scaled in float32. For a projection
    after every optimiser step, :func:`l2_ball_` writes into ``params`` instead.

    Args:
        params: :math:`\theta`, the fine-tuned tree of floating-point tensors.
        anchor: :math:`\theta_0`, the pre-trained tree, keyword-only (same keys, shapes and
            dtypes).
        radius: :math:`\gamma \ge 0`: a real number (Python or NumPy; ``inf`` means no
            constraint and returns the tensor exactly, a finite value beyond the norm dtype's
            range acts like ``inf``), a 0-d floating tensor (values not read, so it may carry
            gradients; keep it finite), or a dict of them with exactly the trees' keys. ``0``
            returns the anchor.

    Returns:
        A new tree with ``params``' keys, shapes and dtypes (inputs untouched).

    Raises:
        TypeError: non-trees, non-floating tensors, differing dtypes, a bad ``radius`` type, or
            ``anchor`` passed positionally.
        ValueError: different keys or shapes, a negative or NaN radius, a ``radius`` dict with
            other keys.

    >>> l2_ball({"w": torch.tensor([3.0, 4.0])}, anchor={"w": torch.zeros(2)}, radius=1.0)
    {'w': tensor([0.6000, 0.8000])}

    References:
        Tian et al., "Trainable Projected Gradient Method for Robust Fine-tuning", CVPR 2023.
        Code: https://github.com/GT-RIPL/TPGM
    """
    return _project("l2_ball", "l2", params, anchor, radius)


def l2_ball_(params: Params, *, anchor: Params, radius: PerTensor[Scalar]) -> Params:
    r"""In place: :func:`l2_ball` written into ``params``' own tensors; returns ``params``.

    For the online use (a projection after every optimiser step, as TPGM's projected gradient
    method does): the same values as :func:`l2_ball` (exactly inside the ball, to rounding on the
    sphere) with no parameter-sized temporary. Runs under ``torch.no_grad`` (``params`` may be
    a model's ``nn.Parameter`` leaves), one tensor at a time: float32/float64 tensors are
    updated by one ``lerp_`` after the norm pass (which, on CPU, reads large tensors through
    one reused 1 MiB buffer; elsewhere it forms ``params[k] - anchor[k]`` once), so the extra
    memory is at most one tensor; bf16/fp16 tensors are rescaled in float32 chunk by chunk.
    Tensors with an infinite radius are not touched.

    .. math::

        \theta_k \leftarrow \theta_{0,k} + \frac{\gamma_k}{\max(\lVert\theta_k -
        \theta_{0,k}\rVert_F, \gamma_k)}\,(\theta_k - \theta_{0,k})

    Args:
        params: :math:`\theta`, written in place (floating-point tensors).
        anchor: :math:`\theta_0`, keyword-only (same keys, shapes and dtypes); only read.
        radius: :math:`\gamma \ge 0`: a real number (Python or NumPy; ``inf`` means no
            constraint and returns the tensor exactly, a finite value beyond the norm dtype's
            range acts like ``inf``), a 0-d floating tensor (values not read, so it may carry
            gradients; keep it finite), or a dict of them with exactly the trees' keys. ``0``
            returns the anchor.

    Returns:
        ``params`` itself.

    Raises:
        TypeError: as :func:`l2_ball`.
        ValueError: as :func:`l2_ball`.

    >>> p = {"w": torch.tensor([3.0, 4.0])}
    >>> _ = l2_ball_(p, anchor={"w": torch.zeros(2)}, radius=1.0)
    >>> p
    {'w': tensor([0.6000, 0.8000])}

    References:
        Tian et al., "Trainable Projected Gradient Method for Robust Fine-tuning", CVPR 2023.
        Code: https://github.com/GT-RIPL/TPGM
    """
    return _project_("l2_ball_", "l2", params, anchor, radius)


def mars_ball(
    params: Params, *, anchor: Params, radius: PerTensor[Scalar], cap: bool = True
) -> dict[str, Tensor]:
    r"""Project every output row onto the L1 ball of its tensor's radius (TPGM's MARS norm).

    .. math::

        \hat\theta_{k,i} = \theta_{0,k,i} + \frac{\gamma_k}{\max(\lVert\Delta_{k,i}\rVert_1,
        \gamma_k)}\,\Delta_{k,i}, \qquad \Delta_{k,i} = \theta_{k,i} - \theta_{0,k,i},

    where :math:`i` runs over the output rows (dim 0; a 0-d or 1-d tensor is one row) and all rows
    of tensor :math:`k` share :math:`\gamma_k`. Rows inside the ball are returned exactly. As
    :func:`l2_ball` otherwise (branch-free, finite gradients, global norms when sharded).

    Deviation from the official code: our scale is capped at 1, so a row inside the ball is left
    alone. The official TPGM code uses :math:`\gamma_k / (\lVert\Delta_{k,i}\rVert_1 + 10^{-8})`
    uncapped, which scales rows inside the radius *up* onto the sphere; ``cap=False`` computes
    exactly that (then not a projection, and the radius must be finite).

    Args:
        params: :math:`\theta`, the fine-tuned tree of floating-point tensors.
        anchor: :math:`\theta_0`, the pre-trained tree, keyword-only (same keys, shapes and
            dtypes).
        radius: :math:`\gamma \ge 0`: a real number (Python or NumPy; ``inf`` means no
            constraint and returns the tensor exactly, a finite value beyond the norm dtype's
            range acts like ``inf``), a 0-d floating tensor (values not read, so it may carry
            gradients; keep it finite), or a dict of them with exactly the trees' keys. ``0``
            returns the anchor.
        cap: ``True`` (default) caps the scale at 1; ``False`` is the official code's uncapped
            scale.

    Returns:
        A new tree with ``params``' keys, shapes and dtypes (inputs untouched).

    Raises:
        TypeError: non-trees, non-floating tensors, differing dtypes, a bad ``radius`` or
            ``cap`` type, or ``anchor`` passed positionally.
        ValueError: different keys or shapes, a negative or NaN radius (or an infinite one with
            ``cap=False``), a ``radius`` dict with other keys.

    >>> mars_ball({"w": torch.tensor([[3.0, -1.0], [0.5, 0.0]])}, anchor={"w": torch.zeros(2, 2)},
    ...           radius=1.0)
    {'w': tensor([[ 0.7500, -0.2500],
            [ 0.5000,  0.0000]])}

    References:
        Tian et al., "Trainable Projected Gradient Method for Robust Fine-tuning", CVPR 2023;
        MARS: Gouk et al., "Distance-Based Regularisation of Deep Networks for Fine-Tuning",
        ICLR 2021. Code: https://github.com/GT-RIPL/TPGM
    """
    return _project("mars_ball", "mars", params, anchor, radius, cap)


def mars_ball_(
    params: Params, *, anchor: Params, radius: PerTensor[Scalar], cap: bool = True
) -> Params:
    r"""In place: :func:`mars_ball` written into ``params``' own tensors; returns ``params``.

    The per-step form of :func:`mars_ball`, with the memory behaviour of :func:`l2_ball_` (under
    ``torch.no_grad``; at most one tensor-sized temporary, none for float32/float64 tensors
    beyond the norm pass).

    .. math::

        \theta_{k,i} \leftarrow \theta_{0,k,i} + \frac{\gamma_k}{\max(\lVert\theta_{k,i} -
        \theta_{0,k,i}\rVert_1, \gamma_k)}\,(\theta_{k,i} - \theta_{0,k,i})

    Args:
        params: :math:`\theta`, written in place (floating-point tensors).
        anchor: :math:`\theta_0`, keyword-only (same keys, shapes and dtypes); only read.
        radius: :math:`\gamma \ge 0`: a real number (Python or NumPy; ``inf`` means no
            constraint and returns the tensor exactly, a finite value beyond the norm dtype's
            range acts like ``inf``), a 0-d floating tensor (values not read, so it may carry
            gradients; keep it finite), or a dict of them with exactly the trees' keys. ``0``
            returns the anchor.
        cap: as in :func:`mars_ball` (``False``: the official code's uncapped scale).

    Returns:
        ``params`` itself.

    Raises:
        TypeError: as :func:`mars_ball`.
        ValueError: as :func:`mars_ball`.

    >>> p = {"w": torch.tensor([[3.0, -1.0], [0.5, 0.0]])}
    >>> _ = mars_ball_(p, anchor={"w": torch.zeros(2, 2)}, radius=1.0)
    >>> p["w"]
    tensor([[ 0.7500, -0.2500],
            [ 0.5000,  0.0000]])

    References:
        Tian et al., "Trainable Projected Gradient Method for Robust Fine-tuning", CVPR 2023.
        Code: https://github.com/GT-RIPL/TPGM
    """
    return _project_("mars_ball_", "mars", params, anchor, radius, cap)
