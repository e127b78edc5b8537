"""Distillation toward the pre-trained model: logits (KD), context prototypes (CAR-FT), features."""

from __future__ import annotations

from torch import Tensor

from robustft._checks import (
    apply_reduction,
    check_floating,
    check_reduction,
    check_same_size,
    check_scalar,
)
from robustft._numerics import compute_dtype, full_precision, kl_rows, normalize
from robustft.losses._common import check_features, check_pair, check_rows
from robustft.typing import Reduction, Scalar

__all__ = ["context_distillation", "distillation", "feature_distillation"]


def _scaled_kl(teacher: Tensor, student: Tensor, temperature: Scalar) -> Tensor:
    r""":math:`T^2\,\mathrm{KL}(\mathrm{softmax}(t/T) \| \mathrm{softmax}(z/T))` per row.

    A Python temperature of exactly 1 skips the two divisions; a tensor temperature is never read.
    """
    if isinstance(temperature, Tensor) or temperature != 1.0:
        return kl_rows(teacher / temperature, student / temperature) * (temperature * temperature)
    return kl_rows(teacher, student)


def distillation(
    logits: Tensor,
    *,
    teacher_logits: Tensor,
    temperature: Scalar = 1.0,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Knowledge distillation (KD): temperature-scaled KL from the teacher's to the student's softmax.

    .. math::

        \ell_b = T^2\, \mathrm{KL}\big(\operatorname{softmax}(t_b / T) \,\big\|\,
                 \operatorname{softmax}(z_b / T)\big)
               = T^2 \sum_c q_{bc}\,(\log q_{bc} - \log p_{bc})

    with :math:`z` the ``logits`` of the model being fine-tuned (the student), :math:`t` the
    ``teacher_logits`` (keyword-only and detached: the teacher is a constant, e.g. the frozen
    zero-shot model with its head) and :math:`T` the ``temperature``; the :math:`T^2` keeps
    gradient magnitudes comparable across temperatures. Non-negative, zero iff the two softmaxes
    agree. Exact via log-softmax and finite at logits of :math:`\pm 10^4`. A class the teacher
    masks (:math:`t_{bc} = -\infty`, :math:`q_{bc} = 0`) contributes exactly 0, with a finite
    gradient; a class the *student* masks where the teacher has mass gives ``+inf`` (the true KL).

    Args:
        logits: ``[batch, classes]`` logits of the model being fine-tuned.
        teacher_logits: ``[batch, classes]`` logits of the teacher (keyword-only).
        temperature: :math:`T > 0`, a finite real number or a 0-d floating tensor.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per sample ``[batch]``). An empty batch
            gives 0 (``"mean"``, ``"sum"``) or ``[0]``, with a zero gradient.

    Returns:
        0-d tensor, or ``[batch]`` with ``reduction="none"`` (at least float32, also under
        autocast).

    Raises:
        TypeError: if the logits are not floating-point tensors or ``temperature`` is not a real
            number or 0-d floating tensor.
        ValueError: on wrong ranks, mismatched shapes, no classes, a ``temperature`` that is not
            finite and > 0, or an unknown ``reduction``.

    Example:
        >>> z = torch.tensor([[0.0, 0.0]])
        >>> t = torch.tensor([[1e4, -1e4]])
        >>> distillation(z, teacher_logits=t)  # KL([1, 0] ‖ [1/2, 1/2]) = log 2
        tensor(0.6931)

    References:
        Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep
        Learning Workshop, arXiv:1503.02531 (2015). Used with the zero-shot model as teacher as a
        robust fine-tuning baseline in Nam et al., "Lipsum-FT", ICLR 2024 (Sec. 5).
    """
    fn = "distillation"
    check_floating(fn, "logits", logits, ndim=2)
    check_floating(fn, "teacher_logits", teacher_logits, ndim=2)
    check_same_size(fn, "teacher_logits", teacher_logits, 0, "logits", logits, 0)
    check_same_size(fn, "teacher_logits", teacher_logits, 1, "logits", logits, 1)
    if logits.shape[1] == 0:
        raise ValueError(
            f"{fn}: logits must have at least one class (dim 1), got shape {tuple(logits.shape)}"
        )
    temperature = check_scalar(fn, "temperature", temperature, positive=True)
    check_reduction(fn, reduction)
    dtype = compute_dtype(logits, teacher_logits)
    with full_precision(logits, teacher_logits):
        per_sample = _scaled_kl(teacher_logits.detach().to(dtype), logits.to(dtype), temperature)
    return apply_reduction(fn, per_sample, reduction)


def context_distillation(
    features: Tensor,
    *,
    reference_features: Tensor,
    context_features: Tensor,
    logit_scale: Scalar = 100.0,
    temperature: Scalar = 1.0,
    reduction: Reduction = "mean",
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

    The pre-trained side is a constant (detached) and, like the context prototypes, keyword-only.
    A non-negative penalty; CAR-FT adds :math:`\beta\,\ell` to the cross-entropy. At the default
    :math:`T = 1` this is exactly CAR-FT's :math:`\mathrm{KL}(p_{ctx}(x;\theta_0) \|
    p_{ctx}(x;\theta))`. :func:`robustft.clip.context_prototypes` builds :math:`W`.

    Args:
        features: ``[batch, dim]`` raw image features of the model being fine-tuned.
        reference_features: ``[batch, dim]`` raw image features of the pre-trained model.
        context_features: ``[contexts, dim]`` raw context prototypes :math:`w_m` (e.g. 80 templates).
        logit_scale: :math:`s > 0`, a finite real number or a 0-d tensor: the *scale* itself (100
            for OpenAI CLIP), i.e. the exponential of open_clip's ``model.logit_scale`` parameter,
            which stores its log; :func:`robustft.clip.logit_scale` returns it from a model.
        temperature: :math:`T > 0`, a finite real number or a 0-d tensor.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per sample ``[batch]``). An empty batch
            gives 0 (``"mean"``, ``"sum"``) or ``[0]``, with a zero gradient.

    Returns:
        0-d tensor, or ``[batch]`` with ``reduction="none"`` (at least float32, also under
        autocast).

    Raises:
        TypeError: if an input is not a floating-point tensor, or a scalar is not a real number or
            0-d floating tensor.
        ValueError: on wrong ranks, mismatched sizes, an empty feature axis, no contexts, a
            ``logit_scale`` or ``temperature`` that is not finite and > 0, or an unknown
            ``reduction``.

    Example:
        >>> ctx = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> f0 = torch.tensor([[1.0, 1.0]])  # pre-trained: uniform over the two contexts
        >>> f = torch.tensor([[1.0, 0.0]])  # fine-tuned: softmax([1, 0])
        >>> context_distillation(f, reference_features=f0, context_features=ctx, logit_scale=1.0)
        tensor(0.1201)

    References:
        Mao et al., "Context-Aware Robust Fine-Tuning", IJCV 2023.
        Code: https://github.com/LightDXY/CAR-FT
    """
    fn = "context_distillation"
    check_pair(fn, "features", features, "reference_features", reference_features)
    check_features(fn, "context_features", context_features)
    check_same_size(fn, "context_features", context_features, 1, "features", features, 1)
    check_rows(fn, "context_features", context_features, "context")
    logit_scale = check_scalar(fn, "logit_scale", logit_scale, positive=True)
    temperature = check_scalar(fn, "temperature", temperature, positive=True)
    check_reduction(fn, reduction)
    dtype = compute_dtype(features, reference_features, context_features)
    with full_precision(features, reference_features, context_features):
        w = normalize(context_features, dtype)
        z = (normalize(features, dtype) * logit_scale) @ w.T
        t = ((normalize(reference_features.detach(), dtype) * logit_scale) @ w.T).detach()
        per_sample = _scaled_kl(t, z, temperature)
    return apply_reduction(fn, per_sample, reduction)


def feature_distillation(
    features: Tensor,
    *,
    reference_features: Tensor,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Feature distillation (FeatKD): squared distance to the pre-trained model's features.

    .. math:: \ell_b = \big\| \hat f_b - \hat f^0_b \big\|_2^2 \;\in [0, 4]

    on L2-normalised features :math:`\hat f` (``features``) and :math:`\hat f^0`
    (``reference_features``, keyword-only; a constant: detached). A non-negative penalty added to
    the cross-entropy.

    Args:
        features: ``[batch, dim]`` raw features of the model being fine-tuned.
        reference_features: ``[batch, dim]`` raw features of the pre-trained model.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per sample ``[batch]``). An empty batch
            gives 0 (``"mean"``, ``"sum"``) or ``[0]``, with a zero gradient.

    Returns:
        0-d tensor, or ``[batch]`` with ``reduction="none"`` (at least float32).

    Raises:
        TypeError: if an input is not a floating-point tensor.
        ValueError: on wrong ranks, mismatched shapes, an empty feature axis or an unknown
            ``reduction``.

    Example:
        >>> f, f0 = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 3.0]])
        >>> feature_distillation(f, reference_features=f0)  # ‖(1, 0) − (0, 1)‖²
        tensor(2.)

    References:
        Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015 (distillation of a
        network's features rather than its outputs); here on the final, L2-normalised embedding,
        with the frozen pre-trained model as the teacher.
    """
    fn = "feature_distillation"
    check_pair(fn, "features", features, "reference_features", reference_features)
    check_reduction(fn, reduction)
    dtype = compute_dtype(features, reference_features)
    delta = normalize(features, dtype) - normalize(reference_features.detach(), dtype)
    return apply_reduction(fn, delta.square().sum(-1), reduction)
