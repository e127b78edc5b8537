"""Functional forwards: features of an open_clip model under any parameter tree."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustft._checks import check_floating, check_ndim, check_tensor
from robustft.clip._common import (
    call_method,
    check_data_parallel,
    check_model,
    check_params,
    eval_mode,
    unwrap,
)
from robustft.typing import Params

__all__ = ["frozen_copy_features", "image_features", "text_features"]


def image_features(
    model: nn.Module,
    params: Params | None,
    images: Tensor,
    *,
    normalize: bool = True,
) -> Tensor:
    r"""Image features :math:`F_\theta(x)` of ``model.encode_image`` under the parameters ``params``.

    Runs ``model.encode_image(images)`` through :func:`torch.func.functional_call` with
    ``params`` swapped in for the module's own tensors, so θ, θ0, a WiSE-FT blend or a TPGM
    projection are evaluated without copying the module:

    .. math::

        f_b = F_\theta(x_b), \qquad \hat f_b = f_b / \lVert f_b \rVert_2 \ \text{(if normalize)}.

    ``params`` may be partial (e.g. only the trained visual tensors): missing parameters and
    buffers are taken from the module, as with ``functional_call(..., strict=False)``. Gradients
    flow to the tensors of ``params`` (and to module parameters with ``requires_grad``). The module
    runs in its current train/eval mode; BatchNorm running statistics taken from the module are
    updated in place in training mode, exactly as a plain ``model.encode_image`` would.

    The call builds no module per step (the tree is swapped into ``model`` itself, as
    :func:`torch.func.functional_call` does) and validation reads only metadata, with the model's
    name set cached per model, so a training step calling this compiles with
    ``torch.compile(fullgraph=True)`` and does not recompile across steps of the same shapes.

    Data parallelism: pass the ``DistributedDataParallel`` wrapper itself as ``model``; the method
    then runs through DDP's forward, so the gradients of the module's own parameters are
    synchronised as with ``ddp(x)``. A call on ``ddp.module`` that would train the module's own
    parameters raises (it would silently skip DDP's gradient sync). Trained tensors you pass in
    ``params`` are not DDP's: register them once with :func:`robustft.distributed.replicate`,
    which averages their gradients after every backward pass. Under a process group of more than
    one rank, the first backward pass raises for a trained leaf tensor that neither ``replicate``
    nor a DDP/FSDP module running the forward synchronises (on one process nothing is checked or
    installed). FSDP-managed modules are rejected.

    Args:
        model: an open_clip model (``CLIP``, ``CustomTextCLIP``, ...), any module with
            ``encode_image``, or a ``DistributedDataParallel`` wrapping one.
        params: a tree of (some of) the model's parameters and buffers, keyed like
            ``model.named_parameters()``; ``None`` uses the module's own tensors.
        images: ``[batch, channels, height, width]`` preprocessed images.
        normalize: L2-normalise the features (the default).

    Returns:
        ``[batch, dim]`` image features.

    Raises:
        TypeError: if ``model`` has no ``encode_image`` or is FSDP-managed, ``params`` is not a
            tree of tensors or ``images`` is not a floating-point tensor.
        ValueError: if ``params`` names a tensor the model does not have, or ``model`` is the
            ``.module`` of a live ``DistributedDataParallel`` whose own parameters would be
            trained; on the first backward pass under more than one rank, if a trained tensor
            is synchronised by neither :func:`robustft.distributed.replicate` nor DDP/FSDP.

    Example:
        >>> class Toy(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.visual = torch.nn.Linear(2, 2, bias=False)
        ...     def encode_image(self, x):
        ...         return self.visual(x)
        >>> toy, x = Toy(), torch.tensor([[3.0, 4.0]])
        >>> image_features(toy, {"visual.weight": 2 * torch.eye(2)}, x, normalize=False)
        tensor([[6., 8.]])
        >>> image_features(toy, {"visual.weight": 2 * torch.eye(2)}, x)
        tensor([[0.6000, 0.8000]])

    References:
        Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
        ICML 2021. Code: https://github.com/mlfoundations/open_clip
    """
    fn = "image_features"
    check_model(fn, model, "encode_image", wrapper_ok=True)
    tree = check_params(fn, model, params)
    check_floating(fn, "images", images)
    check_data_parallel(fn, model, tree)
    features: Tensor = call_method(model, "encode_image", tree, images)
    return F.normalize(features, dim=-1) if normalize else features


def text_features(
    model: nn.Module,
    params: Params | None,
    tokens: Tensor,
    *,
    normalize: bool = True,
) -> Tensor:
    r"""Text features :math:`G_\phi(t)` of ``model.encode_text`` under the parameters ``params``.

    The text-side twin of :func:`image_features`:

    .. math::

        g_n = G_\phi(t_n), \qquad \hat g_n = g_n / \lVert g_n \rVert_2 \ \text{(if normalize)}.

    ``params`` may be partial; missing parameters and buffers (e.g. CLIP's causal ``attn_mask``)
    come from the module. Compilation and data parallelism as in :func:`image_features`.

    Args:
        model: an open_clip model, any module with ``encode_text``, or a
            ``DistributedDataParallel`` wrapping one.
        params: a tree of (some of) the model's parameters and buffers; ``None`` uses the module's
            own tensors.
        tokens: ``[texts, context_length]`` token ids from the model's tokenizer.
        normalize: L2-normalise the features (the default).

    Returns:
        ``[texts, dim]`` text features.

    Raises:
        TypeError: if ``model`` has no ``encode_text`` or is FSDP-managed, ``params`` is not a
            tree of tensors or ``tokens`` is not an integer tensor.
        ValueError: if ``tokens`` is not 2-d, ``params`` names a tensor the model does not have
            or ``model`` is the trained ``.module`` of a live ``DistributedDataParallel``; on the
            first backward pass, as :func:`image_features`.

    Example:
        >>> class Toy(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.token_embedding = torch.nn.Embedding(3, 2)
        ...     def encode_text(self, t):
        ...         return self.token_embedding(t).sum(1)
        >>> table = {"token_embedding.weight": torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])}
        >>> text_features(Toy(), table, torch.tensor([[1, 2, 0]]), normalize=False)
        tensor([[3., 4.]])

    References:
        Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
        ICML 2021. Code: https://github.com/mlfoundations/open_clip
    """
    fn = "text_features"
    check_model(fn, model, "encode_text", wrapper_ok=True)
    tree = check_params(fn, model, params)
    check_tensor(fn, "tokens", tokens)
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"{fn}: tokens must be an integer tensor of token ids, got {tokens.dtype}")
    check_ndim(fn, "tokens", tokens, 2)
    check_data_parallel(fn, model, tree)
    features: Tensor = call_method(model, "encode_text", tree, tokens)
    return F.normalize(features, dim=-1) if normalize else features


def frozen_copy_features(
    model: nn.Module,
    images: Tensor,
    *,
    params: Params | None = None,
    normalize: bool = True,
) -> Tensor:
    r"""Teacher features :math:`F_{\theta_0}(x)`: no gradient, eval mode, module left as it was.

    The frozen zero-shot model of Lipsum-FT, KD, FeatKD and CAR-FT, evaluated on the same
    (augmented) batch as the model being trained, without keeping a second copy of the module:
    pass the pre-trained tensors as ``params`` (a snapshot such as
    ``robustft.tree.clone(dict(model.named_parameters()), detach=True)`` taken before training)
    while the module holds the fine-tuned θ. With ``params=None`` the module's current weights are
    used. The forward runs under :func:`torch.no_grad` with every submodule in eval mode (dropout
    off, BatchNorm on running statistics, none of them updated) and each submodule's own
    ``training`` flag is restored afterwards. Include the buffers in ``params`` to pin the
    pre-trained BatchNorm statistics of a ResNet tower; otherwise the module's current buffers are
    used. A ``DistributedDataParallel`` is unwrapped (no gradient, nothing to synchronise). Compiles
    with ``fullgraph=True`` like :func:`image_features`.

    .. math::

        f^0_b = \operatorname{sg}\!\big(F_{\theta_0}(x_b)\big)

    Args:
        model: an open_clip model, any module with ``encode_image``, or a DDP wrapping one.
        images: ``[batch, channels, height, width]`` preprocessed images.
        params: the teacher's (possibly partial) tree of parameters and buffers; ``None`` uses the
            module's current tensors.
        normalize: L2-normalise the features (the default).

    Returns:
        ``[batch, dim]`` features that do not require grad.

    Raises:
        TypeError: as :func:`image_features`.
        ValueError: as :func:`image_features`.

    Example:
        >>> toy = torch.nn.Sequential(torch.nn.Dropout(0.5))
        >>> toy.encode_image = toy.forward
        >>> toy.train()  # doctest: +ELLIPSIS
        Sequential(...)
        >>> frozen_copy_features(toy, torch.tensor([[3.0, 4.0]]))  # eval: no dropout
        tensor([[0.6000, 0.8000]])
        >>> toy.training
        True

    References:
        Nam et al., "Lipsum-FT: Robust Fine-Tuning of Zero-Shot Models Using Random Text Guidance",
        ICLR 2024. Code: https://github.com/cs-giung/lipsum-ft
    """
    fn = "frozen_copy_features"
    check_model(fn, model, "encode_image", wrapper_ok=True)
    tree = check_params(fn, model, params)
    check_floating(fn, "images", images)
    inner = unwrap(model)  # no gradient, so nothing for DDP to synchronise
    with torch.no_grad(), eval_mode(inner):
        features: Tensor = call_method(inner, "encode_image", tree, images)
        return F.normalize(features, dim=-1) if normalize else features
