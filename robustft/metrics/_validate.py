"""Argument checks shared by the metrics.

Metrics are eager evaluation code, so unlike the losses they may read tensor values to reject
inputs that would otherwise give a silently wrong number or a NaN (unknown labels where only known
classes make sense, NaN logits or scores, an evaluation set without negatives).
"""

from __future__ import annotations

import torch
from torch import Tensor

from robustft._checks import check_floating, check_labels, check_number, check_tensor
from robustft.typing import Scalar

__all__ = [
    "check_binary_targets",
    "check_finite_rows",
    "check_known_labels",
    "check_logits_labels",
    "check_no_nan",
    "check_scores",
    "check_threshold",
]


def check_logits_labels(fn: str, logits: Tensor, labels: Tensor) -> tuple[Tensor, int, int]:
    """``logits`` ``[batch, classes]`` floating, ``labels`` ``[batch]`` integer, both axes >= 1.

    Returns the labels as int64 (every integer dtype is accepted), the batch size and the number
    of classes. The logits' values are checked too (:func:`check_finite_rows`).
    """
    check_floating(fn, "logits", logits, ndim=2)
    labels = check_labels(fn, "labels", labels, batch=logits.shape[0])
    batch, classes = logits.shape
    if batch == 0 or classes == 0:
        raise ValueError(
            f"{fn}: logits must have shape [batch, classes] with batch >= 1 and classes >= 1, "
            f"got shape {tuple(logits.shape)}"
        )
    check_finite_rows(fn, logits)
    return labels, batch, classes


def check_finite_rows(fn: str, logits: Tensor) -> None:
    """Every row must have a finite maximum: no NaN, no ``+inf``, not every class ``-inf``.

    ``torch.argmax`` treats NaN as the largest value, so a NaN row would be "predicted" as the
    class holding the NaN (and count as correct when that is the label); its softmax, confidence
    and cross-entropy are NaN. Such rows come from a diverged or overflowed model and are refused
    rather than given an arbitrary meaning. A ``-inf`` logit (a masked class) is fine.
    """
    row_max = logits.detach().amax(dim=-1)
    bad = ~torch.isfinite(row_max)
    if bool(bad.any()):
        count = int(bad.sum())
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{fn}: logits must have a finite maximum in every row (no NaN, no +inf, not every "
            f"class -inf), got {count} row(s) without one (first: row {first}, maximum "
            f"{float(row_max[first])}); a diverged or overflowed model: drop those rows "
            f"(torch.isfinite(logits.amax(-1))) and count them as you see fit"
        )


def check_known_labels(fn: str, labels: Tensor, classes: int) -> None:
    """Every label must be a known class in ``[0, classes)``: no silent 'wrong' for unknowns."""
    outside = (labels < 0) | (labels >= classes)
    if bool(outside.any()):
        count = int(outside.sum())
        example = int(labels[outside][0])
        raise ValueError(
            f"{fn}: labels must be known classes in [0, {classes}), got {count} label(s) outside "
            f"it (e.g. {example}); unknown-class samples have no correct prediction: keep the "
            f"known-class samples (0 <= labels < {classes}) or use metrics.open_set / "
            f"metrics.Evaluation, which separate them"
        )


def check_no_nan(fn: str, name: str, x: Tensor) -> None:
    """Reject NaN values (they have no place in an ordering or a threshold comparison)."""
    if bool(torch.isnan(x).any()):
        raise ValueError(f"{fn}: {name} must not contain NaN, got {int(torch.isnan(x).sum())} NaN")


def check_scores(
    fn: str, scores: Tensor, batch: int | None = None, *, name: str = "scores"
) -> Tensor:
    """``scores`` ``[batch]`` floating without NaN (±inf allowed: they still order)."""
    check_floating(fn, name, scores, ndim=1)
    if batch is not None and scores.shape[0] != batch:
        raise ValueError(
            f"{fn}: {name} must have length {batch} (the batch size), got shape "
            f"{tuple(scores.shape)}"
        )
    check_no_nan(fn, name, scores)
    return scores


def check_binary_targets(
    fn: str, scores: Tensor, is_positive: Tensor, *, name: str = "is_positive"
) -> tuple[Tensor, int, int]:
    """``scores`` ``[n]`` and ``is_positive`` ``[n]`` (bool, or integers in {0, 1}).

    Returns the boolean mask and the numbers of positives and negatives, both >= 1. ``name`` is
    the mask's argument name in messages (``is_known`` for AUPR-in/out).
    """
    check_scores(fn, scores)
    check_tensor(fn, name, is_positive)
    if is_positive.is_floating_point() or is_positive.is_complex():
        raise TypeError(
            f"{fn}: {name} must be a bool tensor (or integers in {{0, 1}}), got dtype "
            f"{is_positive.dtype}"
        )
    if is_positive.shape != scores.shape:
        raise ValueError(
            f"{fn}: {name} must have the shape of scores {tuple(scores.shape)}, got shape "
            f"{tuple(is_positive.shape)}"
        )
    if is_positive.dtype != torch.bool:
        if bool(((is_positive != 0) & (is_positive != 1)).any()):
            raise ValueError(f"{fn}: {name} must contain only 0 and 1 (or be a bool tensor)")
        is_positive = is_positive != 0
    positives = int(is_positive.sum())
    negatives = int(is_positive.numel()) - positives
    if positives == 0 or negatives == 0:
        if name == "is_known":  # AUPR-in/out: the positives are the known samples
            need, got = "one known and one unknown", f"{positives} known and {negatives} unknown"
        else:
            need, got = (
                "one positive and one negative",
                (f"{positives} positive(s) and {negatives} negative(s)"),
            )
        raise ValueError(
            f"{fn}: {name} must contain at least {need} sample, got {got}; the metric is "
            f"undefined (0/0) or trivial without both"
        )
    return is_positive, positives, negatives


def check_threshold(fn: str, threshold: Scalar) -> Scalar:
    """A threshold is a real number or a 0-d floating tensor, never NaN (±inf allowed).

    Metrics are eager code, so a tensor threshold's value is read to reject NaN.
    """
    value = check_number(fn, "threshold", threshold, allow_tensor=True, finite=False)
    if isinstance(value, Tensor) and bool(torch.isnan(value)):
        raise ValueError(f"{fn}: threshold must not be NaN, got {value}")
    return value
