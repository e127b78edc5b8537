"""robustft.peft on modules: attach_, fold_, attached; the explicit attention path; adapter dropping.

On a tiny open_clip ViT model (both towers) and on bare ``nn.MultiheadAttention`` / ``nn.Linear``:
fresh factors leave the outputs bit-for-bit unchanged, folded weights give the reparametrised
forward, gradients reach the factors only, the hooks put the weights back (also on an exception),
CLIP-LoRA's branch dropout equals ``nn.MultiheadAttention`` in eval mode and a hand computation in
training mode, and R-Adapter's adapter dropping keeps each update with probability ``1 - p``.

A note on exactness: PyTorch's CPU ``F.linear`` on a non-contiguous input picks its kernel by
whether the weight requires grad, and ``nn.MultiheadAttention``'s fast path by whether anything
does; so a bit-exact reference runs the base model with the same ``requires_grad`` flags as the
model under test (:func:`_with_flags`).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from clip_models import tiny_vit_clip
from torch import Tensor, nn

from robustft import clip, peft

IMAGES = 2
TEXTS = 2

SPECS = {
    "lora": peft.lora(
        rank=2, alpha=4, targets=["*in_proj_weight", "*out_proj.weight", "*mlp.c_fc.weight"]
    ),
    "lora-qkv": peft.lora(
        rank=2,
        alpha=4,
        targets=["*in_proj_weight", "*out_proj.weight"],
        qkv=("q", "v"),
        scaling="sqrt_rank",
    ),
    "adapter": peft.adapter(targets=["*attn.out_proj.weight", "*mlp.c_proj.weight"]),
    "adapter-r2": peft.adapter(targets=["*in_proj_weight", "*mlp.c_proj.weight"], rank=2),
}


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_vit_clip()


def _inputs() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(11)
    images = torch.randn(IMAGES, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 49407, (TEXTS, 77), generator=g)
    tokens[:, 9:] = 0
    tokens[:, 8] = 49407  # an end-of-text token, so argmax pooling reads a fixed position
    return images, tokens


def _random(factors: dict[str, Tensor], seed: int, scale: float = 0.2) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(v.shape, generator=g) for k, v in factors.items()}


def _with_flags(model: nn.Module, trained: list[str] | None) -> nn.Module:
    """A copy of ``model`` whose parameters require grad exactly for ``trained`` (None: all)."""
    ref = copy.deepcopy(model)
    if trained is not None:
        ref.requires_grad_(False)
        for k in trained:
            ref.get_parameter(k).requires_grad_(True)
    return ref


def _loaded(model: nn.Module, tree: dict[str, Tensor], trained: list[str] | None) -> nn.Module:
    ref = _with_flags(model, trained)
    missing, unexpected = ref.load_state_dict(tree, strict=False)
    assert not unexpected and not set(missing) & set(dict(ref.named_parameters()))
    return ref


def _features(m: nn.Module) -> tuple[Tensor, Tensor]:
    images, tokens = _inputs()
    return m.encode_image(images), m.encode_text(tokens)


def _no_hooks(module: nn.Module) -> None:
    for name, m in module.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name
        assert not m._forward_hooks_always_called, name
        assert "forward" not in m.__dict__, name


# ---------------------------------------------------------------- fresh factors: no change


@pytest.mark.parametrize("which", list(SPECS))
def test_fresh_factors_leave_both_towers_unchanged(model: nn.Module, which: str) -> None:
    spec = SPECS[which]
    base = dict(model.named_parameters())
    f = peft.init(spec, base, generator=torch.Generator().manual_seed(0))
    touched = sorted(peft.delta(spec, f, base=base))
    images, tokens = _inputs()
    # functional: the factors are trained leaves, the base is the module's own parameters
    want_i, want_t = model.encode_image(images), model.encode_text(tokens)
    leaves = {k: v.clone().requires_grad_(True) for k, v in f.items()}
    w = peft.apply(spec, leaves, base=base)
    assert sorted(w) == touched
    assert torch.equal(clip.image_features(model, w, images, normalize=False), want_i)
    assert torch.equal(clip.text_features(model, w, tokens, normalize=False), want_t)
    # attached: the reference has the attached model's requires_grad flags
    ref_i, ref_t = _features(_with_flags(model, touched))
    att = peft.attach_(copy.deepcopy(model), spec, f)
    got_i, got_t = _features(att)
    assert torch.equal(got_i, ref_i) and torch.equal(got_t, ref_t)
    torch.testing.assert_close(got_i, want_i, rtol=0, atol=1e-5)  # other kernels, same maths
    with torch.no_grad():  # and without autograd (MHA's fast path) on both sides
        ref_i, ref_t = _features(model)
        got_i, got_t = _features(att)
    assert torch.equal(got_i, ref_i)
    torch.testing.assert_close(got_t, ref_t, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- folded weights


@pytest.mark.parametrize("which", list(SPECS))
def test_folded_weights_give_the_reparametrised_forward(model: nn.Module, which: str) -> None:
    spec = SPECS[which]
    base = {k: v.detach() for k, v in model.named_parameters()}
    f = _random(peft.init(spec, base), 1)
    folded = peft.fold(spec, f, base=base)
    assert sorted(folded) == sorted(base) and not any(peft.is_factor(k) for k in folded)
    ref_i, ref_t = _features(_loaded(model, folded, None))
    base_i, base_t = _features(model)
    assert (ref_i - base_i).abs().max() > 1e-3 and (ref_t - base_t).abs().max() > 1e-3
    # the functional path
    images, tokens = _inputs()
    w = peft.apply(spec, f, base=base)
    torch.testing.assert_close(clip.image_features(model, w, images, normalize=False), ref_i)
    torch.testing.assert_close(clip.text_features(model, w, tokens, normalize=False), ref_t)
    # the attached path
    att = peft.attach_(copy.deepcopy(model), spec, f)
    got_i, got_t = _features(att)
    torch.testing.assert_close(got_i, ref_i, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_t, ref_t, rtol=1e-5, atol=1e-6)
    # fold_ in place equals fold, and returns the factors
    back = peft.fold_(att)
    assert sorted(back) == sorted(f) and all(torch.equal(back[k], f[k]) for k in f)
    now = dict(att.named_parameters())
    assert sorted(now) == sorted(folded)
    for k in folded:
        assert torch.equal(now[k], folded[k]), k
    assert not any(p.requires_grad for p in att.parameters())  # base flags stay False
    ref_i, ref_t = _features(_loaded(model, folded, []))
    got_i, got_t = _features(att)
    assert torch.equal(got_i, ref_i) and torch.equal(got_t, ref_t)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("which", ["lora-qkv", "adapter-r2"])
def test_gradients_reach_the_factors_only(model: nn.Module, which: str) -> None:
    spec = SPECS[which]
    base = {k: v.detach() for k, v in model.named_parameters()}
    f = _random(peft.init(spec, base), 2)
    images, tokens = _inputs()
    head = torch.randn(16, generator=torch.Generator().manual_seed(3))
    # attached
    att = peft.attach_(copy.deepcopy(model), spec, f)
    trainable = {n for n, p in att.named_parameters() if p.requires_grad}
    assert trainable == set(f)
    loss = (att.encode_image(images) @ head).square().sum() + (att.encode_text(tokens) @ head).sum()
    loss.backward()
    with_grad = {n for n, p in att.named_parameters() if p.grad is not None}
    assert with_grad == set(f)
    grads_att = {n: p.grad for n, p in att.named_parameters() if p.grad is not None}
    assert all(bool(g.abs().max() > 0) for g in grads_att.values())
    # functional: grad w.r.t. the factors, base tensors detached
    leaves = {k: v.clone().requires_grad_(True) for k, v in f.items()}
    w = peft.apply(spec, leaves, base=base)
    assert all(v.requires_grad for v in w.values())
    assert not any(v.requires_grad for v in base.values())
    frozen = copy.deepcopy(model).requires_grad_(False)
    loss = (clip.image_features(frozen, w, images, normalize=False) @ head).square().sum() + (
        clip.text_features(frozen, w, tokens, normalize=False) @ head
    ).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    for k, g in zip(leaves, grads):
        torch.testing.assert_close(g, grads_att[k], rtol=1e-4, atol=1e-6)
    assert all(v.grad is None for v in base.values())


# ---------------------------------------------------------------- attach_ details


def test_attach_flags_names_spec_and_fold_restores_a_plain_module(model: nn.Module) -> None:
    spec = SPECS["lora-qkv"]
    m = copy.deepcopy(model)
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    f = _random(peft.init(spec, before), 4)
    assert peft.attached(m) is None
    assert peft.attach_(m, spec, f) is m
    assert peft.attached(m) is spec
    named = dict(m.named_parameters())
    assert set(named) == set(before) | set(f)
    for k, v in f.items():
        assert isinstance(named[k], nn.Parameter) and named[k].requires_grad
        assert torch.equal(named[k], v) and named[k] is not v  # a copy
    assert not any(named[k].requires_grad for k in before)
    # the factors travel with the module's state dict and split back out
    factors, rest = peft.split(named)
    assert sorted(factors) == sorted(f) and sorted(rest) == sorted(before)
    assert set(f) <= set(m.state_dict())
    # the weights themselves are the untouched parameters outside a forward
    _features(m)
    for k in before:
        assert torch.equal(named[k], before[k]) and dict(m.named_parameters())[k] is named[k]
    with pytest.raises(ValueError, match=r"attach_: module already has factors attached"):
        peft.attach_(m, spec, f)
    peft.fold_(m)
    assert peft.attached(m) is None and not hasattr(m, "_robustft_peft")
    assert sorted(dict(m.named_parameters())) == sorted(before)
    _no_hooks(m)
    # and it can be attached again
    peft.attach_(m, spec, peft.init(spec, dict(m.named_parameters())))
    assert peft.attached(m) is spec


def test_fold_restores_the_forward_of_an_explicit_attention(model: nn.Module) -> None:
    spec = peft.lora(rank=2, alpha=2, targets=["*in_proj_weight", "*c_fc.weight"], dropout=0.5)
    m = peft.attach_(copy.deepcopy(model), spec, peft.init(spec, dict(model.named_parameters())))
    attn = m.visual.transformer.resblocks[0].attn
    assert "forward" in attn.__dict__  # the explicit attention is an instance forward
    assert m.visual.transformer.resblocks[0].mlp.c_fc._forward_hooks
    peft.fold_(m)
    _no_hooks(m)
    assert type(attn).forward is nn.MultiheadAttention.forward


def test_hooks_put_the_weight_back_when_the_forward_raises() -> None:
    net = nn.Sequential(nn.Linear(3, 2))
    w0, b0 = net[0].weight, net[0].bias
    for spec in (peft.lora(rank=1, alpha=1, targets="0.weight"), peft.adapter(targets="0.weight")):
        m = copy.deepcopy(net)
        w0, b0 = m[0].weight, m[0].bias
        peft.attach_(m, spec, _random(peft.init(spec, dict(m.named_parameters())), 0))
        with pytest.raises(RuntimeError):
            m(torch.randn(4, 5))  # wrong width: F.linear raises inside the forward
        assert m[0]._parameters["weight"] is w0 and m[0]._parameters["bias"] is b0
        m(torch.randn(4, 3))
        assert m[0]._parameters["weight"] is w0
    # on an attention module, whose pre-hook swaps out_proj's weight
    mha = nn.MultiheadAttention(8, 2)
    w0 = mha.out_proj.weight
    spec = peft.lora(rank=1, alpha=1, targets="out_proj.weight")
    peft.attach_(mha, spec, peft.init(spec, dict(mha.named_parameters())))
    x = torch.randn(3, 1, 6)
    with pytest.raises(AssertionError):
        mha(x, x, x)  # embed dim 6 != 8
    assert mha.out_proj._parameters["weight"] is w0


def test_out_proj_of_a_multihead_attention_is_hooked_on_the_attention() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    base = {k: v.detach().clone() for k, v in mha.named_parameters()}
    for spec in (
        peft.lora(rank=2, alpha=2, targets="out_proj.weight"),
        peft.adapter(targets="out_proj.weight"),
    ):
        f = _random(peft.init(spec, base), 5)
        ref = _loaded(mha, peft.fold(spec, f, base=base), None)
        att = peft.attach_(copy.deepcopy(mha), spec, f)
        assert att._forward_pre_hooks and not att.out_proj._forward_pre_hooks
        x = torch.randn(2, 5, 8)
        got, gw = att(x, x, x)
        want, ww = ref(x, x, x)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(gw, ww)
        assert (got - mha(x, x, x)[0]).abs().max() > 1e-3
        if spec.kind == "adapter":  # its bias is transformed too
            assert sorted(peft.delta(spec, f, base=base)) == ["out_proj.bias", "out_proj.weight"]


def test_a_top_level_weight_and_a_nested_linear() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    spec = peft.adapter(targets="weight", rank=1)
    base = {k: v.detach().clone() for k, v in lin.named_parameters()}
    f = _random(peft.init(spec, base), 6, scale=0.5)
    ref = _loaded(lin, peft.fold(spec, f, base=base), None)
    att = peft.attach_(copy.deepcopy(lin), spec, f)
    assert sorted(n for n, _ in att.named_parameters()) == [
        "bias",
        "weight",
        "weight_adapter_A",
        "weight_adapter_B",
    ]
    x = torch.randn(5, 4)
    torch.testing.assert_close(att(x), ref(x))


# ---------------------------------------------------------------- the explicit attention path

E, H = 8, 2


def _mha(batch_first: bool) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    m = nn.MultiheadAttention(E, H, batch_first=batch_first)
    with torch.no_grad():
        m.in_proj_bias.normal_()
        m.out_proj.bias.normal_()
    return m.eval()


DROPOUT_SPECS = {
    "in+out": peft.lora(
        rank=2, alpha=2, targets=["in_proj_weight", "out_proj.weight"], dropout=0.3
    ),
    "qkv-in": peft.lora(
        rank=2, alpha=3, targets="in_proj_weight", qkv=("k", "v"), dropout=0.3, scaling="sqrt_rank"
    ),
    "out": peft.lora(rank=1, alpha=1, targets="out_proj.weight", dropout=0.3),
}


def _attention_case(case: str, batch_first: bool) -> tuple[tuple[Tensor, ...], dict[str, Any]]:
    """(query, key, value) and keyword arguments of one call, N = 2, L = 5, S = 4 (L = S = 5 for
    self-attention and causal cases)."""
    g = torch.Generator().manual_seed(hash(case) % 1000)
    n, length = 2, 5
    source = length if case in ("self", "causal", "causal-kpm") else 4

    def seq(t: int) -> Tensor:
        x = torch.randn(t, n, E, generator=g)
        return x.transpose(0, 1).contiguous() if batch_first else x

    q = seq(length)
    if case in ("self", "causal", "causal-kpm"):
        k = v = q
    else:
        k, v = seq(source), seq(source)
    if case == "unbatched":
        q, k, v = q[0] if batch_first else q[:, 0], k[0] if batch_first else k[:, 0], None
        v = torch.randn(source, E, generator=g)

    def bool_mask(*shape: int) -> Tensor:
        m = torch.rand(*shape, generator=g) < 0.4
        m[..., 0] = False  # every query keeps one key
        return m

    kw: dict[str, Any] = {}
    if case == "bool2d":
        kw["attn_mask"] = bool_mask(length, source)
    elif case == "float2d":
        kw["attn_mask"] = torch.randn(length, source, generator=g)
    elif case == "bool3d":
        kw["attn_mask"] = bool_mask(n * H, length, source)
    elif case == "float3d":
        kw["attn_mask"] = torch.randn(n * H, length, source, generator=g)
    elif case == "kpm-bool":
        kw["key_padding_mask"] = bool_mask(n, source)
    elif case == "kpm-float":
        kw["key_padding_mask"] = torch.randn(n, source, generator=g)
    elif case == "both":
        kw["attn_mask"] = bool_mask(length, source)
        kw["key_padding_mask"] = bool_mask(n, source)
    elif case in ("causal", "causal-kpm"):
        kw["attn_mask"] = torch.full((length, source), -math.inf).triu(1)
        kw["is_causal"] = True
        if case == "causal-kpm":
            kpm = torch.zeros(n, source)
            kpm[1, -1] = -math.inf
            kw["key_padding_mask"] = kpm
    elif case == "unbatched":
        kw["attn_mask"] = bool_mask(H, length, source)
        kw["key_padding_mask"] = bool_mask(source)
    return (q, k, v), kw


CASES = [
    "plain",
    "self",
    "bool2d",
    "float2d",
    "bool3d",
    "float3d",
    "kpm-bool",
    "kpm-float",
    "both",
    "causal",
    "causal-kpm",
    "unbatched",
]
WEIGHTS = {"no-weights": (False, True), "averaged": (True, True), "per-head": (True, False)}


@pytest.mark.parametrize("which", list(DROPOUT_SPECS))
@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize("case", CASES)
def test_explicit_attention_equals_torch_in_eval(
    case: str, batch_first: bool, weights: str, which: str
) -> None:
    spec = DROPOUT_SPECS[which]
    mha = _mha(batch_first)
    base = {k: v.detach().clone() for k, v in mha.named_parameters()}
    f = _random(peft.init(spec, base), 7)
    ref = _loaded(mha, peft.fold(spec, f, base=base), None)
    att = peft.attach_(copy.deepcopy(mha), spec, f).eval()
    assert "forward" in att.__dict__
    args, kw = _attention_case(case, batch_first)
    need, average = WEIGHTS[weights]
    kw = {**kw, "need_weights": need, "average_attn_weights": average}
    got, gw = att(*args, **kw)
    want, ww = ref(*args, **kw)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if need:
        assert gw is not None and ww is not None and gw.shape == ww.shape
        torch.testing.assert_close(gw, ww, rtol=1e-5, atol=1e-6)
    else:
        assert gw is None and ww is None
    assert (got - mha(*args, **kw)[0]).abs().max() > 1e-3  # the factors do something


def test_explicit_attention_without_biases() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, bias=False, batch_first=True).eval()
    assert mha.in_proj_bias is None and mha.out_proj.bias is None
    spec = DROPOUT_SPECS["in+out"]
    base = {k: v.detach().clone() for k, v in mha.named_parameters()}
    f = _random(peft.init(spec, base), 15)
    ref = _loaded(mha, peft.fold(spec, f, base=base), None)
    att = peft.attach_(copy.deepcopy(mha), spec, f).eval()
    q, k = torch.randn(2, 5, E), torch.randn(2, 3, E)
    got, gw = att(q, k, k)
    want, ww = ref(q, k, k)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, ww, rtol=1e-5, atol=1e-6)


def test_explicit_attention_builds_the_causal_mask_itself() -> None:
    spec = DROPOUT_SPECS["in+out"]
    mha = _mha(True)
    base = {k: v.detach().clone() for k, v in mha.named_parameters()}
    f = _random(peft.init(spec, base), 8)
    ref = _loaded(mha, peft.fold(spec, f, base=base), None)
    att = peft.attach_(copy.deepcopy(mha), spec, f).eval()
    x = torch.randn(2, 5, E)
    causal = torch.full((5, 5), -math.inf).triu(1)
    for need in (False, True):
        got = att(x, x, x, is_causal=True, need_weights=need)[0]
        want = ref(x, x, x, attn_mask=causal, is_causal=True, need_weights=need)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _heads(x: Tensor, n: int) -> Tensor:
    """[T, N, E] -> [N, H, T, E/H]."""
    t = x.shape[0]
    return x.reshape(t, n, H, E // H).permute(1, 2, 0, 3)


@pytest.mark.parametrize("which", list(DROPOUT_SPECS))
def test_explicit_attention_in_training_equals_a_hand_computation(which: str) -> None:
    spec = DROPOUT_SPECS[which]
    p, s = spec.dropout, spec.scale
    mha = _mha(False)  # attention-weight dropout 0, as open_clip's
    base = {k: v.detach().clone() for k, v in mha.named_parameters()}
    f = _random(peft.init(spec, base), 9)
    att = peft.attach_(copy.deepcopy(mha), spec, f).train()
    length, source, n = 5, 4, 3
    query, key, value = (
        torch.randn(length, n, E),
        torch.randn(source, n, E),
        torch.randn(source, n, E),
    )
    torch.manual_seed(1234)
    got, weights = att(query, key, value, need_weights=True)
    torch.manual_seed(1234)
    got2, _ = att(query, key, value, need_weights=False)
    torch.testing.assert_close(got2, got, rtol=1e-5, atol=1e-6)

    # y = W x + b + s B A drop(x), one dropout draw per branch in the order q, k, v, then out
    torch.manual_seed(1234)
    w, b = base["in_proj_weight"], base["in_proj_bias"]
    ws, bs = w.chunk(3), b.chunk(3)
    inputs = {"q": query, "k": key, "v": value}
    proj = {blk: inputs[blk] @ ws[i].T + bs[i] for i, blk in enumerate("qkv")}
    name = "in_proj_weight"
    if f"{name}_lora_A" in f:
        a, bb = f[f"{name}_lora_A"], f[f"{name}_lora_B"].chunk(3)
        for i, blk in enumerate("qkv"):
            proj[blk] = proj[blk] + s * F.dropout(inputs[blk], p, training=True) @ a.T @ bb[i].T
    for blk in spec.qkv or ():
        a, bb = f[f"{name}_lora_A_{blk}"], f[f"{name}_lora_B_{blk}"]
        proj[blk] = proj[blk] + s * F.dropout(inputs[blk], p, training=True) @ a.T @ bb.T
    qh, kh, vh = _heads(proj["q"], n), _heads(proj["k"], n), _heads(proj["v"], n)
    probs = (qh @ kh.transpose(-2, -1) / math.sqrt(E // H)).softmax(-1)
    out = (probs @ vh).permute(2, 0, 1, 3).reshape(length, n, E)
    y = out @ base["out_proj.weight"].T + base["out_proj.bias"]
    if "out_proj.weight_lora_A" in f:
        a, bb = f["out_proj.weight_lora_A"], f["out_proj.weight_lora_B"]
        y = y + s * F.dropout(out, p, training=True) @ a.T @ bb.T
    torch.testing.assert_close(got, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights, probs.mean(1), rtol=1e-5, atol=1e-6)
    # the dropout does something: the eval forward differs
    assert (att.eval()(query, key, value)[0] - got).abs().max() > 1e-4


def test_linear_branch_with_dropout() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2))
    spec = peft.lora(rank=2, alpha=2, targets=["0.weight", "2.weight"], dropout=0.5)
    base = {k: v.detach().clone() for k, v in net.named_parameters()}
    f = _random(peft.init(spec, base), 10, scale=0.5)
    att = peft.attach_(copy.deepcopy(net), spec, f)
    assert att[0]._forward_hooks and att[2]._forward_hooks and not att[0]._forward_pre_hooks
    x = torch.randn(7, 6)
    # eval: the folded model
    ref = _loaded(net, peft.fold(spec, f, base=base), None)
    torch.testing.assert_close(att.eval()(x), ref(x))
    # train: y = W x + b + s B A drop(x) for each layer, the draws in forward order
    att.train()
    torch.manual_seed(42)
    got = att(x)
    torch.manual_seed(42)
    s = spec.scale
    h = x @ base["0.weight"].T + base["0.bias"]
    h = h + s * F.dropout(x, 0.5, True) @ f["0.weight_lora_A"].T @ f["0.weight_lora_B"].T
    h = torch.tanh(h)
    y = h @ base["2.weight"].T + base["2.bias"]
    y = y + s * F.dropout(h, 0.5, True) @ f["2.weight_lora_A"].T @ f["2.weight_lora_B"].T
    torch.testing.assert_close(got, y)
    assert (got - ref(x)).abs().max() > 1e-4
    # gradients reach the factors through the branch
    got.sum().backward()
    assert {n for n, q in att.named_parameters() if q.grad is not None} == set(f)


@pytest.mark.parametrize("qkv", [None, ("q", "k", "v")])
def test_dropout_spec_on_clip_in_eval_equals_the_folded_model(
    model: nn.Module, qkv: tuple[str, ...] | None
) -> None:
    spec = peft.lora(
        rank=2,
        alpha=4,
        targets=["*in_proj_weight", "*out_proj.weight", "*c_fc.weight"],
        qkv=qkv,
        dropout=0.25,
    )
    base = {k: v.detach() for k, v in model.named_parameters()}
    f = _random(peft.init(spec, base), 12)
    ref_i, ref_t = _features(_loaded(model, peft.fold(spec, f, base=base), None))
    att = peft.attach_(copy.deepcopy(model), spec, f).eval()
    got_i, got_t = _features(att)
    torch.testing.assert_close(got_i, ref_i, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_t, ref_t, rtol=1e-5, atol=1e-5)
    # in training the branch dropout changes the outputs
    att.train()
    torch.manual_seed(0)
    assert (att.encode_image(_inputs()[0]) - ref_i).abs().max() > 1e-4


# ---------------------------------------------------------------- adapter dropping


def test_adapter_dropping_keeps_each_update_with_probability_one_minus_p() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3))
    p = 0.3
    spec = peft.adapter(targets="0.weight", drop=p)
    base = {k: v.detach().clone() for k, v in net.named_parameters()}
    f = _random(peft.init(spec, base), 13, scale=0.5)
    x = torch.randn(5, 4)
    off = net(x)
    on = _loaded(net, peft.fold(spec, peft.rescale(spec, f, 1 / (1 - p)), base=base), None)(x)
    full = _loaded(net, peft.fold(spec, f, base=base), None)(x)
    assert (on - off).abs().min() > 1e-3
    att = peft.attach_(copy.deepcopy(net), spec, f).train()
    torch.manual_seed(2024)
    forwards, kept = 400, 0
    for _ in range(forwards):
        y = att(x)
        is_on = bool(torch.allclose(y, on, rtol=1e-5, atol=1e-6))
        is_off = bool(torch.allclose(y, off, rtol=1e-5, atol=1e-6))
        assert is_on != is_off
        kept += is_on
    # Binomial(400, 0.7): mean 280, sd 9.2; five sd either side
    assert abs(kept - forwards * (1 - p)) < 5 * math.sqrt(forwards * p * (1 - p))
    # eval mode never drops
    att.eval()
    for _ in range(20):
        torch.testing.assert_close(att(x), full, rtol=1e-5, atol=1e-6)


def test_adapter_dropping_on_clip_draws_one_gate_per_target(model: nn.Module) -> None:
    p = 0.5
    spec = peft.adapter(
        targets=["visual.*attn.out_proj.weight", "visual.*mlp.c_proj.weight"], drop=p
    )
    base = {k: v.detach() for k, v in model.named_parameters()}
    f = _random(peft.init(spec, base), 14)
    keys = {
        t: [k for k in f if k.startswith(t)]
        for t in ("visual.transformer.resblocks.0.attn", "visual.transformer.resblocks.0.mlp")
    }
    images, _ = _inputs()
    candidates = {}
    for g_attn in (0.0, 1 / (1 - p)):
        for g_mlp in (0.0, 1 / (1 - p)):
            parts = {}
            for t, gate in zip(keys, (g_attn, g_mlp)):
                parts.update(peft.rescale(spec, {k: f[k] for k in keys[t]}, gate))
            folded = peft.fold(spec, parts, base=base)
            candidates[(g_attn, g_mlp)] = _loaded(model, folded, None).train().encode_image(images)
    att = peft.attach_(copy.deepcopy(model), spec, f).train()
    torch.manual_seed(7)
    seen = set()
    for _ in range(24):
        y = att.encode_image(images)
        match = [c for c, v in candidates.items() if torch.allclose(y, v, rtol=1e-5, atol=1e-6)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) == 4  # each target has its own gate (P(missing one) < 4 * 0.75^24)
    att.eval()
    full = _loaded(model, peft.fold(spec, f, base=base), None).encode_image(images)
    for _ in range(5):
        torch.testing.assert_close(att.encode_image(images), full, rtol=1e-5, atol=1e-6)
