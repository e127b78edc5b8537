"""Arithmetic over parameter trees, with ``torch._foreach_*`` fast paths.

Every out-of-place function here returns a new ``dict`` and never mutates its inputs. The in-place
variants (trailing ``_``) write only into their *first* argument. Fast paths group tensors by
(tensor type, device, dtype) and call one ``torch._foreach_*`` kernel per group (fused multi-tensor
kernels on CUDA); they are used when no autograd graph or ``torch.func`` transform is involved, and
a per-tensor loop with the same maths is used otherwise, so every function is differentiable and
works under ``torch.func.grad``/``vmap``/``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from robustft._checks import check_per_tensor, describe, is_functorch_wrapped
from robustft.tree._structure import check_same_structure, check_tree

__all__ = [
    "accumulation_dtype",
    "add",
    "copy_",
    "dot",
    "lerp",
    "lerp_",
    "norm",
    "scale",
    "sq_norm",
    "sub",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions accumulate in: at least float32 (bf16/fp16 sums lose digits)."""
    return torch.promote_types(dtype, torch.float32)


def _foreach_ok(tensors: Sequence[Tensor]) -> bool:
    """Whether the ``torch._foreach_*`` fast path may be used for these tensors."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if torch.compiler.is_compiling():  # inductor lowers foreach ops; dynamo can't trace the probe
        return True
    return not any(is_functorch_wrapped(t) for t in tensors)


def _groups(trees: Sequence[Mapping[str, Tensor]]) -> list[list[str]]:
    """Keys of ``trees[0]`` grouped so every group shares type, device and dtype in every tree."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for k in trees[0]:
        sig = tuple((type(t[k]), t[k].device, t[k].dtype) for t in trees)
        groups.setdefault(sig, []).append(k)
    return list(groups.values())


def _binary(
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    what: str,
    foreach: Callable[[list[Tensor], list[Tensor]], Sequence[Tensor]],
    single: Callable[[Tensor, Tensor], Tensor],
) -> dict[str, Tensor]:
    check_same_structure(a, b, what=what)
    out: dict[str, Tensor] = {}
    for keys in _groups([a, b]):
        xs, ys = [a[k] for k in keys], [b[k] for k in keys]
        res = foreach(xs, ys) if _foreach_ok(xs + ys) else [single(x, y) for x, y in zip(xs, ys)]
        out.update(zip(keys, res))
    return {k: out[k] for k in a}


def add(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Key-wise sum ``a + b`` of two trees with the same keys, shapes and dtypes.

    >>> add({"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])})
    {'w': tensor([3.])}
    """
    return _binary(a, b, "tree.add", lambda x, y: torch._foreach_add(x, y), torch.add)


def sub(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Key-wise difference ``a - b`` of two trees with the same keys, shapes and dtypes.

    >>> sub({"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])})
    {'w': tensor([-1.])}
    """
    return _binary(a, b, "tree.sub", lambda x, y: torch._foreach_sub(x, y), torch.sub)


def _is_python_scalar(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_factor(fn: str, name: str, value: object, keys: Sequence[str]) -> None:
    def ok(v: object) -> bool:
        return _is_python_scalar(v) or (isinstance(v, Tensor) and v.ndim == 0)

    if isinstance(value, Mapping):
        check_per_tensor(fn, name, value, keys)
        bad = [k for k, v in value.items() if not ok(v)]
        if bad:
            raise TypeError(
                f"{fn}: {name} must map keys to real numbers or 0-d tensors, got "
                f"{describe(value[bad[0]])} at key {bad[0]!r}"
            )
    elif not ok(value):
        raise TypeError(
            f"{fn}: {name} must be a real number, a 0-d tensor or a dict of them per key, "
            f"got {describe(value)}"
        )


def scale(tree: Mapping[str, Tensor], factor: Any) -> dict[str, Tensor]:
    """Multiply every tensor by ``factor`` (a scalar, a 0-d tensor, or a dict per key).

    >>> scale({"a": torch.tensor([1.0]), "b": torch.tensor([2.0])}, {"a": 2.0, "b": -1.0})
    {'a': tensor([2.]), 'b': tensor([-2.])}
    """
    check_tree(tree, fn="tree.scale")
    _check_factor("tree.scale", "factor", factor, list(tree))
    if isinstance(factor, Mapping):
        return {k: v * factor[k] for k, v in tree.items()}
    out: dict[str, Tensor] = {}
    for keys in _groups([tree]):
        xs = [tree[k] for k in keys]
        if _is_python_scalar(factor) and _foreach_ok(xs):
            out.update(zip(keys, torch._foreach_mul(xs, factor)))
        else:
            out.update((k, x * factor) for k, x in zip(keys, xs))
    return {k: out[k] for k in tree}


def lerp(start: Mapping[str, Tensor], end: Mapping[str, Tensor], weight: Any) -> dict[str, Tensor]:
    """Key-wise linear interpolation ``start + weight * (end - start)``.

    .. math:: \\mathrm{lerp}(a, b, w)_k = a_k + w_k\\,(b_k - a_k)

    Args:
        start: tree ``a`` (returned at ``weight = 0``).
        end: tree ``b`` with the same keys, shapes and dtypes (returned at ``weight = 1``).
        weight: a real number, a 0-d tensor, or a dict of them with the trees' keys.

    Returns:
        A new tree; inputs are not modified.

    >>> lerp({"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([4.0, 6.0])}, 0.25)
    {'w': tensor([1., 3.])}
    """
    check_same_structure(start, end, what="tree.lerp", names=("start", "end"))
    _check_factor("tree.lerp", "weight", weight, list(start))
    out: dict[str, Tensor] = {}
    for keys in _groups([start, end]):
        xs, ys = [start[k] for k in keys], [end[k] for k in keys]
        if _is_python_scalar(weight) and _foreach_ok(xs + ys):
            out.update(zip(keys, torch._foreach_lerp(xs, ys, float(weight))))
        else:
            for k, x, y in zip(keys, xs, ys):
                w = weight[k] if isinstance(weight, Mapping) else weight
                out[k] = x + w * (y - x) if isinstance(w, Tensor) else torch.lerp(x, y, float(w))
    return {k: out[k] for k in start}


def lerp_(
    start: Mapping[str, Tensor], end: Mapping[str, Tensor], weight: Any
) -> Mapping[str, Tensor]:
    """In place: ``start[k] += weight * (end[k] - start[k])`` for every key; returns ``start``.

    Only ``start``'s tensors are written. ``end`` may have another floating dtype than ``start``
    (e.g. bf16 parameters folded into float32 accumulators) or live on another device: it is then
    converted one tensor at a time, and large contiguous tensors one chunk at a time (2**20
    elements on CPU, 2**24 on accelerators), so the extra memory is at most one tensor and at most
    one chunk.

    >>> acc = {"w": torch.tensor([0.0, 2.0])}
    >>> _ = lerp_(acc, {"w": torch.tensor([4.0, 6.0])}, 0.5)
    >>> acc
    {'w': tensor([2., 4.])}
    """
    check_same_structure(start, end, what="tree.lerp_", names=("start", "end"), dtypes=False)
    _check_factor("tree.lerp_", "weight", weight, list(start))
    for keys in _groups([start, end]):
        xs, ys = [start[k] for k in keys], [end[k] for k in keys]
        same = xs[0].dtype == ys[0].dtype and xs[0].device == ys[0].device
        if same and _is_python_scalar(weight) and _foreach_ok(xs + ys):
            torch._foreach_lerp_(xs, ys, float(weight))
            continue
        for k, x, y in zip(keys, xs, ys):
            w = weight[k] if isinstance(weight, Mapping) else weight
            if isinstance(w, Tensor):
                y = y.to(device=x.device, dtype=x.dtype)
                x.add_(w * (y - x))
            else:
                _lerp_converted_(x, y, float(w))
    return start


_CONVERT_CHUNK = {"cpu": 1 << 20}
"""Elements of ``end`` converted at a time by :func:`lerp_` when its dtype or device differs,
per device type of ``start`` (larger elsewhere: fewer kernel launches)."""


def _lerp_converted_(x: Tensor, y: Tensor, w: float) -> None:
    """``x.lerp_(y.to(x), w)``; large plain contiguous tensors are converted chunk by chunk.

    Same values as converting the whole tensor (lerp is elementwise), with at most one chunk of
    converted elements alive instead of a full-size copy of ``y``.
    """
    if y.dtype == x.dtype and y.device == x.device:
        x.lerp_(y, w)
        return
    n = x.numel()
    chunk = _CONVERT_CHUNK.get(x.device.type, 1 << 24)
    chunked = (
        n > chunk
        and type(x) in (Tensor, torch.nn.Parameter)
        and type(y) in (Tensor, torch.nn.Parameter)
        and x.is_contiguous()
        and y.is_contiguous()
        and _foreach_ok([x, y])
    )
    if not chunked:
        x.lerp_(y.to(device=x.device, dtype=x.dtype), w)
        return
    xf, yf = x.view(-1), y.view(-1)
    for i in range(0, n, chunk):
        j = min(i + chunk, n)
        xf[i:j].lerp_(yf[i:j].to(device=x.device, dtype=x.dtype), w)


def copy_(dst: Mapping[str, Tensor], src: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """In place: copy ``src`` into ``dst`` key by key (dtype/device converted); returns ``dst``.

    >>> d = {"w": torch.zeros(2)}
    >>> copy_(d, {"w": torch.ones(2, dtype=torch.float64)})["w"]
    tensor([1., 1.])
    """
    check_same_structure(dst, src, what="tree.copy_", names=("dst", "src"), dtypes=False)
    for keys in _groups([dst, src]):
        xs, ys = [dst[k] for k in keys], [src[k] for k in keys]
        if _foreach_ok(xs + ys):
            torch._foreach_copy_(xs, ys)
        else:
            for x, y in zip(xs, ys):
                x.copy_(y)
    return dst


def _stack_sum(values: list[Tensor]) -> Tensor:
    if not values:
        return torch.zeros((), dtype=torch.float32)
    device = values[0].device
    total = values[0]
    for v in values[1:]:
        total = total + v.to(device)
    return total


def sq_norm(tree: Mapping[str, Tensor], *, per_tensor: bool = False) -> Any:
    """Squared L2 norm: of the whole tree (0-d) or of each tensor (a dict of 0-d tensors).

    .. math:: \\|\\theta\\|^2 = \\sum_k \\|\\theta_k\\|_F^2

    Accumulates in at least float32 (bf16/fp16 trees give float32 results). For sharded tensors
    (``DTensor``) the norms are global, as ``torch.linalg.vector_norm`` makes them. An empty tree
    has norm 0.

    >>> sq_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])})
    tensor(25.)
    >>> sq_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, per_tensor=True)
    {'a': tensor(9.), 'b': tensor(16.)}
    """
    check_tree(tree, fn="tree.sq_norm")
    norms = _norms(tree, "tree.sq_norm")
    squares = {k: n * n for k, n in norms.items()}
    if per_tensor:
        return squares
    return _stack_sum(list(squares.values()))


def _norms(tree: Mapping[str, Tensor], fn: str) -> dict[str, Tensor]:
    bad = [k for k, v in tree.items() if not v.is_floating_point()]
    if bad:
        raise TypeError(
            f"{fn}: tree must hold floating-point tensors, got {tree[bad[0]].dtype} at keys {bad[:10]!r}"
        )
    out: dict[str, Tensor] = {}
    for keys in _groups([tree]):
        xs = [tree[k] for k in keys]
        acc = accumulation_dtype(xs[0].dtype)
        if _foreach_ok(xs) and type(xs[0]) in (Tensor, torch.nn.Parameter):
            out.update(zip(keys, torch._foreach_norm(xs, 2, dtype=acc)))
        else:
            out.update((k, torch.linalg.vector_norm(x, dtype=acc)) for k, x in zip(keys, xs))
    return {k: out[k] for k in tree}


def norm(tree: Mapping[str, Tensor], *, per_tensor: bool = False) -> Any:
    """L2 norm: of the whole tree (the norm of all entries flattened and concatenated) or per tensor.

    The global norm is computed as the norm of the per-tensor norms, so its gradient is finite
    (zero) at a zero tree. Accumulates in at least float32.

    >>> norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])})
    tensor(5.)
    """
    check_tree(tree, fn="tree.norm")
    norms = _norms(tree, "tree.norm")
    if per_tensor:
        return norms
    if not norms:
        return torch.zeros((), dtype=torch.float32)
    vals = list(norms.values())
    device = vals[0].device
    return torch.linalg.vector_norm(torch.stack([v.to(device) for v in vals]))


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """Inner product of two trees, ``sum_k <a_k, b_k>``, as a 0-d tensor (at least float32).

    >>> dot({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])})
    tensor(11.)
    """
    check_same_structure(a, b, what="tree.dot")
    bad = [k for k, v in a.items() if not v.is_floating_point()]
    if bad:
        raise TypeError(
            f"tree.dot: trees must be floating-point, got {a[bad[0]].dtype} at keys {bad[:10]!r}"
        )
    terms = []
    for k in a:
        acc = accumulation_dtype(a[k].dtype)
        terms.append(torch.sum(a[k].to(acc) * b[k].to(acc)))
    return _stack_sum(terms)
