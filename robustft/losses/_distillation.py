"""Distillation toward the pre-trained model: logits (KD), context prototypes (CAR-FT), features."""

from __future__ import annotations

import torch
from torch import Tensor

from robustft._checks import (
    apply_reduction,
    check_floating,
    check_number,
    check_reduction,
    check_same_size,
)
from robustft.losses._common import (
    check_features,
    check_pair,
    check_scale,
    compute_dtype,
    normalize,
)
from robustft.typing import Scalar

__all__ = ["context_distillation", "distillation", "feature_distillation"]


def _kl_rows(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Row-wise ``KL(softmax(teacher) ‖ softmax(student))``, exact and finite at extreme logits."""
    log_q = torch.log_softmax(teacher_logits, dim=-1)
    log_p = torch.log_softmax(student_logits, dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def _check_temperature(fn: str, temperature: object) -> float:
    return check_number(fn, "temperature", temperature, low=0.0, low_inclusive=False)


def distillation(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    r"""Knowledge distillation (KD): temperature-scaled KL from the teacher's to the student's softmax.

    .. math::

        \ell_b = T^2\, \mathrm{KL}\big(\operatorname{softmax}(t_b / T) \,\big\|\,
                 \operatorname{softmax}(z_b / T)\big)
               = T^2 \sum_c q_{bc}\,(\log q_{bc} - \log p_{bc})

    with :math:`z` the ``student_logits``, :math:`t` the ``teacher_logits`` (detached: the
    teacher is a constant, e.g. the frozen zero-shot model with its head) and :math:`T` the
    ``temperature``; the :math:`T^2` keeps gradient magnitudes comparable across temperatures.
    Non-negative, zero iff the two softmaxes agree. Exact via log-softmax and finite at logits of
    :math:`\pm 10^4`.

    Args:
        student_logits: ``[batch, classes]`` logits of the model being fine-tuned.
        teacher_logits: ``[batch, classes]`` logits of the teacher.
        temperature: :math:`T > 0`.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per sample ``[batch]``).

    Returns:
        0-d tensor, or ``[batch]`` with ``reduction="none"`` (at least float32).

    Raises:
        TypeError: if the logits are not floating-point tensors.
        ValueError: on wrong ranks, mismatched shapes, ``temperature <= 0`` or an unknown
            ``reduction``.

    Example:
        >>> s = torch.tensor([[0.0, 0.0]])
        >>> t = torch.tensor([[1e4, -1e4]])
        >>> distillation(s, t)  # KL([1, 0] ‖ [1/2, 1/2]) = log 2
        tensor(0.6931)

    References:
        Hinton et al., "Distilling the Knowledge in a Neural Network", 2015.
        Code (KD as a robust fine-tuning baseline, with the zero-shot teacher):
        https://github.com/cs-giung/lipsum-ft
    """
    fn = "distillation"
    check_floating(fn, "student_logits", student_logits, ndim=2)
    check_floating(fn, "teacher_logits", teacher_logits, ndim=2)
    check_same_size(fn, "teacher_logits", teacher_logits, 0, "student_logits", student_logits, 0)
    check_same_size(fn, "teacher_logits", teacher_logits, 1, "student_logits", student_logits, 1)
    temp = _check_temperature(fn, temperature)
    check_reduction(fn, reduction)
    dtype = compute_dtype(student_logits, teacher_logits)
    t = teacher_logits.detach().to(dtype)
    z = student_logits.to(dtype)
    if temp != 1.0:
        t, z = t / temp, z / temp
    per_sample = _kl_rows(t, z)
    if temp != 1.0:
        per_sample = per_sample * (temp * temp)
    return apply_reduction(fn, per_sample, reduction)


def context_distillation(
    features: Tensor,
    reference_features: Tensor,
    context_features: Tensor,
    *,
    logit_scale: Scalar = 100.0,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    r"""CAR-FT's context regulariser: KD over the context prototypes, toward the pre-trained model.

    With :math:`\hat f_b`, :math:`\hat f^0_b` the normalised image features of the fine-tuned and
    pre-trained models, :math:`\hat w_m` the normalised context prototypes (one per prompt template
    :math:`m`: the normalised mean over classes of the normalised text features of
    ``template_m(class_c)``) and :math:`s` the ``logit_scale``:

    .. math::

        p^{\theta}_b = \operatorname{softmax}\big(s\, \hat f_b \hat W^\top / T\big), \quad
        p^{\theta_0}_b = \operatorname{softmax}\big(s\, \hat f^0_b \hat W^\top / T\big), \quad
        \ell_b = T^2\, \mathrm{KL}\big(p^{\theta_0}_b \,\big\|\, p^{\theta}_b\big).

    The pre-trained side is a constant (detached). A non-negative penalty; CAR-FT adds
    :math:`\beta\,\ell` to the cross-entropy. At the default :math:`T = 1` this is exactly CAR-FT's
    :math:`\mathrm{KL}(p_{ctx}(x;\theta_0) \| p_{ctx}(x;\theta))`.

    Args:
        features: ``[batch, dim]`` raw image features of the model being fine-tuned.
        reference_features: ``[batch, dim]`` raw image features of the pre-trained model.
        context_features: ``[contexts, dim]`` raw context prototypes :math:`w_m` (e.g. 80 templates).
        logit_scale: :math:`s > 0`, a real number or a 0-d tensor.
        temperature: :math:`T > 0`.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per sample ``[batch]``).

    Returns:
        0-d tensor, or ``[batch]`` with ``reduction="none"`` (at least float32).

    Raises:
        TypeError: if an input is not a floating-point tensor.
        ValueError: on wrong ranks, mismatched sizes, ``logit_scale <= 0``, ``temperature <= 0`` or
            an unknown ``reduction``.

    Example:
        >>> ctx = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> f0 = torch.tensor([[1.0, 1.0]])  # pre-trained: uniform over the two contexts
        >>> f = torch.tensor([[1.0, 0.0]])  # fine-tuned: softmax([1, 0])
        >>> context_distillation(f, f0, ctx, logit_scale=1.0)  # ½log(½/σ(1)) + ½log(½/σ(-1))
        tensor(0.1201)

    References:
        Mao et al., "Context-Aware Robust Fine-Tuning", IJCV 2023.
        Code: https://github.com/LightDXY/CAR-FT
    """
    fn = "context_distillation"
    check_pair(fn, "features", features, "reference_features", reference_features)
    check_features(fn, "context_features", context_features)
    check_same_size(fn, "context_features", context_features, 1, "features", features, 1)
    check_scale(fn, "logit_scale", logit_scale)
    temp = _check_temperature(fn, temperature)
    check_reduction(fn, reduction)
    dtype = compute_dtype(features, reference_features, context_features)
    w = normalize(context_features, dtype)
    scale = logit_scale / temp
    z = (normalize(features, dtype) * scale) @ w.T
    t = ((normalize(reference_features, dtype) * scale) @ w.T).detach()
    per_sample = _kl_rows(t, z)
    if temp != 1.0:
        per_sample = per_sample * (temp * temp)
    return apply_reduction(fn, per_sample, reduction)


def feature_distillation(
    features: Tensor,
    reference_features: Tensor,
    *,
    reduction: str = "mean",
) -> Tensor:
    r"""Feature distillation (FeatKD): squared distance to the pre-trained model's features.

    .. math:: \ell_b = \big\| \hat f_b - \hat f^0_b \big\|_2^2 \;\in [0, 4]

    on L2-normalised features; the pre-trained features :math:`\hat f^0` are a constant (detached).

    Args:
        features: ``[batch, dim]`` raw features of the model being fine-tuned.
        reference_features: ``[batch, dim]`` raw features of the pre-trained model.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per sample ``[batch]``).

    Returns:
        0-d tensor, or ``[batch]`` with ``reduction="none"`` (at least float32).

    Raises:
        TypeError: if an input is not a floating-point tensor.
        ValueError: on wrong ranks, mismatched shapes or an unknown ``reduction``.

    Example:
        >>> feature_distillation(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 3.0]]))
        tensor(2.)

    References:
        Feature-distillation baseline of Mao et al., "Context-Aware Robust Fine-Tuning",
        IJCV 2023, and Nam et al., "Lipsum-FT", ICLR 2024.
        Code: https://github.com/cs-giung/lipsum-ft
    """
    fn = "feature_distillation"
    check_pair(fn, "features", features, "reference_features", reference_features)
    check_reduction(fn, reduction)
    dtype = compute_dtype(features, reference_features)
    delta = normalize(features, dtype) - normalize(reference_features.detach(), dtype)
    return apply_reduction(fn, delta.square().sum(-1), reduction)
