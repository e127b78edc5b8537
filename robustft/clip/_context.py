"""CoOp prompt contexts: learnable word vectors in place of the prompt's words (UEO's prompt)."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from robustft._checks import check_floating, check_int, describe
from robustft.clip._common import (
    Tokenizer,
    call_method,
    check_classnames,
    check_data_parallel,
    check_model,
    check_params,
    model_device,
    special_ids,
    unwrap,
)
from robustft.typing import Params

__all__ = ["encode_text_with_context", "init_context"]


def _token_embedding(fn: str, model: Any) -> nn.Embedding:
    """The text tower's token embedding: ``model.token_embedding`` (CLIP) or ``model.text``'s."""
    check_model(fn, model, "encode_text", wrapper_ok=True)
    model = unwrap(model)
    emb = getattr(model, "token_embedding", None)
    if isinstance(emb, nn.Embedding):
        return emb
    text = getattr(model, "text", None)
    emb = getattr(text, "token_embedding", None)
    if isinstance(emb, nn.Embedding):
        return emb
    tower = type(text).__name__ if isinstance(text, nn.Module) else "none"
    raise TypeError(
        f"{fn}: model must be an open_clip CLIP or CustomTextCLIP whose text tower embeds token "
        f"ids with an nn.Embedding token_embedding (open_clip's TextTransformer), got "
        f"{type(model).__name__} with text tower {tower}; Hugging Face (HFTextEncoder) and other "
        f"text towers are unsupported"
    )


def _body(fn: str, row: list[int], sot: int, eot: int, what: str) -> list[int]:
    """The tokens between SOT and the first EOT of a CLIP-layout row."""
    if not row or row[0] != sot or eot not in row:
        raise TypeError(
            f"{fn}: tokenizer must produce CLIP-layout rows [SOT, tokens, EOT, 0, ...] "
            f"(sot_token_id={sot}, eot_token_id={eot}), got {row[:8]!r}... for {what!r}"
        )
    return row[1 : row.index(eot)]


def init_context(model: nn.Module, tokenizer: Tokenizer, text: str = "a photo of a") -> Tensor:
    r"""A CoOp context initialised from the token embeddings of a prompt's words.

    With :math:`E` the text tower's token-embedding table and :math:`w_1..w_n` the token ids of
    ``text`` (without start and end tokens), the context is

    .. math::

        v_i = E[w_i], \quad i = 1..n ,

    a fresh leaf tensor with ``requires_grad=True``, so that :func:`encode_text_with_context` with
    this context reproduces ``encode_text`` of ``f"{text} {classname}."`` exactly. UEO trains
    :math:`n = 4` vectors from ``"a photo of a"``, shared by all classes. For CoOp's random
    initialisation use ``0.02 * torch.randn(n, width)`` instead.

    Args:
        model: an open_clip ``CLIP`` or ``CustomTextCLIP`` with a ``TextTransformer`` text tower.
        tokenizer: the model's CLIP BPE tokenizer (``open_clip.get_tokenizer(name)``).
        text: the prompt words the context replaces.

    Returns:
        ``[n_ctx, width]`` context in the token embedding's dtype and device.

    Raises:
        TypeError: on an unsupported text tower (Hugging Face) or a tokenizer without the CLIP
            layout, or a non-str ``text``.
        ValueError: if ``text`` has no tokens.

    Example:
        >>> import open_clip
        >>> model = open_clip.CLIP(8, open_clip.CLIPVisionCfg(layers=1, width=8, patch_size=8,
        ...     image_size=8, head_width=8), open_clip.CLIPTextCfg(width=8, heads=1, layers=1))
        >>> tok = open_clip.get_tokenizer("ViT-B-32")
        >>> ctx = init_context(model, tok, "a photo of a")
        >>> ctx.shape, ctx.requires_grad
        (torch.Size([4, 8]), True)
        >>> torch.equal(ctx[1], model.token_embedding.weight[1125])  # the id of "photo"
        True

    References:
        Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022 (CoOp),
        https://github.com/KaiyangZhou/CoOp; Liang et al., UEO, ICML 2024,
        https://github.com/tim-learn/UEO
    """
    fn = "init_context"
    embedding = _token_embedding(fn, model)
    sot, eot = special_ids(fn, tokenizer)
    if not isinstance(text, str):
        raise TypeError(f"{fn}: text must be a str such as 'a photo of a', got {describe(text)}")
    body = _body(fn, tokenizer([text])[0].tolist(), sot, eot, text)
    if not body:
        raise ValueError(f"{fn}: text must contain at least one token, got {text!r}")
    weight = embedding.weight.detach()
    ids = torch.tensor(body, device=weight.device)
    return weight.index_select(0, ids).clone().requires_grad_(True)


def _prompt_ids(
    fn: str, tokenizer: Tokenizer, names: list[str], n_ctx: int, sot: int, eot: int
) -> Tensor:
    """``[SOT][n_ctx placeholders][class tokens][.][EOT] 0...`` rows, truncated like open_clip.

    The placeholders are SOT ids: they are never read (their embeddings are replaced), they are
    not padding, and they stay below EOT so argmax pooling still finds the end token.
    """
    raw = tokenizer([f"{c}." for c in names])
    width = int(raw.shape[-1])
    if n_ctx > width - 2:
        raise ValueError(
            f"{fn}: context must have at most context_length - 2 = {width - 2} vectors, got {n_ctx}"
        )
    rows = []
    for name, row in zip(names, raw.tolist()):
        ids = [sot] * (1 + n_ctx) + _body(fn, row, sot, eot, name) + [eot]
        if len(ids) > width:  # open_clip's truncation: keep the first width - 1, end with EOT
            ids = [*ids[: width - 1], eot]
        rows.append(ids + [0] * (width - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


# Tokenised prompts per tokenizer (weakly held), keyed by everything the ids depend on: issue 13
# measured 43 ms per UEO step re-tokenising 1000 class prompts whose ids never change.
_PROMPTS: weakref.WeakKeyDictionary[Any, OrderedDict[tuple[Any, ...], Tensor]] = (
    weakref.WeakKeyDictionary()
)
_PROMPTS_PER_TOKENIZER = 8


def _cached_prompt_ids(
    fn: str,
    tokenizer: Tokenizer,
    names: list[str],
    n_ctx: int,
    sot: int,
    eot: int,
    device: torch.device,
) -> Tensor:
    """:func:`_prompt_ids` on ``device``, cached per tokenizer (LRU of a few class lists).

    Tokenizers that cannot be weakly referenced or hashed are tokenised on every call.
    """
    key = (tuple(names), n_ctx, sot, eot, getattr(tokenizer, "context_length", None), device)
    try:
        cache = _PROMPTS.get(tokenizer)
        if cache is None:
            cache = _PROMPTS[tokenizer] = OrderedDict()
    except TypeError:  # not weak-referenceable or unhashable
        return _prompt_ids(fn, tokenizer, names, n_ctx, sot, eot).to(device)
    ids = cache.get(key)
    if ids is None:
        ids = cache[key] = _prompt_ids(fn, tokenizer, names, n_ctx, sot, eot).to(device)
        if len(cache) > _PROMPTS_PER_TOKENIZER:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return ids


def encode_text_with_context(
    model: nn.Module,
    context: Tensor,
    classnames: Sequence[str],
    tokenizer: Tokenizer,
    *,
    params: Params | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Class embeddings of CoOp prompts: a learnable context in place of the prompt's words.

    Each class :math:`c` is encoded from the token sequence
    ``[SOT][ctx_1..ctx_n][class tokens][.][EOT]`` whose ``ctx`` positions carry the ``context``
    vectors :math:`v_1..v_n` instead of word embeddings:

    .. math::

        T_c = \frac{G\big([e_{\mathrm{SOT}}, v_1, \dots, v_n, e_{c,1}, \dots, e_{c,K}, e_{.},
              e_{\mathrm{EOT}}]\big)}{\lVert G(\cdot) \rVert_2} ,

    with :math:`G` the rest of the text tower exactly as the model's own ``encode_text`` runs it
    (positional embedding, causal ``attn_mask``, ``ln_final``, EOT pooling by argmax / the model's
    ``text_pool_type``, ``text_projection``, its cast dtype): the context is spliced into the
    output of the tower's ``token_embedding`` by a forward hook that lives only for this call.
    The result is differentiable w.r.t. ``context`` (and ``params``); with ``context`` from
    :func:`init_context` it equals ``model.encode_text(tokenizer([f"{text} {c}." ...]))``
    normalised. Long class names are truncated as open_clip's tokenizer truncates. The prompt
    token ids are built once per (tokenizer, class list, context length) and cached (a small LRU
    per tokenizer), so a training step does not re-tokenise the classes.

    **Many classes** (UEO at :math:`C = 1000`): every class prompt goes through the text tower
    with gradient, so the activations kept for the backward pass grow linearly in :math:`C`
    (about 25 GiB at ViT-B-16 depth for 1000 classes). ``chunk_size=k`` encodes ``k`` classes at
    a time under activation checkpointing (:func:`torch.utils.checkpoint.checkpoint`, non-reentrant):
    the forward keeps only each chunk's ``[k, dim]`` output, and the backward recomputes one chunk
    at a time, so peak activation memory is that of ``k`` prompts instead of :math:`C`. The
    trade-off is time: the text tower's forward runs twice (+22 % per UEO step measured at
    :math:`C = 1000` on a tiny tower by ``benchmarks/bench_clip.py``, peak memory 0.10×). Values and gradients are those of the unchunked call up to the
    floating-point rounding of batched matrix products (each row is computed from its own prompt
    only); without gradient (``torch.no_grad()`` or nothing requiring grad) the chunks run without
    checkpointing. Dropout in the text tower (none in open_clip's CLIP) replays the same RNG state
    in the recomputation.

    Data parallelism: pass a ``DistributedDataParallel`` wrapper as ``model`` to run the encoding
    through DDP's forward (see :func:`image_features`); a gradient-carrying call on the ``.module``
    of a live DDP raises. A context and ``params`` tensors that are not parameters of the module
    DDP wraps are yours to synchronise: ``robustft.distributed.replicate({"context": context,
    **params})`` once before training; under more than one rank the first backward pass refuses
    them otherwise.

    Args:
        model: an open_clip ``CLIP`` or ``CustomTextCLIP`` with a ``TextTransformer`` text tower;
            the module runs in its current train/eval mode.
        context: ``[n_ctx, width]`` context shared by all classes (UEO, CoOp), or
            ``[classes, n_ctx, width]`` class-specific contexts (CoOp's CSC).
        classnames: the :math:`C` class names.
        tokenizer: the model's CLIP BPE tokenizer.
        params: optional (partial) tree of parameters to encode with instead of the module's own.
        chunk_size: classes per checkpointed text-tower forward; ``None`` (default) encodes all
            classes in one forward without checkpointing.

    Returns:
        ``[classes, dim]`` L2-normalised class embeddings.

    Raises:
        TypeError: on an unsupported text tower (Hugging Face), a tokenizer without the CLIP
            layout, a non-floating ``context`` or a model whose ``encode_text`` does not embed
            tokens through its ``token_embedding`` exactly once.
        ValueError: on a context of the wrong rank, width or number of classes, too many context
            vectors for the context length, unknown ``params`` keys, ``chunk_size < 1``, or a
            trained call on the ``.module`` of a live ``DistributedDataParallel``; on the first
            backward pass under more than one rank, for a trained context or ``params`` tensor
            that nothing synchronises (see :func:`robustft.distributed.replicate`).

    Example:
        >>> import open_clip
        >>> model = open_clip.CLIP(8, open_clip.CLIPVisionCfg(layers=1, width=8, patch_size=8,
        ...     image_size=8, head_width=8), open_clip.CLIPTextCfg(width=8, heads=1, layers=1))
        >>> tok = open_clip.get_tokenizer("ViT-B-32")
        >>> ctx = init_context(model, tok, "a photo of a")
        >>> w = encode_text_with_context(model, ctx, ["cat", "dog"], tok)
        >>> plain = model.encode_text(tok(["a photo of a cat.", "a photo of a dog."]), normalize=True)
        >>> torch.equal(w, plain), w.requires_grad
        (True, True)

    References:
        Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022 (CoOp),
        https://github.com/KaiyangZhou/CoOp; Liang et al., "Realistic Unsupervised CLIP
        Fine-tuning with Universal Entropy Optimization", ICML 2024,
        https://github.com/tim-learn/UEO; https://github.com/mlfoundations/open_clip
    """
    fn = "encode_text_with_context"
    embedding = _token_embedding(fn, model)
    sot, eot = special_ids(fn, tokenizer)
    names = check_classnames(fn, classnames)
    check_floating(fn, "context", context, ndim=(2, 3))
    width = embedding.embedding_dim
    if context.shape[-1] != width:
        raise ValueError(
            f"{fn}: context.shape[-1] must equal the token embedding width {width}, got context "
            f"of shape {tuple(context.shape)}"
        )
    if context.ndim == 3 and context.shape[0] != len(names):
        raise ValueError(
            f"{fn}: a class-specific context [classes, n_ctx, width] must have one row per class "
            f"name ({len(names)}), got context of shape {tuple(context.shape)}"
        )
    if chunk_size is not None:
        check_int(fn, "chunk_size", chunk_size, low=1)
    tree = check_params(fn, model, params)
    check_data_parallel(fn, model, tree, extra={"context": context})
    n_ctx = int(context.shape[-2])
    ids = _cached_prompt_ids(fn, tokenizer, names, n_ctx, sot, eot, model_device(model))
    calls: list[tuple[int, ...]] = []

    def encode(rows: Tensor, ctx: Tensor) -> Tensor:
        def splice(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
            calls.append(tuple(output.shape))
            c = ctx.to(device=output.device, dtype=output.dtype)
            c = c.expand(output.shape[0], -1, -1) if c.ndim == 2 else c
            return torch.cat([output[:, :1], c, output[:, 1 + n_ctx :]], dim=1)

        handle = embedding.register_forward_hook(splice)
        try:
            out: Tensor = call_method(model, "encode_text", tree, rows)
        finally:
            handle.remove()
        return out

    n_cls = len(names)
    step = n_cls if chunk_size is None else min(chunk_size, n_cls)
    if step >= n_cls:
        features = encode(ids, context)
        expected = [(n_cls, ids.shape[1], width)]
    else:
        grad = torch.is_grad_enabled() and (
            context.requires_grad
            or any(p.requires_grad for p in unwrap(model).parameters())
            or any(v.requires_grad for v in (tree or {}).values())
        )
        parts, expected = [], []
        for start in range(0, n_cls, step):
            rows = ids[start : start + step]
            ctx = context if context.ndim == 2 else context[start : start + step]
            expected.append((rows.shape[0], ids.shape[1], width))
            if grad:
                parts.append(checkpoint(encode, rows, ctx, use_reentrant=False))
            else:
                parts.append(encode(rows, ctx))
        features = torch.cat(parts)
    if calls != expected:
        raise TypeError(
            f"{fn}: model.encode_text must embed the token ids once through its token_embedding "
            f"(as open_clip's CLIP and TextTransformer do), got {len(calls)} call(s) with output "
            f"shapes {calls}"
        )
    return F.normalize(features, dim=-1)
