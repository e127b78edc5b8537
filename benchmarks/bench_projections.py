"""WiSE and the L2/MARS ball projections on a ViT-B/16-sized CLIP tree versus one flat lerp.

Real run (about 150M float32 elements in 302 tensors; at most 3 trees of 600 MB alive)::

    .venv/bin/python -m pytest -q benchmarks/bench_projections.py --benchmark-only -p no:cacheprovider

Targets: ``wise`` <= 1.2x and ``l2_ball`` <= 2.5x one out-of-place ``torch.lerp`` over a single
flat tensor with the same number of elements (``mars_ball`` is held to the same 2.5x). Both sides
allocate their output on every call. That baseline flatters the tree kernels on CPU: the one
600 MB output of the flat lerp is a fresh ``mmap`` whose pages fault in on every call, while the
tree's ~2 MB outputs are recycled by malloc. So each kernel is also compared, for information,
with a flat ``torch.lerp(..., out=buffer)`` into a preallocated buffer (pure memory bandwidth, no
allocation at all). Threads: see ``conftest.py``.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from bench_averaging import DEVICE, bench_shapes, flat_tree

from robustft.projections import l2_ball, mars_ball, wise


@pytest.fixture(scope="module")
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Any, Any, Any, Any]]:
    shapes = bench_shapes(request)
    flat_a, anchor = flat_tree(shapes, seed=0)
    flat_p, params = flat_tree(shapes, seed=1)
    flat_p.mul_(0.01).add_(flat_a)  # a fine-tune close to its anchor, as in practice
    yield flat_a, anchor, flat_p, params
    del flat_a, anchor, flat_p, params
    gc.collect()


def test_wise_vs_flat_lerp(compare: Any, pair: Any) -> None:
    flat_a, anchor, flat_p, params = pair
    compare(
        f"wise ({len(anchor)} tensors, {flat_a.numel() / 1e6:.1f}M)",
        lambda: wise(anchor, params, alpha=0.5),
        "torch.lerp (one flat tensor, out of place)",
        lambda: torch.lerp(flat_a, flat_p, 0.5),
        target=1.2,
        device=DEVICE,
    )


@pytest.mark.parametrize("name", ["wise", "l2_ball"])
def test_vs_preallocated_flat_lerp(compare: Any, pair: Any, name: str) -> None:
    flat_a, anchor, flat_p, params = pair
    out = torch.empty_like(flat_a)
    kernels = {
        "wise": lambda: wise(anchor, params, alpha=0.5),
        "l2_ball": lambda: l2_ball(params, anchor, radius=0.05),
    }
    compare(
        f"{name} ({len(anchor)} tensors, {flat_a.numel() / 1e6:.1f}M)",
        kernels[name],
        "torch.lerp(out=preallocated flat tensor)",
        lambda: torch.lerp(flat_a, flat_p, 0.5, out=out),
        target=None,
        device=DEVICE,
    )


@pytest.mark.parametrize("name", ["l2_ball", "mars_ball"])
def test_ball_vs_flat_lerp(compare: Any, pair: Any, name: str) -> None:
    flat_a, anchor, flat_p, params = pair
    fn = l2_ball if name == "l2_ball" else mars_ball
    radius = 0.05  # below most tensors' deviation: the projection really scales
    compare(
        f"{name} ({len(anchor)} tensors, {flat_a.numel() / 1e6:.1f}M)",
        lambda: fn(params, anchor, radius=radius),
        "torch.lerp (one flat tensor, out of place)",
        lambda: torch.lerp(flat_a, flat_p, 0.5),
        target=2.5,
        device=DEVICE,
    )
