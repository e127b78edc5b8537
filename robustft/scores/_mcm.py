"""MCM: the maximum concept-matching score of a CLIP-like model (UEO's confidence at τ = 1)."""

from __future__ import annotations

import torch
from torch import Tensor

from robustft._checks import check_floating, check_ndim, check_same_size
from robustft._numerics import compute_dtype, full_precision, log_msp, normalize
from robustft.scores._validate import check_temperature
from robustft.typing import Scalar

__all__ = ["mcm"]


def mcm(image_features: Tensor, text_features: Tensor, *, temperature: Scalar = 1.0) -> Tensor:
    r"""Maximum concept matching: the MSP of image–text cosine similarities at temperature τ.

    .. math::
        s(x) = \max_k \frac{\exp(\cos(f, t_k)/\tau)}{\sum_{j=1}^{K} \exp(\cos(f, t_j)/\tau)},
        \qquad \cos(f, t) = \frac{f \cdot t}{\lVert f \rVert \, \lVert t \rVert}

    with :math:`f` the image embedding and :math:`t_k` the text embedding of known class
    :math:`k`. Features are raw encoder outputs, L2-normalised here (idempotent). Note that
    :math:`\tau` divides the *cosine* similarities: CLIP's logit scale (about 100) is not applied,
    so the score is soft: cosines lie in :math:`[-1, 1]`, hence :math:`s \in [1/K,\,
    e^{2/\tau} / (e^{2/\tau} + K - 1)]`. :math:`\tau = 1` is UEO's confidence weight (SPEC §3)
    and MCM's default. Higher = more likely in-distribution.

    Written with plain torch ops (torchmetrics has no MCM); it equals :func:`msp` of the cosine
    similarities at ``temperature``.

    Args:
        image_features: ``[..., dim]`` raw image embeddings :math:`f` (e.g. ``[batch, dim]``).
        text_features: ``[classes, dim]`` raw text embeddings :math:`t_k` of the known classes.
        temperature: :math:`\tau > 0`, a finite Python or NumPy number, or a 0-d floating tensor
            (not read). It divides cosines: not CLIP's logit scale (``1 / temperature`` plays
            that role; UEO's confidence is ``temperature=1``).

    Returns:
        ``[...]`` scores (``image_features``' shape without ``dim``), in at least float32, also
        under ``torch.autocast(dtype=torch.bfloat16)`` (the matmul runs with autocast off).

    Raises:
        TypeError: if a feature tensor is not floating, or ``temperature`` not a real number.
        ValueError: if ``text_features`` is not 2-d, the embedding widths differ, there are no
            classes or no embedding coordinates, or ``temperature`` is not finite and ``> 0``.

    Example:
        >>> image = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
        >>> text = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
        >>> mcm(image, text)
        tensor([0.7311, 0.5000])

    References:
        Ming et al., "Delving into Out-of-Distribution Detection with Vision-Language
        Representations", NeurIPS 2022. Code: https://github.com/deeplearning-wisc/MCM.
        Liang et al., "Realistic Unsupervised CLIP Fine-tuning with Universal Entropy
        Optimization", ICML 2024. Code: https://github.com/tim-learn/UEO
    """
    fn = "mcm"
    check_floating(fn, "image_features", image_features)
    if image_features.ndim == 0 or image_features.shape[-1] == 0:
        raise ValueError(
            f"{fn}: image_features must have shape [..., dim] with dim >= 1, got shape "
            f"{tuple(image_features.shape)}"
        )
    check_floating(fn, "text_features", text_features)
    check_ndim(fn, "text_features", text_features, 2)
    check_same_size(fn, "image_features", image_features, -1, "text_features", text_features, 1)
    if text_features.shape[0] == 0:
        raise ValueError(
            f"{fn}: text_features must have at least one class (row), got shape "
            f"{tuple(text_features.shape)}"
        )
    t = check_temperature(fn, temperature)
    dtype = compute_dtype(image_features, text_features)
    with full_precision(image_features, text_features):  # float32 under bf16 autocast too
        cosine = normalize(image_features, dtype) @ normalize(text_features, dtype).T
        return torch.exp(log_msp(cosine / t))
