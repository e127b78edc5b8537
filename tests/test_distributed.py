"""Tests of robustft.distributed: identities without a group, collectives on two gloo ranks."""

from __future__ import annotations

import pytest
import torch
from _dist import run_distributed

from robustft import distributed


def test_single_process_identities() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert not distributed.is_distributed()
    assert distributed.world_size() == 1
    assert distributed.all_reduce_sum(x) is x
    assert distributed.all_gather_cat(x) is x
    assert distributed.rank_offset(3) == 0


def test_errors() -> None:
    with pytest.raises(TypeError, match=r"all_reduce_sum: tensor must be a torch.Tensor, got 1.0"):
        distributed.all_reduce_sum(1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"all_gather_cat: tensor must be a torch.Tensor"):
        distributed.all_gather_cat([1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"all_gather_cat: tensor must have at least 1 dimension"):
        distributed.all_gather_cat(torch.tensor(1.0))


def _collectives(rank: int, world_size: int) -> list[float]:
    assert distributed.is_distributed() and distributed.world_size() == world_size
    # uneven first dimensions: rank r holds r + 2 rows whose values encode (rank, row)
    local = torch.stack([torch.tensor([rank * 10.0 + i, -1.0]) for i in range(rank + 2)])
    gathered = distributed.all_gather_cat(local)
    expected = torch.cat(
        [
            torch.stack([torch.tensor([r * 10.0 + i, -1.0]) for i in range(r + 2)])
            for r in range(world_size)
        ]
    )
    assert torch.equal(gathered, expected)

    # all_gather_cat is differentiable: with loss = sum_i c_i * G_i on every rank (c the global
    # row index + 1), rank r's rows get W * c_i (the gradient summed over ranks)
    assert distributed.rank_offset(rank + 2) == sum(r + 2 for r in range(rank))
    x_rows = torch.ones(rank + 2, requires_grad=True)
    g_all = distributed.all_gather_cat(x_rows)
    coeff = torch.arange(1, g_all.shape[0] + 1, dtype=torch.float32)
    (coeff * g_all).sum().backward()
    lo = distributed.rank_offset(rank + 2)
    assert torch.equal(x_rows.grad, world_size * coeff[lo : lo + rank + 2])

    # all_reduce_sum is differentiable: loss = (sum_r x_r)^2 on every rank
    x = torch.tensor(float(rank + 1), requires_grad=True)
    total = distributed.all_reduce_sum(x)
    assert total.item() == sum(range(1, world_size + 1))
    (total**2).backward()
    return [float(x.grad.item()), float(total.item())]


@pytest.mark.distributed
def test_two_ranks() -> None:
    out = run_distributed(_collectives, world_size=2)
    s = 3.0  # 1 + 2
    # d/dx_r of S^2 is 2S; the backward sums the two ranks' identical upstream gradients, so each
    # rank sees W * 2S and DDP's averaging over ranks returns exactly 2S
    for grad, total in out:
        assert total == s
        assert grad == pytest.approx(2 * 2 * s)
