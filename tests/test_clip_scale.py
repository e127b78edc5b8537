"""robustft.clip.logit_scale: the scale from open_clip's stored log-scale."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from clip_models import tiny_custom_text_clip, tiny_vit_clip
from hypothesis import given
from hypothesis import strategies as st

from robustft import clip


def test_exp_of_the_stored_log_scale() -> None:
    model = tiny_vit_clip()
    s = clip.logit_scale(model)
    assert s.shape == () and s.dtype == torch.float32
    assert torch.equal(s, model.logit_scale.exp())
    assert s.item() == pytest.approx(1 / 0.07)  # open_clip's initial scale
    assert s.requires_grad  # differentiable: a trained scale gets its gradient
    s.backward()
    torch.testing.assert_close(model.logit_scale.grad, s.detach())  # d e^l / dl = e^l
    assert torch.equal(
        clip.logit_scale(tiny_custom_text_clip()), tiny_custom_text_clip().logit_scale.exp()
    )


def test_openai_value_and_clamp() -> None:
    tree = {"logit_scale": torch.tensor(math.log(100.0), requires_grad=True)}
    assert clip.logit_scale(tree).item() == pytest.approx(100.0)
    big = {"logit_scale": torch.tensor(5.0, requires_grad=True)}
    capped = clip.logit_scale(big, max=100.0)
    assert capped.item() == 100.0
    capped.backward()
    assert big["logit_scale"].grad == 0.0  # flat above the cap
    assert clip.logit_scale(big, max=1000).item() == pytest.approx(math.exp(5.0))


def test_params_entry_wins_and_partial_trees() -> None:
    model = tiny_vit_clip()
    blended = {"logit_scale": torch.tensor(2.0), "visual.proj": model.visual.proj}
    assert clip.logit_scale(model, params=blended).item() == pytest.approx(math.exp(2.0))
    assert torch.equal(
        clip.logit_scale(model, params={"visual.proj": model.visual.proj}), model.logit_scale.exp()
    )


def test_dtypes() -> None:
    model = copy.deepcopy(tiny_vit_clip()).to(torch.bfloat16)
    s = clip.logit_scale(model).detach()
    assert s.dtype == torch.float32
    assert s.item() == pytest.approx(math.exp(float(model.logit_scale.detach().float())))
    assert clip.logit_scale(copy.deepcopy(tiny_vit_clip()).double()).dtype == torch.float64
    one = {"logit_scale": torch.tensor([1.0])}  # a [1] parameter is fine too
    assert clip.logit_scale(one).shape == ()


@given(log=st.floats(-5.0, 8.0), cap=st.floats(0.5, 500.0))
def test_property_clamped_exp(log: float, cap: float) -> None:
    s = clip.logit_scale({"logit_scale": torch.tensor(log, dtype=torch.float64)}, max=cap)
    assert s.item() == pytest.approx(min(math.exp(log), cap), rel=1e-12)


def test_errors() -> None:
    fn = "logit_scale"
    with pytest.raises(TypeError, match=rf"{fn}: model must be an open_clip model"):
        clip.logit_scale(3.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=rf"{fn}: model must have a floating-point logit_scale"):
        clip.logit_scale(torch.nn.Linear(1, 1))
    with pytest.raises(TypeError, match=rf"{fn}: model must have a floating-point logit_scale"):
        clip.logit_scale({"logit_scale": torch.tensor(1)})
    with pytest.raises(ValueError, match=rf"{fn}: logit_scale must hold one value"):
        clip.logit_scale({"logit_scale": torch.ones(2)})
    with pytest.raises(ValueError, match=rf"{fn}: max must be in \(0.0, inf\)"):
        clip.logit_scale(tiny_vit_clip(), max=0.0)
    with pytest.raises(ValueError, match=rf"{fn}: max must be a finite number"):
        clip.logit_scale(tiny_vit_clip(), max=math.inf)
    with pytest.raises(TypeError, match=rf"{fn}: max must be a real number"):
        clip.logit_scale(tiny_vit_clip(), max="100")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=rf"{fn}: params must be None when model is a parameter"):
        clip.logit_scale({"logit_scale": torch.tensor(1.0)}, params={})
    with pytest.raises(ValueError, match=rf"{fn}: params must name parameters .*'nope'"):
        clip.logit_scale(tiny_vit_clip(), params={"nope": torch.ones(())})
