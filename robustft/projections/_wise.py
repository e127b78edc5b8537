r"""WiSE-FT: weight-space interpolation between the zero-shot and the fine-tuned model."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from robustft import tree
from robustft._checks import check_per_tensor, describe
from robustft.projections._balls import check_trees

__all__ = ["wise"]


def _check_alpha(fn: str, name: str, value: Any) -> None:
    if isinstance(value, Tensor):
        if value.ndim != 0 or not value.is_floating_point():
            raise TypeError(
                f"{fn}: {name} must be a real number or a 0-d floating tensor, got "
                f"{describe(value)}"
            )
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{fn}: {name} must be a real number, a 0-d floating tensor or a dict of them per key, "
            f"got {describe(value)}"
        )
    if not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be a finite real number, got {value!r}")


def wise(
    anchor: Mapping[str, Tensor], params: Mapping[str, Tensor], *, alpha: Any
) -> dict[str, Tensor]:
    r"""WiSE-FT: the weight-space ensemble of the zero-shot and the fine-tuned parameters.

    .. math:: \theta_\alpha = (1 - \alpha)\,\theta_0 + \alpha\,\theta_{\mathrm{ft}}

    for every tensor (with a per-tensor :math:`\alpha_k` when ``alpha`` is a dict). ``alpha = 0``
    returns ``anchor`` and ``alpha = 1`` returns ``params``, both exactly; values outside
    ``[0, 1]`` extrapolate. Interpolate the head too, with the zero-shot head (the text-derived
    classifier) in ``anchor``, as the paper does. One ``torch._foreach_lerp`` per device/dtype
    group for a scalar ``alpha``; differentiable in ``params`` and in a tensor ``alpha``.

    Args:
        anchor: :math:`\theta_0`, the zero-shot (pre-trained) tree.
        params: :math:`\theta_{\mathrm{ft}}`, the fine-tuned tree (same keys, shapes and dtypes).
        alpha: :math:`\alpha`: a real number, a 0-d floating tensor, or a dict of them with
            exactly the trees' keys. The paper sweeps ``0, 0.1, ..., 1`` (0.5 is a good default).

    Returns:
        A new tree (inputs untouched), ``anchor``'s keys, shapes and dtypes.

    Raises:
        TypeError: non-trees, non-floating tensors, differing dtypes, or a bad ``alpha`` type.
        ValueError: different keys or shapes, a non-finite ``alpha``, or an ``alpha`` dict whose
            keys differ from the trees'.

    >>> wise({"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([4.0, 6.0])}, alpha=0.25)
    {'w': tensor([1., 3.])}

    References:
        Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022.
        Code: https://github.com/mlfoundations/wise-ft
    """
    check_trees("wise", anchor, params)
    if isinstance(alpha, Mapping):
        check_per_tensor("wise", "alpha", alpha, list(anchor))
        for k, v in alpha.items():
            _check_alpha("wise", f"alpha[{k!r}]", v)
    else:
        _check_alpha("wise", "alpha", alpha)
    return tree.lerp(anchor, params, alpha)
