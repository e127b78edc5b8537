"""SigLIP's pairwise sigmoid loss: FLYP-style fine-tuning of sigmoid-trained CLIP models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from robustft._checks import check_group, check_scalar
from robustft._numerics import compute_dtype, full_precision, normalize
from robustft.distributed import all_gather_cat, all_reduce_sum, is_distributed, rank_offset
from robustft.losses._common import check_pair
from robustft.typing import Group, Scalar

__all__ = ["sigmoid_contrastive"]


def _pair_losses_sum(f: Tensor, g: Tensor, offset: int, scale: Scalar, bias: Scalar) -> Tensor:
    r""":math:`\sum_{i,j} -\log\sigma(z_{ij}\,(s\langle f_i, g_j\rangle + b))` over the rows of ``f``.

    Row ``i`` of ``f`` is paired with column ``offset + i`` of ``g`` (:math:`z = 1`); every other
    column is a negative (:math:`z = -1`). Branch-free: the labels are an index comparison.
    """
    logits = (f * scale) @ g.T + bias  # [rows, columns]
    rows = torch.arange(f.shape[0], device=f.device) + offset
    positive = torch.arange(g.shape[0], device=f.device)[None, :] == rows[:, None]
    return -F.logsigmoid(torch.where(positive, logits, -logits)).sum()


def sigmoid_contrastive(
    image_features: Tensor,
    text_features: Tensor,
    *,
    logit_scale: Scalar,
    logit_bias: Scalar,
    group: Group = None,
) -> Tensor:
    r"""SigLIP's sigmoid loss over matched (image, text) pairs; FLYP for sigmoid-trained models.

    With :math:`\hat x_i`, :math:`\hat y_j` the L2-normalised image and text features, every
    (image, text) pair of the batch is an independent binary classification, positive for the
    matched pair and negative for all others:

    .. math::

        L = -\frac{1}{B} \sum_{i=1}^{B} \sum_{j=1}^{B}
            \log \sigma\big(z_{ij}\,(t\,\langle \hat x_i, \hat y_j\rangle + b)\big),
        \qquad z_{ij} = \begin{cases} 1 & i = j \\ -1 & i \neq j \end{cases}

    with :math:`\sigma` the logistic function, :math:`t` the ``logit_scale`` and :math:`b` the
    ``logit_bias``. Normalised by the batch size :math:`B`, not by the :math:`B^2` pairs, as in the
    paper and open_clip's ``SigLipLoss``. For FLYP-style fine-tuning of a SigLIP model the text of
    pair :math:`i` is a templated caption of image :math:`i`'s class (as for
    :func:`clip_contrastive`), and :math:`t` and :math:`b` are the model's own, trained along. A
    non-negative penalty; computed exactly with :func:`torch.nn.functional.logsigmoid` (finite
    for logits of any size). The loss couples samples (no per-sample reduction); the two feature
    arguments play symmetric roles (swapping them gives the same loss), so both are positional.
    An empty batch gives 0 with a zero gradient, as every loss's ``"mean"`` does.

    **Scale and bias.** ``logit_scale`` is the scale :math:`t` itself, not its log: open_clip's
    SigLIP models store :math:`\log t` as ``model.logit_scale`` (pass
    ``model.logit_scale.exp()`` or :func:`robustft.clip.logit_scale`) and :math:`b` as
    ``model.logit_bias`` (pass it as it is). Both are required: SigLIP initialises them at
    :math:`t = 10`, :math:`b = -10` for training from scratch, and a pre-trained model has learned
    other values (a fine-tune should start from those). Either may be a 0-d tensor that requires
    grad, to train it.

    **Data parallelism.** Without ``group`` the negatives are the local batch. With ``group``
    (e.g. ``torch.distributed.group.WORLD``) :math:`B` is the *global* batch: each rank gathers
    every rank's text features (:func:`robustft.distributed.all_gather_cat`, differentiable,
    uneven batch sizes allowed), scores its own images against all texts (``[local, global]``
    logits), and the sums are added over ranks (:func:`robustft.distributed.all_reduce_sum`).
    Every rank returns the global loss :math:`L`, and the rank-averaged gradient (what DDP
    applies) equals the single-process gradient of :math:`L` on the concatenated batch, for
    uneven local batches too. open_clip's ``SigLipLoss`` returns on each rank the sum over its
    local rows divided by the *local* batch size: with equal local batches its DDP-averaged
    gradient is the same as ours, and the mean of its per-rank values is our :math:`L`. A rank
    whose local batch is empty takes part in every collective like the others (and gets the
    global loss and a zero-size gradient); every rank must call the loss and its backward.

    Args:
        image_features: ``[batch, dim]`` raw image features.
        text_features: ``[batch, dim]`` raw text features, row :math:`i` paired with image
            :math:`i`.
        logit_scale: :math:`t > 0`, a finite real number or a 0-d floating tensor: the *scale*,
            ``model.logit_scale.exp()`` of an open_clip SigLIP model.
        logit_bias: :math:`b`, a finite real number or a 0-d floating tensor:
            ``model.logit_bias`` of an open_clip SigLIP model (negative, around -10 or below;
            a model built with ``nonscalar_logit_scale=True`` stores one-element parameters:
            pass ``model.logit_bias.reshape(())``).
        group: a ``torch.distributed`` process group whose global batch supplies the negatives,
            or ``None`` (local batch).

    Returns:
        0-d tensor (at least float32, also under autocast).

    Raises:
        TypeError: if an input is not a floating-point tensor, ``logit_scale`` or ``logit_bias``
            is not a real number or 0-d floating tensor, or ``group`` is not a process group.
        ValueError: on wrong ranks, mismatched shapes, an empty feature axis, a ``logit_scale``
            that is not finite and > 0, or a ``logit_bias`` that is not finite.

    Example:
        >>> pairs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> loss = sigmoid_contrastive(pairs, pairs, logit_scale=1.0, logit_bias=0.0)
        >>> # per image: -log σ(1) for its own text, -log σ(-0) = log 2 for the other one
        >>> torch.allclose(loss, -F.logsigmoid(torch.tensor(1.0)) - F.logsigmoid(torch.tensor(0.0)))
        True

    References:
        Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (SigLIP), ICCV 2023. Code:
        https://github.com/google-research/big_vision (``big_vision/trainers/proj/image_text/
        siglip.py``) and https://github.com/mlfoundations/open_clip (``SigLipLoss`` in
        ``src/open_clip/loss.py``). Fine-tuning with the pre-training loss: Goyal et al.,
        "Finetune like you pretrain" (FLYP), CVPR 2023, https://github.com/locuslab/FLYP
    """
    fn = "sigmoid_contrastive"
    check_pair(fn, "image_features", image_features, "text_features", text_features)
    logit_scale = check_scalar(fn, "logit_scale", logit_scale, positive=True)
    logit_bias = check_scalar(fn, "logit_bias", logit_bias)
    check_group(fn, group)
    dtype = compute_dtype(image_features, text_features)
    with full_precision(image_features, text_features):
        f = normalize(image_features, dtype)
        g = normalize(text_features, dtype)
        if group is None or not is_distributed(group):
            total = _pair_losses_sum(f, g, 0, logit_scale, logit_bias)
            return total / max(f.shape[0], 1)  # an empty batch: 0, connected (zero gradient)
        # global batch: local images against every rank's texts, sums added over ranks; every
        # rank (an empty one included) reaches the same collectives in the same order
        g_all = all_gather_cat(g, group)
        offset = rank_offset(f.shape[0], group, device=f.device)
        local = _pair_losses_sum(f, g_all, offset, logit_scale, logit_bias)
        total = all_reduce_sum(local.reshape(1), group)
        return total[0] / max(g_all.shape[0], 1)
