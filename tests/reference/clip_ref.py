"""Naive references for robustft.clip, written from the papers and the authors' code.

Loops over classes, templates, images and texts; no batching tricks, no hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


def _fill(template: str | Callable[[str], str], name: str) -> str:
    return template.format(name) if isinstance(template, str) else template(name)


@torch.no_grad()
def zero_shot_head_ref(
    model: nn.Module, tokenizer: Callable, classnames: Sequence[str], templates: Sequence
) -> Tensor:
    """open_clip's ``build_zero_shot_classifier``, one class at a time, returned as [C, D]."""
    rows = []
    for c in classnames:
        emb = model.encode_text(tokenizer([_fill(t, c) for t in templates]), normalize=True)
        emb = emb.mean(dim=0)
        rows.append(emb / emb.norm())
    return torch.stack(rows)


@torch.no_grad()
def context_prototypes_ref(
    model: nn.Module, tokenizer: Callable, classnames: Sequence[str], templates: Sequence
) -> Tensor:
    """CAR-FT: w_m = normalise(mean_c normalise(text(template_m, class_c))), one template at a time."""
    rows = []
    for t in templates:
        emb = model.encode_text(tokenizer([_fill(t, c) for c in classnames]), normalize=True)
        emb = emb.mean(dim=0)
        rows.append(emb / emb.norm())
    return torch.stack(rows)


def coop_encode_ref(
    model: nn.Module, context: Tensor, tokenizer: Callable, classnames: Sequence[str]
) -> Tensor:
    """CoOp's PromptLearner + TextEncoder for an open_clip ``CLIP`` (argmax pooling, causal mask).

    As in KaiyangZhou/CoOp: tokenize ``"X X ... X {name}."``, embed, keep the SOT prefix and the
    class/EOT suffix embeddings, put the context in between, then run the text transformer.
    """
    n_ctx = context.shape[0]
    prompts = [" ".join(["X"] * n_ctx) + " " + name + "." for name in classnames]
    tokenized = tokenizer(prompts)
    with torch.no_grad():
        embedding = model.token_embedding(tokenized)
    prefix = embedding[:, :1, :]
    suffix = embedding[:, 1 + n_ctx :, :]
    ctx = context.unsqueeze(0).expand(len(classnames), -1, -1)
    x = torch.cat([prefix, ctx, suffix], dim=1)
    x = x + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)] @ model.text_projection
    return x / x.norm(dim=-1, keepdim=True)


def energy_gap_ref(f: Tensor, f0: Tensor, texts: Tensor, scale: float) -> Tensor:
    """Lipsum Eq. 6 per image: (1/2N) sum_n (s<f_b, t_n> - s<f0_b, t_n>)^2, double loop, [B]."""
    f = f / f.norm(dim=-1, keepdim=True)
    f0 = f0 / f0.norm(dim=-1, keepdim=True)
    texts = texts / texts.norm(dim=-1, keepdim=True)
    out = []
    for b in range(f.shape[0]):
        total = torch.zeros((), dtype=f.dtype)
        for n in range(texts.shape[0]):
            v = scale * torch.dot(f[b], texts[n])
            v0 = scale * torch.dot(f0[b], texts[n])
            total = total + (v - v0) ** 2
        out.append(total / (2 * texts.shape[0]))
    return torch.stack(out)


def official_norm_names(model: nn.Module) -> list[str]:
    """UEO's official rule: visual parameters whose name contains 'bn' or 'ln' (by substring)."""
    return [
        n
        for n, _ in model.named_parameters()
        if n.startswith("visual.") and ("bn" in n or "ln" in n)
    ]
