"""Naive references for robustft.metrics and robustft.scores, written from the definitions.

Plain Python loops over samples, pairs and bins with ``math`` in double precision: slow, obvious
and independent of the vectorised implementations they check (no sort, searchsorted, bucketize
or index_add here).
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import torch


def _rows(logits: torch.Tensor) -> list[list[float]]:
    return [[float(v) for v in row] for row in logits.double()]


def _softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _argmax(row: list[float]) -> int:
    best = 0
    for c, v in enumerate(row):
        if v > row[best]:
            best = c
    return best


def accuracy_ref(logits: torch.Tensor, labels: torch.Tensor) -> float:
    rows, ys = _rows(logits), labels.tolist()
    return sum(_argmax(r) == y for r, y in zip(rows, ys)) / len(ys)


def nll_ref(logits: torch.Tensor, labels: torch.Tensor) -> float:
    rows, ys = _rows(logits), labels.tolist()
    return -sum(math.log(_softmax(r)[y]) for r, y in zip(rows, ys)) / len(ys)


def ece_ref(logits: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> float:
    """Guo et al.'s loop: for each bin (lo, hi], |mean correct - mean confidence| * share."""
    rows, ys = _rows(logits), labels.tolist()
    conf = [max(_softmax(r)) for r in rows]
    correct = [float(_argmax(r) == y) for r, y in zip(rows, ys)]
    edges = torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64).tolist()
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        members = [i for i, c in enumerate(conf) if lo < c <= hi]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            mean_conf = sum(conf[i] for i in members) / len(members)
            total += len(members) / len(ys) * abs(acc - mean_conf)
    return total


def auroc_ref(scores: torch.Tensor, is_positive: torch.Tensor) -> float:
    """Every (positive, negative) pair: 1 if the positive scores higher, ½ on a tie."""
    s, p = scores.double().tolist(), [bool(v) for v in is_positive.tolist()]
    pos = [v for v, q in zip(s, p) if q]
    neg = [v for v, q in zip(s, p) if not q]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def fpr_at_tpr_ref(scores: torch.Tensor, is_positive: torch.Tensor, tpr: float = 0.95) -> float:
    """Threshold = the ceil(tpr * P)-th best positive score; FPR = share of negatives >= it."""
    s, p = scores.double().tolist(), [bool(v) for v in is_positive.tolist()]
    pos = sorted((v for v, q in zip(s, p) if q), reverse=True)
    neg = [v for v, q in zip(s, p) if not q]
    k = math.ceil(Fraction(repr(tpr)) * len(pos))
    threshold = pos[k - 1]
    return sum(v >= threshold for v in neg) / len(neg)


def open_set_ref(
    logits: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, threshold: float
) -> tuple[float, float, float]:
    rows, ys, s = _rows(logits), labels.tolist(), scores.double().tolist()
    classes = len(rows[0])
    per_class = []
    for c in range(classes):
        members = [i for i, y in enumerate(ys) if y == c]
        if members:
            good = sum(1 for i in members if s[i] >= threshold and _argmax(rows[i]) == c)
            per_class.append(good / len(members))
    os_star = sum(per_class) / len(per_class)
    unknown = [i for i, y in enumerate(ys) if not 0 <= y < classes]
    unk = sum(1 for i in unknown if s[i] < threshold) / len(unknown)
    hos = 0.0 if os_star + unk == 0 else 2 * os_star * unk / (os_star + unk)
    return os_star, unk, hos


def msp_ref(logits: torch.Tensor, temperature: float = 1.0) -> list[float]:
    return [max(_softmax([v / temperature for v in r])) for r in _rows(logits)]


def energy_ref(logits: torch.Tensor, temperature: float = 1.0) -> list[float]:
    out = []
    for r in _rows(logits):
        m = max(r)
        out.append(m + temperature * math.log(sum(math.exp((v - m) / temperature) for v in r)))
    return out


def entropy_score_ref(logits: torch.Tensor) -> list[float]:
    return [sum(q * math.log(q) for q in _softmax(r) if q > 0) for r in _rows(logits)]


def mcm_ref(
    image_features: torch.Tensor, text_features: torch.Tensor, temperature: float = 1.0
) -> list[float]:
    texts = _rows(text_features)
    out = []
    for f in _rows(image_features):
        nf = math.sqrt(sum(v * v for v in f))
        cos = []
        for t in texts:
            nt = math.sqrt(sum(v * v for v in t))
            cos.append(sum(a * b for a, b in zip(f, t)) / (nf * nt) / temperature)
        out.append(max(_softmax(cos)))
    return out


def harmonic_mean_ref(a: float, b: float) -> float:
    """2ab / (a + b) with exact rational arithmetic (finite inputs), 0 when a + b = 0."""
    fa, fb = Fraction(a), Fraction(b)
    return 0.0 if fa + fb == 0 else float(2 * fa * fb / (fa + fb))


def energy_gap_ref(
    features: torch.Tensor,
    reference_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float = 100.0,
) -> list[float]:
    """Per image: (1 / 2N) sum_n (s <f/|f|, t_n/|t_n|> - s <f0/|f0|, t_n/|t_n|>)^2, in loops."""

    def unit(row: list[float]) -> list[float]:
        norm = math.sqrt(sum(v * v for v in row))
        return [v / norm for v in row]

    texts = [unit(t) for t in _rows(text_features)]
    out = []
    for f, f0 in zip(_rows(features), _rows(reference_features)):
        uf, uf0 = unit(f), unit(f0)
        total = 0.0
        for t in texts:
            a = logit_scale * sum(x * y for x, y in zip(uf, t))
            b = logit_scale * sum(x * y for x, y in zip(uf0, t))
            total += (a - b) ** 2
        out.append(total / (2 * len(texts)))
    return out


def _predictions(logits: torch.Tensor) -> list[int]:
    return [_argmax(r) for r in _rows(logits)]


def macro_f1_ref(logits: torch.Tensor, labels: torch.Tensor, average_over: str = "union") -> float:
    """Per class: 2TP / (2TP + FP + FN) counted by a loop; mean over the union (or the labels)."""
    preds, ys = _predictions(logits), labels.tolist()
    classes = sorted(set(ys) | set(preds)) if average_over == "union" else sorted(set(ys))
    f1 = []
    for c in classes:
        tp = sum(1 for p, y in zip(preds, ys) if p == c and y == c)
        fp = sum(1 for p, y in zip(preds, ys) if p == c and y != c)
        fn = sum(1 for p, y in zip(preds, ys) if p != c and y == c)
        f1.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1) / len(f1)


def per_class_accuracy_ref(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the classes in the labels of the share of that class's samples predicted right."""
    preds, ys = _predictions(logits), labels.tolist()
    recalls = []
    for c in sorted(set(ys)):
        members = [i for i, y in enumerate(ys) if y == c]
        recalls.append(sum(1 for i in members if preds[i] == c) / len(members))
    return sum(recalls) / len(recalls)


def worst_group_accuracy_ref(
    logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor
) -> float:
    preds, ys, gs = _predictions(logits), labels.tolist(), groups.tolist()
    accs = []
    for g in set(gs):
        members = [i for i, h in enumerate(gs) if h == g]
        accs.append(sum(1 for i in members if preds[i] == ys[i]) / len(members))
    return min(accs)


def average_precision_ref(scores: torch.Tensor, is_positive: torch.Tensor) -> float:
    """Mean over the positives of the precision among the samples scoring at least as high.

    Equal to sum_k (R_k - R_{k-1}) P_k over the distinct thresholds: every positive in a tie group
    gets the group's precision, and each positive adds 1/P of recall.
    """
    s, p = scores.double().tolist(), [bool(v) for v in is_positive.tolist()]
    precisions = []
    for si, pi in zip(s, p):
        if pi:
            above = [q for v, q in zip(s, p) if v >= si]
            precisions.append(sum(above) / len(above))
    return sum(precisions) / len(precisions)
