"""Edges of robustft.losses: empty batches, label dtypes, NumPy and tensor scalars, masked teachers,
zero-norm class features, extreme confidences.

The empty-batch rule, the same for every loss: ``reduction="none"`` gives ``[0]``, ``"sum"`` gives
0 and ``"mean"`` gives 0 (not the NaN of 0 / 0), each with a zero (finite) gradient; the coupled
losses (``ueo``, ``clip_contrastive``) give 0 likewise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustft import losses as L

D, C, M = 5, 4, 3


def _data(b: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(b)
    return {
        "f": torch.randn(b, D, generator=g, dtype=dtype),
        "f0": torch.randn(b, D, generator=g, dtype=dtype),
        "text": torch.randn(C, D, generator=g, dtype=dtype),
        "texts": torch.randn(M, D, generator=g, dtype=dtype),
        "z": torch.randn(b, C, generator=g, dtype=dtype),
        "t": torch.randn(b, C, generator=g, dtype=dtype),
        "y": torch.randint(0, C, (b,), generator=g),
        "w": torch.rand(b, generator=g, dtype=dtype) * 0.9 + 0.05,
    }


# name -> loss(trained input x, data, reduction) and the key of x; the second tensor that gets a
# gradient (a class/text side with no batch axis) is "text" or "texts" where there is one
PER_SAMPLE: dict[str, tuple[Callable[..., torch.Tensor], str]] = {
    "margin_metric_softmax": (
        lambda x, d, r: L.margin_metric_softmax(x, d["text"], d["y"], reduction=r),
        "f",
    ),
    "margin_metric_softmax(text_distances=)": (
        lambda x, d, r: L.margin_metric_softmax(
            x, d["text"], d["y"], reduction=r, text_distances=L.text_distances(d["text"])
        ),
        "f",
    ),
    "energy_gap": (
        lambda x, d, r: L.energy_gap(
            x, reference_features=d["f0"], text_features=d["texts"], reduction=r
        ),
        "f",
    ),
    "distillation": (lambda x, d, r: L.distillation(x, teacher_logits=d["t"], reduction=r), "z"),
    "context_distillation": (
        lambda x, d, r: L.context_distillation(
            x, reference_features=d["f0"], context_features=d["texts"], reduction=r
        ),
        "f",
    ),
    "feature_distillation": (
        lambda x, d, r: L.feature_distillation(x, reference_features=d["f0"], reduction=r),
        "f",
    ),
}


@pytest.mark.parametrize("name", list(PER_SAMPLE))
def test_empty_batch_rule_per_sample_losses(name: str) -> None:
    loss, key = PER_SAMPLE[name]
    d = _data(0)
    d["text"].requires_grad_(True)
    d["texts"].requires_grad_(True)
    x = d[key].clone().requires_grad_(True)
    none = loss(x, d, "none")
    assert none.shape == (0,) and none.dtype == torch.float64
    assert torch.equal(loss(x, d, "sum"), torch.zeros((), dtype=torch.float64))
    mean = loss(x, d, "mean")
    assert torch.equal(mean.detach(), torch.zeros((), dtype=torch.float64))  # not NaN
    mean.backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for side in ("text", "texts"):
        grad = d[side].grad
        assert grad is None or torch.equal(grad, torch.zeros_like(grad)), side


def test_empty_batch_rule_other_losses() -> None:
    d = _data(0)
    z = d["z"].clone().requires_grad_(True)
    loss = L.ueo(z, d["w"])
    assert torch.equal(loss.detach(), torch.zeros((), dtype=torch.float64))
    loss.backward()
    assert z.grad is not None and z.grad.shape == (0, C)
    f = d["f"].clone().requires_grad_(True)
    g = d["f0"].clone().requires_grad_(True)
    loss = L.clip_contrastive(f, g)
    assert torch.equal(loss.detach(), torch.zeros((), dtype=torch.float64))
    loss.backward()
    assert f.grad is not None and f.grad.shape == (0, D)
    # per-sample outputs without a reduction are empty
    assert L.entropy(d["z"]).shape == (0,)
    assert L.ueo_confidence(d["z"]).shape == (0,)
    assert L.margin_metric_logits(d["f"], d["text"], d["y"]).shape == (0, C)


@pytest.mark.parametrize("name", list(PER_SAMPLE))
def test_non_empty_mean_unchanged_by_the_empty_rule(name: str) -> None:
    loss, key = PER_SAMPLE[name]
    d = _data(3)
    torch.testing.assert_close(loss(d[key], d, "mean"), loss(d[key], d, "none").mean())


# ---------------------------------------------------------------- label dtypes


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64])
def test_every_integer_label_dtype_is_accepted(dtype: torch.dtype) -> None:
    d = _data(5)
    dist = L.text_distances(d["text"])
    y = d["y"].to(dtype)
    for kw in ({}, {"text_distances": dist}):
        torch.testing.assert_close(
            L.margin_metric_softmax(d["f"], d["text"], y, reduction="none", **kw),
            L.margin_metric_softmax(d["f"], d["text"], d["y"], reduction="none", **kw),
        )
        torch.testing.assert_close(
            L.margin_metric_logits(d["f"], d["text"], y, **kw),
            L.margin_metric_logits(d["f"], d["text"], d["y"], **kw),
        )
    # and where values are not read (vmap): the same numbers
    out = torch.vmap(lambda ff, yy: L.margin_metric_softmax(ff, d["text"], yy, reduction="none"))(
        d["f"][None], y[None]
    )
    torch.testing.assert_close(
        out[0], L.margin_metric_softmax(d["f"], d["text"], d["y"], reduction="none")
    )


# ---------------------------------------------------------------- scalars: NumPy and tensors


def test_numpy_scalars_are_accepted_everywhere() -> None:
    d = _data(4)
    pairs = [
        (
            lambda s: L.margin_metric_softmax(d["f"], d["text"], d["y"], margin=s, logit_scale=s),
            0.5,
        ),
        (
            lambda s: L.energy_gap(
                d["f"], reference_features=d["f0"], text_features=d["texts"], logit_scale=s
            ),
            3.0,
        ),
        (lambda s: L.distillation(d["z"], teacher_logits=d["t"], temperature=s), 2.0),
        (
            lambda s: L.context_distillation(
                d["f"], reference_features=d["f0"], context_features=d["texts"], temperature=s
            ),
            2.0,
        ),
        (lambda s: L.ueo(d["z"], d["w"], trade_off=s), 0.5),
        (lambda s: L.ueo_confidence(d["z"], scale=s), 0.5),
        (lambda s: L.clip_contrastive(d["f"], d["f0"], logit_scale=s), 3.0),
    ]
    for fn, value in pairs:
        expected = fn(value)
        for np_value in (np.float64(value), np.float32(value)):
            torch.testing.assert_close(fn(np_value), expected)
    # a NumPy integer is a real number too
    torch.testing.assert_close(
        L.distillation(d["z"], teacher_logits=d["t"], temperature=np.int64(2)),
        L.distillation(d["z"], teacher_logits=d["t"], temperature=2.0),
    )


def test_tensor_temperature_matches_float_and_is_not_read() -> None:
    d = _data(4)
    for temp in (0.5, 1.0, 3.0):
        t = torch.tensor(temp, dtype=torch.float64)
        torch.testing.assert_close(
            L.distillation(d["z"], teacher_logits=d["t"], temperature=t, reduction="none"),
            L.distillation(d["z"], teacher_logits=d["t"], temperature=temp, reduction="none"),
        )
        torch.testing.assert_close(
            L.context_distillation(
                d["f"], reference_features=d["f0"], context_features=d["texts"], temperature=t
            ),
            L.context_distillation(
                d["f"], reference_features=d["f0"], context_features=d["texts"], temperature=temp
            ),
        )
    # a traced temperature: its gradient flows (T²·KL(T) depends on T)
    t = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    L.distillation(d["z"], teacher_logits=d["t"], temperature=t).backward()
    assert t.grad is not None and torch.isfinite(t.grad) and t.grad != 0
    # under vmap over temperatures (values never read)
    temps = torch.tensor([0.5, 2.0], dtype=torch.float64)
    out = torch.vmap(lambda tt: L.distillation(d["z"], teacher_logits=d["t"], temperature=tt))(
        temps
    )
    for k, temp in enumerate((0.5, 2.0)):
        torch.testing.assert_close(
            out[k], L.distillation(d["z"], teacher_logits=d["t"], temperature=temp)
        )


# ---------------------------------------------------------------- masked teacher


@pytest.mark.parametrize("temperature", [1.0, 2.0, torch.tensor(0.5)])
def test_teacher_masking_a_class_gives_a_finite_exact_loss(temperature: object) -> None:
    z = torch.tensor([[1.0, 0.5, -1.0], [0.0, 2.0, 1.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[2.0, float("-inf"), 0.0], [float("-inf"), 1.0, 1.0]], dtype=torch.float64)
    loss = L.distillation(z, teacher_logits=t, temperature=temperature, reduction="none")
    temp = float(temperature)  # type: ignore[arg-type]
    q = torch.softmax(t / temp, -1)
    logp = torch.log_softmax(z.detach() / temp, -1)
    # KL with 0·log 0 = 0 at the masked classes, written out
    expected = temp**2 * torch.stack(
        [
            sum(q[b, c] * (torch.log(q[b, c]) - logp[b, c]) for c in range(3) if q[b, c] > 0)
            for b in range(2)
        ]  # type: ignore[misc]
    )
    torch.testing.assert_close(loss.detach(), expected)
    loss.sum().backward()
    assert torch.isfinite(z.grad).all()
    # ∂/∂z of T²·KL(q ‖ softmax(z/T)) is T·(softmax(z/T) − q)
    torch.testing.assert_close(z.grad, temp * (torch.softmax(z.detach() / temp, -1) - q))
    # the same for the context prototypes' KL (CAR-FT), where the reference can't mask: finite
    assert torch.isfinite(expected).all()


def test_student_masking_a_class_the_teacher_uses_is_infinite() -> None:
    z = torch.tensor([[0.0, float("-inf")]])
    t = torch.tensor([[0.0, 0.0]])
    assert L.distillation(z, teacher_logits=t) == math.inf


# ---------------------------------------------------------------- MMS: zero-norm class feature


@pytest.mark.parametrize("margin", [0.0, 0.3, torch.tensor(0.3, dtype=torch.float64)])
def test_zero_norm_class_feature_same_loss_with_and_without_distances(margin: object) -> None:
    d = _data(6)
    text = d["text"].clone()
    text[2] = 0.0  # a class whose text feature has zero norm
    y = torch.tensor([2, 0, 2, 1, 3, 2])
    dist = L.text_distances(text)
    kw = {"margin": margin, "logit_scale": 10.0}
    plain = L.margin_metric_logits(d["f"], text, y, **kw)  # type: ignore[arg-type]
    with_d = L.margin_metric_logits(d["f"], text, y, text_distances=dist, **kw)  # type: ignore[arg-type]
    torch.testing.assert_close(plain, with_d)
    # the zero-norm true class carries no margin: its logit is s·cos = 0
    rows = torch.arange(6)
    assert torch.allclose(plain[rows[y == 2], 2], torch.zeros(3, dtype=torch.float64))
    a = L.margin_metric_softmax(d["f"], text, y, reduction="none", **kw)  # type: ignore[arg-type]
    b = L.margin_metric_softmax(
        d["f"],
        text,
        y,
        reduction="none",
        text_distances=dist,
        **kw,  # type: ignore[arg-type]
    )
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, F.cross_entropy(plain, y, reduction="none"))
    # gradients agree too, and are finite
    f1 = d["f"].clone().requires_grad_(True)
    f2 = d["f"].clone().requires_grad_(True)
    L.margin_metric_softmax(f1, text, y, **kw).backward()  # type: ignore[arg-type]
    L.margin_metric_softmax(f2, text, y, text_distances=dist, **kw).backward()  # type: ignore[arg-type]
    assert torch.isfinite(f1.grad).all()
    torch.testing.assert_close(f1.grad, f2.grad)


# ---------------------------------------------------------------- UEO: extreme confidences


@pytest.mark.parametrize("factor", [1e-30, 1e-6, 1.0, 1e6, 1e30])
def test_ueo_is_exact_for_confidences_across_the_float32_range(factor: float) -> None:
    # UEO normalises both weightings over the batch, so scaling every confidence by a constant
    # leaves it unchanged; in float32 the products reach 1e-31..1e30 (1/w overflows float32 for
    # w < 3e-39 without the normalisation)
    d = _data(6)
    z = d["z"].float()
    w = d["w"].float()
    expected = L.ueo(d["z"], d["w"])  # float64
    out = L.ueo(z, w * factor)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_ueo_tiny_and_huge_confidences_in_one_batch() -> None:
    z = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5], [1.0, 1.0, -3.0]])
    w = torch.tensor([1e-44, 3e38, 1.0])  # a float32 subnormal, near the float32 max, and 1
    out = L.ueo(z, w)
    p = torch.softmax(z.double(), -1)
    wd = w.double()
    h = -(p * p.log()).sum(-1)
    cond = (wd * h).sum() / wd.sum()
    pbar = (p / wd[:, None]).sum(0) / (1 / wd).sum()
    expected = cond + (pbar * pbar.log()).sum()
    assert torch.isfinite(out)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
