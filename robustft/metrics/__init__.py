"""The evaluation the papers report: accuracy, calibration, OOD detection and open-set recognition.

Functions return 0-d tensors without an autograd graph (inputs are detached) and are eager
evaluation code (they may read values to reject bad input). Closed-set metrics (:func:`accuracy`,
:func:`nll`, :func:`ece`) take known-class samples only and raise on unknown labels (outside
``[0, classes)``); :func:`auroc` and :func:`fpr_at_tpr` rank scores from :mod:`robustft.scores`
(higher = known); :func:`open_set` thresholds them. Logits rows without a finite maximum (NaN,
``+inf``) are refused everywhere. :class:`Evaluation` collects per-sample scalars batch by batch
(across ranks, too) and computes all of them at once in O(samples) memory.
:func:`energy_gap` is Lipsum-FT's diagnostic of how far fine-tuning moved the features.
"""

from robustft.metrics._classification import accuracy, ece, nll
from robustft.metrics._energy_gap import energy_gap
from robustft.metrics._evaluation import Evaluation, EvaluationResult
from robustft.metrics._open_set import OpenSetResult, harmonic_mean, open_set
from robustft.metrics._ranking import auroc, fpr_at_tpr

__all__ = [
    "Evaluation",
    "EvaluationResult",
    "OpenSetResult",
    "accuracy",
    "auroc",
    "ece",
    "energy_gap",
    "fpr_at_tpr",
    "harmonic_mean",
    "nll",
    "open_set",
]
