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


@pytest.mark.parametrize(
    "call",
    [
        lambda: distributed.is_distributed(0),
        lambda: distributed.world_size("world"),
        lambda: distributed.all_reduce_sum(torch.ones(1), group=0),
        lambda: distributed.all_gather_cat(torch.ones(1), group=1),
        lambda: distributed.rank_offset(3, group=0),
    ],
    ids=["is_distributed", "world_size", "all_reduce_sum", "all_gather_cat", "rank_offset"],
)
def test_group_must_be_a_process_group(call) -> None:  # type: ignore[no-untyped-def]
    # without an initialised process group these used to return silently (and raise a raw torch
    # error with one): the group is checked first, in every case
    with pytest.raises(
        TypeError, match=r": group must be a torch.distributed ProcessGroup or None"
    ):
        call()


def test_rank_offset_argument_errors() -> None:
    with pytest.raises(TypeError, match=r"rank_offset: n must be an int, got 2.5"):
        distributed.rank_offset(2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"rank_offset: n must be an int >= 0, got -1"):
        distributed.rank_offset(-1)
    with pytest.raises(ValueError, match=r"rank_offset: device must name a torch device"):
        distributed.rank_offset(1, device="gpu0")
    with pytest.raises(TypeError, match=r"rank_offset: device must be None, a str or a torch"):
        distributed.rank_offset(1, device=3)  # type: ignore[arg-type]


def _empty_local_batches(rank: int, world_size: int) -> list[float]:
    # rank 0 contributes no rows: gather, offsets and the gather's backward all stay in step
    n = 0 if rank == 0 else 3
    x = torch.arange(n * 2, dtype=torch.float64).reshape(n, 2).requires_grad_(True)
    g = distributed.all_gather_cat(x)
    assert g.shape == (3, 2)
    assert distributed.rank_offset(n) == 0  # rank 1 starts at 0: rank 0 has no rows
    g.sum().backward()
    assert x.grad.shape == (n, 2)
    assert torch.equal(x.grad, torch.full((n, 2), float(world_size), dtype=torch.float64))
    empty = distributed.all_gather_cat(torch.zeros(0, 4))
    assert empty.shape == (0, 4)
    return [float(g.sum())]


@pytest.mark.distributed
def test_empty_local_batches() -> None:
    assert run_distributed(_empty_local_batches, world_size=2, timeout=90) == [[15.0], [15.0]]
