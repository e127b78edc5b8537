"""The evaluation the papers report: accuracy, calibration, OOD detection and open-set recognition.

Functions return 0-d tensors without an autograd graph (inputs are detached) and are eager
evaluation code (they may read values to reject bad input). Closed-set metrics (:func:`accuracy`,
:func:`per_class_accuracy`, :func:`macro_f1`, :func:`worst_group_accuracy`, :func:`nll`,
:func:`ece`) take known-class samples only and raise on unknown labels (outside
``[0, classes)``); :func:`auroc`, :func:`aupr_in`, :func:`aupr_out` and :func:`fpr_at_tpr` rank
scores from :mod:`robustft.scores` (higher = known); :func:`open_set` thresholds them. Logits rows without a finite maximum (NaN,
``+inf``) are refused everywhere. :class:`Evaluation` collects per-sample scalars batch by batch
(across ranks, too) and computes all of them at once in O(samples) memory.
:func:`energy_gap` is Lipsum-FT's diagnostic of how far fine-tuning moved the features.
"""

from robustft._checks import keyword_hints
from robustft.metrics._classification import accuracy, ece, nll
from robustft.metrics._energy_gap import energy_gap
from robustft.metrics._evaluation import Evaluation, EvaluationResult
from robustft.metrics._open_set import OpenSetResult, harmonic_mean, open_set
from robustft.metrics._ranking import aupr_in, aupr_out, auroc, fpr_at_tpr
from robustft.metrics._suite import macro_f1, per_class_accuracy, worst_group_accuracy

__all__ = [
    "Evaluation",
    "EvaluationResult",
    "OpenSetResult",
    "accuracy",
    "aupr_in",
    "aupr_out",
    "auroc",
    "ece",
    "energy_gap",
    "fpr_at_tpr",
    "harmonic_mean",
    "macro_f1",
    "nll",
    "open_set",
    "per_class_accuracy",
    "worst_group_accuracy",
]

keyword_hints(globals(), ["energy_gap"])
