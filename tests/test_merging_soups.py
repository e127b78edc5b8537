"""robustft.merging: uniform_soup and greedy_soup (their error cases are in test_merging.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _memory import peak_alloc_bytes
from hypothesis import given
from hypothesis import strategies as st
from reference.averaging_ref import uniform_ref
from reference.merging_ref import greedy_soup_ref
from strategies import tree_pairs

from robustft import merging


def scalar_tree(x: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([x], dtype=torch.float64)}


def closeness(target: float) -> Any:
    return lambda p: -abs(float(p["w"][0]) - target)


def test_uniform_soup_hand_value_and_dtype() -> None:
    soup = merging.uniform_soup([scalar_tree(1.0), scalar_tree(2.0), scalar_tree(6.0)])
    assert torch.equal(soup["w"], torch.tensor([3.0], dtype=torch.float64))
    bf16 = [{"w": torch.tensor([1.0, 3.0], dtype=torch.bfloat16)} for _ in range(3)]
    bf16[2]["w"] = torch.tensor([4.0, 0.0], dtype=torch.bfloat16)
    soup = merging.uniform_soup(bf16)
    assert soup["w"].dtype == torch.bfloat16
    assert torch.equal(soup["w"], torch.tensor([2.0, 2.0], dtype=torch.bfloat16))


@given(cands=st.integers(1, 4).flatmap(lambda n: tree_pairs(n=n)))
def test_uniform_soup_is_the_mean(cands: list[dict[str, torch.Tensor]]) -> None:
    soup = merging.uniform_soup(cands)
    ref = uniform_ref(cands)
    for k, v in soup.items():
        assert v.dtype == cands[0][k].dtype
        tol = 1e-5 if v.dtype == torch.float32 else 1e-12
        torch.testing.assert_close(v.double(), ref[k], rtol=tol, atol=tol * 4)


def test_single_candidate_soups_are_copies() -> None:
    only = scalar_tree(2.5)
    for soup in (merging.uniform_soup([only]), merging.greedy_soup([only], closeness(0))[0]):
        assert torch.equal(soup["w"], only["w"])
        assert soup["w"].data_ptr() != only["w"].data_ptr()


def test_greedy_soup_hand_case() -> None:
    # scores: -1, -1, -8 -> start from candidate 0 (tie: input order), the trial mean 1.0 scores 0
    # (kept), then (0 + 2 + 9) / 3 scores -8/3 (rejected)
    cands = [scalar_tree(0.0), scalar_tree(2.0), scalar_tree(9.0)]
    soup, kept = merging.greedy_soup(cands, closeness(1.0))
    assert kept == [0, 1]
    assert torch.equal(soup["w"], torch.tensor([1.0], dtype=torch.float64))
    # sorted by score first: the best (w = 5) comes first, whatever its index
    soup, kept = merging.greedy_soup([scalar_tree(0.0), scalar_tree(5.0)], closeness(4.0))
    assert kept == [1]
    assert torch.equal(soup["w"], torch.tensor([5.0], dtype=torch.float64))


def test_greedy_soup_strict_and_non_strict_on_ties() -> None:
    cands = [scalar_tree(0.0), scalar_tree(3.0), scalar_tree(6.0)]
    calls: list[float] = []

    def flat(p: dict[str, torch.Tensor]) -> float:
        calls.append(float(p["w"][0]))
        return 0.5  # every soup scores the same

    soup, kept = merging.greedy_soup(cands, flat)  # strict: a tie is no improvement
    assert kept == [0] and torch.equal(soup["w"], cands[0]["w"])
    assert len(calls) == 2 * len(cands) - 1  # each candidate once, each trial once
    soup, kept = merging.greedy_soup(cands, flat, strict=False)
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

    soup, kept = merging.greedy_soup(cands, evaluate, strict=strict)
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

    peak = peak_alloc_bytes(lambda: merging.greedy_soup(cands, evaluate, strict=False))
    assert tree_bytes < peak <= 2 * tree_bytes + 4096, (peak, tree_bytes)
    peak = peak_alloc_bytes(lambda: merging.uniform_soup(cands))
    assert peak <= tree_bytes + 4096, (peak, tree_bytes)


def test_soups_never_mutate_candidates() -> None:
    cands = [scalar_tree(float(i)) for i in range(4)]
    saved = [c["w"].clone() for c in cands]
    merging.uniform_soup(cands)
    merging.greedy_soup(cands, closeness(1.5), strict=False)
    assert all(torch.equal(c["w"], s) for c, s in zip(cands, saved))


def test_greedy_soup_ties_keep_the_earliest_candidate_first() -> None:
    # candidates 0 and 2 tie as the best: ours starts from 0 (stable sort), the official code
    # (ascending sort, then reverse) from 2; reversing the input reproduces the official order
    cands = [scalar_tree(1.0), scalar_tree(5.0), scalar_tree(3.0), scalar_tree(-1.0)]

    def evaluate(p: dict[str, torch.Tensor]) -> float:
        return -abs(abs(float(p["w"][0]) - 2.0) - 1.0)  # best (0) at w = 1 and w = 3

    _, kept = merging.greedy_soup(cands, evaluate)
    _, ref_kept = greedy_soup_ref(cands, evaluate)
    assert kept == ref_kept and kept[0] == 0
    _, official = greedy_soup_ref(cands, evaluate, official_ties=True)
    assert official[0] == 2
    _, reversed_kept = merging.greedy_soup(cands[::-1], evaluate)
    assert [len(cands) - 1 - i for i in reversed_kept] == official


def test_soups_accept_numpy_and_tensor_scores() -> None:
    import numpy as np

    cands = [scalar_tree(0.0), scalar_tree(1.0)]
    _, kept = merging.greedy_soup(cands, lambda p: np.float32(-float(p["w"].sum())))
    assert kept == [0]
    _, kept = merging.greedy_soup(cands, lambda p: -p["w"].sum())
    assert kept == [0]
