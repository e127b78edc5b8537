"""Naive references for the multi-positive, smoothed, margin contrastive losses (R-Adapter).

Written from the formula of MPM-NCE in Kim et al., "Efficient and Versatile Robust Fine-Tuning of
Zero-shot Models" (ECCV 2024, arXiv:2408.05749), with explicit Python loops in float64 and no
code shared with the library:

    S_ij   = s · (cos(f_i, g_j) + δ_ij),      δ_ij = 0 if y_i = y_j (positive) else δ
    ỹ_ij   = (1 − ε) · [y_i = y_j] / |P(i)| + ε · [y_i ≠ y_j] / (B − |P(i)|)
    L      = −1/(2B) · Σ_i Σ_j ỹ_ij · ( log softmax_j(S_i1 … S_iB) + log softmax_j(S_1i … S_Bi) )

Normalisation: each direction's double sum Σ_i Σ_j is divided by the batch size B and the two
directions (image → text rows, text → image columns) are averaged, i.e. the factor 1/(2B) of
CLIP's loss; the paper's temperature τ is 1/s. A row whose columns are all positives
(|P(i)| = B) has no negative to receive ε: all its mass stays on its positives (1/B each).
Without labels every pair i is its own class (y_i = i), the plain CLIP / SigLIP setting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor


def _cos(a: Tensor, b: Tensor) -> float:
    dot = sum(float(x) * float(y) for x, y in zip(a, b))
    na = math.sqrt(sum(float(x) ** 2 for x in a))
    nb = math.sqrt(sum(float(y) ** 2 for y in b))
    return dot / (na * nb)


def _log_softmax(row: Sequence[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def _log_sigmoid(u: float) -> float:
    """log σ(u), written stably for either sign of u."""
    return -math.log1p(math.exp(-u)) if u >= 0 else u - math.log1p(math.exp(u))


def _class_ids(labels: Tensor | Sequence[int] | None, batch: int) -> list[int]:
    return list(range(batch)) if labels is None else [int(v) for v in labels]


def soft_targets_ref(
    labels: Tensor | Sequence[int] | None, batch: int, smoothing: float = 0.0
) -> list[list[float]]:
    """ỹ as a B × B list of rows."""
    y = _class_ids(labels, batch)
    rows = []
    for i in range(batch):
        n_pos = sum(1 for j in range(batch) if y[i] == y[j])
        n_neg = batch - n_pos
        row = []
        for j in range(batch):
            if y[i] == y[j]:
                row.append((1.0 - smoothing) / n_pos if n_neg > 0 else 1.0 / n_pos)
            else:
                row.append(smoothing / n_neg)
        rows.append(row)
    return rows


def mpm_nce_ref(
    f: Tensor,
    g: Tensor,
    s: float,
    labels: Tensor | Sequence[int] | None = None,
    smoothing: float = 0.0,
    margin: float = 0.0,
) -> float:
    """MPM-NCE: the symmetric soft cross-entropy with multi-positive targets and a negative margin."""
    B = f.shape[0]
    y = _class_ids(labels, B)
    S = [
        [s * (_cos(f[i], g[j]) + (0.0 if y[i] == y[j] else margin)) for j in range(B)]
        for i in range(B)
    ]
    target = soft_targets_ref(labels, B, smoothing)
    image_to_text = 0.0
    text_to_image = 0.0
    for i in range(B):
        row = _log_softmax(S[i])  # image i against every text
        column = _log_softmax([S[k][i] for k in range(B)])  # text i against every image
        for j in range(B):
            image_to_text -= target[i][j] * row[j]
            text_to_image -= target[i][j] * column[j]
    return (image_to_text + text_to_image) / (2 * max(B, 1))


def sigmoid_multi_positive_ref(
    x: Tensor,
    y: Tensor,
    t: float,
    b: float,
    labels: Tensor | Sequence[int] | None = None,
    smoothing: float = 0.0,
    margin: float = 0.0,
) -> float:
    """SigLIP with same-class positives, soft binary targets (1 − ε / ε) and a negative margin.

    −(1/B) Σ_i Σ_j [ z_ij log σ(ℓ_ij) + (1 − z_ij) log σ(−ℓ_ij) ], with
    ℓ_ij = t · (cos(x_i, y_j) + δ [i, j of different classes]) + b and z_ij = 1 − ε for a
    positive pair, ε for a negative one.
    """
    B = x.shape[0]
    ids = _class_ids(labels, B)
    total = 0.0
    for i in range(B):
        for j in range(B):
            positive = ids[i] == ids[j]
            logit = t * (_cos(x[i], y[j]) + (0.0 if positive else margin)) + b
            z = 1.0 - smoothing if positive else smoothing
            total -= z * _log_sigmoid(logit) + (1.0 - z) * _log_sigmoid(-logit)
    return total / max(B, 1)
