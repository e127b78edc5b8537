"""Collectives for data-parallel use of robustft's losses and metrics.

Losses whose value couples samples (UEO's weighted batch sums, its batch-marginal prediction) must
sum over the *global* batch under data parallelism, and their gradient must flow back through the
reduction; metrics computed from a distributed evaluation must see every rank's samples. These
helpers wrap ``torch.distributed`` for both, and degrade to identities when ``group`` is ``None``
or no process group is initialised, so single-process code needs no branches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from robustft._checks import check_device, check_group, check_int, check_tensor
from robustft.typing import Device, Group

__all__ = ["all_gather_cat", "all_reduce_sum", "is_distributed", "rank_offset", "world_size"]


def is_distributed(group: Group = None) -> bool:
    """True when ``torch.distributed`` is initialised and ``group`` (or the world) has > 1 rank.

    Raises:
        TypeError: if ``group`` is neither ``None`` nor a process group.

    Example:
        >>> is_distributed()  # a single process without torch.distributed.init_process_group
        False
    """
    check_group("is_distributed", group)
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group: Group = None) -> int:
    """Number of ranks in ``group`` (1 when not distributed).

    Raises:
        TypeError: if ``group`` is neither ``None`` nor a process group.

    Example:
        >>> world_size()
        1
    """
    check_group("world_size", group)
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(group))


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the incoming gradients over ranks too."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def all_reduce_sum(tensor: Tensor, group: Group = None) -> Tensor:
    """Sum ``tensor`` over the ranks of ``group``, differentiably.

    .. math:: S = \\sum_{r=1}^{W} s_r

    The backward pass sums the incoming gradients over ranks as well, so on rank ``r`` the
    gradient with respect to ``s_r`` is ``W`` times the local share when every rank computes the
    same loss from ``S``. DDP and FSDP *average* gradients over ranks, which cancels the factor:
    the averaged gradient equals the single-process gradient on the concatenated global batch.
    Detaching the other ranks' contributions instead (a plain ``all_reduce`` of a detached copy
    plus the local term) loses that factor: after DDP's averaging the gradient is ``1/W`` of the
    correct one.

    Eager mode uses an ``autograd.Function`` around ``dist.all_reduce`` (any torch >= 2.4);
    inside ``torch.compile`` the traceable functional collective is used.

    Args:
        tensor: any tensor, same shape on every rank.
        group: a ``torch.distributed`` process group; ``None`` with no initialised process group
            (or a single rank) returns ``tensor`` unchanged, and ``None`` with an initialised
            group means the default (world) group.

    Returns:
        A new tensor with the global sum (the input is not modified).

    Raises:
        TypeError: if ``tensor`` is not a tensor or ``group`` is neither ``None`` nor a process
            group.

    Example:
        >>> all_reduce_sum(torch.tensor([1.0, 2.0]))  # one process: the sum over one rank
        tensor([1., 2.])
    """
    check_tensor("all_reduce_sum", "tensor", tensor)
    check_group("all_reduce_sum", group)
    if not is_distributed(group):
        return tensor
    pg: Any = dist.group.WORLD if group is None else group
    if torch.compiler.is_compiling():  # pragma: no cover - exercised only on compiled DDP runs
        from torch.distributed import _functional_collectives as fc

        return fc.all_reduce(tensor, "sum", pg)
    out: Tensor = _AllReduceSum.apply(tensor, pg)
    return out


def _gather_counts(n: int, device: torch.device, group: Group) -> list[int]:
    size = torch.tensor([n], device=device, dtype=torch.long)
    sizes = [torch.empty_like(size) for _ in range(world_size(group))]
    dist.all_gather(sizes, size, group=group)
    return [int(s.item()) for s in sizes]


class _AllGatherCat(torch.autograd.Function):
    """Uneven all-gather along dim 0 whose backward sums the gradients over ranks and slices."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        counts = _gather_counts(tensor.shape[0], tensor.device, group)
        rank = dist.get_rank(group)
        ctx.group = group
        ctx.span = (sum(counts[:rank]), sum(counts[: rank + 1]))
        padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        lo, hi = ctx.span
        return total[lo:hi], None


def all_gather_cat(tensor: Tensor, group: Group = None) -> Tensor:
    """Concatenate along dim 0 the tensors of every rank, whose first dimensions may differ.

    .. math:: G = [x_1; x_2; \\dots; x_W], \\qquad x_r \\in \\mathbb{R}^{n_r \\times \\cdots}

    Ranks are concatenated in rank order; trailing dimensions and dtype must agree across ranks.
    Differentiable: the backward pass sums the gradient of ``G`` over ranks and returns each rank
    its own rows, so when every rank computes the same loss from ``G`` the gradient on rank ``r``
    is ``W`` times its share, which DDP's averaging turns into the exact single-process gradient
    (the same convention as :func:`all_reduce_sum`). Used for global-batch contrastive negatives
    and, detached, for distributed evaluation.

    Args:
        tensor: ``[n_r, ...]`` on rank ``r``.
        group: a process group; ``None`` uses the default group when one is initialised.
            Without a distributed group (or with one rank), ``tensor`` itself is returned.

    Returns:
        ``[sum_r n_r, ...]``, identical on every rank. A rank may contribute 0 rows (every rank
        must still call it, and run the backward when the result is differentiated).

    Raises:
        TypeError: if ``tensor`` is not a tensor or ``group`` is neither ``None`` nor a process
            group.
        ValueError: if ``tensor`` is 0-d.

    Example:
        >>> all_gather_cat(torch.arange(3))  # one process: this rank's rows are all the rows
        tensor([0, 1, 2])
    """
    check_tensor("all_gather_cat", "tensor", tensor)
    check_group("all_gather_cat", group)
    if tensor.ndim == 0:
        raise ValueError(
            f"all_gather_cat: tensor must have at least 1 dimension, got shape {tuple(tensor.shape)}"
        )
    if not is_distributed(group):
        return tensor
    if group is None:
        group = dist.group.WORLD
    out: Tensor = _AllGatherCat.apply(tensor.contiguous(), group)
    return out


def rank_offset(n: int, group: Group = None, *, device: Device = "cpu") -> int:
    """Index of this rank's first row in :func:`all_gather_cat` of ``n``-row tensors (0 alone).

    Args:
        n: this rank's number of rows (>= 0).
        group: the process group of the gather (``None``: the default group, if any).
        device: where the size exchange runs (``"cuda"`` for NCCL).

    Returns:
        ``sum of n_r over ranks r before this one``.

    Raises:
        TypeError: if ``n`` is not an int, ``group`` is neither ``None`` nor a process group, or
            ``device`` is not a device.
        ValueError: if ``n < 0`` or ``device`` names no device.

    Example:
        >>> rank_offset(5)  # one process: its rows start the gathered tensor
        0
    """
    n = check_int("rank_offset", "n", n, low=0)
    check_group("rank_offset", group)
    device = check_device("rank_offset", "device", device) or torch.device("cpu")
    if not is_distributed(group):
        return 0
    if group is None:
        group = dist.group.WORLD
    counts = _gather_counts(n, device, group)
    return sum(counts[: dist.get_rank(group)])
