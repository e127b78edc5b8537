"""Selecting, splitting and merging parameter trees by name."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Collection, Mapping
from typing import Union

from torch import Tensor

from robustft._checks import describe
from robustft.tree._structure import _fmt_keys, check_tree

__all__ = ["Where", "combine", "partition", "select"]

Where = Union[str, "re.Pattern[str]", Callable[[str], bool], Collection[str]]
"""What :func:`partition` accepts to choose keys: a glob pattern, a compiled regex (searched), a
predicate on the name, or a collection of exact names (e.g. another tree, or the list returned by
:func:`robustft.clip.norm_affine_names`)."""


def _predicate(where: object, keys: Collection[str], fn: str) -> Callable[[str], bool]:
    if isinstance(where, str):
        return lambda k: fnmatch.fnmatchcase(k, where)
    if isinstance(where, re.Pattern):
        return lambda k: where.search(k) is not None
    if callable(where):
        return where
    if isinstance(where, Collection):
        names = set(where)
        non_str = [n for n in names if not isinstance(n, str)]
        if non_str:
            raise TypeError(f"{fn}: where must contain str names, got {non_str[:5]!r}")
        unknown = names - set(keys)
        if unknown:
            raise ValueError(
                f"{fn}: where names keys that are not in the tree: {_fmt_keys(unknown)}"
            )
        return names.__contains__
    raise TypeError(
        f"{fn}: where must be a glob str, a compiled regex, a predicate on names or a collection "
        f"of names, got {describe(where)}"
    )


def select(
    tree: Mapping[str, Tensor],
    *patterns: str,
    regex: str | re.Pattern[str] | None = None,
    predicate: Callable[[str], bool] | None = None,
) -> dict[str, Tensor]:
    """The sub-tree of keys matching any of the given criteria.

    A key is kept if it matches any glob in ``patterns`` (``fnmatch``, case-sensitive, ``*``
    crosses dots), or ``regex`` (``re.search``), or ``predicate(name)`` is true.

    Args:
        tree: a parameter tree.
        *patterns: glob patterns such as ``"visual.*"`` or ``"*.ln_*.weight"``.
        regex: a regular expression searched in each name.
        predicate: a function of the name.

    Returns:
        A new ``dict`` with the matching keys, in ``tree``'s order (same tensors, no copy).

    Raises:
        ValueError: if no criterion is given.

    >>> t = {"visual.ln.weight": torch.ones(1), "visual.proj": torch.ones(1), "head": torch.ones(1)}
    >>> list(select(t, "visual.*"))
    ['visual.ln.weight', 'visual.proj']
    >>> list(select(t, regex=r"\\bln\\b", predicate=lambda k: k == "head"))
    ['visual.ln.weight', 'head']
    """
    check_tree(tree, fn="tree.select")
    if not patterns and regex is None and predicate is None:
        raise ValueError(
            "tree.select: give at least one glob pattern, regex or predicate, got none"
        )
    bad = [p for p in patterns if not isinstance(p, str)]
    if bad:
        raise TypeError(f"tree.select: patterns must be glob strs, got {describe(bad[0])}")
    if regex is not None and not isinstance(regex, (str, re.Pattern)):
        raise TypeError(
            f"tree.select: regex must be a str or compiled pattern, got {describe(regex)}"
        )
    if predicate is not None and not callable(predicate):
        raise TypeError(f"tree.select: predicate must be callable, got {describe(predicate)}")
    rx = re.compile(regex) if isinstance(regex, str) else regex

    def keep(k: str) -> bool:
        return (
            any(fnmatch.fnmatchcase(k, p) for p in patterns)
            or (rx is not None and rx.search(k) is not None)
            or (predicate is not None and bool(predicate(k)))
        )

    return {k: v for k, v in tree.items() if keep(k)}


def partition(
    tree: Mapping[str, Tensor], where: Where
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a tree in two: the keys chosen by ``where`` and the rest (equinox's ``partition``).

    Typical use: train a subset (UEO's norm affines, a head) and keep the rest frozen, then
    ``torch.func.functional_call(model, combine(trained, frozen), x)``.

    Args:
        tree: a parameter tree.
        where: a glob str, a compiled regex (searched), a predicate on the name, or a collection
            of exact names (every name must be a key of ``tree``).

    Returns:
        ``(selected, rest)``: two disjoint dicts whose union is ``tree`` (same tensors, no copy).

    >>> t = {"a.w": torch.ones(1), "a.b": torch.ones(1), "c": torch.ones(1)}
    >>> sel, rest = partition(t, "a.*")
    >>> list(sel), list(rest)
    (['a.w', 'a.b'], ['c'])
    >>> combine(sel, rest).keys() == t.keys()
    True
    """
    check_tree(tree, fn="tree.partition")
    keep = _predicate(where, tree.keys(), "tree.partition")
    selected: dict[str, Tensor] = {}
    rest: dict[str, Tensor] = {}
    for k, v in tree.items():
        (selected if keep(k) else rest)[k] = v
    return selected, rest


def combine(*trees: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Merge disjoint trees into one (the inverse of :func:`partition`).

    Raises:
        ValueError: if two trees share a key (the shared keys are listed).

    >>> combine({"a": torch.zeros(1)}, {"b": torch.ones(1)})
    {'a': tensor([0.]), 'b': tensor([1.])}
    """
    out: dict[str, Tensor] = {}
    for i, t in enumerate(trees):
        check_tree(t, fn="tree.combine", name=f"trees[{i}]")
        overlap = [k for k in t if k in out]
        if overlap:
            raise ValueError(
                f"tree.combine: trees must be disjoint, got keys present twice {_fmt_keys(overlap)} "
                f"(in trees[{i}] and an earlier tree)"
            )
        out.update(t)
    return out
