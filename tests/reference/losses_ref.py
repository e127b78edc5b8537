"""Naive references for robustft.losses, written from the papers' formulas with explicit loops.

Deliberately slow and literal (float64, Python loops over samples/classes, no log-softmax tricks
beyond a max shift) so they share no code path with the library.
"""

from __future__ import annotations

import math

from torch import Tensor


def _unit(x: Tensor) -> Tensor:
    return x / math.sqrt(float((x * x).sum()))


def _cos(a: Tensor, b: Tensor) -> float:
    return float((_unit(a) * _unit(b)).sum())


def _log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def _entropy_row(row: list[float]) -> float:
    return -sum(math.exp(lp) * lp for lp in _log_softmax(row) if math.exp(lp) > 0)


def mms_logits_ref(f: Tensor, T: Tensor, y: Tensor, margin: float, s: float) -> list[list[float]]:
    """CLIPood Eq.: z_bc = s·(cos(f_b, T_c) + λ·(1 − cos(T_{y_b}, T_c)))."""
    B, C = f.shape[0], T.shape[0]
    return [
        [s * (_cos(f[b], T[c]) + margin * (1.0 - _cos(T[int(y[b])], T[c]))) for c in range(C)]
        for b in range(B)
    ]


def mms_ref(f: Tensor, T: Tensor, y: Tensor, margin: float, s: float) -> list[float]:
    """Per-sample MMS cross-entropy."""
    z = mms_logits_ref(f, T, y, margin, s)
    return [-_log_softmax(row)[int(y[b])] for b, row in enumerate(z)]


def entropy_ref(logits: Tensor) -> list[float]:
    return [_entropy_row([float(v) for v in row]) for row in logits]


def ueo_ref(logits: Tensor, w: Tensor, gamma: float) -> float:
    """UEO: Σ w_i H(p_i)/Σ w_i − γ H(Σ (1/w_i) p_i / Σ (1/w_i))."""
    B, C = logits.shape
    probs = [[math.exp(v) for v in _log_softmax([float(x) for x in row])] for row in logits]
    ent = [-sum(p * math.log(p) for p in row if p > 0) for row in probs]
    ws = [float(v) for v in w]
    cond = sum(wi * hi for wi, hi in zip(ws, ent)) / sum(ws)
    inv = [1.0 / wi for wi in ws]
    pbar = [sum(inv[i] * probs[i][k] for i in range(B)) / sum(inv) for k in range(C)]
    h_bar = -sum(p * math.log(p) for p in pbar if p > 0)
    return cond - gamma * h_bar


def ueo_confidence_ref(logits: Tensor, scale: float) -> list[float]:
    return [
        max(math.exp(v) for v in _log_softmax([scale * float(x) for x in row])) for row in logits
    ]


def energy_gap_ref(f: Tensor, f0: Tensor, G: Tensor, s: float) -> list[float]:
    """Lipsum-FT: Σ_m (s·cos(f, g_m) − s·cos(f0, g_m))² / (2M)."""
    M = G.shape[0]
    return [
        sum((s * _cos(f[b], G[m]) - s * _cos(f0[b], G[m])) ** 2 for m in range(M)) / (2 * M)
        for b in range(f.shape[0])
    ]


def kl_ref(teacher: list[float], student: list[float]) -> float:
    lq, lp = _log_softmax(teacher), _log_softmax(student)
    return sum(math.exp(a) * (a - b) for a, b in zip(lq, lp) if math.exp(a) > 0)


def kd_ref(student: Tensor, teacher: Tensor, T: float) -> list[float]:
    return [
        T * T * kl_ref([float(v) / T for v in t], [float(v) / T for v in s])
        for s, t in zip(student, teacher)
    ]


def car_ft_ref(f: Tensor, f0: Tensor, W: Tensor, s: float, T: float) -> list[float]:
    out = []
    for b in range(f.shape[0]):
        zs = [s * _cos(f[b], W[m]) / T for m in range(W.shape[0])]
        zt = [s * _cos(f0[b], W[m]) / T for m in range(W.shape[0])]
        out.append(T * T * kl_ref(zt, zs))
    return out


def featkd_ref(f: Tensor, f0: Tensor) -> list[float]:
    return [float(((_unit(a) - _unit(b)) ** 2).sum()) for a, b in zip(f, f0)]


def l2sp_ref(params: dict[str, Tensor], anchor: dict[str, Tensor]) -> float:
    total = 0.0
    for k, a in anchor.items():
        d = params[k].double() - a.double()
        total += float((d * d).sum())
    return 0.5 * total


def clip_ref(f: Tensor, g: Tensor, s: float) -> float:
    B = f.shape[0]
    S = [[s * _cos(f[i], g[j]) for j in range(B)] for i in range(B)]
    i2t = sum(-_log_softmax(S[i])[i] for i in range(B)) / B
    t2i = sum(-_log_softmax([S[j][i] for j in range(B)])[i] for i in range(B)) / B
    return 0.5 * (i2t + t2i)


def orthogonality_ref(W: Tensor, squared: bool = True) -> float:
    """CaRot: ‖WᵀW − I‖_F (² if squared) with W oriented so that rows ≥ columns (Gram k×k)."""
    rows = [[float(v) for v in r] for r in W]
    if len(rows) < len(rows[0]):  # the smaller side: transpose into m >= n
        rows = [list(col) for col in zip(*rows)]
    m, n = len(rows), len(rows[0])
    total = 0.0
    for a in range(n):
        for b in range(n):
            gab = sum(rows[i][a] * rows[i][b] for i in range(m))
            total += (gab - (1.0 if a == b else 0.0)) ** 2
    return total if squared else math.sqrt(total)


def sigmoid_ref(x: Tensor, y: Tensor, t: float, b: float) -> float:
    """SigLIP: −(1/B) Σ_i Σ_j log σ(z_ij (t·cos(x_i, y_j) + b)), z_ii = 1, z_ij = −1 otherwise."""
    B = x.shape[0]
    total = 0.0
    for i in range(B):
        for j in range(B):
            z = 1.0 if i == j else -1.0
            u = z * (t * _cos(x[i], y[j]) + b)
            # −log σ(u) = log(1 + e^{−u}), written stably for either sign of u
            total += math.log1p(math.exp(-u)) if u >= 0 else -u + math.log1p(math.exp(u))
    return total / max(B, 1)
