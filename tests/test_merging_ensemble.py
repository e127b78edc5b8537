"""logit_ensemble: output-space ensembles of the zero-shot and the fine-tuned model.

Its error paths are in the error table of tests/test_merging_fisher.py.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference.fisher_ref import logit_ensemble_ref
from strategies import logits

from robustft.merging import logit_ensemble

SPACES = ["logits", "probs"]


def pair(
    seed: int = 0, shape: tuple[int, ...] = (4, 5), dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        (torch.randn(shape, generator=g, dtype=torch.float64) * 4).to(dtype),
        (torch.randn(shape, generator=g, dtype=torch.float64) * 4).to(dtype),
    )


# ---------------------------------------------------------------- values


def test_hand_values() -> None:
    z0, z = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    torch.testing.assert_close(
        logit_ensemble(z, reference_logits=z0, alpha=0.25), torch.tensor([[1.5, 1.0]])
    )
    # probs: 0.5 * (e^2, 1)/(e^2 + 1) + 0.5 * (1, e^4)/(1 + e^4)
    p0 = torch.tensor([math.e**2, 1.0]) / (math.e**2 + 1)
    p1 = torch.tensor([1.0, math.e**4]) / (1 + math.e**4)
    out = logit_ensemble(z, reference_logits=z0, alpha=0.5, space="probs")
    torch.testing.assert_close(out.exp(), (0.5 * p0 + 0.5 * p1)[None])
    # NumPy numbers are numbers
    torch.testing.assert_close(
        logit_ensemble(z, reference_logits=z0, alpha=np.float32(0.25)), torch.tensor([[1.5, 1.0]])
    )


@given(
    z=logits(dtype=torch.float64),
    a=st.floats(0, 1),
    space=st.sampled_from(SPACES),
    seed=st.integers(0, 9),
)
def test_matches_reference(z: torch.Tensor, a: float, space: str, seed: int) -> None:
    z0 = (
        torch.randn(z.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 5
    )
    ref = logit_ensemble_ref(z, z0, a, space)
    torch.testing.assert_close(logit_ensemble(z, reference_logits=z0, alpha=a, space=space), ref)
    t = logit_ensemble(
        z, reference_logits=z0, alpha=torch.tensor(a, dtype=torch.float64), space=space
    )
    torch.testing.assert_close(t, ref)


@given(z=logits(), a=st.floats(0, 1), seed=st.integers(0, 9))
def test_probs_is_a_normalised_log_mixture(z: torch.Tensor, a: float, seed: int) -> None:
    z0 = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(z.dtype) * 5
    out = logit_ensemble(z, reference_logits=z0, alpha=a, space="probs")
    tol = 1e-5 if out.dtype == torch.float32 else 1e-12
    torch.testing.assert_close(
        torch.logsumexp(out, -1), torch.zeros(z.shape[0], dtype=out.dtype), atol=tol, rtol=0
    )
    # shifting a model's logits per row changes nothing in probability space
    shifted = logit_ensemble(z + 7.0, reference_logits=z0 - 3.0, alpha=a, space="probs")
    torch.testing.assert_close(
        shifted, out, atol=1e-4 if out.dtype == torch.float32 else 1e-10, rtol=0
    )


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("kind", ["float", "tensor", "tensor32", "numpy"])
def test_endpoints_are_exact(space: str, kind: str) -> None:
    z, z0 = pair(1)

    def alpha(v: float) -> object:
        return {
            "float": v,
            "tensor": torch.tensor(v, dtype=torch.float64),
            "tensor32": torch.tensor(v),
            "numpy": np.float64(v),
        }[kind]

    zero = logit_ensemble(z, reference_logits=z0, alpha=alpha(0.0), space=space)
    one = logit_ensemble(z, reference_logits=z0, alpha=alpha(1.0), space=space)
    if space == "logits":
        assert torch.equal(zero, z0) and torch.equal(one, z)
    else:
        assert torch.equal(zero, torch.log_softmax(z0, -1))
        assert torch.equal(one, torch.log_softmax(z, -1))


def test_logits_space_extrapolates_like_wise() -> None:
    z, z0 = pair(2)
    out = logit_ensemble(z, reference_logits=z0, alpha=1.5)
    torch.testing.assert_close(out, z0 + 1.5 * (z - z0))


@pytest.mark.parametrize("space", SPACES)
def test_masked_classes_stay_masked_with_finite_gradients(space: str) -> None:
    z, z0 = pair(3, (2, 4))
    z[:, 0] = -math.inf
    z0[:, 0] = -math.inf  # masked by both
    z[:, 1] = -math.inf  # masked by the fine-tuned model only
    for a, as_tensor in [(a, t) for a in (0.0, 0.3, 1.0) for t in (True, False)]:
        alpha: Any = torch.tensor(a, dtype=torch.float64, requires_grad=True) if as_tensor else a
        zz, zz0 = z.clone().requires_grad_(), z0.clone().requires_grad_()
        out = logit_ensemble(zz, reference_logits=zz0, alpha=alpha, space=space)
        assert bool(torch.isneginf(out[:, 0]).all())
        # logits: -inf wherever the masking model has weight; probs: only if it has all of it
        masked = a > 0 if space == "logits" else a == 1
        assert bool(torch.isneginf(out[:, 1]).all()) == masked
        assert not bool(torch.isnan(out).any())
        ref = logit_ensemble_ref(z, z0, a, space)
        finite = torch.isfinite(ref)
        torch.testing.assert_close(out.detach()[finite], ref[finite])
        out.masked_fill(~torch.isfinite(out), 0).sum().backward()
        if as_tensor:
            assert alpha.grad is not None and bool(torch.isfinite(alpha.grad).all())
        for g in (zz.grad, zz0.grad):  # None: a side a number alpha of 0 or 1 does not use
            assert g is None or bool(torch.isfinite(g).all())


# ---------------------------------------------------------------- gradients and transforms


@pytest.mark.parametrize("space", SPACES)
def test_gradcheck_in_both_logits_and_alpha(space: str) -> None:
    z, z0 = pair(4, (3, 4))
    args = (
        z.clone().requires_grad_(),
        z0.clone().requires_grad_(),
        torch.tensor(0.3, dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(
        lambda a, b, al: logit_ensemble(a, reference_logits=b, alpha=al, space=space), args
    )


@pytest.mark.parametrize("a", [0.0, 1.0])
def test_alpha_gradient_at_the_endpoints_is_the_true_one(a: float) -> None:
    # d/da log((1 - a) q0 + a q) = (q - q0) / mixture, finite at a = 0 and a = 1
    z, z0 = pair(5, (2, 3))
    alpha = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    out = logit_ensemble(z, reference_logits=z0, alpha=alpha, space="probs")
    (g,) = torch.autograd.grad(out.sum(), alpha)
    q, q0 = torch.softmax(z, -1), torch.softmax(z0, -1)
    mix = (1 - a) * q0 + a * q
    torch.testing.assert_close(g, ((q - q0) / mix).sum())


@pytest.mark.parametrize("space", SPACES)
def test_func_grad_and_vmap_per_sample(space: str) -> None:
    z, z0 = pair(6)

    def loss(alpha: torch.Tensor, row: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return logit_ensemble(row, reference_logits=ref, alpha=alpha, space=space).logsumexp(-1)

    alpha = torch.tensor(0.4, dtype=torch.float64)
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(alpha, z, z0)
    for i in range(z.shape[0]):
        a = alpha.clone().requires_grad_()
        (g,) = torch.autograd.grad(loss(a, z[i], z0[i]), a)
        torch.testing.assert_close(per_sample[i], g)
    batched = torch.func.vmap(
        lambda r, q: logit_ensemble(r, reference_logits=q, alpha=0.4, space=space)
    )(z, z0)
    torch.testing.assert_close(
        batched, logit_ensemble(z, reference_logits=z0, alpha=0.4, space=space)
    )


@pytest.mark.parametrize("space", SPACES)
def test_compiles_fullgraph_without_recompiling(space: str) -> None:
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()

    @torch.compile(fullgraph=True, backend=counter)
    def step(z: torch.Tensor, z0: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return logit_ensemble(z, reference_logits=z0, alpha=alpha, space=space)

    for seed in range(3):
        z, z0 = pair(seed, dtype=torch.float32)
        alpha = torch.tensor(0.1 * (seed + 1))
        torch.testing.assert_close(
            step(z, z0, alpha), logit_ensemble(z, reference_logits=z0, alpha=alpha, space=space)
        )
    assert counter.frame_count == 1


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_in_float32_out_also_under_autocast(space: str, dtype: torch.dtype) -> None:
    z, z0 = pair(7, dtype=dtype)
    out = logit_ensemble(z, reference_logits=z0, alpha=0.3, space=space)
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out.double(), logit_ensemble_ref(z, z0, 0.3, space), atol=1e-5, rtol=1e-5
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = logit_ensemble(
            z.float(), reference_logits=z0.float(), alpha=torch.tensor(0.3), space=space
        )
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, out)


def test_any_leading_shape_and_purity() -> None:
    z, z0 = pair(8, (2, 3, 5))
    saved = (z.clone(), z0.clone())
    for space in SPACES:
        out = logit_ensemble(z, reference_logits=z0, alpha=0.6, space=space)
        assert out.shape == (2, 3, 5)
        torch.testing.assert_close(out, logit_ensemble_ref(z, z0, 0.6, space))
    assert torch.equal(z, saved[0]) and torch.equal(z0, saved[1])
