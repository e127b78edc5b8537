r"""Model soups: the uniform and the greedy average of fine-tuned candidates, streamed."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from robustft import tree
from robustft._checks import check_floating_tree, describe, is_real_number
from robustft._numerics import compute_dtype
from robustft.typing import Params

_HINT = (
    "integer and bool buffers (e.g. BatchNorm's num_batches_tracked) cannot be averaged: leave "
    "them out (robustft.tree.partition) and copy them yourself"
)

__all__ = ["greedy_soup", "uniform_soup"]


def _check_candidates(fn: str, candidates: object) -> Sequence[Params]:
    if isinstance(candidates, Mapping) or not isinstance(candidates, Sequence):
        raise TypeError(
            f"{fn}: candidates must be a sequence of parameter trees, got {describe(candidates)}"
        )
    if len(candidates) == 0:
        raise ValueError(f"{fn}: candidates must hold at least one parameter tree, got none")
    first = check_floating_tree(fn, "candidates[0]", candidates[0], hint=_HINT)
    for i, c in enumerate(candidates[1:], start=1):
        check_floating_tree(fn, f"candidates[{i}]", c, hint=_HINT)
        tree.check_same_structure(first, c, what=fn, names=("candidates[0]", f"candidates[{i}]"))
    return candidates


def _accumulator(first: Params) -> dict[str, Tensor]:
    """A detached copy of ``first`` in at least float32."""
    with torch.no_grad():
        return {k: v.detach().to(dtype=compute_dtype(v.dtype), copy=True) for k, v in first.items()}


def _cast_back(acc: Params, like: Params) -> dict[str, Tensor]:
    """``acc`` in ``like``'s dtypes (no copy where they already match)."""
    return {k: v.to(like[k].dtype) for k, v in acc.items()}


def uniform_soup(candidates: Sequence[Params]) -> dict[str, Tensor]:
    r"""The uniform soup: the mean of the candidates' parameters.

    .. math:: \theta_{\mathrm{soup}} = \frac{1}{N}\sum_{i=1}^{N} \theta^{(i)}

    Streamed as a running mean in at least float32 (one accumulator tree; each candidate is read
    once), returned in the candidates' dtype.

    Args:
        candidates: ``N >= 1`` trees with the same keys, shapes and floating dtypes (e.g. models
            fine-tuned from the same pre-trained weights with different hyper-parameters).

    Returns:
        A new tree (inputs untouched).

    Raises:
        TypeError: if ``candidates`` is not a sequence of floating-point trees.
        ValueError: if it is empty or the trees' keys or shapes differ.

    >>> uniform_soup([{"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}, {"w": torch.tensor([6.0])}])
    {'w': tensor([3.])}

    References:
        Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
        accuracy without increasing inference time", ICML 2022.
        Code: https://github.com/mlfoundations/model-soups
    """
    _check_candidates("uniform_soup", candidates)
    soup = _accumulator(candidates[0])
    with torch.no_grad():
        for i, c in enumerate(candidates[1:], start=1):
            tree.lerp_(soup, c, 1.0 / (i + 1))
    return _cast_back(soup, candidates[0])


def _trial(soup: dict[str, Tensor], cand: Params, w: float) -> dict[str, Tensor]:
    """The soup with ``cand`` folded in at weight ``w``, in ``cand``'s dtypes, one tensor at a time."""
    with torch.no_grad():
        if all(soup[k].dtype == v.dtype and soup[k].device == v.device for k, v in cand.items()):
            return tree.lerp(soup, cand, w)
        return {
            k: torch.lerp(a, cand[k].detach().to(device=a.device, dtype=a.dtype), w).to(
                cand[k].dtype
            )
            for k, a in soup.items()
        }


def _score(
    evaluate: Callable[[dict[str, Tensor]], Any], params: dict[str, Tensor], i: str
) -> float:
    value = evaluate(params)
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = float(value)
    if not is_real_number(value):
        raise TypeError(
            f"greedy_soup: evaluate must return a real number (higher is better), got "
            f"{describe(value)} for {i}"
        )
    if math.isnan(value):
        raise ValueError(f"greedy_soup: evaluate must not return NaN, got NaN for {i}")
    return float(value)


def greedy_soup(
    candidates: Sequence[Params],
    evaluate: Callable[[dict[str, Tensor]], Any],
    *,
    strict: bool = True,
) -> tuple[dict[str, Tensor], list[int]]:
    r"""The greedy soup: add candidates best-first while the held-out score of the mean improves.

    Candidates are sorted by ``evaluate``, best first; among equal scores the *earliest*
    candidate comes first (a stable sort). The official code sorts ascending and reverses the
    list, which puts the *latest* of tied candidates first: to reproduce it, pass
    ``candidates[::-1]`` and map each kept index ``i`` back to ``len(candidates) - 1 - i``. The soup
    starts as the best candidate; each next candidate :math:`\theta^{(i)}` is tried as

    .. math:: \theta_{\mathrm{try}} = \frac{n}{n+1}\,\theta_{\mathrm{soup}} + \frac{1}{n+1}\,\theta^{(i)}

    (:math:`n` ingredients so far) and kept when ``evaluate`` of it is greater than the best score
    so far (``strict=True``, the official code's ``>``) or not smaller (``strict=False``).

    Streaming: besides the inputs, at most two candidate-sized trees are alive -- the soup and the
    trial (a float32 soup of bf16 candidates counts double, plus one tensor's conversion). ``evaluate`` receives the trial in the
    candidates' dtype; it is called once per candidate and once per trial (``2N - 1`` calls).

    Args:
        candidates: ``N >= 1`` trees with the same keys, shapes and floating dtypes.
        evaluate: ``(params) -> score``, higher is better (e.g. held-out accuracy through
            ``torch.func.functional_call``); a real number or a one-element tensor.
        strict: keep a candidate only on a strict improvement.

    Returns:
        ``(soup, kept)``: the soup (a new tree in the candidates' dtype) and the indices into
        ``candidates`` of its ingredients, in the order they were added.

    Raises:
        TypeError: bad ``candidates``, a non-callable ``evaluate`` or a non-number score.
        ValueError: no candidates, mismatched trees, or a NaN score.

    >>> cands = [{"w": torch.tensor([0.0])}, {"w": torch.tensor([2.0])}, {"w": torch.tensor([9.0])}]
    >>> score = lambda p: -abs(float(p["w"]) - 1.0)  # best near w = 1
    >>> greedy_soup(cands, score)  # start at 0 (tied with 2: input order), add 2, reject 9
    ({'w': tensor([1.])}, [0, 1])

    References:
        Wortsman et al., "Model soups", ICML 2022, Recipe 1.
        Code: https://github.com/mlfoundations/model-soups
    """
    _check_candidates("greedy_soup", candidates)
    if not callable(evaluate):
        raise TypeError(f"greedy_soup: evaluate must be callable, got {describe(evaluate)}")
    if not isinstance(strict, bool):
        raise TypeError(f"greedy_soup: strict must be a bool, got {describe(strict)}")
    scores = [_score(evaluate, dict(c), f"candidates[{i}]") for i, c in enumerate(candidates)]
    order = sorted(range(len(candidates)), key=lambda i: -scores[i])
    like = candidates[0]
    soup = _accumulator(candidates[order[0]])
    kept, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        w = 1.0 / (len(kept) + 1)
        trial = _trial(soup, candidates[i], w)
        score = _score(evaluate, trial, f"the soup with candidates[{i}]")
        if score > best or (not strict and score == best):
            kept.append(i)
            best = score
            if all(trial[k].dtype == soup[k].dtype for k in soup):
                soup = trial  # the trial is the new soup: nothing to recompute
            else:
                trial = {}
                with torch.no_grad():
                    tree.lerp_(soup, candidates[i], w)
        trial = {}
    return _cast_back(soup, like), kept
