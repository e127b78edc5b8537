"""L2-SP: squared distance of the fine-tuned parameters to the pre-trained starting point."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from robustft._checks import is_functorch_wrapped
from robustft.tree import accumulation_dtype, check_same_structure

__all__ = ["l2sp"]

_PLAIN = (Tensor, torch.nn.Parameter)  # not DTensor, FakeTensor or other subclasses


def _fast_ok(tensors: list[Tensor]) -> bool:
    """Whether the multi-tensor ``torch._foreach_*`` kernels (with autograd support) may be used."""
    if torch.compiler.is_compiling():
        return False
    return all(type(t) in _PLAIN and not is_functorch_wrapped(t) for t in tensors)


def _group(keys: list[str], params: Mapping[str, Tensor], anchor: Mapping[str, Tensor]) -> Any:
    groups: dict[tuple[Any, ...], list[str]] = {}
    for k in keys:
        p, a = params[k], anchor[k]
        groups.setdefault((p.device, p.dtype, a.device, a.dtype), []).append(k)
    return groups.values()


def l2sp(params: Mapping[str, Tensor], anchor: Mapping[str, Tensor]) -> Tensor:
    r"""L2-SP: half the squared L2 distance of the parameters to the anchor, over the anchor's keys.

    .. math:: R(\theta) = \tfrac12 \sum_{k \in \operatorname{keys}(\theta^0)}
        \big\| \theta_k - \theta^0_k \big\|_F^2

    with :math:`\theta` the ``params`` and :math:`\theta^0` the ``anchor`` (the pre-trained
    weights, detached). ``params`` may hold more keys than ``anchor`` (e.g. a new head, which
    L2-SP leaves to ordinary weight decay); those are ignored. The caller scales the penalty
    (L2-SP's :math:`\alpha/2` is then ``alpha * l2sp(...)``). A non-negative penalty.

    The differences and norms run as one multi-tensor ``torch._foreach_*`` kernel per (device,
    dtype) group, with or without autograd; under ``torch.func`` transforms and
    ``torch.compile`` a per-tensor loop with the same maths is used. ``params`` and ``anchor``
    may differ in dtype: differences are taken in the promoted dtype (no float32 copy of a bf16
    model is made; keep the anchor in float32 for exact differences of bf16 parameters) and the
    squared norms are accumulated in at least float32.

    Args:
        params: parameter tree of the model being fine-tuned, ``{name: Tensor}``.
        anchor: parameter tree of the starting point, with a subset of ``params``' keys and the
            same shapes.

    Returns:
        0-d tensor (at least float32), on the device of the first anchored parameter.

    Raises:
        TypeError: if either is not a tree of tensors or holds non-floating tensors.
        ValueError: if ``anchor`` has keys ``params`` lacks, or shapes differ (keys listed).

    Example:
        >>> params = {"w": torch.tensor([1.0, 2.0]), "head": torch.zeros(3)}
        >>> l2sp(params, {"w": torch.tensor([0.0, 0.0])})  # ½·(1 + 4)
        tensor(2.5000)

    References:
        Li et al., "Explicit Inductive Bias for Transfer Learning with Convolutional Networks"
        (L2-SP), ICML 2018. Code: https://github.com/holyseven/TransferLearningClassification
    """
    fn = "l2sp"
    check_same_structure(
        anchor, params, what=fn, names=("anchor", "params"), subset=True, dtypes=False
    )
    bad = [
        k for k in anchor if not (anchor[k].is_floating_point() and params[k].is_floating_point())
    ]
    if bad:
        raise TypeError(
            f"{fn}: params and anchor must hold floating-point tensors, got "
            f"{params[bad[0]].dtype} and {anchor[bad[0]].dtype} at key {bad[0]!r}"
        )
    keys = list(anchor)
    if not keys:
        device = next((t.device for t in params.values()), torch.device("cpu"))
        return torch.zeros((), dtype=torch.float32, device=device)
    out_device = params[keys[0]].device
    terms: list[Tensor] = []
    for group in _group(keys, params, anchor):
        ps = [params[k] for k in group]
        anc = [anchor[k].detach() for k in group]
        acc = accumulation_dtype(torch.promote_types(ps[0].dtype, anc[0].dtype))
        if _fast_ok(ps + anc):
            diffs = torch._foreach_sub(ps, anc)
            norms = torch._foreach_norm(diffs, 2, dtype=acc)
            sq = torch.stack(list(norms)).square().sum()
        else:
            sq = sum(
                (torch.linalg.vector_norm(p - a, dtype=acc).square() for p, a in zip(ps, anc)),
                torch.zeros((), dtype=acc, device=ps[0].device),
            )
        terms.append(sq.to(out_device))
    dtype = terms[0].dtype
    for t in terms[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    total = terms[0].to(dtype)
    for t in terms[1:]:
        total = total + t.to(dtype)
    return 0.5 * total
