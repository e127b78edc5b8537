r"""TPGM: learn one projection radius per tensor on held-out data (post hoc)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from robustft._checks import check_choice, check_int, check_number, describe, fmt_keys
from robustft.projections._balls import NORMS, apply_scale, check_pair, deviation_norms, scale_of
from robustft.typing import Params

__all__ = ["tpgm"]

_MIN_RADIUS = 1e-8


def _clip_(radii: Mapping[str, Tensor], upper: Mapping[str, Tensor]) -> None:
    with torch.no_grad():
        for k, r in radii.items():
            r.clamp_(min=_MIN_RADIUS).clamp_(max=upper[k])


def tpgm(
    params: Params,
    loss_fn: Callable[[dict[str, Tensor]], Tensor],
    *,
    anchor: Params,
    norm: str = "l2",
    steps: int = 200,
    lr: float = 1e-2,
    regularization: float = 0.0,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    r"""Trainable projected gradient method, post hoc: learn per-tensor radii, then project.

    With :math:`\Delta_l = \theta_l - \theta_{0,l}` and the projection of :func:`l2_ball`
    (``norm="l2"``) or :func:`mars_ball` (``norm="mars"``),

    .. math::

        \hat\theta_l(\gamma_l) = \theta_{0,l} + s_l\,\Delta_l, \quad
        s_l = \frac{\gamma_l}{\max(\lVert\Delta_l\rVert, \gamma_l)}, \qquad
        \min_\gamma\; \mathcal{L}_{\mathrm{val}}\big(\hat\theta(\gamma)\big)
        + c\,\frac{1}{L}\sum_l \overline{s_l},

    where :math:`\overline{s_l}` is the mean of :math:`s_l` over tensor :math:`l`'s rows (one value
    for ``l2``). The radii start at :math:`\gamma_l = \tfrac12 \min_{\text{rows}}
    \lVert\Delta_l\rVert` and take ``steps`` Adam steps (learning rate ``lr``) on ``loss_fn``;
    before each use they are clipped (in place, a projected-gradient step) to
    :math:`[10^{-8}, \max_{\text{rows}}\lVert\Delta_l\rVert]`. ``regularization`` :math:`= c > 0`
    is TPGM-C: the penalty on the kept share :math:`s_l` pulls every tensor toward
    :math:`\theta_0` (our definition; the papers publish none). Since :math:`s_l \le 1`, no
    :math:`\lVert\Delta_l\rVert` ever grows.

    Only the radii are trained: ``params`` and ``anchor`` are read through detached views, the
    model is never copied -- ``loss_fn`` typically wraps :func:`torch.func.functional_call` of the
    model over held-out batches. Tensors you do not want projected stay out of the trees (merge
    them inside ``loss_fn``).

    Non-finite losses are skipped and reported: a step whose loss (or any radius gradient) is
    NaN or infinite -- a corrupt validation batch, an overflow -- does not update the radii (nor
    Adam's moments), so one bad batch cannot turn the radii and the projected model into NaN; the
    skipped steps are reported in one ``RuntimeWarning`` at the end. If *every* step is
    skipped, nothing was learned and a ``ValueError`` is raised. This costs one host
    synchronisation per step (a post-hoc loop, not a training hot path).

    Deviation from the official code: the projection scale is capped at 1 (see
    :func:`mars_ball`; with ``norm="mars"`` the official code scales rows inside the radius up).

    Args:
        params: :math:`\theta`, the fine-tuned tree of floating-point tensors.
        loss_fn: ``(projected_params) -> loss``, a 0-d floating tensor differentiable in the
            projected parameters (e.g. the cross-entropy on validation batches).
        anchor: :math:`\theta_0`, the pre-trained tree, keyword-only (same keys, shapes and
            dtypes).
        norm: ``"l2"`` (Frobenius norm per tensor) or ``"mars"`` (L1 norm per output row).
        steps: Adam steps, ``>= 0`` (200 post hoc in the paper).
        lr: Adam's learning rate, ``> 0`` (1e-2).
        regularization: :math:`c \ge 0`; ``> 0`` selects TPGM-C.

    Returns:
        ``(projected, radii)``: the projected tree (new tensors, detached, ``params``' dtypes)
        and the learned clipped radii, a dict of 0-d tensors (at least float32). The same
        projection is ``l2_ball(params, anchor=anchor, radius=radii)`` (or ``mars_ball``).

    Raises:
        TypeError: non-trees, non-floating tensors, a non-callable ``loss_fn``, a ``loss_fn``
            that does not return a 0-d floating tensor, or ``anchor`` passed positionally.
        ValueError: mismatched trees, a non-finite ``params - anchor``, a bad ``norm``,
            ``steps < 0``, a non-finite or non-positive ``lr``, a negative or non-finite
            ``regularization``, a loss without a gradient path to the projected parameters, or
            a non-finite loss at every step.

    Warns:
        RuntimeWarning: when some (not all) steps were skipped for a non-finite loss or radius
            gradient.

    >>> anchor = {"w": torch.zeros(2)}
    >>> params = {"w": torch.tensor([3.0, 4.0])}  # the best point is anchor + 0.2 * delta
    >>> loss = lambda p: ((p["w"] - torch.tensor([0.6, 0.8])) ** 2).sum()
    >>> projected, radii = tpgm(params, loss, anchor=anchor, steps=150, lr=0.05)
    >>> radii["w"].round(decimals=2), projected["w"].round(decimals=2)
    (tensor(1.), tensor([0.6000, 0.8000]))

    References:
        Tian et al., "Trainable Projected Gradient Method for Robust Fine-tuning", CVPR 2023.
        Code: https://github.com/GT-RIPL/TPGM
    """
    check_pair("tpgm", params, anchor)
    if not callable(loss_fn):
        raise TypeError(f"tpgm: loss_fn must be callable, got {describe(loss_fn)}")
    if not isinstance(norm, str):
        raise TypeError(f"tpgm: norm must be one of 'l2', 'mars', got {describe(norm)}")
    kind = check_choice("tpgm", "norm", norm, NORMS)
    n_steps = check_int("tpgm", "steps", steps, low=0)
    rate = check_number("tpgm", "lr", lr, low=0.0, low_inclusive=False)
    c = check_number("tpgm", "regularization", regularization, low=0.0)

    p = {k: v.detach() for k, v in params.items()}
    a = {k: anchor[k].detach() for k in params}
    with torch.no_grad():
        norms = deviation_norms(p, a, kind)
        _check_finite_norms(norms)
        upper = {k: n.max().clamp_min(_MIN_RADIUS) for k, n in norms.items()}
        radii = {k: (n.min() / 2).clone().requires_grad_(True) for k, n in norms.items()}

    skipped: list[int] = []
    if radii and n_steps > 0:
        opt = torch.optim.Adam(list(radii.values()), lr=rate)
        for i in range(n_steps):
            _clip_(radii, upper)
            with torch.enable_grad():
                scales = {k: scale_of(norms[k], r) for k, r in radii.items()}
                projected = {k: apply_scale(a[k], p[k], scales[k], kind) for k in p}
                loss = loss_fn(projected)
                if i == 0:
                    _check_loss(loss)
                if c > 0:
                    kept = torch.stack([s.mean().to(loss.dtype) for s in scales.values()])
                    loss = loss + c * kept.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if _finite_step(loss, radii):
                opt.step()
            else:  # a NaN/inf loss or gradient: keep the radii (and Adam's moments) as they were
                skipped.append(i)
            del projected, scales, loss
        _report_skipped(skipped, n_steps)
    _clip_(radii, upper)
    with torch.no_grad():
        out = {k: apply_scale(a[k], p[k], scale_of(norms[k], radii[k]), kind) for k in p}
    return out, {k: r.detach().clone() for k, r in radii.items()}


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, Tensor) or loss.ndim != 0 or not loss.is_floating_point():
        raise TypeError(f"tpgm: loss_fn must return a 0-d floating tensor, got {describe(loss)}")
    if not loss.requires_grad:
        raise ValueError(
            "tpgm: loss_fn must return a loss differentiable in the projected parameters it is "
            "given, got a tensor without gradient (detached, or computed under torch.no_grad?)"
        )


def _check_finite_norms(norms: Mapping[str, Tensor]) -> None:
    if not norms:
        return
    finite = torch.stack([torch.isfinite(n).all() for n in norms.values()])
    if not bool(finite.all()):
        bad = [k for k, ok in zip(norms, finite.tolist()) if not ok]
        raise ValueError(
            f"tpgm: params - anchor must be finite, got NaN or inf deviations at keys "
            f"{fmt_keys(bad)}"
        )


def _finite_step(loss: Tensor, radii: Mapping[str, Tensor]) -> bool:
    """Whether the loss and every radius gradient are finite (one host synchronisation)."""
    values = [loss.detach().double().reshape(())]
    values += [r.grad.double().reshape(()) for r in radii.values() if r.grad is not None]
    return bool(torch.isfinite(torch.stack(values)).all())


def _report_skipped(skipped: list[int], n_steps: int) -> None:
    if not skipped:
        return
    if len(skipped) == n_steps:
        raise ValueError(
            f"tpgm: loss_fn must return a finite loss with finite radius gradients on some step, "
            f"got NaN or inf on all {n_steps} steps: no radius could be learned"
        )
    warnings.warn(
        f"tpgm: skipped {len(skipped)} of {n_steps} steps whose loss or radius gradient was NaN "
        f"or inf (first at step {skipped[0]}); the radii were not updated on those steps",
        RuntimeWarning,
        stacklevel=3,
    )
