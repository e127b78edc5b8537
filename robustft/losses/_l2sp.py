"""L2-SP: squared distance of the fine-tuned parameters to the pre-trained starting point.

Memory: a step of ``loss + lam * l2sp(params, anchor=anchor)`` must not cost a parameter tree.
The naive formulation keeps every difference :math:`\\Delta_k = \\theta_k - \\theta^0_k` for the
backward pass (one tree) and materialises their gradients (another). Here the value and the
gradient :math:`g\\,\\Delta_k` are formed by an ``autograd.Function`` per *chunk* of tensors whose
total size is at most that of the largest tensor: the forward keeps no difference (it saves only
references to ``params`` and ``anchor``), and the backward recomputes one chunk's differences when
autograd reaches that chunk, so at most about one tensor-sized temporary is alive at a time, and
the gradients it returns are the ones autograd stores in ``.grad``. The chunks' nodes are
scheduled last in the backward (see :func:`_lean_part`; this uses the private
``Node._set_sequence_nr`` and only affects ordering, not values: without it the gradients would be
formed before the model's backward frees its activations).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from robustft._checks import check_floating_tree, fmt_keys, is_functorch_wrapped
from robustft._numerics import compute_dtype, plain_tensor
from robustft.tree import check_same_structure
from robustft.typing import Params

__all__ = ["l2sp"]

_FN = "l2sp"


def _lean_ok(tensors: list[Tensor]) -> bool:
    """Whether the chunked ``autograd.Function`` path may run (eager, plain tensors)."""
    if torch.compiler.is_compiling():  # inductor fuses the plain formulation: no temporaries
        return False
    return all(plain_tensor(t) and not is_functorch_wrapped(t) for t in tensors)


def _chunks(ps: list[Tensor], anc: list[Tensor]) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
    """Chunks of the tensors whose total size is at most the size of the group's largest tensor.

    A tensor of at least half that size is a chunk of its own; smaller ones (biases, norms) are
    batched into one multi-tensor kernel per chunk. So a chunk's differences never take more memory
    than the largest tensor.
    """
    budget = max(p.numel() for p in ps)
    small: list[int] = []
    size = 0
    for i, p in enumerate(ps):
        if 2 * p.numel() >= budget:
            yield [p], [anc[i]]
            continue
        if size + p.numel() > budget:
            yield [ps[j] for j in small], [anc[j] for j in small]
            small, size = [], 0
        small.append(i)
        size += p.numel()
    if small:
        yield [ps[j] for j in small], [anc[j] for j in small]


def _squared_distance(ps: list[Tensor], anc: list[Tensor], acc: torch.dtype) -> Tensor:
    """:math:`\\sum_k \\|p_k - a_k\\|^2` in ``acc``; one chunk's differences alive at a time."""
    total = torch.zeros((), dtype=acc, device=ps[0].device)
    for cp, ca in _chunks(ps, anc):
        diffs = torch._foreach_sub(cp, ca)
        norms = torch._foreach_norm(diffs, 2, dtype=acc)
        del diffs
        total = total + torch.stack(list(norms)).square().sum()
    return total


class _HalfSquaredDistance(torch.autograd.Function):
    """:math:`\\tfrac12 \\sum_k \\|p_k - a_k\\|^2` whose backward forms :math:`g\\,(p_k - a_k)`.

    ``forward(ctx, n, acc, *tensors)``: the first ``n`` tensors are the parameters, the next ``n``
    the (detached) anchors. Nothing but references to the inputs is saved.
    """

    @staticmethod
    def forward(ctx: Any, n: int, acc: torch.dtype, *tensors: Tensor) -> Tensor:
        ctx.n = n
        ctx.save_for_backward(*tensors)
        diffs = torch._foreach_sub(tensors[:n], tensors[n:])
        norms = torch._foreach_norm(diffs, 2, dtype=acc)
        del diffs
        return 0.5 * torch.stack(list(norms)).square().sum()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
        saved = ctx.saved_tensors
        n = ctx.n
        ps, anc = list(saved[:n]), list(saved[n:])
        grads: list[Tensor | None] = []
        for p, a, need in zip(ps, anc, ctx.needs_input_grad[2 : 2 + n]):
            if not need:
                grads.append(None)
                continue
            d = torch.sub(p, a)  # one tensor-sized temporary, returned as the gradient
            d = d.mul_(grad) if d.dtype == p.dtype else (d * grad).to(p.dtype)
            grads.append(d)
        return (None, None, *grads, *([None] * n))


def _lean_part(ps: list[Tensor], anc: list[Tensor], acc: torch.dtype) -> Tensor:
    """One chunk's penalty through :class:`_HalfSquaredDistance`, scheduled last in the backward.

    Autograd runs the ready node with the highest sequence number first, so a penalty computed
    after the model's forward would form its whole gradient tree before the model's backward
    starts freeing activations. Giving the node the lowest sequence number makes autograd reach it
    after the rest of the graph: each chunk's gradient is then formed and accumulated into the
    model's gradient one chunk at a time. Ordering only; values are unaffected.
    """
    out: Tensor = _HalfSquaredDistance.apply(len(ps), acc, *ps, *anc)
    node = out.grad_fn
    setter = getattr(node, "_set_sequence_nr", None)
    if setter is not None:
        setter(0)
    return out


def _groups(keys: list[str], params: Params, anchor: Params) -> Any:
    groups: dict[tuple[Any, ...], list[str]] = {}
    for k in keys:
        p, a = params[k], anchor[k]
        groups.setdefault((p.device, p.dtype, a.dtype), []).append(k)
    return groups.values()


def _check(params: Any, anchor: Any) -> list[str]:
    check_same_structure(
        anchor, params, what=_FN, names=("anchor", "params"), subset=True, dtypes=False
    )
    check_floating_tree(_FN, "anchor", anchor)
    bad = [k for k in anchor if not params[k].is_floating_point()]
    if bad:
        raise TypeError(
            f"{_FN}: params must hold floating-point tensors at the anchored keys, got "
            f"{params[bad[0]].dtype} at keys {fmt_keys(bad)}"
        )
    bad = [k for k in anchor if anchor[k].device != params[k].device]
    if bad:
        k = bad[0]
        raise ValueError(
            f"{_FN}: anchor must be on the device of params at every anchored key (move it once, "
            f"e.g. {{k: v.to(device) for k, v in anchor.items()}}), got {anchor[k].device} and "
            f"{params[k].device} at keys {fmt_keys(bad)}"
        )
    return list(anchor)


def l2sp(params: Params, *, anchor: Params) -> Tensor:
    r"""L2-SP: half the squared L2 distance of the parameters to the anchor, over the anchor's keys.

    .. math:: R(\theta) = \tfrac12 \sum_{k \in \operatorname{keys}(\theta^0)}
        \big\| \theta_k - \theta^0_k \big\|_F^2 ,
        \qquad \frac{\partial R}{\partial \theta_k} = \theta_k - \theta^0_k

    with :math:`\theta` the ``params`` and :math:`\theta^0` the ``anchor`` (the pre-trained
    weights, a constant: detached). ``params`` may hold more keys than ``anchor`` (e.g. a new
    head, which L2-SP leaves to ordinary weight decay); those are ignored. The caller scales the
    penalty (L2-SP's :math:`\tfrac{\alpha}{2}\|\cdot\|^2` is ``alpha * l2sp(...)``). A
    non-negative penalty. ``anchor`` is keyword-only: a swapped call would otherwise return the
    same value with a zero gradient.

    **Memory.** A step ``loss = ce + lam * l2sp(params, anchor=anchor); loss.backward()`` adds at
    most about one tensor-sized temporary at a time: no difference :math:`\theta_k - \theta^0_k`
    is kept between forward and backward; the backward recomputes it per chunk of tensors (chunks
    no larger than the largest tensor) and returns it, scaled, as the gradient autograd stores.
    When the penalty is computed *after* the model's forward (the usual order), autograd reaches it
    first, so its gradients (the tree that ``.grad`` ends up holding anyway) are allocated at the
    start of the backward rather than layer by layer; computing it before the forward makes
    autograd reach it last, one chunk at a time. Under ``torch.func`` transforms and
    ``torch.compile`` the plain per-tensor formulation (same maths) is used.

    ``params`` and ``anchor`` may differ in dtype: differences are taken in the promoted dtype (no
    float32 copy of a bf16 model is made; keep the anchor in float32 for exact differences of bf16
    parameters) and the squared norms are accumulated in at least float32.

    Args:
        params: parameter tree of the model being fine-tuned, ``{name: Tensor}``.
        anchor: parameter tree of the starting point (keyword-only), with a subset of ``params``'
            keys and the same shapes, on the same devices.

    Returns:
        0-d tensor (at least float32), on the device of the first anchored parameter; 0 for an
        empty ``anchor``.

    Raises:
        TypeError: if either is not a tree of tensors or an anchored tensor is not floating-point.
        ValueError: if ``anchor`` has keys ``params`` lacks, or shapes or devices differ (keys
            listed).

    Example:
        >>> params = {"w": torch.tensor([1.0, 2.0]), "head": torch.zeros(3)}
        >>> l2sp(params, anchor={"w": torch.tensor([0.0, 0.0])})  # ½·(1 + 4)
        tensor(2.5000)

    References:
        Li et al., "Explicit Inductive Bias for Transfer Learning with Convolutional Networks"
        (L2-SP), ICML 2018. Code: https://github.com/holyseven/TransferLearningClassification
    """
    keys = _check(params, anchor)
    if not keys:
        device = next((t.device for t in params.values()), torch.device("cpu"))
        return torch.zeros((), dtype=torch.float32, device=device)
    out_device = params[keys[0]].device
    terms: list[Tensor] = []
    for group in _groups(keys, params, anchor):
        ps = [params[k] for k in group]
        anc = [anchor[k].detach() for k in group]
        acc = compute_dtype(ps[0], anc[0])
        if not _lean_ok(ps + anc):
            sq = sum(
                (torch.linalg.vector_norm(p - a, dtype=acc).square() for p, a in zip(ps, anc)),
                torch.zeros((), dtype=acc, device=ps[0].device),
            )
            term = 0.5 * sq
        elif torch.is_grad_enabled() and any(p.requires_grad for p in ps):
            # one node per chunk: autograd forms (and accumulates) one chunk's gradient at a time
            parts = [_lean_part(cp, ca, acc) for cp, ca in _chunks(ps, anc)]
            term = parts[0] if len(parts) == 1 else torch.stack(parts).sum()
        else:
            term = 0.5 * _squared_distance(ps, anc, acc)
        terms.append(term.to(out_device))
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total
