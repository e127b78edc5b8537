r"""Model soups: the uniform and the greedy average of fine-tuned candidates, streamed."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from robustft import tree
from robustft._checks import describe, is_real_number
from robustft._numerics import compute_dtype
from robustft.merging._stream import Stream
from robustft.typing import Params

__all__ = ["greedy_soup", "uniform_soup"]


def _accumulator(first: Params) -> dict[str, Tensor]:
    """A detached copy of ``first`` in at least float32."""
    with torch.no_grad():
        return {k: v.detach().to(dtype=compute_dtype(v.dtype), copy=True) for k, v in first.items()}


def uniform_soup(candidates: Iterable[Params]) -> dict[str, Tensor]:
    r"""The uniform soup: the mean of the candidates' parameters.

    .. math:: \theta_{\mathrm{soup}} = \frac{1}{N}\sum_{i=1}^{N} \theta^{(i)}

    Streamed as a running mean in at least float32, returned in the candidates' dtype: each
    candidate is read once, as it arrives, and dropped before the next one is loaded, so besides
    the one accumulator tree only the current candidate is alive (a list, a generator or
    :func:`lazy` of checkpoints on disk).

    Args:
        candidates: ``N >= 1`` trees with the same keys, shapes and floating dtypes (e.g. models
            fine-tuned from the same pre-trained weights with different hyper-parameters), as
            an iterable.

    Returns:
        A new tree (inputs untouched).

    Raises:
        TypeError: if ``candidates`` is not an iterable of floating-point trees (a single tree
            is not), or their dtypes differ.
        ValueError: if it is empty or the trees' keys or shapes differ.

    >>> uniform_soup([{"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}, {"w": torch.tensor([6.0])}])
    {'w': tensor([3.])}

    References:
        Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
        accuracy without increasing inference time", ICML 2022.
        Code: https://github.com/mlfoundations/model-soups
    """
    stream = Stream("uniform_soup", candidates)
    soup: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}

    def visit(i: int, c: Params) -> None:
        if i == 0:
            soup.update(_accumulator(c))
            dtypes.update((k, v.dtype) for k, v in c.items())
        else:
            tree.lerp_(soup, c, 1.0 / (i + 1))

    with torch.no_grad():
        stream.each(visit)
    return {k: v.to(dtypes[k]) for k, v in soup.items()}


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

    Streaming, two passes: each candidate is loaded once to be scored, then once more (in score
    order) to build the soup, so ``candidates`` must be a sequence -- a list, or :func:`lazy` for
    checkpoints on disk (``2N`` loads) -- not a one-shot iterator. Besides the current candidate
    at most two candidate-sized trees are alive -- the soup and the trial (a float32 soup of bf16
    candidates counts double, plus one tensor's conversion). ``evaluate`` receives the trial in
    the candidates' dtype; it is called once per candidate and once per trial (``2N - 1`` calls).

    Args:
        candidates: ``N >= 1`` trees with the same keys, shapes and floating dtypes, as a
            sequence.
        evaluate: ``(params) -> score``, higher is better (e.g. held-out accuracy through
            ``torch.func.functional_call``); a real number or a one-element tensor.
        strict: keep a candidate only on a strict improvement.

    Returns:
        ``(soup, kept)``: the soup (a new tree in the candidates' dtype) and the indices into
        ``candidates`` of its ingredients, in the order they were added.

    Raises:
        TypeError: ``candidates`` not a sequence of floating trees (a generator is not), a
            non-callable ``evaluate`` or a non-number score.
        ValueError: no candidates, mismatched trees, or a NaN score.

    >>> cands = [{"w": torch.tensor([0.0])}, {"w": torch.tensor([2.0])}, {"w": torch.tensor([9.0])}]
    >>> score = lambda p: -abs(float(p["w"]) - 1.0)  # best near w = 1
    >>> greedy_soup(cands, score)  # start at 0 (tied with 2: input order), add 2, reject 9
    ({'w': tensor([1.])}, [0, 1])

    References:
        Wortsman et al., "Model soups", ICML 2022, Recipe 1.
        Code: https://github.com/mlfoundations/model-soups
    """
    stream = Stream("greedy_soup", candidates, passes=2)
    if not callable(evaluate):
        raise TypeError(f"greedy_soup: evaluate must be callable, got {describe(evaluate)}")
    if not isinstance(strict, bool):
        raise TypeError(f"greedy_soup: strict must be a bool, got {describe(strict)}")
    scores: list[float] = []
    stream.each(lambda i, c: scores.append(_score(evaluate, dict(c), f"candidates[{i}]")))
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    soup: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    kept: list[int] = []
    best = [scores[order[0]]]

    def add(i: int, c: Params) -> None:
        if not kept:  # the best candidate starts the soup
            soup.update(_accumulator(c))
            dtypes.update((k, v.dtype) for k, v in c.items())
            kept.append(i)
            return
        w = 1.0 / (len(kept) + 1)
        trial = _trial(soup, c, w)
        score = _score(evaluate, trial, f"the soup with candidates[{i}]")
        if score > best[0] or (not strict and score == best[0]):
            kept.append(i)
            best[0] = score
            if all(trial[k].dtype == soup[k].dtype for k in soup):
                soup.update(trial)  # the trial is the new soup: nothing to recompute
            else:
                trial.clear()
                with torch.no_grad():
                    tree.lerp_(soup, c, w)

    stream.each(add, order=order)
    return {k: v.to(dtypes[k]) for k, v in soup.items()}, kept
