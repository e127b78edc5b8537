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
from typing import Any, Literal, overload

import torch
from torch import Tensor

from robustft._checks import check_floating_tree, check_per_tensor_scalar
from robustft._numerics import compute_dtype, foreach_ok, plain_tensor
from robustft.tree._structure import check_same_structure
from robustft.typing import Params, PerTensor, Scalar

__all__ = [
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
        res = foreach(xs, ys) if foreach_ok(xs + ys) else [single(x, y) for x, y in zip(xs, ys)]
        out.update(zip(keys, res))
    return {k: out[k] for k in a}


def add(a: Params, b: Params) -> dict[str, Tensor]:
    """Key-wise sum ``a + b`` of two trees with the same keys, shapes and dtypes.

    >>> add({"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])})
    {'w': tensor([3.])}
    """
    return _binary(a, b, "tree.add", lambda x, y: torch._foreach_add(x, y), torch.add)


def sub(a: Params, b: Params) -> dict[str, Tensor]:
    """Key-wise difference ``a - b`` of two trees with the same keys, shapes and dtypes.

    >>> sub({"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])})
    {'w': tensor([-1.])}
    """
    return _binary(a, b, "tree.sub", lambda x, y: torch._foreach_sub(x, y), torch.sub)


def _mul(x: Tensor, f: Any) -> Tensor:
    """``x * f`` in ``x``'s dtype; a tensor ``f`` is applied in the compute dtype.

    A 0-d tensor factor would otherwise promote a 0-d leaf (``bf16 * float32 -> float32``): the
    product is formed in :func:`~robustft._numerics.compute_dtype` and cast back to ``x.dtype``.
    """
    if not isinstance(f, Tensor):
        return x * f
    acc = compute_dtype(x, f)
    return (x.to(acc) * f.to(device=x.device, dtype=acc)).to(x.dtype)


def _lerp(x: Tensor, y: Tensor, w: Any) -> Tensor:
    """``torch.lerp(x, y, w)`` in ``x``'s dtype; exact at ``w = 0`` (``x``) and ``w = 1`` (``y``).

    A tensor ``w`` is applied in the compute dtype (at least float32, wider if ``w`` is) and the
    result cast back to ``x.dtype``, so a float32 0-d weight leaves a bf16 leaf bf16.
    """
    if not isinstance(w, Tensor):
        return torch.lerp(x, y, w)
    acc = compute_dtype(x, w)
    return torch.lerp(x.to(acc), y.to(acc), w.to(device=x.device, dtype=acc)).to(x.dtype)


def scale(tree: Params, factor: PerTensor[Scalar]) -> dict[str, Tensor]:
    """Multiply every tensor by ``factor`` (a number, a 0-d tensor, or a dict per key).

    .. math:: \\mathrm{scale}(\\theta, c)_k = c_k\\,\\theta_k

    Every leaf keeps its dtype, also with a 0-d tensor factor of another dtype (the product is
    formed in at least float32 and cast back: a bf16 ``logit_scale`` stays bf16). A Python or
    NumPy number goes through one ``torch._foreach_mul`` per device/dtype group.

    Args:
        tree: a tree of floating-point tensors.
        factor: :math:`c`: a finite real number (Python or NumPy), a 0-d floating tensor
            (values not read; may carry gradients), or a dict of them with exactly the tree's keys.

    Returns:
        A new tree with ``tree``'s keys, shapes and dtypes.

    Raises:
        TypeError: a non-tree, non-floating leaves, or a ``factor`` of another type.
        ValueError: a non-finite number, or a ``factor`` dict with other keys.

    >>> scale({"a": torch.tensor([1.0]), "b": torch.tensor([2.0])}, {"a": 2.0, "b": -1.0})
    {'a': tensor([2.]), 'b': tensor([-2.])}
    """
    check_floating_tree("tree.scale", "tree", tree)
    f = check_per_tensor_scalar("tree.scale", "factor", factor, list(tree))
    if isinstance(f, dict):
        return {k: _mul(v, f[k]) for k, v in tree.items()}
    out: dict[str, Tensor] = {}
    for keys in _groups([tree]):
        xs = [tree[k] for k in keys]
        if not isinstance(f, Tensor) and foreach_ok(xs):
            out.update(zip(keys, torch._foreach_mul(xs, f)))
        else:
            out.update((k, _mul(x, f)) for k, x in zip(keys, xs))
    return {k: out[k] for k in tree}


def lerp(start: Params, end: Params, weight: PerTensor[Scalar]) -> dict[str, Tensor]:
    """Key-wise linear interpolation ``start + weight * (end - start)``.

    .. math:: \\mathrm{lerp}(a, b, w)_k = a_k + w_k\\,(b_k - a_k)

    Computed as ``torch.lerp``, exact at both ends: ``weight = 0`` returns ``start``'s values and
    ``weight = 1`` ``end``'s, bit for bit, for a number, a 0-d tensor and a per-key dict alike.
    Every leaf keeps its dtype (a 0-d tensor weight is applied in at least float32 and the result
    cast back). A number goes through one ``torch._foreach_lerp`` per device/dtype group.

    Args:
        start: tree ``a`` of floating-point tensors (returned at ``weight = 0``).
        end: tree ``b`` with the same keys, shapes and dtypes (returned at ``weight = 1``).
        weight: :math:`w`: a finite real number (Python or NumPy), a 0-d floating tensor, or a
            dict of them with the trees' keys. Values outside ``[0, 1]`` extrapolate.

    Returns:
        A new tree; inputs are not modified.

    Raises:
        TypeError: non-trees, non-floating leaves, differing dtypes, a bad ``weight`` type.
        ValueError: differing keys or shapes, a non-finite weight, a dict with other keys.

    >>> lerp({"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([4.0, 6.0])}, 0.25)
    {'w': tensor([1., 3.])}
    """
    check_floating_tree("tree.lerp", "start", start)
    check_floating_tree("tree.lerp", "end", end)
    check_same_structure(start, end, what="tree.lerp", names=("start", "end"))
    w = check_per_tensor_scalar("tree.lerp", "weight", weight, list(start))
    if isinstance(w, dict):
        return {k: _lerp(x, end[k], w[k]) for k, x in start.items()}
    out: dict[str, Tensor] = {}
    for keys in _groups([start, end]):
        xs, ys = [start[k] for k in keys], [end[k] for k in keys]
        if not isinstance(w, Tensor) and foreach_ok(xs + ys):
            out.update(zip(keys, torch._foreach_lerp(xs, ys, w)))
        else:
            out.update((k, _lerp(x, y, w)) for k, x, y in zip(keys, xs, ys))
    return {k: out[k] for k in start}


def lerp_(start: Params, end: Params, weight: PerTensor[Scalar]) -> Params:
    """In place: ``start[k] += weight * (end[k] - start[k])`` for every key; returns ``start``.

    Only ``start``'s tensors are written. ``end`` may have another floating dtype than ``start``
    (e.g. bf16 parameters folded into float32 accumulators) or live on another device: it is then
    converted one tensor at a time, and large contiguous tensors one chunk at a time (2**20
    elements on CPU, 2**24 on accelerators), so the extra memory is at most one tensor and at most
    one chunk. Exact at ``weight = 0`` and ``1`` like :func:`lerp`; a 0-d tensor weight is applied
    in at least float32 (a bf16 ``start`` leaf then goes through one float32 temporary).

    Args:
        start: the tree written in place (floating-point tensors).
        end: a tree with the same keys and shapes, any floating dtype and device.
        weight: as in :func:`lerp`.

    Returns:
        ``start`` itself.

    Raises:
        TypeError: non-trees, non-floating leaves, a bad ``weight`` type.
        ValueError: differing keys or shapes, a non-finite weight, a dict with other keys.

    >>> acc = {"w": torch.tensor([0.0, 2.0])}
    >>> _ = lerp_(acc, {"w": torch.tensor([4.0, 6.0])}, 0.5)
    >>> acc
    {'w': tensor([2., 4.])}
    """
    check_floating_tree("tree.lerp_", "start", start)
    check_floating_tree("tree.lerp_", "end", end)
    check_same_structure(start, end, what="tree.lerp_", names=("start", "end"), dtypes=False)
    w = check_per_tensor_scalar("tree.lerp_", "weight", weight, list(start))
    for keys in _groups([start, end]):
        xs, ys = [start[k] for k in keys], [end[k] for k in keys]
        same = xs[0].dtype == ys[0].dtype and xs[0].device == ys[0].device
        if same and isinstance(w, float) and foreach_ok(xs + ys):
            torch._foreach_lerp_(xs, ys, w)
            continue
        for k, x, y in zip(keys, xs, ys):
            wk = w[k] if isinstance(w, dict) else w
            if isinstance(wk, Tensor):
                _lerp_tensor_(x, y, wk)
            else:
                _lerp_converted_(x, y, wk)
    return start


def _lerp_tensor_(x: Tensor, y: Tensor, w: Tensor) -> None:
    """``x <- lerp(x, y, w)`` for a 0-d tensor ``w``, in the compute dtype of ``x`` and ``w``."""
    acc = compute_dtype(x, w)
    if acc == x.dtype:
        x.lerp_(y.to(device=x.device, dtype=acc), w.to(device=x.device, dtype=acc))
    else:
        x.copy_(_lerp(x, y.to(device=x.device, dtype=x.dtype), w))


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
        and plain_tensor(x)
        and plain_tensor(y)
        and x.is_contiguous()
        and y.is_contiguous()
        and foreach_ok([x, y])
    )
    if not chunked:
        x.lerp_(y.to(device=x.device, dtype=x.dtype), w)
        return
    xf, yf = x.view(-1), y.view(-1)
    for i in range(0, n, chunk):
        j = min(i + chunk, n)
        xf[i:j].lerp_(yf[i:j].to(device=x.device, dtype=x.dtype), w)


def copy_(dst: Params, src: Params) -> Params:
    """In place: copy ``src`` into ``dst`` key by key (dtype/device converted); returns ``dst``.

    >>> d = {"w": torch.zeros(2)}
    >>> copy_(d, {"w": torch.ones(2, dtype=torch.float64)})["w"]
    tensor([1., 1.])
    """
    check_same_structure(dst, src, what="tree.copy_", names=("dst", "src"), dtypes=False)
    for keys in _groups([dst, src]):
        xs, ys = [dst[k] for k in keys], [src[k] for k in keys]
        if foreach_ok(xs + ys):
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


@overload
def sq_norm(tree: Params, *, per_tensor: Literal[False] = False) -> Tensor: ...
@overload
def sq_norm(tree: Params, *, per_tensor: Literal[True]) -> dict[str, Tensor]: ...
@overload
def sq_norm(tree: Params, *, per_tensor: bool) -> Tensor | dict[str, Tensor]: ...
def sq_norm(tree: Params, *, per_tensor: bool = False) -> Tensor | dict[str, Tensor]:
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
    check_floating_tree("tree.sq_norm", "tree", tree)
    norms = _norms(tree)
    squares = {k: n * n for k, n in norms.items()}
    if per_tensor:
        return squares
    return _stack_sum(list(squares.values()))


def _norms(tree: Params) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for keys in _groups([tree]):
        xs = [tree[k] for k in keys]
        acc = compute_dtype(xs[0].dtype)
        if foreach_ok(xs) and plain_tensor(xs[0]):
            out.update(zip(keys, torch._foreach_norm(xs, 2, dtype=acc)))
        else:
            out.update((k, torch.linalg.vector_norm(x, dtype=acc)) for k, x in zip(keys, xs))
    return {k: out[k] for k in tree}


@overload
def norm(tree: Params, *, per_tensor: Literal[False] = False) -> Tensor: ...
@overload
def norm(tree: Params, *, per_tensor: Literal[True]) -> dict[str, Tensor]: ...
@overload
def norm(tree: Params, *, per_tensor: bool) -> Tensor | dict[str, Tensor]: ...
def norm(tree: Params, *, per_tensor: bool = False) -> Tensor | dict[str, Tensor]:
    """L2 norm: of the whole tree (the norm of all entries flattened and concatenated) or per tensor.

    The global norm is computed as the norm of the per-tensor norms, so its gradient is finite
    (zero) at a zero tree. Accumulates in at least float32.

    >>> norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])})
    tensor(5.)
    """
    check_floating_tree("tree.norm", "tree", tree)
    norms = _norms(tree)
    if per_tensor:
        return norms
    if not norms:
        return torch.zeros((), dtype=torch.float32)
    vals = list(norms.values())
    device = vals[0].device
    return torch.linalg.vector_norm(torch.stack([v.to(device) for v in vals]))


def dot(a: Params, b: Params) -> Tensor:
    """Inner product of two trees, ``sum_k <a_k, b_k>``, as a 0-d tensor (at least float32).

    >>> dot({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])})
    tensor(11.)
    """
    check_floating_tree("tree.dot", "a", a)
    check_floating_tree("tree.dot", "b", b)
    check_same_structure(a, b, what="tree.dot")
    terms = []
    for k in a:
        acc = compute_dtype(a[k].dtype)
        terms.append(torch.sum(a[k].to(acc) * b[k].to(acc)))
    return _stack_sum(terms)
