"""Exact entropies and UEO's universal entropy optimisation (unsupervised, unknown classes)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from robustft import _numerics
from robustft._checks import (
    check_floating,
    check_group,
    check_int,
    check_number,
    check_same_size,
    check_scalar,
)
from robustft._numerics import compute_dtype, full_precision, log_msp, values_readable, zero_neginf
from robustft.distributed import all_reduce_sum, is_distributed
from robustft.losses._common import positive_values_error
from robustft.typing import Group, Scalar

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
        The entropies, ``logits``' shape without ``dim`` (at least float32), in nats; an empty
        batch gives an empty result.

    Raises:
        TypeError: if ``logits`` is not a floating-point tensor or ``dim`` not an int.
        ValueError: if ``logits`` is 0-d, ``dim`` is out of range or the class axis is empty.

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
    if logits.shape[dim] == 0:
        raise ValueError(
            f"{fn}: logits must have at least one class along dim {dim}, got shape "
            f"{tuple(logits.shape)}"
        )
    return _numerics.entropy(logits.to(compute_dtype(logits)), dim)


def ueo(
    logits: Tensor,
    confidence: Tensor,
    *,
    trade_off: Scalar = 1.0,
    group: Group = None,
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
    spread. :math:`L` may be negative (it lies in :math:`[-\gamma\log C, \log C]`). An empty
    batch gives :math:`L = 0` with a zero gradient (both terms are batch averages).

    Entropies are exact: :math:`\log \bar p` is a log-sum-exp of :math:`\log p_i - \log w_i`
    (the official code uses :math:`\log(p + 10^{-5})`), and both weightings are normalised by
    their largest weight first, so confidences anywhere in the positive floating range (down to
    the smallest subnormal, up to the largest finite value) give the exact value. ``confidence``
    is a constant (detached), computed once with :func:`ueo_confidence`, and must be > 0: for CPU
    tensors in eager mode a non-positive or NaN confidence raises ``ValueError``; elsewhere
    (accelerators, ``torch.func``, ``torch.compile``) no value is read and such a confidence makes
    the loss NaN.

    **Data parallelism.** With ``group`` (e.g. ``torch.distributed.group.WORLD``) the batch sums
    (numerators and denominators of both terms) run over the global batch through the
    autograd-aware :func:`robustft.distributed.all_reduce_sum`: every rank gets the global loss, and
    the rank-averaged gradient (what DDP applies) equals the single-process gradient on the
    concatenated batch. (Treating the other ranks' parts as constants instead gives the same value
    but, after DDP's averaging, only ``1 / world_size`` of the gradient.) Every rank reaches the
    same two collectives (a max for the stabilising shifts, then the sums) in the same order,
    whatever its local batch: a rank with an empty batch contributes nothing and gets the global
    loss. The confidence check is agreed by all ranks (a flag carried by the first collective), so
    a bad confidence on one rank raises the same ``ValueError`` on every rank instead of leaving
    the others waiting. Every rank must call the loss and its backward. With ``group=None`` the
    loss is over the local batch only, even when a process group is initialised.

    Args:
        logits: ``[batch, classes]`` logits over the known classes (CLIP: ``s * f @ T.T``).
        confidence: ``[batch]`` weights :math:`w_i > 0` (the zero-shot MCM score).
        trade_off: :math:`\gamma \ge 0` (UEO: 1), a finite real number or a 0-d tensor.
        group: a ``torch.distributed`` process group to sum over, or ``None`` (local batch).

    Returns:
        0-d tensor (at least float32, also under autocast).

    Raises:
        TypeError: if an input is not a floating-point tensor, ``trade_off`` is not a real number
            or 0-d floating tensor, or ``group`` is not a process group.
        ValueError: on wrong ranks, mismatched batch sizes, no classes, a ``trade_off`` that is not
            finite and >= 0, or (CPU, eager) a non-positive ``confidence`` on any rank.

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
    if logits.shape[1] == 0:
        raise ValueError(
            f"{fn}: logits must have at least one class (dim 1), got shape {tuple(logits.shape)}"
        )
    check_number(fn, "trade_off", trade_off, low=0.0, allow_tensor=True)
    check_group(fn, group)
    reduce = group is not None and is_distributed(group)
    bad = positive_values_error(fn, "confidence", confidence)
    if bad is not None and not reduce:
        raise ValueError(bad)

    dtype = compute_dtype(logits, confidence)
    num_classes = logits.shape[1]
    with full_precision(logits, confidence):
        logp = torch.log_softmax(logits.to(dtype), dim=-1)  # [B, C]
        h = -(logp.exp() * zero_neginf(logp)).sum(-1)  # [B], exact entropies
        log_w = torch.log(confidence.detach().to(dtype))
        a = logp - log_w[:, None]  # log(p_ik / w_i)
        # constants (any value gives the same exact result): per-class shifts of log(p/w), and the
        # largest log w and log(1/w) to normalise both weightings (no overflow, no underflow)
        if logits.shape[0] > 0:
            maxima = torch.cat([a.detach().amax(0), log_w.amax()[None], (-log_w).amax()[None]])
        else:  # an empty batch has no maxima; -inf is the identity of the max all-reduce
            maxima = logp.new_full((num_classes + 2,), float("-inf"))
        if reduce:
            check_flag = values_readable(confidence)  # a device property: the same on every rank
            if check_flag:
                flag = maxima.new_full((1,), 0.0 if bad is None else 1.0)
                maxima = torch.cat([maxima, flag])
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
            if check_flag:
                if float(maxima[-1]) > 0:
                    raise ValueError(
                        bad
                        or f"{fn}: confidence must be > 0 everywhere, got a non-positive or NaN "
                        "value on another rank of the group"
                    )
                maxima = maxima[:-1]
        maxima = zero_neginf(maxima)  # empty batch, or a class masked (-inf) in every sample
        shift, log_w_max, log_inv_w_max = maxima[:num_classes], maxima[-2], maxima[-1]
        w = torch.exp(log_w - log_w_max)  # w / max w, in (0, 1]
        inv_w = torch.exp(-log_w - log_inv_w_max)  # (1/w) / max(1/w), in (0, 1]
        sums = torch.cat(
            [
                torch.exp(a - shift).sum(0),  # Σ_i p_ik / w_i, rescaled by exp(-shift_k - ...)
                (w * h).sum()[None],
                w.sum()[None],
                inv_w.sum()[None],
            ]
        )
        if reduce:
            sums = all_reduce_sum(sums, group)
        scaled_mass, cond_num, cond_den, inv_den = (
            sums[:num_classes],
            sums[num_classes],
            sums[num_classes + 1],
            sums[num_classes + 2],
        )
        # an empty (global) batch has 0 / 0 here: its loss is 0, with a zero gradient
        cond = cond_num / torch.where(cond_den == 0, torch.ones_like(cond_den), cond_den)
        inv_den = torch.where(inv_den == 0, torch.ones_like(inv_den), inv_den)
        # a class with no mass anywhere (masked, or an empty batch) has log p̄ = -inf; keep its
        # log's gradient finite
        has_mass = scaled_mass != 0  # NaN (from an invalid confidence) stays NaN
        mass = torch.where(has_mass, scaled_mass, torch.ones_like(scaled_mass))
        # Σ_i p_i/w_i = e^{shift} S and Σ_i 1/w_i = e^{log_inv_w_max} D: log p̄ = shift + log S − …
        log_pbar = shift + torch.log(mass) - log_inv_w_max - torch.log(inv_den)
        log_pbar = torch.where(has_mass, log_pbar, torch.full_like(log_pbar, float("-inf")))
        h_bar = -(log_pbar.exp() * zero_neginf(log_pbar)).sum()
        return cond - trade_off * h_bar


def ueo_confidence(zero_shot_logits: Tensor, *, scale: Scalar = 1.0) -> Tensor:
    r"""UEO's sample confidence: the maximum softmax probability of the zero-shot logits.

    .. math:: w_i = \max_k \operatorname{softmax}(\tau\, z_i)_k = \exp\big(\max_k \tau z_{ik}
        - \operatorname{logsumexp}_k \tau z_{ik}\big)

    UEO (SPEC §3) takes the zero-shot cosine similarities :math:`z_{ik} = \cos(f_i, T_k)` of the
    frozen model at scale :math:`\tau = 1` (the MCM score), computed once before training. The
    result lies in :math:`[1/C, 1]`, so it is always a valid (positive) ``confidence`` for
    :func:`ueo`. Higher means more likely a known class. The same kernel as
    :func:`robustft.scores.msp` with ``temperature = 1 / scale``.

    Args:
        zero_shot_logits: ``[samples, classes]`` zero-shot logits (cosines for UEO).
        scale: :math:`\tau > 0` multiplying the logits, a finite real number or a 0-d tensor.

    Returns:
        ``[samples]`` confidences (at least float32, also under autocast); empty for no samples.

    Raises:
        TypeError: if ``zero_shot_logits`` is not a floating-point tensor or ``scale`` is not a
            real number or 0-d floating tensor.
        ValueError: if it is not 2-d, has no classes, or ``scale`` is not finite and > 0.

    Example:
        >>> ueo_confidence(torch.tensor([[0.0, 0.0], [2.0, 0.0]]), scale=0.5)
        tensor([0.5000, 0.7311])

    References:
        Liang et al., "Realistic Unsupervised CLIP Fine-tuning with Universal Entropy
        Optimization", ICML 2024. Code: https://github.com/tim-learn/UEO
    """
    fn = "ueo_confidence"
    check_floating(fn, "zero_shot_logits", zero_shot_logits, ndim=2)
    scale = check_scalar(fn, "scale", scale, positive=True)
    if zero_shot_logits.shape[1] == 0:
        raise ValueError(
            f"{fn}: zero_shot_logits must hold at least one class, got shape "
            f"{tuple(zero_shot_logits.shape)}"
        )
    with full_precision(zero_shot_logits):
        z = zero_shot_logits.to(compute_dtype(zero_shot_logits)) * scale
        return torch.exp(log_msp(z))
