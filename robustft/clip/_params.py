"""Which parameters to train: normalisation affines, the visual tower, the text tower."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from robustft._checks import describe
from robustft.tree import check_tree
from robustft.typing import Params

__all__ = ["norm_affine_names", "text_names", "visual_names"]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,  # open_clip's LayerNorm and LayerNormFp32 subclass it
    nn.modules.batchnorm._BatchNorm,  # BatchNorm1d/2d/3d and SyncBatchNorm
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.RMSNorm,
)
"""Module types whose affine ``weight``/``bias`` :func:`norm_affine_names` selects."""

_PAIR_SCALARS = ("logit_scale", "logit_bias")


def _tree_of(fn: str, model: Any) -> Params:
    if isinstance(model, nn.Module):
        return dict(model.named_parameters())
    if isinstance(model, Mapping):
        return check_tree(model, fn=fn, name="model")
    raise TypeError(
        f"{fn}: model must be an open_clip model (torch.nn.Module) or its parameter tree, "
        f"got {describe(model)}"
    )


def norm_affine_names(module: nn.Module, *, under: str | None = None) -> list[str]:
    """Names of the affine weight and bias of every normalisation layer (UEO's trained set).

    Selects by module type: ``nn.LayerNorm`` (open_clip's ``LayerNorm``,
    ``LayerNormFp32``), every BatchNorm, ``nn.GroupNorm``, ``nn.InstanceNorm*`` and ``nn.RMSNorm``
    — the ``weight`` and ``bias`` each layer actually has (``affine=False`` layers contribute
    nothing). UEO trains these for the visual tower (``under="visual"``) together with a CoOp
    context. The official UEO code selects by name instead (a parameter name containing ``bn`` or
    ``ln``), which misses the BatchNorm of the ResNet ``downsample`` branches
    (``layerK.0.downsample.1``); on a ViT both rules pick the same LayerNorms. Selecting by type
    is the documented difference.

    Args:
        module: the model (or any module).
        under: restrict to the submodule at this dotted path (``"visual"``); names stay relative
            to ``module`` so they match ``dict(module.named_parameters())``.

    Returns:
        Parameter names in ``module.named_parameters()`` order, usable with
        :func:`robustft.tree.partition` and :func:`robustft.tree.select`.

    Raises:
        TypeError: if ``module`` is not an ``nn.Module`` or ``under`` is not a str.
        ValueError: if ``under`` names no submodule.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2),
        ...                           torch.nn.LayerNorm(2, elementwise_affine=False))
        >>> norm_affine_names(net)
        ['1.weight', '1.bias']

    References:
        Liang et al., "Realistic Unsupervised CLIP Fine-tuning with Universal Entropy
        Optimization", ICML 2024. Code: https://github.com/tim-learn/UEO
    """
    fn = "norm_affine_names"
    if not isinstance(module, nn.Module):
        raise TypeError(f"{fn}: module must be a torch.nn.Module, got {describe(module)}")
    if under is not None and not isinstance(under, str):
        raise TypeError(f"{fn}: under must be a dotted submodule path str or None, got {under!r}")
    prefix = ""
    if under:
        try:
            root = module.get_submodule(under)
        except AttributeError:
            raise ValueError(
                f"{fn}: under must name a submodule of {type(module).__name__} "
                f"(e.g. 'visual'), got {under!r}"
            ) from None
        prefix = under + "."
    else:
        root = module
    wanted: set[str] = set()
    for name, sub in root.named_modules():
        if isinstance(sub, NORM_TYPES):
            base = prefix + (name + "." if name else "")
            wanted.update(base + p for p, _ in sub.named_parameters(recurse=False))
    return [n for n, _ in module.named_parameters() if n in wanted]


def visual_names(model: nn.Module | Params) -> list[str]:
    """Names of the visual tower's parameters: every name under ``visual.``.

    Args:
        model: an open_clip model (``model.visual`` is its image tower) or its parameter tree.

    Returns:
        Parameter names in order, usable with :func:`robustft.tree.partition`.

    Raises:
        TypeError: if ``model`` is neither a module nor a parameter tree.
        ValueError: if no parameter name starts with ``visual.``.

    Example:
        >>> visual_names({"visual.proj": torch.ones(1), "logit_scale": torch.ones(())})
        ['visual.proj']

    References:
        https://github.com/mlfoundations/open_clip
    """
    fn = "visual_names"
    tree = _tree_of(fn, model)
    names = [k for k in tree if k.startswith("visual.")]
    if not names:
        raise ValueError(
            f"{fn}: model must have parameters under 'visual.' (an open_clip model), got none "
            f"among {len(tree)} parameter(s)"
        )
    return names


def text_names(model: nn.Module | Params) -> list[str]:
    """Names of the text tower's parameters: everything but ``visual.*``, ``logit_scale`` and
    ``logit_bias``.

    For ``CLIP`` that is ``token_embedding``, ``positional_embedding``, ``transformer.*``,
    ``ln_final.*`` and ``text_projection``; for ``CustomTextCLIP`` it is ``text.*``. The logit
    scale and bias belong to neither tower and are left out (select them by name if you train
    them). ``visual_names``, ``text_names`` and the two scalars partition the tree.

    Args:
        model: an open_clip model or its parameter tree.

    Returns:
        Parameter names in order, usable with :func:`robustft.tree.partition`.

    Raises:
        TypeError: if ``model`` is neither a module nor a parameter tree.
        ValueError: if no text parameter is left.

    Example:
        >>> tree = {"visual.proj": torch.ones(1), "text_projection": torch.ones(1),
        ...         "logit_scale": torch.ones(())}
        >>> text_names(tree)
        ['text_projection']

    References:
        https://github.com/mlfoundations/open_clip
    """
    fn = "text_names"
    tree = _tree_of(fn, model)
    names = [k for k in tree if not k.startswith("visual.") and k not in _PAIR_SCALARS]
    if not names:
        raise ValueError(
            f"{fn}: model must have text-tower parameters (names outside 'visual.' other than "
            f"logit_scale/logit_bias), got none among {len(tree)} parameter(s)"
        )
    return names
