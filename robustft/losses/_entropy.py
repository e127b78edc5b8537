"""Exact entropies and UEO's universal entropy optimisation (unsupervised, unknown classes)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from robustft._checks import check_floating, check_int, check_number, check_same_size
from robustft.distributed import all_reduce_sum, is_distributed
from robustft.losses._common import (
    check_group,
    check_positive_values,
    check_scale,
    compute_dtype,
)
from robustft.typing import Scalar

__all__ = ["entropy", "ueo", "ueo_confidence"]


def entropy(logits: Tensor, *, dim: int = -1) -> Tensor:
    r"""Shannon entropy of ``softmax(logits)``, exact (via log-softmax, no :math:`\epsilon`).

    .. math:: H(p) = -\sum_k p_k \log p_k, \qquad \log p = \operatorname{log\_softmax}(z)

    Finite for any finite logits (even :math:`\pm 10^4`): a class of vanishing probability
    contributes :math:`0 \cdot \text{finite} = 0`, never :math:`0 \cdot (-\infty)`. Masked
    classes (logit :math:`-\infty`) contribute exactly 0, with a finite gradient. Lies in
    :math:`[0, \log C]`.

    Args:
        logits: ``[..., classes]`` logits (the class axis is ``dim``).
        dim: the class axis.

    Returns:
        The entropies, ``logits``' shape without ``dim`` (at least float32), in nats.

    Raises:
        TypeError: if ``logits`` is not a floating-point tensor or ``dim`` not an int.
        ValueError: if ``logits`` is 0-d or ``dim`` is out of range.

    Example:
        >>> entropy(torch.tensor([[0.0, 0.0], [1e4, -1e4]]))
        tensor([0.6931, 0.0000])

    References:
        Liang et al., "Realistic Unsupervised CLIP Fine-tuning with Universal Entropy
        Optimization", ICML 2024. Code: https://github.com/tim-learn/UEO
    """
    fn = "entropy"
    check_floating(fn, "logits", logits)
    if logits.ndim == 0:
        raise ValueError(f"{fn}: logits must have at least 1 dimension, got shape ()")
    check_int(fn, "dim", dim)
    if not -logits.ndim <= dim < logits.ndim:
        raise ValueError(
            f"{fn}: dim must be in [{-logits.ndim}, {logits.ndim}) for logits of shape "
            f"{tuple(logits.shape)}, got {dim}"
        )
    logp = torch.log_softmax(logits.to(compute_dtype(logits)), dim=dim)
    # a masked class (logit -inf) has p = 0 and log p = -inf: its term is 0 by continuity, and
    # zeroing log p there (not the product) keeps the gradient finite too
    return -(logp.exp() * _zero_neginf(logp)).sum(dim)


def _zero_neginf(logp: Tensor) -> Tensor:
    """``log p`` with ``-inf`` (p = 0) replaced by 0, so ``p * log p`` and its gradient are 0."""
    return torch.where(torch.isneginf(logp), torch.zeros_like(logp), logp)


def ueo(
    logits: Tensor,
    confidence: Tensor,
    *,
    trade_off: Scalar = 1.0,
    group: Any = None,
) -> Tensor:
    r"""UEO: confidence-weighted entropy minus the entropy of the reverse-weighted mean prediction.

    With :math:`p_i = \operatorname{softmax}(z_i)` over the known classes, :math:`w_i` the
    ``confidence`` and :math:`\gamma` the ``trade_off``:

    .. math::

        L = \frac{\sum_i w_i\, H(p_i)}{\sum_i w_i} - \gamma\, H(\bar p), \qquad
        \bar p = \frac{\sum_i w_i^{-1} p_i}{\sum_i w_i^{-1}} .

    **Sign:** this is the one signed objective of :mod:`robustft.losses`: minimise it. The first
    term sharpens the predictions of confident (likely known-class) samples; the second, entered
    with a minus sign, *maximises* the entropy of the marginal prediction, weighted toward
    unconfident (likely unknown-class) samples, which keeps the classes balanced and the unknowns
    spread. :math:`L` may be negative (it lies in :math:`[-\gamma\log C, \log C]`).

    Entropies are exact: :math:`\log \bar p` is a log-sum-exp of :math:`\log p_i - \log w_i`
    (the official code uses :math:`\log(p + 10^{-5})`). ``confidence`` is a constant (detached),
    computed once with :func:`ueo_confidence`, and must be > 0: for CPU tensors in eager mode a
    non-positive or NaN confidence raises ``ValueError``; elsewhere (accelerators, ``torch.func``,
    ``torch.compile``) no value is read and such a confidence makes the loss NaN.

    **Data parallelism.** With ``group`` (e.g. ``torch.distributed.group.WORLD``) the batch sums
    (numerators and denominators of both terms) run over the global batch through the
    autograd-aware :func:`robustft.distributed.all_reduce_sum`: every rank gets the global loss, and
    the rank-averaged gradient (what DDP applies) equals the single-process gradient on the
    concatenated batch. (Treating the other ranks' parts as constants instead gives the same value
    but, after DDP's averaging, only ``1 / world_size`` of the gradient.) With ``group=None`` the
    loss is over the local batch only, even when a process group is initialised.

    Args:
        logits: ``[batch, classes]`` logits over the known classes (CLIP: ``s * f @ T.T``).
        confidence: ``[batch]`` weights :math:`w_i > 0` (the zero-shot MCM score).
        trade_off: :math:`\gamma \ge 0` (UEO: 1), a real number or a 0-d tensor.
        group: a ``torch.distributed`` process group to sum over, or ``None`` (local batch).

    Returns:
        0-d tensor (at least float32).

    Raises:
        TypeError: if an input is not a floating-point tensor or ``group`` is not a process group.
        ValueError: on wrong ranks, mismatched batch sizes, an empty batch, ``trade_off < 0`` or
            (CPU, eager) a non-positive ``confidence``.

    Example:
        >>> logits = torch.tensor([[0.0, 0.0], [1e4, -1e4]])
        >>> ueo(logits, torch.tensor([0.5, 1.0]))  # (0.5·log 2 + 0)/1.5 − H([2/3, 1/3])
        tensor(-0.4055)

    References:
        Liang et al., "Realistic Unsupervised CLIP Fine-tuning with Universal Entropy
        Optimization", ICML 2024. Code: https://github.com/tim-learn/UEO
    """
    fn = "ueo"
    check_floating(fn, "logits", logits, ndim=2)
    check_floating(fn, "confidence", confidence, ndim=1)
    check_same_size(fn, "confidence", confidence, 0, "logits", logits, 0)
    if logits.shape[0] == 0:
        raise ValueError(f"{fn}: logits must hold at least one sample, got shape (0, ...)")
    check_number(fn, "trade_off", trade_off, low=0.0, allow_tensor=True)
    check_group(fn, group)
    check_positive_values(fn, "confidence", confidence)
    reduce = group is not None and is_distributed(group)

    dtype = compute_dtype(logits, confidence)
    num_classes = logits.shape[1]
    logp = torch.log_softmax(logits.to(dtype), dim=-1)  # [B, C]
    h = -(logp.exp() * _zero_neginf(logp)).sum(-1)  # [B]
    w = confidence.detach().to(dtype)
    log_inv_w = -torch.log(w)
    a = logp + log_inv_w[:, None]  # log(p_ik / w_i)
    shift = a.detach().amax(0)  # [C], a constant: any shift gives the same exact value
    if reduce:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    shift = _zero_neginf(shift)  # a class masked (-inf) in every sample: avoid -inf - -inf
    sums = torch.cat(
        [
            torch.exp(a - shift).sum(0),  # Σ_i p_ik / w_i, rescaled by exp(-shift_k)
            (w * h).sum().unsqueeze(0),
            w.sum().unsqueeze(0),
            torch.exp(log_inv_w).sum().unsqueeze(0),
        ]
    )
    if reduce:
        sums = all_reduce_sum(sums, group)
    scaled_mass = sums[:num_classes]
    cond = sums[num_classes] / sums[num_classes + 1]
    # a class with no mass anywhere (masked) has log p̄ = -inf; keep its log's gradient finite
    has_mass = scaled_mass != 0  # NaN (from an invalid confidence) stays NaN
    mass = torch.where(has_mass, scaled_mass, torch.ones_like(scaled_mass))
    log_pbar = shift + torch.log(mass) - torch.log(sums[num_classes + 2])
    log_pbar = torch.where(has_mass, log_pbar, torch.full_like(log_pbar, float("-inf")))
    h_bar = -(log_pbar.exp() * _zero_neginf(log_pbar)).sum()
    return cond - trade_off * h_bar


def ueo_confidence(zero_shot_logits: Tensor, *, scale: Scalar = 1.0) -> Tensor:
    r"""UEO's sample confidence: the maximum softmax probability of the zero-shot logits.

    .. math:: w_i = \max_k \operatorname{softmax}(\tau\, z_i)_k = \exp\big(\max_k \tau z_{ik}
        - \operatorname{logsumexp}_k \tau z_{ik}\big)

    UEO (SPEC §3) takes the zero-shot cosine similarities :math:`z_{ik} = \cos(f_i, T_k)` of the
    frozen model at scale :math:`\tau = 1` (the MCM score), computed once before training. The
    result lies in :math:`[1/C, 1]`, so it is always a valid (positive) ``confidence`` for
    :func:`ueo`. Higher means more likely a known class.

    Args:
        zero_shot_logits: ``[samples, classes]`` zero-shot logits (cosines for UEO).
        scale: :math:`\tau > 0` multiplying the logits, a real number or a 0-d tensor.

    Returns:
        ``[samples]`` confidences (at least float32).

    Raises:
        TypeError: if ``zero_shot_logits`` is not a floating-point tensor.
        ValueError: if it is not 2-d or ``scale <= 0``.

    Example:
        >>> ueo_confidence(torch.tensor([[0.0, 0.0], [2.0, 0.0]]), scale=0.5)
        tensor([0.5000, 0.7311])

    References:
        Liang et al., "Realistic Unsupervised CLIP Fine-tuning with Universal Entropy
        Optimization", ICML 2024. Code: https://github.com/tim-learn/UEO
    """
    fn = "ueo_confidence"
    check_floating(fn, "zero_shot_logits", zero_shot_logits, ndim=2)
    check_scale(fn, "scale", scale)
    if zero_shot_logits.shape[1] == 0:
        raise ValueError(
            f"{fn}: zero_shot_logits must hold at least one class, got shape "
            f"{tuple(zero_shot_logits.shape)}"
        )
    z = zero_shot_logits.to(compute_dtype(zero_shot_logits)) * scale
    return torch.exp(z.amax(-1) - torch.logsumexp(z, dim=-1))
