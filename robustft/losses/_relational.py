"""TRACER's batch-coupled distillation views: contrastive relations, image–text interactions, cross KD.

TRACER (Asadollahzadeh et al., ICML 2026) distils a CLIP student from a teacher that averages the
student's own trajectory (CLIPood's Beta moving average, :func:`robustft.averaging.bma`), through
four views of the two towers' outputs. Three of them couple the samples of a batch, because the
other samples' texts (or images) are the "classes" a row is scored against; they live here:

- :func:`contrastive_relational_distillation` -- the student's image–text similarity
  distributions over the batch, KL-matched to the teacher's (CLIP-KD's CRD);
- :func:`interaction_distillation` -- the student's images contrasted against the teacher's
  texts and vice versa, the matched pair as the positive (CLIP-KD's ICL);
- :func:`cross_distillation` -- the student's images scored by the teacher's texts (and vice
  versa), KL-matched to the teacher's own image–text distributions (CrossKD's idea on CLIP).

The fourth view, feature distillation, is :func:`robustft.losses.feature_distillation` applied to
each tower: TRACER's ``MSELoss`` on normalised features averages over the ``dim`` entries too, so
its term is ``(feature_distillation(f, reference_features=f0) + feature_distillation(g,
reference_features=g0)) / dim``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from robustft._checks import check_group, check_scalar
from robustft._numerics import compute_dtype, full_precision, kl_rows, normalize
from robustft.distributed import all_gather_cat, all_reduce_sum, is_distributed, rank_offset
from robustft.losses._common import check_pair
from robustft.typing import Group, Scalar

__all__ = [
    "contrastive_relational_distillation",
    "cross_distillation",
    "interaction_distillation",
]

# ---------------------------------------------------------------------------------------------
# Shared pieces: checks, the normalised rows and (global) columns, the global-batch mean
# ---------------------------------------------------------------------------------------------


def _check_views(fn: str, f: Any, g: Any, f0: Any, g0: Any) -> None:
    """Four ``[batch, dim]`` floating tensors of one shape: student and teacher, image and text."""
    check_pair(fn, "image_features", f, "text_features", g)
    check_pair(fn, "teacher_image_features", f0, "image_features", f)
    check_pair(fn, "teacher_text_features", g0, "text_features", g)


def _teacher_scale(fn: str, logit_scale: Any, teacher_logit_scale: Any) -> Any:
    """The teacher's scale, a constant: given, or (``None``) the student's value, detached."""
    if teacher_logit_scale is None:
        return logit_scale.detach() if isinstance(logit_scale, Tensor) else logit_scale
    scale = check_scalar(fn, "teacher_logit_scale", teacher_logit_scale, positive=True)
    return scale.detach() if isinstance(scale, Tensor) else scale


class _Views(NamedTuple):
    """Normalised local rows, and the columns they are scored against (global with a group)."""

    f: Tensor  # [n, D] student images (local rows)
    g: Tensor  # [n, D] student texts
    f0: Tensor  # [n, D] teacher images (constant)
    g0: Tensor  # [n, D] teacher texts (constant)
    f_cols: Tensor  # [N, D] student images of the whole batch
    g_cols: Tensor
    f0_cols: Tensor  # [N, D] teacher images of the whole batch (constant)
    g0_cols: Tensor
    distributed: bool


def _views(
    f: Tensor, g: Tensor, f0: Tensor, g0: Tensor, group: Group, *, student_columns: bool
) -> _Views:
    """Normalise in :func:`compute_dtype` (teacher detached) and gather the columns in one call.

    With a distributed ``group`` every rank's rows are concatenated in rank order by one
    :func:`robustft.distributed.all_gather_cat` (differentiable for the student's columns, so
    the gradient reaches the rank that owns them); the teacher's columns are detached. Only the
    teacher is gathered when the student's columns are not needed.
    """
    dtype = compute_dtype(f, g, f0, g0)
    fs, gs = normalize(f, dtype), normalize(g, dtype)
    ft, gt = normalize(f0.detach(), dtype), normalize(g0.detach(), dtype)
    if group is None or not is_distributed(group):
        return _Views(fs, gs, ft, gt, fs, gs, ft, gt, False)
    if student_columns:
        cols = all_gather_cat(torch.stack([fs, gs, ft, gt], dim=1), group)
        return _Views(
            fs, gs, ft, gt, cols[:, 0], cols[:, 1], cols[:, 2].detach(), cols[:, 3].detach(), True
        )
    cols = all_gather_cat(torch.stack([ft, gt], dim=1), group).detach()
    return _Views(fs, gs, ft, gt, fs, gs, cols[:, 0], cols[:, 1], True)


def _batch_mean(local: Tensor, v: _Views, group: Group) -> Tensor:
    """``(sum over the global batch of both directions' row terms) / (2 N)``; 0 when ``N = 0``."""
    n_global = v.f0_cols.shape[0]
    total = all_reduce_sum(local.reshape(1), group)[0] if v.distributed else local
    return total / (2 * max(n_global, 1))


def _scaled(rows: Tensor, scale: Any, columns: Tensor) -> Tensor:
    """``scale * rows @ columns.T`` (``[rows, columns]`` logits)."""
    return (rows * scale) @ columns.T


# ---------------------------------------------------------------------------------------------
# The three views
# ---------------------------------------------------------------------------------------------


def contrastive_relational_distillation(
    image_features: Tensor,
    text_features: Tensor,
    *,
    teacher_image_features: Tensor,
    teacher_text_features: Tensor,
    logit_scale: Scalar = 100.0,
    teacher_logit_scale: Scalar | None = None,
    group: Group = None,
) -> Tensor:
    r"""Contrastive relational distillation (CRD): KL between teacher's and student's batch relations.

    With :math:`\hat f_i, \hat g_i` the L2-normalised image and text features of pair :math:`i`
    from the student, :math:`\hat f^0_i, \hat g^0_i` the teacher's, :math:`s` the
    ``logit_scale`` and :math:`t` the ``teacher_logit_scale``, the image→text logits

    .. math::

        S_{ij} = s\,\langle \hat f_i, \hat g_j\rangle, \qquad
        T_{ij} = t\,\langle \hat f^0_i, \hat g^0_j\rangle

    (and text→image :math:`S^\top`, :math:`T^\top`) give each sample a distribution over the
    batch's other modality; the loss matches them in both directions:

    .. math::

        L = \frac{1}{2B} \sum_{i=1}^{B} \Big(
              \mathrm{KL}\big(\operatorname{softmax}(T_{i\cdot}) \,\big\|\,
                              \operatorname{softmax}(S_{i\cdot})\big)
            + \mathrm{KL}\big(\operatorname{softmax}(T_{\cdot i}) \,\big\|\,
                              \operatorname{softmax}(S_{\cdot i})\big) \Big).

    This is :func:`robustft.losses.distillation` (at temperature 1, batch mean) of :math:`S`
    toward :math:`T` plus the same for the transposes, halved -- TRACER's CRD view, which the
    authors' code computes with ``nn.KLDivLoss(reduction="batchmean")`` on CLIP's image–text
    logits. The teacher side (features and scale) is keyword-only and a constant (detached); the
    student's scale may be a trained tensor (TRACER uses the student's learned
    ``logit_scale.exp()`` and the teacher's averaged one). Non-negative, and 0 exactly when
    every row distribution agrees (e.g. student = teacher with :math:`s = t`).

    **Data parallelism.** The relations couple the batch. Without ``group`` the batch is the
    local one. With ``group`` (e.g. ``torch.distributed.group.WORLD``) :math:`B` is the *global*
    batch -- what TRACER's single-process ``DataParallel`` step computes on the full batch: each
    rank gathers every rank's features in one :func:`robustft.distributed.all_gather_cat`,
    scores its own rows against all columns, and the row sums are added over ranks with
    :func:`robustft.distributed.all_reduce_sum`. Every rank returns the global loss, and the
    rank-averaged gradient (what DDP applies) equals the single-process gradient on the
    concatenated batch. Memory per rank is ``[local, global]`` logits. A rank with an empty
    local batch takes part in every collective; every rank must call the loss and its backward.
    An empty batch gives 0 with a zero gradient.

    Args:
        image_features: ``[batch, dim]`` raw image features of the student (the model trained).
        text_features: ``[batch, dim]`` raw text features of the student, row :math:`i` paired
            with image :math:`i` (the two modalities play symmetric roles).
        teacher_image_features: ``[batch, dim]`` raw image features of the teacher on the same
            batch (keyword-only; detached).
        teacher_text_features: ``[batch, dim]`` raw text features of the teacher (keyword-only;
            detached).
        logit_scale: the student's scale :math:`s > 0` (not its log), a finite real number or a
            0-d floating tensor (gradients flow into a trained one).
        teacher_logit_scale: the teacher's scale :math:`t > 0` (keyword-only, detached), or
            ``None`` for the student's value.
        group: a ``torch.distributed`` process group whose global batch forms the relations, or
            ``None`` (local batch).

    Returns:
        0-d tensor (at least float32, also under autocast).

    Raises:
        TypeError: if a feature is not a floating-point tensor, a scale is not a real number or
            0-d floating tensor, or ``group`` is not a process group.
        ValueError: on wrong ranks, mismatched shapes, an empty feature axis, or a scale that
            is not finite and > 0.

    Example:
        >>> eye = torch.eye(2)
        >>> flat = torch.ones(2, 2)  # the teacher sees no structure: uniform rows
        >>> contrastive_relational_distillation(
        ...     eye, eye, teacher_image_features=flat, teacher_text_features=flat, logit_scale=1.0
        ... )  # KL(uniform ‖ softmax([1, 0])) in each of the 4 rows
        tensor(0.1201)

    References:
        Asadollahzadeh, Liu, Leckie and Erfani, "TRACER: Persistent Regularization for Robust
        Multimodal Finetuning", ICML 2026, arXiv:2605.29380 (code:
        https://github.com/HesamAsad/TRACER, ``src/models/clip_knowledge_distillation.py``);
        Yang et al., "CLIP-KD: An Empirical Study of CLIP Model Distillation", CVPR 2024
        (code: https://github.com/winycg/CLIP-KD).
    """
    fn = "contrastive_relational_distillation"
    f, g = image_features, text_features
    f0, g0 = teacher_image_features, teacher_text_features
    _check_views(fn, f, g, f0, g0)
    logit_scale = check_scalar(fn, "logit_scale", logit_scale, positive=True)
    t_scale = _teacher_scale(fn, logit_scale, teacher_logit_scale)
    check_group(fn, group)
    with full_precision(f, g, f0, g0):
        v = _views(f, g, f0, g0, group, student_columns=True)
        image = kl_rows(_scaled(v.f0, t_scale, v.g0_cols), _scaled(v.f, logit_scale, v.g_cols))
        text = kl_rows(_scaled(v.g0, t_scale, v.f0_cols), _scaled(v.g, logit_scale, v.f_cols))
        return _batch_mean(image.sum() + text.sum(), v, group)


def interaction_distillation(
    image_features: Tensor,
    text_features: Tensor,
    *,
    teacher_image_features: Tensor,
    teacher_text_features: Tensor,
    logit_scale: Scalar = 100.0,
    group: Group = None,
) -> Tensor:
    r"""Interactive contrastive distillation (ICL): student images vs teacher texts, and vice versa.

    With the notation of :func:`contrastive_relational_distillation`, the student's rows are
    scored against the *teacher's* other modality, and each pair's own counterpart is the
    positive:

    .. math::

        L = -\frac{1}{2B} \sum_{i=1}^{B} \Big(
              \log \frac{e^{s \langle \hat f_i, \hat g^0_i\rangle}}
                        {\sum_j e^{s \langle \hat f_i, \hat g^0_j\rangle}}
            + \log \frac{e^{s \langle \hat g_i, \hat f^0_i\rangle}}
                        {\sum_j e^{s \langle \hat g_i, \hat f^0_j\rangle}} \Big),

    the mean of two cross-entropies with the identity as targets, over rows of the *student*
    only (unlike :func:`robustft.losses.clip_contrastive`, whose second term scores the columns:
    ``clip_contrastive(f, g0)`` would leave the student's texts out altogether). TRACER's ICL view,
    from CLIP-KD; the scale :math:`s` is the student's (trained) ``logit_scale``, as in the
    authors' code. With student = teacher its value is CLIP's contrastive loss of the pairs. The
    teacher's features are keyword-only and detached. Non-negative (not zero at a perfect
    student: a cross-entropy over the batch).

    **Data parallelism.** Without ``group`` the negatives are the local batch. With ``group``
    they are the *global* batch: each rank gathers every rank's teacher features (detached, one
    :func:`robustft.distributed.all_gather_cat`), scores its own rows against all of them, and
    the row sums are added over ranks (:func:`robustft.distributed.all_reduce_sum`); every rank
    returns the global loss and the DDP-averaged gradient equals the single-process gradient on
    the concatenated batch. Every rank, an empty one included, must call it and its backward.
    An empty batch gives 0 with a zero gradient.

    Args:
        image_features: ``[batch, dim]`` raw image features of the student.
        text_features: ``[batch, dim]`` raw text features of the student, row :math:`i` paired
            with image :math:`i`.
        teacher_image_features: ``[batch, dim]`` raw image features of the teacher
            (keyword-only; detached).
        teacher_text_features: ``[batch, dim]`` raw text features of the teacher (keyword-only;
            detached).
        logit_scale: the student's scale :math:`s > 0` (not its log), a finite real number or a
            0-d floating tensor.
        group: a ``torch.distributed`` process group whose global batch supplies the negatives,
            or ``None`` (local batch).

    Returns:
        0-d tensor (at least float32, also under autocast).

    Raises:
        TypeError: if a feature is not a floating-point tensor, ``logit_scale`` is not a real
            number or 0-d floating tensor, or ``group`` is not a process group.
        ValueError: on wrong ranks, mismatched shapes, an empty feature axis, or a
            ``logit_scale`` that is not finite and > 0.

    Example:
        >>> eye = torch.eye(2)
        >>> loss = interaction_distillation(
        ...     eye, eye, teacher_image_features=eye, teacher_text_features=eye, logit_scale=1.0
        ... )
        >>> torch.allclose(loss, torch.log1p(torch.exp(torch.tensor(-1.0))))  # -log softmax([1, 0])
        True

    References:
        Asadollahzadeh, Liu, Leckie and Erfani, "TRACER: Persistent Regularization for Robust
        Multimodal Finetuning", ICML 2026, arXiv:2605.29380 (code:
        https://github.com/HesamAsad/TRACER, ``src/models/clip_knowledge_distillation.py``);
        Yang et al., "CLIP-KD: An Empirical Study of CLIP Model Distillation", CVPR 2024
        (code: https://github.com/winycg/CLIP-KD).
    """
    fn = "interaction_distillation"
    f, g = image_features, text_features
    f0, g0 = teacher_image_features, teacher_text_features
    _check_views(fn, f, g, f0, g0)
    logit_scale = check_scalar(fn, "logit_scale", logit_scale, positive=True)
    check_group(fn, group)
    with full_precision(f, g, f0, g0):
        v = _views(f, g, f0, g0, group, student_columns=False)
        n = v.f.shape[0]
        offset = rank_offset(n, group, device=v.f.device) if v.distributed else 0
        target = (torch.arange(n, device=v.f.device) + offset)[:, None]
        image = torch.log_softmax(_scaled(v.f, logit_scale, v.g0_cols), dim=-1)
        text = torch.log_softmax(_scaled(v.g, logit_scale, v.f0_cols), dim=-1)
        local = -(image.take_along_dim(target, dim=1).sum() + text.take_along_dim(target, 1).sum())
        return _batch_mean(local, v, group)


def cross_distillation(
    image_features: Tensor,
    text_features: Tensor,
    *,
    teacher_image_features: Tensor,
    teacher_text_features: Tensor,
    logit_scale: Scalar = 100.0,
    teacher_logit_scale: Scalar | None = None,
    group: Group = None,
) -> Tensor:
    r"""Cross distillation (Cross KD): the student scored by the teacher's other tower, KL to the teacher.

    With the notation of :func:`contrastive_relational_distillation`, the student's images are
    scored by the teacher's texts (and its texts by the teacher's images), and these cross
    logits are KL-matched to the teacher's own image–text distributions:

    .. math::

        X_{ij} = s\,\langle \hat f_i, \hat g^0_j\rangle, \quad
        Y_{ij} = s\,\langle \hat g_i, \hat f^0_j\rangle, \quad
        T_{ij} = t\,\langle \hat f^0_i, \hat g^0_j\rangle,

    .. math::

        L = \frac{1}{2B} \sum_{i=1}^{B} \Big(
              \mathrm{KL}\big(\operatorname{softmax}(T_{i\cdot}) \,\big\|\,
                              \operatorname{softmax}(X_{i\cdot})\big)
            + \mathrm{KL}\big(\operatorname{softmax}(T_{\cdot i}) \,\big\|\,
                              \operatorname{softmax}(Y_{i\cdot})\big) \Big).

    TRACER's Cross KD view (the teacher's tower acts as the student's "head", as CrossKD feeds
    student features to the teacher's head): each student tower is pulled toward the teacher's
    *other* tower's geometry, so neither can drift in a direction the teacher's pairing does not
    follow. The student's scale :math:`s` (trained) scores the cross logits, the teacher's
    :math:`t` its own, as in the authors' code. The teacher side is keyword-only and detached.
    Non-negative; 0 when the student equals the teacher and :math:`s = t`.

    **Data parallelism.** As :func:`interaction_distillation`: without ``group`` the local batch,
    with ``group`` the global batch (teacher features gathered once, detached; row sums added
    over ranks), the same global loss on every rank, and a DDP-averaged gradient equal to the
    single-process one. An empty batch gives 0 with a zero gradient.

    Args:
        image_features: ``[batch, dim]`` raw image features of the student.
        text_features: ``[batch, dim]`` raw text features of the student, row :math:`i` paired
            with image :math:`i`.
        teacher_image_features: ``[batch, dim]`` raw image features of the teacher
            (keyword-only; detached).
        teacher_text_features: ``[batch, dim]`` raw text features of the teacher (keyword-only;
            detached).
        logit_scale: the student's scale :math:`s > 0` (not its log), a finite real number or a
            0-d floating tensor.
        teacher_logit_scale: the teacher's scale :math:`t > 0` (keyword-only, detached), or
            ``None`` for the student's value.
        group: a ``torch.distributed`` process group whose global batch forms the
            distributions, or ``None`` (local batch).

    Returns:
        0-d tensor (at least float32, also under autocast).

    Raises:
        TypeError: if a feature is not a floating-point tensor, a scale is not a real number or
            0-d floating tensor, or ``group`` is not a process group.
        ValueError: on wrong ranks, mismatched shapes, an empty feature axis, or a scale that
            is not finite and > 0.

    Example:
        >>> eye = torch.eye(2)
        >>> flat = torch.ones(2, 2)  # student texts see no structure against the teacher images
        >>> cross_distillation(
        ...     eye, flat, teacher_image_features=eye, teacher_text_features=eye, logit_scale=1.0
        ... )  # image rows agree; each text row: KL(softmax([1, 0]) ‖ uniform), over 2B = 4
        tensor(0.0555)

    References:
        Asadollahzadeh, Liu, Leckie and Erfani, "TRACER: Persistent Regularization for Robust
        Multimodal Finetuning", ICML 2026, arXiv:2605.29380 (code:
        https://github.com/HesamAsad/TRACER, ``src/models/clip_knowledge_distillation.py``);
        Wang et al., "CrossKD: Cross-Head Knowledge Distillation for Object Detection", CVPR
        2024 (code: https://github.com/jbwang1997/CrossKD).
    """
    fn = "cross_distillation"
    f, g = image_features, text_features
    f0, g0 = teacher_image_features, teacher_text_features
    _check_views(fn, f, g, f0, g0)
    logit_scale = check_scalar(fn, "logit_scale", logit_scale, positive=True)
    t_scale = _teacher_scale(fn, logit_scale, teacher_logit_scale)
    check_group(fn, group)
    with full_precision(f, g, f0, g0):
        v = _views(f, g, f0, g0, group, student_columns=False)
        image = kl_rows(_scaled(v.f0, t_scale, v.g0_cols), _scaled(v.f, logit_scale, v.g0_cols))
        text = kl_rows(_scaled(v.g0, t_scale, v.f0_cols), _scaled(v.g, logit_scale, v.f0_cols))
        return _batch_mean(image.sum() + text.sum(), v, group)
