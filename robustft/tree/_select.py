"""Selecting, splitting and merging parameter trees by name."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Collection
from typing import Union

from torch import Tensor

from robustft._checks import describe, fmt_keys
from robustft.tree._structure import check_tree
from robustft.typing import Params

__all__ = ["Where", "combine", "partition", "select"]

Where = Union[str, "re.Pattern[str]", Callable[[str], bool], Collection[str]]
"""What :func:`select` and :func:`partition` accept to choose keys (one grammar for both):

- a ``str``: a name or a glob pattern (``fnmatch``, case-sensitive, ``*`` crosses dots);
- a compiled regex (``re.compile(...)``), searched in each name (``re.search``);
- a collection of ``str`` (a list, a set, another tree's keys, the list returned by
  :func:`robustft.clip.norm_affine_names`): each entry a name or a glob, a key is chosen when it
  matches any entry;
- a callable ``(name) -> bool``.

A name, glob or regex that matches no key raises ``ValueError`` listing every such entry, so a
typo never silently selects nothing; a predicate may select nothing (use one for optional
selections). An entry matches the key equal to it, and every key its glob pattern matches."""


def _matches(entry: str, key: str) -> bool:
    return key == entry or fnmatch.fnmatchcase(key, entry)


def _predicate(where: object, keys: Collection[str], fn: str) -> Callable[[str], bool]:
    """The key predicate of a :data:`Where`, after checking every pattern matches some key."""
    if isinstance(where, str):
        entries: list[str] = [where]
    elif isinstance(where, re.Pattern):
        if not isinstance(where.pattern, str):
            raise TypeError(f"{fn}: where must be a str regex, got bytes pattern {where.pattern!r}")
        if not any(where.search(k) is not None for k in keys):
            raise ValueError(
                f"{fn}: where must match at least one key, got regex {where.pattern!r} that "
                f"matches none of the {len(keys)} key(s)"
            )
        return lambda k: where.search(k) is not None
    elif callable(where):
        return lambda k: bool(where(k))
    elif isinstance(where, Collection) and not isinstance(where, (bytes, bytearray)):
        entries = list(where)
        non_str = [e for e in entries if not isinstance(e, str)]
        if non_str:
            raise TypeError(
                f"{fn}: where must be a collection of str names or globs, got entries "
                f"{non_str[:5]!r}"
            )
    else:
        raise TypeError(
            f"{fn}: where must be a name or glob str, a compiled regex, a predicate on names or "
            f"a collection of names/globs, got {describe(where)}"
        )
    unmatched = [e for e in entries if not any(_matches(e, k) for k in keys)]
    if unmatched:
        raise ValueError(
            f"{fn}: where must match at least one key with every name or glob, got entries "
            f"that match none of the {len(keys)} key(s): {fmt_keys(unmatched)}"
        )
    exact = set(entries)
    globs = [e for e in entries if any(c in e for c in "*?[")]
    return lambda k: k in exact or any(fnmatch.fnmatchcase(k, g) for g in globs)


def partition(tree: Params, where: Where) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a tree in two: the keys chosen by ``where`` and the rest (equinox's ``partition``).

    Typical use: train a subset (UEO's norm affines, a head) and keep the rest frozen, then
    ``torch.func.functional_call(model, combine(trained, frozen), x)``.

    Args:
        tree: a parameter tree.
        where: a :data:`Where`: a name or glob ``str``, a compiled regex, a collection of names
            or globs, or a predicate on the name. Every name, glob and regex must match at
            least one key.

    Returns:
        ``(selected, rest)``: two disjoint dicts whose union is ``tree``, each in ``tree``'s key
        order (the same tensors, no copy).

    Raises:
        TypeError: a non-tree, or a ``where`` of another type (or a collection with non-str
            entries).
        ValueError: a name, glob or regex that matches no key (all such entries are listed).

    >>> t = {"a.w": torch.ones(1), "a.b": torch.ones(1), "c": torch.ones(1)}
    >>> sel, rest = partition(t, "a.*")
    >>> list(sel), list(rest)
    (['a.w', 'a.b'], ['c'])
    >>> combine(sel, rest).keys() == t.keys()
    True
    >>> partition(t, ["c", "a.x"])
    Traceback (most recent call last):
    ...
    ValueError: tree.partition: where must match at least one key with every name or glob, got entries that match none of the 3 key(s): ['a.x']
    """
    return _partition(tree, where, "tree.partition")


def _partition(tree: Params, where: Where, fn: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    check_tree(tree, fn=fn)
    keep = _predicate(where, list(tree), fn)
    selected: dict[str, Tensor] = {}
    rest: dict[str, Tensor] = {}
    for k, v in tree.items():
        (selected if keep(k) else rest)[k] = v
    return selected, rest


def select(tree: Params, where: Where) -> dict[str, Tensor]:
    """The sub-tree of the keys chosen by ``where``: the first half of :func:`partition`.

    Args:
        tree: a parameter tree.
        where: a :data:`Where`, exactly as :func:`partition` takes it.

    Returns:
        A new ``dict`` with the chosen keys in ``tree``'s order (the same tensors, no copy).

    Raises:
        TypeError: a non-tree or a ``where`` of another type.
        ValueError: a name, glob or regex that matches no key.

    >>> t = {"visual.ln.weight": torch.ones(1), "visual.proj": torch.ones(1), "head": torch.ones(1)}
    >>> list(select(t, "visual.*"))
    ['visual.ln.weight', 'visual.proj']
    >>> list(select(t, ["head", "*.ln.*"]))
    ['visual.ln.weight', 'head']
    >>> list(select(t, re.compile(r"\\bproj$")))
    ['visual.proj']
    """
    return _partition(tree, where, "tree.select")[0]


def combine(*trees: Params) -> dict[str, Tensor]:
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
                f"tree.combine: trees must be disjoint, got keys present twice {fmt_keys(overlap)} "
                f"(in trees[{i}] and an earlier tree)"
            )
        out.update(t)
    return out
