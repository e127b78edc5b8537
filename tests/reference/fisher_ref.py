"""Naive references for Fisher merging and output-space ensembles, written from the papers.

Float64, explicit loops, plain ``torch.autograd.grad`` one sample at a time: no code path shared
with the library (no vmap, no grad transform, no chunking, no eval-mode handling).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

Tree = dict[str, Tensor]


def fisher_diagonal_ref(
    model: nn.Module,
    params: Tree,
    samples: Sequence[tuple[Tensor, Tensor]],
    *,
    labels: str = "empirical",
    sampled: Sequence[int] | None = None,
    log_likelihood: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tree:
    """Mean over samples of the squared gradient of log p(y | x), one sample at a time.

    ``labels="empirical"`` uses each sample's label, ``"sampled"`` the labels given in
    ``sampled`` (drawn elsewhere), ``"expected"`` sums over every class c weighted by p(c | x).
    The model's own tensors named in ``params`` are replaced by float64 leaf copies.
    """
    model = copy.deepcopy(model).double().eval()
    leaves = {k: v.detach().double().clone().requires_grad_() for k, v in params.items()}
    acc = {k: torch.zeros_like(v) for k, v in leaves.items()}

    def logp(x: Tensor, y: Tensor) -> Tensor:
        out = torch.func.functional_call(model, leaves, (x.double().unsqueeze(0),))
        if log_likelihood is not None:
            return log_likelihood(out, y.unsqueeze(0)).sum()
        return torch.log_softmax(out, dim=-1)[0, int(y)]

    for n, (x, y) in enumerate(samples):
        if labels == "expected":
            with torch.no_grad():
                out = torch.func.functional_call(model, leaves, (x.double().unsqueeze(0),))
                probs = torch.softmax(out, dim=-1)[0]
            terms = [(torch.tensor(c), float(probs[c])) for c in range(probs.shape[0])]
        elif labels == "sampled":
            assert sampled is not None
            terms = [(torch.tensor(sampled[n]), 1.0)]
        else:
            terms = [(y, 1.0)]
        for label, weight in terms:
            grads = torch.autograd.grad(logp(x, label), list(leaves.values()), allow_unused=True)
            for (k, _), g in zip(leaves.items(), grads):
                if g is not None:
                    acc[k] += weight * g.detach() ** 2
    return {k: v / len(samples) for k, v in acc.items()}


def fisher_merge_ref(
    candidates: Sequence[Tree],
    fishers: Sequence[Tree],
    weights: Sequence[float],
    floor: float = 0.0,
    normalize: bool = False,
) -> Tree:
    """sum_i w_i max(F_i, floor) theta_i / sum_i w_i max(F_i, floor), entry by entry, float64.

    ``normalize`` divides w_i by the L2 norm of the whole Fisher F_i (the Fisher-merging code's
    ``normalize_fishers``); an entry whose denominator is 0 is the weighted mean.
    """
    coef = [float(w) for w in weights]
    if normalize:
        for i, f in enumerate(fishers):
            norm = sum(float((v.double() ** 2).sum()) for v in f.values()) ** 0.5
            if norm > 0:
                coef[i] = coef[i] / norm
    out = {}
    for k, ref in candidates[0].items():
        flat = torch.zeros(ref.numel(), dtype=torch.float64)
        for j in range(ref.numel()):
            num = den = mean = wsum = 0.0
            for c, f, ci, wi in zip(candidates, fishers, coef, weights):
                fij = max(float(f[k].reshape(-1)[j]), floor)
                tij = float(c[k].reshape(-1)[j])
                num += ci * fij * tij
                den += ci * fij
                mean += wi * tij
                wsum += wi
            flat[j] = num / den if den > 0 else mean / wsum
        out[k] = flat.view(ref.shape)
    return out


def logit_ensemble_ref(logits: Tensor, reference: Tensor, alpha: float, space: str) -> Tensor:
    """(1 - a) z0 + a z, or log((1 - a) softmax(z0) + a softmax(z)) through probabilities, float64."""
    z, z0 = logits.double(), reference.double()
    if space == "logits":
        return (1 - alpha) * z0 + alpha * z
    return torch.log((1 - alpha) * torch.softmax(z0, dim=-1) + alpha * torch.softmax(z, dim=-1))
