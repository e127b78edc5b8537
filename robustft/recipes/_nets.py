"""The modules a recipe trains: every trained tensor lives in one ``nn.Module`` that DDP or FSDP2 wraps.

Data parallelism is correct by construction: the optimiser steps the parameters of the module
the runtime wraps, and every gradient-carrying forward goes through that module's own
``forward`` (never a functional call on ``ddp.module``), so DDP's gradient hooks and FSDP2's
all-gathers run on every step. The frozen zero-shot teacher is a separate module with no
trainable parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustft import clip

__all__ = [
    "ContrastiveCLIP",
    "FrozenClassifier",
    "ImageClassifier",
    "PromptClassifier",
    "TextClassifier",
    "full",
    "shard_units",
    "visual_tower",
]


def visual_tower(model: nn.Module) -> nn.Module:
    """``model.visual``, the image tower of an open_clip model.

    Raises:
        TypeError: if ``model`` has no ``visual`` submodule.
    """
    tower = getattr(model, "visual", None)
    if not isinstance(tower, nn.Module):
        raise TypeError(
            f"visual_tower: model must be an open_clip model with a .visual image tower, "
            f"got {type(model).__name__}"
        )
    return tower


def full(t: Tensor) -> Tensor:
    """A fresh plain tensor of ``t``'s full value (a ``DTensor`` is all-gathered), detached.

    Always a copy: an exported tree never aliases the live parameters (``full_tensor`` of a
    one-rank mesh or a replicated ``DTensor`` returns the parameter's own storage).
    """
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor().detach().clone() if callable(full_tensor) else t.detach().clone()


def _logit_scale(model: nn.Module) -> float:
    return float(clip.logit_scale(model).detach())


class ImageClassifier(nn.Module):
    r"""CLIP's visual tower and a linear head on its normalised features: :math:`z = s\,\hat f W^\top`.

    The head :math:`W` ``[classes, dim]`` starts as the zero-shot head (rows = normalised class
    text features) and trains with the tower unless ``train_head=False`` (CLIPood keeps the class
    texts frozen). The logit scale :math:`s` is the pre-trained model's, fixed.

    ``forward(images)`` returns ``(features, logits)``: ``[batch, dim]`` normalised features and
    ``[batch, classes]`` logits.
    """

    def __init__(self, visual: nn.Module, head: Tensor, scale: float, *, train_head: bool = True):
        super().__init__()
        self.visual = visual
        self.head = nn.Parameter(head.detach().clone(), requires_grad=train_head)
        self.scale = float(scale)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = F.normalize(self.visual(images), dim=-1)
        return features, self.scale * features @ self.head.to(features.dtype).T


class FrozenClassifier(ImageClassifier):
    """A frozen :class:`ImageClassifier` on a copy of a visual tower: the zero-shot teacher θ0 of
    KD/CAR-FT/FeatKD/Lipsum-FT, and the evaluation replica the exported classifiers are loaded
    into.

    ``forward(images)`` returns ``(features, logits)`` without gradient, the tower in eval mode.
    """

    def __init__(self, visual: nn.Module, head: Tensor, scale: float):
        super().__init__(copy.deepcopy(visual), head, scale, train_head=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FrozenClassifier:  # always in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return super().forward(images)


class PromptClassifier(nn.Module):
    r"""UEO's trained model: a CoOp context shared by all classes and the visual norm affines.

    The open_clip model's parameters are frozen except the affine weight and bias of every
    normalisation layer of its visual tower (:func:`robustft.clip.norm_affine_names`); the
    context (initialised from ``prompt`` by :func:`robustft.clip.init_context`) is this module's
    own parameter. The visual tower stays in eval mode (SPEC §3).

    ``forward(images)`` returns the ``[batch, classes]`` training logits
    :math:`s\,\hat f\,\hat T^\top` with the class texts :math:`\hat T` encoded through the
    context on every call (the gradient reaches the context); ``forward(None)`` returns the
    ``[classes, dim]`` text head alone (to export or evaluate with, at the model's own scale).
    The scale :math:`s` of the training logits is ``scale`` when given (UEO's official code
    trains on :math:`100\cos`, ``RunConfig.ueo_scale``), else the model's own logit scale.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        classnames: Sequence[str],
        prompt: str,
        *,
        scale: float | None = None,
    ):
        super().__init__()
        self.model = model.requires_grad_(False)
        self.affines = clip.norm_affine_names(model, under="visual")
        params = dict(model.named_parameters())
        for name in self.affines:
            params[name].requires_grad_(True)
        self.context = nn.Parameter(clip.init_context(model, tokenizer, prompt).detach().clone())
        self.tokenizer = tokenizer
        self.classnames = list(classnames)
        self.scale = _logit_scale(model) if scale is None else float(scale)

    def train(self, mode: bool = True) -> PromptClassifier:  # the towers stay in eval mode
        return super().train(False)

    def forward(self, images: Tensor | None) -> Tensor:
        text = clip.encode_text_with_context(
            self.model, self.context, self.classnames, self.tokenizer
        )
        if images is None:
            return text
        features = F.normalize(visual_tower(self.model)(images), dim=-1)
        return self.scale * features @ text.to(features.dtype).T


class ContrastiveCLIP(nn.Module):
    """FLYP's trained model: both towers of CLIP and its logit scale.

    ``forward(images, tokens)`` returns ``(image_features, text_features, scale)``;
    ``forward(None, tokens)`` returns the normalised text features alone (for the final head).
    """

    model: Any  # an open_clip CLIP: its encode_image / encode_text are called

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor | None, tokens: Tensor) -> Any:
        text = F.normalize(self.model.encode_text(tokens), dim=-1)
        if images is None:
            return text
        features = F.normalize(self.model.encode_image(images), dim=-1)
        return features, text, clip.logit_scale(self.model, max=100.0)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """The text tower through this module's forward (so DDP/FSDP hooks run)."""
        text: Tensor = self(None, tokens)
        return text


class TextClassifier(nn.Module):
    r"""CLIP-LoRA's trained model: both towers, the class texts encoded on every step.

    ``forward(images)`` returns the ``[batch, classes]`` logits :math:`s\,\hat f\,\hat T^\top`
    with :math:`\hat T` the normalised features of ``tokens`` (one prompt per class) through the
    text tower as it is now (so the gradient reaches the text tower's trained tensors);
    ``forward(None)`` returns :math:`\hat T` ``[classes, dim]`` alone (the head to export). The
    scale :math:`s` is the pre-trained model's, fixed, as CLIP-LoRA's ``logit_scale``.
    """

    model: Any

    def __init__(self, model: nn.Module, tokens: Tensor, scale: float):
        super().__init__()
        self.model = model
        self.register_buffer("tokens", tokens, persistent=False)
        self.scale = float(scale)

    def forward(self, images: Tensor | None) -> Tensor:
        text = F.normalize(self.model.encode_text(self.tokens), dim=-1)
        if images is None:
            return text
        features = F.normalize(self.model.encode_image(images), dim=-1)
        return self.scale * features @ text.to(features.dtype).T


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The submodules FSDP2 shards one by one: every transformer residual block.

    open_clip's ``VisionTransformer``/``TextTransformer`` keep their blocks in
    ``.transformer.resblocks``; a ResNet tower's stages (``layer1``..``layer4``) are used instead.
    """
    units: list[nn.Module] = []
    for sub in module.modules():
        blocks = getattr(getattr(sub, "transformer", None), "resblocks", None)
        if isinstance(blocks, nn.ModuleList):
            units.extend(blocks)
        if type(sub).__name__ == "ModifiedResNet":
            units.extend(sub.get_submodule(f"layer{i}") for i in (1, 2, 3, 4))
    return list(dict.fromkeys(units))  # a module reached twice is sharded once
