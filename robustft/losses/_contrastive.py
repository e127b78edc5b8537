"""The symmetric CLIP contrastive loss (FLYP), with R-Adapter's multi-positive, smoothed, margin form."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from robustft._checks import check_group, check_labels, check_number, check_scalar
from robustft._numerics import compute_dtype, full_precision, normalize
from robustft.distributed import all_gather_cat, all_reduce_sum, is_distributed, rank_offset
from robustft.losses._common import check_pair
from robustft.typing import Group, Scalar

__all__ = ["clip_contrastive"]


# ---------------------------------------------------------------------------------------------
# The pieces the two contrastive losses share: label checks and the positive-pair mask
# ---------------------------------------------------------------------------------------------


def check_pair_labels(fn: str, labels: Any, features: Tensor) -> Tensor | None:
    """``None``, or ``[batch]`` integer class ids on the features' device, returned as int64."""
    if labels is None:
        return None
    labels = check_labels(fn, "labels", labels, batch=features.shape[0])
    if labels.device != features.device:
        raise ValueError(
            f"{fn}: labels must be on the device of image_features ({features.device}), got "
            f"{labels.device}"
        )
    return labels


def positive_pairs(
    labels: Tensor | None, rows: int, columns: int, group: Group, device: torch.device
) -> Tensor:
    """``[rows, columns]`` bool: whether a local row and a (global) column are a positive pair.

    With ``labels``: the same class id (the local rows' ``labels`` against every rank's, gathered
    with :func:`robustft.distributed.all_gather_cat` when ``group`` is distributed). Without: the
    matched pair only, local row ``i`` against global column ``offset + i``. Branch-free: an id
    comparison, no value read.
    """
    distributed = group is not None and is_distributed(group)
    if labels is not None:
        columns_labels = all_gather_cat(labels, group) if distributed else labels
        return labels[:, None] == columns_labels[None, :]
    offset = rank_offset(rows, group, device=device) if distributed else 0
    row_ids = torch.arange(rows, device=device) + offset
    return torch.arange(columns, device=device)[None, :] == row_ids[:, None]


def negative_shift(positive: Tensor, scale: Scalar, margin: float, dtype: torch.dtype) -> Tensor:
    r"""``[rows, columns]``: :math:`s\,\delta` on the negative pairs, 0 on the positives."""
    return (~positive).to(dtype) * (scale * margin)


def _soft_targets(positive: Tensor, smoothing: float, dtype: torch.dtype) -> Tensor:
    r"""``[rows, columns]`` targets :math:`\tilde y`, each row a distribution over the columns.

    :math:`1 - \varepsilon` spread uniformly over the row's positives and :math:`\varepsilon`
    over its negatives; a row without a negative keeps all its mass on its positives.
    """
    pos = positive.to(dtype)
    n_pos = pos.sum(dim=1, keepdim=True)  # >= 1: the matched pair is always a positive
    target = pos / n_pos.clamp_min(1)
    if smoothing == 0.0:
        return target
    n_neg = positive.shape[1] - n_pos
    eps = smoothing * (n_neg > 0).to(dtype)  # per row: 0 where there is no negative to give to
    return (1 - eps) * target + eps * (1 - pos) / n_neg.clamp_min(1)


def _soft_cross_entropy_sum(logits: Tensor, target: Tensor) -> Tensor:
    r""":math:`-\sum_{ij} \tilde y_{ij} \log \mathrm{softmax}(S_{i\cdot})_j` (zero rows give 0)."""
    return -(target * F.log_softmax(logits, dim=1)).sum()


def clip_contrastive(
    image_features: Tensor,
    text_features: Tensor,
    *,
    logit_scale: Scalar = 100.0,
    labels: Tensor | None = None,
    smoothing: float = 0.0,
    margin: float = 0.0,
    group: Group = None,
) -> Tensor:
    r"""Symmetric CLIP contrastive loss over (image, text) pairs; FLYP's objective, R-Adapter's MPM-NCE.

    With :math:`\hat f_i`, :math:`\hat g_j` the L2-normalised image and text features of pairs
    :math:`i`, :math:`j`, :math:`P_{ij} = 1` if :math:`i` and :math:`j` are a positive pair (the
    same class, ``labels[i] == labels[j]``; without ``labels`` only :math:`i = j`), else 0,
    :math:`|P(i)| = \sum_j P_{ij} \ge 1`, and the logits

    .. math::

        S_{ij} = s\,\big(\langle \hat f_i, \hat g_j\rangle + \delta\,(1 - P_{ij})\big),
        \qquad
        \tilde y_{ij} = (1 - \varepsilon)\,\frac{P_{ij}}{|P(i)|}
                      + \varepsilon\,\frac{1 - P_{ij}}{B - |P(i)|},

    .. math::

        L = -\frac{1}{2B} \sum_{i=1}^{B} \sum_{j=1}^{B} \tilde y_{ij} \Big(
              \log \frac{e^{S_{ij}}}{\sum_k e^{S_{ik}}}
            + \log \frac{e^{S_{ji}}}{\sum_k e^{S_{ki}}} \Big)

    the mean of the image→text and text→image soft cross-entropies, each averaged over the
    :math:`B` rows (text :math:`i` is scored against every image :math:`j`, with the same
    targets: the positive structure is symmetric). :math:`s` is ``logit_scale``,
    :math:`\varepsilon` ``smoothing`` and :math:`\delta` ``margin``. With the defaults (no
    labels, :math:`\varepsilon = \delta = 0`) :math:`\tilde y` is the identity and :math:`L` is
    CLIP's loss (computed exactly as before, with hard-target cross-entropies), for FLYP with
    the text of pair :math:`i` a templated caption of image :math:`i`'s class (``"a photo of a
    {class}."``), encoded by the (trained) text tower. The two feature arguments play symmetric
    roles (swapping them gives the same loss, with labels too), so both are positional. The loss
    couples samples, so there is no per-sample reduction. An empty batch gives 0 with a zero
    gradient, as every loss's ``"mean"`` does.

    **Multiple positives (MPM-NCE).** In a fine-tuning batch several images share a class and so
    a caption; with ``labels`` every same-class pair is a positive and the target spreads
    :math:`1 - \varepsilon` uniformly over them (SupCon's multi-positive form across the two
    towers), instead of calling a same-class caption a negative. :math:`\varepsilon` (label
    smoothing, also without labels) moves mass :math:`\varepsilon` uniformly onto the negatives;
    a row whose columns are all positives (:math:`|P(i)| = B`) has no negative to give it to and
    keeps all its mass on its positives (:math:`\tilde y_{ij} = 1/B`). The margin
    :math:`\delta \ge 0` is added to the cosine of every negative pair before scaling, so a
    negative must be :math:`\delta` less similar than a positive to weigh the same. Labels are
    only compared for equality (any integer ids): drop unknown-class samples (labelled ``-1``
    by the library's convention) first, or they would be positives of one another.

    **Data parallelism.** Without ``group`` the negatives are the local batch. With ``group``
    (e.g. ``torch.distributed.group.WORLD``) :math:`B` is the *global* batch: each rank gathers
    every rank's features (and ``labels``) with :func:`robustft.distributed.all_gather_cat`
    (differentiable, uneven batch sizes allowed), scores its own rows against all columns (the
    positives and :math:`|P(i)|` then count the global batch), and the row sums are added over
    ranks (:func:`robustft.distributed.all_reduce_sum`). Every rank returns the global loss, and
    the rank-averaged gradient (what DDP applies) equals the single-process gradient on the
    concatenated batch. Memory per rank is ``[local, global]`` logits, not ``[global, global]``.
    A rank whose local batch is empty takes part in every collective like the others (and gets
    the global loss and a zero-size gradient); every rank must call the loss and its backward,
    with the same choice of ``labels`` (all ranks or none), ``smoothing`` and ``margin``.

    Args:
        image_features: ``[batch, dim]`` raw image features.
        text_features: ``[batch, dim]`` raw text features, row :math:`i` paired with image
            :math:`i`.
        logit_scale: :math:`s > 0`, a finite real number or a 0-d tensor: the *scale* itself (100
            for OpenAI CLIP), i.e. the exponential of open_clip's ``model.logit_scale`` parameter,
            which stores its log; :func:`robustft.clip.logit_scale` returns it from a model (pass
            ``model.logit_scale.exp()`` to train the scale, as CLIP and FLYP do).
        labels: ``[batch]`` integer class ids of the pairs (any integer dtype, on the features'
            device), or ``None`` (only the matched pairs are positives).
        smoothing: :math:`\varepsilon \in [0, 1)`, a real number: the target mass moved onto the
            negatives.
        margin: :math:`\delta \ge 0`, a finite real number: added to the cosine of every
            negative pair.
        group: a ``torch.distributed`` process group whose global batch supplies the negatives
            and positives, or ``None`` (local batch).

    Returns:
        0-d tensor (at least float32, also under autocast).

    Raises:
        TypeError: if an input is not a floating-point tensor, ``labels`` is not an integer
            tensor, ``logit_scale`` is not a real number or 0-d floating tensor, ``smoothing``
            or ``margin`` is not a real number, or ``group`` is not a process group.
        ValueError: on wrong ranks, mismatched shapes, an empty feature axis, ``labels`` of
            another length or device, a ``logit_scale`` that is not finite and > 0, a
            ``smoothing`` outside :math:`[0, 1)` or a ``margin`` that is not finite and >= 0.

    Example:
        >>> pairs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> loss = clip_contrastive(pairs, pairs, logit_scale=1.0)
        >>> torch.allclose(loss, torch.log1p(torch.exp(torch.tensor(-1.0))))
        True
        >>> # one class: both captions are positives of both images, target 1/2 each
        >>> same = clip_contrastive(pairs, pairs, logit_scale=1.0, labels=torch.tensor([3, 3]))
        >>> torch.allclose(same, torch.log1p(torch.exp(torch.tensor(1.0))) - 0.5)
        True

    References:
        Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
        ICML 2021 (code: https://github.com/mlfoundations/open_clip); Goyal et al., "Finetune like
        you pretrain: Improved finetuning of zero-shot vision models" (FLYP), CVPR 2023
        (code: https://github.com/locuslab/FLYP); Kim et al., "Efficient and Versatile Robust
        Fine-Tuning of Zero-shot Models" (R-Adapter, its MPM-NCE loss), ECCV 2024,
        arXiv:2408.05749 (code: https://cvlab.postech.ac.kr/research/R-Adapter/); Khosla et al.,
        "Supervised Contrastive Learning" (SupCon, multiple positives), NeurIPS 2020.
    """
    fn = "clip_contrastive"
    check_pair(fn, "image_features", image_features, "text_features", text_features)
    logit_scale = check_scalar(fn, "logit_scale", logit_scale, positive=True)
    labels = check_pair_labels(fn, labels, image_features)
    smoothing = check_number(fn, "smoothing", smoothing, low=0.0, high=1.0, high_inclusive=False)
    margin = check_number(fn, "margin", margin, low=0.0)
    check_group(fn, group)
    dtype = compute_dtype(image_features, text_features)
    plain = labels is None and smoothing == 0.0 and margin == 0.0
    with full_precision(image_features, text_features):
        f = normalize(image_features, dtype)
        g = normalize(text_features, dtype)
        local_batch = group is None or not is_distributed(group)
        if plain and local_batch:
            logits = (f * logit_scale) @ g.T  # [B, B]
            if logits.shape[0] == 0:  # empty batch: 0, connected to the inputs (zero gradient)
                return logits.sum()
            target = torch.arange(logits.shape[0], device=logits.device)
            return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        if local_batch:  # soft targets over the local batch; the mask is symmetric
            logits = (f * logit_scale) @ g.T  # [B, B]
            positive = positive_pairs(labels, f.shape[0], f.shape[0], None, f.device)
            if margin != 0.0:
                logits = logits + negative_shift(positive, logit_scale, margin, dtype)
            soft = _soft_targets(positive, smoothing, dtype)
            total = _soft_cross_entropy_sum(logits, soft) + _soft_cross_entropy_sum(logits.T, soft)
            return total / (2 * max(f.shape[0], 1))  # an empty batch: 0, connected
        # global batch: local rows against every rank's columns, row sums added over ranks; every
        # rank (an empty one included) reaches the same collectives in the same order
        both = all_gather_cat(torch.stack([f, g], dim=1), group)  # one gather for both towers
        f_all, g_all = both[:, 0], both[:, 1]
        n = f.shape[0]
        image_logits = (f * logit_scale) @ g_all.T  # [local, global]
        text_logits = (g * logit_scale) @ f_all.T
        if plain:
            target = rank_offset(n, group, device=f.device) + torch.arange(n, device=f.device)
            if n == 0:  # nothing to score here, but stay connected for the backward's collectives
                local = image_logits.sum() + text_logits.sum()
            else:
                local = F.cross_entropy(image_logits, target, reduction="sum") + F.cross_entropy(
                    text_logits, target, reduction="sum"
                )
        else:
            positive = positive_pairs(labels, n, f_all.shape[0], group, f.device)
            if margin != 0.0:
                shift = negative_shift(positive, logit_scale, margin, dtype)
                image_logits, text_logits = image_logits + shift, text_logits + shift
            soft = _soft_targets(positive, smoothing, dtype)  # rows: local, columns: global
            local = _soft_cross_entropy_sum(image_logits, soft) + _soft_cross_entropy_sum(
                text_logits, soft
            )
        total = all_reduce_sum(local.reshape(1), group)
        return total[0] / (2 * max(f_all.shape[0], 1))
