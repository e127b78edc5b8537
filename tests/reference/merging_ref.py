"""Naive references for robustft.merging, written from the papers with explicit loops.

Float64 throughout, the WiSE-FT formula as written in the paper and the model soups recipe as the
official code (mlfoundations/model-soups) runs it: no code path shared with the library.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Tree = dict[str, Tensor]


def wise_ref(anchor: Tree, params: Tree, alpha: float) -> Tree:
    """(1 - alpha) * theta_0 + alpha * theta_ft, key by key, in float64."""
    return {k: (1 - alpha) * anchor[k].double() + alpha * params[k].double() for k in anchor}


def uniform_ref(candidates: Sequence[Tree]) -> Tree:
    """The plain mean of the candidates, in float64."""
    out = {}
    for k in candidates[0]:
        acc = torch.zeros_like(candidates[0][k], dtype=torch.float64)
        for c in candidates:
            acc = acc + c[k].double()
        out[k] = acc / len(candidates)
    return out


def greedy_soup_ref(
    candidates: Sequence[Tree],
    evaluate: Callable[[Tree], float],
    strict: bool = True,
    official_ties: bool = False,
) -> tuple[Tree, list[int]]:
    """Recipe 1 of model soups (ingredients kept on ``>``, or ``>=`` when not ``strict``).

    ``official_ties`` sorts as the official code does -- ascending, then ``list.reverse()`` --
    which puts the *latest* of tied candidates first; otherwise a stable descending sort (the
    earliest first).
    """
    scores = [evaluate(c) for c in candidates]
    if official_ties:
        order = sorted(range(len(candidates)), key=lambda i: scores[i])
        order.reverse()
    else:
        order = sorted(range(len(candidates)), key=lambda i: scores[i], reverse=True)
    soup = {k: v.double().clone() for k, v in candidates[order[0]].items()}
    kept, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        n = len(kept)
        trial = {
            k: soup[k] * (n / (n + 1.0)) + candidates[i][k].double() * (1.0 / (n + 1)) for k in soup
        }
        score = evaluate(trial)
        if score > best or (not strict and score >= best):
            soup, best = trial, score
            kept.append(i)
    return soup, kept
