"""SigLIP's pairwise sigmoid loss (FLYP-style fine-tuning of SigLIP), with labels, smoothing, margin."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from robustft._checks import check_group, check_number, check_scalar
from robustft._numerics import compute_dtype, full_precision, normalize
from robustft.distributed import all_gather_cat, all_reduce_sum, is_distributed
from robustft.losses._common import check_pair
from robustft.losses._contrastive import check_pair_labels, negative_shift, positive_pairs
from robustft.typing import Group, Scalar

__all__ = ["sigmoid_contrastive"]


def _pair_losses_sum(
    f: Tensor,
    g: Tensor,
    positive: Tensor,
    scale: Scalar,
    bias: Scalar,
    *,
    smoothing: float = 0.0,
    margin: float = 0.0,
) -> Tensor:
    r""":math:`\sum_{i,j}` of the pairwise binary losses over the rows of ``f`` and columns of ``g``.

    ``positive[i, j]`` marks the positive pairs (:math:`z = 1`), every other pair is a negative.
    Hard targets (``smoothing = 0``): :math:`-\log\sigma(\pm\ell_{ij})`; soft targets
    :math:`y_{ij}`: :math:`-y_{ij}\log\sigma(\ell_{ij}) - (1 - y_{ij})\log\sigma(-\ell_{ij})`.
    Branch-free: the mask selects, nothing is indexed by value.
    """
    logits = (f * scale) @ g.T + bias  # [rows, columns]
    if margin != 0.0:
        logits = logits + negative_shift(positive, scale, margin, logits.dtype)
    if smoothing == 0.0:
        return -F.logsigmoid(torch.where(positive, logits, -logits)).sum()
    target = positive.to(logits.dtype) * (1 - 2 * smoothing) + smoothing  # 1 - ε or ε
    return -(target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits)).sum()


def sigmoid_contrastive(
    image_features: Tensor,
    text_features: Tensor,
    *,
    logit_scale: Scalar,
    logit_bias: Scalar,
    labels: Tensor | None = None,
    smoothing: float = 0.0,
    margin: float = 0.0,
    group: Group = None,
) -> Tensor:
    r"""SigLIP's sigmoid loss over (image, text) pairs; FLYP for sigmoid-trained models.

    With :math:`\hat x_i`, :math:`\hat y_j` the L2-normalised image and text features, every
    (image, text) pair of the batch is an independent binary classification, positive
    (:math:`P_{ij} = 1`) for the matched pair, or with ``labels`` for every pair of the same class
    (``labels[i] == labels[j]``), and negative (:math:`P_{ij} = 0`) for all others:

    .. math::

        \ell_{ij} = t\,\big(\langle \hat x_i, \hat y_j\rangle + \delta\,(1 - P_{ij})\big) + b,
        \qquad y_{ij} = (1 - \varepsilon)\,P_{ij} + \varepsilon\,(1 - P_{ij}),

    .. math::

        L = -\frac{1}{B} \sum_{i=1}^{B} \sum_{j=1}^{B}
            \Big(y_{ij} \log \sigma(\ell_{ij}) + (1 - y_{ij}) \log \sigma(-\ell_{ij})\Big)

    with :math:`\sigma` the logistic function, :math:`t` the ``logit_scale``, :math:`b` the
    ``logit_bias``, :math:`\varepsilon` ``smoothing`` and :math:`\delta` ``margin``. With the
    defaults (no labels, :math:`\varepsilon = \delta = 0`) this is SigLIP's loss
    :math:`-\frac1B \sum_{ij} \log \sigma(z_{ij}(t\langle \hat x_i, \hat y_j\rangle + b))` with
    :math:`z_{ii} = 1`, :math:`z_{i \ne j} = -1` (computed exactly as before). Normalised by the
    batch size :math:`B`, not by the :math:`B^2` pairs, as in the paper and open_clip's
    ``SigLipLoss``. For FLYP-style fine-tuning of a SigLIP model the text of pair :math:`i` is a
    templated caption of image :math:`i`'s class (as for :func:`clip_contrastive`), and
    :math:`t` and :math:`b` are the model's own, trained along. A non-negative penalty; computed
    exactly with :func:`torch.nn.functional.logsigmoid` (finite for logits of any size). The
    loss couples samples (no per-sample reduction); the two feature arguments play symmetric
    roles (swapping them gives the same loss, with labels too), so both are positional. An empty
    batch gives 0 with a zero gradient, as every loss's ``"mean"`` does.

    **Multiple positives, smoothing, margin** (the sigmoid counterparts of R-Adapter's MPM-NCE,
    see :func:`clip_contrastive`). With ``labels`` a same-class caption is a positive, not a
    negative. Smoothing makes the binary targets soft: :math:`1 - \varepsilon` for a positive,
    :math:`\varepsilon` for a negative, with :math:`\varepsilon < 1/2` (at :math:`1/2` every
    target is :math:`1/2` and the loss no longer tells positives from negatives; above, it would
    swap them). The margin :math:`\delta \ge 0` is the same cosine shift on every negative pair
    as in :func:`clip_contrastive`, inside the sigmoid: a negative is pushed until its cosine is
    :math:`\delta` below where it would otherwise stop. Labels are only compared for equality
    (any integer ids): drop unknown-class samples (labelled ``-1``) first.

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
    global loss and a zero-size gradient); every rank must call the loss and its backward, with
    the same choice of ``labels`` (all ranks or none, gathered like the text features so that
    the positives come from the global batch), ``smoothing`` and ``margin``.

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
        labels: ``[batch]`` integer class ids of the pairs (any integer dtype, on the features'
            device), or ``None`` (only the matched pairs are positives).
        smoothing: :math:`\varepsilon \in [0, 1/2)`, a real number: the soft binary targets
            :math:`1 - \varepsilon` (positives) and :math:`\varepsilon` (negatives).
        margin: :math:`\delta \ge 0`, a finite real number: added to the cosine of every
            negative pair.
        group: a ``torch.distributed`` process group whose global batch supplies the negatives
            and positives, or ``None`` (local batch).

    Returns:
        0-d tensor (at least float32, also under autocast).

    Raises:
        TypeError: if an input is not a floating-point tensor, ``labels`` is not an integer
            tensor, ``logit_scale`` or ``logit_bias`` is not a real number or 0-d floating
            tensor, ``smoothing`` or ``margin`` is not a real number, or ``group`` is not a
            process group.
        ValueError: on wrong ranks, mismatched shapes, an empty feature axis, ``labels`` of
            another length or device, a ``logit_scale`` that is not finite and > 0, a
            ``logit_bias`` that is not finite, a ``smoothing`` outside :math:`[0, 1/2)` or a
            ``margin`` that is not finite and >= 0.

    Example:
        >>> pairs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> loss = sigmoid_contrastive(pairs, pairs, logit_scale=1.0, logit_bias=0.0)
        >>> # per image: -log σ(1) for its own text, -log σ(-0) = log 2 for the other one
        >>> torch.allclose(loss, -F.logsigmoid(torch.tensor(1.0)) - F.logsigmoid(torch.tensor(0.0)))
        True
        >>> # one class: each image has two positive texts, at logits 1 - 0.5 and 0 - 0.5
        >>> same = sigmoid_contrastive(
        ...     pairs, pairs, logit_scale=1.0, logit_bias=-0.5, labels=torch.tensor([3, 3])
        ... )
        >>> u = torch.tensor([0.5, -0.5])
        >>> torch.allclose(same, -F.logsigmoid(u).sum())
        True

    References:
        Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (SigLIP), ICCV 2023. Code:
        https://github.com/google-research/big_vision (``big_vision/trainers/proj/image_text/
        siglip.py``) and https://github.com/mlfoundations/open_clip (``SigLipLoss`` in
        ``src/open_clip/loss.py``). Fine-tuning with the pre-training loss: Goyal et al.,
        "Finetune like you pretrain" (FLYP), CVPR 2023, https://github.com/locuslab/FLYP.
        Multiple positives, smoothing and the negative margin: Kim et al., "Efficient and
        Versatile Robust Fine-Tuning of Zero-shot Models" (R-Adapter's MPM-NCE, written there
        for the softmax loss), ECCV 2024, arXiv:2408.05749, code:
        https://cvlab.postech.ac.kr/research/R-Adapter/
    """
    fn = "sigmoid_contrastive"
    check_pair(fn, "image_features", image_features, "text_features", text_features)
    logit_scale = check_scalar(fn, "logit_scale", logit_scale, positive=True)
    logit_bias = check_scalar(fn, "logit_bias", logit_bias)
    labels = check_pair_labels(fn, labels, image_features)
    smoothing = check_number(fn, "smoothing", smoothing, low=0.0, high=0.5, high_inclusive=False)
    margin = check_number(fn, "margin", margin, low=0.0)
    check_group(fn, group)
    dtype = compute_dtype(image_features, text_features)
    hyper = {"smoothing": smoothing, "margin": margin}
    with full_precision(image_features, text_features):
        f = normalize(image_features, dtype)
        g = normalize(text_features, dtype)
        if group is None or not is_distributed(group):
            positive = positive_pairs(labels, f.shape[0], g.shape[0], None, f.device)
            total = _pair_losses_sum(f, g, positive, logit_scale, logit_bias, **hyper)
            return total / max(f.shape[0], 1)  # an empty batch: 0, connected (zero gradient)
        # global batch: local images against every rank's texts, sums added over ranks; every
        # rank (an empty one included) reaches the same collectives in the same order
        g_all = all_gather_cat(g, group)
        positive = positive_pairs(labels, f.shape[0], g_all.shape[0], group, f.device)
        local = _pair_losses_sum(f, g_all, positive, logit_scale, logit_bias, **hyper)
        total = all_reduce_sum(local.reshape(1), group)
        return total[0] / max(g_all.shape[0], 1)
