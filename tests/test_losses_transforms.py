"""Every loss under torch.func.grad, vmap, torch.compile(fullgraph=True), bf16, autocast, extreme
logits; and no loss mutates its inputs.

Table-driven: ``LOSSES`` names the public function each entry exercises, and a test checks that the
table covers every name in ``robustft.losses.__all__``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import NamedTuple

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


class Spec(NamedTuple):
    fn: str  # the public function exercised
    loss: Callable[..., torch.Tensor]  # loss(x, inputs, **kw), x the differentiated tensor
    key: str  # which input x replaces
    per_sample: bool  # takes reduction= and is vmapped per sample


LOSSES: dict[str, Spec] = {
    "margin_metric_softmax": Spec(
        "margin_metric_softmax",
        lambda x, i, **kw: L.margin_metric_softmax(x, i["text"], i["labels"], **kw),
        "f",
        True,
    ),
    "margin_metric_softmax_dist": Spec(
        "margin_metric_softmax",
        lambda x, i, **kw: L.margin_metric_softmax(
            x, i["text"], i["labels"], text_distances=L.text_distances(i["text"]), **kw
        ),
        "f",
        True,
    ),
    "energy_gap": Spec(
        "energy_gap",
        lambda x, i, **kw: L.energy_gap(
            x, reference_features=i["f0"], text_features=i["rand_text"], **kw
        ),
        "f",
        True,
    ),
    "distillation": Spec(
        "distillation",
        lambda x, i, **kw: L.distillation(x, teacher_logits=i["teacher"], temperature=2.0, **kw),
        "logits",
        True,
    ),
    "distillation_tensor_temperature": Spec(
        "distillation",
        lambda x, i, **kw: L.distillation(
            x, teacher_logits=i["teacher"], temperature=torch.tensor(2.0), **kw
        ),
        "logits",
        True,
    ),
    "context_distillation": Spec(
        "context_distillation",
        lambda x, i, **kw: L.context_distillation(
            x, reference_features=i["f0"], context_features=i["rand_text"], **kw
        ),
        "f",
        True,
    ),
    "feature_distillation": Spec(
        "feature_distillation",
        lambda x, i, **kw: L.feature_distillation(x, reference_features=i["f0"], **kw),
        "f",
        True,
    ),
    "entropy": Spec("entropy", lambda x, i: L.entropy(x).mean(), "logits", False),
    "ueo": Spec("ueo", lambda x, i: L.ueo(x, i["conf"]), "logits", False),
    "ueo_confidence": Spec(
        "ueo_confidence", lambda x, i: L.ueo_confidence(x).sum(), "logits", False
    ),
    "clip_contrastive": Spec(
        "clip_contrastive", lambda x, i: L.clip_contrastive(x, i["f0"]), "f", False
    ),
    "margin_metric_logits": Spec(
        "margin_metric_logits",
        lambda x, i: L.margin_metric_logits(x, i["text"], i["labels"]).logsumexp(-1).sum(),
        "f",
        False,
    ),
    "text_distances": Spec(
        "text_distances",
        lambda x, i: (L.text_distances(x) * i["text"][:, :1]).sum(),
        "text",
        False,
    ),
    "l2sp": Spec(
        "l2sp",
        lambda x, i: L.l2sp({"w": x, "extra": i["f0"]}, anchor={"w": i["f0"]}),
        "f",
        False,
    ),
    "sigmoid_contrastive": Spec(
        "sigmoid_contrastive",
        lambda x, i: L.sigmoid_contrastive(x, i["f0"], logit_scale=10.0, logit_bias=-5.0),
        "f",
        False,
    ),
    "sigmoid_contrastive_tensor_scale_bias": Spec(
        "sigmoid_contrastive",
        lambda x, i: L.sigmoid_contrastive(  # 0-d float64 tensors (exact from bf16 values)
            x, i["f0"], logit_scale=i["conf"][0].double() * 20, logit_bias=-i["conf"][1].double()
        ),
        "f",
        False,
    ),
    "orthogonality": Spec("orthogonality", lambda x, i: L.orthogonality(x.T), "f", False),
    "orthogonality_frobenius": Spec(
        "orthogonality", lambda x, i: L.orthogonality(x, squared=False), "f", False
    ),
    # TRACER's views: the student's image features differentiated, texts and teacher fixed
    **{
        name: Spec(
            name,
            lambda x, i, name=name: getattr(L, name)(
                x,
                i["f0"],
                teacher_image_features=i["f0"].flip(0),
                teacher_text_features=i["f"].detach(),
                logit_scale=10.0,
            ),
            "f",
            False,
        )
        for name in (
            "contrastive_relational_distillation",
            "interaction_distillation",
            "cross_distillation",
        )
    },
}
PER_SAMPLE = [k for k, spec in LOSSES.items() if spec.per_sample]


def test_transform_table_covers_every_public_function() -> None:
    assert {spec.fn for spec in LOSSES.values()} == set(L.__all__)
    assert set(PER_SAMPLE) >= {
        n for n in LOSSES if "reduction" in inspect.signature(getattr(L, LOSSES[n].fn)).parameters
    }


@pytest.mark.parametrize("name", list(LOSSES))
def test_torch_func_grad_matches_autograd(name: str) -> None:
    loss, key = LOSSES[name].loss, LOSSES[name].key
    inp = _inputs(torch.float64)
    x = inp[key].clone().requires_grad_(True)
    loss(x, inp).backward()
    g = torch.func.grad(lambda t: loss(t, inp))(inp[key])
    assert torch.isfinite(g).all()
    assert g.abs().sum() > 0
    torch.testing.assert_close(g, x.grad)


@pytest.mark.parametrize("name", PER_SAMPLE)
def test_vmap_over_batches_equals_loop(name: str) -> None:
    loss, key = LOSSES[name].loss, LOSSES[name].key
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
    loss, key = LOSSES[name].loss, LOSSES[name].key
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
        L.energy_gap(i["f"], reference_features=i["f0"], text_features=i["rand_text"]),
        L.distillation(i["logits"], teacher_logits=i["teacher"], temperature=2.0),
        L.context_distillation(i["f"], reference_features=i["f0"], context_features=i["rand_text"]),
        L.feature_distillation(i["f"], reference_features=i["f0"]),
        L.entropy(i["logits"]).mean(),
        L.ueo(i["logits"], L.ueo_confidence(i["teacher"])),
        L.clip_contrastive(i["f"], i["f0"]),
        L.l2sp({"w": i["f"], "x": i["logits"]}, anchor={"w": i["f0"]}),
        L.text_distances(i["f"]).sum() * 1e-3,
        L.distillation(i["logits"], teacher_logits=i["teacher"], temperature=i["conf"][0] + 1),
        L.sigmoid_contrastive(i["f"], i["f0"], logit_scale=10.0, logit_bias=-5.0),
        L.sigmoid_contrastive(
            i["f"], i["f0"], logit_scale=i["conf"][0] * 20, logit_bias=-i["conf"][1] * 10
        ),
        L.orthogonality(i["f"]) * 1e-2,
        L.orthogonality(i["logits"].T, squared=False),
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
    loss, key = LOSSES[name].loss, LOSSES[name].key
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
        L.distillation(z, teacher_logits=t),
        L.distillation(z, teacher_logits=t, temperature=0.1),
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
        L.context_distillation(
            f, reference_features=inp["f0"], context_features=inp["text"], logit_scale=1e4
        ),
        L.clip_contrastive(f, inp["f0"], logit_scale=1e4),
        L.energy_gap(f, reference_features=inp["f0"], text_features=inp["text"], logit_scale=1e4),
        L.sigmoid_contrastive(f, inp["f0"], logit_scale=1e4, logit_bias=-1e4),
        L.sigmoid_contrastive(f, inp["f0"], logit_scale=1e4, logit_bias=1e4),
        L.orthogonality(f * 1e4),
    ]
    for v in feats:
        assert torch.isfinite(v)
        (gf,) = torch.autograd.grad(v, f)
        assert torch.isfinite(gf).all()


@pytest.mark.parametrize("name", list(LOSSES))
def test_inputs_not_mutated(name: str) -> None:
    loss, key = LOSSES[name].loss, LOSSES[name].key
    inp = _inputs()
    before = {k: v.clone() for k, v in inp.items()}
    x = inp[key].requires_grad_(True)
    loss(x, inp).backward()
    for k, v in inp.items():
        assert torch.equal(v.detach(), before[k]), k


@pytest.mark.parametrize("name", list(LOSSES))
def test_float32_results_under_bf16_autocast(name: str) -> None:
    # autocast would run the matmuls (and return) in bf16; every loss documents float32 results
    loss, key = LOSSES[name].loss, LOSSES[name].key
    inp = _inputs()
    expected = loss(inp[key], inp)
    x = inp[key].clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(x, inp)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)  # autocast off inside: the float32 value exactly
    out.backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


def test_energy_gap_under_autocast_is_float32_and_resolves_small_gaps() -> None:
    g = torch.Generator().manual_seed(0)
    f0 = torch.randn(16, 64, generator=g)
    f = f0 + 1e-3 * torch.randn(16, 64, generator=g)
    texts = torch.randn(10, 64, generator=g)
    exact = L.energy_gap(f.double(), reference_features=f0.double(), text_features=texts.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = L.energy_gap(f, reference_features=f0, text_features=texts)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact, rtol=1e-4, atol=0)


def test_torch_compile_fullgraph_under_autocast() -> None:
    torch._dynamo.reset()
    inp = _inputs()

    def fn(f: torch.Tensor) -> torch.Tensor:
        return L.energy_gap(f, reference_features=inp["f0"], text_features=inp["rand_text"])

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(inp["f"])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, fn(inp["f"]))
