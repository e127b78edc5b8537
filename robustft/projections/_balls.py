r"""Projections of a fine-tuned tree onto per-tensor balls around the pre-trained one (TPGM).

Each tensor is pulled toward its anchor by the branch-free scale
:math:`s = \gamma / \max(\lVert\Delta\rVert, \gamma)` (= :math:`\min(1, \gamma/\lVert\Delta\rVert)`),
which is 1 inside the ball, finite at :math:`\Delta = 0` and differentiable in :math:`\gamma`.
The norm pass reads both trees without a tree-sized temporary (on CPU, large tensors go through one
small reused buffer chunk by chunk; elsewhere one tensor-sized temporary at a time); the write pass
is one ``torch.lerp`` per tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from robustft import tree
from robustft._checks import check_number, check_per_tensor, describe, is_functorch_wrapped

__all__ = ["apply_scale", "check_trees", "deviation_norms", "l2_ball", "mars_ball", "scale_of"]

NORMS = ("l2", "mars")

_CHUNK = 1 << 18
"""Elements per chunk of the fused difference-norm pass (1 MiB of float32: stays in L2 cache)."""


def check_trees(fn: str, anchor: Any, params: Any) -> None:
    """Same keys, shapes and dtypes, floating-point only."""
    tree.check_same_structure(anchor, params, what=fn, names=("anchor", "params"))
    bad = [k for k, v in anchor.items() if not v.is_floating_point()]
    if bad:
        raise TypeError(
            f"{fn}: anchor and params must hold floating-point tensors, got "
            f"{anchor[bad[0]].dtype} at keys {sorted(bad)[:10]!r}"
        )


def _check_radius(fn: str, radius: Any, keys: list[str]) -> None:
    def one(name: str, value: Any) -> None:
        if isinstance(value, Tensor):
            if value.ndim != 0 or not value.is_floating_point():
                raise TypeError(
                    f"{fn}: {name} must be a real number >= 0 or a 0-d floating tensor, got "
                    f"{describe(value)}"
                )
            return
        r = check_number(fn, name, value, low=0.0)
        if r == float("inf"):
            raise ValueError(f"{fn}: {name} must be a finite number >= 0, got {value!r}")

    if isinstance(radius, Mapping):
        check_per_tensor(fn, "radius", radius, keys)
        for k in keys:
            one(f"radius[{k!r}]", radius[k])
    else:
        one("radius", radius)


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
        type(p) is not Tensor
        or type(a) is not Tensor
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
    step = max(1, _CHUNK // width)
    buf = torch.empty(min(rows, step) * width, dtype=p.dtype, device=p.device)
    parts = []
    for i in range(0, rows, step):
        j = min(i + step, rows)
        d = torch.sub(pr[i:j], ar[i:j], out=buf[: (j - i) * width].view(j - i, width))
        if kind == "l2":
            parts.append(torch.linalg.vector_norm(d, dtype=acc).reshape(1))
        else:
            parts.append(torch.linalg.vector_norm(d, ord=1, dim=1, dtype=acc))
    out = torch.cat(parts)
    return torch.linalg.vector_norm(out) if kind == "l2" else out


def deviation_norms(
    params: Mapping[str, Tensor], anchor: Mapping[str, Tensor], kind: str
) -> dict[str, Tensor]:
    """Per key: ``l2`` the Frobenius norm of ``params - anchor`` (0-d), ``mars`` the L1 norm of
    each output row (``[rows]``); in at least float32; global for sharded tensors."""
    out = {}
    for k, p in params.items():
        a = anchor[k]
        acc = tree.accumulation_dtype(p.dtype)
        out[k] = _fused_norm(p, a, kind, acc) if _fused_ok(p, a) else _norm(p - a, kind, acc)
    return out


def scale_of(norm: Tensor, radius: Any) -> Tensor:
    r""":math:`\gamma / \max(n, \gamma)`, with the denominator kept above the dtype's ``tiny``."""
    tiny = torch.finfo(norm.dtype).tiny
    if isinstance(radius, Tensor):
        r = radius.to(norm.dtype)
        return r / torch.clamp_min(torch.maximum(norm, r), tiny)
    # a tensor numerator: ``float / tensor`` would multiply by a reciprocal (s = 1 not exact)
    r = torch.full_like(norm, float(radius))
    return r / torch.clamp_min(norm, max(float(radius), tiny))


def apply_scale(a: Tensor, p: Tensor, s: Tensor, kind: str) -> Tensor:
    """``a + s * (p - a)`` as one ``torch.lerp``; ``s`` is 0-d (l2) or per row (mars)."""
    if kind == "mars":
        s = s.reshape(p.shape[0], *([1] * (p.ndim - 1))) if p.ndim >= 2 else s.reshape(())
    acc = tree.accumulation_dtype(a.dtype)
    if acc != a.dtype:  # bf16/fp16: a bf16 scale would miss the sphere by ~0.4 %
        return torch.lerp(a.to(acc), p.to(acc), s.to(acc)).to(a.dtype)
    return torch.lerp(a, p, s.to(a.dtype))


def _project(
    fn: str, kind: str, params: Mapping[str, Tensor], anchor: Mapping[str, Tensor], radius: Any
) -> dict[str, Tensor]:
    check_trees(fn, anchor, params)
    _check_radius(fn, radius, list(anchor))
    norms = deviation_norms(params, anchor, kind)
    out = {}
    for k, p in params.items():
        r = radius[k] if isinstance(radius, Mapping) else radius
        out[k] = apply_scale(anchor[k], p, scale_of(norms[k], r), kind)
    return out


def l2_ball(
    params: Mapping[str, Tensor], anchor: Mapping[str, Tensor], *, radius: Any
) -> dict[str, Tensor]:
    r"""Project every tensor onto the Frobenius ball of radius :math:`\gamma_k` around the anchor.

    .. math::

        \hat\theta_k = \theta_{0,k} + \frac{\gamma_k}{\max(\lVert\Delta_k\rVert_F, \gamma_k)}
        \,\Delta_k, \qquad \Delta_k = \theta_k - \theta_{0,k},

    i.e. :math:`\theta_{0,k} + \min(1, \gamma_k/\lVert\Delta_k\rVert_F)\,\Delta_k` written without a
    branch: tensors inside the ball are returned exactly, the others land on its sphere. The
    gradient is finite everywhere, also at :math:`\Delta_k = 0` and with respect to a tensor
    radius. Norms of sharded (``DTensor``) trees are global. Runs in two passes over the trees
    (norms, then one lerp per tensor); bf16/fp16 tensors are scaled in float32.

    Args:
        params: :math:`\theta`, the fine-tuned tree.
        anchor: :math:`\theta_0`, the pre-trained tree (same keys, shapes and dtypes).
        radius: :math:`\gamma \ge 0`: a finite real number, a 0-d floating tensor (not
            value-checked, so it may carry gradients), or a dict of them with the trees' keys.
            ``0`` returns the anchor.

    Returns:
        A new tree with ``params``' keys, shapes and dtypes (inputs untouched).

    Raises:
        TypeError: non-trees, non-floating tensors, differing dtypes, a bad ``radius`` type.
        ValueError: different keys or shapes, a negative or infinite radius, a ``radius`` dict
            with other keys.

    >>> l2_ball({"w": torch.tensor([3.0, 4.0])}, {"w": torch.zeros(2)}, radius=1.0)
    {'w': tensor([0.6000, 0.8000])}

    References:
        Tian et al., "Trainable Projected Gradient Method for Robust Fine-tuning", CVPR 2023.
        Code: https://github.com/GT-RIPL/TPGM
    """
    return _project("l2_ball", "l2", params, anchor, radius)


def mars_ball(
    params: Mapping[str, Tensor], anchor: Mapping[str, Tensor], *, radius: Any
) -> dict[str, Tensor]:
    r"""Project every output row onto the L1 ball of its tensor's radius (TPGM's MARS norm).

    .. math::

        \hat\theta_{k,i} = \theta_{0,k,i} + \frac{\gamma_k}{\max(\lVert\Delta_{k,i}\rVert_1,
        \gamma_k)}\,\Delta_{k,i}, \qquad \Delta_{k,i} = \theta_{k,i} - \theta_{0,k,i},

    where :math:`i` runs over the output rows (dim 0; a 0-d or 1-d tensor is one row) and all rows
    of tensor :math:`k` share :math:`\gamma_k`. Rows inside the ball are returned exactly. As
    :func:`l2_ball` otherwise (branch-free, finite gradients, global norms when sharded).

    Args:
        params: :math:`\theta`, the fine-tuned tree.
        anchor: :math:`\theta_0`, the pre-trained tree (same keys, shapes and dtypes).
        radius: :math:`\gamma \ge 0`: a finite real number, a 0-d floating tensor, or a dict of
            them with the trees' keys.

    Returns:
        A new tree with ``params``' keys, shapes and dtypes (inputs untouched).

    Raises:
        TypeError: non-trees, non-floating tensors, differing dtypes, a bad ``radius`` type.
        ValueError: different keys or shapes, a negative or infinite radius, a ``radius`` dict
            with other keys.

    >>> mars_ball({"w": torch.tensor([[3.0, -1.0], [0.5, 0.0]])}, {"w": torch.zeros(2, 2)}, radius=1.0)
    {'w': tensor([[ 0.7500, -0.2500],
            [ 0.5000,  0.0000]])}

    References:
        Tian et al., "Trainable Projected Gradient Method for Robust Fine-tuning", CVPR 2023;
        MARS: Gouk et al., "Distance-Based Regularisation of Deep Networks for Fine-Tuning",
        ICLR 2021. Code: https://github.com/GT-RIPL/TPGM
    """
    return _project("mars_ball", "mars", params, anchor, radius)
