"""CLIP's logit scale: the model stores its log; every ``logit_scale=`` in robustft wants the scale."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from robustft._checks import check_number, describe
from robustft._numerics import compute_dtype
from robustft.clip._common import check_params, unwrap
from robustft.typing import Params

__all__ = ["logit_scale"]


def logit_scale(
    model: nn.Module | Params,
    *,
    params: Params | None = None,
    max: float | None = None,
) -> Tensor:
    r"""The logit scale :math:`s = \exp(\texttt{model.logit\_scale})` of an open_clip model.

    open_clip's CLIP models store the **log** of the scale as the parameter ``logit_scale``
    (:math:`\log 100 \approx 4.6052` for OpenAI's pretrained weights), and their ``forward`` uses
    ``logit_scale.exp()``. Every ``logit_scale=`` argument in robustft (losses, scores) wants the
    scale :math:`s` itself, so pass the value of this function, never the raw parameter:

    .. math::

        s = \min\big(\exp(\ell),\ s_{\max}\big), \qquad \ell = \texttt{logit\_scale}.

    The result is differentiable: it carries a gradient to :math:`\ell` when the parameter is
    trained (CLIP's contrastive pre-training, FLYP) and requires grad exactly when
    ``model.logit_scale`` does; call ``.detach()`` for a constant scale (CLIPood, UEO, Lipsum-FT
    keep it fixed). ``max`` clamps the scale as open_clip's training loop clamps the parameter to
    :math:`[0, \log 100]` after every step (``max=100.0``); the gradient is 0 above the cap.
    Half-precision parameters are exponentiated in float32 and the scale is returned in float32
    (:math:`\exp` of a bf16 :math:`\ell` is far coarser than the rounding of the scale itself).

    Args:
        model: an open_clip model (``CLIP``, ``CustomTextCLIP``, a ``DistributedDataParallel``
            wrapping one) or its parameter tree, with a one-element ``logit_scale`` tensor.
        params: optional (partial) tree of the model's tensors; its ``logit_scale`` entry, if
            any, is used instead of the module's (e.g. a trained or blended tree).
        max: optional cap :math:`s_{\max} > 0` on the scale (open_clip trains with 100).

    Returns:
        0-d tensor: the scale, float32 (float64 for a float64 parameter), on the parameter's
        device.

    Raises:
        TypeError: if ``model`` is neither a module nor a tree, has no ``logit_scale`` tensor
            (or a non-floating one), or ``max`` is not a real number.
        ValueError: if ``logit_scale`` has more than one element, ``max <= 0`` or is not finite,
            or ``params`` names a tensor the model does not have.

    Example:
        >>> import math
        >>> tree = {"logit_scale": torch.tensor(math.log(100.0), requires_grad=True)}
        >>> s = logit_scale(tree)
        >>> round(s.item(), 3), s.requires_grad
        (100.0, True)
        >>> logit_scale({"logit_scale": torch.tensor(5.0)}, max=100.0)  # e^5 = 148.4, capped
        tensor(100.)

    References:
        Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
        ICML 2021. Code: https://github.com/mlfoundations/open_clip (``CLIP.forward``; the clamp
        in ``open_clip_train/train.py``)
    """
    fn = "logit_scale"
    if max is not None:
        max = check_number(fn, "max", max, low=0.0, low_inclusive=False)
    if isinstance(model, nn.Module):
        tree = check_params(fn, model, params) or {}
        value: Any = tree.get("logit_scale", getattr(unwrap(model), "logit_scale", None))
    elif isinstance(model, Mapping):
        if params is not None:
            raise TypeError(
                f"{fn}: params must be None when model is a parameter tree, got {describe(params)}"
            )
        value = model.get("logit_scale")
    else:
        raise TypeError(
            f"{fn}: model must be an open_clip model (torch.nn.Module) or its parameter tree, "
            f"got {describe(model)}"
        )
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise TypeError(
            f"{fn}: model must have a floating-point logit_scale tensor (the log of the scale, "
            f"as open_clip's CLIP models do), got {describe(value)}"
        )
    if value.numel() != 1:
        raise ValueError(
            f"{fn}: logit_scale must hold one value (the log of the scale), got shape "
            f"{tuple(value.shape)}"
        )
    scale = value.reshape(()).to(compute_dtype(value)).exp()
    return scale if max is None else torch.clamp(scale, max=max)
