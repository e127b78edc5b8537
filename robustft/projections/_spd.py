r"""SPD: selective projection decay toward the pre-trained weights, as a post-step operation.

The official AdamSPD fuses the decay into Adam's step; here it runs around *any* optimiser's step
in two light passes: :meth:`Spd.prepare` (after ``backward``, before ``optimizer.step()``) reads
the gradient and the pre-step deviation, two numbers per tensor; :meth:`Spd.update_` (after the
step) decays the tensors that qualify toward the anchor, in place. The state holds a reference to
the anchor and those per-tensor numbers, never a copy of the parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple, cast

import torch
from torch import Tensor

from robustft import tree
from robustft._checks import check_floating_tree, check_number, describe, fmt_keys
from robustft._numerics import compute_dtype, foreach_ok, plain_tensor
from robustft.averaging._states import counter, describe_settings, live_cell
from robustft.projections._balls import apply_scale_, check_pair, deviation_norms
from robustft.typing import Params

__all__ = [
    "Spd",
    "SpdState",
    "check_anchor_not_aliased",
    "check_grads",
    "check_projection_state",
    "spd",
]


class SpdState(NamedTuple):
    r"""State of :func:`spd`.

    Attributes:
        step: the ``update``/``update_`` calls made since ``init``, a 0-d int64 CPU tensor.
        anchor: :math:`\theta_0`, the tree given to ``init`` (referenced, not copied: keep it
            unchanged).
        decay: ``None`` until :meth:`Spd.prepare`; then per tensor a 0-d tensor, 1 where the
            selection condition :math:`c_t < 0` holds (the tensor will be decayed), else 0.
        previous_norm: ``None`` until :meth:`Spd.prepare`; then per tensor the pre-step
            deviation :math:`\lVert\theta_{t-1} - \theta_0\rVert_F` (0-d, at least float32).
        settings: the settings of the :func:`spd` that made the state (``kind``,
            ``weight_decay``); a state used by an ``spd`` with other settings raises.
        live: 0-d bool CPU tensor, ``True`` until ``update_`` consumes the state (it then
            returns a new one; the consumed object is refused as stale).

    >>> s = spd(0.5).init({"w": torch.ones(2)}, anchor={"w": torch.zeros(2)})
    >>> int(s.step), s.decay, s.settings["weight_decay"]
    (0, None, 0.5)
    """

    step: Tensor
    anchor: dict[str, Tensor]
    decay: dict[str, Tensor] | None
    previous_norm: dict[str, Tensor] | None
    settings: dict[str, object]
    live: Tensor


class Spd(NamedTuple):
    """Selective projection decay as four functions and no hidden state (see :func:`spd`).

    Attributes:
        init: ``(params, *, anchor) -> state``.
        prepare: ``(state, params, *, grads) -> state``, after ``backward`` and before
            ``optimizer.step()``: records the selection condition and the pre-step deviation.
        update: ``(state, params) -> (new_params, state)``, pure, after the step.
        update_: ``(state, params) -> state``, after the step: writes the decay into
            ``params`` in place.

    >>> s = spd(1.0)
    >>> sorted(s._fields)
    ['init', 'prepare', 'update', 'update_']
    """

    init: Callable[..., SpdState]
    prepare: Callable[..., SpdState]
    update: Callable[[SpdState, Params], tuple[dict[str, Tensor], SpdState]]
    update_: Callable[[SpdState, Params], SpdState]


torch.serialization.add_safe_globals([SpdState])


# ------------------------------------------------------------------ helpers shared with FTP


def check_anchor_not_aliased(fn: str, params: Params, anchor: Params) -> None:
    """``anchor`` must be a copy: an in-place update of ``params`` would otherwise move it too."""
    bad = []
    for k, p in params.items():
        a = anchor[k]
        if p is a or (
            plain_tensor(p)
            and plain_tensor(a)
            and p.numel() > 0
            and p.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
        ):
            bad.append(k)
    if bad:
        raise ValueError(
            f"{fn}: anchor must not share memory with params (clone the pre-trained weights, "
            f"e.g. tree.clone(params, detach=True)), got shared tensors at keys {fmt_keys(bad)}"
        )


def check_grads(fn: str, params: Params, grads: object) -> Params:
    """``grads``: a floating tree with ``params``' keys, shapes and dtypes (``p.grad`` of each)."""
    check_floating_tree(fn, "grads", grads, hint="pass {name: p.grad} of every tensor in params")
    grads = cast(Params, grads)
    tree.check_same_structure(params, grads, what=fn, names=("params", "grads"))
    return grads


def check_projection_state(
    fn: str, state: object, cls: type, settings: Mapping[str, object], made_by: str
) -> None:
    """``state`` is a ``cls`` made with ``settings``, well formed and not stale."""
    if not isinstance(state, cls):
        raise TypeError(
            f"{fn}: state must be the {cls.__name__} returned by {made_by}.init or a previous "
            f"update, got {describe(state)}"
        )
    st = cast(SpdState, state)
    if st.settings != settings:
        raise ValueError(
            f"{fn}: state was made by {describe_settings(st.settings)}, but this one is "
            f"{describe_settings(settings)}; resume with the settings the state was made with"
        )
    ok = (
        isinstance(st.step, Tensor)
        and st.step.ndim == 0
        and st.step.dtype == torch.int64
        and isinstance(st.live, Tensor)
        and st.live.ndim == 0
        and st.live.dtype == torch.bool
        and isinstance(st.anchor, Mapping)
    )
    if not ok:
        raise TypeError(
            f"{fn}: state must be the {cls.__name__} returned by {made_by}.init or a previous "
            f"update, got a malformed one (step={describe(st.step)}, live={describe(st.live)})"
        )
    if not torch.compiler.is_compiling() and not bool(st.live):
        raise ValueError(
            f"{fn}: state is stale: update_ wrote the step into the parameters and returned a "
            f"new state; use the state update_ returned (state = {made_by}.update_(state, ...))"
        )


def mark_consumed(state: SpdState | tuple[object, ...]) -> Tensor:
    """Mark ``state`` stale (its ``live`` cell); return the new owner's live cell."""
    cast(SpdState, state).live.fill_(False)
    return live_cell()


# ------------------------------------------------------------------ SPD kernels


def _condition_and_norm(p: Tensor, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """``(<g, p - a>, ||p - a||_F)`` in the compute dtype, one tensor-sized temporary."""
    acc = compute_dtype(p.dtype)
    d = p - a if p.dtype == acc else p.to(acc).sub_(a)
    norm = torch.linalg.vector_norm(d, dtype=acc)
    inner = d.mul_(g).sum(dtype=acc)
    return inner, norm


def _decay_weight(decay: Tensor, prev: Tensor, curr: Tensor, lam: float) -> Tensor:
    r""":math:`\lambda\,r\,[c_t < 0]`, :math:`r = \mathrm{clip}((n_t - n_{t-1}) / n_t, 0, 1)`,
    branch-free and 0 (not NaN) when :math:`n_t = 0`."""
    prev = prev.to(curr.dtype)
    tiny = torch.finfo(curr.dtype).tiny
    ratio = torch.clamp_min(curr - prev, 0.0) / torch.clamp_min(curr, tiny)
    return torch.clamp_max(ratio, 1.0) * (decay.to(curr.dtype) * lam)


def spd(weight_decay: float) -> Spd:
    r"""Selective projection decay (SPD): decay toward the pre-trained weights, only where needed.

    With :math:`\tilde\theta_t` the parameters the optimiser step just produced from
    :math:`\theta_{t-1}`, :math:`g_t` the gradient it used, per tensor :math:`k`:

    .. math::

        c_{t,k} = -\langle g_{t,k},\, \theta_{t-1,k} - \theta_{0,k}\rangle, \qquad
        r_{t,k} = \mathrm{clip}\!\left(\frac{\lVert\tilde\theta_{t,k} - \theta_{0,k}\rVert_F
        - \lVert\theta_{t-1,k} - \theta_{0,k}\rVert_F}{\lVert\tilde\theta_{t,k} -
        \theta_{0,k}\rVert_F},\, 0,\, 1\right),

    .. math::

        \theta_{t,k} = \tilde\theta_{t,k} - \lambda\, r_{t,k}\, [c_{t,k} < 0]\,
        (\tilde\theta_{t,k} - \theta_{0,k}).

    A tensor is decayed only when its gradient opposes its accumulated progress
    (:math:`c_{t,k} < 0`, the paper's "inconsistent loss reduction") and then only as much as the
    step grew its distance to :math:`\theta_0` (:math:`r` is 0 when the step moved it closer).
    The official code uses exactly this sign; note that for a plain SGD step (the update is
    :math:`-\eta g`) the condition means the step, to first order, moves the tensor *toward*
    :math:`\theta_0`, so :math:`r = 0` unless the step overshoots: the decay acts through
    momentum and Adam's per-coordinate scaling, where the update and the gradient differ.

    Use it around any optimiser (the paper pairs it with Adam, weight decay 0)::

        spd = projections.spd(weight_decay=lam)
        state = spd.init(params, anchor=theta0)
        for batch in loader:
            loss_fn(params, batch).backward()
            state = spd.prepare(state, params, grads={k: p.grad for k, p in params.items()})
            optimizer.step()
            state = spd.update_(state, params)

    ``prepare`` records, per tensor, :math:`[c_t < 0]` and
    :math:`\lVert\theta_{t-1} - \theta_0\rVert_F` (two numbers); ``update_`` measures
    :math:`\lVert\tilde\theta_t - \theta_0\rVert_F` and applies the decay as one
    ``lerp_`` toward the anchor per tensor (one ``torch._foreach_lerp_`` for plain tensors), under
    ``torch.no_grad``. Each pass forms at most one tensor-sized temporary at a time; bf16/fp16
    tensors are measured and decayed in float32. Norms and inner products of sharded
    (``DTensor``) tensors are global. Tensors not decayed are left bit-identical.

    Differences from the official AdamSPD (GT-RIPL): the decay runs after the optimiser's step
    instead of inside Adam's, so it composes with any optimiser -- with ``torch.optim.Adam``
    (``weight_decay=0``) the result is the official AdamSPD's to rounding (tested against a
    reimplementation of it); with ``torch.optim.SGD`` it is the same rule on SGD's step. The
    ratio is written branch-free and is 0 instead of NaN when :math:`\tilde\theta_t = \theta_0`
    exactly. Tensors are selected by the tree you pass (the official code takes param groups and
    skips tensors without a gradient: leave them out of the tree). For LoRA-style adapters whose
    anchor is 0 (the official ``pre=None``), pass a tree of zeros.

    Args:
        weight_decay: :math:`\lambda \ge 0`, the decay strength (a Python or NumPy number;
            ``0`` disables the decay; the paper tunes it per task, e.g. 0.1–1).

    Returns:
        An :class:`Spd` ``(init, prepare, update, update_)``:

        - ``init(params, *, anchor)``: ``params`` the trained tree (floating tensors), ``anchor``
          :math:`\theta_0` with the same keys, shapes and dtypes (a copy: it must not share
          memory with ``params``); returns an :class:`SpdState`.
        - ``prepare(state, params, *, grads)``: ``grads`` the gradients of ``params`` (same
          keys, shapes, dtypes); returns the prepared state. Call it after ``backward`` and
          before ``optimizer.step()``.
        - ``update_(state, params)``: after the step; writes into ``params``, returns the next
          state and marks the consumed one stale.
        - ``update(state, params)``: the pure twin; returns ``(new_params, next_state)``.

    Raises:
        TypeError: a non-number ``weight_decay``; at the calls: non-trees, non-floating tensors,
            differing dtypes, a foreign or malformed state.
        ValueError: a negative, NaN or infinite ``weight_decay``; mismatched keys or shapes, an
            ``anchor`` sharing memory with ``params``, a state made with other settings, a stale
            state, or ``update`` before ``prepare``.

    >>> theta0 = {"w": torch.zeros(2)}
    >>> params = {"w": torch.tensor([3.0, 0.0])}
    >>> decay = spd(0.5)
    >>> state = decay.init(params, anchor=theta0)
    >>> state = decay.prepare(state, params, grads={"w": torch.tensor([1.0, 0.0])})  # c < 0
    >>> params["w"] += torch.tensor([1.0, 0.0])  # a step that moves away from theta0: r = 1/4
    >>> state = decay.update_(state, params)
    >>> params["w"]  # 4 - 0.5 * 0.25 * 4
    tensor([3.5000, 0.0000])

    References:
        Tian et al., "Rethinking Weight Decay for Robust Fine-Tuning of Foundation Models",
        NeurIPS 2024. Code: https://github.com/GT-RIPL/Selective-Projection-Decay
    """
    lam = check_number("spd", "weight_decay", weight_decay, low=0.0)
    settings: dict[str, object] = {"kind": "spd", "weight_decay": lam}

    def init(params: Params, *, anchor: Params) -> SpdState:
        check_pair("spd.init", params, anchor)
        check_anchor_not_aliased("spd.init", params, anchor)
        return SpdState(
            counter(0, torch.int64), dict(anchor), None, None, dict(settings), live_cell()
        )

    def prepare(state: SpdState, params: Params, *, grads: Params) -> SpdState:
        fn = "spd.prepare"
        check_projection_state(fn, state, SpdState, settings, "spd")
        check_pair(fn, params, state.anchor)
        grads = check_grads(fn, params, grads)
        decay, norms = {}, {}
        with torch.no_grad():
            for k, p in params.items():
                inner, norms[k] = _condition_and_norm(p, state.anchor[k], grads[k])
                decay[k] = (inner > 0).to(inner.dtype)  # c = -<g, p - a> < 0
        return SpdState(state.step, state.anchor, decay, norms, state.settings, live_cell())

    def weights(fn: str, state: SpdState, params: Params) -> dict[str, Tensor]:
        check_projection_state(fn, state, SpdState, settings, "spd")
        check_pair(fn, params, state.anchor)
        if state.decay is None or state.previous_norm is None:
            raise ValueError(
                f"{fn}: state must be prepared: call state = spd.prepare(state, params, "
                "grads=grads) after backward and before optimizer.step(), then update"
            )
        if set(state.decay) != set(params) or set(state.previous_norm) != set(params):
            raise ValueError(
                f"{fn}: state was prepared for keys {fmt_keys(state.decay)}, got params with "
                f"keys {fmt_keys(params)}"
            )
        curr = deviation_norms(params, state.anchor, "l2")
        return {
            k: _decay_weight(state.decay[k], state.previous_norm[k], curr[k], lam) for k in params
        }

    def update(state: SpdState, params: Params) -> tuple[dict[str, Tensor], SpdState]:
        fn = "spd.update"
        with torch.no_grad():
            w = weights(fn, state, params)
            out = {}
            for k, p in params.items():
                acc = compute_dtype(p.dtype)
                a = state.anchor[k]
                out[k] = torch.lerp(p.to(acc), a.to(acc), w[k].to(acc)).to(p.dtype)
        step = counter(int(state.step) + 1, torch.int64)
        return out, SpdState(step, state.anchor, None, None, state.settings, live_cell())

    def update_(state: SpdState, params: Params) -> SpdState:
        fn = "spd.update_"
        with torch.no_grad():
            w = weights(fn, state, params)
            fast = [
                k
                for k, p in params.items()
                if plain_tensor(p) and p.dtype == compute_dtype(p.dtype)
            ]
            groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
            for k in fast:
                groups.setdefault((params[k].device, params[k].dtype), []).append(k)
            done = set()
            for keys in groups.values():
                ps = [params[k] for k in keys]
                if foreach_ok(ps):
                    anchors = [state.anchor[k] for k in keys]
                    torch._foreach_lerp_(ps, anchors, [w[k].to(ps[0].dtype) for k in keys])
                    done.update(keys)
            for k, p in params.items():
                if k in done:
                    continue
                a = state.anchor[k]
                if p.dtype == compute_dtype(p.dtype):
                    p.lerp_(a, w[k].to(p.dtype))
                else:  # bf16/fp16: in float32, chunk by chunk
                    apply_scale_(p, a, 1.0 - w[k], "l2")
        step = counter(int(state.step) + 1, torch.int64)
        return SpdState(step, state.anchor, None, None, state.settings, mark_consumed(state))

    return Spd(init, prepare, update, update_)
