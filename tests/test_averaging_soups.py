"""robustft.averaging: uniform_soup and greedy_soup."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from _memory import peak_alloc_bytes
from hypothesis import given
from hypothesis import strategies as st
from reference.averaging_ref import greedy_soup_ref, uniform_ref
from strategies import tree_pairs

from robustft import averaging


def scalar_tree(x: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([x], dtype=torch.float64)}


def closeness(target: float) -> Any:
    return lambda p: -abs(float(p["w"][0]) - target)


def test_uniform_soup_hand_value_and_dtype() -> None:
    soup = averaging.uniform_soup([scalar_tree(1.0), scalar_tree(2.0), scalar_tree(6.0)])
    assert torch.equal(soup["w"], torch.tensor([3.0], dtype=torch.float64))
    bf16 = [{"w": torch.tensor([1.0, 3.0], dtype=torch.bfloat16)} for _ in range(3)]
    bf16[2]["w"] = torch.tensor([4.0, 0.0], dtype=torch.bfloat16)
    soup = averaging.uniform_soup(bf16)
    assert soup["w"].dtype == torch.bfloat16
    assert torch.equal(soup["w"], torch.tensor([2.0, 2.0], dtype=torch.bfloat16))


@given(cands=st.integers(1, 4).flatmap(lambda n: tree_pairs(n=n)))
def test_uniform_soup_is_the_mean(cands: list[dict[str, torch.Tensor]]) -> None:
    soup = averaging.uniform_soup(cands)
    ref = uniform_ref(cands)
    for k, v in soup.items():
        assert v.dtype == cands[0][k].dtype
        tol = 1e-5 if v.dtype == torch.float32 else 1e-12
        torch.testing.assert_close(v.double(), ref[k], rtol=tol, atol=tol * 4)


def test_single_candidate_soups_are_copies() -> None:
    only = scalar_tree(2.5)
    for soup in (averaging.uniform_soup([only]), averaging.greedy_soup([only], closeness(0))[0]):
        assert torch.equal(soup["w"], only["w"])
        assert soup["w"].data_ptr() != only["w"].data_ptr()


def test_greedy_soup_hand_case() -> None:
    # scores: -1, -1, -8 -> start from candidate 0 (tie: input order), the trial mean 1.0 scores 0
    # (kept), then (0 + 2 + 9) / 3 scores -8/3 (rejected)
    cands = [scalar_tree(0.0), scalar_tree(2.0), scalar_tree(9.0)]
    soup, kept = averaging.greedy_soup(cands, closeness(1.0))
    assert kept == [0, 1]
    assert torch.equal(soup["w"], torch.tensor([1.0], dtype=torch.float64))
    # sorted by score first: the best (w = 5) comes first, whatever its index
    soup, kept = averaging.greedy_soup([scalar_tree(0.0), scalar_tree(5.0)], closeness(4.0))
    assert kept == [1]
    assert torch.equal(soup["w"], torch.tensor([5.0], dtype=torch.float64))


def test_greedy_soup_strict_and_non_strict_on_ties() -> None:
    cands = [scalar_tree(0.0), scalar_tree(3.0), scalar_tree(6.0)]
    calls: list[float] = []

    def flat(p: dict[str, torch.Tensor]) -> float:
        calls.append(float(p["w"][0]))
        return 0.5  # every soup scores the same

    soup, kept = averaging.greedy_soup(cands, flat)  # strict: a tie is no improvement
    assert kept == [0] and torch.equal(soup["w"], cands[0]["w"])
    assert len(calls) == 2 * len(cands) - 1  # each candidate once, each trial once
    soup, kept = averaging.greedy_soup(cands, flat, strict=False)
    assert kept == [0, 1, 2]
    assert torch.equal(soup["w"], torch.tensor([3.0], dtype=torch.float64))


@pytest.mark.parametrize("strict", [True, False])
@given(cands=tree_pairs(n=5), seed=st.integers(0, 1000))
def test_greedy_soup_matches_the_official_recipe(
    cands: list[dict[str, torch.Tensor]], seed: int, strict: bool
) -> None:
    g = torch.Generator().manual_seed(seed)
    target = {
        k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in cands[0].items()
    }

    def evaluate(p: dict[str, torch.Tensor]) -> float:
        # quantised so that exact ties (where strict matters) happen
        dist = sum(float(((p[k].double() - target[k]) ** 2).sum()) for k in target)
        return -round(dist, 1)

    soup, kept = averaging.greedy_soup(cands, evaluate, strict=strict)
    ref_soup, ref_kept = greedy_soup_ref(cands, evaluate, strict=strict)
    assert kept == ref_kept
    for k, v in soup.items():
        tol = 1e-5 if v.dtype == torch.float32 else 1e-12
        torch.testing.assert_close(v.double(), ref_soup[k], rtol=tol, atol=tol * 4)


def test_greedy_soup_streams_at_most_two_trees() -> None:
    g = torch.Generator().manual_seed(0)
    cands = [{"a": torch.randn(256, 256, generator=g), "b": torch.randn(4096, generator=g)}]
    for i in range(5):
        cands.append({k: v + 0.1 * (i + 1) for k, v in cands[0].items()})
    tree_bytes = sum(v.numel() * v.element_size() for v in cands[0].values())
    target = float(cands[0]["b"][0]) + 0.25

    def evaluate(p: dict[str, torch.Tensor]) -> float:  # reads one element: allocates nothing
        return -abs(float(p["b"][0]) - target)

    peak = peak_alloc_bytes(lambda: averaging.greedy_soup(cands, evaluate, strict=False))
    assert tree_bytes < peak <= 2 * tree_bytes + 4096, (peak, tree_bytes)
    peak = peak_alloc_bytes(lambda: averaging.uniform_soup(cands))
    assert peak <= tree_bytes + 4096, (peak, tree_bytes)


def test_soups_never_mutate_candidates() -> None:
    cands = [scalar_tree(float(i)) for i in range(4)]
    saved = [c["w"].clone() for c in cands]
    averaging.uniform_soup(cands)
    averaging.greedy_soup(cands, closeness(1.5), strict=False)
    assert all(torch.equal(c["w"], s) for c, s in zip(cands, saved))


@pytest.mark.parametrize("fn", ["uniform_soup", "greedy_soup"])
def test_soup_bad_candidates(fn: str) -> None:
    def call(cands: Any) -> Any:
        if fn == "uniform_soup":
            return averaging.uniform_soup(cands)
        return averaging.greedy_soup(cands, closeness(0.0))

    with pytest.raises(ValueError, match=rf"{fn}: candidates must hold at least one"):
        call([])
    with pytest.raises(TypeError, match=rf"{fn}: candidates must be a sequence of parameter trees"):
        call(scalar_tree(1.0))
    with pytest.raises(
        ValueError,
        match=rf"{fn}: candidates\[1\] must have the same keys as candidates\[0\]; "
        r"missing keys \['w'\], unexpected keys \['v'\]",
    ):
        call([scalar_tree(1.0), {"v": torch.zeros(1, dtype=torch.float64)}])
    with pytest.raises(TypeError, match=rf"{fn}: candidates\[1\] must hold floating-point"):
        call([{"w": torch.zeros(1)}, {"w": torch.zeros(1, dtype=torch.int64)}])


def test_greedy_soup_bad_evaluate_and_strict() -> None:
    cands = [scalar_tree(0.0), scalar_tree(1.0)]
    with pytest.raises(TypeError, match=r"greedy_soup: evaluate must be callable, got 3"):
        averaging.greedy_soup(cands, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"greedy_soup: evaluate must return a real number.*'x'"):
        averaging.greedy_soup(cands, lambda p: "x")
    with pytest.raises(ValueError, match=r"greedy_soup: evaluate must not return NaN"):
        averaging.greedy_soup(cands, lambda p: math.nan)
    with pytest.raises(TypeError, match=r"greedy_soup: strict must be a bool, got 1"):
        averaging.greedy_soup(cands, closeness(0.0), strict=1)  # type: ignore[arg-type]
    # a one-element tensor score is accepted
    _, kept = averaging.greedy_soup(cands, lambda p: -p["w"].sum())
    assert kept == [0]
