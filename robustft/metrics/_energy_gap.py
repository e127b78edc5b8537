"""Lipsum-FT's energy-gap diagnostic (Eq. 6): how far fine-tuning moved the random-text logits."""

from __future__ import annotations

import torch
from torch import Tensor

from robustft._checks import (
    apply_reduction,
    check_floating,
    check_reduction,
    check_same_size,
    check_scalar,
)
from robustft._numerics import energy_gap_rows
from robustft.typing import Reduction, Scalar

__all__ = ["energy_gap"]


def energy_gap(
    features: Tensor,
    *,
    reference_features: Tensor,
    text_features: Tensor,
    logit_scale: Scalar = 100.0,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Lipsum-FT's energy gap (Eq. 6) of a fine-tuned model over a fixed set of random texts.

    With :math:`\hat f_b`, :math:`\hat f^0_b` the L2-normalised image features of the fine-tuned
    and the pre-trained model on the same images, :math:`\hat t_n` the L2-normalised text features
    of :math:`N` random texts and :math:`s` the logit scale, the per-image gap is

    .. math::

        \mathrm{EG}_b = \frac{1}{2N} \sum_{n=1}^{N}
            \big(s\,\langle \hat f_b, \hat t_n \rangle - s\,\langle \hat f^0_b, \hat t_n \rangle\big)^2
          = \frac{s^2}{2N} \sum_{n=1}^{N} \langle \hat f_b - \hat f^0_b, \hat t_n \rangle^2 ,

    the quantity :func:`robustft.losses.energy_gap` regularises, averaged over every text given
    instead of a step's :math:`M`. Lower is closer to the zero-shot model; 0 when the features
    did not move. The paper measures it on 10,000 random texts of 8 tokens.

    **Measure it on held-out random texts, never on the bank the model was trained with**: with a
    fixed bank, training minimises that bank's objective, so the gap on it understates the gap
    on fresh texts. Draw a second bank (another seed) for this metric. A small gap computed from
    bf16 *features* is dominated by their rounding: rounding alone adds a gap of order
    :math:`s^2 \cdot 2^{-18} / D` (measured: about :math:`2.6 \cdot 10^{-5}` at :math:`s = 100`,
    :math:`D = 512`, on a true gap of :math:`10^{-5}`), so compute the features in float32 for
    this diagnostic. The metric itself runs under :func:`torch.no_grad` with autocast
    off, in float32 at least (float64 stays float64), so the result is float32 even inside a bf16
    autocast region.

    Args:
        features: ``[batch, dim]`` raw image features of the fine-tuned model.
        reference_features: ``[batch, dim]`` raw image features of the pre-trained model on the
            same images (keyword-only: swapping the two would be silently accepted).
        text_features: ``[texts, dim]`` raw text features of the random texts, e.g. a held-out
            ``clip.RandomTextBank``'s ``.features``.
        logit_scale: :math:`s > 0`, the *scale* (about 100 for OpenAI CLIP), not its log: for an
            open_clip model pass :func:`robustft.clip.logit_scale` of it
            (``model.logit_scale.exp()``), never the raw parameter. A finite real number (Python
            or NumPy) or a 0-d floating tensor.
            ``1.0`` gives the paper's scale-free form; the default matches the training
            regulariser's units.
        reduction: ``"mean"`` over the batch, ``"sum"`` or ``"none"`` (per image ``[batch]``).

    Returns:
        0-d tensor, or ``[batch]`` with ``reduction="none"``; no autograd graph.

    Raises:
        TypeError: if a features argument is not a floating tensor, ``logit_scale`` is not a real
            number or 0-d floating tensor, or ``reduction`` is not a str.
        ValueError: on wrong ranks, mismatched batch or embedding sizes, an empty batch, text or
            embedding axis, ``logit_scale`` not finite and ``> 0``, or an unknown ``reduction``.

    Example:
        >>> f, f0 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        >>> texts = torch.eye(2)
        >>> energy_gap(f, reference_features=f0, text_features=texts, logit_scale=1.0)
        tensor(0.5000)

    References:
        Nam et al., "Lipsum-FT: Robust Fine-Tuning of Zero-Shot Models Using Random Text Guidance",
        ICLR 2024, Eq. 6. Code: https://github.com/cs-giung/lipsum-ft
    """
    fn = "energy_gap"
    check_floating(fn, "features", features, ndim=2)
    check_floating(fn, "reference_features", reference_features, ndim=2)
    check_floating(fn, "text_features", text_features, ndim=2)
    if features.shape != reference_features.shape:
        raise ValueError(
            f"{fn}: reference_features must have the shape of features "
            f"{tuple(features.shape)}, got shape {tuple(reference_features.shape)}"
        )
    check_same_size(fn, "text_features", text_features, 1, "features", features, 1)
    batch, dim = features.shape
    if batch == 0 or dim == 0 or text_features.shape[0] == 0:
        raise ValueError(
            f"{fn}: features must have shape [batch, dim] and text_features [texts, dim] with "
            f"batch, dim and texts >= 1, got features of shape {tuple(features.shape)} and "
            f"text_features of shape {tuple(text_features.shape)}"
        )
    scale = check_scalar(fn, "logit_scale", logit_scale, positive=True)
    check_reduction(fn, reduction)
    if isinstance(scale, Tensor):
        scale = scale.detach()
    with torch.no_grad():
        per_image = energy_gap_rows(features, reference_features, text_features, scale)
        return apply_reduction(fn, per_image, reduction)
