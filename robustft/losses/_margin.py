"""CLIPood's margin metric softmax (MMS): class-adaptive margins from text-feature distances."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from robustft._checks import (
    apply_reduction,
    check_floating,
    check_labels,
    check_number,
    check_reduction,
    check_same_size,
    check_scalar,
)
from robustft._numerics import compute_dtype, full_precision, normalize
from robustft.losses._common import (
    check_features,
    check_label_values,
    check_rows,
    nan_where_invalid,
    safe_labels,
)
from robustft.typing import Reduction, Scalar

__all__ = ["margin_metric_logits", "margin_metric_softmax", "text_distances"]

_EPS = 1e-12  # F.normalize's default


def text_distances(text_features: Tensor) -> Tensor:
    r"""The class-by-class text-feature distance matrix MMS draws its margins from.

    .. math:: D_{jc} = 1 - \cos(T_j, T_c), \qquad D_{cc} = 0

    Compute it once per classification head (the text features are frozen) and pass it to
    :func:`margin_metric_softmax` / :func:`margin_metric_logits` as ``text_distances=``; each step
    then gathers one row per sample instead of recomputing anything. A zero-norm text feature has
    cosine 0 with every class (``F.normalize``'s convention), so distance 1 to every *other* class
    and, like every class, 0 to itself.

    Args:
        text_features: ``[classes, dim]`` raw text features of the class prompts.

    Returns:
        ``[classes, classes]`` symmetric distances in :math:`[0, 2]` with a zero diagonal, in the
        features' dtype (at least float32).

    Raises:
        TypeError: if ``text_features`` is not a floating-point tensor.
        ValueError: if it is not 2-d or its feature axis is empty.

    Example:
        >>> text_distances(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        tensor([[0., 1.],
                [1., 0.]])

    References:
        Shu et al., "CLIPood: Generalizing CLIP to Out-of-Distributions", ICML 2023.
        Code: https://github.com/thuml/CLIPood
    """
    check_features("text_distances", "text_features", text_features)
    with full_precision(text_features):
        t = normalize(text_features, compute_dtype(text_features))
        dist = 1.0 - t @ t.T
    eye = torch.eye(t.shape[0], dtype=torch.bool, device=t.device)
    return dist.masked_fill(eye, 0.0)


def _validate(
    fn: str,
    image_features: Any,
    text_features: Any,
    labels: Any,
    margin: Any,
    logit_scale: Any,
    distances: Any,
) -> tuple[Tensor, Scalar, Scalar, bool]:
    """Check every argument; return int64 labels, the scalars and whether the labels were read."""
    check_features(fn, "image_features", image_features)
    check_features(fn, "text_features", text_features)
    check_same_size(fn, "image_features", image_features, 1, "text_features", text_features, 1)
    labels = check_labels(fn, "labels", labels, batch=image_features.shape[0])
    margin = check_number(fn, "margin", margin, low=0.0, allow_tensor=True)
    logit_scale = check_scalar(fn, "logit_scale", logit_scale, positive=True)
    check_rows(fn, "text_features", text_features, "class")
    num_classes = int(text_features.shape[0])
    if distances is not None:
        check_floating(fn, "text_distances", distances, ndim=2)
        if tuple(distances.shape) != (num_classes, num_classes):
            raise ValueError(
                f"{fn}: text_distances must have shape ({num_classes}, {num_classes}) "
                f"(classes x classes, from robustft.losses.text_distances), got shape "
                f"{tuple(distances.shape)}"
            )
    checked = check_label_values(fn, "labels", labels, num_classes)
    return labels, margin, logit_scale, checked


def _logits(
    image_features: Tensor,
    text_features: Tensor,
    labels: Tensor,
    margin: Scalar,
    logit_scale: Scalar,
    distances: Tensor | None,
    *,
    exact: bool,
    labels_checked: bool,
) -> Tensor:
    """MMS logits; with ``exact=False`` rows may be shifted by a constant (enough for the CE)."""
    num_classes = text_features.shape[0]
    dtype = compute_dtype(image_features, text_features)
    t = normalize(text_features, dtype)
    y = labels if labels_checked else safe_labels(labels, num_classes)
    x = image_features.to(dtype)
    # s·f̂ in one pass: x · (s / ‖x‖), with F.normalize's ε
    fs = x * (logit_scale / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(_EPS))
    if distances is None:
        # s·(f̂ − λT̂_y)·T̂ᵀ: one matmul and a row gather of T̂, no C×C matrix. Its true-class
        # entry carries λ(1 − ‖T̂_y‖²), which is 0 for a unit T̂_y but λ for a zero-norm one; the
        # correction below (O(batch)) gives the true class no margin in every case, as the
        # distance matrix's zero diagonal does, so both paths agree on every input.
        t_y = t.index_select(0, y)
        coef = logit_scale * margin
        if isinstance(coef, Tensor):
            shifted = fs - coef * t_y
        else:
            shifted = torch.add(fs, t_y, alpha=-float(coef))
        z = shifted @ t.T
        excess = (1.0 - t_y.square().sum(-1)) * coef  # [B]: 0 up to rounding for unit rows
        z = z.scatter_add_(1, y[:, None], -excess[:, None])  # z is fresh: in place is safe
        return z + coef if exact else z
    rows = distances.to(dtype).index_select(0, y)  # [B, C]: 1 − cos(T_y, T_c)
    if isinstance(logit_scale, Tensor) or isinstance(margin, Tensor):
        return fs @ t.T + rows * (logit_scale * margin)
    return torch.addmm(rows, fs, t.T, beta=float(logit_scale * margin))


def margin_metric_logits(
    image_features: Tensor,
    text_features: Tensor,
    labels: Tensor,
    *,
    margin: Scalar = 0.3,
    logit_scale: Scalar = 100.0,
    text_distances: Tensor | None = None,
) -> Tensor:
    r"""CLIPood's margin logits: cosine logits plus a margin that grows with text distance.

    .. math::

        z_{bc} = s\,\Big(\cos(f_b, T_c) + \lambda\,\big(1 - \cos(T_{y_b}, T_c)\big)\Big)

    with :math:`s` the ``logit_scale`` and :math:`\lambda` the ``margin``. The true class carries no
    margin, even when its text feature has zero norm (then every cosine with it is 0, and the
    paths with and without ``text_distances`` agree). Computed without a ``[classes, classes]`` matrix as
    :math:`s\,(\hat f_b - \lambda \hat T_{y_b})\cdot\hat T^\top + s\lambda`
    (the official code's form plus the constant that makes it the paper's logits), or by gathering
    rows of a precomputed :func:`text_distances` matrix.

    Labels outside ``[0, classes)`` (unknown classes) raise ``ValueError`` for CPU tensors in eager
    mode; elsewhere (accelerators, ``torch.func``, ``torch.compile``) no value is read and the
    logits of such rows are computed against a clamped label, so use :func:`margin_metric_softmax`
    (which turns them into NaN) or filter unknown samples out first.

    Args:
        image_features: ``[batch, dim]`` raw image features.
        text_features: ``[classes, dim]`` raw text features of the class prompts (frozen in CLIPood).
        labels: ``[batch]`` labels in ``[0, classes)``, any integer dtype.
        margin: :math:`\lambda \ge 0` (CLIPood: 0.3), a finite real number or a 0-d tensor.
        logit_scale: :math:`s > 0` (CLIPood: 100), a finite real number or a 0-d tensor: the
            *scale* itself, i.e. the exponential of open_clip's ``model.logit_scale`` parameter,
            which stores its log; :func:`robustft.clip.logit_scale` returns it from a model.
        text_distances: optional ``[classes, classes]`` matrix from :func:`text_distances` of the
            same ``text_features``.

    Returns:
        ``[batch, classes]`` logits, in the inputs' dtype (at least float32, also under autocast).

    Raises:
        TypeError: if features are not floating-point or labels not integer tensors, or a scalar
            is not a real number or 0-d floating tensor.
        ValueError: on wrong ranks, mismatched sizes, an empty feature axis, no classes, a
            ``margin`` that is not finite and >= 0, a ``logit_scale`` that is not finite and > 0, a
            ``text_distances`` of the wrong shape, or (CPU, eager) labels out of range.

    Example:
        >>> f = torch.tensor([[1.0, 0.0]])
        >>> text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> margin_metric_logits(f, text, torch.tensor([0]), margin=0.5, logit_scale=2.0)
        tensor([[2., 1.]])

    References:
        Shu et al., "CLIPood: Generalizing CLIP to Out-of-Distributions", ICML 2023.
        Code: https://github.com/thuml/CLIPood
    """
    fn = "margin_metric_logits"
    labels, margin, logit_scale, checked = _validate(
        fn, image_features, text_features, labels, margin, logit_scale, text_distances
    )
    with full_precision(image_features, text_features):
        return _logits(
            image_features,
            text_features,
            labels,
            margin,
            logit_scale,
            text_distances,
            exact=True,
            labels_checked=checked,
        )


def margin_metric_softmax(
    image_features: Tensor,
    text_features: Tensor,
    labels: Tensor,
    *,
    margin: Scalar = 0.3,
    logit_scale: Scalar = 100.0,
    reduction: Reduction = "mean",
    text_distances: Tensor | None = None,
) -> Tensor:
    r"""CLIPood's margin metric softmax (MMS) loss: cross-entropy of the margin logits.

    .. math::

        \ell_b = -\log \frac{\exp z_{b y_b}}{\sum_c \exp z_{bc}}, \qquad
        z_{bc} = s\,\Big(\cos(f_b, T_c) + \lambda\,\big(1 - \cos(T_{y_b}, T_c)\big)\Big)

    (see :func:`margin_metric_logits`). Cross-entropy is invariant to a constant shift of a row, so
    the loss is computed from the official form :math:`s\,(\hat f_b - \lambda\hat T_{y_b})\cdot
    \hat T^\top` (one matmul); it is identical to the paper's. With ``margin=0`` it is the plain
    CLIP cross-entropy ``F.cross_entropy(s * cos, labels)``.

    Unknown-class labels (outside ``[0, classes)``) have no supervised loss: for CPU tensors in
    eager mode they raise ``ValueError``; elsewhere (accelerators, ``torch.func``,
    ``torch.compile``) no value is read (no host sync) and the per-sample loss of such a sample is
    NaN, so it cannot pass silently. Filter unknown samples out before calling.

    Args:
        image_features: ``[batch, dim]`` raw image features.
        text_features: ``[classes, dim]`` raw text features of the class prompts.
        labels: ``[batch]`` labels in ``[0, classes)``, any integer dtype.
        margin: :math:`\lambda \ge 0` (CLIPood: 0.3), a finite real number or a 0-d tensor.
        logit_scale: :math:`s > 0` (CLIPood: 100), a finite real number or a 0-d tensor: the
            *scale* itself, i.e. the exponential of open_clip's ``model.logit_scale`` parameter,
            which stores its log; :func:`robustft.clip.logit_scale` returns it from a model.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per sample ``[batch]``). An empty batch
            gives 0 (``"mean"``, ``"sum"``) or ``[0]``, with a zero gradient.
        text_distances: optional ``[classes, classes]`` matrix from :func:`text_distances`.

    Returns:
        0-d tensor, or ``[batch]`` with ``reduction="none"`` (at least float32, also under
        autocast).

    Raises:
        TypeError: if features are not floating-point or labels not integer tensors, or a scalar
            is not a real number or 0-d floating tensor.
        ValueError: on wrong ranks, mismatched sizes, an empty feature axis, no classes, a
            ``margin`` that is not finite and >= 0, a ``logit_scale`` that is not finite and > 0, a
            ``text_distances`` of the wrong shape, an unknown ``reduction``, or (CPU, eager) labels
            out of range.

    Example:
        >>> f = torch.tensor([[1.0, 0.0]])
        >>> text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> loss = margin_metric_softmax(f, text, torch.tensor([0]), margin=0.5, logit_scale=2.0)
        >>> torch.allclose(loss, torch.log1p(torch.exp(torch.tensor(-1.0))))  # z = [2, 1]
        True

    References:
        Shu et al., "CLIPood: Generalizing CLIP to Out-of-Distributions", ICML 2023.
        Code: https://github.com/thuml/CLIPood
    """
    fn = "margin_metric_softmax"
    labels, margin, logit_scale, checked = _validate(
        fn, image_features, text_features, labels, margin, logit_scale, text_distances
    )
    check_reduction(fn, reduction)
    with full_precision(image_features, text_features):
        z = _logits(
            image_features,
            text_features,
            labels,
            margin,
            logit_scale,
            text_distances,
            exact=False,
            labels_checked=checked,
        )
        if checked:  # values read on the host and valid: nothing to mark
            per_sample = F.cross_entropy(z, labels, reduction="none")
        else:  # not read (accelerator, torch.func, compile): unknown labels give NaN, branch-free
            num_classes = text_features.shape[0]
            per_sample = F.cross_entropy(z, safe_labels(labels, num_classes), reduction="none")
            per_sample = nan_where_invalid(per_sample, labels, num_classes)
    return apply_reduction(fn, per_sample, reduction)
