"""Every loss under torch.func.grad, vmap, torch.compile(fullgraph=True), bf16, extreme logits.

Also checks that no loss mutates its inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from robustft import losses as L

B, C, D, M = 4, 5, 6, 7


def _inputs(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * scale).to(dtype)

    return {
        "f": r(B, D, scale=2.0),
        "f0": r(B, D, scale=2.0),
        "text": r(C, D),
        "rand_text": r(M, D),
        "logits": r(B, C, scale=4.0),
        "teacher": r(B, C, scale=4.0),
        "conf": (torch.rand(B, generator=g) * 0.9 + 0.05).to(dtype),
        "labels": torch.randint(0, C, (B,), generator=g),
    }


# name -> (loss of (x, inputs) where x is the differentiated tensor, key of x, per-sample?)
LOSSES: dict[str, tuple[Callable[..., torch.Tensor], str, bool]] = {
    "margin_metric_softmax": (
        lambda x, i, **kw: L.margin_metric_softmax(x, i["text"], i["labels"], **kw),
        "f",
        True,
    ),
    "margin_metric_softmax_dist": (
        lambda x, i, **kw: L.margin_metric_softmax(
            x, i["text"], i["labels"], text_distances=L.text_distances(i["text"]), **kw
        ),
        "f",
        True,
    ),
    "energy_gap": (lambda x, i, **kw: L.energy_gap(x, i["f0"], i["rand_text"], **kw), "f", True),
    "distillation": (
        lambda x, i, **kw: L.distillation(x, i["teacher"], temperature=2.0, **kw),
        "logits",
        True,
    ),
    "context_distillation": (
        lambda x, i, **kw: L.context_distillation(x, i["f0"], i["rand_text"], **kw),
        "f",
        True,
    ),
    "feature_distillation": (
        lambda x, i, **kw: L.feature_distillation(x, i["f0"], **kw),
        "f",
        True,
    ),
    "entropy": (lambda x, i: L.entropy(x).mean(), "logits", False),
    "ueo": (lambda x, i: L.ueo(x, i["conf"]), "logits", False),
    "ueo_confidence": (lambda x, i: L.ueo_confidence(x).sum(), "logits", False),
    "clip_contrastive": (lambda x, i: L.clip_contrastive(x, i["f0"]), "f", False),
    "margin_metric_logits": (
        lambda x, i: L.margin_metric_logits(x, i["text"], i["labels"]).logsumexp(-1).sum(),
        "f",
        False,
    ),
    "l2sp": (lambda x, i: L.l2sp({"w": x, "extra": i["f0"]}, {"w": i["f0"]}), "f", False),
}
PER_SAMPLE = [k for k, (_, _, per) in LOSSES.items() if per]


@pytest.mark.parametrize("name", list(LOSSES))
def test_torch_func_grad_matches_autograd(name: str) -> None:
    loss, key, _ = LOSSES[name]
    inp = _inputs(torch.float64)
    x = inp[key].clone().requires_grad_(True)
    loss(x, inp).backward()
    g = torch.func.grad(lambda t: loss(t, inp))(inp[key])
    assert torch.isfinite(g).all()
    assert g.abs().sum() > 0
    torch.testing.assert_close(g, x.grad)


@pytest.mark.parametrize("name", PER_SAMPLE)
def test_vmap_over_batches_equals_loop(name: str) -> None:
    loss, key, _ = LOSSES[name]
    batches = [_inputs(torch.float64, seed=s) for s in range(3)]
    stacked = {k: torch.stack([b[k] for b in batches]) for k in batches[0]}
    keys = list(stacked)

    def one(*values: torch.Tensor) -> torch.Tensor:
        inp = dict(zip(keys, values))
        return loss(inp[key], inp, reduction="none")

    out = torch.vmap(one)(*stacked.values())
    expected = torch.stack([loss(b[key], b, reduction="none") for b in batches])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("name", PER_SAMPLE)
def test_per_sample_gradients_with_vmap_of_grad(name: str) -> None:
    loss, key, _ = LOSSES[name]
    inp = _inputs(torch.float64)

    def single(x: torch.Tensor, *rows: torch.Tensor) -> torch.Tensor:
        sub = dict(inp)
        sub.update({k: r.unsqueeze(0) for k, r in zip(("f0", "teacher", "labels"), rows)})
        return loss(x.unsqueeze(0), sub, reduction="sum")

    per = torch.vmap(torch.func.grad(single))(inp[key], inp["f0"], inp["teacher"], inp["labels"])
    for b in range(B):
        x = inp[key].clone().requires_grad_(True)
        loss(x, inp, reduction="none")[b].backward()
        torch.testing.assert_close(per[b], x.grad[b])


def _all_losses(i: dict[str, torch.Tensor]) -> torch.Tensor:
    dist = L.text_distances(i["text"])
    parts = [
        L.margin_metric_softmax(i["f"], i["text"], i["labels"]),
        L.margin_metric_softmax(i["f"], i["text"], i["labels"], text_distances=dist),
        L.margin_metric_logits(i["f"], i["text"], i["labels"]).sum() * 1e-3,
        L.energy_gap(i["f"], i["f0"], i["rand_text"]),
        L.distillation(i["logits"], i["teacher"], temperature=2.0),
        L.context_distillation(i["f"], i["f0"], i["rand_text"]),
        L.feature_distillation(i["f"], i["f0"]),
        L.entropy(i["logits"]).mean(),
        L.ueo(i["logits"], L.ueo_confidence(i["teacher"])),
        L.clip_contrastive(i["f"], i["f0"]),
        L.l2sp({"w": i["f"], "x": i["logits"]}, {"w": i["f0"]}),
    ]
    return torch.stack(parts)


def test_torch_compile_fullgraph_forward_and_backward() -> None:
    torch._dynamo.reset()
    inp = _inputs()
    compiled = torch.compile(_all_losses, fullgraph=True, backend="aot_eager")
    x = {k: (v.clone().requires_grad_(True) if k in ("f", "logits") else v) for k, v in inp.items()}
    out = compiled(x)
    out.sum().backward()
    y = {k: (v.clone().requires_grad_(True) if k in ("f", "logits") else v) for k, v in inp.items()}
    expected = _all_losses(y)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x["f"].grad, y["f"].grad)
    torch.testing.assert_close(x["logits"].grad, y["logits"].grad)


def test_torch_compile_inductor_mms_and_ueo() -> None:
    torch._dynamo.reset()
    inp = _inputs()

    def fn(f: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return L.margin_metric_softmax(f, inp["text"], inp["labels"]) + L.ueo(logits, inp["conf"])

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(inp["f"], inp["logits"]), fn(inp["f"], inp["logits"]))


@pytest.mark.parametrize("name", list(LOSSES))
def test_bf16_inputs_give_finite_float32_results(name: str) -> None:
    loss, key, _ = LOSSES[name]
    inp16 = _inputs(torch.bfloat16)
    inp32 = {k: (v.float() if v.is_floating_point() else v) for k, v in inp16.items()}
    x = inp16[key].clone().requires_grad_(True)
    out = loss(x, inp16)
    assert out.dtype == torch.float32
    assert torch.isfinite(out)
    # computed in float32 from the bf16 values; l2sp takes differences in the parameters' dtype
    # (bf16 here: keep the anchor in float32 for exact differences), then accumulates in float32
    tol = 1e-2 if name == "l2sp" else 1e-5
    torch.testing.assert_close(out, loss(inp32[key], inp32), rtol=tol, atol=tol)
    out.backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()


def test_extreme_logits_give_finite_loss_and_gradient() -> None:
    z = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [0.0, 0.0, -1e4]], requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 0.0], [1e4, -1e4, -1e4], [1e4, 0.0, 0.0]])
    w = L.ueo_confidence(t)
    values = [
        L.entropy(z).mean(),
        L.ueo(z, w),
        L.distillation(z, t),
        L.distillation(z, t, temperature=0.1),
        L.ueo_confidence(z).sum(),
    ]
    for v in values:
        assert torch.isfinite(v)
        (gz,) = torch.autograd.grad(v, z)
        assert torch.isfinite(gz).all()
    # feature losses at a logit scale of 1e4: logits up to ±1e4
    inp = _inputs()
    f = inp["f"].clone().requires_grad_(True)
    feats = [
        L.margin_metric_softmax(f, inp["text"], inp["labels"], logit_scale=1e4),
        L.context_distillation(f, inp["f0"], inp["text"], logit_scale=1e4),
        L.clip_contrastive(f, inp["f0"], logit_scale=1e4),
        L.energy_gap(f, inp["f0"], inp["text"], logit_scale=1e4),
    ]
    for v in feats:
        assert torch.isfinite(v)
        (gf,) = torch.autograd.grad(v, f)
        assert torch.isfinite(gf).all()


@pytest.mark.parametrize("name", list(LOSSES))
def test_inputs_not_mutated(name: str) -> None:
    loss, key, _ = LOSSES[name]
    inp = _inputs()
    before = {k: v.clone() for k, v in inp.items()}
    x = inp[key].requires_grad_(True)
    loss(x, inp).backward()
    for k, v in inp.items():
        assert torch.equal(v.detach(), before[k]), k
