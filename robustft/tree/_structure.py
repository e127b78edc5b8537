"""Validation and structure of parameter trees (``Mapping[str, Tensor]``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from robustft._checks import check_device, check_tensor_tree, describe, fmt_keys
from robustft.typing import Device, Params

__all__ = [
    "cast",
    "check_same_structure",
    "check_tree",
    "clone",
    "from_module",
    "map",
    "zeros_like",
]


def check_tree(tree: object, *, fn: str, name: str = "tree") -> Params:
    """Check ``tree`` is a ``Mapping[str, Tensor]``; return it unchanged.

    Args:
        tree: the object to check.
        fn: name of the calling public function, used in the error message.
        name: name of the argument, used in the error message.

    Raises:
        TypeError: if ``tree`` is not a mapping, a key is not a ``str`` or a leaf is not a tensor
            (the offending keys are listed).

    >>> check_tree({"w": torch.zeros(2)}, fn="demo")["w"].shape
    torch.Size([2])
    """
    return check_tensor_tree(fn, name, tree)


def check_same_structure(
    a: Params,
    b: Params,
    *,
    what: str,
    names: tuple[str, str] = ("a", "b"),
    shapes: bool = True,
    dtypes: bool = True,
    subset: bool = False,
) -> None:
    """Check two parameter trees have the same keys (and shapes and dtypes).

    ``b`` is checked against ``a``: *missing* keys are in ``a`` but not in ``b``, *unexpected* keys
    are in ``b`` but not in ``a``.

    Args:
        a: the reference tree.
        b: the tree checked against it.
        what: name of the calling function, put at the start of the error message.
        names: the argument names of ``a`` and ``b`` in the calling function.
        shapes: also require equal shapes, key by key.
        dtypes: also require equal dtypes, key by key.
        subset: only require ``a``'s keys to be present in ``b`` (``b`` may hold more, e.g. a new
            head next to the anchored backbone).

    Raises:
        TypeError: if either is not a tree of tensors, or dtypes differ (keys listed).
        ValueError: if keys differ (missing and unexpected keys listed) or shapes differ.

    >>> check_same_structure({"w": torch.zeros(2)}, {"v": torch.zeros(2)}, what="demo",
    ...                      names=("anchor", "params"))
    Traceback (most recent call last):
    ...
    ValueError: demo: params must have the same keys as anchor; missing keys ['w'], unexpected keys ['v']
    """
    na, nb = names
    check_tree(a, fn=what, name=na)
    check_tree(b, fn=what, name=nb)
    missing = [k for k in a if k not in b]
    unexpected = [] if subset else [k for k in b if k not in a]
    if missing or unexpected:
        rel = "all the keys of" if subset else "the same keys as"
        raise ValueError(
            f"{what}: {nb} must have {rel} {na}; missing keys {fmt_keys(missing)}, "
            f"unexpected keys {fmt_keys(unexpected)}"
        )
    if shapes:
        bad = [k for k in a if a[k].shape != b[k].shape]
        if bad:
            detail = "; ".join(
                f"{k!r}: {tuple(a[k].shape)} vs {tuple(b[k].shape)}" for k in sorted(bad)[:5]
            )
            raise ValueError(
                f"{what}: {na} and {nb} must have the same shape at every key, got "
                f"mismatches at keys {fmt_keys(bad)} ({detail})"
            )
    if dtypes:
        bad = [k for k in a if a[k].dtype != b[k].dtype]
        if bad:
            detail = "; ".join(f"{k!r}: {a[k].dtype} vs {b[k].dtype}" for k in sorted(bad)[:5])
            raise TypeError(
                f"{what}: {na} and {nb} must have the same dtype at every key, got "
                f"mismatches at keys {fmt_keys(bad)} ({detail}); use robustft.tree.cast first"
            )


def map(fn: Callable[..., Tensor], tree: Params, *rest: Params) -> dict[str, Tensor]:
    """Apply ``fn`` key by key: ``{k: fn(tree[k], *(r[k] for r in rest))}``.

    Args:
        fn: a function of one tensor per tree, returning a tensor.
        tree: a parameter tree; its key order is kept.
        *rest: further trees with exactly the same keys (shapes and dtypes are ``fn``'s business).

    Returns:
        A new ``dict`` with ``tree``'s keys; inputs are not modified (unless ``fn`` does).

    >>> map(lambda x, y: x * y, {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])})
    {'w': tensor([3., 8.])}
    """
    if not callable(fn):
        raise TypeError(f"tree.map: fn must be callable, got {describe(fn)}")
    check_tree(tree, fn="tree.map", name="tree")
    for i, r in enumerate(rest):
        check_same_structure(
            tree, r, what="tree.map", names=("tree", f"rest[{i}]"), shapes=False, dtypes=False
        )
    return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}


def clone(tree: Params, *, detach: bool = False) -> dict[str, Tensor]:
    """Copy every tensor of a tree (``Tensor.clone``; with ``detach=True``, ``detach().clone()``).

    Without ``detach`` the copies stay in the autograd graph, like ``Tensor.clone``. Use
    ``detach=True`` to snapshot the pre-trained weights as a frozen anchor.

    >>> p = {"w": torch.ones(2, requires_grad=True)}
    >>> clone(p, detach=True)["w"].requires_grad
    False
    """
    check_tree(tree, fn="tree.clone")
    if detach:
        return {k: v.detach().clone() for k, v in tree.items()}
    return {k: v.clone() for k, v in tree.items()}


def zeros_like(tree: Params, *, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """A tree of zeros with the same keys, shapes and devices (and dtypes, unless ``dtype`` given).

    >>> zeros_like({"w": torch.ones(2)}, dtype=torch.float64)
    {'w': tensor([0., 0.], dtype=torch.float64)}
    """
    check_tree(tree, fn="tree.zeros_like")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"tree.zeros_like: dtype must be a torch.dtype or None, got {describe(dtype)}"
        )
    return {k: torch.zeros_like(v, dtype=dtype) for k, v in tree.items()}


def cast(
    tree: Params,
    dtype: torch.dtype | None = None,
    device: Device = None,
    *,
    floating_only: bool = True,
) -> dict[str, Tensor]:
    """Move a tree to ``device`` and/or cast it to ``dtype``.

    Like ``nn.Module.to``, only floating-point tensors change dtype by default (integer buffers
    such as BatchNorm's ``num_batches_tracked`` keep theirs); ``floating_only=False`` casts all.
    Tensors already of the target dtype and device are returned as they are (no copy).

    >>> cast({"w": torch.ones(1), "n": torch.tensor([3])}, torch.float16)
    {'w': tensor([1.], dtype=torch.float16), 'n': tensor([3])}
    """
    check_tree(tree, fn="tree.cast")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"tree.cast: dtype must be a torch.dtype or None, got {describe(dtype)}")
    device = check_device("tree.cast", "device", device)
    out = {}
    for k, v in tree.items():
        target = (
            dtype if dtype is not None and (v.is_floating_point() or not floating_only) else None
        )
        out[k] = v.to(device=device, dtype=target)
    return out


def from_module(
    module: nn.Module, *, buffers: bool = False, trainable_only: bool = False
) -> dict[str, Tensor]:
    """The parameter tree of a module: ``dict(module.named_parameters())``.

    The tensors are the module's own (no copy): use :func:`clone` with ``detach=True`` for a
    snapshot. Tied parameters appear once, under their first name, as in ``named_parameters``.

    Args:
        module: any ``torch.nn.Module``.
        buffers: also include ``named_buffers()`` (running statistics, ...).
        trainable_only: only parameters with ``requires_grad=True``.

    Returns:
        ``dict[str, Tensor]`` usable with :func:`torch.func.functional_call`.

    >>> sorted(from_module(torch.nn.Linear(2, 3)))
    ['bias', 'weight']
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"tree.from_module: module must be a torch.nn.Module, got {describe(module)}"
        )
    out: dict[str, Tensor] = {
        k: v for k, v in module.named_parameters() if v.requires_grad or not trainable_only
    }
    if buffers:
        for k, b in module.named_buffers():
            if k in out:  # pragma: no cover - torch forbids a name being both
                raise ValueError(f"tree.from_module: name {k!r} is both a parameter and a buffer")
            out[k] = b
    return out
