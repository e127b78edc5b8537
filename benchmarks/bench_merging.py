"""WiSE-FT on a ViT-B/16-sized CLIP tree versus one flat lerp.

Real run (about 150M float32 elements in 302 tensors; at most 3 trees of 600 MB alive)::

    .venv/bin/python -m pytest -q benchmarks/bench_merging.py --benchmark-only -p no:cacheprovider

Target: ``wise`` (a Python-number alpha: one ``torch._foreach_lerp`` per device/dtype group)
<= 1.2x one out-of-place ``torch.lerp`` over a single flat tensor with the same number of
elements; a 0-d tensor alpha (the per-tensor path) and the comparison with a flat
``torch.lerp(..., out=buffer)`` into a preallocated buffer are informational (see
bench_projections.py for why that stricter baseline flatters nothing). Threads: see conftest.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from bench_averaging import DEVICE
from bench_projections import pair  # noqa: F401 - the shared (anchor, params) fixture

from robustft.merging import wise


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
