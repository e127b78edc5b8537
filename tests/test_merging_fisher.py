"""Fisher merging: fisher_diagonal, fisher_merge; and the error table of fisher_diagonal,
fisher_merge and logit_ensemble."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _dist import run_distributed
from hypothesis import given
from hypothesis import strategies as st
from reference.fisher_ref import fisher_diagonal_ref, fisher_merge_ref
from strategies import tree_pairs
from torch import nn

from robustft.merging import fisher_diagonal, fisher_merge, lazy, logit_ensemble, wise


def assert_close_tree(
    got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tol: float = 1e-9
) -> None:
    assert list(got) == list(ref)
    for k, v in got.items():
        torch.testing.assert_close(v.double(), ref[k].double(), rtol=tol, atol=tol)


def mlp(dtype: torch.dtype = torch.float64, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Dropout(dropout), nn.Linear(5, 4)).to(dtype)


def data(
    n: int, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


def batches_of(
    x: torch.Tensor, y: torch.Tensor, size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


# ---------------------------------------------------------------- fisher_diagonal: values


def test_fisher_hand_values_linear_softmax() -> None:
    # W = 0: p = 1/3 everywhere; d log p_y / d W_c = (1{c=y} - 1/3) x
    model = nn.Linear(2, 3, bias=False)
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 2])
    f = fisher_diagonal(model, {"weight": torch.zeros(3, 2)}, [(x, y)])
    expected = torch.tensor([[4 / 9 + 0, 0 + 4 * 1 / 9], [1 / 9, 4 / 9], [1 / 9, 4 * 4 / 9]]) / 2
    torch.testing.assert_close(f["weight"], expected)
    # the "expected" Fisher at uniform p: sum_c (1/3) (1{c=y} - 1/3)^2 = 2/9 per unit x^2
    f = fisher_diagonal(model, {"weight": torch.zeros(3, 2)}, [x], labels="expected")
    torch.testing.assert_close(f["weight"], torch.tensor([[1.0, 4.0]] * 3) * (2 / 9) / 2)


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_fisher_empirical_matches_per_sample_loop(chunk_size: int | None) -> None:
    model = mlp()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = data(11)
    got = fisher_diagonal(model, params, batches_of(x, y, 4), chunk_size=chunk_size)
    ref = fisher_diagonal_ref(model, params, list(zip(x, y)))
    assert_close_tree(got, ref)
    assert all(v.dtype == torch.float64 for v in got.values())


def test_fisher_expected_matches_per_sample_loop() -> None:
    model = mlp()
    params = dict(model.named_parameters())
    x, y = data(7)
    got = fisher_diagonal(model, params, batches_of(x, y, 3), labels="expected", chunk_size=2)
    assert_close_tree(got, fisher_diagonal_ref(model, params, list(zip(x, y)), labels="expected"))


def test_fisher_sampled_matches_loop_and_is_reproducible() -> None:
    model = mlp()
    params = dict(model.named_parameters())
    x, _ = data(9)
    got = fisher_diagonal(
        model,
        params,
        [x],
        labels="sampled",
        generator=torch.Generator().manual_seed(3),
        chunk_size=None,
    )
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=-1)
    draws = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3)).squeeze(-1)
    ref = fisher_diagonal_ref(
        model, params, list(zip(x, draws)), labels="sampled", sampled=draws.tolist()
    )
    assert_close_tree(got, ref)
    again = fisher_diagonal(
        model,
        params,
        [x],
        labels="sampled",
        generator=torch.Generator().manual_seed(3),
        chunk_size=None,
    )
    assert all(torch.equal(got[k], again[k]) for k in got)


def test_fisher_of_a_subtree_and_a_callable_forward() -> None:
    model = mlp()
    head = {k: v for k, v in model.named_parameters() if k.startswith("3.")}
    x, y = data(6)
    got = fisher_diagonal(model, head, [(x, y)])
    full = fisher_diagonal(model, dict(model.named_parameters()), [(x, y)])
    assert list(got) == ["3.weight", "3.bias"]
    assert_close_tree(got, {k: full[k] for k in got})
    # a functional forward (params, inputs) -> logits gives the same numbers
    call = lambda p, inp: torch.func.functional_call(model, p, (inp,))  # noqa: E731
    assert_close_tree(fisher_diagonal(call, head, [(x, y)]), got)


def test_fisher_at_other_params_than_the_module_holds() -> None:
    model = mlp()
    shifted = {k: v.detach() + 0.3 for k, v in model.named_parameters()}
    x, y = data(5)
    got = fisher_diagonal(model, shifted, [(x, y)])
    assert_close_tree(got, fisher_diagonal_ref(model, shifted, list(zip(x, y))))


def test_fisher_custom_log_likelihood_and_loss_sign() -> None:
    model = mlp()
    params = dict(model.named_parameters())
    x, y = data(6)
    as_loss = fisher_diagonal(
        model,
        params,
        [(x, y)],
        log_likelihood=lambda out, t: F.cross_entropy(out, t, reduction="none"),
    )
    assert_close_tree(as_loss, fisher_diagonal(model, params, [(x, y)]))
    # a Gaussian regression model: log p(t | x) = -(out - t)^2 / 2 summed over outputs
    targets = torch.randn(6, 4, dtype=torch.float64)

    def gauss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * ((out - t) ** 2).sum(-1)

    got = fisher_diagonal(model, params, [(x, targets)], log_likelihood=gauss, chunk_size=4)
    ref = fisher_diagonal_ref(model, params, list(zip(x, targets)), log_likelihood=gauss)
    assert_close_tree(got, ref)


def test_fisher_num_batches_floor_iterators_and_label_dtypes() -> None:
    model = mlp()
    params = dict(model.named_parameters())
    x, y = data(8)
    first = fisher_diagonal(model, params, batches_of(x, y, 4)[:1])
    got = fisher_diagonal(model, params, iter(batches_of(x, y, 4)), num_batches=np.int64(1))
    assert_close_tree(got, first)
    # any integer label dtype; a DataLoader-style list pair
    got = fisher_diagonal(model, params, [[x[:4], y[:4].to(torch.uint8)]])
    assert_close_tree(got, first)
    floored = fisher_diagonal(model, params, batches_of(x, y, 4)[:1], floor=1e-3)
    for k in first:
        assert torch.equal(floored[k], first[k].clamp_min(1e-3))


def test_fisher_runs_in_eval_mode_and_restores_modes_without_side_effects() -> None:
    model = mlp(dropout=0.5)
    bn = nn.BatchNorm1d(4).double()
    model.append(bn)
    model.train()
    model[2].eval()  # one submodule already in eval mode: its own flag is restored
    params = {k: v for k, v in model.named_parameters() if k.startswith("0.")}
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = data(6)
    got = fisher_diagonal(model, params, [(x, y)])
    assert model.training and model[0].training and not model[2].training
    for k, v in model.state_dict().items():  # running statistics untouched
        assert torch.equal(v, saved[k]), k
    assert all(p.grad is None for p in model.parameters())
    # deterministic (dropout off) and equal to the loop in eval mode
    assert_close_tree(got, fisher_diagonal_ref(model, params, list(zip(x, y))))
    assert_close_tree(fisher_diagonal(model, params, [(x, y)]), got, tol=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fisher_is_at_least_float32(dtype: torch.dtype) -> None:
    model = mlp(torch.float32).to(dtype)
    params = dict(model.named_parameters())
    x, y = data(4, dtype=torch.float32)
    got = fisher_diagonal(model, params, [(x.to(dtype), y)])
    assert all(v.dtype == torch.float32 for v in got.values())
    assert all(bool(torch.isfinite(v).all()) for v in got.values())
    ref = fisher_diagonal_ref(model, params, list(zip(x.to(dtype), y)))
    for k, v in got.items():  # the fp32 Fisher of the low-precision model, to its rounding
        torch.testing.assert_close(v.double(), ref[k], rtol=0.1, atol=2e-3)


def test_fisher_never_mutates_params() -> None:
    model = mlp()
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    saved = {k: v.detach().clone() for k, v in params.items()}
    x, y = data(4)
    fisher_diagonal(model, params, [(x, y)])
    assert all(torch.equal(params[k].detach(), saved[k]) and params[k].grad is None for k in saved)


def _fisher_two_ranks(rank: int, world_size: int) -> dict[str, list[float]]:
    model = mlp()
    params = dict(model.named_parameters())
    x, y = data(10)
    mine = batches_of(x, y, 3)[rank::world_size]  # rank 0: 3 + 3 samples, rank 1: 3 + 1
    fisher = fisher_diagonal(model, params, mine, chunk_size=2)
    return {k: v.reshape(-1).tolist() for k, v in fisher.items()}  # plain lists cross processes


def test_fisher_over_ranks_equals_single_process() -> None:
    results = run_distributed(_fisher_two_ranks, world_size=2, timeout=120)
    model = mlp()
    x, y = data(10)
    single = fisher_diagonal(model, dict(model.named_parameters()), batches_of(x, y, 3))
    for got in results:
        flat = {
            k: torch.tensor(v, dtype=torch.float64).view(single[k].shape) for k, v in got.items()
        }
        assert_close_tree(flat, single, tol=1e-12)


# ---------------------------------------------------------------- fisher_merge


def test_fisher_merge_hand_values_and_fallback() -> None:
    theta0, theta1 = {"w": torch.tensor([0.0, 0.0, 4.0])}, {"w": torch.tensor([1.0, 1.0, 2.0])}
    f0, f1 = {"w": torch.tensor([1.0, 3.0, 0.0])}, {"w": torch.tensor([1.0, 1.0, 0.0])}
    out = fisher_merge([theta0, theta1], fishers=[f0, f1], weights=[0.5, 0.5])
    # the third entry has no information: max(0, 1e-8) on both sides -> the weighted mean
    torch.testing.assert_close(out["w"], torch.tensor([0.5, 0.25, 3.0]))
    out = fisher_merge([theta0, theta1], fishers=[f0, f1], weights=[1, 3], floor=0)
    torch.testing.assert_close(out["w"], torch.tensor([0.75, 0.5, 2.5]))  # fallback: 1/4·4 + 3/4·2
    assert bool(torch.isfinite(out["w"]).all())
    # weights are normalised; NumPy numbers are numbers
    again = fisher_merge(
        [theta0, theta1], fishers=[f0, f1], weights=[np.float32(2), np.int64(6)], floor=0
    )
    torch.testing.assert_close(again["w"], out["w"])


def nonneg(tree: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.abs() * (v > -1) for k, v in tree.items()}  # some exact zeros


@given(
    trees=tree_pairs(n=6),
    w=st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 3)), min_size=3, max_size=3).filter(
        lambda w: sum(w) > 0.1
    ),
    floor=st.sampled_from([0.0, 1e-8, 0.5]),
    normalize=st.booleans(),
)
def test_fisher_merge_matches_reference(
    trees: list[dict[str, torch.Tensor]], w: list[float], floor: float, normalize: bool
) -> None:
    cands, fishers = trees[:3], [nonneg(t) for t in trees[3:]]
    got = fisher_merge(cands, fishers=fishers, weights=w, floor=floor, normalize=normalize)
    ref = fisher_merge_ref(
        cands, fishers, [x / sum(w) for x in w], floor=floor, normalize=normalize
    )
    for k, v in got.items():
        assert v.dtype == cands[0][k].dtype
        # a float64 tensor's weights carry the float32 rounding of a mixed tree's Fisher norm
        tol = 1e-4 if v.dtype == torch.float32 else (1e-6 if normalize else 1e-9)
        torch.testing.assert_close(v.double(), ref[k], rtol=tol, atol=tol)


@given(trees=tree_pairs(n=4), w=st.lists(st.floats(0.01, 3), min_size=3, max_size=3))
def test_equal_fishers_give_the_weighted_mean(
    trees: list[dict[str, torch.Tensor]], w: list[float]
) -> None:
    cands, fisher = trees[:3], nonneg(trees[3])
    got = fisher_merge(cands, fishers=[fisher] * 3, weights=w, floor=0.0)
    for k, v in got.items():
        mean = sum(wi * c[k].double() for wi, c in zip(w, cands)) / sum(w)
        tol = 1e-5 if v.dtype == torch.float32 else 1e-10
        torch.testing.assert_close(v.double(), mean, rtol=tol, atol=tol)


@given(trees=tree_pairs(n=2), alpha=st.floats(0, 1))
def test_fisher_wise_with_equal_fishers_is_wise(
    trees: list[dict[str, torch.Tensor]], alpha: float
) -> None:
    theta0, theta1 = trees
    ones = {k: torch.ones_like(v) for k, v in theta0.items()}
    got = fisher_merge([theta0, theta1], fishers=[ones, ones], weights=[1 - alpha, alpha])
    ref = wise(theta1, anchor=theta0, alpha=alpha)
    for k, v in got.items():
        tol = 1e-5 if v.dtype == torch.float32 else 1e-10
        torch.testing.assert_close(v.double(), ref[k].double(), rtol=tol, atol=tol)


@given(trees=tree_pairs(n=3))
def test_one_candidate_or_one_positive_weight_is_returned_exactly(
    trees: list[dict[str, torch.Tensor]],
) -> None:
    c, f = trees[0], nonneg(trees[1])
    got = fisher_merge([c], fishers=[f])
    assert all(torch.equal(got[k], c[k]) and got[k].data_ptr() != c[k].data_ptr() for k in c)
    got = fisher_merge([trees[2], c], fishers=[f, f], weights=[0, 1])
    assert all(torch.equal(got[k], c[k]) for k in c)


def test_fisher_merge_dtypes_and_purity() -> None:
    g = torch.Generator().manual_seed(0)
    cands = [{"w": torch.randn(4, generator=g).bfloat16()} for _ in range(2)]
    fishers = [
        {"w": torch.rand(4, generator=g)} for _ in range(2)
    ]  # float32 Fishers of bf16 models
    saved = [{k: v.clone() for k, v in t.items()} for t in cands + fishers]
    out = fisher_merge(cands, fishers=fishers, weights=[0.3, 0.7])
    assert out["w"].dtype == torch.bfloat16
    ref = fisher_merge_ref(cands, fishers, [0.3, 0.7], floor=1e-8)
    torch.testing.assert_close(out["w"].double(), ref["w"], rtol=1e-2, atol=1e-2)
    for t, s in zip(cands + fishers, saved):
        assert all(torch.equal(t[k], s[k]) for k in t)
    # candidates requiring grad: a detached result
    cands = [{"w": torch.randn(3, requires_grad=True)} for _ in range(2)]
    out = fisher_merge(cands, fishers=[{"w": torch.ones(3)}] * 2)
    assert not out["w"].requires_grad


def test_fisher_merge_normalize_ignores_an_all_zero_fisher() -> None:
    c = [{"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([4.0, 6.0])}]
    f = [{"w": torch.zeros(2)}, {"w": torch.tensor([3.0, 4.0])}]  # norms 0 and 5
    out = fisher_merge(c, fishers=f, normalize=True, floor=0.0)
    torch.testing.assert_close(out["w"], torch.tensor([4.0, 6.0]))  # only the informed model
    ref = fisher_merge_ref(c, f, [0.5, 0.5], normalize=True)
    torch.testing.assert_close(out["w"].double(), ref["w"])


def test_fisher_merge_streams_generators_and_lazy_sequences_once() -> None:
    g = torch.Generator().manual_seed(1)
    cands = [{"w": torch.randn(3, generator=g), "b": torch.randn(2, generator=g)} for _ in range(3)]
    fishers = [{k: torch.rand(v.shape, generator=g) for k, v in c.items()} for c in cands]
    expected = fisher_merge(cands, fishers=fishers, weights=[1, 2, 3])
    got = fisher_merge(iter(cands), fishers=(f for f in fishers), weights=[1, 2, 3])
    assert_close_tree(got, expected, tol=0.0)
    loads: list[str] = []

    def load(
        store: list[dict[str, torch.Tensor]], name: str
    ) -> Callable[[int], dict[str, torch.Tensor]]:
        def get(i: int) -> dict[str, torch.Tensor]:
            loads.append(f"{name}{i}")
            return store[i]

        return get

    got = fisher_merge(
        lazy(load(cands, "c"), range(3)),
        fishers=lazy(load(fishers, "f"), range(3)),
        weights=[1, 2, 3],
    )
    assert_close_tree(got, expected, tol=0.0)
    assert loads == ["c0", "f0", "c1", "f1", "c2", "f2"]  # each read once, in step
    # equal weights from a generator of unknown length: the plain (1/N) Fisher average
    assert_close_tree(
        fisher_merge(iter(cands), fishers=iter(fishers)),
        fisher_merge(cands, fishers=fishers),
        tol=0.0,
    )


def test_fisher_merge_fishers_are_keyword_only() -> None:
    c, f = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    with pytest.raises(TypeError, match=r"positional argument"):
        fisher_merge([c], [f])  # type: ignore[misc]


# ---------------------------------------------------------------- the error table

M = nn.Linear(2, 3)
P = {"weight": torch.zeros(3, 2)}
X, Y = torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64)
T = {"w": torch.zeros(2)}
FI = {"w": torch.ones(2)}
Z = torch.zeros(2, 3)


class CudaGenerator(torch.Generator):
    """A generator that reports another device than the outputs' (CPU-only machines have no other)."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", 0)


def fd(**kw: Any) -> Callable[[], Any]:
    args = {"model": M, "params": P, "batches": [(X, Y)]}
    args.update(kw)
    return lambda: fisher_diagonal(
        args.pop("model"), args.pop("params"), args.pop("batches"), **args
    )


def fm(cands: Any = (T, T), **kw: Any) -> Callable[[], Any]:
    kw.setdefault("fishers", [FI] * len(cands) if isinstance(cands, tuple) else [FI, FI])
    return lambda: fisher_merge(list(cands) if isinstance(cands, tuple) else cands, **kw)


ERRORS: list[tuple[str, Callable[[], Any], type, str]] = [
    # fisher_diagonal: model and params
    (
        "fisher_diagonal",
        fd(model=3),
        TypeError,
        r"fisher_diagonal: model must be a torch.nn.Module or a callable",
    ),
    ("fisher_diagonal", fd(params=[1]), TypeError, r"fisher_diagonal: params must be a mapping"),
    (
        "fisher_diagonal",
        fd(params={}),
        ValueError,
        r"fisher_diagonal: params must hold at least one tensor",
    ),
    (
        "fisher_diagonal",
        fd(params={"weight": torch.zeros(3, 2, dtype=torch.int64)}),
        TypeError,
        r"fisher_diagonal: params must hold floating-point tensors only",
    ),
    (
        "fisher_diagonal",
        fd(params={"wieght": torch.zeros(3, 2)}),
        ValueError,
        r"fisher_diagonal: params must name parameters or buffers of model, got unknown keys \['wieght'\]",
    ),
    # batches
    (
        "fisher_diagonal",
        fd(batches=X),
        TypeError,
        r"fisher_diagonal: batches must be an iterable of \(inputs, targets\)",
    ),
    (
        "fisher_diagonal",
        fd(batches=[X]),
        TypeError,
        r"batches must yield \(inputs, targets\) pairs with labels='empirical'",
    ),
    (
        "fisher_diagonal",
        fd(batches=[(X, Y, Y)]),
        TypeError,
        r"batches must yield \(inputs, targets\) pairs .*tuple of length 3 at batch 0",
    ),
    (
        "fisher_diagonal",
        fd(batches=[(X, [0, 1])]),
        TypeError,
        r"fisher_diagonal: targets of batch 0 must be a torch.Tensor",
    ),
    (
        "fisher_diagonal",
        fd(batches=[(X, Y[:3])]),
        ValueError,
        r"inputs and targets of batch 0 must share their leading \(batch\) size",
    ),
    (
        "fisher_diagonal",
        fd(batches=[(X, Y.float())]),
        TypeError,
        r"targets of batch 0 must be an integer tensor",
    ),
    (
        "fisher_diagonal",
        fd(batches=[(X, Y + 3)]),
        ValueError,
        r"targets of batch 0 must be class indices in \[0, 3\)",
    ),
    (
        "fisher_diagonal",
        fd(batches=[(X, Y - 1)]),
        ValueError,
        r"targets of batch 0 must be class indices",
    ),
    (
        "fisher_diagonal",
        fd(batches=[]),
        ValueError,
        r"fisher_diagonal: batches must yield at least one sample, got none",
    ),
    (
        "fisher_diagonal",
        fd(batches=[(X[:0], Y[:0])]),
        ValueError,
        r"batches must yield at least one sample",
    ),
    # outputs and log-likelihood
    (
        "fisher_diagonal",
        fd(model=lambda p, x: (x @ p["weight"].T,), params=P),
        TypeError,
        r"fisher_diagonal: model must return floating-point logits \[batch, classes\] for the default",
    ),
    (
        "fisher_diagonal",
        fd(model=lambda p, x: (x @ p["weight"].T)[..., None], params=P),
        ValueError,
        r"model must return logits of shape \[batch, classes\] for the default log-likelihood, got shape \(1, 3, 1\)",
    ),
    (
        "fisher_diagonal",
        fd(
            model=lambda p, x: (x @ p["weight"].T)[..., None],
            params=P,
            batches=[X],
            labels="expected",
        ),
        ValueError,
        r"model must return logits of shape \[batch, classes\] with labels='expected'",
    ),
    (
        "fisher_diagonal",
        fd(log_likelihood=3),
        TypeError,
        r"fisher_diagonal: log_likelihood must be None or a callable",
    ),
    (
        "fisher_diagonal",
        fd(log_likelihood=lambda o, t: o),
        ValueError,
        r"fisher_diagonal: log_likelihood must return one floating-point log-likelihood per sample",
    ),
    (
        "fisher_diagonal",
        fd(log_likelihood=lambda o, t: o.sum(-1), labels="sampled"),
        ValueError,
        r"log_likelihood is only used with labels='empirical'",
    ),
    # labels, generator, sizes, floor, group
    (
        "fisher_diagonal",
        fd(labels="true"),
        ValueError,
        r"fisher_diagonal: labels must be one of 'empirical', 'sampled', 'expected', got 'true'",
    ),
    (
        "fisher_diagonal",
        fd(generator=0, labels="sampled"),
        TypeError,
        r"fisher_diagonal: generator must be None or a torch.Generator",
    ),
    (
        "fisher_diagonal",
        fd(generator=torch.Generator()),
        ValueError,
        r"generator is only used with labels='sampled'",
    ),
    (
        "fisher_diagonal",
        fd(generator=CudaGenerator(), labels="sampled"),
        ValueError,
        r"fisher_diagonal: generator must be on the outputs' device cpu",
    ),
    (
        "fisher_diagonal",
        fd(num_batches=0),
        ValueError,
        r"fisher_diagonal: num_batches must be an int >= 1, got 0",
    ),
    (
        "fisher_diagonal",
        fd(num_batches=1.5),
        TypeError,
        r"fisher_diagonal: num_batches must be an int",
    ),
    (
        "fisher_diagonal",
        fd(chunk_size=0),
        ValueError,
        r"fisher_diagonal: chunk_size must be an int >= 1",
    ),
    (
        "fisher_diagonal",
        fd(chunk_size=True),
        TypeError,
        r"fisher_diagonal: chunk_size must be an int, got True",
    ),
    (
        "fisher_diagonal",
        fd(floor=-1.0),
        ValueError,
        r"fisher_diagonal: floor must be in \[0.0, inf\)",
    ),
    ("fisher_diagonal", fd(floor=math.nan), ValueError, r"fisher_diagonal: floor must not be NaN"),
    (
        "fisher_diagonal",
        fd(group="world"),
        TypeError,
        r"fisher_diagonal: group must be a torch.distributed ProcessGroup or None",
    ),
    # fisher_merge: candidates and fishers
    (
        "fisher_merge",
        fm(cands=T),
        TypeError,
        r"fisher_merge: candidates must be an iterable of parameter trees",
    ),
    (
        "fisher_merge",
        fm(cands=[], fishers=[]),
        ValueError,
        r"fisher_merge: candidates must hold at least one parameter tree",
    ),
    (
        "fisher_merge",
        fm(fishers=FI),
        TypeError,
        r"fisher_merge: fishers must be an iterable of parameter trees, one per candidate",
    ),
    (
        "fisher_merge",
        fm(fishers=[FI]),
        ValueError,
        r"fisher_merge: fishers must hold one Fisher tree per candidate \(2\), got 1",
    ),
    (
        "fisher_merge",
        fm(cands=(T, {"v": torch.zeros(2)})),
        ValueError,
        r"fisher_merge: candidates\[1\] must have the same keys as candidates\[0\]; missing keys \['w'\], unexpected keys \['v'\]",
    ),
    (
        "fisher_merge",
        fm(cands=(T, {"w": torch.zeros(2, dtype=torch.float64)})),
        TypeError,
        r"fisher_merge: candidates\[0\] and candidates\[1\] must have the same dtype",
    ),
    (
        "fisher_merge",
        fm(cands=(T, {"w": torch.zeros(2, dtype=torch.int64)})),
        TypeError,
        r"fisher_merge: candidates\[1\] must hold floating-point tensors only.*num_batches_tracked",
    ),
    (
        "fisher_merge",
        fm(fishers=[FI, {"w": torch.ones(3)}]),
        ValueError,
        r"fisher_merge: candidates\[1\] and fishers\[1\] must have the same shape",
    ),
    (
        "fisher_merge",
        fm(fishers=[FI, {"v": torch.ones(2)}]),
        ValueError,
        r"fisher_merge: fishers\[1\] must have the same keys as candidates\[1\]",
    ),
    (
        "fisher_merge",
        fm(fishers=[FI, {"w": torch.ones(2, dtype=torch.int64)}]),
        TypeError,
        r"fisher_merge: fishers\[1\] must hold floating-point tensors only",
    ),
    *[
        (
            "fisher_merge",
            fm(fishers=[FI, {"w": torch.tensor([1.0, bad])}]),
            ValueError,
            r"fisher_merge: fishers\[1\] must hold finite non-negative values, got negative, NaN or "
            r"infinite entries at keys \['w'\]",
        )
        for bad in (-1e-3, math.nan, math.inf)
    ],
    (
        "fisher_merge",
        fm(cands=iter([T, T, T]), fishers=[FI, FI]),
        ValueError,
        r"fisher_merge: fishers must hold one Fisher tree per candidate, got 2",
    ),
    (
        "fisher_merge",
        fm(cands=iter([T, T]), fishers=iter([FI, FI, FI])),
        ValueError,
        r"fisher_merge: fishers must hold one Fisher tree per candidate \(2\), got more",
    ),
    (
        "fisher_merge",
        fm(cands=[T, T], fishers=[FI, FI, FI]),
        ValueError,
        r"fisher_merge: fishers must hold one Fisher tree per candidate \(2\), got 3",
    ),
    (
        "fisher_merge",
        fm(cands=iter([T, T]), weights=[1.0]),
        ValueError,
        r"fisher_merge: weights must have one entry per candidate, got 1",
    ),
    (
        "fisher_merge",
        fm(cands=iter([T, T]), weights=[1.0, 1.0, 1.0]),
        ValueError,
        r"fisher_merge: weights must have one entry per candidate \(2\), got 3",
    ),
    # weights, floor, normalize
    (
        "fisher_merge",
        fm(weights=torch.ones(2)),
        TypeError,
        r"fisher_merge: weights must be None or a sequence of non-negative numbers",
    ),
    (
        "fisher_merge",
        fm(weights=[1.0]),
        ValueError,
        r"fisher_merge: weights must have one entry per candidate \(2\), got 1",
    ),
    (
        "fisher_merge",
        fm(weights=[1.0, -0.5]),
        ValueError,
        r"fisher_merge: weights\[1\] must be in \[0.0, inf\)",
    ),
    (
        "fisher_merge",
        fm(weights=[1.0, math.inf]),
        ValueError,
        r"fisher_merge: weights\[1\] must be a finite number",
    ),
    (
        "fisher_merge",
        fm(weights=[1.0, "a"]),
        TypeError,
        r"fisher_merge: weights\[1\] must be a real number",
    ),
    (
        "fisher_merge",
        fm(weights=[0, 0.0]),
        ValueError,
        r"fisher_merge: weights must have a positive sum, got \[0, 0.0\]",
    ),
    ("fisher_merge", fm(floor=-1), ValueError, r"fisher_merge: floor must be in \[0.0, inf\)"),
    ("fisher_merge", fm(floor=None), TypeError, r"fisher_merge: floor must be a real number"),
    ("fisher_merge", fm(normalize=1), TypeError, r"fisher_merge: normalize must be a bool, got 1"),
    # logit_ensemble
    (
        "logit_ensemble",
        lambda: logit_ensemble([1.0], reference_logits=Z, alpha=0.5),
        TypeError,
        r"logit_ensemble: logits must be a torch.Tensor",
    ),
    (
        "logit_ensemble",
        lambda: logit_ensemble(Z, reference_logits=Z.long(), alpha=0.5),
        TypeError,
        r"logit_ensemble: reference_logits must be a floating-point tensor, got dtype torch.int64",
    ),
    (
        "logit_ensemble",
        lambda: logit_ensemble(Z, reference_logits=Z[:1], alpha=0.5),
        ValueError,
        r"logit_ensemble: reference_logits must have the shape of logits, got logits of shape \(2, 3\) "
        r"and reference_logits of shape \(1, 3\)",
    ),
    (
        "logit_ensemble",
        lambda: logit_ensemble(torch.tensor(1.0), reference_logits=torch.tensor(1.0), alpha=0.5),
        ValueError,
        r"logit_ensemble: logits must have a class axis",
    ),
    ("logit_ensemble", lambda: logit_ensemble(Z, Z, alpha=0.5), TypeError, r"positional argument"),  # type: ignore[misc]
    (
        "logit_ensemble",
        lambda: logit_ensemble(Z, reference_logits=Z, alpha=math.nan),
        ValueError,
        r"logit_ensemble: alpha must not be NaN",
    ),
    (
        "logit_ensemble",
        lambda: logit_ensemble(Z, reference_logits=Z, alpha=math.inf),
        ValueError,
        r"logit_ensemble: alpha must be a finite number",
    ),
    (
        "logit_ensemble",
        lambda: logit_ensemble(Z, reference_logits=Z, alpha="a"),
        TypeError,
        r"logit_ensemble: alpha must be a real number or a 0-d floating tensor",
    ),
    (
        "logit_ensemble",
        lambda: logit_ensemble(Z, reference_logits=Z, alpha=torch.ones(2)),
        TypeError,
        r"logit_ensemble: alpha must be a real number or a 0-d floating tensor, got Tensor",
    ),
    (
        "logit_ensemble",
        lambda: logit_ensemble(Z, reference_logits=Z, alpha=1.5, space="probs"),
        ValueError,
        r"logit_ensemble: alpha must be in \[0.0, 1.0\], got 1.5",
    ),
    (
        "logit_ensemble",
        lambda: logit_ensemble(Z, reference_logits=Z, alpha=0.5, space="log"),
        ValueError,
        r"logit_ensemble: space must be one of 'logits', 'probs', got 'log'",
    ),
]


@pytest.mark.parametrize(
    ("fn", "call", "err", "match"), ERRORS, ids=[f"{e[0]}-{i}" for i, e in enumerate(ERRORS)]
)
def test_errors(fn: str, call: Callable[[], Any], err: type, match: str) -> None:
    with pytest.raises(err, match=match):
        call()


def test_error_table_covers_every_function() -> None:
    assert {"fisher_diagonal", "fisher_merge", "logit_ensemble"} <= {e[0] for e in ERRORS}
