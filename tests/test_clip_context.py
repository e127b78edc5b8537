"""robustft.clip CoOp contexts: init from word embeddings, encode with the context spliced in."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from clip_models import (
    TEXT_WIDTH,
    tiny_custom_text_clip,
    tiny_resnet_clip,
    tiny_vit_clip,
    tokenizer,
)
from reference.clip_ref import coop_encode_ref
from torch import nn

from robustft import clip, tree

NAMES = ["cat", "golden retriever", "x" * 400]  # the last one is truncated by the tokenizer


@pytest.fixture(scope="module")
def tok() -> open_clip.tokenizer.SimpleTokenizer:
    return tokenizer()


MODELS = {
    "vit": tiny_vit_clip,
    "resnet": tiny_resnet_clip,
    "custom_text": tiny_custom_text_clip,
    "custom_bidirectional_last": lambda: tiny_custom_text_clip(
        pool_type="last", no_causal_mask=True
    ),
    "custom_linear_proj": lambda: tiny_custom_text_clip(proj_bias=True),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request: pytest.FixtureRequest) -> nn.Module:
    return MODELS[request.param]()


def _embedding(model: nn.Module) -> nn.Embedding:
    return (
        model.token_embedding if hasattr(model, "token_embedding") else model.text.token_embedding
    )


def test_init_context_is_the_word_embeddings(model: nn.Module, tok: object) -> None:
    ctx = clip.init_context(model, tok, "a photo of a")
    ids = tok(["a photo of a"])[0, 1:5]
    assert ctx.shape == (4, TEXT_WIDTH) and ctx.requires_grad and ctx.is_leaf
    assert torch.equal(ctx, _embedding(model).weight[ids])
    before = _embedding(model).weight.clone()
    with torch.no_grad():
        ctx.add_(1.0)  # a fresh tensor: training it never writes into the model
    assert torch.equal(_embedding(model).weight, before)


@pytest.mark.parametrize("prompt", ["a photo of a", "a photo"])
def test_context_at_init_equals_plain_encode_text_exactly(
    model: nn.Module, tok: object, prompt: str
) -> None:
    ctx = clip.init_context(model, tok, prompt)
    tokens = tok([f"{prompt} {c}." for c in NAMES])
    # with autograd on (training) ...
    ours = clip.encode_text_with_context(model, ctx, NAMES, tok)
    assert ours.requires_grad
    assert torch.equal(ours.detach(), model.encode_text(tokens, normalize=True).detach())
    # ... and off (nn.MultiheadAttention's inference fast path on both sides)
    with torch.no_grad():
        ours = clip.encode_text_with_context(model, ctx, NAMES, tok)
        assert torch.equal(ours, model.encode_text(tokens, normalize=True))


def test_random_context_matches_coop_reference(tok: object) -> None:
    model = tiny_vit_clip()
    ctx = 0.02 * torch.randn(4, TEXT_WIDTH)
    ours = clip.encode_text_with_context(model, ctx, NAMES[:2], tok)
    ref = coop_encode_ref(model, ctx, tok, NAMES[:2])
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    plain = clip.encode_text_with_context(model, clip.init_context(model, tok), NAMES[:2], tok)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the context really is used


def test_class_specific_context_equals_per_class_shared(tok: object) -> None:
    model = tiny_custom_text_clip()
    csc = 0.02 * torch.randn(2, 3, TEXT_WIDTH)
    ours = clip.encode_text_with_context(model, csc, NAMES[:2], tok)
    for c in range(2):
        one = clip.encode_text_with_context(model, csc[c], [NAMES[c]], tok)
        torch.testing.assert_close(ours[c : c + 1], one, rtol=0, atol=1e-6)


def test_gradcheck_wrt_context_float64(tok: object) -> None:
    model = copy.deepcopy(tiny_vit_clip()).double()
    ctx = (0.02 * torch.randn(2, TEXT_WIDTH, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda c: clip.encode_text_with_context(model, c, ["cat", "dog"], tok),
        (ctx,),
        fast_mode=True,
    )


def test_gradients_reach_context_and_only_selected_params(tok: object) -> None:
    model = tiny_vit_clip()
    for p in model.parameters():
        p.requires_grad_(False)
    params = dict(model.named_parameters())
    chosen, _ = tree.partition(params, ["ln_final.weight", "ln_final.bias"])
    chosen = {k: v.detach().clone().requires_grad_() for k, v in chosen.items()}
    ctx = clip.init_context(model, tok)
    out = clip.encode_text_with_context(model, ctx, NAMES[:2], tok, params=chosen)
    out[:, 0].sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in chosen.values())
    assert all(p.grad is None for p in model.parameters())


def test_torch_func_grad_matches_autograd(tok: object) -> None:
    model = tiny_vit_clip()
    target = torch.randn(2, 16)

    def loss(c: torch.Tensor) -> torch.Tensor:
        return (clip.encode_text_with_context(model, c, ["cat", "dog"], tok) * target).sum()

    ctx = clip.init_context(model, tok)
    loss(ctx).backward()
    assert ctx.grad is not None
    torch.testing.assert_close(torch.func.grad(loss)(ctx.detach()), ctx.grad, rtol=1e-4, atol=1e-5)


def test_hook_removed_and_context_not_mutated(tok: object) -> None:
    model = tiny_vit_clip()
    ctx = clip.init_context(model, tok)
    snapshot = ctx.detach().clone()
    clip.encode_text_with_context(model, ctx, NAMES[:1], tok)
    assert torch.equal(ctx, snapshot)
    assert not model.token_embedding._forward_hooks
    with pytest.raises(RuntimeError):  # a failing forward still removes the hook
        clip.encode_text_with_context(
            model, ctx, NAMES[:1], tok, params={"text_projection": torch.zeros(3, 3)}
        )
    assert not model.token_embedding._forward_hooks


def test_bf16_model(tok: object) -> None:
    model = copy.deepcopy(tiny_vit_clip()).to(torch.bfloat16)
    ctx = clip.init_context(model, tok)
    assert ctx.dtype == torch.bfloat16
    out = clip.encode_text_with_context(model, ctx.float(), NAMES[:2], tok)  # cast to the tower
    with torch.no_grad():
        plain = model.encode_text(tok([f"a photo of a {c}." for c in NAMES[:2]]), normalize=True)
    assert out.dtype == torch.bfloat16 and torch.equal(out.detach(), plain)


class HFTextEncoder(nn.Module):
    """Stands in for open_clip's Hugging Face text tower (no token_embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 2)


class FakeHFClip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.text = HFTextEncoder()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text.proj(tokens.float()[:, :2])


class BypassEmbedding(nn.Module):
    """Has a token_embedding but encode_text never calls it."""

    def __init__(self) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(49408, 4)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.float()[:, :4] + 1


def test_errors(tok: object) -> None:
    model = tiny_vit_clip()
    ctx = clip.init_context(model, tok)
    fn = "encode_text_with_context"
    with pytest.raises(TypeError, match=rf"{fn}: model must be an open_clip CLIP .*HFTextEncoder"):
        clip.encode_text_with_context(FakeHFClip(), ctx, NAMES, tok)
    with pytest.raises(TypeError, match=r"init_context: model must be an open_clip CLIP .*HFText"):
        clip.init_context(FakeHFClip(), tok)
    with pytest.raises(TypeError, match=rf"{fn}: model must be an open_clip model"):
        clip.encode_text_with_context("model", ctx, NAMES, tok)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=rf"{fn}: model.encode_text must embed the token ids once"):
        clip.encode_text_with_context(BypassEmbedding(), torch.zeros(2, 4), NAMES, tok)
    with pytest.raises(TypeError, match=rf"{fn}: tokenizer must be a CLIP BPE tokenizer"):
        clip.encode_text_with_context(model, ctx, NAMES, lambda t: torch.zeros(len(t), 77))
    with pytest.raises(TypeError, match=rf"{fn}: context must be a floating-point tensor"):
        clip.encode_text_with_context(model, ctx.long(), NAMES, tok)
    with pytest.raises(ValueError, match=rf"{fn}: context must have 2 or 3 dimension"):
        clip.encode_text_with_context(model, ctx[0], NAMES, tok)
    with pytest.raises(ValueError, match=rf"{fn}: context.shape\[-1\] must equal .* width 32"):
        clip.encode_text_with_context(model, ctx[:, :5], NAMES, tok)
    with pytest.raises(ValueError, match=rf"{fn}: a class-specific context .* \(3\)"):
        clip.encode_text_with_context(model, ctx.expand(2, -1, -1), NAMES, tok)
    with pytest.raises(ValueError, match=rf"{fn}: context must have at most context_length - 2"):
        clip.encode_text_with_context(model, torch.zeros(76, TEXT_WIDTH), NAMES, tok)
    with pytest.raises(TypeError, match=rf"{fn}: classnames must be a sequence of str"):
        clip.encode_text_with_context(model, ctx, "cat", tok)
    with pytest.raises(ValueError, match=rf"{fn}: params must name parameters .*'visual.nope'"):
        clip.encode_text_with_context(model, ctx, NAMES, tok, params={"visual.nope": ctx})
    with pytest.raises(ValueError, match=r"init_context: text must contain at least one token"):
        clip.init_context(model, tok, "   ")
    with pytest.raises(TypeError, match=r"init_context: text must be a str"):
        clip.init_context(model, tok, ["a photo"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"init_context: tokenizer must be a CLIP BPE tokenizer"):
        clip.init_context(model, object(), "a photo")  # type: ignore[arg-type]

    class BadLayout:
        sot_token_id, eot_token_id = 49406, 49407

        def __call__(self, texts: list[str]) -> torch.Tensor:
            return torch.ones(len(texts), 77, dtype=torch.long)

    with pytest.raises(TypeError, match=r"init_context: tokenizer must produce CLIP-layout rows"):
        clip.init_context(model, BadLayout(), "a photo")  # type: ignore[arg-type]


# ---------------------------------------------------------------- issue 13: caching and chunks


def test_prompt_ids_are_tokenised_once_per_class_list(tok: object) -> None:
    model = tiny_vit_clip()
    ctx = clip.init_context(model, tok)

    class Counting:
        sot_token_id, eot_token_id, context_length = 49406, 49407, 77

        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, texts: list[str]) -> torch.Tensor:
            self.calls += 1
            return tok(texts)  # type: ignore[operator]

    counting = Counting()
    first = clip.encode_text_with_context(model, ctx, NAMES, counting)
    calls = counting.calls
    for _ in range(3):
        again = clip.encode_text_with_context(model, ctx, NAMES, counting)
        assert torch.equal(again, first)
    assert counting.calls == calls  # cached: no re-tokenisation
    clip.encode_text_with_context(model, ctx, ["dog"], counting)
    assert counting.calls == calls + 1  # another class list is tokenised (and cached)
    clip.encode_text_with_context(model, ctx[:2], NAMES, counting)
    assert counting.calls == calls + 2  # another context length too
    clip.encode_text_with_context(model, ctx, list(NAMES), counting)
    assert counting.calls == calls + 2  # an equal list hits the cache


def test_prompt_cache_with_an_unhashable_tokenizer(tok: object) -> None:
    model = tiny_vit_clip()
    ctx = clip.init_context(model, tok)

    class Unhashable:
        sot_token_id, eot_token_id = 49406, 49407
        __hash__ = None  # type: ignore[assignment]

        def __call__(self, texts: list[str]) -> torch.Tensor:
            return tok(texts)  # type: ignore[operator]

    out = clip.encode_text_with_context(model, ctx, NAMES, Unhashable())
    assert torch.equal(out, clip.encode_text_with_context(model, ctx, NAMES, tok))


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 100])
def test_chunked_checkpointed_encoding_equals_plain(tok: object, chunk_size: int) -> None:
    model = tiny_vit_clip()
    for p in model.parameters():
        p.requires_grad_(False)
    names = ["cat", "dog", "golden retriever", "car", "tree"]
    chosen = {"ln_final.weight": model.ln_final.weight.detach().clone().requires_grad_()}
    target = torch.randn(len(names), 16)
    grads = []
    for size in (None, chunk_size):
        ctx = clip.init_context(model, tok)
        out = clip.encode_text_with_context(model, ctx, names, tok, params=chosen, chunk_size=size)
        (out * target).sum().backward()
        grads.append((out.detach(), ctx.grad.clone(), chosen["ln_final.weight"].grad.clone()))
        chosen["ln_final.weight"].grad = None
    (plain, g_ctx, g_w), (chunked, c_ctx, c_w) = grads
    torch.testing.assert_close(chunked, plain, rtol=0, atol=1e-6)
    # gradients sum over classes in another order: float32 rounding only
    torch.testing.assert_close(c_ctx, g_ctx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c_w, g_w, rtol=1e-4, atol=1e-5)
    if chunk_size >= len(names):
        assert torch.equal(chunked, plain)  # one chunk is the plain call


def test_chunked_class_specific_context_and_no_grad(tok: object) -> None:
    model = tiny_custom_text_clip()
    csc = 0.02 * torch.randn(3, 2, TEXT_WIDTH)
    plain = clip.encode_text_with_context(model, csc, NAMES, tok)
    chunked = clip.encode_text_with_context(model, csc, NAMES, tok, chunk_size=2)
    torch.testing.assert_close(chunked, plain, rtol=0, atol=1e-6)
    with torch.no_grad():
        out = clip.encode_text_with_context(model, csc, NAMES, tok, chunk_size=1)
    torch.testing.assert_close(out, plain.detach(), rtol=0, atol=1e-6)


def test_chunked_gradcheck_float64(tok: object) -> None:
    model = copy.deepcopy(tiny_vit_clip()).double()
    ctx = (0.02 * torch.randn(2, TEXT_WIDTH, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda c: clip.encode_text_with_context(model, c, ["cat", "dog", "car"], tok, chunk_size=2),
        (ctx,),
        fast_mode=True,
    )


def test_chunked_encoding_bounds_peak_memory(tok: object) -> None:
    from _memory import peak_alloc_bytes

    model = tiny_vit_clip()
    for p in model.parameters():
        p.requires_grad_(False)
    names = [f"class {i}" for i in range(64)]
    ctx = clip.init_context(model, tok)
    clip.encode_text_with_context(model, ctx, names, tok)  # warm the prompt cache

    def step(chunk_size: int | None) -> None:
        out = clip.encode_text_with_context(model, ctx, names, tok, chunk_size=chunk_size)
        out.square().sum().backward()

    plain = peak_alloc_bytes(lambda: step(None))
    chunked = peak_alloc_bytes(lambda: step(8))
    assert chunked <= plain / 4, (chunked, plain)


def test_chunk_size_errors(tok: object) -> None:
    model = tiny_vit_clip()
    ctx = clip.init_context(model, tok)
    fn = "encode_text_with_context"
    with pytest.raises(ValueError, match=rf"{fn}: chunk_size must be an int >= 1, got 0"):
        clip.encode_text_with_context(model, ctx, NAMES, tok, chunk_size=0)
    with pytest.raises(TypeError, match=rf"{fn}: chunk_size must be an int, got 2.0"):
        clip.encode_text_with_context(model, ctx, NAMES, tok, chunk_size=2.0)  # type: ignore[arg-type]
