"""OOD scores computed from a classifier's logits: MSP, max-logit, energy, negative entropy.

Every score follows robustft's sign convention (SPEC §0): **higher = more likely in-distribution**
(a known class). Each one reduces the last axis, so ``[batch, classes]`` gives ``[batch]`` and a
single sample ``[classes]`` gives a 0-d tensor, which makes them per-sample functions that
``torch.func.vmap`` maps over a batch. They are branch-free (no ``.item()``, no masks) and compile
with ``torch.compile(fullgraph=True)``. Half-precision inputs are scored in float32: bf16 has
8 bits of mantissa, and rounded scores tie massively, which biases AUROC.

torchmetrics has no OOD scores; these are written with plain torch ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from robustft._numerics import compute_dtype, entropy, log_msp
from robustft.scores._validate import check_class_axis, check_temperature
from robustft.typing import Scalar

__all__ = ["energy", "entropy_score", "max_logit", "msp"]


def msp(logits: Tensor, *, temperature: Scalar = 1.0) -> Tensor:
    r"""Maximum softmax probability, optionally at a temperature.

    .. math::
        s(z) = \max_c \operatorname{softmax}(z / T)_c
             = \exp\Bigl(\max_c z_c / T - \log \sum_k e^{z_k / T}\Bigr)

    computed in the second form (one max and one logsumexp, no full softmax). Lies in
    :math:`[1/C, 1]`; higher = more confident = more likely in-distribution. With one dominant
    logit, raising :math:`T` lowers the score toward :math:`1/C`.

    Args:
        logits: ``[..., classes]`` logits :math:`z`.
        temperature: :math:`T > 0`, a finite Python or NumPy number, or a 0-d floating tensor
            (not read).

    Returns:
        ``[...]`` scores (``logits``' shape without the class axis), in at least float32.

    Raises:
        TypeError: if ``logits`` is not a floating tensor, or ``temperature`` not a real number.
        ValueError: if ``logits`` has no class axis or zero classes, or ``temperature`` is not
            finite and ``> 0``.

    Example:
        >>> msp(torch.tensor([[0.0, 0.0], [2.0, 0.0]]))
        tensor([0.5000, 0.8808])
        >>> msp(torch.tensor([2.0, 0.0]), temperature=2.0)
        tensor(0.7311)

    References:
        Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution
        Examples in Neural Networks", ICLR 2017. Code: https://github.com/hendrycks/error-detection
    """
    fn = "msp"
    check_class_axis(fn, "logits", logits)
    t = check_temperature(fn, temperature)
    return torch.exp(log_msp(logits.to(compute_dtype(logits)) / t))


def max_logit(logits: Tensor) -> Tensor:
    r"""Largest logit (MaxLogit).

    .. math:: s(z) = \max_c z_c

    Unlike MSP it keeps the logits' scale, which separates unknown classes better when the model
    has many classes. Higher = more likely in-distribution.

    Args:
        logits: ``[..., classes]`` logits :math:`z`.

    Returns:
        ``[...]`` scores, in at least float32.

    Raises:
        TypeError: if ``logits`` is not a floating tensor.
        ValueError: if ``logits`` has no class axis or zero classes.

    Example:
        >>> max_logit(torch.tensor([[1.0, 3.0, -2.0], [0.5, 0.0, 0.0]]))
        tensor([3.0000, 0.5000])

    References:
        Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings",
        ICML 2022. Code: https://github.com/hendrycks/anomaly-seg
    """
    check_class_axis("max_logit", "logits", logits)
    return logits.to(compute_dtype(logits)).amax(dim=-1)


def energy(logits: Tensor, *, temperature: Scalar = 1.0) -> Tensor:
    r"""Energy score: the *negative* free energy, :math:`T \cdot \operatorname{logsumexp}(z/T)`.

    .. math:: s(z) = -E(z; T) = T \log \sum_k e^{z_k / T}

    Sign convention: Liu et al. define the energy :math:`E = -T\,\operatorname{logsumexp}(z/T)`,
    low for in-distribution inputs; robustft returns :math:`-E` so that, like every score here,
    higher = more likely in-distribution. :math:`\max_c z_c \le s \le \max_c z_c + T \log C`, so
    :math:`s \to` :func:`max_logit` as :math:`T \to 0`.

    Args:
        logits: ``[..., classes]`` logits :math:`z`.
        temperature: :math:`T > 0`, a finite Python or NumPy number, or a 0-d floating tensor
            (not read).

    Returns:
        ``[...]`` scores, in at least float32.

    Raises:
        TypeError: if ``logits`` is not a floating tensor, or ``temperature`` not a real number.
        ValueError: if ``logits`` has no class axis or zero classes, or ``temperature`` is not
            finite and ``> 0``.

    Example:
        >>> energy(torch.tensor([[0.0, 0.0], [3.0, -20.0]]))
        tensor([0.6931, 3.0000])

    References:
        Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020.
        Code: https://github.com/wetliu/energy_ood
    """
    fn = "energy"
    check_class_axis(fn, "logits", logits)
    t = check_temperature(fn, temperature)
    return t * torch.logsumexp(logits.to(compute_dtype(logits)) / t, dim=-1)


def entropy_score(logits: Tensor) -> Tensor:
    r"""Negative predictive entropy, computed exactly via log-softmax.

    .. math::
        s(z) = -H(p) = \sum_k p_k \log p_k, \qquad \log p = \operatorname{log\_softmax}(z)

    Lies in :math:`[-\log C, 0]`; higher (a peaked prediction) = more likely in-distribution.
    No :math:`\epsilon` is added inside the log (UEO's official code uses ``log(p + 1e-5)``); a
    class of zero probability, including a logit of :math:`-\infty` (a masked class), contributes
    exactly 0, with a finite gradient.

    Args:
        logits: ``[..., classes]`` logits :math:`z`.

    Returns:
        ``[...]`` scores, in at least float32, in nats.

    Raises:
        TypeError: if ``logits`` is not a floating tensor.
        ValueError: if ``logits`` has no class axis or zero classes.

    Example:
        >>> entropy_score(torch.tensor([[0.0, 0.0], [0.0, float("-inf")]]))
        tensor([-0.6931, 0.0000])

    References:
        Liang et al., "Realistic Unsupervised CLIP Fine-tuning with Universal Entropy
        Optimization", ICML 2024. Code: https://github.com/tim-learn/UEO
    """
    check_class_axis("entropy_score", "logits", logits)
    return -entropy(logits.to(compute_dtype(logits)))
