"""The demo's "pre-trained CLIP": a tiny open_clip model, contrastively pre-trained in minutes.

The model is a real ``open_clip.CLIP`` (a 2-layer ViT on 32×32 images with 8×8 patches and a
2-layer text transformer) with open_clip's real BPE tokenizer (shipped with open_clip, no
download) at a context length of 24. It starts from random weights and is pre-trained here on
the broad distribution of the rendered world (:func:`robustft.demo._data.pretrain_batch`: every
object under every attribute, with captions from a grammar) with
:func:`robustft.losses.clip_contrastive` -- CLIP's objective -- so the zero-shot model the
fine-tuning methods start from is genuinely zero-shot and robust to the domains it saw.

**The logit scale is CLIP's final 100**, reached by a schedule rather than learned (see
:func:`pretrain`): learned, as CLIP learns it, it does not grow in this toy -- a batch of 128
captions over 16 objects holds many near-duplicate captions, whose contrastive optimum is a soft
temperature -- and a scale fixed at 100 from random weights does not train (the loss stays at
log 128). So the scale rises log-linearly from CLIP's initial 1/0.07 to 100 over the first half
of pre-training and stays at 100: every method then runs at s = 100, its paper's own units.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import open_clip
import torch
from torch import Tensor

from robustft import clip, losses, tree
from robustft.demo._data import Splits, normalize, pretrain_batch

__all__ = [
    "IMAGE_PREPROCESS",
    "MODEL_CONFIG",
    "Tokenizer",
    "build_model",
    "build_tokenizer",
    "pretrain",
]

CONTEXT_LENGTH = 24
FINAL_SCALE = 100.0
"""CLIP's clamp of the learned logit scale, and the demo model's scale after pre-training."""
Tokenizer = Callable[..., Tensor]

MODEL_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"layers": 2, "width": 64, "patch_size": 8, "image_size": 32, "head_width": 32},
    "text_cfg": {
        "context_length": CONTEXT_LENGTH,
        "vocab_size": 49408,
        "width": 64,
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
``[0, 1]`` go to ``[-1, 1]`` (:func:`robustft.demo._data.normalize`); 32×32 images are not
resized, others bilinearly."""


def build_tokenizer() -> Any:
    """open_clip's BPE tokenizer (the standard 49,408-token vocabulary) at context length 24."""
    return open_clip.get_tokenizer("ViT-B-32", context_length=CONTEXT_LENGTH)


def build_model(*, seed: int = 0) -> open_clip.CLIP:
    """A randomly initialised tiny CLIP (0.2 M visual, 3.3 M text parameters), in eval mode.

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
    data: Splits,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    learned_scale: bool = False,
) -> dict[str, Any]:
    """Contrastive pre-training on (rendered scene, caption) pairs; updates ``model`` in place.

    The loop is functional: the parameters are a tree (:func:`robustft.tree.from_module`, the
    module's own tensors, so the optimiser updates the module), the features come from
    :func:`robustft.clip.image_features` / :func:`robustft.clip.text_features` and the loss is
    :func:`robustft.losses.clip_contrastive`. AdamW with a 5 % linear warm-up and a cosine decay.

    The logit scale :math:`s_t = \\exp\\big((1 - u)\\log(1/0.07) + u \\log 100\\big)`,
    :math:`u = \\min(1, 2t / T)`, rises from CLIP's initial value to its clamp over the first
    half of the :math:`T` steps and stays there; the model's ``logit_scale`` is set to
    :math:`\\log 100` at the end (see the module docstring for why it is not learned). With
    ``learned_scale`` it is learned instead, as CLIP does, clamped at 100 (the measurement the
    module docstring quotes: ``python -m robustft.demo --learned-scale``).

    Returns:
        ``{"scale": the final logit scale, "loss_first": ..., "loss_last": ...,
        "seen_tokens": set of the token ids the captions used}`` (the first and the mean of
        the last 20 steps' losses; start, end and padding ids are not tokens of a caption).
    """
    params = tree.from_module(model)
    scale_param = params["logit_scale"]
    rest = {k: v for k, v in params.items() if k != "logit_scale"}
    decay, no_decay = tree.partition(rest, lambda name: rest[name].ndim >= 2)
    groups: list[dict[str, Any]] = [
        {"params": list(decay.values())},
        {"params": list(no_decay.values()), "weight_decay": 0.0},
    ]
    if learned_scale:
        groups.append({"params": [scale_param], "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.1)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda t: min(1.0, (t + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * t / steps)),
    )
    start, end = math.log(1 / 0.07), math.log(FINAL_SCALE)
    g = torch.Generator().manual_seed(seed)
    losses_seen: list[float] = []
    seen: set[int] = set()
    for step in range(steps):
        images, captions = pretrain_batch(data, batch_size, g)
        tokens = tokenizer(captions)
        seen.update(torch.unique(tokens).tolist())
        f = clip.image_features(model, params, normalize(images))
        t = clip.text_features(model, params, tokens)
        if learned_scale:
            scale = scale_param.exp().clamp(max=FINAL_SCALE)
        else:
            u = min(1.0, 2 * step / steps)
            scale = torch.tensor(math.exp((1 - u) * start + u * end))
        loss = losses.clip_contrastive(f, t, logit_scale=scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        losses_seen.append(float(loss.detach()))
    with torch.no_grad():
        if learned_scale:
            scale_param.clamp_(max=end)
        else:
            scale_param.fill_(end)
    return {
        "scale": float(scale_param.detach().exp()),
        "loss_first": losses_seen[0],
        "loss_last": sum(losses_seen[-20:]) / len(losses_seen[-20:]),
        "seen_tokens": seen
        - {0, getattr(tokenizer, "sot_token_id", -1), getattr(tokenizer, "eot_token_id", -1)},
    }
