"""Closed-set classification metrics: accuracy, negative log-likelihood, expected calibration error.

All three are defined on known-class samples only: a label outside ``[0, classes)`` (SPEC §0's
unknown class) raises a ``ValueError`` instead of being silently counted as a mistake. Select the
known-class samples first, or use :class:`Evaluation`, which does it for you and also scores the
unknown ones. Logits whose row has no finite maximum (NaN, ``+inf``, every class ``-inf``) are
refused: ``argmax`` would pick a NaN as the prediction.

Each metric is a per-sample reduction of the logits (:func:`per_sample`: correctness, maximum
softmax probability, cross-entropy term) followed by a reduction over samples (:func:`reduce_*`).
:class:`Evaluation` keeps only those per-sample scalars and applies the same reductions, so its
results equal the functions on the concatenated logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from robustft._checks import check_int
from robustft._numerics import compute_dtype, full_precision
from robustft.metrics._validate import check_known_labels, check_logits_labels

__all__ = ["accuracy", "ece", "nll", "per_sample", "reduce_accuracy", "reduce_ece", "reduce_nll"]


def per_sample(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample ``(prediction, correct, confidence, nll_term)`` of logits (private kernel).

    ``prediction`` is the int64 argmax (ties to the lowest index); ``correct`` is bool
    ``prediction == label``; ``confidence`` the maximum softmax probability and
    ``nll_term`` the cross-entropy of the label, both in :func:`compute_dtype`. A label outside
    ``[0, classes)`` gets ``correct = False`` and the term of class 0 (callers mask it out).
    Row-wise only, so the values of a row do not depend on the batch it came in.
    """
    with torch.no_grad(), full_precision(logits):
        z = logits.detach().to(compute_dtype(logits))
        classes = z.shape[-1]
        known = (labels >= 0) & (labels < classes)
        safe = torch.where(known, labels, torch.zeros_like(labels))
        prediction = z.argmax(dim=-1)
        correct = known & (prediction == labels)
        confidence = torch.softmax(z, dim=-1).amax(dim=-1)
        nll_term = F.cross_entropy(z, safe, reduction="none")
    return prediction, correct, confidence, nll_term


def reduce_accuracy(correct: Tensor, dtype: torch.dtype) -> Tensor:
    """Fraction of ``True`` in ``correct`` ``[n]``, ``n >= 1``."""
    return correct.sum().to(dtype) / correct.numel()


def reduce_nll(nll_term: Tensor) -> Tensor:
    """Mean of the per-sample cross-entropy terms ``[n]``, ``n >= 1``."""
    return nll_term.sum() / nll_term.numel()


def reduce_ece(correct: Tensor, confidence: Tensor, num_bins: int) -> Tensor:
    """ECE of per-sample correctness and confidence ``[n]`` over right-closed equal-width bins."""
    dtype = confidence.dtype
    edges = torch.linspace(0.0, 1.0, num_bins + 1, dtype=dtype, device=confidence.device)
    # bucketize(right=False) gives i with edges[i-1] < conf <= edges[i]: bin i-1 is (lo, hi].
    # conf >= 1/classes > 0 always; the clamp guards a confidence that underflows to 0 (classes
    # beyond the dtype's range) or rounds above 1.
    idx = (torch.bucketize(confidence, edges, right=False) - 1).clamp_(0, num_bins - 1)
    gap = torch.zeros(num_bins, dtype=dtype, device=confidence.device)
    gap.index_add_(0, idx, correct.to(dtype) - confidence)
    # sum_b (n_b / N) |acc_b - conf_b| = sum_b |sum_{i in b} (correct_i - conf_i)| / N
    return gap.abs().sum() / confidence.numel()


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    r"""Top-1 accuracy.

    .. math:: \mathrm{acc} = \frac{1}{N} \sum_{i=1}^{N} [\arg\max_c z_{ic} = y_i]

    Ties in the logits go to the lowest class index (``torch.argmax``). Written by hand (one
    argmax and a count): torchmetrics' ``multiclass_accuracy(average="micro")`` computes the same
    quantity but always returns float32 (2/3 comes back as 0.6666666865 for float64 logits), and
    with its validation off counts a label of ``-1`` as a mistake instead of reporting it.

    Args:
        logits: ``[batch, classes]`` logits :math:`z` (or probabilities: only the argmax matters).
        labels: ``[batch]`` labels :math:`y` of any integer dtype, all in ``[0, classes)``.

    Returns:
        0-d tensor in :math:`[0, 1]`, in ``logits``' dtype promoted to at least float32.

    Raises:
        TypeError: if ``logits`` is not floating or ``labels`` is not an integer tensor.
        ValueError: if the shapes do not match, the batch or class axis is empty, a row of
            ``logits`` has no finite maximum (NaN, ``+inf``, all ``-inf``), or a label is outside
            ``[0, classes)`` (an unknown-class sample).

    Example:
        >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]), torch.tensor([0, 1, 1]))
        tensor(0.6667)
    """
    fn = "accuracy"
    labels, _, classes = check_logits_labels(fn, logits, labels)
    check_known_labels(fn, labels, classes)
    correct = logits.detach().argmax(dim=-1) == labels
    return reduce_accuracy(correct, compute_dtype(logits))


def nll(logits: Tensor, labels: Tensor) -> Tensor:
    r"""Negative log-likelihood of the labels: the mean cross-entropy of the logits.

    .. math::
        \mathrm{NLL} = -\frac{1}{N} \sum_{i=1}^{N} \log \operatorname{softmax}(z_i)_{y_i}

    Computed with ``torch.nn.functional.cross_entropy`` (exact log-softmax) in at least float32;
    torchmetrics has no NLL metric. Lower is better. A label whose logit is ``-inf`` (a masked
    class) has probability 0 and gives ``+inf``, the true value.

    Args:
        logits: ``[batch, classes]`` logits :math:`z`.
        labels: ``[batch]`` integer labels :math:`y`, all in ``[0, classes)``.

    Returns:
        0-d tensor :math:`\ge 0`, in ``logits``' dtype promoted to at least float32.

    Raises:
        TypeError: if ``logits`` is not floating or ``labels`` is not an integer tensor.
        ValueError: if the shapes do not match, the batch or class axis is empty, a row of
            ``logits`` has no finite maximum (NaN, ``+inf``, all ``-inf``), or a label is outside
            ``[0, classes)`` (an unknown-class sample).

    Example:
        >>> nll(torch.tensor([[0.0, 0.0], [2.0, 0.0]]), torch.tensor([0, 1]))
        tensor(1.4100)
    """
    fn = "nll"
    labels, _, classes = check_logits_labels(fn, logits, labels)
    check_known_labels(fn, labels, classes)
    *_, nll_term = per_sample(logits, labels)
    return reduce_nll(nll_term)


def ece(logits: Tensor, labels: Tensor, *, num_bins: int = 15) -> Tensor:
    r"""Expected calibration error over equal-width, right-closed confidence bins.

    .. math::
        \mathrm{ECE} = \sum_{b=1}^{M} \frac{n_b}{N} \bigl| \mathrm{acc}_b - \mathrm{conf}_b \bigr|,
        \qquad B_b = \Bigl(\frac{b-1}{M}, \frac{b}{M}\Bigr]

    where the confidence of a sample is its maximum softmax probability
    :math:`\max_c \operatorname{softmax}(z_i)_c`, its prediction :math:`\arg\max_c z_{ic}`,
    :math:`n_b` the number of samples whose confidence lies in :math:`B_b`, and
    :math:`\mathrm{acc}_b`, :math:`\mathrm{conf}_b` their accuracy and mean confidence (empty
    bins contribute 0). Lies in :math:`[0, 1]`; 0 is perfectly calibrated.

    Written by hand: torchmetrics' ``multiclass_calibration_error`` bins left-closed,
    :math:`[\frac{b-1}{M}, \frac{b}{M})` (``bucketize(right=True) - 1``), so a confidence on a
    boundary lands one bin higher than in the right-closed convention of Guo et al.'s code, and it
    treats logits that happen to lie in :math:`[0, 1]` as probabilities (no softmax). Bin
    boundaries are ``torch.linspace(0, 1, M + 1)`` in the compute dtype, compared as
    ``lo < conf <= hi``.

    Args:
        logits: ``[batch, classes]`` logits :math:`z`.
        labels: ``[batch]`` integer labels, all in ``[0, classes)``.
        num_bins: number of bins :math:`M \ge 1` (15 in the papers).

    Returns:
        0-d tensor in :math:`[0, 1]`, in ``logits``' dtype promoted to at least float32.

    Raises:
        TypeError: if ``logits`` is not floating, ``labels`` not an integer tensor, or
            ``num_bins`` not an int.
        ValueError: if the shapes do not match, the batch or class axis is empty, a row of
            ``logits`` has no finite maximum, a label is outside ``[0, classes)``, or
            ``num_bins < 1``.

    Example:
        >>> logits = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 0.0]])
        >>> ece(logits, torch.tensor([0, 0, 1]), num_bins=2)
        tensor(0.6509)

    References:
        Guo et al., "On Calibration of Modern Neural Networks", ICML 2017.
        Code: https://github.com/gpleiss/temperature_scaling
    """
    fn = "ece"
    labels, _, classes = check_logits_labels(fn, logits, labels)
    num_bins = check_int(fn, "num_bins", num_bins, low=1)
    check_known_labels(fn, labels, classes)
    _, correct, confidence, _ = per_sample(logits, labels)
    return reduce_ece(correct, confidence, num_bins)
