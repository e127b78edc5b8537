"""The evaluation the papers report: accuracy, calibration, OOD detection and open-set recognition.

Functions return 0-d tensors without an autograd graph (inputs are detached) and are eager
evaluation code (they may read values to reject bad input). Closed-set metrics (:func:`accuracy`, :func:`nll`, :func:`ece`) take known-class samples
only and raise on unknown labels (outside ``[0, classes)``); :func:`auroc` and :func:`fpr_at_tpr`
rank scores from :mod:`robustft.scores` (higher = known); :func:`open_set` thresholds them.
:class:`Evaluation` collects batches (across ranks, too) and computes all of them at once.
"""

from robustft.metrics._classification import accuracy, ece, nll
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
    "fpr_at_tpr",
    "harmonic_mean",
    "nll",
    "open_set",
]
