"""The demo's "pre-trained CLIP": a tiny open_clip model, contrastively pre-trained in seconds.

The model is a real ``open_clip.CLIP`` (a 2-layer ViT on 16×16 images with 4×4 patches and a
2-layer text transformer) with open_clip's real BPE tokenizer (shipped with open_clip, no
download) at a context length of 16. It starts from random weights and is pre-trained here on
the broad distribution of :func:`robustft.demo._data.broad_batch` with
:func:`robustft.losses.clip_contrastive` -- the same objective as CLIP's, with a learned logit
scale -- so the zero-shot model the fine-tuning methods start from is genuinely zero-shot and
robust to the shifts it saw during pre-training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import open_clip
import torch
from torch import Tensor

from robustft import clip, losses, tree
from robustft.demo._data import broad_batch, caption_tokens, normalize

__all__ = [
    "IMAGE_PREPROCESS",
    "MODEL_CONFIG",
    "Tokenizer",
    "build_model",
    "build_tokenizer",
    "pretrain",
]

CONTEXT_LENGTH = 16
Tokenizer = Callable[..., Tensor]

MODEL_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"layers": 2, "width": 64, "patch_size": 4, "image_size": 16, "head_width": 32},
    "text_cfg": {
        "context_length": CONTEXT_LENGTH,
        "vocab_size": 49408,
        "width": 32,
        "heads": 2,
        "layers": 2,
    },
}
"""The tiny CLIP as an open_clip model config (what :func:`build_model` builds)."""

IMAGE_PREPROCESS: dict[str, Any] = {
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "image_resize": "shortest",
    "image_interpolation": "bilinear",
}
"""The model's image preprocessing as :func:`robustft.recipes.load_model` arguments: images in
``[0, 1]`` go to ``[-1, 1]`` (:func:`robustft.demo._data.normalize`); 16×16 images are not
resized, others bilinearly (the demo's own upsampling)."""


def build_tokenizer() -> Any:
    """open_clip's BPE tokenizer (the standard 49,408-token vocabulary) at context length 16."""
    return open_clip.get_tokenizer("ViT-B-32", context_length=CONTEXT_LENGTH)


def build_model(*, seed: int = 0) -> open_clip.CLIP:
    """A randomly initialised tiny CLIP (0.1 M visual, 1.6 M text parameters), in eval mode.

    Eval mode is kept throughout: the ViT has no dropout or BatchNorm, so train and eval mode
    compute the same function, and the frozen teacher of KD/Lipsum-FT is the same module.
    """
    vision = open_clip.CLIPVisionCfg(**MODEL_CONFIG["vision_cfg"])
    text = open_clip.CLIPTextCfg(**MODEL_CONFIG["text_cfg"])
    with torch.random.fork_rng():  # seed the initialisation without touching the global RNG
        torch.manual_seed(seed)
        return open_clip.CLIP(
            embed_dim=MODEL_CONFIG["embed_dim"], vision_cfg=vision, text_cfg=text
        ).eval()


def pretrain(
    model: open_clip.CLIP,
    tokenizer: Tokenizer,
    images: Tensor,
    labels: Tensor,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
) -> None:
    """Contrastive pre-training on (shifted image, caption) pairs; updates ``model`` in place.

    The loop is functional: the parameters are a tree (:func:`robustft.tree.from_module`, the
    module's own tensors, so the optimiser updates the module), the features come from
    :func:`robustft.clip.image_features` / :func:`robustft.clip.text_features` and the loss is
    :func:`robustft.losses.clip_contrastive` with the learned, clamped logit scale. AdamW with a
    5 % linear warm-up and a cosine decay.
    """
    params = tree.from_module(model)
    decay, no_decay = tree.partition(params, lambda name: params[name].ndim >= 2)
    groups: list[dict[str, Any]] = [
        {"params": list(decay.values())},
        {"params": list(no_decay.values()), "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.1)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda t: min(1.0, (t + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * t / steps)),
    )
    table = caption_tokens(tokenizer)  # [captions, classes, context_length]
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y, template = broad_batch(images, labels, batch_size, g)
        f = clip.image_features(model, params, normalize(x))
        t = clip.text_features(model, params, table[template, y])
        scale = params["logit_scale"].exp().clamp(max=100.0)
        loss = losses.clip_contrastive(f, t, logit_scale=scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
