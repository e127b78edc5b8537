"""Every raise of robustft.losses: the error names the function and the argument.

Table-driven: each case names the public function it exercises, and a test checks that the table
covers every name in ``robustft.losses.__all__`` (a new loss cannot ship without error tests).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch

from robustft import losses as L

f = torch.randn(4, 3)
f5 = torch.randn(5, 3)
f_nodim = torch.randn(4, 0)
text = torch.randn(6, 3)
y = torch.tensor([0, 1, 2, 3])
z = torch.randn(4, 6)
w = torch.rand(4) + 0.1
i_feat = torch.ones(4, 3, dtype=torch.long)
INF = float("inf")
POS = r"\(0(\.0)?, inf\)"  # the interval of a positive scale or temperature


class Case(NamedTuple):
    id: str
    fn: str  # the public function exercised
    call: Callable[[], Any]
    exc: type[Exception]
    match: str


CASES: list[Case] = [
    # ------------------------------------------------------------ margin metric softmax / logits
    Case(
        "mms batch",
        "margin_metric_softmax",
        lambda: L.margin_metric_softmax(f5, text, y),
        ValueError,
        r"margin_metric_softmax: labels must have length 5",
    ),
    Case(
        "mms dim",
        "margin_metric_softmax",
        lambda: L.margin_metric_softmax(f, torch.randn(6, 4), y),
        ValueError,
        r"margin_metric_softmax: image_features.shape\[1\] must equal text_features.shape\[1\]",
    ),
    Case(
        "mms rank",
        "margin_metric_softmax",
        lambda: L.margin_metric_softmax(f[0], text, y),
        ValueError,
        r"margin_metric_softmax: image_features must have 2 dimension",
    ),
    Case(
        "mms text rank",
        "margin_metric_softmax",
        lambda: L.margin_metric_softmax(f, text[None], y),
        ValueError,
        r"margin_metric_softmax: text_features must have 2 dimension",
    ),
    Case(
        "mms empty feature axis",
        "margin_metric_softmax",
        lambda: L.margin_metric_softmax(f_nodim, text[:, :0], y),
        ValueError,
        r"margin_metric_softmax: image_features must have a non-empty feature axis \(dim 1\), "
        r"got shape \(4, 0\)",
    ),
    Case(
        "mms int",
        "margin_metric_softmax",
        lambda: L.margin_metric_softmax(i_feat, text, y),
        TypeError,
        r"margin_metric_softmax: image_features must be a floating-point tensor",
    ),
    Case(
        "mms label dtype",
        "margin_metric_softmax",
        lambda: L.margin_metric_softmax(f, text, y.float()),
        TypeError,
        r"margin_metric_softmax: labels must be an integer tensor",
    ),
    Case(
        "mms bool labels",
        "margin_metric_softmax",
        lambda: L.margin_metric_softmax(f, text, y > 1),
        TypeError,
        r"margin_metric_softmax: labels must be an integer tensor.*, got dtype torch.bool",
    ),
    Case(
        "mms label range",
        "margin_metric_softmax",
        lambda: L.margin_metric_softmax(f, text, torch.tensor([0, 6, 1, 2])),
        ValueError,
        r"margin_metric_softmax: labels must be in \[0, 6\)",
    ),
    Case(
        "mms label range int16",
        "margin_metric_softmax",
        lambda: L.margin_metric_softmax(f, text, torch.tensor([0, 6, 1, 2], dtype=torch.int16)),
        ValueError,
        r"margin_metric_softmax: labels must be in \[0, 6\)",
    ),
    Case(
        "mms margin",
        "margin_metric_softmax",
        lambda: L.margin_metric_softmax(f, text, y, margin=-0.1),
        ValueError,
        r"margin_metric_softmax: margin must be in \[0(\.0)?, inf\)",
    ),
    Case(
        "mms margin inf",
        "margin_metric_softmax",
        lambda: L.margin_metric_softmax(f, text, y, margin=INF),
        ValueError,
        r"margin_metric_softmax: margin must be a finite number",
    ),
    Case(
        "mms scale",
        "margin_metric_softmax",
        lambda: L.margin_metric_softmax(f, text, y, logit_scale=0.0),
        ValueError,
        r"margin_metric_softmax: logit_scale must be in " + POS,
    ),
    Case(
        "mms scale inf",
        "margin_metric_softmax",
        lambda: L.margin_metric_softmax(f, text, y, logit_scale=INF),
        ValueError,
        r"margin_metric_softmax: logit_scale must be a finite number in " + POS + ", got inf",
    ),
    Case(
        "mms scale nan",
        "margin_metric_softmax",
        lambda: L.margin_metric_softmax(f, text, y, logit_scale=np.float64("nan")),
        ValueError,
        r"margin_metric_softmax: logit_scale must not be NaN",
    ),
    Case(
        "mms scale type",
        "margin_metric_softmax",
        lambda: L.margin_metric_softmax(f, text, y, logit_scale="100"),
        TypeError,
        r"margin_metric_softmax: logit_scale must be a real number",
    ),
    Case(
        "mms scale bool",
        "margin_metric_softmax",
        lambda: L.margin_metric_softmax(f, text, y, logit_scale=True),
        TypeError,
        r"margin_metric_softmax: logit_scale must be a real number or a 0-d floating tensor, "
        r"got True",
    ),
    Case(
        "mms reduction",
        "margin_metric_softmax",
        lambda: L.margin_metric_softmax(f, text, y, reduction="avg"),
        ValueError,
        r"margin_metric_softmax: reduction must be one of 'mean', 'sum', 'none', got 'avg'",
    ),
    Case(
        "mms dist shape",
        "margin_metric_softmax",
        lambda: L.margin_metric_softmax(f, text, y, text_distances=torch.zeros(5, 5)),
        ValueError,
        r"margin_metric_softmax: text_distances must have shape \(6, 6\)",
    ),
    Case(
        "mms no classes",
        "margin_metric_softmax",
        lambda: L.margin_metric_softmax(f, text[:0], y),
        ValueError,
        r"margin_metric_softmax: text_features must hold at least one class, got shape \(0, 3\)",
    ),
    Case(
        "mml label range",
        "margin_metric_logits",
        lambda: L.margin_metric_logits(f, text, torch.tensor([0, -1, 1, 2])),
        ValueError,
        r"margin_metric_logits: labels must be in \[0, 6\)",
    ),
    Case(
        "mml dist dtype",
        "margin_metric_logits",
        lambda: L.margin_metric_logits(
            f, text, y, text_distances=torch.zeros(6, 6, dtype=torch.long)
        ),
        TypeError,
        r"margin_metric_logits: text_distances must be a floating-point tensor",
    ),
    Case(
        "mml empty feature axis",
        "margin_metric_logits",
        lambda: L.margin_metric_logits(f, text[:, :0], y),
        ValueError,
        r"margin_metric_logits: text_features must have a non-empty feature axis \(dim 1\), got "
        r"shape \(6, 0\)",
    ),
    Case(
        "mml no classes",
        "margin_metric_logits",
        lambda: L.margin_metric_logits(f, text[:0], y),
        ValueError,
        r"margin_metric_logits: text_features must hold at least one class",
    ),
    Case(
        "text_distances rank",
        "text_distances",
        lambda: L.text_distances(text[0]),
        ValueError,
        r"text_distances: text_features must have 2 dimension",
    ),
    Case(
        "text_distances int",
        "text_distances",
        lambda: L.text_distances(i_feat),
        TypeError,
        r"text_distances: text_features must be a floating-point tensor",
    ),
    Case(
        "text_distances empty feature axis",
        "text_distances",
        lambda: L.text_distances(f_nodim),
        ValueError,
        r"text_distances: text_features must have a non-empty feature axis",
    ),
    # ------------------------------------------------------------ entropy
    Case(
        "entropy 0-d",
        "entropy",
        lambda: L.entropy(torch.tensor(1.0)),
        ValueError,
        r"entropy: logits must have at least 1 dimension",
    ),
    Case(
        "entropy int",
        "entropy",
        lambda: L.entropy(torch.ones(3, dtype=torch.long)),
        TypeError,
        r"entropy: logits must be a floating-point tensor",
    ),
    Case(
        "entropy dim",
        "entropy",
        lambda: L.entropy(z, dim=2),
        ValueError,
        r"entropy: dim must be in \[-2, 2\)",
    ),
    Case(
        "entropy dim type",
        "entropy",
        lambda: L.entropy(z, dim=1.0),
        TypeError,
        r"entropy: dim must be an int",
    ),
    Case(
        "entropy no classes",
        "entropy",
        lambda: L.entropy(torch.zeros(3, 0, 2), dim=1),
        ValueError,
        r"entropy: logits must have at least one class along dim 1, got shape \(3, 0, 2\)",
    ),
    # ------------------------------------------------------------ ueo
    Case(
        "ueo batch",
        "ueo",
        lambda: L.ueo(z, torch.rand(5) + 0.1),
        ValueError,
        r"ueo: confidence.shape\[0\] must equal logits.shape\[0\]",
    ),
    Case("ueo rank", "ueo", lambda: L.ueo(z[0], w), ValueError, r"ueo: logits must have 2 dim"),
    Case(
        "ueo conf rank",
        "ueo",
        lambda: L.ueo(z, w[:, None]),
        ValueError,
        r"ueo: confidence must have 1 dimension",
    ),
    Case(
        "ueo int",
        "ueo",
        lambda: L.ueo(z.long(), w),
        TypeError,
        r"ueo: logits must be a floating-point",
    ),
    Case(
        "ueo conf int",
        "ueo",
        lambda: L.ueo(z, torch.ones(4, dtype=torch.long)),
        TypeError,
        r"ueo: confidence must be a floating-point",
    ),
    Case(
        "ueo conf zero",
        "ueo",
        lambda: L.ueo(z, torch.tensor([0.5, 0.0, 0.2, 0.1])),
        ValueError,
        r"ueo: confidence must be > 0 everywhere, got 0.0",
    ),
    Case(
        "ueo conf neg",
        "ueo",
        lambda: L.ueo(z, torch.tensor([0.5, 0.3, -0.2, 0.1])),
        ValueError,
        r"ueo: confidence must be > 0 everywhere, got -0.2",
    ),
    Case(
        "ueo no classes",
        "ueo",
        lambda: L.ueo(z[:, :0], w),
        ValueError,
        r"ueo: logits must have at least one class \(dim 1\), got shape \(4, 0\)",
    ),
    Case(
        "ueo trade_off",
        "ueo",
        lambda: L.ueo(z, w, trade_off=-1.0),
        ValueError,
        r"ueo: trade_off must be in \[0(\.0)?, inf\)",
    ),
    Case(
        "ueo trade_off inf",
        "ueo",
        lambda: L.ueo(z, w, trade_off=INF),
        ValueError,
        r"ueo: trade_off must be a finite number",
    ),
    Case(
        "ueo group str",
        "ueo",
        lambda: L.ueo(z, w, group="world"),
        TypeError,
        r"ueo: group must be a torch.distributed ProcessGroup or None, got 'world'",
    ),
    Case(
        "ueo group int",
        "ueo",
        lambda: L.ueo(z, w, group=0),
        TypeError,
        r"ueo: group must be a torch.distributed ProcessGroup or None, got 0",
    ),
    # ------------------------------------------------------------ ueo_confidence
    Case(
        "conf rank",
        "ueo_confidence",
        lambda: L.ueo_confidence(z[0]),
        ValueError,
        r"ueo_confidence: zero_shot_logits must have 2 dimension",
    ),
    Case(
        "conf scale",
        "ueo_confidence",
        lambda: L.ueo_confidence(z, scale=-1.0),
        ValueError,
        r"ueo_confidence: scale must be in " + POS,
    ),
    Case(
        "conf scale inf",
        "ueo_confidence",
        lambda: L.ueo_confidence(z, scale=np.float32("inf")),
        ValueError,
        r"ueo_confidence: scale must be a finite number",
    ),
    Case(
        "conf scale tensor rank",
        "ueo_confidence",
        lambda: L.ueo_confidence(z, scale=torch.ones(1)),
        TypeError,
        r"ueo_confidence: scale must be a real number or a 0-d floating tensor",
    ),
    Case(
        "conf int",
        "ueo_confidence",
        lambda: L.ueo_confidence(z.long()),
        TypeError,
        r"ueo_confidence: zero_shot_logits must be a floating-point",
    ),
    Case(
        "conf no class",
        "ueo_confidence",
        lambda: L.ueo_confidence(z[:, :0]),
        ValueError,
        r"ueo_confidence: zero_shot_logits must hold at least one class",
    ),
    # ------------------------------------------------------------ energy gap
    Case(
        "eg batch",
        "energy_gap",
        lambda: L.energy_gap(f, reference_features=f5, text_features=text),
        ValueError,
        r"energy_gap: features.shape\[0\] must equal reference_features.shape\[0\]",
    ),
    Case(
        "eg dim",
        "energy_gap",
        lambda: L.energy_gap(f, reference_features=f, text_features=torch.randn(6, 2)),
        ValueError,
        r"energy_gap: text_features.shape\[1\] must equal features.shape\[1\]",
    ),
    Case(
        "eg ref dim",
        "energy_gap",
        lambda: L.energy_gap(f, reference_features=torch.randn(4, 2), text_features=text),
        ValueError,
        r"energy_gap: features.shape\[1\] must equal reference_features.shape\[1\]",
    ),
    Case(
        "eg rank",
        "energy_gap",
        lambda: L.energy_gap(f[0], reference_features=f[0], text_features=text),
        ValueError,
        r"energy_gap: features must have 2 dimension",
    ),
    Case(
        "eg empty feature axis",
        "energy_gap",
        lambda: L.energy_gap(f_nodim, reference_features=f_nodim, text_features=text[:, :0]),
        ValueError,
        r"energy_gap: features must have a non-empty feature axis",
    ),
    Case(
        "eg int",
        "energy_gap",
        lambda: L.energy_gap(f, reference_features=i_feat, text_features=text),
        TypeError,
        r"energy_gap: reference_features must be a floating-point",
    ),
    Case(
        "eg not tensor",
        "energy_gap",
        lambda: L.energy_gap(f, reference_features=f, text_features=[[1.0, 2.0, 3.0]]),
        TypeError,
        r"energy_gap: text_features must be a torch.Tensor",
    ),
    Case(
        "eg no texts",
        "energy_gap",
        lambda: L.energy_gap(f, reference_features=f, text_features=text[:0]),
        ValueError,
        r"energy_gap: text_features must hold at least one text",
    ),
    Case(
        "eg scale",
        "energy_gap",
        lambda: L.energy_gap(f, reference_features=f, text_features=text, logit_scale=-2.0),
        ValueError,
        r"energy_gap: logit_scale must be in " + POS,
    ),
    Case(
        "eg scale inf",
        "energy_gap",
        lambda: L.energy_gap(f, reference_features=f, text_features=text, logit_scale=INF),
        ValueError,
        r"energy_gap: logit_scale must be a finite number",
    ),
    Case(
        "eg reduction",
        "energy_gap",
        lambda: L.energy_gap(f, reference_features=f, text_features=text, reduction=None),
        TypeError,
        r"energy_gap: reduction must be one of",
    ),
    # ------------------------------------------------------------ distillation
    Case(
        "kd batch",
        "distillation",
        lambda: L.distillation(z, teacher_logits=torch.randn(5, 6)),
        ValueError,
        r"distillation: teacher_logits.shape\[0\] must equal logits.shape\[0\]",
    ),
    Case(
        "kd classes",
        "distillation",
        lambda: L.distillation(z, teacher_logits=torch.randn(4, 5)),
        ValueError,
        r"distillation: teacher_logits.shape\[1\] must equal logits.shape\[1\]",
    ),
    Case(
        "kd no classes",
        "distillation",
        lambda: L.distillation(z[:, :0], teacher_logits=z[:, :0]),
        ValueError,
        r"distillation: logits must have at least one class \(dim 1\), got shape \(4, 0\)",
    ),
    Case(
        "kd rank",
        "distillation",
        lambda: L.distillation(z[0], teacher_logits=z[0]),
        ValueError,
        r"distillation: logits must have 2 dimension",
    ),
    Case(
        "kd int",
        "distillation",
        lambda: L.distillation(z, teacher_logits=z.long()),
        TypeError,
        r"distillation: teacher_logits must be a floating-point",
    ),
    Case(
        "kd temperature 0",
        "distillation",
        lambda: L.distillation(z, teacher_logits=z, temperature=0.0),
        ValueError,
        r"distillation: temperature must be in " + POS + ", got 0.0",
    ),
    Case(
        "kd temperature neg",
        "distillation",
        lambda: L.distillation(z, teacher_logits=z, temperature=-1),
        ValueError,
        r"distillation: temperature must be in " + POS + ", got -1",
    ),
    Case(
        "kd temperature inf",
        "distillation",
        lambda: L.distillation(z, teacher_logits=z, temperature=INF),
        ValueError,
        r"distillation: temperature must be a finite number in " + POS + ", got inf",
    ),
    Case(
        "kd temperature tensor rank",
        "distillation",
        lambda: L.distillation(z, teacher_logits=z, temperature=torch.ones(2)),
        TypeError,
        r"distillation: temperature must be a real number or a 0-d floating tensor",
    ),
    Case(
        "kd temperature int tensor",
        "distillation",
        lambda: L.distillation(z, teacher_logits=z, temperature=torch.tensor(2)),
        TypeError,
        r"distillation: temperature must be a real number or a 0-d floating tensor",
    ),
    Case(
        "kd reduction",
        "distillation",
        lambda: L.distillation(z, teacher_logits=z, reduction="max"),
        ValueError,
        r"distillation: reduction must be one of",
    ),
    # ------------------------------------------------------------ context distillation
    Case(
        "car batch",
        "context_distillation",
        lambda: L.context_distillation(f, reference_features=f5, context_features=text),
        ValueError,
        r"context_distillation: features.shape\[0\] must equal reference_features.shape\[0\]",
    ),
    Case(
        "car ctx dim",
        "context_distillation",
        lambda: L.context_distillation(f, reference_features=f, context_features=torch.randn(6, 2)),
        ValueError,
        r"context_distillation: context_features.shape\[1\] must equal features.shape\[1\]",
    ),
    Case(
        "car rank",
        "context_distillation",
        lambda: L.context_distillation(f, reference_features=f, context_features=text[0]),
        ValueError,
        r"context_distillation: context_features must have 2 dimension",
    ),
    Case(
        "car no contexts",
        "context_distillation",
        lambda: L.context_distillation(f, reference_features=f, context_features=text[:0]),
        ValueError,
        r"context_distillation: context_features must hold at least one context",
    ),
    Case(
        "car empty feature axis",
        "context_distillation",
        lambda: L.context_distillation(
            f_nodim, reference_features=f_nodim, context_features=text[:, :0]
        ),
        ValueError,
        r"context_distillation: features must have a non-empty feature axis",
    ),
    Case(
        "car int",
        "context_distillation",
        lambda: L.context_distillation(i_feat, reference_features=f, context_features=text),
        TypeError,
        r"context_distillation: features must be a floating-point",
    ),
    Case(
        "car temperature",
        "context_distillation",
        lambda: L.context_distillation(
            f, reference_features=f, context_features=text, temperature=-0.5
        ),
        ValueError,
        r"context_distillation: temperature must be in " + POS,
    ),
    Case(
        "car temperature inf",
        "context_distillation",
        lambda: L.context_distillation(
            f, reference_features=f, context_features=text, temperature=INF
        ),
        ValueError,
        r"context_distillation: temperature must be a finite number",
    ),
    Case(
        "car scale",
        "context_distillation",
        lambda: L.context_distillation(
            f, reference_features=f, context_features=text, logit_scale=0
        ),
        ValueError,
        r"context_distillation: logit_scale must be in " + POS,
    ),
    Case(
        "car reduction",
        "context_distillation",
        lambda: L.context_distillation(
            f, reference_features=f, context_features=text, reduction="avg"
        ),
        ValueError,
        r"context_distillation: reduction must be one of",
    ),
    # ------------------------------------------------------------ feature distillation
    Case(
        "featkd batch",
        "feature_distillation",
        lambda: L.feature_distillation(f, reference_features=f5),
        ValueError,
        r"feature_distillation: features.shape\[0\] must equal reference_features.shape\[0\]",
    ),
    Case(
        "featkd rank",
        "feature_distillation",
        lambda: L.feature_distillation(f, reference_features=f[None]),
        ValueError,
        r"feature_distillation: reference_features must have 2 dimension",
    ),
    Case(
        "featkd empty feature axis",
        "feature_distillation",
        lambda: L.feature_distillation(f_nodim, reference_features=f_nodim),
        ValueError,
        r"feature_distillation: features must have a non-empty feature axis",
    ),
    Case(
        "featkd int",
        "feature_distillation",
        lambda: L.feature_distillation(i_feat, reference_features=f),
        TypeError,
        r"feature_distillation: features must be a floating-point",
    ),
    Case(
        "featkd reduction",
        "feature_distillation",
        lambda: L.feature_distillation(f, reference_features=f, reduction="MEAN"),
        ValueError,
        r"feature_distillation: reduction must be one of",
    ),
    # ------------------------------------------------------------ l2sp
    Case(
        "l2sp missing",
        "l2sp",
        lambda: L.l2sp({"a": f}, anchor={"a": f, "b": f}),
        ValueError,
        r"l2sp: params must have all the keys of anchor; missing keys \['b'\]",
    ),
    Case(
        "l2sp shape",
        "l2sp",
        lambda: L.l2sp({"a": f}, anchor={"a": f5}),
        ValueError,
        r"l2sp: anchor and params must have the same shape at every key",
    ),
    Case(
        "l2sp not tree",
        "l2sp",
        lambda: L.l2sp([f], anchor={"a": f}),
        TypeError,
        r"l2sp: params must be a mapping",
    ),
    Case(
        "l2sp leaf",
        "l2sp",
        lambda: L.l2sp({"a": f}, anchor={"a": 1.0}),
        TypeError,
        r"l2sp: anchor must have torch.Tensor leaves",
    ),
    Case(
        "l2sp int anchor",
        "l2sp",
        lambda: L.l2sp({"a": f}, anchor={"a": i_feat}),
        TypeError,
        r"l2sp: anchor must hold floating-point tensors only, got torch.int64 at keys \['a'\]",
    ),
    Case(
        "l2sp int params",
        "l2sp",
        lambda: L.l2sp({"a": i_feat, "b": f}, anchor={"a": f}),
        TypeError,
        r"l2sp: params must hold floating-point tensors at the anchored keys, got torch.int64 at "
        r"keys \['a'\]",
    ),
    Case(
        "l2sp device",
        "l2sp",
        lambda: L.l2sp({"a": f}, anchor={"a": torch.empty(4, 3, device="meta")}),
        ValueError,
        r"l2sp: anchor must be on the device of params at every anchored key .*got meta and cpu "
        r"at keys \['a'\]",
    ),
    # ------------------------------------------------------------ clip contrastive
    Case(
        "clip batch",
        "clip_contrastive",
        lambda: L.clip_contrastive(f, f5),
        ValueError,
        r"clip_contrastive: image_features.shape\[0\] must equal text_features.shape\[0\]",
    ),
    Case(
        "clip rank",
        "clip_contrastive",
        lambda: L.clip_contrastive(f[0], f[0]),
        ValueError,
        r"clip_contrastive: image_features must have 2 dimension",
    ),
    Case(
        "clip empty feature axis",
        "clip_contrastive",
        lambda: L.clip_contrastive(f_nodim, f_nodim),
        ValueError,
        r"clip_contrastive: image_features must have a non-empty feature axis",
    ),
    Case(
        "clip int",
        "clip_contrastive",
        lambda: L.clip_contrastive(f, i_feat),
        TypeError,
        r"clip_contrastive: text_features must be a floating-point",
    ),
    Case(
        "clip scale",
        "clip_contrastive",
        lambda: L.clip_contrastive(f, f, logit_scale=-1.0),
        ValueError,
        r"clip_contrastive: logit_scale must be in " + POS,
    ),
    Case(
        "clip scale inf",
        "clip_contrastive",
        lambda: L.clip_contrastive(f, f, logit_scale=INF),
        ValueError,
        r"clip_contrastive: logit_scale must be a finite number",
    ),
    Case(
        "clip scale tensor",
        "clip_contrastive",
        lambda: L.clip_contrastive(f, f, logit_scale=torch.ones(2)),
        TypeError,
        r"clip_contrastive: logit_scale must be a real number or a 0-d floating tensor",
    ),
    Case(
        "clip group",
        "clip_contrastive",
        lambda: L.clip_contrastive(f, f, group=0),
        TypeError,
        r"clip_contrastive: group must be a torch.distributed ProcessGroup or None, got 0",
    ),
    # ------------------------------------------------------------ sigmoid (SigLIP) contrastive
    Case(
        "siglip batch",
        "sigmoid_contrastive",
        lambda: L.sigmoid_contrastive(f, f5, logit_scale=10.0, logit_bias=-10.0),
        ValueError,
        r"sigmoid_contrastive: image_features.shape\[0\] must equal text_features.shape\[0\]",
    ),
    Case(
        "siglip dim",
        "sigmoid_contrastive",
        lambda: L.sigmoid_contrastive(f, torch.randn(4, 2), logit_scale=10.0, logit_bias=-10.0),
        ValueError,
        r"sigmoid_contrastive: image_features.shape\[1\] must equal text_features.shape\[1\]",
    ),
    Case(
        "siglip rank",
        "sigmoid_contrastive",
        lambda: L.sigmoid_contrastive(f[0], f[0], logit_scale=10.0, logit_bias=-10.0),
        ValueError,
        r"sigmoid_contrastive: image_features must have 2 dimension",
    ),
    Case(
        "siglip empty feature axis",
        "sigmoid_contrastive",
        lambda: L.sigmoid_contrastive(f_nodim, f_nodim, logit_scale=10.0, logit_bias=-10.0),
        ValueError,
        r"sigmoid_contrastive: image_features must have a non-empty feature axis",
    ),
    Case(
        "siglip int",
        "sigmoid_contrastive",
        lambda: L.sigmoid_contrastive(f, i_feat, logit_scale=10.0, logit_bias=-10.0),
        TypeError,
        r"sigmoid_contrastive: text_features must be a floating-point",
    ),
    Case(
        "siglip not tensor",
        "sigmoid_contrastive",
        lambda: L.sigmoid_contrastive(f.tolist(), f, logit_scale=10.0, logit_bias=-10.0),
        TypeError,
        r"sigmoid_contrastive: image_features must be a torch.Tensor",
    ),
    Case(
        "siglip scale",
        "sigmoid_contrastive",
        lambda: L.sigmoid_contrastive(f, f, logit_scale=0.0, logit_bias=-10.0),
        ValueError,
        r"sigmoid_contrastive: logit_scale must be in " + POS + ", got 0.0",
    ),
    Case(
        "siglip scale inf",
        "sigmoid_contrastive",
        lambda: L.sigmoid_contrastive(f, f, logit_scale=INF, logit_bias=-10.0),
        ValueError,
        r"sigmoid_contrastive: logit_scale must be a finite number",
    ),
    Case(
        "siglip scale one-element tensor",
        "sigmoid_contrastive",
        lambda: L.sigmoid_contrastive(f, f, logit_scale=torch.ones(1), logit_bias=-10.0),
        TypeError,
        r"sigmoid_contrastive: logit_scale must be a real number or a 0-d floating tensor",
    ),
    Case(
        "siglip bias nan",
        "sigmoid_contrastive",
        lambda: L.sigmoid_contrastive(f, f, logit_scale=10.0, logit_bias=np.float32("nan")),
        ValueError,
        r"sigmoid_contrastive: logit_bias must not be NaN",
    ),
    Case(
        "siglip bias -inf",
        "sigmoid_contrastive",
        lambda: L.sigmoid_contrastive(f, f, logit_scale=10.0, logit_bias=-INF),
        ValueError,
        r"sigmoid_contrastive: logit_bias must be a finite number in \(-inf, inf\), got -inf",
    ),
    Case(
        "siglip bias bool",
        "sigmoid_contrastive",
        lambda: L.sigmoid_contrastive(f, f, logit_scale=10.0, logit_bias=False),
        TypeError,
        r"sigmoid_contrastive: logit_bias must be a real number or a 0-d floating tensor, got "
        r"False",
    ),
    Case(
        "siglip bias int tensor",
        "sigmoid_contrastive",
        lambda: L.sigmoid_contrastive(f, f, logit_scale=10.0, logit_bias=torch.tensor(-10)),
        TypeError,
        r"sigmoid_contrastive: logit_bias must be a real number or a 0-d floating tensor",
    ),
    Case(
        "siglip group",
        "sigmoid_contrastive",
        lambda: L.sigmoid_contrastive(f, f, logit_scale=10.0, logit_bias=-10.0, group="world"),
        TypeError,
        r"sigmoid_contrastive: group must be a torch.distributed ProcessGroup or None, got "
        r"'world'",
    ),
    # ------------------------------------------------------------ orthogonality (CaRot)
    Case(
        "orth rank 1",
        "orthogonality",
        lambda: L.orthogonality(torch.ones(3)),
        ValueError,
        r"orthogonality: weight must have 2 dimension\(s\), got shape \(3,\)",
    ),
    Case(
        "orth rank 3",
        "orthogonality",
        lambda: L.orthogonality(torch.ones(2, 3, 3)),
        ValueError,
        r"orthogonality: weight must have 2 dimension",
    ),
    Case(
        "orth empty",
        "orthogonality",
        lambda: L.orthogonality(torch.ones(4, 0)),
        ValueError,
        r"orthogonality: weight must have non-empty dimensions, got shape \(4, 0\)",
    ),
    Case(
        "orth int",
        "orthogonality",
        lambda: L.orthogonality(i_feat),
        TypeError,
        r"orthogonality: weight must be a floating-point tensor, got dtype torch.int64",
    ),
    Case(
        "orth not tensor",
        "orthogonality",
        lambda: L.orthogonality({"visual.proj": f}),
        TypeError,
        r"orthogonality: weight must be a torch.Tensor, got dict",
    ),
    Case(
        "orth squared",
        "orthogonality",
        lambda: L.orthogonality(f, squared=1),
        TypeError,
        r"orthogonality: squared must be a bool, got 1",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_raises_naming_function_and_argument(case: Case) -> None:
    with pytest.raises(case.exc, match=case.match) as info:
        case.call()
    assert str(info.value).startswith(f"{case.fn}: ")


def test_error_table_covers_every_public_function() -> None:
    assert {c.fn for c in CASES + TRACER_CASES} == set(L.__all__)
    assert len({c.id for c in CASES}) == len(CASES)


# ---------------------------------------------------------------- keyword-only API

# (function, the arguments a swapped call would pass positionally)
SWAPPED: list[tuple[str, Callable[[], Any]]] = [
    ("l2sp", lambda: L.l2sp({"a": f}, {"a": f})),  # type: ignore[misc]
    ("distillation", lambda: L.distillation(z, z)),  # type: ignore[misc]
    ("feature_distillation", lambda: L.feature_distillation(f, f)),  # type: ignore[misc]
    ("context_distillation", lambda: L.context_distillation(f, f, text)),  # type: ignore[misc]
    ("energy_gap", lambda: L.energy_gap(f, f, text)),  # type: ignore[misc]
    *[
        (name, lambda name=name: getattr(L, name)(f, f, f, f))
        for name in (
            "contrastive_relational_distillation",
            "interaction_distillation",
            "cross_distillation",
        )
    ],
]

# the reference (frozen, pre-trained, teacher) side of every two-sided function
REFERENCE_NAMES = {
    "anchor",
    "teacher_logits",
    "reference_features",
    "context_features",
    "teacher_image_features",
    "teacher_text_features",
}


@pytest.mark.parametrize(("name", "call"), SWAPPED, ids=[s[0] for s in SWAPPED])
def test_positional_reference_side_is_rejected(name: str, call: Callable[[], Any]) -> None:
    # a swapped (or merely positional) reference would be silently accepted: it must fail
    with pytest.raises(TypeError, match=rf"{name}\(\) takes \d+ positional arguments? but"):
        call()


@pytest.mark.parametrize("name", L.__all__)
def test_reference_side_and_hyper_parameters_are_keyword_only(name: str) -> None:
    sig = inspect.signature(getattr(L, name))
    for p in sig.parameters.values():
        if p.default is not inspect.Parameter.empty or p.name in REFERENCE_NAMES:
            assert p.kind is inspect.Parameter.KEYWORD_ONLY, (name, p.name)
    if name == "energy_gap":  # the random texts too: [M, D] swaps silently with [B, D]
        assert sig.parameters["text_features"].kind is inspect.Parameter.KEYWORD_ONLY


def test_positional_hyper_parameter_is_rejected() -> None:
    with pytest.raises(TypeError, match="positional argument"):
        L.margin_metric_softmax(f, text, y, 0.3)  # type: ignore[misc]


def test_keyword_only_table_covers_every_two_sided_function() -> None:
    two_sided = {
        name
        for name in L.__all__
        if REFERENCE_NAMES & set(inspect.signature(getattr(L, name)).parameters)
    }
    assert two_sided == {name for name, _ in SWAPPED}


# ---------------------------------------------------------------- multi-positive contrastive

_lab = torch.tensor([0, 1, 0, 1])
_SIG = {"logit_scale": 10.0, "logit_bias": -10.0}

MULTIPOSITIVE_CASES: list[Case] = [
    Case(
        "clip labels float",
        "clip_contrastive",
        lambda: L.clip_contrastive(f, f, labels=_lab.float()),
        TypeError,
        r"clip_contrastive: labels must be an integer tensor, got dtype torch.float32",
    ),
    Case(
        "clip labels bool",
        "clip_contrastive",
        lambda: L.clip_contrastive(f, f, labels=_lab > 0),
        TypeError,
        r"clip_contrastive: labels must be an integer tensor, got dtype torch.bool",
    ),
    Case(
        "clip labels list",
        "clip_contrastive",
        lambda: L.clip_contrastive(f, f, labels=[0, 1, 0, 1]),
        TypeError,
        r"clip_contrastive: labels must be a torch.Tensor, got list of length 4",
    ),
    Case(
        "clip labels rank",
        "clip_contrastive",
        lambda: L.clip_contrastive(f, f, labels=_lab[:, None]),
        ValueError,
        r"clip_contrastive: labels must have 1 dimension\(s\), got shape \(4, 1\)",
    ),
    Case(
        "clip labels length",
        "clip_contrastive",
        lambda: L.clip_contrastive(f, f, labels=_lab[:3]),
        ValueError,
        r"clip_contrastive: labels must have length 4 \(the batch size\), got shape \(3,\)",
    ),
    Case(
        "clip labels device",
        "clip_contrastive",
        lambda: L.clip_contrastive(f, f, labels=_lab.to("meta")),
        ValueError,
        r"clip_contrastive: labels must be on the device of image_features \(cpu\), got meta",
    ),
    Case(
        "clip smoothing one",
        "clip_contrastive",
        lambda: L.clip_contrastive(f, f, smoothing=1.0),
        ValueError,
        r"clip_contrastive: smoothing must be in \[0\.0, 1\.0\), got 1\.0",
    ),
    Case(
        "clip smoothing negative",
        "clip_contrastive",
        lambda: L.clip_contrastive(f, f, labels=_lab, smoothing=-0.1),
        ValueError,
        r"clip_contrastive: smoothing must be in \[0\.0, 1\.0\), got -0\.1",
    ),
    Case(
        "clip smoothing nan",
        "clip_contrastive",
        lambda: L.clip_contrastive(f, f, smoothing=np.float32("nan")),
        ValueError,
        r"clip_contrastive: smoothing must not be NaN",
    ),
    Case(
        "clip smoothing tensor",
        "clip_contrastive",
        lambda: L.clip_contrastive(f, f, smoothing=torch.tensor(0.1)),
        TypeError,
        r"clip_contrastive: smoothing must be a real number, got Tensor",
    ),
    Case(
        "clip margin negative",
        "clip_contrastive",
        lambda: L.clip_contrastive(f, f, margin=-0.2),
        ValueError,
        r"clip_contrastive: margin must be in \[0\.0, inf\), got -0\.2",
    ),
    Case(
        "clip margin inf",
        "clip_contrastive",
        lambda: L.clip_contrastive(f, f, labels=_lab, margin=INF),
        ValueError,
        r"clip_contrastive: margin must be a finite number in \[0\.0, inf\), got inf",
    ),
    Case(
        "clip margin bool",
        "clip_contrastive",
        lambda: L.clip_contrastive(f, f, margin=True),
        TypeError,
        r"clip_contrastive: margin must be a real number, got True",
    ),
    Case(
        "sigmoid labels float",
        "sigmoid_contrastive",
        lambda: L.sigmoid_contrastive(f, f, **_SIG, labels=_lab.double()),
        TypeError,
        r"sigmoid_contrastive: labels must be an integer tensor, got dtype torch.float64",
    ),
    Case(
        "sigmoid labels length",
        "sigmoid_contrastive",
        lambda: L.sigmoid_contrastive(f, f, **_SIG, labels=torch.zeros(5, dtype=torch.int8)),
        ValueError,
        r"sigmoid_contrastive: labels must have length 4 \(the batch size\), got shape \(5,\)",
    ),
    Case(
        "sigmoid labels device",
        "sigmoid_contrastive",
        lambda: L.sigmoid_contrastive(f, f, **_SIG, labels=_lab.to("meta")),
        ValueError,
        r"sigmoid_contrastive: labels must be on the device of image_features \(cpu\), got meta",
    ),
    Case(
        "sigmoid smoothing half",
        "sigmoid_contrastive",
        lambda: L.sigmoid_contrastive(f, f, **_SIG, smoothing=0.5),
        ValueError,
        r"sigmoid_contrastive: smoothing must be in \[0\.0, 0\.5\), got 0\.5",
    ),
    Case(
        "sigmoid smoothing type",
        "sigmoid_contrastive",
        lambda: L.sigmoid_contrastive(f, f, **_SIG, smoothing="0.1"),
        TypeError,
        r"sigmoid_contrastive: smoothing must be a real number, got '0.1'",
    ),
    Case(
        "sigmoid margin negative",
        "sigmoid_contrastive",
        lambda: L.sigmoid_contrastive(f, f, **_SIG, margin=-1),
        ValueError,
        r"sigmoid_contrastive: margin must be in \[0\.0, inf\), got -1",
    ),
    Case(
        "sigmoid margin nan",
        "sigmoid_contrastive",
        lambda: L.sigmoid_contrastive(f, f, **_SIG, margin=float("nan")),
        ValueError,
        r"sigmoid_contrastive: margin must not be NaN",
    ),
]


@pytest.mark.parametrize("case", MULTIPOSITIVE_CASES, ids=[c.id for c in MULTIPOSITIVE_CASES])
def test_bad_multipositive_arguments_raise_naming_function_and_argument(case: Case) -> None:
    with pytest.raises(case.exc, match=case.match) as info:
        case.call()
    assert str(info.value).startswith(f"{case.fn}: ")


# ---------------------------------------------------------------- TRACER's distillation views
# (their teacher side is keyword-only: test_tracer_views_take_the_teacher_and_hyper_parameters_by_keyword)

from robustft.losses import _relational as R  # noqa: E402

_T = {"teacher_image_features": f, "teacher_text_features": f}

TRACER_CASES: list[Case] = [
    Case(
        "crd teacher batch",
        "contrastive_relational_distillation",
        lambda: R.contrastive_relational_distillation(
            f, f, teacher_image_features=f, teacher_text_features=f5
        ),
        ValueError,
        r"contrastive_relational_distillation: teacher_text_features.shape\[0\] must equal "
        r"text_features.shape\[0\], got teacher_text_features of shape \(5, 3\)",
    ),
    Case(
        "crd modality width",
        "contrastive_relational_distillation",
        lambda: R.contrastive_relational_distillation(f, torch.randn(4, 2), **_T),
        ValueError,
        r"contrastive_relational_distillation: image_features.shape\[1\] must equal "
        r"text_features.shape\[1\]",
    ),
    Case(
        "crd teacher scale zero",
        "contrastive_relational_distillation",
        lambda: R.contrastive_relational_distillation(f, f, **_T, teacher_logit_scale=0.0),
        ValueError,
        rf"contrastive_relational_distillation: teacher_logit_scale must be in {POS}, got 0.0",
    ),
    Case(
        "crd teacher scale bool",
        "contrastive_relational_distillation",
        lambda: R.contrastive_relational_distillation(f, f, **_T, teacher_logit_scale=True),
        TypeError,
        r"contrastive_relational_distillation: teacher_logit_scale must be a real number or a "
        r"0-d floating tensor, got True",
    ),
    Case(
        "crd scale nan",
        "contrastive_relational_distillation",
        lambda: R.contrastive_relational_distillation(f, f, **_T, logit_scale=float("nan")),
        ValueError,
        r"contrastive_relational_distillation: logit_scale must not be NaN",
    ),
    Case(
        "crd group",
        "contrastive_relational_distillation",
        lambda: R.contrastive_relational_distillation(f, f, **_T, group="world"),
        TypeError,
        r"contrastive_relational_distillation: group must be a torch.distributed ProcessGroup "
        r"or None, got 'world'",
    ),
    Case(
        "icl teacher rank",
        "interaction_distillation",
        lambda: R.interaction_distillation(
            f, f, teacher_image_features=f[0], teacher_text_features=f
        ),
        ValueError,
        r"interaction_distillation: teacher_image_features must have 2 dimension\(s\), got shape "
        r"\(3,\)",
    ),
    Case(
        "icl integer student",
        "interaction_distillation",
        lambda: R.interaction_distillation(i_feat, f, **_T),
        TypeError,
        r"interaction_distillation: image_features must be a floating-point tensor, got dtype "
        r"torch.int64",
    ),
    Case(
        "icl scale inf",
        "interaction_distillation",
        lambda: R.interaction_distillation(f, f, **_T, logit_scale=INF),
        ValueError,
        rf"interaction_distillation: logit_scale must be a finite number in {POS}, got inf",
    ),
    Case(
        "icl group",
        "interaction_distillation",
        lambda: R.interaction_distillation(f, f, **_T, group=3),
        TypeError,
        r"interaction_distillation: group must be a torch.distributed ProcessGroup or None, got 3",
    ),
    Case(
        "cross integer teacher",
        "cross_distillation",
        lambda: R.cross_distillation(f, f, teacher_image_features=i_feat, teacher_text_features=f),
        TypeError,
        r"cross_distillation: teacher_image_features must be a floating-point tensor, got dtype "
        r"torch.int64",
    ),
    Case(
        "cross no feature axis",
        "cross_distillation",
        lambda: R.cross_distillation(
            f_nodim, f_nodim, teacher_image_features=f_nodim, teacher_text_features=f_nodim
        ),
        ValueError,
        r"cross_distillation: image_features must have a non-empty feature axis \(dim 1\), got "
        r"shape \(4, 0\)",
    ),
    Case(
        "cross teacher scale tensor",
        "cross_distillation",
        lambda: R.cross_distillation(f, f, **_T, teacher_logit_scale=torch.ones(2)),
        TypeError,
        r"cross_distillation: teacher_logit_scale must be a real number or a 0-d floating "
        r"tensor, got Tensor\(shape=\(2,\)",
    ),
    Case(
        "cross teacher scale negative",
        "cross_distillation",
        lambda: R.cross_distillation(f, f, **_T, teacher_logit_scale=np.float32(-2.0)),
        ValueError,
        rf"cross_distillation: teacher_logit_scale must be in {POS}, got np.float32\(-2.0\)",
    ),
]


@pytest.mark.parametrize("case", TRACER_CASES, ids=[c.id for c in TRACER_CASES])
def test_bad_tracer_view_arguments_raise_naming_function_and_argument(case: Case) -> None:
    with pytest.raises(case.exc, match=case.match) as info:
        case.call()
    assert str(info.value).startswith(f"{case.fn}: ")


def test_tracer_cases_cover_every_view() -> None:
    assert {c.fn for c in TRACER_CASES} == set(R.__all__)
    assert len({c.id for c in TRACER_CASES}) == len(TRACER_CASES)


@pytest.mark.parametrize("name", R.__all__)
def test_tracer_views_take_the_teacher_and_hyper_parameters_by_keyword(name: str) -> None:
    fn = getattr(R, name)
    with pytest.raises(TypeError, match=rf"{name}\(\) takes 2 positional arguments but 4"):
        fn(f, f, f, f)  # a positional (possibly swapped) teacher would pass silently
    for p in inspect.signature(fn).parameters.values():
        if p.name.startswith("teacher_") or p.default is not inspect.Parameter.empty:
            assert p.kind is inspect.Parameter.KEYWORD_ONLY, (name, p.name)
    if name == "interaction_distillation":  # ICL scores with the student's scale only
        with pytest.raises(TypeError, match="unexpected keyword argument 'teacher_logit_scale'"):
            fn(f, f, **_T, teacher_logit_scale=1.0)
