"""Exact entropy, UEO and UEO's confidence: hand values, references, properties, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference.losses_ref import entropy_ref, ueo_confidence_ref, ueo_ref
from strategies import logits as logits_st
from strategies import tensors

from robustft.losses import entropy, ueo, ueo_confidence

# ---------------------------------------------------------------- entropy


def test_entropy_hand_values() -> None:
    z = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, -1e4, -1e4]])
    # uniform over 4: log 4; p = (3/4, 1/4, 0, 0): −(¾ log ¾ + ¼ log ¼)
    expected = torch.tensor([math.log(4.0), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))])
    torch.testing.assert_close(entropy(z), expected)


def test_entropy_dim_argument() -> None:
    z = torch.randn(3, 5, 2, dtype=torch.float64)
    torch.testing.assert_close(entropy(z, dim=1), entropy(z.movedim(1, -1)))
    torch.testing.assert_close(entropy(z, dim=-3), entropy(z.movedim(0, -1)))
    assert entropy(torch.tensor([0.0, 0.0])).ndim == 0


@given(z=logits_st(max_batch=5, max_classes=7, scale=20.0))
def test_entropy_in_bounds_and_matches_reference(z: torch.Tensor) -> None:
    h = entropy(z)
    c = z.shape[1]
    tol = 1e-5 if z.dtype == torch.float32 else 1e-12
    assert (h >= 0).all()
    assert (h <= math.log(c) + tol).all()
    expected = torch.tensor(entropy_ref(z.double()), dtype=h.dtype)
    torch.testing.assert_close(h, expected, atol=10 * tol, rtol=10 * tol)


@given(z=logits_st(max_classes=6, dtype=torch.float64), shift=st.floats(-1e3, 1e3))
def test_entropy_shift_invariance(z: torch.Tensor, shift: float) -> None:
    torch.testing.assert_close(entropy(z + shift), entropy(z), atol=1e-9, rtol=1e-9)


def test_entropy_extreme_logits_finite_with_finite_gradient() -> None:
    z = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]], requires_grad=True)
    h = entropy(z)
    torch.testing.assert_close(h.detach(), torch.tensor([0.0, math.log(3.0)]))
    h.sum().backward()
    assert torch.isfinite(z.grad).all()


def test_entropy_gradcheck() -> None:
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(entropy, (z,))


# ---------------------------------------------------------------- UEO


def test_ueo_hand_value() -> None:
    z = torch.tensor([[0.0, 0.0], [1e4, -1e4]])
    w = torch.tensor([0.5, 1.0])
    # cond = (0.5·log 2 + 1·0)/1.5; p̄ = (2·(½,½) + 1·(1,0))/3 = (2/3, 1/3)
    h_bar = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    expected = 0.5 * math.log(2.0) / 1.5 - h_bar
    torch.testing.assert_close(ueo(z, w), torch.tensor(expected))
    torch.testing.assert_close(ueo(z, w, trade_off=0.0), torch.tensor(0.5 * math.log(2.0) / 1.5))
    torch.testing.assert_close(
        ueo(z, w, trade_off=2.0), torch.tensor(0.5 * math.log(2.0) / 1.5 - 2 * h_bar)
    )


@st.composite
def ueo_inputs(draw):  # type: ignore[no-untyped-def]
    z = draw(logits_st(max_batch=6, max_classes=5, dtype=torch.float64, scale=10.0))
    w = draw(tensors((z.shape[0],), torch.float64)).abs().clamp(0.02, 1.0)
    return z, w


@given(inp=ueo_inputs(), gamma=st.floats(0.0, 3.0))
def test_ueo_matches_reference(inp, gamma: float) -> None:
    z, w = inp
    torch.testing.assert_close(
        ueo(z, w, trade_off=gamma),
        torch.tensor(ueo_ref(z, w, gamma), dtype=torch.float64),
        atol=1e-10,
        rtol=1e-10,
    )


@given(z=logits_st(max_batch=6, max_classes=5, dtype=torch.float64), c=st.floats(0.01, 1.0))
def test_ueo_equal_confidences_is_information_maximisation(z: torch.Tensor, c: float) -> None:
    w = torch.full((z.shape[0],), c, dtype=torch.float64)
    p = torch.softmax(z, -1)
    p_mean = p.mean(0)
    im = entropy(z).mean() + (p_mean * p_mean.log()).sum()  # mean H(p_i) − H(mean p)
    torch.testing.assert_close(ueo(z, w), im, atol=1e-10, rtol=1e-10)


@given(inp=ueo_inputs())
def test_ueo_bounds(inp) -> None:
    z, w = inp
    c = z.shape[1]
    value = float(ueo(z, w))
    assert -math.log(c) - 1e-9 <= value <= math.log(c) + 1e-9


def test_ueo_confidence_is_a_constant() -> None:
    z = torch.randn(4, 3, requires_grad=True)
    w = torch.rand(4).add(0.1).requires_grad_(True)
    ueo(z, w).backward()
    assert w.grad is None
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_ueo_gradcheck_float64() -> None:
    z = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(5, dtype=torch.float64) * 0.9 + 0.05
    assert torch.autograd.gradcheck(lambda x: ueo(x, w, trade_off=0.7), (z,))
    assert torch.autograd.gradgradcheck(lambda x: ueo(x, w), (z,))


def test_ueo_extreme_logits_finite() -> None:
    # every p_ik underflows for some class: log p̄ must still be finite (log-sum-exp, no log 0)
    z = torch.tensor([[1e4, -1e4, -1e4], [1e4, -1e4, 1e4]], requires_grad=True)
    w = torch.tensor([0.9, 0.4])
    loss = ueo(z, w)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(z.grad).all()


def test_ueo_nonpositive_confidence_raises_on_cpu() -> None:
    z = torch.randn(3, 2)
    for bad, shown in ((0.0, "0.0"), (-0.5, "-0.5"), (float("nan"), "nan")):
        w = torch.tensor([0.5, bad, 0.7])
        with pytest.raises(
            ValueError, match=f"ueo: confidence must be > 0 everywhere, got {shown}"
        ):
            ueo(z, w)


def test_ueo_nonpositive_confidence_is_nan_where_values_are_not_read() -> None:
    # under vmap confidences are batched wrappers: not read, the loss is NaN instead
    z = torch.randn(2, 3, 4)
    w = torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.0, 0.7]])
    out = torch.vmap(ueo)(z, w)
    torch.testing.assert_close(out[0], ueo(z[0], w[0]))
    assert torch.isnan(out[1])


# ---------------------------------------------------------------- ueo_confidence


def test_ueo_confidence_hand_values() -> None:
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1e4, -1e4]])
    expected = torch.tensor([0.5, 1 / (1 + math.exp(-1.0)), 1.0])
    torch.testing.assert_close(ueo_confidence(z, scale=0.5), expected)
    torch.testing.assert_close(ueo_confidence(z, scale=0.5), torch.softmax(0.5 * z, -1).amax(-1))


@given(z=logits_st(max_classes=6, dtype=torch.float64), scale=st.floats(0.1, 100.0))
def test_ueo_confidence_matches_reference_and_range(z: torch.Tensor, scale: float) -> None:
    w = ueo_confidence(z, scale=scale)
    torch.testing.assert_close(
        w, torch.tensor(ueo_confidence_ref(z, scale), dtype=torch.float64), atol=1e-12, rtol=1e-12
    )
    assert (w >= 1.0 / z.shape[1] - 1e-12).all() and (w <= 1.0).all()


def test_ueo_confidence_is_mcm_of_cosines() -> None:
    # SPEC §3: max softmax of the cosine similarities at scale 1
    f = torch.randn(5, 8, dtype=torch.float64)
    t = torch.randn(3, 8, dtype=torch.float64)
    cos = torch.nn.functional.normalize(f, dim=-1) @ torch.nn.functional.normalize(t, dim=-1).T
    w = ueo_confidence(cos)
    torch.testing.assert_close(w, torch.softmax(cos, -1).max(-1).values)


def test_entropy_of_masked_logits_is_exact_with_finite_gradient() -> None:
    z = torch.tensor(
        [[0.0, float("-inf"), 0.0], [float("-inf"), 3.0, float("-inf")]], requires_grad=True
    )
    h = entropy(z)
    torch.testing.assert_close(h.detach(), torch.tensor([math.log(2.0), 0.0]))
    h.sum().backward()
    assert torch.isfinite(z.grad).all()


def test_ueo_with_a_masked_class_is_finite_and_matches_dropping_it() -> None:
    z = torch.tensor([[1.0, float("-inf"), 0.0], [0.5, float("-inf"), 2.0]], requires_grad=True)
    w = torch.tensor([0.6, 0.9])
    loss = ueo(z, w)
    dropped = ueo(z.detach()[:, [0, 2]], w)
    torch.testing.assert_close(loss.detach(), dropped)
    loss.backward()
    assert torch.isfinite(z.grad).all()


@given(z=logits_st(max_classes=6, dtype=torch.float64), scale=st.floats(0.1, 100.0))
def test_ueo_confidence_is_msp_at_inverse_temperature(z: torch.Tensor, scale: float) -> None:
    from robustft.scores import msp

    torch.testing.assert_close(
        ueo_confidence(z, scale=scale), msp(z, temperature=1.0 / scale), atol=1e-12, rtol=1e-12
    )
