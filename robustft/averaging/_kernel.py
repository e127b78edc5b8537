r"""The one stateless kernel every running average shares: a lerp with a time-varying weight.

EMA, the Beta moving average and the uniform average differ only in the weight :math:`w_t` they
fold the new iterate in with,

.. math:: \bar\theta \leftarrow \bar\theta + w_t\,(\theta_t - \bar\theta),

so they all call :func:`fold` (pure) or :meth:`PlanCache.fold_` (in place). Eager weights are
Python floats computed on the host: no device synchronisation per step. Under ``torch.compile`` the weight is a
0-d tensor (:func:`fold_traced_`), so a weight that changes every step is a graph input, not a
constant dynamo would specialise (and recompile) on.

The averagers' in-place path validates a ``params`` tree once per *structure*, not per call: a
:class:`PlanCache` remembers, per accumulator tree, the checked ``params`` (weak references to
its tensors, its key order), the ``(type, device, dtype)`` groups and the aliasing verdict, and a
later call with the very same tensor objects under the same keys only compares identities (a
C-level pass, ~50 ns per tensor) before running one ``torch._foreach_lerp_`` per group. Any other
tree is validated in full, with the same errors.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import Tensor

from robustft import tree
from robustft._checks import check_floating_tree
from robustft._numerics import compute_dtype, foreach_ok, plain_tensor
from robustft.typing import Device, Params

__all__ = [
    "PlanCache",
    "check_pair",
    "check_params",
    "fold",
    "fold_traced",
    "fold_traced_",
    "make_average",
]

_INT_BUFFER_HINT = (
    "integer and bool buffers (e.g. BatchNorm's num_batches_tracked) cannot be averaged: leave "
    "them out (robustft.tree.partition) and copy them yourself"
)


def check_params(fn: str, params: object, name: str = "params") -> Params:
    """Check ``params`` is a tree of floating-point tensors (integer/bool buffers are rejected)."""
    return check_floating_tree(fn, name, params, hint=_INT_BUFFER_HINT)


def check_pair(fn: str, average: Params, params: object) -> Params:
    """Check ``params`` against the accumulator tree: floating, same keys, same shapes."""
    params = check_params(fn, params)
    tree.check_same_structure(
        average, params, what=fn, names=("state.average", "params"), dtypes=False
    )
    return params


def make_average(params: Params, dtype: torch.dtype, device: Device) -> dict[str, Tensor]:
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


def fold(average: Params, params: Params, weight: float, *, fn: str) -> dict[str, Tensor]:
    r"""Pure kernel: a new tree :math:`\bar\theta + w\,(\theta - \bar\theta)`; inputs untouched.

    ``params`` is converted to each accumulator's dtype and device first. Tensors sharing type,
    device and dtype with their accumulator go through one ``torch._foreach_lerp`` per group.
    """
    check_pair(fn, average, params)
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


def _storage_key(t: Tensor) -> tuple[Any, int] | None:
    """``(device, base address)`` of a plain tensor's storage; ``None`` where there is none."""
    if not plain_tensor(t) or t.device.type == "meta" or t.numel() == 0:
        return None
    return (t.device, t.untyped_storage().data_ptr())


def _same_view(a: Tensor, b: Tensor) -> bool:
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def _aliased(avg_vals: list[Tensor], param_vals: list[Tensor]) -> list[int]:
    """Positions of ``param_vals`` that share memory with an accumulator in a way that matters.

    An in-place update of accumulator ``j`` would change what a later read of such a parameter
    sees (a view of another accumulator, a partial overlap), so the pure and in-place paths
    would disagree: those parameters are copied before the update. A parameter that *is* its own
    accumulator's view (``update_(state, state.average)``) is safe (an elementwise lerp of a tensor
    with itself) unless another parameter also aliases that storage.
    """
    owners: dict[tuple[Any, int], int] = {}
    for j, a in enumerate(avg_vals):
        key = _storage_key(a)
        if key is not None:
            owners[key] = j
    if not owners:
        return []
    hits: dict[int, list[int]] = {}
    for i, p in enumerate(param_vals):
        key = _storage_key(p)
        if key is not None and key in owners:
            hits.setdefault(owners[key], []).append(i)
    bad: list[int] = []
    for j, users in hits.items():
        if len(users) == 1 and users[0] == j and _same_view(param_vals[j], avg_vals[j]):
            continue
        bad.extend(users)
    return sorted(bad)


def _lerp_groups_(
    avg_vals: list[Tensor],
    param_vals: list[Tensor],
    groups: list[tuple[list[int], bool]],
    weight: float,
) -> None:
    """Run the lerp group by group: one ``_foreach_lerp_`` per same-dtype group, else converted."""
    for idx, fast in groups:
        xs = [avg_vals[i] for i in idx] if len(groups) > 1 else avg_vals
        ys = [param_vals[i] for i in idx] if len(groups) > 1 else param_vals
        if fast:
            torch._foreach_lerp_(xs, ys, weight)
        else:  # another dtype or device: tree.lerp_ converts chunk by chunk
            names = [str(i) for i in range(len(xs))]
            tree.lerp_(dict(zip(names, xs)), dict(zip(names, ys)), weight)


def _plan_groups(avg_vals: list[Tensor], param_vals: list[Tensor]) -> list[tuple[list[int], bool]]:
    """Positions grouped by (type, device, dtype) of both sides; whether a group takes foreach."""
    sigs: dict[tuple[Any, ...], list[int]] = {}
    for i, (a, p) in enumerate(zip(avg_vals, param_vals)):
        sigs.setdefault((type(a), a.device, a.dtype, type(p), p.device, p.dtype), []).append(i)
    groups = []
    for (ta, da, dta, tp, dp, dtp), idx in sigs.items():
        same = ta is tp and da == dp and dta == dtp
        both = [avg_vals[i] for i in idx] + [param_vals[i] for i in idx]
        groups.append((idx, same and foreach_ok(both)))
    return groups


def _traced_pairs(
    average: Params, params: Params, weight: Tensor | float
) -> tuple[list[Tensor], list[Tensor], list[Tensor] | float]:
    xs = list(average.values())
    ys = [params[k].to(device=a.device, dtype=a.dtype) for k, a in average.items()]
    if isinstance(weight, Tensor):
        return xs, ys, [weight.to(device=a.device, dtype=compute_dtype(a.dtype)) for a in xs]
    return xs, ys, weight


def fold_traced_(average: Params, params: Params, weight: Tensor | float, *, fn: str) -> None:
    """:meth:`PlanCache.fold_` for code traced by ``torch.compile``; the weight may be a 0-d tensor.

    A tensor weight is a graph input, so a weight that changes every step compiles once.
    Validation is the same (dynamo evaluates it at trace time and guards on the structure); each
    parameter is converted to its accumulator's dtype and device inside the graph (the compiler
    fuses the conversion into the lerp).
    """
    params = check_pair(fn, average, params)
    with torch.no_grad():
        xs, ys, ws = _traced_pairs(average, params, weight)
        torch._foreach_lerp_(xs, ys, ws)


def fold_traced(
    average: Params, params: Params, weight: Tensor | float, *, fn: str
) -> dict[str, Tensor]:
    """:func:`fold` for code traced by ``torch.compile``; the weight may be a 0-d tensor."""
    params = check_pair(fn, average, params)
    with torch.no_grad():
        xs, ys, ws = _traced_pairs(average, params, weight)
        out = torch._foreach_lerp(xs, ys, ws)
    return dict(zip(average, out))


_call_ref: Callable[[weakref.ref[Tensor]], Tensor | None] = weakref.ref.__call__


class _Plan:
    """What one successful validation of ``params`` against one accumulator tree established."""

    __slots__ = (
        "aliased",
        "avg_dict",
        "avg_keys",
        "avg_vals",
        "groups",
        "order",
        "owner",
        "params_keys",
        "refs",
    )

    def __init__(
        self,
        avg_dict: Params,
        params_keys: list[str],
        param_vals: list[Tensor],
        order: list[int] | None,
    ) -> None:
        self.avg_dict = avg_dict
        self.avg_keys = list(avg_dict)
        self.avg_vals = list(avg_dict.values())
        self.refs = [weakref.ref(p) for p in param_vals]  # never keeps the caller's tensors alive
        self.order = order
        ordered = param_vals if order is None else [param_vals[i] for i in order]
        self.groups = _plan_groups(self.avg_vals, ordered)
        self.aliased = _aliased(self.avg_vals, ordered)
        self.owner: weakref.ref[Tensor] | None = None
        self.params_keys = params_keys

    def matches(self, average: Params, keys: list[str], vals: list[Tensor]) -> bool:
        """Same accumulators, same keys in the same order, the very same parameter tensors."""
        return (
            average is self.avg_dict
            and len(vals) == len(self.refs)
            and keys == self.params_keys
            and all(map(operator.is_, average.values(), self.avg_vals))
            and all(map(operator.is_, map(_call_ref, self.refs), vals))
        )


class PlanCache:
    """Validated plans of an averager, one per accumulator tree it updates (at most ``size``).

    A plan holds the accumulator tensors (never the caller's parameters: only weak references),
    and is dropped as soon as the state object that owns those accumulators is garbage collected
    (a weak reference to the state's ``live`` cell), so a discarded state's memory is freed even
    while the averager lives on.
    """

    def __init__(self, size: int = 4) -> None:
        self._plans: dict[int, _Plan] = {}
        self._size = size

    def _forget(self, key: int, plan: _Plan) -> Callable[[object], None]:
        plans = self._plans

        def drop(_: object) -> None:
            if plans.get(key) is plan:
                del plans[key]

        return drop

    def fold_(
        self, average: Params, params: object, weight: float, owner: Tensor, *, fn: str
    ) -> None:
        """In place: ``average[k] += w * (params[k] - average[k])``, validated once per structure.

        Only ``average``'s own buffers are written, under ``torch.no_grad`` (no graph even when
        ``params`` require grad). Same-dtype groups take one ``torch._foreach_lerp_`` each (fused
        multi-tensor kernels on CUDA, no temporaries); other dtypes or devices are converted one
        chunk at a time by :func:`robustft.tree.lerp_`. Parameters aliasing the accumulators are
        copied first, so the result equals :func:`fold`'s. A call with the same accumulators and
        the very same parameter tensors under the same keys as a validated one skips the checks;
        anything else is validated in full (same errors). ``owner`` is the live cell of the state
        that owns the accumulators after this update (the plan is dropped with it).
        """
        if not isinstance(params, Mapping):
            check_params(fn, params)  # raises the house error
        params = cast(Params, params)
        key = id(average)
        plan = self._plans.get(key)
        keys, vals = list(params), list(params.values())
        if plan is None or not plan.matches(average, keys, vals):
            plan = self._build(key, average, params, fn)
        # the plan belongs to the state that owns these accumulators after this update: it is
        # forgotten when that state is garbage collected
        plan.owner = weakref.ref(owner, self._forget(key, plan))
        ordered = vals if plan.order is None else [vals[i] for i in plan.order]
        with torch.no_grad():
            if plan.aliased:
                ordered = list(ordered)
                for i in plan.aliased:
                    ordered[i] = ordered[i].clone()
            _lerp_groups_(plan.avg_vals, ordered, plan.groups, weight)

    def _build(self, key: int, average: Params, params: Params, fn: str) -> _Plan:
        params = check_pair(fn, average, params)
        keys, vals = list(params), list(params.values())
        order = None
        if keys != list(average):
            position = {k: i for i, k in enumerate(keys)}
            order = [position[k] for k in average]
        with torch.no_grad():  # the fast-path predicate as it holds inside the update
            plan = _Plan(average, keys, vals, order)
        self._plans.pop(key, None)
        while len(self._plans) >= self._size:
            del self._plans[next(iter(self._plans))]
        self._plans[key] = plan
        return plan
