"""Recipe settings of issue 18: UEO's training scale, UEO's length in steps, Lipsum-FT's
vocabulary file and its λ rescaling.

- ``ueo_scale``: the unsupervised losses train on ``σ·cos`` logits, σ = 100 (the official code's
  fixed scale) by default or the model's own ``s`` with 0 (the behaviour before the field); the
  exported head is the same either way.
- ``steps`` given for UEO wins over its default 5 epochs; ``steps`` and ``epochs`` together are
  refused.
- ``lipsum_vocabulary``: the random texts of training and of the report's held-out energy gap
  draw their tokens from a text file's tokens.
- ``lipsum_rescale``: λ·(100/s)² (default) or λ as given.

The model is a tiny random open_clip CLIP whose logit scale is open_clip's initial 1/0.07 ≈ 14.3,
so every setting that depends on ``s`` ≠ 100 shows.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import open_clip
import pytest
import torch
import torch.nn.functional as F
from clip_models import tiny_vit_clip, tokenizer
from test_recipes_cli import Tiny, argv, make_tiny, overrides, read_json, run
from torch import Tensor, nn

from robustft import clip, losses
from robustft.recipes import Context, Runtime, build, resolve, train
from robustft.recipes._cli import main
from robustft.recipes._config import RunConfig
from robustft.recipes._loop import plan
from robustft.recipes._methods import lipsum_strength, lipsum_texts, lipsum_vocabulary
from robustft.recipes._nets import PromptClassifier
from robustft.recipes._prepare import held_out_vocabulary
from robustft.recipes._report import HELDOUT_TEXT_SEED, HELDOUT_TEXTS, _bank

CLASSES = ["zero", "one", "two", "three", "four"]
TEMPLATES = ["a photo of a {}."]
N = 16  # training samples of the in-process runs


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_vit_clip()


@pytest.fixture(scope="module")
def tok() -> open_clip.tokenizer.SimpleTokenizer:
    return tokenizer()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return make_tiny(tmp_path_factory.getbasetemp())


def _scale(model: nn.Module) -> float:
    return float(clip.logit_scale(model).detach())


def _context(model: nn.Module, tok: Any, method: str, **fields: Any) -> Context:
    config = resolve(
        {"workers": 0, "progress": False, "device": "cpu", "precision": "fp32", **fields},
        method=method,
    )
    with torch.no_grad():
        head = clip.zero_shot_head(model, tok, CLASSES, TEMPLATES)
    confidence = torch.rand(N, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.2
    return Context(model, tok, CLASSES, TEMPLATES, head, _scale(model), config, confidence)


def _batch(size: int = 6) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(2)
    images = torch.randn(size, 3, 32, 32, generator=g)
    return images, torch.arange(size) % len(CLASSES), torch.arange(size) * 2 % N


def _vocabulary_file(tmp_path: Path, text: str, name: str = "vocabulary.txt") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- ueo_scale -----------------------------------------------------------------------------------


def _ueo_by_hand(model: nn.Module, tok: Any, ctx: Context, sigma: float) -> Tensor:
    """UEO's loss on ``σ·cos`` written from the parts: features, prompt texts, confidence."""
    images, _, indices = _batch()
    assert ctx.confidence is not None
    with torch.no_grad():
        f = F.normalize(model.visual(images), dim=-1)
        context = clip.init_context(model, tok, ctx.config.prompt)
        text = clip.encode_text_with_context(model, context, CLASSES, tok)
    weights = ctx.confidence[indices]
    if ctx.config.method != "ueo":
        weights = torch.ones_like(weights)
    return losses.ueo(sigma * f @ text.T, weights, trade_off=ctx.config.trade_off)


@pytest.mark.parametrize("method", ["ueo", "im", "entropy"])
def test_ueo_scale_sets_the_scale_of_the_training_logits(
    model: nn.Module, tok: Any, method: str
) -> None:
    s = _scale(model)
    assert abs(s - 100.0) > 50  # the tiny model's scale is far from 100: the settings differ
    values = {}
    for ueo_scale, sigma in ((None, 100.0), (100.0, 100.0), (0.0, s), (37.5, 37.5)):
        fields = {} if ueo_scale is None else {"ueo_scale": ueo_scale}
        ctx = _context(model, tok, method, **fields)
        assert ctx.config.ueo_scale == (100.0 if ueo_scale is None else ueo_scale)
        built = build(ctx)
        with torch.no_grad():
            loss = built.loss(built.module, _batch(), 0)
        torch.testing.assert_close(loss, _ueo_by_hand(model, tok, ctx, sigma), rtol=1e-5, atol=1e-6)
        values[ueo_scale] = loss
    assert torch.equal(values[None], values[100.0])  # the default is the official 100
    assert not torch.allclose(values[100.0], values[0.0], rtol=1e-3)  # 100·cos ≠ s·cos here


def test_ueo_scale_zero_is_the_behaviour_before_the_field(model: nn.Module, tok: Any) -> None:
    ctx = _context(model, tok, "ueo", ueo_scale=0)
    built = build(ctx)
    before = PromptClassifier(  # the module as it was built before ueo_scale existed
        tiny_vit_clip(), tok, CLASSES, ctx.config.prompt
    )
    assert built.module.scale == before.scale == _scale(model)
    images, _, indices = _batch()
    with torch.no_grad():
        loss = built.loss(built.module, _batch(), 0)
        assert ctx.confidence is not None
        expected = losses.ueo(before(images).float(), ctx.confidence[indices], trade_off=1.0)
    assert torch.equal(loss, expected)


def test_ueo_scale_leaves_the_exported_head_and_evaluation_alone(
    model: nn.Module, tok: Any
) -> None:
    trees = [build(_context(model, tok, "ueo", ueo_scale=v)) for v in (100.0, 0.0, 3.0)]
    exported = [m.export(m.module) for m in trees]
    for tree in exported[1:]:
        assert tree.keys() == exported[0].keys()
        for key in tree:
            assert torch.equal(tree[key], exported[0][key]), key
    # the gradient of the loss does depend on it (it is what trains)
    grads = []
    for m in trees[:2]:
        m.module.zero_grad()
        m.loss(m.module, _batch(), 0).backward()
        grads.append(m.module.context.grad.clone())
    assert not torch.allclose(grads[0], grads[1], rtol=1e-3)


def test_ueo_scale_errors() -> None:
    flag = r"resolve: --ueo-scale \(ueo_scale in a config file\) must be a finite number >= 0"
    for bad in (-1, -1e-9, math.nan, math.inf):
        with pytest.raises(ValueError, match=rf"{flag} .*0: the model's own scale\), got "):
            resolve({"ueo_scale": bad}, method="ueo")
    for bad in ("100", True, [100.0]):
        with pytest.raises(TypeError, match=flag):
            resolve({"ueo_scale": bad}, method="ueo")
    assert resolve({"ueo_scale": 0}, method="ueo").ueo_scale == 0.0
    assert resolve({"ueo_scale": 250}, method="im").ueo_scale == 250.0


def test_ueo_scale_is_a_flag_of_the_ueo_command(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run(overrides(tiny, tmp_path / "run", "ueo", steps=2, ueo_scale=0.0))
    assert read_json(out / "config.json")["ueo_scale"] == 0.0
    assert main(["ueo", "--ueo-scale", "-3", "--train", str(tiny.digits.open)]) == 2
    assert "--ueo-scale (ueo_scale in a config file) must be a finite number >= 0" in (
        capsys.readouterr().err
    )


# --- UEO's length in optimiser steps ------------------------------------------------------------


@pytest.mark.parametrize("method", ["ueo", "entropy", "im"])
def test_steps_given_win_over_ueo_default_epochs(method: str) -> None:
    default = resolve({}, method=method)
    assert (default.steps, default.epochs) == (None, 5.0)
    assert plan(default, 640, 1).steps == 50  # 5 epochs of 10 batches of 64
    for steps in (1, 7, 123):
        c = resolve({"steps": steps}, method=method)
        assert (c.steps, c.epochs) == (steps, None)
        assert plan(c, 640, 1).steps == steps
        assert resolve(c.to_json()) == c  # the run folder's config.json reads back the same
    c = resolve({"epochs": 2, "batch_size": 8}, method=method)
    assert (c.steps, c.epochs) == (None, 2.0) and plan(c, 64, 1).steps == 16


def test_steps_given_win_in_training(model: nn.Module, tok: Any) -> None:
    ctx = _context(
        model, tok, "ueo", steps=3, batch_size=8, log_every=1, save_every=0, lr=1e-3
    )  # 16 samples, batch 8: 5 epochs would be 10 steps
    g = torch.Generator().manual_seed(3)
    dataset = torch.utils.data.TensorDataset(
        torch.randn(N, 3, 32, 32, generator=g), torch.arange(N) % len(CLASSES)
    )
    result = train(
        build(ctx), dataset, ctx.config, Runtime(torch.device("cpu")), log=lambda _: None
    )
    assert [line["step"] for line in result.history] == [1, 2, 3]


def test_steps_and_epochs_together_are_refused() -> None:
    for method in ("ueo", "ft"):
        with pytest.raises(
            ValueError,
            match=r"resolve: --steps \(steps in a config file\) and --epochs \(epochs in a "
            r"config file\) both set the run's length, got steps 10 and epochs 2; give one",
        ):
            resolve({"steps": 10, "epochs": 2}, method=method)


# --- lipsum_rescale ----------------------------------------------------------------------------


def _perturbed_lipsum(model: nn.Module, tok: Any, **fields: Any) -> Any:
    """A built Lipsum-FT whose trained tower moved away from the teacher (a non-zero gap)."""
    built = build(_context(model, tok, "lipsum", lipsum_texts=16, **fields))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in built.module.visual.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return built


def _parts(built: Any, model: nn.Module, tok: Any, config: RunConfig, **kw: Any) -> Any:
    """``(loss, cross-entropy, energy gap)`` of step 5 on the batch, the gap written by hand."""
    images, labels, indices = _batch()
    with torch.no_grad():
        loss = built.loss(built.module, (images, labels, indices), 5)
        f, z = built.module(images)
        f0, _ = built.teacher(images)
        texts = lipsum_texts(model, tok, config, 5, f.device, **kw)
        gap = losses.energy_gap(
            f, reference_features=f0, text_features=texts, logit_scale=_scale(model)
        )
    return loss, F.cross_entropy(z, labels), gap


def test_lipsum_rescale_multiplies_the_penalty_by_100_over_s_squared(
    model: nn.Module, tok: Any
) -> None:
    s = _scale(model)
    on = _perturbed_lipsum(model, tok)
    off = _perturbed_lipsum(model, tok, lipsum_rescale=False)
    config_on = resolve({"lipsum_texts": 16}, method="lipsum")
    assert config_on.lipsum_rescale is True  # the default
    loss_on, ce_on, gap = _parts(on, model, tok, config_on)
    loss_off, ce_off, gap_off = _parts(off, model, tok, config_on)
    assert torch.equal(ce_on, ce_off) and torch.equal(gap, gap_off)
    assert gap > 1e-3  # the perturbed tower is away from the teacher
    factor = (100.0 / s) ** 2
    assert lipsum_strength(config_on, s) == factor
    assert lipsum_strength(resolve({"lipsum_rescale": False}, method="lipsum"), s) == 1.0
    assert lipsum_strength(config_on, 100.0) == 1.0  # OpenAI/LAION CLIP: the same
    torch.testing.assert_close(loss_on, ce_on + factor * gap, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss_off, ce_off + gap, rtol=1e-5, atol=0)
    ratio = float((loss_on - ce_on) / (loss_off - ce_off))
    assert math.isclose(ratio, factor, rel_tol=1e-4)
    # λ multiplies either
    weighted = _perturbed_lipsum(model, tok, lipsum_rescale=False, reg_weight=0.25)
    loss_w, ce_w, _ = _parts(weighted, model, tok, config_on)
    torch.testing.assert_close(loss_w, ce_w + 0.25 * gap, rtol=1e-5, atol=0)


def test_lipsum_rescale_errors() -> None:
    flag = r"resolve: --lipsum-rescale \(lipsum_rescale in a config file\) must be true or false"
    for bad in ("no", "true", 1, 0.0):
        with pytest.raises(TypeError, match=flag):
            resolve({"lipsum_rescale": bad}, method="lipsum")


# --- lipsum_vocabulary -------------------------------------------------------------------------


def test_lipsum_vocabulary_file_gives_the_tokens_of_its_texts(tmp_path: Path, tok: Any) -> None:
    path = _vocabulary_file(tmp_path, "a photo of a dog\n\n   \nA CAT.\n")
    config = resolve({"lipsum_vocabulary": path}, method="lipsum")
    ids = lipsum_vocabulary(config, tok)
    assert ids is not None
    assert torch.equal(ids, clip.token_vocabulary(["a photo of a dog", "A CAT."], tok))
    assert set(ids.tolist()) == set(tok.encode("a photo of a dog a cat."))
    assert lipsum_vocabulary(resolve({}, method="lipsum"), tok) is None  # the default: all ids
    home = Path("~").expanduser()
    if tmp_path.is_relative_to(home):  # ~ is expanded when read, as --templates
        tilde = "~/" + str(Path(path).relative_to(home))
        tilde_ids = lipsum_vocabulary(resolve({"lipsum_vocabulary": tilde}, method="lipsum"), tok)
        assert tilde_ids is not None and torch.equal(tilde_ids, ids)


def test_lipsum_training_texts_draw_from_the_vocabulary(
    tmp_path: Path, model: nn.Module, tok: Any
) -> None:
    path = _vocabulary_file(tmp_path, "a photo of a dog\ncat\n")
    fields = {"lipsum_vocabulary": path}
    built = _perturbed_lipsum(model, tok, **fields)
    config = resolve({"lipsum_texts": 16, **fields}, method="lipsum")
    ids = lipsum_vocabulary(config, tok)
    assert ids is not None
    # the step's texts: the same generator draw as without, restricted to the file's ids
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + 5)
    tokens = clip.random_text_tokens(
        16, length=8, context_length=77, generator=g, tokenizer=tok, vocabulary=ids
    )
    assert set(tokens[:, 1:9].flatten().tolist()) <= set(ids.tolist())
    with torch.no_grad():
        expected = clip.text_features(model, None, tokens)
    torch.testing.assert_close(
        lipsum_texts(model, tok, config, 5, torch.device("cpu"), vocabulary=ids), expected
    )
    # the method's penalty uses them, and differs from the whole vocabulary's
    loss, ce, gap = _parts(built, model, tok, config, vocabulary=ids)
    torch.testing.assert_close(loss, ce + (100.0 / _scale(model)) ** 2 * gap, rtol=1e-5, atol=0)
    whole = _perturbed_lipsum(model, tok)
    loss_whole, _, _ = _parts(whole, model, tok, config)
    assert not torch.allclose(loss, loss_whole, rtol=1e-4)


def test_lipsum_vocabulary_is_read_once_at_build(
    tmp_path: Path, model: nn.Module, tok: Any
) -> None:
    path = Path(_vocabulary_file(tmp_path, "dog\n"))
    built = build(_context(model, tok, "lipsum", lipsum_vocabulary=str(path), lipsum_texts=4))
    path.unlink()  # gone after the build: the steps never read it again
    images, labels, indices = _batch()
    with torch.no_grad():
        assert torch.isfinite(built.loss(built.module, (images, labels, indices), 0))


def test_report_bank_draws_from_the_same_vocabulary(
    tmp_path: Path, model: nn.Module, tok: Any
) -> None:
    path = Path(_vocabulary_file(tmp_path, "a photo of a dog\ncat\n"))
    config = resolve({"lipsum_vocabulary": str(path), "lipsum_length": 4}, method="lipsum")
    prep = SimpleNamespace(
        bundle=SimpleNamespace(model=model, tokenizer=tok),
        runtime=SimpleNamespace(device=torch.device("cpu")),
        cache={},
    )
    ids = held_out_vocabulary(prep, config)  # type: ignore[arg-type]
    assert ids is not None and torch.equal(ids, lipsum_vocabulary(config, tok))
    path.write_text("something else entirely\n", encoding="utf-8")
    assert torch.equal(held_out_vocabulary(prep, config), ids)  # type: ignore[arg-type]
    features = _bank(prep, config)  # type: ignore[arg-type]
    expected = clip.RandomTextBank.from_model(
        model,
        HELDOUT_TEXTS,
        length=4,
        tokenizer=tok,
        generator=torch.Generator().manual_seed(HELDOUT_TEXT_SEED),
        vocabulary=ids,
    )
    assert set(expected.tokens[:, 1:5].flatten().tolist()) <= set(ids.tolist())
    assert torch.equal(features, expected.features.float().cpu())
    plain = SimpleNamespace(**{**vars(prep), "cache": {}})
    whole = _bank(plain, resolve({"lipsum_length": 4}, method="lipsum"))  # type: ignore[arg-type]
    assert whole.shape == features.shape and not torch.allclose(whole, features)


def test_lipsum_vocabulary_end_to_end(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _vocabulary_file(tmp_path, "a photo of a digit\nzero one two three four\n")
    out = run(overrides(tiny, tmp_path / "run", "lipsum", steps=2, lipsum_vocabulary=path))
    assert read_json(out / "config.json")["lipsum_vocabulary"] == path
    summary = read_json(out / "results.json")["summary"]
    assert summary["zero-shot"]["energy_gap"] == 0.0
    assert summary["last"]["energy_gap"] > 0.0
    tok = open_clip.get_tokenizer("ViT-B-32")
    recorded = read_json(out / "run.json")["lipsum_vocabulary"]
    assert recorded == clip.token_vocabulary(["a photo of a digit", "zero one two three four"],
                                             tok).tolist()  # fmt: skip
    # an edited vocabulary file is named when the run is read again
    Path(path).write_text("red green blue\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out), "--output", str(tmp_path / "eval")]) == 1
    error = capsys.readouterr().err
    assert "the Lipsum-FT vocabulary differs (" in error and "token ids recorded" in error


def test_lipsum_vocabulary_errors(tmp_path: Path, model: nn.Module, tok: Any) -> None:
    flag = r"--lipsum-vocabulary \(lipsum_vocabulary in a config file\)"
    # at resolve, as --templates: the path must name a file
    with pytest.raises(ValueError, match=rf"resolve: {flag} must be an existing text file "):
        resolve({"lipsum_vocabulary": str(tmp_path / "missing.txt")}, method="lipsum")
    with pytest.raises(ValueError, match=rf"resolve: {flag} must be .*, got ''"):
        resolve({"lipsum_vocabulary": ""}, method="lipsum")
    with pytest.raises(ValueError, match=rf"resolve: {flag} .*\(no such file\)"):
        resolve({"lipsum_vocabulary": str(tmp_path)}, method="lipsum")  # a folder
    with pytest.raises(TypeError, match=rf"resolve: {flag} must be an existing text file .*3"):
        resolve({"lipsum_vocabulary": 3}, method="lipsum")
    # at build, when it is read: empty, blank, unreadable, gone
    for name, content in (("empty.txt", b""), ("blank.txt", b"\n   \n\t\n")):
        (tmp_path / name).write_bytes(content)
        config = resolve({"lipsum_vocabulary": str(tmp_path / name)}, method="lipsum")
        with pytest.raises(ValueError, match=rf"^{flag}: '.*{name}' holds no text"):
            lipsum_vocabulary(config, tok)
        ctx = _context(model, tok, "lipsum", lipsum_vocabulary=str(tmp_path / name))
        with pytest.raises(ValueError, match=rf"^{flag}: '.*{name}' holds no text"):
            build(ctx)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    config = resolve({"lipsum_vocabulary": str(tmp_path / "latin1.txt")}, method="lipsum")
    with pytest.raises(ValueError, match=rf"^{flag}: cannot read '.*latin1.txt' as UTF-8"):
        lipsum_vocabulary(config, tok)
    gone = tmp_path / "gone.txt"
    gone.write_text("dog\n", encoding="utf-8")
    config = resolve({"lipsum_vocabulary": str(gone)}, method="lipsum")
    gone.unlink()
    with pytest.raises(ValueError, match=rf"^{flag} must be an existing text file, got .*gone"):
        lipsum_vocabulary(config, tok)


def test_a_bad_vocabulary_file_fails_before_training(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _vocabulary_file(tmp_path, "\n\n")
    values = overrides(tiny, tmp_path / "run", "lipsum", steps=2, lipsum_vocabulary=path)
    assert main(argv(values)) == 2
    err = capsys.readouterr().err
    assert "--lipsum-vocabulary (lipsum_vocabulary in a config file)" in err
    assert "holds no text" in err
    assert not (tmp_path / "run" / "last.safetensors").exists()
