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


# ---------------------------------------------------------------- task-vector merges


def task_arithmetic_ref(
    anchor: Tree, candidates: Sequence[Tree], scale: float | dict[str, float]
) -> Tree:
    """theta_0 + lambda * sum_i (theta_i - theta_0), key by key, in float64."""
    out = {}
    for k, a in anchor.items():
        lam = scale[k] if isinstance(scale, dict) else scale
        total = sum((c[k].double() - a.double() for c in candidates), torch.zeros_like(a.double()))
        out[k] = a.double() + lam * total
    return out


def kept_ref(density: float, n: int, official: bool = False) -> int:
    """How many entries TIES keeps: ceil(density * n) (ours), int(n * density) + 1 (official)."""
    from fractions import Fraction

    x = Fraction(str(density)) * n  # the decimal density, exactly
    if official:
        return min(int(x) + 1, n)
    return min(max(-(-x.numerator // x.denominator), 1), n)


def ties_ref(
    anchor: Tree,
    candidates: Sequence[Tree],
    density: float,
    scale: float = 1.0,
    trim: str = "global",
    official: bool = False,
) -> Tree:
    """TIES-merging from the paper's three steps, on flat float64 vectors.

    Task vectors are formed in the trees' dtype (as the library forms them in float32 for float32
    trees) and then widened. Trim: keep |tau| >= the k-th largest magnitude (a full sort), over
    the whole flattened tree or per tensor; ``official`` uses the official code's k. Elect:
    sign of the sum, zeros -> the majority sign over the whole tree. Disjoint mean of the
    non-zero trimmed entries agreeing with the elected sign.
    """
    keys = list(anchor)
    taus = [torch.cat([(c[k] - anchor[k]).double().reshape(-1) for k in keys]) for c in candidates]
    sizes = [anchor[k].numel() for k in keys]
    spans = []
    lo = 0
    for n in sizes:
        spans.append((lo, lo + n))
        lo += n
    segments = [(0, lo)] if trim == "global" else [s for s in spans if s[1] > s[0]]
    trimmed = []
    for tau in taus:
        t = tau.clone()
        for a, b in segments:
            seg = tau[a:b]
            k = kept_ref(density, b - a, official)
            threshold = seg.abs().sort(descending=True).values[k - 1]
            t[a:b] = torch.where(seg.abs() >= threshold, seg, torch.zeros_like(seg))
        trimmed.append(t)
    stacked = torch.stack(trimmed)
    gamma = torch.sign(stacked.sum(0))
    majority = torch.sign(gamma.sum())
    gamma = torch.where(gamma == 0, majority, gamma)
    merged = torch.zeros(lo, dtype=torch.float64)
    for j in range(lo):
        agree = [float(stacked[i, j]) for i in range(len(trimmed)) if stacked[i, j] * gamma[j] > 0]
        merged[j] = sum(agree) / max(1, len(agree))
    out = {}
    for k, (a, b) in zip(keys, spans):
        out[k] = anchor[k].double() + scale * merged[a:b].reshape(anchor[k].shape)
    return out


def model_stock_ref(anchor: Tree, candidates: Sequence[Tree]) -> Tree:
    """Model Stock per tensor with an explicit loop over the pairs (zero task vector: cosine 0)."""
    n = len(candidates)
    out = {}
    for k, a in anchor.items():
        taus = [(c[k].double() - a.double()).reshape(-1) for c in candidates]
        cosines = []
        for i in range(n):
            for j in range(i + 1, n):
                ni, nj = taus[i].norm(), taus[j].norm()
                if ni == 0 or nj == 0:
                    cosines.append(0.0)
                else:
                    cosines.append(float(taus[i] @ taus[j] / (ni * nj)))
        cos = sum(cosines) / len(cosines)
        den = 1 + (n - 1) * cos
        t = n * cos / den if den > 1.49e-8 else 0.0  # sqrt(float64 eps): the library's pole guard
        mean = sum(c[k].double() for c in candidates) / n
        out[k] = t * mean + (1 - t) * a.double()
    return out


def dare_expectation_ref(tau: Tensor) -> Tensor:
    """E[m * tau / (1 - p)] = tau for m ~ Bernoulli(1 - p)."""
    return tau.double()
