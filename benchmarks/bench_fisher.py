"""Fisher merging of a ViT-B/16-sized CLIP tree (4 candidates) versus the same formula on flat buffers.

Real run (about 150M float32 elements in 302 tensors per tree; 4 candidates + 4 Fishers + the
accumulators: about 7 GB)::

    .venv/bin/python -m pytest -q benchmarks/bench_fisher.py --benchmark-only -p no:cacheprovider

Target (issue 12): ``fisher_merge`` <= 1.5x the equivalent flat-buffer computation
(``max(F, floor) * w`` accumulated into a numerator and a denominator over one flat tensor per
candidate, then one division) in the same run. ``logit_ensemble`` against one ``torch.lerp`` of
the two logit matrices is informational. Threads: see conftest.py.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from bench_averaging import DEVICE, bench_shapes, flat_tree

from robustft.merging import fisher_merge, logit_ensemble

N = 4
WEIGHTS = [0.1, 0.2, 0.3, 0.4]
FLOOR = 1e-8


@pytest.fixture(scope="module")
def merge_inputs(request: pytest.FixtureRequest) -> Iterator[tuple[list[Any], list[Any]]]:
    shapes = bench_shapes(request)
    cands = [flat_tree(shapes, seed=i) for i in range(N)]
    fishers = [flat_tree(shapes, seed=100 + i) for i in range(N)]
    for flat, _ in fishers:
        flat.square_()  # non-negative
    yield cands, fishers
    del cands, fishers
    gc.collect()


def test_fisher_merge_vs_flat_buffers(compare: Any, merge_inputs: Any) -> None:
    cands, fishers = merge_inputs
    trees = [t for _, t in cands]
    ftrees = [t for _, t in fishers]
    flats = [f for f, _ in cands]
    fflats = [f for f, _ in fishers]

    def flat() -> torch.Tensor:
        num = torch.zeros_like(flats[0])
        den = torch.zeros_like(flats[0])
        for c, f, w in zip(flats, fflats, WEIGHTS):
            t = torch.clamp_min(f, FLOOR).mul_(w)
            den.add_(t)
            num.addcmul_(t, c)
        return num.div_(den)

    compare(
        f"fisher_merge, {N} candidates ({len(trees[0])} tensors, {flats[0].numel() / 1e6:.1f}M)",
        lambda: fisher_merge(trees, fishers=ftrees, weights=WEIGHTS, floor=FLOOR),
        "the same formula on flat buffers",
        flat,
        target=1.5,
        rounds=7,
        warmup=1,
        device=DEVICE,
    )


@pytest.mark.parametrize("space", ["logits", "probs"])
def test_logit_ensemble_vs_lerp(compare: Any, request: pytest.FixtureRequest, space: str) -> None:
    small = request.config.getoption("benchmark_disable", False)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    shape = (8, 10) if small else (256, 1000)
    z, z0 = (torch.randn(shape, generator=g, device=DEVICE) * 10 for _ in range(2))
    compare(
        f"logit_ensemble, space={space!r} {tuple(shape)}",
        lambda: logit_ensemble(z, reference_logits=z0, alpha=0.5, space=space),
        "torch.lerp(z0, z, 0.5)",
        lambda: torch.lerp(z0, z, 0.5),
        target=None,
        device=DEVICE,
    )
