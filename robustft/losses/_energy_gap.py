"""Lipsum-FT's random-text energy-gap regulariser."""

from __future__ import annotations

from torch import Tensor

from robustft._checks import apply_reduction, check_reduction, check_same_size
from robustft.losses._common import (
    check_features,
    check_pair,
    check_scale,
    compute_dtype,
    normalize,
)
from robustft.typing import Scalar

__all__ = ["energy_gap"]


def energy_gap(
    features: Tensor,
    reference_features: Tensor,
    text_features: Tensor,
    *,
    logit_scale: Scalar = 100.0,
    reduction: str = "mean",
) -> Tensor:
    r"""Lipsum-FT's energy gap: how far fine-tuning moved the image-text logits of random texts.

    With :math:`\hat f_b`, :math:`\hat f^0_b` and :math:`\hat t_m` the L2-normalised
    ``features``, ``reference_features`` and ``text_features`` and :math:`s` the ``logit_scale``,
    the per-sample penalty is

    .. math::

        R_b = \frac{1}{2M} \sum_{m=1}^{M}
              \big(s\,\langle \hat f_b, \hat t_m\rangle - s\,\langle \hat f^0_b, \hat t_m\rangle\big)^2
            = \frac{s^2}{2M} \sum_{m=1}^{M} \langle \hat f_b - \hat f^0_b, \hat t_m \rangle^2 ,

    a non-negative penalty to minimise (add :math:`\lambda R` to the cross-entropy; SPEC §4 uses
    :math:`\lambda = 1` in these units, which carry :math:`s^2`). ``reference_features`` are the
    frozen pre-trained tower's features of the same (augmented) images and are treated as
    constants (detached); ``text_features`` are the frozen text tower's features of the step's
    random texts (not detached: freeze them as you would any text head). The same quantity averaged
    over a fixed bank of random texts is the paper's energy-gap diagnostic (Eq. 6).

    Half-precision inputs are computed in float32; float64 stays float64.

    Args:
        features: ``[batch, dim]`` raw image features of the model being fine-tuned.
        reference_features: ``[batch, dim]`` raw image features of the pre-trained model.
        text_features: ``[texts, dim]`` raw text features of the :math:`M` random texts.
        logit_scale: :math:`s > 0`, a real number or a 0-d tensor (e.g. ``model.logit_scale.exp()``).
        reduction: ``"mean"`` (over the batch), ``"sum"`` or ``"none"`` (per sample ``[batch]``).

    Returns:
        0-d tensor, or ``[batch]`` with ``reduction="none"``.

    Raises:
        TypeError: if an input is not a floating-point tensor.
        ValueError: on wrong ranks, mismatched batch or embedding sizes, no texts,
            ``logit_scale <= 0`` or an unknown ``reduction``.

    Example:
        >>> f = torch.tensor([[1.0, 0.0]])
        >>> f0 = torch.tensor([[0.0, 1.0]])
        >>> texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> energy_gap(f, f0, texts, logit_scale=1.0)  # (1² + (-1)²) / (2·2)
        tensor(0.5000)

    References:
        Nam et al., "Lipsum-FT: Robust Fine-Tuning of Zero-Shot Models Using Random Text Guidance",
        ICLR 2024. Code: https://github.com/cs-giung/lipsum-ft
    """
    fn = "energy_gap"
    check_pair(fn, "features", features, "reference_features", reference_features)
    check_features(fn, "text_features", text_features)
    check_same_size(fn, "text_features", text_features, 1, "features", features, 1)
    if text_features.shape[0] == 0:
        raise ValueError(
            f"{fn}: text_features must hold at least one text, got shape "
            f"{tuple(text_features.shape)}"
        )
    check_scale(fn, "logit_scale", logit_scale)
    check_reduction(fn, reduction)
    dtype = compute_dtype(features, reference_features, text_features)
    delta = normalize(features, dtype) - normalize(reference_features.detach(), dtype)
    inner = delta @ normalize(text_features, dtype).T  # [B, M]
    per_sample = inner.square().sum(-1) * (logit_scale**2 / (2 * text_features.shape[0]))
    return apply_reduction(fn, per_sample, reduction)
