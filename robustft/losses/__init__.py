"""Objectives of robust CLIP fine-tuning: CLIPood, UEO, Lipsum-FT and the baselines they beat.

Pure functions over tensors and parameter trees, called inside your own training loop. Features
are raw encoder outputs (L2-normalised inside); hyper-parameters are keyword-only; per-sample losses
take ``reduction="mean" | "sum" | "none"``. Every loss is a non-negative penalty to minimise except
:func:`ueo`, the one signed objective (documented there). Half-precision inputs are computed in
float32.
"""

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

__all__ = [
    "clip_contrastive",
    "context_distillation",
    "distillation",
    "energy_gap",
    "entropy",
    "feature_distillation",
    "l2sp",
    "margin_metric_logits",
    "margin_metric_softmax",
    "text_distances",
    "ueo",
    "ueo_confidence",
]
