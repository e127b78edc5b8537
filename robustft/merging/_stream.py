r"""Streaming over merge candidates: one checkpoint in memory at a time.

Every merge of :mod:`robustft.merging` that takes ``candidates`` reads them through
:class:`_Stream`: a list of trees, a one-shot iterable (a generator that loads checkpoints one by
one) or :func:`lazy` (a sequence that loads on each access). A candidate is validated when it
arrives (against the anchor, or the first candidate), handed to the merge, and its last reference
dropped before the next one is loaded, so a merge holds its accumulators plus **one** candidate.
Merges that read every candidate twice (``greedy_soup``, ``ties``) need a sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from typing import TypeVar, overload

import torch
from torch import Tensor

from robustft import tree
from robustft._checks import check_floating_tree, describe
from robustft._numerics import compute_dtype, plain_tensor
from robustft.typing import Params

__all__ = ["lazy"]

S = TypeVar("S")

HINT = (
    "integer and bool buffers (e.g. BatchNorm's num_batches_tracked) cannot be averaged: leave "
    "them out (robustft.tree.partition) and copy them yourself"
)

_END = object()


class _Lazy(Sequence[Params]):
    """``load(sources[i])`` on every ``[i]``; slicing slices the sources and loads nothing."""

    def __init__(self, load: Callable[[S], Params], sources: Sequence[S]) -> None:
        self._load = load
        self._sources = sources

    def __len__(self) -> int:
        return len(self._sources)

    @overload
    def __getitem__(self, i: int) -> Params: ...
    @overload
    def __getitem__(self, i: slice) -> _Lazy: ...
    def __getitem__(self, i: int | slice) -> Params | _Lazy:
        if isinstance(i, slice):
            return _Lazy(self._load, self._sources[i])
        return self._load(self._sources[i])

    def __repr__(self) -> str:
        name = getattr(self._load, "__name__", type(self._load).__name__)
        return f"lazy({name}, {len(self._sources)} sources)"


def lazy(load: Callable[[S], Params], sources: Sequence[S]) -> Sequence[Params]:
    r"""Candidates loaded on demand: a sequence whose ``[i]`` is ``load(sources[i])``.

    Nothing is loaded when it is made, and nothing is cached: every access calls ``load`` again,
    and a slice is a lazy sequence of the sliced sources. Pass it as ``candidates`` to any merge
    of :mod:`robustft.merging`, which then holds one loaded candidate at a time. How many times
    each merge loads each candidate:

    ============================================================  =====  ========================
    merge                                                         loads  trees alive besides it
    ============================================================  =====  ========================
    :func:`uniform_soup`, :func:`task_arithmetic`                 1      one accumulator
    :func:`model_stock`                                           1      two accumulators
    :func:`greedy_soup` (scores, then the soup in score order)    2      the soup and a trial
    :func:`ties` (trim + sign election, then disjoint mean)       2      about 2.5 (see ``ties``)
    ============================================================  =====  ========================

    A loader that draws random numbers (e.g. :func:`dare` inside it) must draw the same ones on
    every call for the two-pass merges: seed a generator from the source (``manual_seed(i)``).

    Args:
        load: ``source -> tree``, e.g. ``lambda p: torch.load(p, weights_only=True)``.
        sources: what to load from (paths, indices, ...), any sequence.

    Returns:
        A read-only sequence of trees, of ``len(sources)``.

    Raises:
        TypeError: a non-callable ``load`` or a ``sources`` that is not a sequence.

    >>> store = {"a": {"w": torch.tensor([1.0])}, "b": {"w": torch.tensor([3.0])}}
    >>> cands = lazy(store.__getitem__, ["a", "b"])
    >>> len(cands), cands[1]
    (2, {'w': tensor([3.])})
    >>> from robustft.merging import uniform_soup
    >>> uniform_soup(cands)
    {'w': tensor([2.])}
    """
    if not callable(load):
        raise TypeError(f"lazy: load must be callable, got {describe(load)}")
    if isinstance(sources, (str, bytes)) or not isinstance(sources, Sequence):
        raise TypeError(
            f"lazy: sources must be a sequence (a list of paths, a range, ...), got "
            f"{describe(sources)}"
        )
    return _Lazy(load, sources)


def skeleton(t: Params) -> dict[str, Tensor]:
    """Keys, shapes and dtypes of ``t`` as meta tensors: structure checks without holding data."""
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in t.items()}


class Stream:
    """The candidates of one merge call: validated container, per-candidate checks, one at a time.

    ``anchor`` (already validated) fixes the structure every candidate must have; without it the
    first candidate does. ``passes > 1`` requires a sequence (a one-shot iterator can be read
    once). :meth:`each` calls ``visit(i, tree)`` for every candidate and keeps no reference to
    ``tree`` once ``visit`` returns.
    """

    def __init__(
        self, fn: str, candidates: object, *, anchor: Params | None = None, passes: int = 1
    ) -> None:
        self.fn = fn
        what = "a sequence" if passes > 1 else "an iterable"
        forms = "a list or merging.lazy(load, sources)"
        if passes == 1:
            forms = "a list, a generator or merging.lazy(load, sources)"
        if (
            isinstance(candidates, (Mapping, str, bytes, Tensor))
            or not isinstance(candidates, Iterable)
            or (passes > 1 and not isinstance(candidates, Sequence))
        ):
            extra = ""
            if isinstance(candidates, Iterator):
                extra = f" ({fn} reads every candidate {passes} times; an iterator only once)"
            raise TypeError(
                f"{fn}: candidates must be {what} of parameter trees ({forms}){extra}, got "
                f"{describe(candidates)}"
            )
        if isinstance(candidates, Sized) and len(candidates) == 0:
            raise ValueError(f"{fn}: candidates must hold at least one parameter tree, got none")
        self.candidates: Iterable[Params] = candidates
        self.like = skeleton(anchor) if anchor is not None else None
        self.like_name = "anchor" if anchor is not None else "candidates[0]"

    def check(self, i: int, c: object) -> Params:
        name = f"candidates[{i}]"
        c = check_floating_tree(self.fn, name, c, hint=HINT)
        if self.like is None:
            self.like = skeleton(c)
        else:
            tree.check_same_structure(self.like, c, what=self.fn, names=(self.like_name, name))
        return c

    def each(self, visit: Callable[[int, Params], None], order: Iterable[int] | None = None) -> int:
        """``visit(i, candidate)`` for every candidate (in ``order`` for a sequence); the count."""
        n = 0
        if isinstance(self.candidates, Sequence):
            seq = self.candidates
            for i in range(len(seq)) if order is None else order:
                visit(i, self.check(i, seq[i]))  # the only reference: gone when visit returns
                n += 1
        else:
            it = iter(self.candidates)
            while True:
                c = next(it, _END)
                if c is _END:
                    break
                visit(n, self.check(n, c))
                del c  # before the next load
                n += 1
        if n == 0:
            raise ValueError(
                f"{self.fn}: candidates must hold at least one parameter tree, got none"
            )
        return n


class Deltas:
    """``candidate - anchor`` per tensor in the compute dtype, through one reusable buffer.

    :meth:`of` returns a view of a buffer as large as the largest tensor (one per device and
    dtype), so a pass over a candidate allocates nothing per tensor; the view is overwritten by the
    next call. Sharded (``DTensor``) and other non-plain tensors get a fresh difference instead.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def of(self, c: Tensor, a: Tensor, *, fresh: bool = False) -> Tensor:
        dtype = compute_dtype(c.dtype, a.dtype)
        if fresh or not (plain_tensor(c) and plain_tensor(a) and c.device == a.device):
            return c.to(dtype) - a.to(dtype)
        n = c.numel()
        key = (c.device, dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = self._buffers[key] = torch.empty(n, dtype=dtype, device=c.device)
        out = buf[:n].view(c.shape)
        if c.dtype == dtype and a.dtype == dtype:
            torch.sub(c, a, out=out)
        else:  # in the compute dtype, not in c's (a bf16 difference would round)
            out.copy_(c)
            out.sub_(a)
        return out


def apply_delta(
    anchor: Params, delta: dict[str, Tensor], scale: object, *, fresh: bool = False
) -> dict[str, Tensor]:
    r""":math:`\theta_0 + \lambda\,\delta` key by key, in ``anchor``'s dtypes; consumes ``delta``.

    ``delta`` (accumulators in the compute dtype, owned by the caller) is scaled in place; where
    the anchor's dtype is the compute dtype the accumulator itself becomes the output, unless
    ``fresh`` (``delta`` holds views of one shared buffer: every output gets its own storage).
    """
    out: dict[str, Tensor] = {}
    for k, a in anchor.items():
        d = delta.pop(k)
        lam = scale[k] if isinstance(scale, dict) else scale
        if isinstance(lam, Tensor):
            d.mul_(lam.to(dtype=d.dtype, device=d.device) if plain_tensor(d) else lam.to(d.dtype))
        elif lam != 1.0:
            d.mul_(float(lam))  # type: ignore[arg-type]  # a number checked by the caller
        out[k] = (d + a if fresh else d.add_(a)).to(a.dtype)
    return out


CHUNK = 1 << 22
"""Elements per chunk of the flat passes (16 MiB of float32): their temporaries stay this small."""


def chunks(n: int) -> Iterator[tuple[int, int]]:
    """``(lo, hi)`` spans covering ``range(n)`` in steps of :data:`CHUNK` elements."""
    size = CHUNK
    for lo in range(0, n, size):
        yield lo, min(lo + size, n)
