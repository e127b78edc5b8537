"""The L2/MARS ball projections on a ViT-B/16-sized CLIP tree versus one flat lerp.

Real run (about 150M float32 elements in 302 tensors; at most 3 trees of 600 MB alive)::

    .venv/bin/python -m pytest -q benchmarks/bench_projections.py --benchmark-only -p no:cacheprovider

Targets: ``l2_ball`` <= 2.5x one out-of-place ``torch.lerp`` over a single flat tensor with the
same number of elements (``mars_ball`` is held to the same 2.5x); the in-place per-step forms
``l2_ball_``/``mars_ball_`` <= 4x one in-place ``lerp_`` over the flat tensor (they stream both
trees twice -- the norm pass through a cached 1 MiB difference buffer, then the write -- where
the baseline streams them once: ~2.3x the memory traffic, plus per-tensor launches over 302
tensors; measured 3.4x and 3.6x on the shared 2-core CPU, where the pure ``l2_ball`` takes ~10x
as long as ``l2_ball_`` because it allocates a 600 MB tree per call), with a peak extra
memory of at most one tensor (the largest) of the tree. ``wise`` is in bench_merging.py. Both sides
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
from bench_averaging import DEVICE, bench_shapes, flat_tree, peak_extra_bytes, report

from robustft import projections
from robustft.projections import l2_ball, l2_ball_, mars_ball, mars_ball_


@pytest.fixture(scope="module")
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Any, Any, Any, Any]]:
    shapes = bench_shapes(request)
    flat_a, anchor = flat_tree(shapes, seed=0)
    flat_p, params = flat_tree(shapes, seed=1)
    flat_p.mul_(0.01).add_(flat_a)  # a fine-tune close to its anchor, as in practice
    yield flat_a, anchor, flat_p, params
    del flat_a, anchor, flat_p, params
    gc.collect()


def test_l2_ball_vs_preallocated_flat_lerp(compare: Any, pair: Any) -> None:
    flat_a, anchor, flat_p, params = pair
    out = torch.empty_like(flat_a)
    compare(
        f"l2_ball ({len(anchor)} tensors, {flat_a.numel() / 1e6:.1f}M)",
        lambda: l2_ball(params, anchor=anchor, radius=0.05),
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
        lambda: fn(params, anchor=anchor, radius=radius),
        "torch.lerp (one flat tensor, out of place)",
        lambda: torch.lerp(flat_a, flat_p, 0.5),
        target=2.5,
        device=DEVICE,
    )


@pytest.mark.parametrize("name", ["l2_ball_", "mars_ball_"])
def test_in_place_ball_vs_flat_in_place_lerp(
    compare: Any, capsys: pytest.CaptureFixture[str], pair: Any, name: str
) -> None:
    flat_a, anchor, flat_p, _ = pair
    flat_q = flat_p.clone()  # the trained parameters, written in place (the fixture's stay intact)
    params, i = {}, 0
    for k, v in anchor.items():
        params[k] = flat_q[i : i + v.numel()].view(v.shape)
        i += v.numel()
    fn = l2_ball_ if name == "l2_ball_" else mars_ball_
    radius = 0.05  # below most tensors' deviation on the first call; then on the sphere
    compare(
        f"{name} ({len(anchor)} tensors, {flat_a.numel() / 1e6:.1f}M)",
        lambda: fn(params, anchor=anchor, radius=radius),
        "torch.lerp_ (one flat tensor, in place)",
        lambda: flat_q.lerp_(flat_a, 0.0),  # reads both, writes one; leaves the values as they are
        target=4.0,
        device=DEVICE,
    )
    largest = max(v.numel() * v.element_size() for v in anchor.values())
    peak = peak_extra_bytes(lambda: fn(params, anchor=anchor, radius=radius))
    report(
        capsys,
        f"{name} peak extra memory: {peak / 2**20:.2f} MiB; largest tensor {largest / 2**20:.2f} "
        f"MiB; tree {flat_a.numel() * flat_a.element_size() / 2**20:.1f} MiB (target <= 1 tensor)",
    )
    assert peak <= largest + (1 << 20)


# ------------------------------------------------------------------ SPD and FTP (post-step)
# One optimiser step's worth of work on the ViT-B/16-sized tree, in place, versus one in-place
# flat ``lerp_`` over the same elements. SPD streams the trees three times (prepare: params,
# anchor and grads; update_: the norm pass over params and anchor, then the lerp_), FTP five
# (the radius gradient reads grads and its direction buffer; the deviation is formed in that
# buffer, measured, the params written, the buffer rescaled), plus one tensor-sized temporary per
# tensor in SPD's prepare and per-tensor launches. Measured on the shared 2-core CPU (1 thread):
# spd 8.8x, ftp 10.2x the flat lerp_ (1.38 s and 3.19 s per step for 150M elements).


def _in_place_tree(flat_a: torch.Tensor, flat_p: torch.Tensor, anchor: Any) -> tuple[Any, Any]:
    flat_q = flat_p.clone()
    params, i = {}, 0
    for k, v in anchor.items():
        params[k] = flat_q[i : i + v.numel()].view(v.shape)
        i += v.numel()
    return flat_q, params


def test_spd_step_vs_flat_in_place_lerp(compare: Any, pair: Any) -> None:
    flat_a, anchor, flat_p, _ = pair
    flat_q, params = _in_place_tree(flat_a, flat_p, anchor)
    grads = {k: v - anchor[k] for k, v in params.items()}  # c < 0 everywhere: all decayed
    s = projections.spd(0.1)
    box = [s.init(params, anchor=anchor)]

    def step() -> None:
        box[0] = s.update_(s.prepare(box[0], params, grads=grads), params)

    compare(
        f"spd prepare + update_ ({len(anchor)} tensors, {flat_a.numel() / 1e6:.1f}M)",
        step,
        "torch.lerp_ (one flat tensor, in place)",
        lambda: flat_q.lerp_(flat_a, 0.0),
        target=10.0,
        device=DEVICE,
    )


def test_ftp_update_vs_flat_in_place_lerp(
    compare: Any, capsys: pytest.CaptureFixture[str], pair: Any
) -> None:
    flat_a, anchor, flat_p, _ = pair
    flat_q, params = _in_place_tree(flat_a, flat_p, anchor)
    grads = {k: torch.full_like(v, 1e-3) for k, v in params.items()}
    f = projections.ftp()
    box = [f.init(params, anchor=anchor)]

    def step() -> None:
        box[0] = f.update_(box[0], params, grads=grads)

    compare(
        f"ftp update_ ({len(anchor)} tensors, {flat_a.numel() / 1e6:.1f}M)",
        step,
        "torch.lerp_ (one flat tensor, in place)",
        lambda: flat_q.lerp_(flat_a, 0.0),
        target=12.0,
        device=DEVICE,
    )
    peak = peak_extra_bytes(step)
    report(capsys, f"ftp update_ peak extra memory: {peak / 2**20:.2f} MiB (target <= 1 MiB)")
    assert peak <= 1 << 20
