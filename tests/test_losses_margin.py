"""CLIPood's margin metric softmax: hand values, paper/official forms, references, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from reference.losses_ref import mms_logits_ref, mms_ref
from strategies import features

from robustft.losses import margin_metric_logits, margin_metric_softmax, text_distances


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def _problem(b: int = 5, c: int = 4, d: int = 3, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(1)
    f = torch.randn(b, d, generator=g, dtype=dtype) * 3
    t = torch.randn(c, d, generator=g, dtype=dtype) * 2
    y = torch.randint(0, c, (b,), generator=g)
    return f, t, y


# ---------------------------------------------------------------- hand-computed values


def test_hand_computed_logits_and_loss() -> None:
    # f = e1, T = (e1, e2, (e1+e2)/√2), y = 0, λ = 0.5, s = 2:
    # cos = (1, 0, 1/√2); 1 − cos(T_0, T_c) = (0, 1, 1 − 1/√2)
    f = torch.tensor([[3.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 5.0], [1.0, 1.0]])
    y = torch.tensor([0])
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[2.0 * 1.0, 2.0 * (0.0 + 0.5), 2.0 * (r + 0.5 * (1 - r))]])
    z = margin_metric_logits(f, text, y, margin=0.5, logit_scale=2.0)
    torch.testing.assert_close(z, expected)
    loss = margin_metric_softmax(f, text, y, margin=0.5, logit_scale=2.0)
    torch.testing.assert_close(loss, torch.logsumexp(expected[0], 0) - expected[0, 0])


def test_true_class_carries_no_margin() -> None:
    f, t, y = _problem()
    z = margin_metric_logits(f, t, y, margin=0.7, logit_scale=10.0)
    cos = _unit(f) @ _unit(t).T
    rows = torch.arange(f.shape[0])
    torch.testing.assert_close(z[rows, y], 10.0 * cos[rows, y])


def test_text_distances_hand_values() -> None:
    t = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    d = text_distances(t)
    torch.testing.assert_close(d, torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0], [2.0, 1.0, 0.0]]))


def test_text_distances_zero_diagonal_and_symmetric() -> None:
    _, t, _ = _problem(c=6, d=4)
    d = text_distances(t)
    assert torch.equal(torch.diagonal(d), torch.zeros(6, dtype=d.dtype))
    torch.testing.assert_close(d, d.T)
    torch.testing.assert_close(d, 1 - _unit(t) @ _unit(t).T, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- equivalences


@given(
    f=features(5, 3),
    t=features(4, 3),
    labels=st.lists(st.integers(0, 3), min_size=5, max_size=5),
    margin=st.floats(0.0, 2.0),
    scale=st.floats(0.5, 50.0),
)
def test_matches_paper_reference(f, t, labels, margin, scale) -> None:
    y = torch.tensor(labels)
    expected_z = torch.tensor(mms_logits_ref(f, t, y, margin, scale), dtype=torch.float64)
    expected = torch.tensor(mms_ref(f, t, y, margin, scale), dtype=torch.float64)
    dist = text_distances(t)
    for kw in ({}, {"text_distances": dist}):
        z = margin_metric_logits(f, t, y, margin=margin, logit_scale=scale, **kw)
        torch.testing.assert_close(z, expected_z, atol=1e-9, rtol=1e-9)
        loss = margin_metric_softmax(
            f, t, y, margin=margin, logit_scale=scale, reduction="none", **kw
        )
        torch.testing.assert_close(loss, expected, atol=1e-9, rtol=1e-9)


def test_margin_zero_is_clip_cross_entropy() -> None:
    f, t, y = _problem(b=8, c=5, d=4, dtype=torch.float32)
    expected = F.cross_entropy(100.0 * _unit(f) @ _unit(t).T, y)
    torch.testing.assert_close(margin_metric_softmax(f, t, y, margin=0.0), expected)
    torch.testing.assert_close(
        margin_metric_softmax(f, t, y, margin=0.0, text_distances=text_distances(t)), expected
    )


def test_official_form_gives_the_same_loss() -> None:
    # thuml/CLIPood engine.py: f -= alpha * T[labels]; y = s * f @ T.T; F.cross_entropy(y, labels)
    f, t, y = _problem(b=7, c=5, d=4)
    lam, s = 0.3, 100.0
    fn, tn = _unit(f), _unit(t)
    official = F.cross_entropy(s * (fn - lam * tn[y]) @ tn.T, y, reduction="none")
    paper_z = margin_metric_logits(f, t, y, margin=lam, logit_scale=s)
    # the official logits are the paper's shifted by the constant s·λ in every entry
    torch.testing.assert_close(paper_z - s * lam, s * (fn - lam * tn[y]) @ tn.T)
    torch.testing.assert_close(
        margin_metric_softmax(f, t, y, margin=lam, logit_scale=s, reduction="none"), official
    )


@given(shift=st.floats(-50.0, 50.0))
def test_cross_entropy_shift_invariance(shift: float) -> None:
    f, t, y = _problem()
    z = margin_metric_logits(f, t, y, margin=0.3, logit_scale=20.0)
    loss = margin_metric_softmax(f, t, y, margin=0.3, logit_scale=20.0, reduction="none")
    torch.testing.assert_close(F.cross_entropy(z + shift, y, reduction="none"), loss)


@given(a=st.floats(0.01, 100.0), b=st.floats(0.01, 100.0))
def test_invariant_to_feature_rescaling(a: float, b: float) -> None:
    f, t, y = _problem()
    ref = margin_metric_softmax(f, t, y, reduction="none")
    torch.testing.assert_close(margin_metric_softmax(a * f, b * t, y, reduction="none"), ref)


def test_reductions() -> None:
    f, t, y = _problem()
    per = margin_metric_softmax(f, t, y, reduction="none")
    assert per.shape == (5,)
    torch.testing.assert_close(margin_metric_softmax(f, t, y), per.mean())
    torch.testing.assert_close(margin_metric_softmax(f, t, y, reduction="sum"), per.sum())


def test_tensor_hyper_parameters_match_floats() -> None:
    f, t, y = _problem()
    ref = margin_metric_softmax(f, t, y, margin=0.2, logit_scale=30.0)
    s = torch.tensor(30.0, dtype=torch.float64)
    lam = torch.tensor(0.2, dtype=torch.float64)
    torch.testing.assert_close(margin_metric_softmax(f, t, y, margin=lam, logit_scale=s), ref)
    torch.testing.assert_close(
        margin_metric_softmax(f, t, y, margin=lam, logit_scale=s, text_distances=text_distances(t)),
        ref,
    )
    torch.testing.assert_close(
        margin_metric_logits(f, t, y, margin=lam, logit_scale=s),
        margin_metric_logits(f, t, y, margin=0.2, logit_scale=30.0),
    )


# ---------------------------------------------------------------- gradients


def test_gradcheck_float64() -> None:
    f, t, y = _problem(b=3, c=4, d=3)
    f.requires_grad_(True)
    t.requires_grad_(True)

    def loss(f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return margin_metric_softmax(f, t, y, margin=0.4, logit_scale=5.0, reduction="none")

    def loss_dist(f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return margin_metric_softmax(
            f, t, y, margin=0.4, logit_scale=5.0, text_distances=text_distances(t)
        )

    assert torch.autograd.gradcheck(loss, (f, t))
    assert torch.autograd.gradcheck(loss_dist, (f, t))


def test_gradient_matches_reference_logits() -> None:
    # gradient w.r.t. the image features, against autograd through the explicit formula
    f, t, y = _problem()
    f1 = f.clone().requires_grad_(True)
    margin_metric_softmax(f1, t, y, margin=0.3, logit_scale=10.0).backward()
    f2 = f.clone().requires_grad_(True)
    fn, tn = _unit(f2), _unit(t)
    z = 10.0 * (fn @ tn.T + 0.3 * (1 - tn[y] @ tn.T))
    F.cross_entropy(z, y).backward()
    torch.testing.assert_close(f1.grad, f2.grad)


# ---------------------------------------------------------------- unknown-class labels


def test_unknown_labels_raise_on_cpu_eager() -> None:
    f, t, _ = _problem()
    y = torch.tensor([0, 1, -1, 2, 3])
    with pytest.raises(ValueError, match=r"margin_metric_softmax: labels must be in \[0, 4\).*-1"):
        margin_metric_softmax(f, t, y)
    with pytest.raises(ValueError, match=r"margin_metric_logits: labels must be in \[0, 4\).*4"):
        margin_metric_logits(f, t, torch.tensor([0, 1, 4, 2, 3]))


def test_unknown_labels_give_nan_where_values_are_not_read() -> None:
    # under vmap the labels are batched wrappers: no value is read, the unknown sample is NaN
    f, t, _ = _problem()
    y = torch.tensor([[0, 1, -1, 2, 3], [0, 1, 2, 3, 9]])
    out = torch.vmap(lambda ff, yy: margin_metric_softmax(ff, t, yy, reduction="none"))(
        torch.stack([f, f]), y
    )
    expected_nan = torch.tensor([[0, 0, 1, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(torch.isnan(out), expected_nan)
    ok = margin_metric_softmax(f, t, torch.tensor([0, 1, 0, 2, 3]), reduction="none")
    torch.testing.assert_close(out[0, :2], ok[:2])
    # and the mean over a batch with an unknown sample is NaN, never a silent number
    mean = torch.vmap(lambda yy: margin_metric_softmax(f, t, yy))(y)
    assert torch.isnan(mean).all()
