"""TPT's views as one batched forward, timed beside a Python loop of single-view forwards.

Smoke run (part of ``make test``)::

    .venv/bin/python -m pytest -q benchmarks/bench_tta.py --benchmark-disable

Real run (prints the ratio table)::

    .venv/bin/python -m pytest -q benchmarks/bench_tta.py --benchmark-only -p no:cacheprovider

The kernel is one TPT step's model work on one image: the 64 views (original + 63 augmented,
stacked by :func:`robustft.tta.views`) through a tiny open_clip ViT (``tests/clip_models.py``,
32x32 images) as **one** batch, cosine logits at scale 100 against prompt-dependent text
features, :func:`robustft.tta.tpt_loss` (10 % most confident views) and its gradient to the text
features. The baseline does the same with a Python loop of 64 single-image forwards. Target:
ratio <= 0.5 (batched at least 2x faster).

Measured (``--benchmark-only``, median of 21 interleaved pairs, 1 intra-op thread, 2-core AMD EPYC
CPU of the development machine), two runs: batched 3.90 ms vs loop 37.20 ms, ratio 0.11; batched
2.88 ms vs loop 41.30 ms, ratio 0.07. Not measured on a GPU, where the loop's 64 kernel-launch
sequences would weigh more, not less.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from clip_models import tiny_vit_clip

from robustft import tta

VIEWS = 63
CLASSES = 10


def _setup() -> tuple[Any, torch.Tensor, torch.Tensor]:
    model = tiny_vit_clip()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 40, 40, generator=g)

    def augment(x: torch.Tensor) -> torch.Tensor:  # a random 32x32 crop, flipped half the time
        i, j = torch.randint(0, 9, (2,), generator=g).tolist()
        crop = x[:, i : i + 32, j : j + 32]
        return crop.flip(-1) if bool(torch.rand((), generator=g) < 0.5) else crop

    batch = tta.views(image, VIEWS, augment, original=lambda x: x[:, 4:36, 4:36])
    text = torch.randn(CLASSES, 16, generator=g).requires_grad_(True)
    return model, batch, text


def _loss_grad(model: Any, image_features: torch.Tensor, text: torch.Tensor) -> Any:
    logits = 100.0 * F.normalize(image_features, dim=-1) @ F.normalize(text, dim=-1).T
    return torch.autograd.grad(tta.tpt_loss(logits, fraction=0.1), text)


def test_tpt_views_batched_vs_loop(compare: Any) -> None:
    model, batch, text = _setup()

    def batched() -> Any:
        with torch.no_grad():
            f = model.encode_image(batch)
        return _loss_grad(model, f, text)

    def loop() -> Any:
        with torch.no_grad():
            f = torch.cat([model.encode_image(batch[i : i + 1]) for i in range(batch.shape[0])])
        return _loss_grad(model, f, text)

    # the same numbers either way (up to float32 rounding of the batched matmuls)
    torch.testing.assert_close(batched()[0], loop()[0], rtol=1e-4, atol=1e-5)
    compare(
        f"tpt_loss, {VIEWS + 1} views, one batch",
        batched,
        f"{VIEWS + 1} single-view forwards",
        loop,
        target=0.5,
        rounds=21,
    )
