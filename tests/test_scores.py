"""robustft.scores: hand values, naive references, properties, torch.func, compile, dtypes, errors."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference.metrics_ref import energy_ref, entropy_score_ref, mcm_ref, msp_ref
from strategies import features, logits
from torch import Tensor

from robustft import scores
from robustft.scores import energy, entropy_score, max_logit, mcm, msp

LOGIT_SCORES: list[Callable[[Tensor], Tensor]] = [msp, max_logit, energy, entropy_score]


def f64(values: list[float] | list[list[float]]) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ----------------------------------------------------------------------------- hand-computed


def test_hand_values() -> None:
    z = f64([[0.0, 0.0], [math.log(3.0), 0.0], [1.0, 1.0]])
    torch.testing.assert_close(msp(z), f64([0.5, 0.75, 0.5]))
    torch.testing.assert_close(max_logit(z), f64([0.0, math.log(3.0), 1.0]))
    torch.testing.assert_close(energy(z), f64([math.log(2), math.log(4), 1 + math.log(2)]))
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    torch.testing.assert_close(entropy_score(z), f64([-math.log(2), -h, -math.log(2)]))


def test_temperature_hand_values() -> None:
    z = f64([2.0, 0.0])
    # softmax([1, 0]) at T = 2
    torch.testing.assert_close(
        msp(z, temperature=2.0), torch.tensor(1 / (1 + math.exp(-1.0)), dtype=torch.float64)
    )
    torch.testing.assert_close(
        energy(z, temperature=2.0), torch.tensor(2 * math.log(math.e + 1), dtype=torch.float64)
    )


def test_mcm_hand_values() -> None:
    image = f64([[3.0, 0.0], [0.0, -5.0]])
    text = f64([[2.0, 0.0], [0.0, 0.5], [-1.0, 0.0]])
    # cosines: [1, 0, -1] and [0, -1, 0]
    e = math.e
    want = f64([e / (e + 1 + 1 / e), 1 / (2 + 1 / e)])
    torch.testing.assert_close(mcm(image, text), want)
    # tau = 0.5 doubles the cosines; equal to msp of the cosines at that temperature
    cos = f64([[1.0, 0.0, -1.0], [0.0, -1.0, 0.0]])
    torch.testing.assert_close(mcm(image, text, temperature=0.5), msp(cos, temperature=0.5))


def test_single_class_and_single_sample() -> None:
    z = torch.tensor([[1.5], [-2.0]])
    torch.testing.assert_close(msp(z), torch.ones(2))
    torch.testing.assert_close(energy(z), torch.tensor([1.5, -2.0]))
    torch.testing.assert_close(entropy_score(z), torch.zeros(2))
    assert msp(torch.tensor([1.0, 1.0])).shape == ()
    torch.testing.assert_close(msp(torch.tensor([1.0, 1.0])), torch.tensor(0.5))


def test_leading_dims_are_batch_dims() -> None:
    z = torch.randn(2, 3, 5, dtype=torch.float64)
    for fn in LOGIT_SCORES:
        torch.testing.assert_close(fn(z), fn(z.reshape(6, 5)).reshape(2, 3))


# ------------------------------------------------------------------------ naive references


@given(
    z=logits(max_batch=5, max_classes=6, dtype=torch.float64), t=st.sampled_from([0.3, 1.0, 4.0])
)
def test_logit_scores_match_reference(z: Tensor, t: float) -> None:
    torch.testing.assert_close(msp(z, temperature=t).tolist(), msp_ref(z, t))
    torch.testing.assert_close(energy(z, temperature=t).tolist(), energy_ref(z, t))
    torch.testing.assert_close(entropy_score(z).tolist(), entropy_score_ref(z))
    torch.testing.assert_close(max_logit(z).tolist(), [max(r) for r in z.tolist()])


@given(
    data=st.data(),
    n=st.integers(1, 4),
    k=st.integers(1, 5),
    d=st.integers(1, 6),
    t=st.sampled_from([0.01, 1.0, 2.5]),
)
def test_mcm_matches_reference(data: st.DataObject, n: int, k: int, d: int, t: float) -> None:
    image, text = data.draw(features(n, d)), data.draw(features(k, d))
    torch.testing.assert_close(mcm(image, text, temperature=t).tolist(), mcm_ref(image, text, t))


# ------------------------------------------------------------------------------ properties


@given(z=logits(dtype=torch.float64))
def test_bounds(z: Tensor) -> None:
    c = z.shape[-1]
    p = msp(z)
    assert bool(((p >= 1 / c - 1e-12) & (p <= 1)).all())
    h = entropy_score(z)
    assert bool(((h >= -math.log(c) - 1e-12) & (h <= 1e-12)).all())
    gap = energy(z) - max_logit(z)
    assert bool(((gap >= 0) & (gap <= math.log(c) + 1e-12)).all())


@given(z=logits(dtype=torch.float64), seed=st.integers(0, 2**16))
def test_invariant_to_permuting_the_classes(z: Tensor, seed: int) -> None:
    perm = torch.randperm(z.shape[-1], generator=torch.Generator().manual_seed(seed))
    for fn in LOGIT_SCORES:
        torch.testing.assert_close(fn(z[:, perm]), fn(z), rtol=1e-12, atol=1e-12)


@given(data=st.data(), k=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_mcm_invariant_to_permuting_the_class_texts(data: st.DataObject, k: int, seed: int) -> None:
    image, text = data.draw(features(3, 4)), data.draw(features(k, 4))
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(mcm(image, text[perm]), mcm(image, text), rtol=1e-12, atol=1e-12)


@given(z=logits(dtype=torch.float64))
def test_energy_tends_to_max_logit_as_temperature_goes_to_zero(z: Tensor) -> None:
    c = z.shape[-1]
    previous = None
    for t in [1.0, 1e-1, 1e-2, 1e-3, 1e-4]:
        gap = energy(z, temperature=t) - max_logit(z)
        assert bool((gap <= t * math.log(c) + 1e-12).all())  # 0 <= gap <= T log C
        if previous is not None:
            assert bool((gap <= previous + 1e-12).all())
        previous = gap
    torch.testing.assert_close(energy(z, temperature=1e-4), max_logit(z), atol=1e-3, rtol=0)


@given(z=logits(dtype=torch.float64), margin=st.floats(0.1, 5.0))
def test_msp_monotone_in_temperature_with_a_dominant_logit(z: Tensor, margin: float) -> None:
    z = z.clone()
    z[:, 0] = z.amax(dim=-1) + margin  # class 0 dominates every row
    temps = [0.5, 1.0, 2.0, 4.0, 8.0]
    values = torch.stack([msp(z, temperature=t) for t in temps])
    assert bool((values[1:] <= values[:-1]).all())  # hotter = flatter = less confident
    # and at a fixed temperature, raising the dominant logit raises the score
    bigger = z.clone()
    bigger[:, 0] += 1.0
    assert bool((msp(bigger) >= msp(z)).all())


def test_msp_strictly_decreasing_for_a_dominant_logit() -> None:
    z = f64([3.0, 0.0, -1.0])
    values = [float(msp(z, temperature=t)) for t in [0.5, 1.0, 2.0, 4.0]]
    assert values == sorted(values, reverse=True) and len(set(values)) == 4


def test_shift_invariance_of_msp_and_entropy() -> None:
    z = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(msp(z + 7.0), msp(z))
    torch.testing.assert_close(entropy_score(z - 3.0), entropy_score(z))
    torch.testing.assert_close(energy(z + 7.0), energy(z) + 7.0)


def test_mcm_invariant_to_feature_scale() -> None:
    image, text = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(mcm(image * 9.0, text * 0.2), mcm(image, text))


def test_extreme_and_masked_logits_stay_finite() -> None:
    z = torch.tensor([[1e4, -1e4, 0.0], [0.0, float("-inf"), 1.0]], requires_grad=True)
    for fn in LOGIT_SCORES:
        out = fn(z)
        assert bool(torch.isfinite(out).all()), fn.__name__
        (g,) = torch.autograd.grad(out.sum(), z)
        assert bool(torch.isfinite(g).all()), fn.__name__
    torch.testing.assert_close(msp(z.detach())[0], torch.tensor(1.0))
    p = 1 / (1 + math.e)
    want = p * math.log(p) + (1 - p) * math.log(1 - p)
    torch.testing.assert_close(entropy_score(z.detach())[1], torch.tensor(want))


def test_inputs_are_not_mutated() -> None:
    z, image, text = torch.randn(3, 4), torch.randn(3, 5), torch.randn(4, 5)
    copies = [z.clone(), image.clone(), text.clone()]
    for fn in LOGIT_SCORES:
        fn(z)
    msp(z, temperature=0.5)
    mcm(image, text, temperature=0.5)
    for a, b in zip([z, image, text], copies):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- gradients and torch.func


def test_gradcheck_float64() -> None:
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, s: msp(x, temperature=s), (z, t))
    assert torch.autograd.gradcheck(lambda x, s: energy(x, temperature=s), (z, t))
    assert torch.autograd.gradcheck(entropy_score, (z,))
    image = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    text = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: mcm(a, b, temperature=0.5), (image, text))


def test_func_grad_matches_hand_derivatives() -> None:
    z = torch.randn(5, dtype=torch.float64)
    # d/dz T logsumexp(z / T) = softmax(z / T)
    g = torch.func.grad(lambda x: energy(x, temperature=2.0))(z)
    torch.testing.assert_close(g, torch.softmax(z / 2.0, dim=-1))
    torch.testing.assert_close(
        torch.func.grad(max_logit)(z), torch.nn.functional.one_hot(z.argmax(), 5).double()
    )
    # d(-H)/dz_k = p_k (log p_k + H)
    p = torch.softmax(z, -1)
    h = -(p * p.log()).sum()
    torch.testing.assert_close(torch.func.grad(entropy_score)(z), p * (p.log() + h))


def test_vmap_equals_batched_call() -> None:
    z = torch.randn(6, 4)
    for fn in LOGIT_SCORES:
        torch.testing.assert_close(torch.func.vmap(fn)(z), fn(z))
    image, text = torch.randn(6, 3), torch.randn(4, 3)
    batched = torch.func.vmap(lambda f: mcm(f, text, temperature=0.3))(image)
    torch.testing.assert_close(batched, mcm(image, text, temperature=0.3))
    # per-sample gradients of the MSP, as used for gradient-based OOD diagnostics
    per_sample = torch.func.vmap(torch.func.grad(msp))(z)
    for i in range(6):
        torch.testing.assert_close(per_sample[i], torch.func.grad(msp)(z[i]))


def test_temperature_may_be_a_tensor() -> None:
    z = torch.randn(3, 4)
    torch.testing.assert_close(msp(z, temperature=torch.tensor(2.0)), msp(z, temperature=2.0))
    dt = torch.func.grad(lambda t: energy(z, temperature=t).sum())(torch.tensor(1.5))
    assert bool(torch.isfinite(dt))


def test_compile_fullgraph_all_scores() -> None:
    def all_scores(z: Tensor, image: Tensor, text: Tensor) -> Tensor:
        return torch.stack(
            [
                msp(z, temperature=0.5),
                max_logit(z),
                energy(z, temperature=2.0),
                entropy_score(z),
                mcm(image, text),
            ]
        )

    compiled = torch.compile(all_scores, fullgraph=True, dynamic=False)
    z, image, text = torch.randn(4, 3), torch.randn(4, 5), torch.randn(3, 5)
    torch.testing.assert_close(compiled(z, image, text), all_scores(z, image, text))


# ------------------------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("fn", LOGIT_SCORES, ids=lambda f: f.__name__)
def test_dtypes(fn: Callable[[Tensor], Tensor]) -> None:
    z = torch.randn(4, 6, dtype=torch.float64) * 3
    assert fn(z).dtype == torch.float64
    assert fn(z.float()).dtype == torch.float32
    low = z.bfloat16()
    out = fn(low)
    assert out.dtype == torch.float32  # half precision is scored in float32
    torch.testing.assert_close(out, fn(low.float()))


def test_mcm_dtypes() -> None:
    image, text = torch.randn(3, 4), torch.randn(2, 4)
    assert mcm(image.double(), text.double()).dtype == torch.float64
    out = mcm(image.bfloat16(), text.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, mcm(image.bfloat16().float(), text.bfloat16().float()))


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("fn", LOGIT_SCORES, ids=lambda f: f.__name__)
def test_logits_errors(fn: Callable[..., Tensor]) -> None:
    name = fn.__name__
    with pytest.raises(TypeError, match=rf"{name}: logits must be a floating-point tensor"):
        fn(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match=rf"{name}: logits must be a torch.Tensor"):
        fn([[1.0, 2.0]])
    with pytest.raises(ValueError, match=rf"{name}: logits must have shape \[..., classes\]"):
        fn(torch.tensor(1.0))
    with pytest.raises(ValueError, match=rf"{name}: logits must have shape \[..., classes\]"):
        fn(torch.ones(3, 0))


@pytest.mark.parametrize("fn", [msp, energy], ids=lambda f: f.__name__)
def test_temperature_errors(fn: Callable[..., Tensor]) -> None:
    name = fn.__name__
    z = torch.randn(2, 3)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=rf"{name}: temperature must be in \(0(\.0)?, inf\)"):
            fn(z, temperature=bad)
    with pytest.raises(ValueError, match=rf"{name}: temperature must not be NaN"):
        fn(z, temperature=float("nan"))
    with pytest.raises(TypeError, match=rf"{name}: temperature must be a real number"):
        fn(z, temperature="1")
    with pytest.raises(TypeError, match=rf"{name}: temperature must be a real number"):
        fn(z, temperature=torch.ones(2))
    with pytest.raises(TypeError):
        fn(z, 1.0)  # keyword-only


def test_mcm_errors() -> None:
    image, text = torch.randn(3, 4), torch.randn(2, 4)
    with pytest.raises(TypeError, match=r"mcm: image_features must be a floating-point tensor"):
        mcm(image.long(), text)
    with pytest.raises(TypeError, match=r"mcm: text_features must be a floating-point tensor"):
        mcm(image, text.long())
    with pytest.raises(ValueError, match=r"mcm: text_features must have 2 dimension"):
        mcm(image, text[0])
    with pytest.raises(
        ValueError, match=r"mcm: image_features.shape\[-1\] must equal text_features"
    ):
        mcm(image, torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"mcm: text_features must have at least one class"):
        mcm(image, torch.randn(0, 4))
    with pytest.raises(ValueError, match=r"mcm: image_features must have shape"):
        mcm(torch.tensor(1.0), text)
    with pytest.raises(ValueError, match=r"mcm: temperature must be in"):
        mcm(image, text, temperature=0)


def test_public_names() -> None:
    assert sorted(scores.__all__) == ["energy", "entropy_score", "max_logit", "mcm", "msp"]


# ----------------------------------------------------------------- batteries over __all__

_Z = torch.randn(4, 5, dtype=torch.float64)
_IMAGE, _TEXT = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)

# name -> score of one differentiated input x (the logits, or the image features for mcm)
SCORE_OF: dict[str, tuple[Callable[[Tensor], Tensor], Tensor]] = {
    "msp": (lambda x: msp(x, temperature=0.7), _Z),
    "max_logit": (max_logit, _Z),
    "energy": (lambda x: energy(x, temperature=2.0), _Z),
    "entropy_score": (entropy_score, _Z),
    "mcm": (lambda x: mcm(x, _TEXT, temperature=0.5), _IMAGE),
}


def test_transform_battery_covers_every_score() -> None:
    assert set(SCORE_OF) == set(scores.__all__)


@pytest.mark.parametrize("name", sorted(SCORE_OF))
def test_every_score_under_grad_vmap_and_compile(name: str) -> None:
    fn, x = SCORE_OF[name]
    # torch.func.grad of one sample's score equals autograd; vmap over the batch equals the call
    per_sample_grad = torch.func.vmap(torch.func.grad(fn))(x)
    xr = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(fn(xr).sum(), xr)
    torch.testing.assert_close(per_sample_grad, want)
    torch.testing.assert_close(torch.func.vmap(fn)(x), fn(x))
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x.float()), fn(x.float()))


@pytest.mark.parametrize("name", sorted(SCORE_OF))
def test_every_score_is_float32_under_bf16_autocast(name: str) -> None:
    fn, x = SCORE_OF[name]
    x = x.float()
    outside = fn(x) if name != "mcm" else mcm(x, _TEXT.float(), temperature=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = fn(x) if name != "mcm" else mcm(x, _TEXT.float(), temperature=0.5)
    assert inside.dtype == torch.float32, name
    torch.testing.assert_close(inside, outside)  # no bf16 matmul inside


def test_numpy_temperatures_and_inf_rejected() -> None:
    z = torch.randn(3, 4)
    image, text = torch.randn(3, 5), torch.randn(4, 5)
    for t in (np.float32(2.0), np.float64(2.0), np.int64(2)):
        torch.testing.assert_close(msp(z, temperature=t), msp(z, temperature=2.0))
        torch.testing.assert_close(energy(z, temperature=t), energy(z, temperature=2.0))
        torch.testing.assert_close(mcm(image, text, temperature=t), mcm(image, text, temperature=2))


_z, _image, _text = torch.randn(2, 3), torch.randn(2, 4), torch.randn(3, 4)

ERRORS: list[tuple[str, Callable[[], object], type[Exception], str]] = []
for _fn in (msp, max_logit, energy, entropy_score):
    _n = _fn.__name__
    ERRORS += [
        (
            _n,
            lambda f=_fn: f(torch.ones(2, 3, dtype=torch.long)),
            TypeError,
            "logits must be a floating-point",
        ),
        (_n, lambda f=_fn: f([[1.0, 2.0]]), TypeError, "logits must be a torch.Tensor"),
        (
            _n,
            lambda f=_fn: f(torch.tensor(1.0)),
            ValueError,
            r"logits must have shape \[..., classes\]",
        ),
        (
            _n,
            lambda f=_fn: f(torch.ones(3, 0)),
            ValueError,
            r"logits must have shape \[..., classes\] with classes >= 1",
        ),
    ]
for _fn in (msp, energy, mcm):
    _n = _fn.__name__
    _call: Callable[..., Tensor] = (
        (lambda f=_fn, **kw: f(_image, _text, **kw))
        if _fn is mcm
        else (lambda f=_fn, **kw: f(_z, **kw))
    )
    ERRORS += [
        (
            _n,
            lambda c=_call: c(temperature=0.0),
            ValueError,
            r"temperature must be in \(0(\.0)?, inf\)",
        ),
        (
            _n,
            lambda c=_call: c(temperature=-1),
            ValueError,
            r"temperature must be in \(0(\.0)?, inf\)",
        ),
        (
            _n,
            lambda c=_call: c(temperature=float("inf")),
            ValueError,
            "temperature must be a finite number",
        ),
        (
            _n,
            lambda c=_call: c(temperature=np.float64("inf")),
            ValueError,
            "temperature must be a finite number",
        ),
        (
            _n,
            lambda c=_call: c(temperature=float("nan")),
            ValueError,
            "temperature must not be NaN",
        ),
        (_n, lambda c=_call: c(temperature="1"), TypeError, "temperature must be a real number"),
        (_n, lambda c=_call: c(temperature=True), TypeError, "temperature must be a real number"),
        (
            _n,
            lambda c=_call: c(temperature=torch.ones(2)),
            TypeError,
            "temperature must be a real number or a 0-d floating tensor",
        ),
        (
            _n,
            lambda c=_call: c(temperature=torch.tensor(1)),
            TypeError,
            "temperature must be a real number or a 0-d floating tensor",
        ),
    ]
ERRORS += [
    (
        "mcm",
        lambda: mcm(_image.long(), _text),
        TypeError,
        "image_features must be a floating-point",
    ),
    ("mcm", lambda: mcm(_image, _text.long()), TypeError, "text_features must be a floating-point"),
    ("mcm", lambda: mcm(_image, _text[0]), ValueError, "text_features must have 2 dimension"),
    (
        "mcm",
        lambda: mcm(_image, torch.randn(3, 5)),
        ValueError,
        r"image_features.shape\[-1\] must equal text_features.shape\[1\]",
    ),
    (
        "mcm",
        lambda: mcm(_image, _text[:0]),
        ValueError,
        "text_features must have at least one class",
    ),
    (
        "mcm",
        lambda: mcm(torch.tensor(1.0), _text),
        ValueError,
        r"image_features must have shape \[..., dim\] with dim >= 1",
    ),
    (
        "mcm",
        lambda: mcm(_image[:, :0], _text[:, :0]),
        ValueError,
        r"image_features must have shape \[..., dim\] with dim >= 1",
    ),
]


@pytest.mark.parametrize(
    ("name", "call", "exc", "match"), ERRORS, ids=[f"{e[0]}-{i}" for i, e in enumerate(ERRORS)]
)
def test_error_battery(
    name: str, call: Callable[[], object], exc: type[Exception], match: str
) -> None:
    with pytest.raises(exc, match=rf"^{name}: {match}"):
        call()


def test_error_battery_covers_every_score() -> None:
    assert {e[0] for e in ERRORS} == set(scores.__all__)
