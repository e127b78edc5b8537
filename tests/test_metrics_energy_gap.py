"""robustft.metrics.energy_gap: Lipsum-FT's diagnostic (Eq. 6) over a fixed set of random texts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference.metrics_ref import energy_gap_ref
from strategies import features

from robustft import losses
from robustft.metrics import energy_gap


def test_hand_values() -> None:
    f, f0, texts = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.eye(2)
    # inner products of f - f0 = (1, -1) with e1, e2: 1 and -1; (1 + 1) / (2 * 2)
    out = energy_gap(f, reference_features=f0, text_features=texts, logit_scale=1.0)
    torch.testing.assert_close(out, torch.tensor(0.5))
    # s = 2 multiplies by s^2 = 4; raw (unnormalised) inputs are normalised first
    out = energy_gap(3 * f, reference_features=0.5 * f0, text_features=7 * texts, logit_scale=2.0)
    torch.testing.assert_close(out, torch.tensor(2.0))
    # two images, a text orthogonal to the move contributes 0
    f = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    f0 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    texts = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    per = energy_gap(f, reference_features=f0, text_features=texts, reduction="none")
    torch.testing.assert_close(per, torch.tensor([1e4 * 1 / 4, 0.0], dtype=torch.float64))
    total = energy_gap(f, reference_features=f0, text_features=texts, reduction="sum")
    torch.testing.assert_close(total, torch.tensor(2500.0, dtype=torch.float64))
    same = energy_gap(f, reference_features=f.clone(), text_features=texts)
    assert float(same) == 0.0


@given(
    data=st.data(),
    b=st.integers(1, 4),
    n=st.integers(1, 6),
    d=st.integers(1, 5),
    s=st.sampled_from([1.0, 4.6, 100.0]),
)
def test_matches_naive_reference(data: st.DataObject, b: int, n: int, d: int, s: float) -> None:
    f, f0, t = data.draw(features(b, d)), data.draw(features(b, d)), data.draw(features(n, d))
    got = energy_gap(f, reference_features=f0, text_features=t, logit_scale=s, reduction="none")
    torch.testing.assert_close(got.tolist(), energy_gap_ref(f, f0, t, s), rtol=1e-9, atol=1e-9)


def test_equals_the_training_loss_averaged_over_every_text() -> None:
    """The diagnostic is losses.energy_gap with all N texts as the step's M."""
    g = torch.Generator().manual_seed(0)
    f, f0 = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    texts = torch.randn(300, 16, generator=g)
    for reduction in ("mean", "sum", "none"):
        ours = energy_gap(f, reference_features=f0, text_features=texts, reduction=reduction)
        theirs = losses.energy_gap(
            f, reference_features=f0, text_features=texts, reduction=reduction
        )
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    # and the mean over disjoint chunks of texts is the gap over all of them
    chunks = torch.stack(
        [
            losses.energy_gap(f, reference_features=f0, text_features=part, logit_scale=1.0)
            for part in texts.split(100)
        ]
    )
    whole = energy_gap(f, reference_features=f0, text_features=texts, logit_scale=1.0)
    torch.testing.assert_close(chunks.mean(), whole, rtol=1e-5, atol=0)


def test_no_grad_no_mutation_and_float32_under_bf16_autocast() -> None:
    f = torch.randn(3, 8, requires_grad=True)
    f0, texts = torch.randn(3, 8), torch.randn(20, 8)
    copies = [f.detach().clone(), f0.clone(), texts.clone()]
    out = energy_gap(f, reference_features=f0, text_features=texts)
    assert not out.requires_grad and out.dtype == torch.float32
    for a, b in zip((f.detach(), f0, texts), copies):
        assert torch.equal(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = energy_gap(f, reference_features=f0, text_features=texts)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, out)  # no bf16 matmul: the same float32 value
    half = energy_gap(f.bfloat16(), reference_features=f0.bfloat16(), text_features=texts.half())
    assert half.dtype == torch.float32
    f64 = energy_gap(f.double(), reference_features=f0, text_features=texts)
    assert f64.dtype == torch.float64


def test_bf16_features_are_dominated_by_rounding() -> None:
    """The docstring's warning: bf16 rounding alone adds a gap larger than a small true gap."""
    g = torch.Generator().manual_seed(0)
    f0 = torch.randn(256, 512, generator=g)
    f = f0 + 1e-3 * torch.randn(256, 512, generator=g)
    texts = torch.randn(2000, 512, generator=g)
    exact = float(energy_gap(f, reference_features=f0, text_features=texts))
    rounded = float(energy_gap(f.bfloat16(), reference_features=f0.bfloat16(), text_features=texts))
    assert rounded > 2 * exact
    assert 1e4 * 2**-18 / 512 / 10 < rounded - exact < 1e4 * 2**-18 / 512 * 10  # s^2 2^-18 / D


def test_scale_forms() -> None:
    f, f0, texts = torch.randn(2, 4), torch.randn(2, 4), torch.randn(6, 4)
    base = energy_gap(f, reference_features=f0, text_features=texts, logit_scale=1.0)
    for scale in (np.float32(3.0), np.float64(3.0), 3, torch.tensor(3.0)):
        got = energy_gap(f, reference_features=f0, text_features=texts, logit_scale=scale)
        torch.testing.assert_close(got, 9 * base)
    # open_clip stores the log of the scale; the metric wants the scale itself
    log_scale = torch.nn.Parameter(torch.tensor(math.log(100.0)))
    got = energy_gap(f, reference_features=f0, text_features=texts, logit_scale=log_scale.exp())
    torch.testing.assert_close(got, 1e4 * base)
    assert not got.requires_grad


def test_reference_and_texts_are_keyword_only() -> None:
    f, f0, texts = torch.randn(2, 4), torch.randn(2, 4), torch.randn(6, 4)
    with pytest.raises(TypeError):
        energy_gap(f, f0, texts)  # type: ignore[misc]
    with pytest.raises(TypeError):
        energy_gap(f, f0, text_features=texts)  # type: ignore[misc]
