r"""WiSE-FT: weight-space interpolation between the zero-shot and the fine-tuned model."""

from __future__ import annotations

from torch import Tensor

from robustft import tree
from robustft._checks import check_floating_tree, check_per_tensor_scalar
from robustft.typing import Params, PerTensor, Scalar

__all__ = ["wise"]


def wise(params: Params, *, anchor: Params, alpha: PerTensor[Scalar]) -> dict[str, Tensor]:
    r"""WiSE-FT: the weight-space ensemble of the zero-shot and the fine-tuned parameters.

    .. math:: \theta_\alpha = (1 - \alpha)\,\theta_0 + \alpha\,\theta_{\mathrm{ft}}

    for every tensor (with a per-tensor :math:`\alpha_k` when ``alpha`` is a dict). The
    pre-trained side is the keyword-only ``anchor`` (a swapped call cannot silently give
    :math:`1 - \alpha`). ``alpha = 0`` returns ``anchor``'s values and ``alpha = 1`` ``params``'
    values, bit for bit, whether ``alpha`` is a number, a 0-d tensor or a dict; values outside
    ``[0, 1]`` extrapolate. Every tensor keeps its dtype (a float32 0-d tensor ``alpha`` is
    applied in float32 and the result cast back, so a bf16 ``logit_scale`` stays bf16).
    Interpolate the head too, with the zero-shot head (the text-derived classifier) in
    ``anchor``, as the paper does. One ``torch._foreach_lerp`` per device/dtype group for a
    number; differentiable in ``params``, ``anchor`` and a tensor ``alpha``.

    Args:
        params: :math:`\theta_{\mathrm{ft}}`, the fine-tuned tree of floating-point tensors.
        anchor: :math:`\theta_0`, the zero-shot (pre-trained) tree, keyword-only (same keys,
            shapes and dtypes).
        alpha: :math:`\alpha`: a finite real number (Python or NumPy), a 0-d floating tensor, or
            a dict of them with exactly the trees' keys. The paper sweeps ``0, 0.1, ..., 1``
            (0.5 is a good default).

    Returns:
        A new tree (inputs untouched) with ``params``' keys, shapes and dtypes.

    Raises:
        TypeError: non-trees, non-floating tensors, differing dtypes, a bad ``alpha`` type, or
            ``anchor`` passed positionally.
        ValueError: different keys or shapes, a NaN or infinite ``alpha``, or an ``alpha`` dict
            whose keys differ from the trees'.

    >>> wise({"w": torch.tensor([4.0, 6.0])}, anchor={"w": torch.tensor([0.0, 2.0])}, alpha=0.25)
    {'w': tensor([1., 3.])}

    References:
        Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022.
        Code: https://github.com/mlfoundations/wise-ft
    """
    check_floating_tree("wise", "params", params)
    check_floating_tree("wise", "anchor", anchor)
    tree.check_same_structure(anchor, params, what="wise", names=("anchor", "params"))
    a = check_per_tensor_scalar("wise", "alpha", alpha, list(anchor))
    out = tree.lerp(anchor, params, a)
    return {k: out[k] for k in params}
