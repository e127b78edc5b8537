r"""TPT and C-TPT: confident-view selection, marginal entropy, text-feature dispersion, view stacks."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from robustft._checks import (
    apply_reduction,
    check_floating,
    check_int,
    check_number,
    check_reduction,
    check_scalar,
    check_tensor,
    describe,
)
from robustft._numerics import compute_dtype, full_precision, normalize, zero_neginf
from robustft._numerics import entropy as _entropy
from robustft.typing import Scalar

__all__ = [
    "confident_views",
    "ctpt_loss",
    "marginal_entropy",
    "text_dispersion",
    "tpt_loss",
    "views",
]


def _check_views(fn: str, name: str, logits: Any, ndim: tuple[int, ...] | None = None) -> Tensor:
    """``[..., views, classes]`` floating logits with at least one view and one class."""
    check_floating(fn, name, logits)
    if ndim is not None and logits.ndim not in ndim:
        what = " or ".join(str(n) for n in ndim)
        raise ValueError(
            f"{fn}: {name} must have {what} dimensions ([views, classes] or [images, views, "
            f"classes]), got shape {tuple(logits.shape)}"
        )
    if logits.ndim < 2:
        raise ValueError(
            f"{fn}: {name} must have at least 2 dimensions ([..., views, classes]), got shape "
            f"{tuple(logits.shape)}"
        )
    if logits.shape[-2] == 0 or logits.shape[-1] == 0:
        raise ValueError(
            f"{fn}: {name} must have at least one view (dim -2) and one class (dim -1), got "
            f"shape {tuple(logits.shape)}"
        )
    return logits


def _count(fn: str, fraction: Any, views: int) -> int:
    """TPT's number of kept views, ``int(views * fraction)`` exactly as the authors write it."""
    rho = check_number(fn, "fraction", fraction, low=0.0, high=1.0, low_inclusive=False)
    k = int(views * rho)
    if k < 1:
        raise ValueError(
            f"{fn}: fraction * views must keep at least one view, got fraction={fraction!r} "
            f"with {views} views (int({views} * {rho!r}) = 0)"
        )
    return k


def _marginal(z: Tensor) -> Tensor:
    """Kernel: entropy of the view-averaged softmax, ``z`` in its compute dtype."""
    log_pbar = torch.logsumexp(torch.log_softmax(z, dim=-1), dim=-2) - math.log(z.shape[-2])
    return -(log_pbar.exp() * zero_neginf(log_pbar)).sum(-1)


def marginal_entropy(logits: Tensor) -> Tensor:
    r"""Entropy of the average prediction over views (TPT's ``avg_entropy``), exact.

    .. math::

        H(\bar p) = -\sum_k \bar p_k \log \bar p_k, \qquad
        \log \bar p_k = \operatorname{logsumexp}_v \big(\log\operatorname{softmax}(z_v)_k\big)
        - \log V,

    the mean of the :math:`V` views' *probabilities* (not of their logits), computed in log space
    as the authors do; a class whose averaged probability underflows to 0 contributes exactly 0
    (the authors clamp :math:`\log \bar p` at the dtype's smallest number, which gives the same
    value). Lies in :math:`[0, \log C]`. Differentiable; for one view it is the entropy of that
    view's prediction.

    Args:
        logits: ``[..., views, classes]`` logits :math:`z_v` of the views of each image (e.g.
            ``[views, classes]`` for one image, ``[images, views, classes]`` for a batch).

    Returns:
        ``logits.shape[:-2]`` entropies in nats (0-d for one image), at least float32.

    Raises:
        TypeError: if ``logits`` is not a floating-point tensor.
        ValueError: if it has fewer than 2 dimensions, no views or no classes.

    Example:
        >>> marginal_entropy(torch.tensor([[20.0, -20.0], [-20.0, 20.0]]))  # two sure, opposite
        tensor(0.6931)

    References:
        Shu et al., "Test-Time Prompt Tuning for Zero-Shot Generalization in Vision-Language
        Models", NeurIPS 2022, Eq. 2. Code: https://github.com/azshue/TPT
        (``tpt_classification.py``, ``avg_entropy``)
    """
    _check_views("marginal_entropy", "logits", logits)
    with full_precision(logits):
        return _marginal(logits.to(compute_dtype(logits)))


def confident_views(logits: Tensor, *, fraction: Scalar = 0.1) -> Tensor:
    r"""TPT's confidence selection: the indices of the lowest-entropy views of each image.

    .. math::

        \mathcal S = \operatorname{arg\,sort}_v H(\operatorname{softmax}(z_v))\,[:k], \qquad
        k = \lfloor V \rho \rfloor

    computed as ``int(views * fraction)`` in Python floats, exactly as the authors do (TPT: 64
    views, :math:`\rho = 0.1`, so :math:`k = 6`). Ties in entropy are broken by the lower view
    index (a stable sort; the authors' ``torch.argsort`` leaves ties unspecified). The selection
    reads detached logits: it carries no gradient. Pick the views with
    ``torch.take_along_dim(logits, idx[..., None], dim=-2)``; TPT selects once, at its first
    step, and reuses the indices at later steps (``tpt_loss(..., indices=idx)``).

    Args:
        logits: ``[..., views, classes]`` logits of the views of each image.
        fraction: :math:`\rho \in (0, 1]`, the fraction of views kept; a Python or NumPy number.

    Returns:
        ``[..., k]`` int64 view indices, most confident first.

    Raises:
        TypeError: if ``logits`` is not a floating-point tensor or ``fraction`` not a number.
        ValueError: if ``logits`` has fewer than 2 dimensions, no views or no classes,
            ``fraction`` is outside ``(0, 1]``, or ``int(views * fraction)`` is 0.

    Example:
        >>> z = torch.tensor([[0.0, 0.0], [4.0, 0.0], [9.0, 0.0], [1.0, 0.0]])
        >>> confident_views(z, fraction=0.5)
        tensor([2, 1])

    References:
        Shu et al., "Test-Time Prompt Tuning for Zero-Shot Generalization in Vision-Language
        Models", NeurIPS 2022, Sec. 3.2 (confidence selection). Code:
        https://github.com/azshue/TPT (``tpt_classification.py``, ``select_confident_samples``)
    """
    fn = "confident_views"
    _check_views(fn, "logits", logits)
    k = _count(fn, fraction, logits.shape[-2])
    with torch.no_grad(), full_precision(logits):
        h = _entropy(logits.detach().to(compute_dtype(logits)), -1)
        return torch.argsort(h, dim=-1, stable=True)[..., :k]


def _selected_entropy(fn: str, logits: Tensor, fraction: Any, indices: Tensor | None) -> Tensor:
    if indices is None:
        idx = confident_views(logits, fraction=fraction)
    else:
        _count(fn, fraction, logits.shape[-2])
        check_tensor(fn, "indices", indices)
        if indices.dtype != torch.int64:
            raise TypeError(
                f"{fn}: indices must be an int64 tensor (from confident_views), got dtype "
                f"{indices.dtype}"
            )
        if indices.shape[:-1] != logits.shape[:-2] or indices.ndim != logits.ndim - 1:
            raise ValueError(
                f"{fn}: indices must have shape [..., k] with the leading shape of logits "
                f"{tuple(logits.shape[:-2])}, got shape {tuple(indices.shape)}"
            )
        if indices.shape[-1] == 0:
            raise ValueError(f"{fn}: indices must select at least one view, got shape (..., 0)")
        idx = indices
    with full_precision(logits):
        z = logits.to(compute_dtype(logits))
        return _marginal(torch.take_along_dim(z, idx[..., None], dim=-2))


def tpt_loss(
    logits: Tensor,
    *,
    fraction: Scalar = 0.1,
    indices: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""TPT's objective: the marginal entropy of the most confident views (minimise).

    .. math::

        L = H\Big(\frac{1}{|\mathcal S|}\sum_{v \in \mathcal S}\operatorname{softmax}(z_v)\Big),
        \qquad \mathcal S = \text{the } \lfloor V\rho \rfloor \text{ lowest-entropy views}

    :func:`confident_views` then :func:`marginal_entropy`, exactly the authors'
    ``avg_entropy(select_confident_samples(output, 0.1)[0])``. A non-negative penalty in
    :math:`[0, \log C]`; the gradient reaches only the selected views' logits. Run all the views
    of an image (TPT: the original and 63 augmented) through the model as one batch
    (:func:`views`), then call this on the ``[views, classes]`` logits.

    Batched over images (``[images, views, classes]``, e.g. several images adapted at once with one
    prompt each), ``reduction`` reduces the per-image losses: use ``"sum"`` when each image has its
    own parameters, so that each gets exactly the gradient of its own loss (``"mean"`` divides
    them by the number of images).

    Args:
        logits: ``[views, classes]`` (one image) or ``[images, views, classes]``.
        fraction: :math:`\rho \in (0, 1]` (TPT: 0.1), a Python or NumPy number.
        indices: ``[k]`` / ``[images, k]`` int64 view indices to use instead of selecting anew
            (TPT's later steps reuse the first step's selection); ``fraction`` is still checked.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the images axis of 3-d ``logits``;
            2-d ``logits`` give a 0-d loss whatever the reduction.

    Returns:
        0-d (2-d logits, or ``"mean"``/``"sum"``) or ``[images]`` (``"none"``), at least float32.

    Raises:
        TypeError: if ``logits`` is not floating, ``fraction`` not a number, ``indices`` not an
            int64 tensor, or ``reduction`` not a string.
        ValueError: on a wrong rank, no views or classes, a bad ``fraction`` or ``reduction``, or
            ``indices`` of the wrong shape.

    Example:
        >>> z = torch.tensor([[9.0, 0.0], [0.0, 0.0], [0.0, 9.0], [0.0, 0.0]])
        >>> tpt_loss(z, fraction=0.5)  # the two sure views disagree: H([1/2, 1/2]) = log 2
        tensor(0.6931)

    References:
        Shu et al., "Test-Time Prompt Tuning for Zero-Shot Generalization in Vision-Language
        Models", NeurIPS 2022, Eq. 2-3. Code: https://github.com/azshue/TPT
    """
    fn = "tpt_loss"
    _check_views(fn, "logits", logits, (2, 3))
    check_reduction(fn, reduction)
    per_image = _selected_entropy(fn, logits, fraction, indices)
    return per_image if logits.ndim == 2 else apply_reduction(fn, per_image, reduction)


def _dispersion(t: Tensor) -> Tensor:
    """Kernel: ATFD of ``[..., classes, dim]`` features in their compute dtype."""
    u = normalize(t, t.dtype)
    return torch.linalg.vector_norm(u - u.mean(-2, keepdim=True), dim=-1).mean(-1)


def text_dispersion(text_features: Tensor) -> Tensor:
    r"""C-TPT's average text feature dispersion (ATFD): a *spread*, larger is better calibrated.

    .. math::

        \mathrm{ATFD} = \frac{1}{C}\sum_{k=1}^{C}\big\lVert \hat t_k - \bar t \big\rVert_2,
        \qquad \hat t_k = \frac{t_k}{\lVert t_k\rVert_2},\quad
        \bar t = \frac{1}{C}\sum_{k=1}^{C}\hat t_k

    **Sign:** ATFD is non-negative and C-TPT *maximises* it (more dispersed class text features
    give better-calibrated predictions), so as a term of a loss to minimise it enters as
    :math:`-\lambda\,\mathrm{ATFD}`: :func:`ctpt_loss` does that. Transcribed from the paper's
    definition (Sec. 4, Eq. 4), not from the authors' code. Its gradient is finite even when all
    class features coincide (ATFD = 0).

    Args:
        text_features: ``[..., classes, dim]`` raw class text features :math:`t_k` (normalised
            here), e.g. the prompt-tuned text encoder's output for the class names.

    Returns:
        ``text_features.shape[:-2]`` dispersions (0-d for one set), at least float32.

    Raises:
        TypeError: if ``text_features`` is not a floating-point tensor.
        ValueError: if it has fewer than 2 dimensions, no classes or an empty feature axis.

    Example:
        >>> text_dispersion(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))  # centroid 0, unit distances
        tensor(1.)

    References:
        Yoon et al., "C-TPT: Calibrated Test-Time Prompt Tuning for Vision-Language Models via
        Text Feature Dispersion", ICLR 2024. Code: https://github.com/hee-suk-yoon/C-TPT
    """
    fn = "text_dispersion"
    check_floating(fn, "text_features", text_features)
    if text_features.ndim < 2 or 0 in text_features.shape[-2:]:
        raise ValueError(
            f"{fn}: text_features must have shape [..., classes, dim] with at least one class "
            f"and a non-empty feature axis, got shape {tuple(text_features.shape)}"
        )
    with full_precision(text_features):
        return _dispersion(text_features.to(compute_dtype(text_features)))


def ctpt_loss(
    logits: Tensor,
    *,
    text_features: Tensor,
    fraction: Scalar = 0.1,
    weight: Scalar = 50.0,
    indices: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""C-TPT's objective: TPT's loss minus the weighted text feature dispersion (signed; minimise).

    .. math:: L = L_{\mathrm{TPT}} - \lambda\,\mathrm{ATFD}(t_1, \dots, t_C)

    with :math:`L_{\mathrm{TPT}}` from :func:`tpt_loss` and ATFD from :func:`text_dispersion`.
    **Sign:** minimising :math:`L` maximises the dispersion, as C-TPT asks; :math:`L` may be
    negative (it lies in :math:`[-2\lambda, \log C]`, ATFD being at most 2). The text features
    must depend on the tuned prompt for the second term to have a gradient. Transcribed from the
    paper (Sec. 4, with :math:`\lambda = 50`), not from the authors' code.

    Args:
        logits: ``[views, classes]`` or ``[images, views, classes]`` view logits.
        text_features: ``[classes, dim]`` (shared by all images) or ``[images, classes, dim]``
            raw class text features, keyword-only.
        fraction: :math:`\rho \in (0, 1]` of :func:`tpt_loss`.
        weight: :math:`\lambda \ge 0` (C-TPT: 50), a finite number or a 0-d floating tensor.
        indices: a previous selection to reuse, as in :func:`tpt_loss`.
        reduction: over the images axis of 3-d ``logits``, as in :func:`tpt_loss`.

    Returns:
        0-d, or ``[images]`` for 3-d ``logits`` and ``"none"``; at least float32.

    Raises:
        TypeError: bad tensor types, ``fraction``/``weight`` not numbers, bad ``indices``.
        ValueError: the errors of :func:`tpt_loss` and :func:`text_dispersion`, a class count
            that differs between ``logits`` and ``text_features``, leading shapes that do not
            match, or ``weight`` not finite and >= 0.

    Example:
        >>> z = torch.tensor([[9.0, 0.0], [0.0, 0.0], [0.0, 9.0], [0.0, 0.0]])
        >>> t = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # ATFD = 1
        >>> ctpt_loss(z, text_features=t, fraction=0.5, weight=0.5)  # log 2 - 0.5
        tensor(0.1931)

    References:
        Yoon et al., "C-TPT: Calibrated Test-Time Prompt Tuning for Vision-Language Models via
        Text Feature Dispersion", ICLR 2024. Code: https://github.com/hee-suk-yoon/C-TPT
    """
    fn = "ctpt_loss"
    _check_views(fn, "logits", logits, (2, 3))
    check_floating(fn, "text_features", text_features)
    lead = tuple(logits.shape[:-2])
    if text_features.ndim not in (2, len(lead) + 2) or 0 in text_features.shape[-2:]:
        raise ValueError(
            f"{fn}: text_features must have shape [classes, dim] or [images, classes, dim] with "
            f"a non-empty feature axis, got shape {tuple(text_features.shape)}"
        )
    if text_features.shape[-2] != logits.shape[-1]:
        raise ValueError(
            f"{fn}: text_features.shape[-2] must equal logits.shape[-1] (the classes), got "
            f"text_features of shape {tuple(text_features.shape)} and logits of shape "
            f"{tuple(logits.shape)}"
        )
    if text_features.ndim == 3 and tuple(text_features.shape[:1]) != lead:
        raise ValueError(
            f"{fn}: text_features.shape[0] must equal logits.shape[0] (the images), got "
            f"text_features of shape {tuple(text_features.shape)} and logits of shape "
            f"{tuple(logits.shape)}"
        )
    lam = check_scalar(fn, "weight", weight)
    if not isinstance(lam, Tensor):
        check_number(fn, "weight", lam, low=0.0)
    check_reduction(fn, reduction)
    tpt = _selected_entropy(fn, logits, fraction, indices)
    with full_precision(text_features):
        atfd = _dispersion(text_features.to(compute_dtype(text_features)))
    per_image = tpt - lam * atfd
    if logits.ndim == 2:
        return per_image
    return apply_reduction(fn, per_image.expand(lead), reduction)


def views(
    image: object,
    n: int,
    transform: Callable[[Any], Tensor],
    *,
    original: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    r"""Stack ``n`` random views of one image (after an optional original) into one batch.

    .. math:: X = [\,o(x);\ a_1(x);\ \dots;\ a_n(x)\,], \qquad a_i \sim \text{transform}

    TPT's ``AugMixAugmenter`` returns the preprocessed test image followed by 63 augmented views;
    the point of stacking them is that all 64 go through the model as **one** batched forward
    (``benchmarks/bench_tta.py``: on a tiny CLIP, forward + :func:`tpt_loss` of 64 views as one
    batch against a Python loop of 64 single-image forwards). ``transform`` is called once per
    view and draws its randomness from the global generators (seed them for reproducible views).

    The authors' views are ``preprocess(augmix(RandomResizedCrop(224), RandomHorizontalFlip))``
    with their own AugMix (3 chains of 1-3 ops from 9 PIL operations, severity 1, Dirichlet(1)
    and Beta(1, 1) mixing) for the fine-grained data sets, and only the random crop and flip for
    the ImageNet variants. ``torchvision.transforms.AugMix(severity=1, mixture_width=3,
    chain_depth=-1, alpha=1.0, all_ops=False)`` after the crop and flip is the nearest stock
    transform (same structure; its operations' magnitude scale differs), e.g.
    ``T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.AugMix(...),
    T.ToTensor(), normalize])`` on a PIL image.

    Args:
        image: the input ``transform`` and ``original`` accept (a PIL image, a ``[C, H, W]``
            tensor, ...).
        n: the number of random views, at least 1 (TPT: 63).
        transform: a callable returning one view as a tensor.
        original: a callable for the un-augmented first view (TPT: resize, centre crop,
            preprocess), or ``None`` for no such view.

    Returns:
        ``[n + 1, ...]`` (with ``original``) or ``[n, ...]`` views, stacked.

    Raises:
        TypeError: if ``n`` is not an int, ``transform``/``original`` not callable, or a view is
            not a tensor.
        ValueError: if ``n < 1`` or the views differ in shape.

    Example:
        >>> x = torch.arange(3.0)
        >>> views(x, 2, lambda v: v + 1, original=lambda v: v)
        tensor([[0., 1., 2.],
                [1., 2., 3.],
                [1., 2., 3.]])

    References:
        Shu et al., "Test-Time Prompt Tuning for Zero-Shot Generalization in Vision-Language
        Models", NeurIPS 2022, Sec. 4. Code: https://github.com/azshue/TPT
        (``data/datautils.py``, ``AugMixAugmenter``); Hendrycks et al., "AugMix", ICLR 2020.
    """
    fn = "views"
    n = check_int(fn, "n", n, low=1)
    if not callable(transform):
        raise TypeError(f"{fn}: transform must be callable, got {describe(transform)}")
    if original is not None and not callable(original):
        raise TypeError(f"{fn}: original must be callable or None, got {describe(original)}")
    out = [] if original is None else [original(image)]
    out += [transform(image) for _ in range(n)]
    for i, v in enumerate(out):
        if not isinstance(v, Tensor):
            raise TypeError(
                f"{fn}: every view must be a torch.Tensor, got {describe(v)} at view {i}"
            )
        if v.shape != out[0].shape:
            raise ValueError(
                f"{fn}: every view must have the shape of the first, {tuple(out[0].shape)}, got "
                f"{tuple(v.shape)} at view {i}"
            )
    return torch.stack(out)
