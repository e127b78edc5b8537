r"""Output-space ensembling of the zero-shot and the fine-tuned model (WiSE-FT's comparison)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from robustft._checks import check_choice, check_floating, check_number, check_scalar
from robustft._numerics import compute_dtype, full_precision
from robustft.typing import Scalar

__all__ = ["logit_ensemble"]

_SPACES = ("logits", "probs")


def _alpha(alpha: Tensor | float, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.as_tensor(alpha, dtype=dtype, device=device)


def _mix_logits(z0: Tensor, z: Tensor, alpha: Tensor | float) -> Tensor:
    """``(1 - a) z0 + a z`` with exact endpoints; a class masked (``-inf``) where it has weight
    stays ``-inf`` (the limit), with finite gradients everywhere."""
    if not isinstance(alpha, Tensor):  # a number: no alpha-gradient, masks need no special case
        if alpha == 0.0 or alpha == 1.0:
            return (z0 if alpha == 0.0 else z).clone()
        if 0.0 < alpha < 1.0:  # -inf stays -inf: both weights are positive
            return torch.add(z0 * (1.0 - alpha), z, alpha=alpha)
    m0, m1 = torch.isneginf(z0), torch.isneginf(z)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    mixed = torch.lerp(torch.where(m0, zero, z0), torch.where(m1, zero, z), alpha)
    masked = (m0 & (alpha < 1)) | (m1 & (alpha > 0))
    return torch.where(masked, torch.full_like(mixed, -torch.inf), mixed)


def _mix_probs(z0: Tensor, z: Tensor, alpha: Tensor | float) -> Tensor:
    r"""``log((1 - a) softmax(z0) + a softmax(z))`` via a two-term logsumexp (exact endpoints).

    The weights' logs are taken of a *detached* ``a`` (``log 0 = -inf`` is then a constant, so no
    ``0 * inf`` reaches the gradient); the gradient in ``a``, :math:`q_c - q^0_c` over the mixture
    :math:`m_c`, is attached by a zero-valued term, finite at ``a = 0`` and ``a = 1`` too.
    """
    l0, l1 = torch.log_softmax(z0, dim=-1), torch.log_softmax(z, dim=-1)
    a = _alpha(alpha, z.dtype, z.device)
    a_const = a.detach()
    weights = torch.stack([torch.log1p(-a_const), torch.log(a_const)])
    weights = weights.view((2,) + (1,) * z.ndim)
    terms = torch.stack([l0, l1]) + weights
    dead = torch.isneginf(terms).all(dim=0)  # probability 0 under the mixture: -inf, no NaN grad
    terms = torch.where(dead, torch.zeros((), dtype=terms.dtype, device=terms.device), terms)
    out = torch.logsumexp(terms, dim=0).masked_fill(dead, -torch.inf)
    if isinstance(alpha, Tensor):  # d out / d a = (q - q0) / m, attached without changing out
        with torch.no_grad():
            slope = torch.exp(l1 - out) - torch.exp(l0 - out)
            big = torch.finfo(slope.dtype).max
            slope = torch.nan_to_num(slope, nan=0.0, posinf=big, neginf=-big)
        out = out + (a - a_const) * slope
    return out


def logit_ensemble(
    logits: Tensor,
    *,
    reference_logits: Tensor,
    alpha: Scalar,
    space: Literal["logits", "probs"] = "logits",
) -> Tensor:
    r"""Output-space ensemble of the zero-shot (reference) and the fine-tuned model's predictions.

    With :math:`z` the fine-tuned logits and :math:`z^0` the zero-shot logits of the same inputs
    (e.g. CLIP's image features against the zero-shot head, scaled by the logit scale),

    .. math::

        \text{space = "logits"}: \quad & \tilde z = (1 - \alpha)\, z^0 + \alpha\, z \\
        \text{space = "probs"}: \quad & \tilde z = \log\big((1 - \alpha)\,\mathrm{softmax}(z^0)
            + \alpha\,\mathrm{softmax}(z)\big)

    along the last (class) axis. WiSE-FT compares its weight-space ensemble (:func:`wise`) with
    this *output-space* ensemble, which needs both models at inference (two forwards) and is
    what ``wise`` approximates with one model. ``"logits"`` mixes the classifiers' outputs
    linearly (the score-level combination of two linear heads on their features); ``"probs"``
    mixes the predicted distributions, the form later robust fine-tuning papers write for the
    output-space ensemble (e.g. VRF), and returns the *log* of the mixture -- a normalised
    log-probability vector, so it is a logit-like score that every loss, score and metric of
    robustft accepts (``softmax`` of it is the mixture; ``argmax`` its prediction).

    ``alpha = 0`` returns the zero-shot side and ``alpha = 1`` the fine-tuned side exactly
    (``z^0`` / ``z`` for ``"logits"``, their ``log_softmax`` for ``"probs"``), for a number and a
    0-d tensor alike. A class masked with ``-inf`` stays masked wherever it carries weight, and
    gradients are finite everywhere (also in a tensor ``alpha`` at 0 and 1). Per-sample, no value
    is read and nothing synchronises: it works under :func:`torch.func.grad`,
    :func:`torch.func.vmap` and ``torch.compile(fullgraph=True)``. bf16/fp16 logits are combined
    in float32 (autocast off) and the result is float32.

    Args:
        logits: :math:`z`, the fine-tuned model's logits, ``[..., classes]`` (e.g.
            ``[batch, classes]``).
        reference_logits: :math:`z^0`, the zero-shot model's logits of the same inputs, same
            shape; keyword-only.
        alpha: :math:`\alpha`, the weight of the fine-tuned model: a finite real number (Python
            or NumPy) or a 0-d floating tensor (not read). ``"probs"`` needs :math:`\alpha \in
            [0, 1]` (a mixture); ``"logits"`` accepts any finite value (outside ``[0, 1]`` it
            extrapolates, as ``wise`` does).
        space: ``"logits"`` (default) or ``"probs"``.

    Returns:
        ``[..., classes]`` ensembled logits in :func:`compute_dtype` of the inputs (float32 for
        bf16/fp16, float64 for float64).

    Raises:
        TypeError: if ``logits`` / ``reference_logits`` are not floating-point tensors, ``alpha``
            is not a number or 0-d floating tensor, or ``reference_logits`` is passed
            positionally.
        ValueError: if the shapes differ, the logits are 0-d, ``alpha`` is NaN or infinite (or
            outside ``[0, 1]`` with ``"probs"``), or ``space`` is unknown.

    >>> z0 = torch.tensor([[2.0, 0.0]])  # zero-shot
    >>> z = torch.tensor([[0.0, 4.0]])  # fine-tuned
    >>> logit_ensemble(z, reference_logits=z0, alpha=0.25)
    tensor([[1.5000, 1.0000]])
    >>> logit_ensemble(z, reference_logits=z0, alpha=0.5, space="probs").exp()  # the mixture
    tensor([[0.4494, 0.5506]])

    References:
        Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022 (output-space
        ensembles vs WiSE-FT). Code: https://github.com/mlfoundations/wise-ft
        Zhu et al., "Robust Fine-tuning of Zero-shot Models via Variance Reduction", NeurIPS
        2024 (the output-space ensemble of probabilities).
    """
    fn = "logit_ensemble"
    check_floating(fn, "logits", logits)
    check_floating(fn, "reference_logits", reference_logits)
    if logits.ndim == 0:
        raise ValueError(f"{fn}: logits must have a class axis ([..., classes]), got shape ()")
    if logits.shape != reference_logits.shape:
        raise ValueError(
            f"{fn}: reference_logits must have the shape of logits, got logits of shape "
            f"{tuple(logits.shape)} and reference_logits of shape {tuple(reference_logits.shape)}"
        )
    check_choice(fn, "space", space, _SPACES)
    if space == "probs":
        a = check_number(fn, "alpha", alpha, low=0.0, high=1.0, allow_tensor=True)
    else:
        a = check_scalar(fn, "alpha", alpha)
    dtype = compute_dtype(logits, reference_logits)
    with full_precision(logits, reference_logits):
        z, z0 = logits.to(dtype), reference_logits.to(dtype)
        if isinstance(a, Tensor):
            a = a.to(device=z.device, dtype=dtype)
        if space == "logits":
            return _mix_logits(z0, z, a)
        return _mix_probs(z0, z, a)
