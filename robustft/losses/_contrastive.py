"""The symmetric CLIP contrastive loss (FLYP: fine-tune like you pre-train)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from robustft._checks import check_group, check_scalar
from robustft._numerics import compute_dtype, full_precision, normalize
from robustft.distributed import all_gather_cat, all_reduce_sum, is_distributed, rank_offset
from robustft.losses._common import check_pair
from robustft.typing import Group, Scalar

__all__ = ["clip_contrastive"]


def clip_contrastive(
    image_features: Tensor,
    text_features: Tensor,
    *,
    logit_scale: Scalar = 100.0,
    group: Group = None,
) -> Tensor:
    r"""Symmetric CLIP contrastive loss over matched (image, text) pairs; FLYP's objective.

    With :math:`\hat f_i`, :math:`\hat g_j` the L2-normalised image and text features of pair
    :math:`i`, :math:`j` and :math:`S_{ij} = s\,\langle \hat f_i, \hat g_j\rangle`:

    .. math::

        L = \frac{1}{2B} \sum_{i=1}^{B} \Big(
              -\log \frac{e^{S_{ii}}}{\sum_j e^{S_{ij}}}
              -\log \frac{e^{S_{ii}}}{\sum_j e^{S_{ji}}} \Big)

    the mean of the image→text and text→image cross-entropies with the other pairs of the batch as
    negatives. For FLYP the text of pair :math:`i` is a templated caption of image :math:`i`'s
    class (``"a photo of a {class}."``), encoded by the (trained) text tower. The loss couples
    samples, so there is no per-sample reduction. The two arguments play symmetric roles (swapping
    them gives the same loss), so both are positional. An empty batch gives 0 with a zero
    gradient, as every loss's ``"mean"`` does.

    **Data parallelism.** Without ``group`` the negatives are the local batch. With ``group``
    (e.g. ``torch.distributed.group.WORLD``) :math:`B` is the *global* batch: each rank gathers
    every rank's features (:func:`robustft.distributed.all_gather_cat`, differentiable, uneven
    batch sizes allowed), scores its own rows against all columns, and the row sums are added over
    ranks (:func:`robustft.distributed.all_reduce_sum`). Every rank returns the global loss, and
    the rank-averaged gradient (what DDP applies) equals the single-process gradient on the
    concatenated batch. Memory per rank is ``[local, global]`` logits, not ``[global, global]``.
    A rank whose local batch is empty takes part in every collective like the others (and gets
    the global loss and a zero-size gradient); every rank must call the loss and its backward.

    Args:
        image_features: ``[batch, dim]`` raw image features.
        text_features: ``[batch, dim]`` raw text features, row :math:`i` paired with image
            :math:`i`.
        logit_scale: :math:`s > 0`, a finite real number or a 0-d tensor: the *scale* itself (100
            for OpenAI CLIP), i.e. the exponential of open_clip's ``model.logit_scale`` parameter,
            which stores its log; :func:`robustft.clip.logit_scale` returns it from a model (pass
            ``model.logit_scale.exp()`` to train the scale, as CLIP and FLYP do).
        group: a ``torch.distributed`` process group whose global batch supplies the negatives,
            or ``None`` (local batch).

    Returns:
        0-d tensor (at least float32, also under autocast).

    Raises:
        TypeError: if an input is not a floating-point tensor, ``logit_scale`` is not a real number
            or 0-d floating tensor, or ``group`` is not a process group.
        ValueError: on wrong ranks, mismatched shapes, an empty feature axis or a ``logit_scale``
            that is not finite and > 0.

    Example:
        >>> pairs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> loss = clip_contrastive(pairs, pairs, logit_scale=1.0)
        >>> torch.allclose(loss, torch.log1p(torch.exp(torch.tensor(-1.0))))
        True

    References:
        Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
        ICML 2021 (code: https://github.com/mlfoundations/open_clip); Goyal et al., "Finetune like
        you pretrain: Improved finetuning of zero-shot vision models" (FLYP), CVPR 2023.
        Code: https://github.com/locuslab/FLYP
    """
    fn = "clip_contrastive"
    check_pair(fn, "image_features", image_features, "text_features", text_features)
    logit_scale = check_scalar(fn, "logit_scale", logit_scale, positive=True)
    check_group(fn, group)
    dtype = compute_dtype(image_features, text_features)
    with full_precision(image_features, text_features):
        f = normalize(image_features, dtype)
        g = normalize(text_features, dtype)
        if group is None or not is_distributed(group):
            logits = (f * logit_scale) @ g.T  # [B, B]
            if logits.shape[0] == 0:  # empty batch: 0, connected to the inputs (zero gradient)
                return logits.sum()
            target = torch.arange(logits.shape[0], device=logits.device)
            return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        # global batch: local rows against every rank's columns, row sums added over ranks; every
        # rank (an empty one included) reaches the same three collectives in the same order
        both = all_gather_cat(torch.stack([f, g], dim=1), group)  # one gather for both towers
        f_all, g_all = both[:, 0], both[:, 1]
        n = f.shape[0]
        target = rank_offset(n, group, device=f.device) + torch.arange(n, device=f.device)
        image_logits = (f * logit_scale) @ g_all.T  # [local, global]
        text_logits = (g * logit_scale) @ f_all.T
        if n == 0:  # nothing to score here, but stay connected for the backward's collectives
            local = image_logits.sum() + text_logits.sum()
        else:
            local = F.cross_entropy(image_logits, target, reduction="sum") + F.cross_entropy(
                text_logits, target, reduction="sum"
            )
        total = all_reduce_sum(local.reshape(1), group)
        return total[0] / (2 * max(f_all.shape[0], 1))
