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


# ---------------------------------------------------------------------------------------------
# SPD and FTP: the official optimiser-fused algorithms (GT-RIPL), rewritten from their published
# update rules with explicit branches and per-name buffers. Each reference *is* the optimiser: it
# takes the raw gradients and performs the base step (SGD with momentum, or Adam) and the
# projection together, as AdamSPD / SGDP / AdamP do; the library runs the projection after a
# torch.optim step instead, and the tests check both give the same trajectory.


class BaseStepRef:
    """The base update ``d_p`` (so that the new parameters are ``p - d_p``) of SGD or Adam(W).

    ``kind="sgd"``: ``d_p = lr * buf``, ``buf`` torch.optim.SGD's momentum buffer (the gradient
    itself at the first step). ``kind="adam"``: ``d_p = lr/bc1 * m/(sqrt(v)/sqrt(bc2) + eps) +
    lr * weight_decay * p`` (decoupled decay, AdamW; 0 gives Adam).
    """

    def __init__(
        self,
        kind: str,
        lr: float,
        *,
        momentum: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        self.kind, self.lr, self.momentum = kind, lr, momentum
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.buf: dict[str, Tensor] = {}
        self.m: dict[str, Tensor] = {}
        self.v: dict[str, Tensor] = {}
        self.count: dict[str, int] = {}

    def d_p(self, name: str, p: Tensor, g: Tensor) -> Tensor:
        if self.kind == "sgd":
            if self.momentum == 0:
                return self.lr * g
            if name not in self.buf:
                self.buf[name] = g.clone()
            else:
                self.buf[name] = self.momentum * self.buf[name] + g
            return self.lr * self.buf[name]
        b1, b2 = self.betas
        n = self.count.get(name, 0) + 1
        self.count[name] = n
        m = b1 * self.m.get(name, torch.zeros_like(p)) + (1 - b1) * g
        v = b2 * self.v.get(name, torch.zeros_like(p)) + (1 - b2) * g * g
        self.m[name], self.v[name] = m, v
        denom = v.sqrt() / math.sqrt(1 - b2**n) + self.eps
        return (self.lr / (1 - b1**n)) * m / denom + self.lr * self.weight_decay * p


def spd_step_ref(
    params: Tree, grads: Tree, anchor: Tree, base: BaseStepRef, weight_decay: float
) -> Tree:
    """One AdamSPD step (or the same rule on SGD's step): base step, then selective decay."""
    out = {}
    for k, p in params.items():
        g, pre = grads[k], anchor[k]
        new = p - base.d_p(k, p, g)
        condition = -float((g * (p - pre)).sum())
        if condition < 0.0:
            curr = float(torch.linalg.vector_norm(new - pre))
            prev = float(torch.linalg.vector_norm(p - pre))
            ratio = min(max((curr - prev) / curr, 0.0), 1.0)
            new = new - weight_decay * ratio * (new - pre)
        out[k] = new
    return out


class FtpRef:
    """The official FTP's per-tensor state and step, keyed by name, with explicit branches."""

    def __init__(self, k: float = 1.0, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.999)):
        self.k, self.mu, self.betas = k, lr, betas
        self.t = 1
        self.gamma: dict[str, Tensor] = {}
        self.m: dict[str, float | Tensor] = {}
        self.v: dict[str, float | Tensor] = {}
        self.prev_c: dict[str, Tensor] = {}
        self.prev_scale: dict[str, Tensor] = {}

    @staticmethod
    def _rows(x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)

    def step(self, name: str, p: Tensor, pre: Tensor, d_p: Tensor, grad: Tensor) -> Tensor:
        c = (p - d_p) - pre
        norms = self._rows(c).abs().sum(1) + 1e-8  # [rows]
        if self.t == 1:
            gamma = torch.tensor(1e-8, dtype=p.dtype)
            self.m[name], self.v[name] = 0.0, 0.0
        else:
            rows_dot = (self._rows(grad) * self._rows(self.prev_c[name])).sum(1)
            gamma_grad = float((rows_dot * self.prev_scale[name]).sum())
            if gamma_grad > 0:
                gamma_grad = gamma_grad * self.k
            b1, b2 = self.betas
            self.m[name] = b1 * self.m[name] + (1 - b1) * gamma_grad
            self.v[name] = b2 * self.v[name] + (1 - b2) * gamma_grad**2
            m_hat = self.m[name] / (1 - b1**self.t)
            v_hat = self.v[name] / (1 - b2**self.t)
            gamma = self.gamma[name] - self.mu * m_hat / (math.sqrt(v_hat) + 1e-8)
            gamma = torch.clamp(torch.as_tensor(gamma, dtype=p.dtype), 1e-8, float(norms.max()))
        denom = 1 / norms
        ratio = torch.clamp(gamma * denom, 0.0, 1.0)
        shape = (-1,) + (1,) * (p.ndim - 1) if p.ndim >= 2 else ()
        new = pre + ratio.reshape(shape) * c
        self.gamma[name], self.prev_c[name], self.prev_scale[name] = gamma, c, denom
        return new

    def run(self, params: Tree, grads: Tree, anchor: Tree, base: BaseStepRef) -> Tree:
        out = {
            k: self.step(k, p, anchor[k], base.d_p(k, p, grads[k]), grads[k])
            for k, p in params.items()
        }
        self.t += 1
        return out
