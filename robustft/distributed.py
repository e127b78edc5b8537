"""Collectives for data-parallel use of robustft's losses, metrics and functional forwards.

Losses whose value couples samples (UEO's weighted batch sums, its batch-marginal prediction) must
sum over the *global* batch under data parallelism, and their gradient must flow back through the
reduction; metrics computed from a distributed evaluation must see every rank's samples. These
helpers wrap ``torch.distributed`` for both, and degrade to identities when ``group`` is ``None``
or no process group is initialised, so single-process code needs no branches.

Trained tensors that live outside the module DDP wraps (a parameter tree passed to
:mod:`robustft.clip`'s functional forwards, a prompt context) are kept identical across ranks by
:func:`replicate` (gradient hooks, bucketed all-reduces) or :func:`sync_gradients` (on demand).
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Variable
from torch.utils.weak import WeakIdKeyDictionary

from robustft._checks import (
    check_device,
    check_group,
    check_int,
    check_tensor,
    check_tensor_tree,
    describe,
    is_dtensor,
)
from robustft.typing import Device, Group, Params

__all__ = [
    "Replica",
    "all_gather_cat",
    "all_reduce_sum",
    "is_distributed",
    "is_replicated",
    "rank_offset",
    "replicate",
    "sync_gradients",
    "world_size",
]


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


# --------------------------------------------------------------------------------------------
# Gradient synchronisation of parameter trees that no DDP/FSDP module owns
# --------------------------------------------------------------------------------------------

_BUCKET_BYTES = 25 * 1024 * 1024  # DDP's default bucket_cap_mb

# Tensors whose gradients a live Replica averages (weakly held, keyed by identity: a tensor's
# ``==`` is elementwise, so a plain WeakKeyDictionary cannot hold tensors).
_REPLICATED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _check_tensors(fn: str, params: Any) -> tuple[tuple[str, Tensor], ...]:
    """``(name, tensor)`` of a tree or a sequence of tensors, in order, each tensor once."""
    if isinstance(params, Tensor):
        raise TypeError(
            f"{fn}: params must be a parameter tree or a sequence of tensors, got a single "
            f"Tensor(shape={tuple(params.shape)}); wrap it: {{'context': context}} or [context]"
        )
    if isinstance(params, Mapping):
        check_tensor_tree(fn, "params", params)
        named = [(f"params[{k!r}]", v) for k, v in params.items()]
    elif isinstance(params, Iterable) and not isinstance(params, (str, bytes)):
        items = list(params)  # a sequence, or e.g. module.parameters()
        bad = [i for i, v in enumerate(items) if not isinstance(v, Tensor)]
        if bad:
            raise TypeError(
                f"{fn}: params must hold only tensors, got {describe(items[bad[0]])} at "
                f"position {bad[0]}"
            )
        named = [(f"params[{i}]", v) for i, v in enumerate(items)]
    else:
        raise TypeError(
            f"{fn}: params must be a parameter tree (e.g. a dict of the trained tensors) or a "
            f"sequence of tensors, got {describe(params)}"
        )
    seen: set[int] = set()
    out = []
    for name, t in named:
        if id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))
    return tuple(out)


def _buckets(tensors: Sequence[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), in order, each group cut at ~25 MiB."""
    groups: dict[tuple[torch.device, torch.dtype], list[list[int]]] = {}
    sizes: dict[tuple[torch.device, torch.dtype], int] = {}
    for i, t in enumerate(tensors):
        key = (t.device, t.dtype)
        nbytes = t.numel() * t.element_size()
        if key not in groups or (sizes[key] and sizes[key] + nbytes > _BUCKET_BYTES):
            groups.setdefault(key, []).append([])
            sizes[key] = 0
        groups[key][-1].append(i)
        sizes[key] += nbytes
    return [bucket for per_key in groups.values() for bucket in per_key]


def _average_grads(tensors: Sequence[Tensor], group: Any, world: int) -> None:
    """Average the ``.grad`` of ``tensors`` over the ranks of ``group``: one all-reduce per bucket.

    A missing gradient counts as zero in the sum; a tensor that has no gradient on *every* rank
    keeps ``grad=None`` (so an optimiser still skips it), one that has one somewhere gets the
    average. Every rank must pass the same tensors in the same order.
    """
    if not tensors:
        return
    grads = [t.grad for t in tensors]
    missing = [g is None for g in grads]
    for g, t in zip(grads, tensors):
        if g is not None and g.layout != torch.strided:
            raise TypeError(
                f"sync_gradients: gradients must be dense, got a {g.layout} gradient for a tensor "
                f"of shape {tuple(t.shape)}; use a dense embedding (sparse=False)"
            )
    flat_buckets = []
    works = []
    for bucket in _buckets(tensors):
        flat = torch.cat(
            [
                (
                    grads[i].reshape(-1)  # type: ignore[union-attr]
                    if grads[i] is not None
                    else tensors[i].new_zeros(tensors[i].numel())
                )
                for i in bucket
            ]
        )
        works.append(dist.all_reduce(flat, group=group, async_op=True))
        flat_buckets.append((bucket, flat))
    # which tensors have a gradient on some rank: one small all-reduce, read only when needed
    present = torch.tensor(
        [0.0 if m else 1.0 for m in missing], dtype=torch.float32, device=tensors[0].device
    )
    works.append(dist.all_reduce(present, group=group, async_op=True))
    for work in works:
        work.wait()
    anywhere = present.tolist() if any(missing) else None
    with torch.no_grad():
        for bucket, flat in flat_buckets:
            flat.div_(world)
            offset = 0
            for i in bucket:
                t, n = tensors[i], tensors[i].numel()
                part = flat[offset : offset + n].view(t.shape)
                offset += n
                g = grads[i]
                if g is not None:
                    g.copy_(part)
                elif anywhere is not None and anywhere[i] > 0:
                    t.grad = part.clone()


def sync_gradients(params: Params | Iterable[Tensor], group: Group = None) -> None:
    """Average the gradients of a tree of trained tensors over the ranks, now (in place).

    .. math:: g_p \\leftarrow \\frac{1}{W} \\sum_{r=1}^{W} g_p^{(r)} \\quad \\text{for every tensor } p

    What ``DistributedDataParallel`` does for the parameters of the module it wraps, for tensors
    that live outside any wrapped module -- the trees you pass as ``params=`` to
    :func:`robustft.clip.image_features` / ``text_features`` / ``encode_text_with_context``, a CoOp
    context, a linear head: gradients are flattened into buckets of about 25 MiB per
    (device, dtype) and each bucket is all-reduced once (asynchronously, then awaited). Every
    rank then holds the gradient of the global batch (for per-sample losses averaged over equal
    local batches, exactly the one-process gradient), so identical optimiser steps keep the
    replicas identical. A tensor without a gradient on this rank counts as zero; one without a
    gradient on every rank keeps ``grad=None``.

    Usually you call :func:`replicate` once instead, which runs this at the end of every
    backward pass; call ``sync_gradients`` yourself only for tensors a :func:`replicate` handle
    holds inside its ``no_sync()`` (or to average gradients at a moment of your choosing).
    Averaging is idempotent on gradients that are already equal across ranks, so calling it
    twice is harmless.

    Args:
        params: the trained tensors, as a parameter tree or a sequence (any iterable, e.g.
            ``head.parameters()``) of tensors, the same tensors in the same order on every rank.
        group: the process group; ``None`` uses the default group when one is initialised. With
            no process group (or one rank) nothing happens.

    Returns:
        None: the ``.grad`` of each tensor is overwritten with the average.

    Raises:
        TypeError: if ``params`` is not a tree or sequence of tensors, a gradient is sparse, or
            ``group`` is neither ``None`` nor a process group.

    Example:
        >>> w = torch.ones(2, requires_grad=True)
        >>> (3 * w).sum().backward()
        >>> sync_gradients({"w": w})  # one process: nothing to average
        >>> w.grad
        tensor([3., 3.])
    """
    fn = "sync_gradients"
    named = _check_tensors(fn, params)
    check_group(fn, group)
    if not is_distributed(group):
        return
    pg: Any = dist.group.WORLD if group is None else group
    _average_grads([t for _, t in named], pg, world_size(group))


def is_replicated(tensor: Tensor) -> bool:
    """Whether a live :func:`replicate` handle averages ``tensor``'s gradient over the ranks.

    Raises:
        TypeError: if ``tensor`` is not a tensor.

    Example:
        >>> w = torch.zeros(2, requires_grad=True)
        >>> handle = replicate([w])
        >>> is_replicated(w)
        True
        >>> handle.remove()
        >>> is_replicated(w)
        False
    """
    check_tensor("is_replicated", "tensor", tensor)
    return tensor in _REPLICATED


class Replica:
    """The handle :func:`replicate` returns: the replicated tensors and their gradient hooks.

    Not built directly: call :func:`replicate`.

    Example:
        >>> w = torch.zeros(3, requires_grad=True)
        >>> handle = replicate({"w": w})
        >>> with handle.no_sync():  # accumulation micro-steps: no communication
        ...     w.sum().backward()
        >>> w.sum().backward()  # the last micro-step averages the accumulated gradient
        >>> w.grad
        tensor([2., 2., 2.])
        >>> handle.remove()
    """

    def __init__(self, tensors: tuple[Tensor, ...], group: Group, world: int) -> None:
        self.tensors = tensors
        self.group = group
        self.world = world
        self._sync = True
        self._queued_in: int | None = None  # the backward pass whose end will synchronise
        self._hooks: list[Any] = []

    def _install(self) -> None:
        for t in self.tensors:
            self._hooks.append(t.register_post_accumulate_grad_hook(self._on_grad))

    def _on_grad(self, tensor: Tensor) -> None:
        # the first gradient of this backward pass queues one synchronisation at its end, so
        # every tensor of the replica is averaged once, in the same order on every rank (keyed by
        # the backward pass: one that failed before its end leaves nothing stale behind)
        task = torch._C._current_graph_task_id()
        if self._sync and self._queued_in != task:
            self._queued_in = task
            Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._queued_in = None
        pg: Any = dist.group.WORLD if self.group is None else self.group
        _average_grads(self.tensors, pg, self.world)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Skip the averaging in backward passes inside this block (gradient accumulation).

        The gradients accumulate locally; the first backward outside the block averages the sum
        (as ``DistributedDataParallel.no_sync``), or call :func:`sync_gradients` yourself.

        Returns:
            A context manager.
        """
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def remove(self) -> None:
        """Remove the gradient hooks; the tensors are no longer replicated.

        Returns:
            None.
        """
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for t in self.tensors:
            _REPLICATED.pop(t, None)

    def __repr__(self) -> str:
        n = sum(t.numel() for t in self.tensors)
        return f"Replica({len(self.tensors)} tensors, {n} elements, world={self.world})"


def _comm_device(tensors: Sequence[Tensor], group: Any) -> torch.device:
    """Where a small bookkeeping collective runs: the tensors' device, or CUDA under NCCL."""
    if tensors:
        return tensors[0].device
    if "nccl" in str(dist.get_backend(group)):  # pragma: no cover - needs GPUs
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree(fn: str, tensors: Sequence[Tensor], problem: str | None, group: Any, world: int) -> None:
    """One collective check: every rank passes the same tensors (count, shapes, dtypes, order)
    and no rank refused its own; otherwise every rank raises, none waits for the others."""
    text = ";".join(f"{tuple(t.shape)}:{t.dtype}" for t in tensors)
    mine = [len(tensors), sum(t.numel() for t in tensors), zlib.crc32(text.encode()), 0]
    mine[3] = int(problem is not None)
    local = torch.tensor(mine, dtype=torch.long, device=_comm_device(tensors, group))
    every = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(every, local, group=group)
    rows = [e.tolist() for e in every]
    if problem is not None:
        raise ValueError(problem)
    refused = [r for r, row in enumerate(rows) if row[3]]
    if refused:
        raise ValueError(
            f"{fn}: params were refused on rank(s) {refused} (see their error), so every rank "
            f"stops here"
        )
    if any(row[:3] != rows[0][:3] for row in rows):
        listed = ", ".join(
            f"rank {r}: {row[0]} tensors/{row[1]} elements" for r, row in enumerate(rows)
        )
        raise ValueError(
            f"{fn}: params must be the same tensors (count, shapes, dtypes, order) on every rank, "
            f"got {listed}"
        )


def _broadcast_values(tensors: Sequence[Tensor], group: Any) -> None:
    """Copy group rank 0's values into every rank's tensors (bucketed), like DDP's constructor."""
    with torch.no_grad():
        for bucket in _buckets(tensors):
            flat = torch.cat([tensors[i].detach().reshape(-1) for i in bucket])
            dist.broadcast(flat, group=group, group_src=0)
            offset = 0
            for i in bucket:
                n = tensors[i].numel()
                tensors[i].copy_(flat[offset : offset + n].view(tensors[i].shape))
                offset += n


def replicate(
    params: Params | Iterable[Tensor], *, group: Group = None, init_sync: bool = True
) -> Replica:
    """Keep a tree of trained tensors identical on every rank: average their gradients.

    .. math:: g_p \\leftarrow \\frac{1}{W} \\sum_{r=1}^{W} g_p^{(r)} \\quad \\text{after every backward}

    ``DistributedDataParallel`` synchronises only the parameters of the module it wraps. Tensors
    trained *outside* it -- a tree passed as ``params=`` to :func:`robustft.clip.image_features`,
    ``text_features`` or ``encode_text_with_context`` (also alongside the DDP wrapper), a CoOp
    context, a separate head -- are never averaged, and the ranks drift apart. ``replicate``
    registers them once, before training:

    - with ``init_sync`` (default), rank 0's values are broadcast to every rank (as DDP's
      constructor does), so the replicas start equal;
    - a gradient hook on each tensor queues, at the end of every backward pass that reaches one
      of them, :func:`sync_gradients` of all of them: bucketed all-reduces of about 25 MiB, in
      the same order on every rank. Gradients already equal across ranks are unchanged by
      another average, so several backward passes per step are fine;
    - :meth:`Replica.no_sync` skips the communication during accumulation micro-steps.

    :mod:`robustft.clip`'s functional forwards refuse, on the first backward pass under a
    process group of more than one rank, a trainable tensor that neither ``replicate`` nor a
    DDP/FSDP module synchronises. On one process (no process group, or one rank) ``replicate``
    installs no hook and communicates nothing. Every rank must call it with the same tensors in
    the same order (checked once, collectively: every rank raises the same error), and every rank
    must run every backward pass that reaches them, as with DDP. Eager mode only: compiled
    backward passes (compiled autograd) are not supported.

    Args:
        params: the trained tensors (leaf tensors that require grad), as a parameter tree or a
            sequence (any iterable, e.g. ``head.parameters()``) of tensors; tensors that do not
            require grad are skipped, a tensor listed twice counts once.
        group: the process group; ``None`` uses the default group when one is initialised.
        init_sync: broadcast group rank 0's values to the other ranks first.

    Returns:
        A :class:`Replica` handle (``no_sync()``, ``remove()``).

    Raises:
        TypeError: if ``params`` is not a tree or sequence of tensors, holds a sharded
            ``DTensor`` (FSDP's own), or ``group`` is neither ``None`` nor a process group.
        ValueError: if no tensor requires grad, a tensor that requires grad is not a leaf (its
            gradient is not kept), a tensor is already replicated, or the ranks pass different
            tensors (count, shapes, dtypes, order).

    Example:
        >>> head = torch.nn.Linear(4, 2)
        >>> handle = replicate(dict(head.named_parameters()))  # once, before training
        >>> head(torch.ones(3, 4)).sum().backward()  # under torchrun: gradients averaged here
        >>> head.weight.grad.shape
        torch.Size([2, 4])
        >>> handle.remove()
    """
    fn = "replicate"
    named = _check_tensors(fn, params)
    check_group(fn, group)
    if not isinstance(init_sync, bool):
        raise TypeError(f"{fn}: init_sync must be a bool, got {describe(init_sync)}")
    sharded = [name for name, t in named if is_dtensor(t)]
    if sharded:
        raise TypeError(
            f"{fn}: params must be plain tensors, got sharded DTensors at {sharded[:5]}; FSDP "
            f"synchronises its own parameters"
        )
    trained = [(name, t) for name, t in named if t.requires_grad]
    computed = [name for name, t in trained if not t.is_leaf]
    taken = [name for name, t in trained if t in _REPLICATED]
    problem = None
    if not trained:
        problem = (
            f"{fn}: params must hold at least one tensor that requires grad, got "
            f"{len(named)} tensor(s), none requiring grad"
        )
    elif computed:
        problem = (
            f"{fn}: params must be leaf tensors (their .grad is what an optimiser steps), got "
            f"computed tensors at {computed[:5]}; replicate the tensors they are computed from"
        )
    elif taken:
        problem = (
            f"{fn}: params must not be replicated already, got {taken[:5]} held by a live "
            f"handle; call its remove() first"
        )
    tensors = tuple(t for _, t in trained)
    world = world_size(group)
    handle = Replica(tensors, group, world)
    if is_distributed(group):
        pg: Any = dist.group.WORLD if group is None else group
        _agree(fn, tensors, problem, pg, world)
        if init_sync:
            _broadcast_values(tensors, pg)
        handle._install()
    elif problem is not None:
        raise ValueError(problem)
    for t in tensors:
        _REPLICATED[t] = True
    return handle
