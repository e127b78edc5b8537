"""Naive references for robustft.projections, written from the papers with explicit branches.

WiSE-FT and the soups are in merging_ref.py. The projections use ``if norm > radius`` (the form the TPGM paper states), per-row Python loops for
MARS, float64 throughout: no code path shared with the branch-free library kernels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

Tree = dict[str, Tensor]


def l2_ball_ref(params: Tree, anchor: Tree, radius: float) -> Tree:
    out = {}
    for k in params:
        delta = params[k].double() - anchor[k].double()
        norm = math.sqrt(float((delta * delta).sum()))
        scale = radius / norm if norm > radius else 1.0
        out[k] = anchor[k].double() + scale * delta
    return out


def mars_ball_ref(params: Tree, anchor: Tree, radius: float, cap: bool = True) -> Tree:
    """``cap=False``: the official TPGM code's ``radius / (norm + 1e-8)``, rows scaled up too."""
    out = {}
    for k in params:
        p, a = params[k].double(), anchor[k].double()
        shape = p.shape
        rows_p = p.reshape(shape[0], -1) if p.ndim >= 2 else p.reshape(1, -1)
        rows_a = a.reshape(shape[0], -1) if a.ndim >= 2 else a.reshape(1, -1)
        new_rows = []
        for rp, ra in zip(rows_p, rows_a):
            delta = rp - ra
            norm = float(delta.abs().sum())
            scale = radius / norm if norm > radius else 1.0
            if not cap:  # the official code: no cap, a row inside the ball is scaled up
                scale = radius / (norm + 1e-8)
            new_rows.append(ra + scale * delta)
        out[k] = torch.stack(new_rows).reshape(shape)
    return out
