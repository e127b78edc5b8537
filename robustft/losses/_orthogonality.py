"""CaRot's orthogonality penalty on the visual projection (calibrated robust fine-tuning)."""

from __future__ import annotations

import torch
from torch import Tensor

from robustft._checks import check_floating, describe
from robustft._numerics import compute_dtype, full_precision

__all__ = ["orthogonality"]


def orthogonality(weight: Tensor, *, squared: bool = True) -> Tensor:
    r"""CaRot's orthogonality penalty: distance of a projection's Gram matrix to the identity.

    For a projection :math:`W \in \mathbb{R}^{m \times n}` (``weight``), the Gram matrix is taken
    over its **smaller** side, :math:`k = \min(m, n)`:

    .. math::

        G = \begin{cases} W^\top W & m \ge n \\ W W^\top & m < n \end{cases}
        \in \mathbb{R}^{k \times k}, \qquad
        R(W) = \big\| G - I_k \big\|_F^2 = \sum_{a,b} \big(G_{ab} - \delta_{ab}\big)^2

    (``squared=True``, the default: a smooth penalty whose gradient vanishes as :math:`W`
    becomes orthogonal), or :math:`\|G - I_k\|_F` (``squared=False``, what the official code
    adds to its loss). A non-negative penalty, 0 exactly when :math:`W` is semi-orthogonal
    (orthonormal columns if :math:`m \ge n`, orthonormal rows otherwise); in singular values,
    :math:`R = \sum_{i=1}^{k} (\sigma_i^2 - 1)^2`. The caller scales it: CaRot adds
    :math:`\lambda_{orth} R` to the fine-tuning loss (:math:`\lambda_{orth} = 0.2` in the
    official ImageNet script).

    **Which side.** open_clip's ViT ``model.visual.proj`` has shape ``[width, embed_dim]`` (768 ×
    512 for ViT-B/16) and is applied as ``x @ proj``; CaRot constrains ``proj.T @ proj``
    (``[embed_dim, embed_dim]``): orthonormal columns, the :math:`m \ge n` case. A ResNet's
    attention-pool output projection ``model.visual.attnpool.c_proj.weight`` is an
    ``nn.Linear`` weight, ``[out, in]`` (1024 × 2048 for RN50), applied as ``x @ weight.T``: the
    same constraint on ``weight.T`` is ``weight @ weight.T`` (``[out, out]``), the :math:`m < n`
    case. So pass either tensor as it is stored. Choosing the smaller side is what makes 0
    attainable: the larger Gram (``[2048, 2048]`` of rank 1024) keeps a squared distance of at
    least :math:`|m - n|` to the identity. For ``squared=True`` the two sides differ by exactly
    that constant (:math:`\|W W^\top - I_m\|_F^2 = \|W^\top W - I_n\|_F^2 + (m - n)` for
    :math:`m \ge n`), so the gradient is the same either way.

    The gradient is :math:`4 W (W^\top W - I)` (``squared=True``, :math:`m \ge n`); with
    ``squared=False`` it is that divided by :math:`2\sqrt{R}`, and 0 (not NaN) at an orthogonal
    :math:`W`. Computed directly from :math:`G - I` (no cancellation of
    :math:`\|G\|_F^2 - 2\,\mathrm{tr}\,G + k` near orthogonality), in float32 for bf16/fp16
    weights (also under ``torch.autocast``), float64 for float64; a per-step kernel: no value is
    read, it works under :func:`torch.func.grad` and ``torch.compile(fullgraph=True)``.

    **CaRot's self-distillation** is the other half of the method, and is composed from existing
    pieces: the teacher is an exponential moving average of the fine-tuned weights
    (:func:`robustft.averaging.ema`), and the student's image→text and text→image logits of the
    contrastive loss are distilled toward the teacher's with :func:`distillation`::

        avg = averaging.ema(0.9)
        teacher = avg.init(dict(model.named_parameters()))
        ...  # each step, with captions of the batch's images (FLYP's pairs)
        f, g = clip.image_features(model, None, x), clip.text_features(model, None, tokens)
        s = clip.logit_scale(model)
        with torch.no_grad():
            f0 = clip.image_features(model, teacher.average, x)
            g0 = clip.text_features(model, teacher.average, tokens)
            s0 = clip.logit_scale(model, params=teacher.average)
        loss = (
            losses.clip_contrastive(f, g, logit_scale=s)
            + 0.2 * losses.orthogonality(model.visual.proj)
            + 1.5 * (
                losses.distillation(s * f @ g.T, teacher_logits=s0 * f0 @ g0.T)
                + losses.distillation(s * g @ f.T, teacher_logits=s0 * g0 @ f0.T)
            )
        )
        ...
        if step % 500 == 0:
            teacher = avg.update_(teacher, dict(model.named_parameters()))

    (the official code's cross-entropy against the teacher's softmax differs from this KL by the
    teacher's entropy, a constant: same gradient; it ramps the EMA decay from 0.05 to 0.9 over the
    first 20 % of the steps, and its ImageNet script adds ``0.05 * ‖visual.proj @
    text_projection.T‖_F``.) The guide :doc:`/guide/choosing_a_loss` has the full recipe.

    Args:
        weight: ``[m, n]`` projection matrix (``model.visual.proj`` of an open_clip ViT, or
            ``model.visual.attnpool.c_proj.weight`` of a ResNet), with ``m, n >= 1``.
        squared: ``True`` (default) for the squared Frobenius norm, ``False`` for the Frobenius
            norm itself, as the official code computes it.

    Returns:
        0-d tensor (at least float32, also under autocast).

    Raises:
        TypeError: if ``weight`` is not a floating-point tensor or ``squared`` is not a bool.
        ValueError: if ``weight`` is not 2-d or has a dimension of size 0.

    Example:
        >>> orthogonality(torch.eye(3)[:, :2])  # orthonormal columns
        tensor(0.)
        >>> orthogonality(2 * torch.eye(2))  # G = 4 I: 2 * (4 - 1)^2
        tensor(18.)
        >>> orthogonality(2 * torch.eye(2), squared=False)  # sqrt(18)
        tensor(4.2426)

    References:
        Oh et al., "Towards Calibrated Robust Fine-Tuning of Vision-Language Models", NeurIPS
        2024 (the orthogonality constraint on the visual projection and the EMA
        self-distillation). Code: https://github.com/MLAI-Yonsei/CaRot
        (``src/models/carot_loss.py``, ``--l_orth_wv``)
    """
    fn = "orthogonality"
    check_floating(fn, "weight", weight, ndim=2)
    if 0 in weight.shape:
        raise ValueError(
            f"{fn}: weight must have non-empty dimensions, got shape {tuple(weight.shape)}"
        )
    if not isinstance(squared, bool):
        raise TypeError(f"{fn}: squared must be a bool, got {describe(squared)}")
    dtype = compute_dtype(weight)
    with full_precision(weight):
        w = weight.to(dtype)
        gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T  # [k, k], k = min(m, n)
        eye = torch.eye(gram.shape[0], dtype=dtype, device=gram.device)
        if squared:
            return (gram - eye).square().sum()
        return torch.linalg.vector_norm(gram - eye)
