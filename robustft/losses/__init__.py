"""Objectives of robust CLIP fine-tuning: CLIPood, UEO, Lipsum-FT, CaRot and their baselines.

Pure functions over tensors and parameter trees, called inside your own training loop. Features
are raw encoder outputs (L2-normalised inside); hyper-parameters and the reference (frozen,
pre-trained, teacher) side of two-sided losses are keyword-only (``l2sp(params, anchor=θ0)``,
``distillation(logits, teacher_logits=z0)``); per-sample losses take
``reduction="mean" | "sum" | "none"``. Every loss is a non-negative penalty to minimise except
:func:`ueo`, the one signed objective (documented there). Half-precision inputs are computed in
float32, and results stay float32 under autocast.

Empty batches: ``reduction="none"`` gives ``[0]``, ``"sum"`` and ``"mean"`` give 0 (not the NaN of
0 / 0), with a zero gradient; the coupled losses (:func:`ueo`, :func:`clip_contrastive`,
:func:`sigmoid_contrastive`) give 0 likewise, and with ``group=`` a rank with an empty local
batch takes part in every collective.
"""

from robustft._checks import keyword_hints
from robustft.losses._contrastive import clip_contrastive
from robustft.losses._distillation import (
    context_distillation,
    distillation,
    feature_distillation,
)
from robustft.losses._energy_gap import energy_gap
from robustft.losses._entropy import entropy, ueo, ueo_confidence
from robustft.losses._l2sp import l2sp
from robustft.losses._margin import margin_metric_logits, margin_metric_softmax, text_distances
from robustft.losses._orthogonality import orthogonality
from robustft.losses._relational import (
    contrastive_relational_distillation,
    cross_distillation,
    interaction_distillation,
)
from robustft.losses._sigmoid import sigmoid_contrastive

__all__ = [
    "clip_contrastive",
    "context_distillation",
    "contrastive_relational_distillation",
    "cross_distillation",
    "distillation",
    "energy_gap",
    "entropy",
    "feature_distillation",
    "interaction_distillation",
    "l2sp",
    "margin_metric_logits",
    "margin_metric_softmax",
    "orthogonality",
    "sigmoid_contrastive",
    "text_distances",
    "ueo",
    "ueo_confidence",
]

keyword_hints(
    globals(),
    [
        "context_distillation",
        "contrastive_relational_distillation",
        "cross_distillation",
        "distillation",
        "energy_gap",
        "feature_distillation",
        "interaction_distillation",
        "l2sp",
    ],
    renamed={"distillation": {"student_logits": "was renamed logits="}},
)
