r"""FTP: fast trainable projection, per-tensor MARS radii learned online, as a post-step operation.

The official code fuses FTP into its SGD/Adam step; here it runs after any optimiser's step, in
one pass over the tree: the radius of each tensor takes one Adam step on its hyper-gradient (the
new gradient against the previous step's projection direction), then the tensor is projected.
The state holds the anchor (referenced), per-tensor radii and Adam moments, and one
parameter-sized tree, the previous unprojected deviation divided by its row norms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from robustft._checks import check_number, describe
from robustft._numerics import compute_dtype, plain_tensor
from robustft.averaging._states import counter, live_cell
from robustft.projections._balls import _rows, apply_scale, apply_scale_, check_pair
from robustft.projections._spd import (
    check_anchor_not_aliased,
    check_grads,
    check_projection_state,
    mark_consumed,
)
from robustft.typing import Params

__all__ = ["Ftp", "FtpState", "ftp"]

INITIAL_RADIUS = 1e-8
"""The official code's first radius (and the lower clip of every later one)."""

NORM_EPS = 1e-8
"""Added to every row's L1 norm, as the official code does."""


class FtpState(NamedTuple):
    r"""State of :func:`ftp`.

    Attributes:
        step: the updates made since ``init``, a 0-d int64 CPU tensor (the official code's
            ``t - 1``).
        anchor: :math:`\theta_0`, the tree given to ``init`` (referenced, not copied).
        radius: per tensor the current radius :math:`\gamma_k`, a 0-d tensor (at least float32,
            on the tensor's device); :math:`10^{-8}` after ``init``.
        exp_avg: per tensor Adam's first moment of the radius' gradient (0-d).
        exp_avg_sq: per tensor Adam's second moment (0-d).
        direction: per tensor :math:`u_k = c_k / (\lVert c_k\rVert_{1,\mathrm{row}} +
            10^{-8})`, the last step's unprojected deviation :math:`c_k = \tilde\theta_k -
            \theta_{0,k}` divided by its row norms (``params``' shapes and dtypes; zeros after
            ``init``).
        settings: the settings of the :func:`ftp` that made the state (``kind``, ``annealing``,
            ``lr``, ``betas``, ``eps``).
        live: 0-d bool CPU tensor, ``True`` until ``update_`` consumes the state.

    >>> s = ftp().init({"w": torch.ones(2)}, anchor={"w": torch.zeros(2)})
    >>> int(s.step), s.radius, s.direction
    (0, {'w': tensor(1.0000e-08)}, {'w': tensor([0., 0.])})
    """

    step: Tensor
    anchor: dict[str, Tensor]
    radius: dict[str, Tensor]
    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]
    direction: dict[str, Tensor]
    settings: dict[str, object]
    live: Tensor


class Ftp(NamedTuple):
    """Fast trainable projection as three functions and no hidden state (see :func:`ftp`).

    Attributes:
        init: ``(params, *, anchor) -> state``.
        update: ``(state, params, *, grads) -> (new_params, state)``, pure, after the step.
        update_: ``(state, params, *, grads) -> state``, after the step: projects ``params`` in
            place and advances the state's own ``direction`` buffers.

    >>> sorted(ftp()._fields)
    ['init', 'update', 'update_']
    """

    init: Callable[..., FtpState]
    update: Callable[..., tuple[dict[str, Tensor], FtpState]]
    update_: Callable[..., FtpState]


torch.serialization.add_safe_globals([FtpState])


def _check_betas(fn: str, betas: object) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{fn}: betas must be a pair of numbers in [0, 1), got {describe(betas)}")
    b1 = check_number(fn, "betas[0]", betas[0], low=0.0, high=1.0, high_inclusive=False)
    b2 = check_number(fn, "betas[1]", betas[1], low=0.0, high=1.0, high_inclusive=False)
    return b1, b2


def _inner(g: Tensor, u: Tensor, acc: torch.dtype) -> Tensor:
    """``<g, u>`` in ``acc``; no temporary for contiguous plain tensors of the compute dtype."""
    plain = plain_tensor(g) and plain_tensor(u) and g.dtype == u.dtype == acc
    if plain and g.is_contiguous() and u.is_contiguous():
        return torch.dot(g.reshape(-1), u.reshape(-1))
    return (g.to(acc) * u.to(acc)).sum()


def _row_view(s: Tensor, x: Tensor) -> Tensor:
    """A per-row vector ``[rows]`` shaped to broadcast over ``x`` (0-d for 0-d/1-d ``x``)."""
    return s.reshape(x.shape[0], *([1] * (x.ndim - 1))) if x.ndim >= 2 else s.reshape(())


def ftp(
    *,
    annealing: float = 1.0,
    lr: float = 1e-2,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> Ftp:
    r"""Fast trainable projection (FTP): per-tensor MARS radii learned online, after each step.

    After the optimiser's step :math:`\theta_{t-1} \to \tilde\theta_t` (gradient :math:`g_t`
    taken at :math:`\theta_{t-1}`), per tensor :math:`k` with output rows :math:`i` (dim 0; a
    1-d tensor is one row), :math:`c_t = \tilde\theta_t - \theta_0` and
    :math:`n_{t,i} = \lVert c_{t,i}\rVert_1 + 10^{-8}`:

    .. math::

        h_t = \sum_i \frac{\langle g_{t,i},\, c_{t-1,i}\rangle}{n_{t-1,i}}, \qquad
        \hat h_t = \begin{cases} \kappa\, h_t & h_t > 0 \\ h_t & \text{else}\end{cases},

    .. math::

        \gamma_t = \mathrm{clip}\!\Big(\gamma_{t-1} - \mu\,
        \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon},\;
        10^{-8},\; \max_i n_{t,i}\Big), \qquad
        \theta_{t,i} = \theta_{0,i} + \mathrm{clip}\!\Big(\frac{\gamma_t}{n_{t,i}}, 0,
        1\Big)\, c_{t,i},

    with Adam's moments :math:`m_t = \beta_1 m_{t-1} + (1-\beta_1)\hat h_t`,
    :math:`v_t = \beta_2 v_{t-1} + (1-\beta_2)\hat h_t^2` (zero at the start) and
    :math:`\gamma_0 = 10^{-8}`. :math:`h_t` is the derivative of the loss at
    :math:`\theta_{t-1}` with respect to the radius that projected it (the gradient "between
    steps", no extra forward or backward pass); :math:`\kappa` (``annealing``) scales the
    positive hyper-gradients, which shrink the radius. The radius starts at
    :math:`10^{-8}`: the first update projects the tensor almost onto :math:`\theta_0`, and the
    radii then grow as the hyper-gradients ask.

    Use it after any optimiser's step (the official code wraps SGD and Adam)::

        ftp = projections.ftp()
        state = ftp.init(params, anchor=theta0)
        for batch in loader:
            loss_fn(params, batch).backward()
            optimizer.step()
            state = ftp.update_(state, params, grads={k: p.grad for k, p in params.items()})

    ``update_`` runs under ``torch.no_grad``, one tensor at a time: the hyper-gradient reads the
    gradient and the stored direction (no temporary for float32/float64), the new deviation is
    formed in the state's own direction buffer, the projection is one ``lerp_`` per tensor; the
    radii and moments are 0-d tensors on each tensor's device (no host synchronisation).
    bf16/fp16 tensors are processed in float32 with one tensor-sized temporary. The state
    holds one parameter-sized tree (the official code holds the same, its ``prev_c``).

    Differences from the official FTP (GT-RIPL): the projection runs after the optimiser's
    step instead of inside it, so it composes with any optimiser -- with ``torch.optim.SGD``
    and ``torch.optim.Adam``/``AdamW`` the result is the official ``SGDP``/``AdamP``'s to
    rounding (tested against a reimplementation of them). Tensors are keyed by name (the
    official code indexes its buffers by position and skips tensors without a gradient, which
    shifts them); tensors to leave unconstrained stay out of the tree (the official
    ``exclude_set``). We store :math:`c_{t-1}/n_{t-1}` instead of :math:`c_{t-1}` and
    :math:`1/n_{t-1}` separately (the same product) and branch on the sign of :math:`h_t` with
    ``torch.where`` (no host synchronisation).

    Args:
        annealing: :math:`\kappa \ge 0`, the factor on positive radius gradients (the official
            code's ``k``, default 1: no annealing).
        lr: :math:`\mu > 0`, Adam's learning rate for the radii (official 1e-2).
        betas: :math:`(\beta_1, \beta_2)`, each in :math:`[0, 1)` (official (0.9, 0.999)).
        eps: :math:`\epsilon > 0` in Adam's denominator (official 1e-8).

    Returns:
        An :class:`Ftp` ``(init, update, update_)``:

        - ``init(params, *, anchor)``: ``params`` the trained tree (floating tensors),
          ``anchor`` :math:`\theta_0` with the same keys, shapes and dtypes, not sharing memory
          with ``params``; returns an :class:`FtpState`.
        - ``update_(state, params, *, grads)``: after ``optimizer.step()``; ``grads`` the
          gradients the step used (``p.grad``, same keys, shapes and dtypes). Projects
          ``params`` in place, returns the next state and marks the consumed one stale.
        - ``update(state, params, *, grads)``: the pure twin; returns
          ``(new_params, next_state)``.

    Raises:
        TypeError: bad hyper-parameter types; at the calls: non-trees, non-floating tensors,
            differing dtypes, a foreign or malformed state.
        ValueError: hyper-parameters out of range, NaN or infinite; mismatched keys or shapes,
            an ``anchor`` sharing memory with ``params``, a state made with other settings, a
            stale state.

    >>> theta0 = {"w": torch.zeros(1, 2)}
    >>> params = {"w": torch.tensor([[3.0, 1.0]])}  # after a step: c = (3, 1), n = 4
    >>> proj = ftp()
    >>> state = proj.init(params, anchor=theta0)
    >>> state = proj.update_(state, params, grads={"w": torch.ones(1, 2)})
    >>> params["w"]  # the first radius is 1e-8: back onto theta0, to 1e-8
    tensor([[7.5000e-09, 2.5000e-09]])
    >>> state.direction["w"]  # c / n, for the next radius gradient
    tensor([[0.7500, 0.2500]])

    References:
        Tian et al., "Fast Trainable Projection for Robust Fine-Tuning", NeurIPS 2023.
        Code: https://github.com/GT-RIPL/FTP
    """
    kappa = check_number("ftp", "annealing", annealing, low=0.0)
    mu = check_number("ftp", "lr", lr, low=0.0, low_inclusive=False)
    b1, b2 = _check_betas("ftp", betas)
    e = check_number("ftp", "eps", eps, low=0.0, low_inclusive=False)
    settings: dict[str, object] = {
        "kind": "ftp",
        "annealing": kappa,
        "lr": mu,
        "betas": (b1, b2),
        "eps": e,
    }

    def init(params: Params, *, anchor: Params) -> FtpState:
        check_pair("ftp.init", params, anchor)
        check_anchor_not_aliased("ftp.init", params, anchor)
        radius, m, v, direction = {}, {}, {}, {}
        with torch.no_grad():
            for k, p in params.items():
                acc = compute_dtype(p.dtype)
                zero = torch.zeros((), dtype=acc, device=p.device)
                radius[k] = torch.full((), INITIAL_RADIUS, dtype=acc, device=p.device)
                m[k], v[k] = zero, zero.clone()
                direction[k] = torch.zeros_like(p)
        return FtpState(
            counter(0, torch.int64),
            dict(anchor),
            radius,
            m,
            v,
            direction,
            dict(settings),
            live_cell(),
        )

    def radius_step(state: FtpState, k: str, g: Tensor, t: int) -> tuple[Tensor, Tensor, Tensor]:
        """One Adam step on radius k from <g_t, u_{t-1}> (unclipped), and the moments."""
        gam = state.radius[k]
        acc = gam.dtype
        h = _inner(g, state.direction[k], acc)
        h = torch.where(h > 0, h * kappa, h)
        m = state.exp_avg[k] * b1 + (1 - b1) * h
        v = state.exp_avg_sq[k] * b2 + (1 - b2) * h * h
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        return gam - mu * m_hat / (torch.sqrt(v_hat) + e), m, v

    def run(
        fn: str, state: FtpState, params: Params, grads: object, in_place: bool
    ) -> tuple[dict[str, Tensor], FtpState]:
        check_projection_state(fn, state, FtpState, settings, "ftp")
        check_pair(fn, params, state.anchor)
        g_tree = check_grads(fn, params, grads)
        t = int(state.step) + 1  # the official code's t: 1 at the first update
        out, radius, m_new, v_new, direction = {}, {}, {}, {}, {}
        with torch.no_grad():
            for k, p in params.items():
                a = state.anchor[k]
                gam, m_new[k], v_new[k] = radius_step(state, k, g_tree[k], t)
                acc = gam.dtype
                low = p.dtype != acc
                if in_place and not low:
                    c = state.direction[k].copy_(p).sub_(a)  # the deviation, in the buffer
                else:
                    c = p.to(acc) - a.to(acc)
                norms = torch.linalg.vector_norm(_rows(c), ord=1, dim=1, dtype=acc) + NORM_EPS
                denom = norms.reciprocal()
                gam = torch.minimum(torch.clamp_min(gam, INITIAL_RADIUS), norms.amax())
                radius[k] = gam
                scale = torch.clamp(gam * denom, 0.0, 1.0)  # [rows]; 1: the row is left alone
                if low:  # bf16/fp16: projected in float32 (chunk by chunk in place)
                    if in_place:
                        apply_scale_(p, a, scale, "mars")
                    out[k] = p if in_place else apply_scale(a, p, scale, "mars")
                elif not in_place:
                    out[k] = torch.lerp(a, p, _row_view(scale, p))
                elif plain_tensor(p):  # a + s (p - a), exact for s = 1 and precise for tiny s
                    out[k] = torch.lerp(a, p, _row_view(scale, p), out=p)
                else:
                    out[k] = p.copy_(torch.lerp(a, p, _row_view(scale, p)))
                u = c.mul_(_row_view(denom, c))
                if in_place and low:
                    u = state.direction[k].copy_(u)
                direction[k] = u if in_place or not low else u.to(p.dtype)
        live = mark_consumed(state) if in_place else live_cell()
        new_state = FtpState(
            counter(t, torch.int64),
            state.anchor,
            radius,
            m_new,
            v_new,
            direction,
            state.settings,
            live,
        )
        return out, new_state

    def update(
        state: FtpState, params: Params, *, grads: Params
    ) -> tuple[dict[str, Tensor], FtpState]:
        return run("ftp.update", state, params, grads, in_place=False)

    def update_(state: FtpState, params: Params, *, grads: Params) -> FtpState:
        return run("ftp.update_", state, params, grads, in_place=True)[1]

    return Ftp(init, update, update_)
