"""WiSE-FT and the task-vector merges on a ViT-B/16-sized CLIP tree versus flat-buffer baselines.

Real run (about 150M float32 elements in 302 tensors; at most 3 trees of 600 MB alive)::

    .venv/bin/python -m pytest -q benchmarks/bench_merging.py --benchmark-only -p no:cacheprovider

Target: ``wise`` (a Python-number alpha: one ``torch._foreach_lerp`` per device/dtype group)
<= 1.2x one out-of-place ``torch.lerp`` over a single flat tensor with the same number of
elements; a 0-d tensor alpha (the per-tensor path) and the comparison with a flat
``torch.lerp(..., out=buffer)`` into a preallocated buffer are informational (see
bench_projections.py for why that stricter baseline flatters nothing). Threads: see conftest.py.

Merges of 4 candidates (4 more flat buffers of 150M float32 elements, tree views into them):
``uniform_soup``, ``task_arithmetic``, ``model_stock`` and ``ties`` (density 0.2, global trim)
each <= 1.5x the same computation written on the flat buffers (one tensor instead of 302):
a running-mean ``lerp_``; ``acc += c - a`` then ``a + lambda * acc``; one cosine over the flat
task vectors; and TIES as the official code computes it (``kthvalue`` threshold per task vector,
the trimmed vectors kept, sign of their sum, disjoint mean). The library streams its candidates
(one at a time); the peak extra memory is tested in tests/test_merging_ops.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from bench_averaging import DEVICE, bench_shapes, flat_tree
from bench_projections import pair  # noqa: F401 - the shared (anchor, params) fixture

from robustft.merging import model_stock, task_arithmetic, ties, uniform_soup, wise


@pytest.mark.parametrize("alpha", ["float", "tensor"])
def test_wise_vs_flat_lerp(compare: Any, pair: Any, alpha: str) -> None:  # noqa: F811
    flat_a, anchor, flat_p, params = pair
    a = 0.5 if alpha == "float" else torch.tensor(0.5, device=DEVICE)
    compare(
        f"wise, {alpha} alpha ({len(anchor)} tensors, {flat_a.numel() / 1e6:.1f}M)",
        lambda: wise(params, anchor=anchor, alpha=a),
        "torch.lerp (one flat tensor, out of place)",
        lambda: torch.lerp(flat_a, flat_p, 0.5),
        target=1.2 if alpha == "float" else None,
        device=DEVICE,
    )


def test_wise_vs_preallocated_flat_lerp(compare: Any, pair: Any) -> None:  # noqa: F811
    flat_a, anchor, flat_p, params = pair
    out = torch.empty_like(flat_a)
    compare(
        f"wise ({len(anchor)} tensors, {flat_a.numel() / 1e6:.1f}M)",
        lambda: wise(params, anchor=anchor, alpha=0.5),
        "torch.lerp(out=preallocated flat tensor)",
        lambda: torch.lerp(flat_a, flat_p, 0.5, out=out),
        target=None,
        device=DEVICE,
    )


@pytest.fixture(scope="module")
def four(request: pytest.FixtureRequest, pair: Any) -> Any:  # noqa: F811
    """The anchor and 4 candidates near it (the fixture's fine-tune and 3 more), flat and as trees."""
    flat_a, anchor, flat_p, params = pair
    flats, trees = [flat_p], [params]
    for seed in (2, 3, 4):
        flat, t = flat_tree(bench_shapes(request), seed=seed)
        flat.mul_(0.01).add_(flat_a)
        flats.append(flat)
        trees.append(t)
    yield flat_a, anchor, flats, trees
    del flats, trees


def flat_task_arithmetic(a: torch.Tensor, cands: list[torch.Tensor], lam: float) -> torch.Tensor:
    acc = torch.sub(cands[0], a)
    for c in cands[1:]:
        acc.add_(c - a)
    return torch.add(a, acc, alpha=lam)


def flat_uniform(cands: list[torch.Tensor]) -> torch.Tensor:
    acc = cands[0].clone()
    for i, c in enumerate(cands[1:], start=2):
        acc.lerp_(c, 1.0 / i)
    return acc


def flat_model_stock(a: torch.Tensor, cands: list[torch.Tensor]) -> torch.Tensor:
    n = len(cands)
    total, units, unit_sq = torch.zeros_like(a), torch.zeros_like(a), 0.0
    for c in cands:
        d = c - a
        total.add_(d)
        u = d / d.norm()
        units.add_(u)
        unit_sq = unit_sq + u @ u
    cos = (units @ units - unit_sq) / (n * (n - 1))
    t = n * cos / (1 + (n - 1) * cos)
    return a + (t / n) * total


def flat_ties(a: torch.Tensor, cands: list[torch.Tensor], density: float) -> torch.Tensor:
    """The official TIES recipe on flat task vectors (threshold by kthvalue, keep >=)."""
    d = a.numel()
    k = int(d * density)
    trimmed = []
    for c in cands:
        tau = c - a
        mag = tau.abs()
        kth = mag.kthvalue(d - k).values
        trimmed.append(tau * (mag >= kth))
        del tau, mag
    total = torch.zeros_like(a)
    for t in trimmed:
        total.add_(t)
    sign = torch.sign(total)
    sign[sign == 0] = torch.sign(sign.sum())
    del total
    merged, count = torch.zeros_like(a), torch.zeros_like(a)
    for t in trimmed:
        agree = torch.where(sign > 0, t > 0, t < 0)
        merged.add_(t * agree)
        count.add_(agree)
    return a + merged / count.clamp(min=1)


@pytest.mark.parametrize("name", ["uniform_soup", "task_arithmetic", "model_stock", "ties"])
def test_merges_vs_flat_buffers(compare: Any, four: Any, name: str) -> None:
    flat_a, anchor, flats, trees = four
    kernels = {
        "uniform_soup": (lambda: uniform_soup(trees), lambda: flat_uniform(flats)),
        "task_arithmetic": (
            lambda: task_arithmetic(trees, anchor=anchor, scale=0.3),
            lambda: flat_task_arithmetic(flat_a, flats, 0.3),
        ),
        "model_stock": (
            lambda: model_stock(trees, anchor=anchor),
            lambda: flat_model_stock(flat_a, flats),
        ),
        "ties": (
            lambda: ties(trees, anchor=anchor, density=0.2),
            lambda: flat_ties(flat_a, flats, 0.2),
        ),
    }
    kernel, baseline = kernels[name]
    slow = name == "ties"  # ~10-30 s per call on one CPU thread
    compare(
        f"{name}, 4 candidates ({len(anchor)} tensors, {flat_a.numel() / 1e6:.1f}M)",
        kernel,
        f"the same on flat buffers{' (official TIES)' if slow else ''}",
        baseline,
        target=1.5,
        rounds=3 if slow else 7,
        warmup=1,
        device=DEVICE,
    )
