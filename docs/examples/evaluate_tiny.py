"""Print the robustness table of the "Evaluating robustness" guide, on a tiny digits classifier.

Known classes are the digits 0-7 of scikit-learn's bundled 8x8 digits (no download); 8 and 9 are
the unknown classes. Three small models are trained on half of the known-class images; the other
known-class images give a validation split (temperature and open-set threshold) and an ID test
split, from which three deterministic distribution shifts are made (noise, blur, translation).

Run from the repository root (a few seconds on a laptop CPU)::

    .venv/bin/python docs/examples/evaluate_tiny.py
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

from robustft import metrics, scores

KNOWN = 8  # digits 0..7 are known; 8 and 9 are unknown (label -1)
BATCH = 64


class Split(NamedTuple):
    images: Tensor  # [n, 1, 8, 8] in [0, 1]
    labels: Tensor  # [n], -1 for unknown classes


def load() -> tuple[Split, Split, Split, Split]:
    """Train / validation / ID test splits of the known digits, and the unknown digits."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    known = y < KNOWN
    xk, yk = x[known], y[known]
    n = len(yk)
    a, b = n // 2, n // 2 + n // 10
    unknown = Split(x[~known], torch.full(((~known).sum(),), -1))
    return Split(xk[:a], yk[:a]), Split(xk[a:b], yk[a:b]), Split(xk[b:], yk[b:]), unknown


def noise(x: Tensor) -> Tensor:
    g = torch.Generator().manual_seed(1)
    return (x + 0.25 * torch.randn(x.shape, generator=g)).clamp(0.0, 1.0)


def blur(x: Tensor) -> Tensor:
    kernel = torch.full((1, 1, 3, 3), 1.0 / 9.0)
    return F.conv2d(x, kernel, padding=1)


def translate(x: Tensor) -> Tensor:
    """One pixel right and one down, zero-filled."""
    return F.pad(x, (1, 0, 1, 0))[..., :8, :8]


SHIFTS: dict[str, Callable[[Tensor], Tensor]] = {"noise": noise, "blur": blur, "shift": translate}


def linear() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, KNOWN))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, KNOWN))


def train(model: nn.Module, data: Split, *, steps: int = 1000) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):  # full batch: the training set has ~600 images
        opt.zero_grad()
        F.cross_entropy(model(data.images), data.labels).backward()
        opt.step()
    return model.eval()


def fit_temperature(model: nn.Module, val: Split) -> float:
    """Temperature scaling (Guo et al., 2017): the T minimising validation NLL, on a grid."""
    with torch.no_grad():
        z = model(val.images)
    grid = torch.linspace(0.25, 5.0, 96)
    losses = torch.stack([F.cross_entropy(z / t, val.labels) for t in grid])
    return float(grid[losses.argmin()])


def evaluate(
    predict: Callable[[Tensor], Tensor], data: Split, *, threshold: float | None = None
) -> metrics.EvaluationResult:
    """The loop a user writes: update per batch, compute once."""
    evaluation = metrics.Evaluation(score="msp", threshold=threshold)
    with torch.no_grad():
        for start in range(0, len(data.labels), BATCH):
            part = slice(start, start + BATCH)
            evaluation.update(predict(data.images[part]), data.labels[part])
    return evaluation.compute()


def row(name: str, predict: Callable[[Tensor], Tensor], splits: tuple[Split, ...]) -> str:
    _, val, test, unknown = splits
    with torch.no_grad():  # the threshold accepts 95% of the known validation images
        threshold = float(torch.quantile(scores.msp(predict(val.images)), 0.05))
    mixed = Split(
        torch.cat([test.images, unknown.images]), torch.cat([test.labels, unknown.labels])
    )
    r = evaluate(predict, mixed, threshold=threshold)
    shifted = [evaluate(predict, Split(f(test.images), test.labels)) for f in SHIFTS.values()]
    mean_shifted = sum(float(s.accuracy) for s in shifted if s.accuracy is not None) / len(shifted)
    assert r.accuracy is not None and r.ece is not None and r.nll is not None
    assert r.auroc is not None and r.fpr_at_tpr is not None and r.hos is not None
    percent = [r.accuracy, mean_shifted, r.ece, r.auroc, r.fpr_at_tpr, r.hos]
    acc, shift, ece, auroc, fpr, hos = (f"{100 * float(v):.1f}" for v in percent)
    return f"| {name} | {acc} | {shift} | {ece} | {float(r.nll):.3f} | {auroc} | {fpr} | {hos} |"


def score_row(name: str, score: Callable[[Tensor], Tensor], splits: tuple[Split, ...]) -> str:
    """AUROC and FPR95 of one OOD score, known test digits vs unknown digits."""
    _, _, test, unknown = splits
    with torch.no_grad():
        s = score(torch.cat([test.images, unknown.images]))
    is_known = torch.cat([test.labels >= 0, unknown.labels >= 0])
    auroc = 100 * float(metrics.auroc(s, is_known))
    fpr = 100 * float(metrics.fpr_at_tpr(s, is_known, tpr=0.95))
    return f"| {name} | {auroc:.1f} | {fpr:.1f} |"


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    splits = load()
    train_split, val = splits[0], splits[1]
    lin = train(linear(), train_split)
    net = train(mlp(), train_split)
    t = fit_temperature(net, val)
    print(
        f"known digits 0-{KNOWN - 1}: {len(train_split.labels)} train, {len(val.labels)} val, "
        f"{len(splits[2].labels)} test; unknown digits 8-9: {len(splits[3].labels)}; "
        f"shifts: {', '.join(SHIFTS)}; MLP temperature T = {t:.2f}\n"
    )
    print("| model | ID acc | shifted acc (mean) | ECE | NLL | AUROC | FPR95 | HOS |")
    print("|---|---|---|---|---|---|---|---|")
    print(row("linear", lin, splits))
    print(row("MLP", net, splits))
    print(row("MLP + temperature scaling", lambda x: net(x) / t, splits))
    print("\n| score (MLP) | AUROC | FPR95 |")
    print("|---|---|---|")
    print(score_row("msp", lambda x: scores.msp(net(x)), splits))
    print(score_row(f"msp, T = {t:.2f}", lambda x: scores.msp(net(x), temperature=t), splits))
    print(score_row("max_logit", lambda x: scores.max_logit(net(x)), splits))
    print(score_row("energy", lambda x: scores.energy(net(x)), splits))
    print(score_row("entropy_score", lambda x: scores.entropy_score(net(x)), splits))


if __name__ == "__main__":
    main()
