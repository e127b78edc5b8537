"""The shared numerical core: one dtype rule, one fast-path predicate, exact kernels."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from robustft import _numerics as n


def test_compute_dtype_is_at_least_float32() -> None:
    assert n.compute_dtype(torch.bfloat16) == torch.float32
    assert n.compute_dtype(torch.float16, torch.bfloat16) == torch.float32
    assert n.compute_dtype(torch.zeros(1, dtype=torch.float64)) == torch.float64
    assert n.compute_dtype() == torch.float32


def test_full_precision_keeps_float32_under_bf16_autocast() -> None:
    a, b = torch.randn(4, 3), torch.randn(3, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
        with n.full_precision(a, b):
            assert (a @ b).dtype == torch.float32
        assert (a @ b).dtype == torch.bfloat16
    with n.full_precision(a):  # a no-op without autocast
        assert (a @ b).dtype == torch.float32


def test_foreach_ok_and_values_readable() -> None:
    x = torch.zeros(2)
    assert n.foreach_ok([x]) and n.values_readable(x)
    w = torch.zeros(2, requires_grad=True)
    assert not n.foreach_ok([x, w])
    with torch.no_grad():
        assert n.foreach_ok([x, w])
    seen: list[bool] = []

    def probe(row: torch.Tensor) -> torch.Tensor:
        seen.extend([n.foreach_ok([row]), n.values_readable(row)])
        return row.sum()

    torch.func.vmap(probe)(torch.zeros(3, 2))
    assert seen == [False, False]


def test_kernels_hand_values() -> None:
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    assert torch.allclose(n.log_msp(z).exp(), torch.tensor([0.5, 1 / (1 + math.exp(-2))]))
    assert torch.allclose(n.entropy(z[:1]), torch.tensor([math.log(2)]))
    assert n.kl_rows(z, z).abs().max() < 1e-7
    unit = n.normalize(torch.tensor([[3.0, 4.0], [0.0, 0.0]]), torch.float64)
    assert unit.dtype == torch.float64 and unit.tolist() == [[0.6, 0.8], [0.0, 0.0]]


def test_masked_classes_give_finite_values_and_gradients() -> None:
    teacher = torch.tensor([[0.0, float("-inf"), 1.0]])
    student = torch.tensor([[0.5, 0.2, -0.3]], requires_grad=True)
    kl = n.kl_rows(teacher, student)
    assert torch.isfinite(kl).all()
    (g,) = torch.autograd.grad(kl.sum(), student)
    assert torch.isfinite(g).all()
    q = torch.softmax(teacher, -1)
    expected = (
        q[:, [0, 2]] * (q[:, [0, 2]].log() - torch.log_softmax(student, -1)[:, [0, 2]])
    ).sum()
    assert torch.allclose(kl, expected.detach())
    z = torch.tensor([[1.0, float("-inf")]], requires_grad=True)
    h = n.entropy(z)
    assert h.item() == 0.0
    (g,) = torch.autograd.grad(h.sum(), z)
    assert torch.isfinite(g).all()
    # a student masking a class the teacher keeps is infinitely far: the true KL
    assert math.isinf(n.kl_rows(torch.zeros(1, 2), torch.tensor([[0.0, float("-inf")]])).item())


@given(st.lists(st.floats(-50, 50), min_size=1, max_size=8))
def test_entropy_bounds_and_msp_range(values: list[float]) -> None:
    z = torch.tensor([values], dtype=torch.float64)
    h = n.entropy(z)
    assert -1e-12 <= h.item() <= math.log(len(values)) + 1e-12
    p = n.log_msp(z).exp().item()
    assert 1 / len(values) - 1e-12 <= p <= 1 + 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_normalize_computes_in_the_given_dtype(dtype: torch.dtype) -> None:
    x = torch.randn(3, 4).to(dtype)
    assert n.normalize(x, n.compute_dtype(x)).dtype == torch.float32
