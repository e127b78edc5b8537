"""Lipsum-FT's random-text energy-gap regulariser."""

from __future__ import annotations

from torch import Tensor

from robustft._checks import apply_reduction, check_reduction, check_same_size, check_scalar
from robustft._numerics import energy_gap_rows
from robustft.losses._common import check_features, check_pair, check_rows
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
    random texts (not detached: freeze them as you would any text head). Both are keyword-only.
    The same quantity averaged over a fixed set of held-out random texts is the paper's
    energy-gap diagnostic (Eq. 6, :func:`robustft.metrics.energy_gap`).

    **Precision.** Half-precision inputs are computed in float32 (float64 stays float64), and the
    result is float32 under ``torch.autocast`` too. A small gap computed from bf16 *features* is
    dominated by their rounding: bf16 keeps 8 significant bits, so each normalised feature is off
    by a relative :math:`\approx 2^{-9}` and the gap of the rounding alone is about
    :math:`s^2 2^{-18} / D` (:math:`D` the feature width; measured :math:`3 \cdot 10^{-5}` at
    :math:`s = 100`, :math:`D = 512`, where a true gap of :math:`10^{-5}` reads as
    :math:`4 \cdot 10^{-5}`). Keep the two towers' output features in float32 when the gap is that
    small (e.g. in the first steps of fine-tuning).

    Args:
        features: ``[batch, dim]`` raw image features of the model being fine-tuned.
        reference_features: ``[batch, dim]`` raw image features of the pre-trained model.
        text_features: ``[texts, dim]`` raw text features of the :math:`M` random texts.
        logit_scale: :math:`s > 0`, a finite real number or a 0-d tensor: the *scale* itself (100
            for OpenAI CLIP), i.e. the exponential of open_clip's ``model.logit_scale`` parameter,
            which stores its log; :func:`robustft.clip.logit_scale` returns it from a model.
        reduction: ``"mean"`` (over the batch), ``"sum"`` or ``"none"`` (per sample ``[batch]``).
            An empty batch gives 0 (``"mean"``, ``"sum"``) or ``[0]``, with a zero gradient.

    Returns:
        0-d tensor, or ``[batch]`` with ``reduction="none"`` (at least float32, also under
        autocast).

    Raises:
        TypeError: if an input is not a floating-point tensor or ``logit_scale`` is not a real
            number or 0-d floating tensor.
        ValueError: on wrong ranks, mismatched batch or embedding sizes, an empty feature axis, no
            texts, a ``logit_scale`` that is not finite and > 0, or an unknown ``reduction``.

    Example:
        >>> f = torch.tensor([[1.0, 0.0]])
        >>> f0 = torch.tensor([[0.0, 1.0]])
        >>> texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> energy_gap(f, reference_features=f0, text_features=texts, logit_scale=1.0)
        tensor(0.5000)

        (:math:`(1^2 + (-1)^2) / (2 \cdot 2)`.)

    References:
        Nam et al., "Lipsum-FT: Robust Fine-Tuning of Zero-Shot Models Using Random Text Guidance",
        ICLR 2024. Code: https://github.com/cs-giung/lipsum-ft
    """
    fn = "energy_gap"
    check_pair(fn, "features", features, "reference_features", reference_features)
    check_features(fn, "text_features", text_features)
    check_same_size(fn, "text_features", text_features, 1, "features", features, 1)
    check_rows(fn, "text_features", text_features, "text")
    logit_scale = check_scalar(fn, "logit_scale", logit_scale, positive=True)
    check_reduction(fn, reduction)
    per_sample = energy_gap_rows(features, reference_features.detach(), text_features, logit_scale)
    return apply_reduction(fn, per_sample, reduction)
