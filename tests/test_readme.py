"""The README's "in your own loop" example runs as written, on a tiny open_clip model."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from clip_models import tiny_vit_clip

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_loop_example_runs() -> None:
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    code = next(b for b in blocks if "averaging.bma" in b)
    model = tiny_vit_clip()
    total_steps = 3
    images = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 1])
    namespace = {
        "torch": torch,
        "model": model,
        "total_steps": total_steps,
        "loader": [(images, labels)] * total_steps,
        "class_text_features": torch.randn(3, 16),
        "test_images": images,
    }
    # the optimiser is created after `params` exists, as a user would
    code = code.replace(
        "state = bma.init(params)\n",
        "state = bma.init(params)\nopt = torch.optim.SGD(params.values(), lr=0.1)\n",
    )
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    exec(compile(code, str(README), "exec"), namespace)
    state = namespace["state"]
    assert state.step == total_steps
    # the average moved away from the start but lies between start and the trained weights
    moved = [k for k, v in model.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert moved
    k = moved[0]
    avg, start, end = state.average[k], before[k], dict(model.named_parameters())[k].detach()
    assert not torch.equal(avg, start)
    assert (avg - start).norm() < (end - start).norm()
    # the final line evaluates the average functionally: same as a module holding the average
    expected = torch.func.functional_call(model, state.average, (images,), {}, strict=False)
    torch.testing.assert_close(
        namespace["test_f"], torch.nn.functional.normalize(expected[0], dim=-1)
    )
