"""Every raise of robustft.losses: the error names the function and the argument."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch

from robustft import losses as L

f = torch.randn(4, 3)
f5 = torch.randn(5, 3)
text = torch.randn(6, 3)
y = torch.tensor([0, 1, 2, 3])
z = torch.randn(4, 6)
w = torch.rand(4) + 0.1
i_feat = torch.ones(4, 3, dtype=torch.long)

CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    # margin metric softmax / logits / distances
    (
        "mms batch",
        lambda: L.margin_metric_softmax(f5, text, y),
        ValueError,
        r"margin_metric_softmax: labels must have length 5",
    ),
    (
        "mms dim",
        lambda: L.margin_metric_softmax(f, torch.randn(6, 4), y),
        ValueError,
        r"margin_metric_softmax: image_features.shape\[1\] must equal text_features.shape\[1\]",
    ),
    (
        "mms rank",
        lambda: L.margin_metric_softmax(f[0], text, y),
        ValueError,
        r"margin_metric_softmax: image_features must have 2 dimension",
    ),
    (
        "mms text rank",
        lambda: L.margin_metric_softmax(f, text[None], y),
        ValueError,
        r"margin_metric_softmax: text_features must have 2 dimension",
    ),
    (
        "mms int",
        lambda: L.margin_metric_softmax(i_feat, text, y),
        TypeError,
        r"margin_metric_softmax: image_features must be a floating-point tensor",
    ),
    (
        "mms label dtype",
        lambda: L.margin_metric_softmax(f, text, y.float()),
        TypeError,
        r"margin_metric_softmax: labels must be an integer tensor",
    ),
    (
        "mms label range",
        lambda: L.margin_metric_softmax(f, text, torch.tensor([0, 6, 1, 2])),
        ValueError,
        r"margin_metric_softmax: labels must be in \[0, 6\)",
    ),
    (
        "mms margin",
        lambda: L.margin_metric_softmax(f, text, y, margin=-0.1),
        ValueError,
        r"margin_metric_softmax: margin must be in \[0.0, inf\)",
    ),
    (
        "mms scale",
        lambda: L.margin_metric_softmax(f, text, y, logit_scale=0.0),
        ValueError,
        r"margin_metric_softmax: logit_scale must be in \(0.0, inf\)",
    ),
    (
        "mms scale type",
        lambda: L.margin_metric_softmax(f, text, y, logit_scale="100"),
        TypeError,
        r"margin_metric_softmax: logit_scale must be a real number",
    ),
    (
        "mms reduction",
        lambda: L.margin_metric_softmax(f, text, y, reduction="avg"),
        ValueError,
        r"margin_metric_softmax: reduction must be one of 'mean', 'sum', 'none', got 'avg'",
    ),
    (
        "mms dist shape",
        lambda: L.margin_metric_softmax(f, text, y, text_distances=torch.zeros(5, 5)),
        ValueError,
        r"margin_metric_softmax: text_distances must have shape \(6, 6\)",
    ),
    (
        "mms no classes",
        lambda: L.margin_metric_softmax(f, text[:0], y),
        ValueError,
        r"margin_metric_softmax: text_features must hold at least one class",
    ),
    (
        "mml label range",
        lambda: L.margin_metric_logits(f, text, torch.tensor([0, -1, 1, 2])),
        ValueError,
        r"margin_metric_logits: labels must be in \[0, 6\)",
    ),
    (
        "mml dist dtype",
        lambda: L.margin_metric_logits(
            f, text, y, text_distances=torch.zeros(6, 6, dtype=torch.long)
        ),
        TypeError,
        r"margin_metric_logits: text_distances must be a floating-point tensor",
    ),
    (
        "text_distances rank",
        lambda: L.text_distances(text[0]),
        ValueError,
        r"text_distances: text_features must have 2 dimension",
    ),
    (
        "text_distances int",
        lambda: L.text_distances(i_feat),
        TypeError,
        r"text_distances: text_features must be a floating-point tensor",
    ),
    # entropy
    (
        "entropy 0-d",
        lambda: L.entropy(torch.tensor(1.0)),
        ValueError,
        r"entropy: logits must have at least 1 dimension",
    ),
    (
        "entropy int",
        lambda: L.entropy(torch.ones(3, dtype=torch.long)),
        TypeError,
        r"entropy: logits must be a floating-point tensor",
    ),
    ("entropy dim", lambda: L.entropy(z, dim=2), ValueError, r"entropy: dim must be in \[-2, 2\)"),
    ("entropy dim type", lambda: L.entropy(z, dim=1.0), TypeError, r"entropy: dim must be an int"),
    # ueo
    (
        "ueo batch",
        lambda: L.ueo(z, torch.rand(5) + 0.1),
        ValueError,
        r"ueo: confidence.shape\[0\] must equal logits.shape\[0\]",
    ),
    ("ueo rank", lambda: L.ueo(z[0], w), ValueError, r"ueo: logits must have 2 dimension"),
    (
        "ueo conf rank",
        lambda: L.ueo(z, w[:, None]),
        ValueError,
        r"ueo: confidence must have 1 dimension",
    ),
    ("ueo int", lambda: L.ueo(z.long(), w), TypeError, r"ueo: logits must be a floating-point"),
    (
        "ueo conf int",
        lambda: L.ueo(z, torch.ones(4, dtype=torch.long)),
        TypeError,
        r"ueo: confidence must be a floating-point",
    ),
    (
        "ueo conf zero",
        lambda: L.ueo(z, torch.tensor([0.5, 0.0, 0.2, 0.1])),
        ValueError,
        r"ueo: confidence must be > 0 everywhere, got 0.0",
    ),
    (
        "ueo conf neg",
        lambda: L.ueo(z, torch.tensor([0.5, 0.3, -0.2, 0.1])),
        ValueError,
        r"ueo: confidence must be > 0 everywhere, got -0.2",
    ),
    (
        "ueo trade_off",
        lambda: L.ueo(z, w, trade_off=-1.0),
        ValueError,
        r"ueo: trade_off must be in \[0.0, inf\)",
    ),
    (
        "ueo group",
        lambda: L.ueo(z, w, group="world"),
        TypeError,
        r"ueo: group must be a torch.distributed ProcessGroup or None, got 'world'",
    ),
    ("ueo empty", lambda: L.ueo(z[:0], w[:0]), ValueError, r"ueo: logits must hold at least one"),
    # ueo_confidence
    (
        "conf rank",
        lambda: L.ueo_confidence(z[0]),
        ValueError,
        r"ueo_confidence: zero_shot_logits must have 2 dimension",
    ),
    (
        "conf scale",
        lambda: L.ueo_confidence(z, scale=-1.0),
        ValueError,
        r"ueo_confidence: scale must be in \(0.0, inf\)",
    ),
    (
        "conf int",
        lambda: L.ueo_confidence(z.long()),
        TypeError,
        r"ueo_confidence: zero_shot_logits must be a floating-point",
    ),
    (
        "conf no class",
        lambda: L.ueo_confidence(z[:, :0]),
        ValueError,
        r"ueo_confidence: zero_shot_logits must hold at least one class",
    ),
    # energy gap
    (
        "eg batch",
        lambda: L.energy_gap(f, f5, text),
        ValueError,
        r"energy_gap: features.shape\[0\] must equal reference_features.shape\[0\]",
    ),
    (
        "eg dim",
        lambda: L.energy_gap(f, f, torch.randn(6, 2)),
        ValueError,
        r"energy_gap: text_features.shape\[1\] must equal features.shape\[1\]",
    ),
    (
        "eg ref dim",
        lambda: L.energy_gap(f, torch.randn(4, 2), text),
        ValueError,
        r"energy_gap: features.shape\[1\] must equal reference_features.shape\[1\]",
    ),
    (
        "eg rank",
        lambda: L.energy_gap(f[0], f[0], text),
        ValueError,
        r"energy_gap: features must have 2 dimension",
    ),
    (
        "eg int",
        lambda: L.energy_gap(f, i_feat, text),
        TypeError,
        r"energy_gap: reference_features must be a floating-point",
    ),
    (
        "eg not tensor",
        lambda: L.energy_gap(f, f, [[1.0, 2.0, 3.0]]),
        TypeError,
        r"energy_gap: text_features must be a torch.Tensor",
    ),
    (
        "eg no texts",
        lambda: L.energy_gap(f, f, text[:0]),
        ValueError,
        r"energy_gap: text_features must hold at least one text",
    ),
    (
        "eg scale",
        lambda: L.energy_gap(f, f, text, logit_scale=-2.0),
        ValueError,
        r"energy_gap: logit_scale must be in \(0.0, inf\)",
    ),
    (
        "eg reduction",
        lambda: L.energy_gap(f, f, text, reduction=None),
        TypeError,
        r"energy_gap: reduction must be one of",
    ),
    # distillation
    (
        "kd batch",
        lambda: L.distillation(z, torch.randn(5, 6)),
        ValueError,
        r"distillation: teacher_logits.shape\[0\] must equal student_logits.shape\[0\]",
    ),
    (
        "kd classes",
        lambda: L.distillation(z, torch.randn(4, 5)),
        ValueError,
        r"distillation: teacher_logits.shape\[1\] must equal student_logits.shape\[1\]",
    ),
    (
        "kd rank",
        lambda: L.distillation(z[0], z[0]),
        ValueError,
        r"distillation: student_logits must have 2 dimension",
    ),
    (
        "kd int",
        lambda: L.distillation(z, z.long()),
        TypeError,
        r"distillation: teacher_logits must be a floating-point",
    ),
    (
        "kd temperature 0",
        lambda: L.distillation(z, z, temperature=0.0),
        ValueError,
        r"distillation: temperature must be in \(0.0, inf\), got 0.0",
    ),
    (
        "kd temperature neg",
        lambda: L.distillation(z, z, temperature=-1),
        ValueError,
        r"distillation: temperature must be in \(0.0, inf\), got -1",
    ),
    (
        "kd reduction",
        lambda: L.distillation(z, z, reduction="max"),
        ValueError,
        r"distillation: reduction must be one of",
    ),
    # context distillation
    (
        "car batch",
        lambda: L.context_distillation(f, f5, text),
        ValueError,
        r"context_distillation: features.shape\[0\] must equal reference_features.shape\[0\]",
    ),
    (
        "car ctx dim",
        lambda: L.context_distillation(f, f, torch.randn(6, 2)),
        ValueError,
        r"context_distillation: context_features.shape\[1\] must equal features.shape\[1\]",
    ),
    (
        "car rank",
        lambda: L.context_distillation(f, f, text[0]),
        ValueError,
        r"context_distillation: context_features must have 2 dimension",
    ),
    (
        "car int",
        lambda: L.context_distillation(i_feat, f, text),
        TypeError,
        r"context_distillation: features must be a floating-point",
    ),
    (
        "car temperature",
        lambda: L.context_distillation(f, f, text, temperature=-0.5),
        ValueError,
        r"context_distillation: temperature must be in \(0.0, inf\)",
    ),
    (
        "car scale",
        lambda: L.context_distillation(f, f, text, logit_scale=0),
        ValueError,
        r"context_distillation: logit_scale must be in \(0.0, inf\)",
    ),
    (
        "car reduction",
        lambda: L.context_distillation(f, f, text, reduction="avg"),
        ValueError,
        r"context_distillation: reduction must be one of",
    ),
    # feature distillation
    (
        "featkd batch",
        lambda: L.feature_distillation(f, f5),
        ValueError,
        r"feature_distillation: features.shape\[0\] must equal reference_features.shape\[0\]",
    ),
    (
        "featkd rank",
        lambda: L.feature_distillation(f, f[None]),
        ValueError,
        r"feature_distillation: reference_features must have 2 dimension",
    ),
    (
        "featkd int",
        lambda: L.feature_distillation(i_feat, f),
        TypeError,
        r"feature_distillation: features must be a floating-point",
    ),
    (
        "featkd reduction",
        lambda: L.feature_distillation(f, f, reduction="MEAN"),
        ValueError,
        r"feature_distillation: reduction must be one of",
    ),
    # l2sp
    (
        "l2sp missing",
        lambda: L.l2sp({"a": f}, {"a": f, "b": f}),
        ValueError,
        r"l2sp: params must have all the keys of anchor; missing keys \['b'\]",
    ),
    (
        "l2sp shape",
        lambda: L.l2sp({"a": f}, {"a": f5}),
        ValueError,
        r"l2sp: anchor and params must have the same shape at every key",
    ),
    ("l2sp not tree", lambda: L.l2sp([f], {"a": f}), TypeError, r"l2sp: params must be a mapping"),
    (
        "l2sp leaf",
        lambda: L.l2sp({"a": f}, {"a": 1.0}),
        TypeError,
        r"l2sp: anchor must have torch.Tensor leaves",
    ),
    (
        "l2sp int",
        lambda: L.l2sp({"a": i_feat}, {"a": i_feat}),
        TypeError,
        r"l2sp: params and anchor must hold floating-point tensors.*'a'",
    ),
    # clip contrastive
    (
        "clip batch",
        lambda: L.clip_contrastive(f, f5),
        ValueError,
        r"clip_contrastive: image_features.shape\[0\] must equal text_features.shape\[0\]",
    ),
    (
        "clip rank",
        lambda: L.clip_contrastive(f[0], f[0]),
        ValueError,
        r"clip_contrastive: image_features must have 2 dimension",
    ),
    (
        "clip int",
        lambda: L.clip_contrastive(f, i_feat),
        TypeError,
        r"clip_contrastive: text_features must be a floating-point",
    ),
    (
        "clip scale",
        lambda: L.clip_contrastive(f, f, logit_scale=-1.0),
        ValueError,
        r"clip_contrastive: logit_scale must be in \(0.0, inf\)",
    ),
    (
        "clip scale tensor",
        lambda: L.clip_contrastive(f, f, logit_scale=torch.ones(2)),
        TypeError,
        r"clip_contrastive: logit_scale must be a real number or a 0-d floating tensor",
    ),
    (
        "clip group",
        lambda: L.clip_contrastive(f, f, group=0),
        TypeError,
        r"clip_contrastive: group must be a torch.distributed ProcessGroup or None, got 0",
    ),
    (
        "clip empty",
        lambda: L.clip_contrastive(f[:0], f[:0]),
        ValueError,
        r"clip_contrastive: image_features must hold at least one pair",
    ),
]


@pytest.mark.parametrize(
    ("call", "exc", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_raises_naming_function_and_argument(
    call: Callable[[], Any], exc: type[Exception], match: str
) -> None:
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("name", L.__all__)
def test_hyper_parameters_are_keyword_only(name: str) -> None:
    # every parameter with a default (a hyper-parameter) is keyword-only
    sig = inspect.signature(getattr(L, name))
    for p in sig.parameters.values():
        if p.default is not inspect.Parameter.empty:
            assert p.kind is inspect.Parameter.KEYWORD_ONLY, (name, p.name)


def test_positional_hyper_parameter_is_rejected() -> None:
    with pytest.raises(TypeError, match="positional argument"):
        L.margin_metric_softmax(f, text, y, 0.3)  # type: ignore[misc]
