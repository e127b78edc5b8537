"""robustft.tta: every error path, with the message's function, argument and received value."""

from __future__ import annotations

import math

import pytest
import torch

from robustft import tta

Z = torch.zeros(20, 3)
T = torch.randn(3, 4)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (
            lambda: tta.marginal_entropy(torch.zeros(4, 3, dtype=torch.int64)),
            TypeError,
            "marginal_entropy: logits must be a floating",
        ),
        (
            lambda: tta.marginal_entropy([[0.0]]),
            TypeError,
            "marginal_entropy: logits must be a torch.Tensor",
        ),
        (
            lambda: tta.marginal_entropy(torch.zeros(3)),
            ValueError,
            r"at least 2 dimensions .*got shape \(3,\)",
        ),
        (
            lambda: tta.marginal_entropy(torch.zeros(0, 3)),
            ValueError,
            r"at least one view .*\(0, 3\)",
        ),
        (lambda: tta.marginal_entropy(torch.zeros(2, 0)), ValueError, r"one class .*\(2, 0\)"),
        (
            lambda: tta.confident_views(Z, fraction="0.1"),
            TypeError,
            "confident_views: fraction must be a real number, got '0.1'",
        ),
        (
            lambda: tta.confident_views(Z, fraction=0.0),
            ValueError,
            r"fraction must be in \(0.0, 1.0\], got 0.0",
        ),
        (
            lambda: tta.confident_views(Z, fraction=1.5),
            ValueError,
            r"fraction must be in \(0.0, 1.0\], got 1.5",
        ),
        (lambda: tta.confident_views(Z, fraction=math.nan), ValueError, "fraction must not be NaN"),
        (
            lambda: tta.confident_views(Z[:9], fraction=0.1),
            ValueError,
            r"keep at least one view, got fraction=0.1 with 9 views",
        ),
        (
            lambda: tta.tpt_loss(torch.zeros(2, 2, 20, 3)),
            ValueError,
            r"tpt_loss: logits must have 2 or 3 dimensions .*\(2, 2, 20, 3\)",
        ),
        (
            lambda: tta.tpt_loss(Z, reduction="avg"),
            ValueError,
            "tpt_loss: reduction must be one of 'mean', 'sum', 'none', got 'avg'",
        ),
        (lambda: tta.tpt_loss(Z, reduction=None), TypeError, "tpt_loss: reduction must be one of"),
        (
            lambda: tta.tpt_loss(Z, indices=[0, 1]),
            TypeError,
            "tpt_loss: indices must be a torch.Tensor",
        ),
        (
            lambda: tta.tpt_loss(Z, indices=torch.tensor([0, 1], dtype=torch.int32)),
            TypeError,
            "indices must be an int64 tensor .*int32",
        ),
        (
            lambda: tta.tpt_loss(Z, indices=torch.tensor([[0, 1]])),
            ValueError,
            r"indices must have shape \[..., k\] .*got shape \(1, 2\)",
        ),
        (
            lambda: tta.tpt_loss(Z[None], indices=torch.tensor([[0], [1]])),
            ValueError,
            r"leading shape of logits \(1,\), got shape \(2, 1\)",
        ),
        (
            lambda: tta.tpt_loss(Z, indices=torch.zeros(0, dtype=torch.int64)),
            ValueError,
            "indices must select at least one view",
        ),
        (
            lambda: tta.tpt_loss(Z, fraction=0.01, indices=torch.tensor([0])),
            ValueError,
            "keep at least one view",
        ),
        (
            lambda: tta.text_dispersion(torch.zeros(3, 4, dtype=torch.int32)),
            TypeError,
            "text_dispersion: text_features must be a floating",
        ),
        (
            lambda: tta.text_dispersion(torch.zeros(4)),
            ValueError,
            r"text_dispersion: text_features must have shape \[..., classes, dim\] .*\(4,\)",
        ),
        (lambda: tta.text_dispersion(torch.zeros(0, 4)), ValueError, r"\(0, 4\)"),
        (lambda: tta.text_dispersion(torch.zeros(3, 0)), ValueError, r"\(3, 0\)"),
        (
            lambda: tta.ctpt_loss(Z, text_features=T.long()),
            TypeError,
            "ctpt_loss: text_features must be a floating",
        ),
        (
            lambda: tta.ctpt_loss(Z, text_features=T[None]),
            ValueError,
            r"ctpt_loss: text_features must have shape \[classes, dim\] or \[images, classes, dim\]",
        ),
        (lambda: tta.ctpt_loss(Z, text_features=T[:, :0]), ValueError, "non-empty feature axis"),
        (
            lambda: tta.ctpt_loss(Z, text_features=T[:2]),
            ValueError,
            r"text_features.shape\[-2\] must equal logits.shape\[-1\]",
        ),
        (
            lambda: tta.ctpt_loss(Z.expand(2, 20, 3), text_features=T.expand(3, 3, 4)),
            ValueError,
            r"text_features.shape\[0\] must equal logits.shape\[0\]",
        ),
        (
            lambda: tta.ctpt_loss(Z, text_features=T, weight=-1.0),
            ValueError,
            r"ctpt_loss: weight must be in \[0.0, inf\), got -1.0",
        ),
        (
            lambda: tta.ctpt_loss(Z, text_features=T, weight=math.inf),
            ValueError,
            "weight must be a finite number",
        ),
        (
            lambda: tta.ctpt_loss(Z, text_features=T, weight="50"),
            TypeError,
            "weight must be a real number or a 0-d floating tensor",
        ),
        (
            lambda: tta.ctpt_loss(Z, text_features=T, weight=torch.ones(2)),
            TypeError,
            "weight must be a real number or a 0-d floating tensor",
        ),
        (
            lambda: tta.ctpt_loss(Z, text_features=T, reduction="all"),
            ValueError,
            "ctpt_loss: reduction must be one of",
        ),
        (lambda: tta.ctpt_loss(Z, T), TypeError, r"takes 1 positional argument but 2 were given"),
        (
            lambda: tta.ctpt_loss(torch.zeros(3), text_features=T),
            ValueError,
            "ctpt_loss: logits must have 2 or 3 dimensions",
        ),
    ],
)
def test_tpt_errors(call: object, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        call()  # type: ignore[operator]


def _view(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (
            lambda: tta.views(torch.zeros(2), 2.0, _view),
            TypeError,
            "views: n must be an int, got 2.0",
        ),
        (
            lambda: tta.views(torch.zeros(2), 0, _view),
            ValueError,
            "views: n must be an int >= 1, got 0",
        ),
        (
            lambda: tta.views(torch.zeros(2), 2, "augmix"),
            TypeError,
            "views: transform must be callable, got 'augmix'",
        ),
        (
            lambda: tta.views(torch.zeros(2), 2, _view, original=3),
            TypeError,
            "views: original must be callable or None, got 3",
        ),
        (
            lambda: tta.views(torch.zeros(2), 2, lambda x: x.tolist()),
            TypeError,
            "every view must be a torch.Tensor, got list of length 2 at view 0",
        ),
        (
            lambda: tta.views(torch.zeros(2), 2, _view, original=lambda x: x[:1]),
            ValueError,
            r"shape of the first, \(1,\), got \(2,\) at view 1",
        ),
    ],
)
def test_views_errors(call: object, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        call()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"shots_pos": -1}, ValueError, "tda: shots_pos must be an int >= 0, got -1"),
        ({"shots_neg": 1.0}, TypeError, "tda: shots_neg must be an int, got 1.0"),
        ({"alpha_pos": -0.5}, ValueError, r"tda: alpha_pos must be in \[0.0, inf\), got -0.5"),
        ({"beta_pos": math.inf}, ValueError, "tda: beta_pos must be a finite number"),
        ({"alpha_neg": math.nan}, ValueError, "tda: alpha_neg must not be NaN"),
        ({"beta_neg": True}, TypeError, "tda: beta_neg must be a real number, got True"),
        (
            {"entropy_bounds": 0.2},
            TypeError,
            r"tda: entropy_bounds must be a \(lower, upper\) pair, got 0.2",
        ),
        (
            {"entropy_bounds": (0.1, 0.2, 0.3)},
            TypeError,
            "entropy_bounds must be a .* pair, got tuple of length 3",
        ),
        (
            {"entropy_bounds": (0.5, 0.2)},
            ValueError,
            r"tda: entropy_bounds must have lower < upper, got \(0.5, 0.2\)",
        ),
        ({"mask_bounds": (0.1, math.nan)}, ValueError, r"tda: mask_bounds\[1\] must not be NaN"),
        ({"mask_bounds": ("a", 1.0)}, TypeError, r"tda: mask_bounds\[0\] must be a real number"),
    ],
)
def test_tda_factory_errors(kwargs: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        tta.tda(**kwargs)


def test_tda_factory_positional_is_refused() -> None:
    with pytest.raises(TypeError):
        tta.tda(3)  # type: ignore[misc]


CACHE = tta.tda()


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: CACHE.init(1, 4), ValueError, "tda.init: classes must be an int >= 2, got 1"),
        (lambda: CACHE.init(3, 0), ValueError, "tda.init: dim must be an int >= 1, got 0"),
        (lambda: CACHE.init(3.0, 4), TypeError, "tda.init: classes must be an int, got 3.0"),
        (
            lambda: CACHE.init(3, 4, dtype=torch.int64),
            TypeError,
            "tda.init: dtype must be a floating-point torch.dtype",
        ),
        (
            lambda: CACHE.init(3, 4, device="gpu9"),
            ValueError,
            "tda.init: device must name a torch device",
        ),
        (
            lambda: CACHE.init(3, 4, device=0.5),
            TypeError,
            "tda.init: device must be None, a str or a torch.device",
        ),
    ],
)
def test_tda_init_errors(call: object, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        call()  # type: ignore[operator]


S = CACHE.init(3, 4)
F = torch.randn(4)
L = torch.randn(3)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (
            lambda: CACHE.update(tuple(S), F, L),
            TypeError,
            "tda.update: state must be the TdaState returned by init or a previous update, got tuple",
        ),
        (
            lambda: tta.tda(shots_pos=2).update(S, F, L),
            ValueError,
            r"tda.update: state was made by tda\(shots_pos=3, .*but this cache is tda\(shots_pos=2",
        ),
        (
            lambda: CACHE.update(S._replace(pos_count=S.pos_count.float()), F, L),
            TypeError,
            "inconsistent shapes or dtypes",
        ),
        (
            lambda: CACHE.update(S._replace(neg_probs=S.neg_probs[:, :, :2]), F, L),
            TypeError,
            "inconsistent shapes or dtypes",
        ),
        (
            lambda: CACHE.update(S._replace(pos_keys=None), F, L),
            TypeError,
            "inconsistent shapes or dtypes",
        ),
        (
            lambda: CACHE.update(S, F.long(), L),
            TypeError,
            "tda.update: features must be a floating",
        ),
        (
            lambda: CACHE.update(S, F[None], L),
            ValueError,
            r"tda.update: features must have 1 dimension\(s\), got shape \(1, 4\)",
        ),
        (
            lambda: CACHE.update(S, F[:3], L),
            ValueError,
            r"features must have shape \[dim\] = \[4\] \(the state's\), got shape \(3,\)",
        ),
        (
            lambda: CACHE.update(S, F, L[None, None]),
            ValueError,
            r"tda.update: logits must have 1 or 2 dimension\(s\)",
        ),
        (
            lambda: CACHE.update(S, F, L[:2]),
            ValueError,
            r"logits must have shape \[classes\] or \[views, classes\] with classes = 3 .*\(2,\)",
        ),
        (
            lambda: CACHE.update(S, F, L[None, :][:0]),
            ValueError,
            r"at least one view, got shape \(0, 3\)",
        ),
        (lambda: CACHE.logits(S, F.long()), TypeError, "tda.logits: features must be a floating"),
        (
            lambda: CACHE.logits(S, F[None, None]),
            ValueError,
            r"tda.logits: features must have 1 or 2 dimension\(s\)",
        ),
        (
            lambda: CACHE.logits(S, torch.randn(2, 5)),
            ValueError,
            r"features must have shape \[dim\] or \[batch, dim\] with dim = 4 .*\(2, 5\)",
        ),
        (lambda: CACHE.logits("state", F), TypeError, "tda.logits: state must be the TdaState"),
    ],
)
def test_tda_state_errors(call: object, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        call()  # type: ignore[operator]
