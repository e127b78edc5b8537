"""robustft.clip random texts (Lipsum-FT): tokens, the pre-encoded bank, the energy-gap metric."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
from clip_models import tiny_custom_text_clip, tiny_vit_clip, tokenizer
from hypothesis import given
from hypothesis import strategies as st
from reference.clip_ref import energy_gap_ref
from torch import nn

from robustft import clip, losses

# chi-square critical values at p = 0.001 (scipy.stats.chi2.ppf(0.999, dof))
CHI2_999 = {7: 24.322, 19: 43.820, 15: 37.697}


def chi_square(counts: torch.Tensor) -> float:
    expected = counts.double().mean()
    return float(((counts.double() - expected) ** 2 / expected).sum())


class TinyVocab:
    """A CLIP-layout tokenizer with 10 ids whose special ids sit inside the range."""

    vocab_size, sot_token_id, eot_token_id, context_length = 10, 3, 7, 12

    def __call__(self, texts: list[str]) -> torch.Tensor:  # pragma: no cover - never called
        raise AssertionError


@pytest.fixture(scope="module")
def tok() -> open_clip.tokenizer.SimpleTokenizer:
    return tokenizer()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_vit_clip()


@pytest.fixture(scope="module")
def bank(model: nn.Module) -> clip.RandomTextBank:
    return clip.RandomTextBank.from_model(
        model, 40, generator=torch.Generator().manual_seed(0), batch_size=16
    )


# ---------------------------------------------------------------- tokens


def test_token_layout_and_range_standard_vocab(tok: object) -> None:
    t = clip.random_text_tokens(500, generator=torch.Generator().manual_seed(1))
    assert t.shape == (500, 77) and t.dtype == torch.long
    assert (t[:, 0] == 49406).all() and (t[:, 9] == 49407).all() and (t[:, 10:] == 0).all()
    body = t[:, 1:9]
    assert ((body >= 0) & (body < 49406)).all()  # never SOT/EOT, the official range [0, 49406)
    assert body.max() > 49000 and body.min() < 400  # spans the range
    # a real tokenizer gives the same specials and the same draws
    same = clip.random_text_tokens(500, generator=torch.Generator().manual_seed(1), tokenizer=tok)
    assert torch.equal(t, same)
    # EOT is each row's maximum, so open_clip's argmax pooling finds it
    assert (t.argmax(dim=-1) == 9).all()


def test_standard_vocab_uniform_chi_square() -> None:
    t = clip.random_text_tokens(4000, length=8, generator=torch.Generator().manual_seed(2))
    bins = torch.bincount(t[:, 1:9].flatten() * 16 // 49406, minlength=16)
    assert chi_square(bins) < CHI2_999[15]


def test_specials_inside_the_vocab_are_skipped_uniformly() -> None:
    t = clip.random_text_tokens(
        3000, length=4, generator=torch.Generator().manual_seed(3), tokenizer=TinyVocab()
    )
    assert t.shape == (3000, 12)  # context length from the tokenizer
    body = t[:, 1:5].flatten()
    counts = torch.bincount(body, minlength=10)
    assert counts[3] == 0 and counts[7] == 0
    kept = counts[[0, 1, 2, 4, 5, 6, 8, 9]]
    assert chi_square(kept) < CHI2_999[7]


@given(n=st.integers(1, 5), length=st.integers(1, 10), seed=st.integers(0, 2**31))
def test_tokens_deterministic_and_laid_out(n: int, length: int, seed: int) -> None:
    a = clip.random_text_tokens(
        n, length=length, context_length=12, generator=torch.Generator().manual_seed(seed)
    )
    b = clip.random_text_tokens(
        n, length=length, context_length=12, generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(a, b)
    expected_tail = torch.zeros(n, 12 - length - 2, dtype=torch.long)
    assert (a[:, 0] == 49406).all() and (a[:, length + 1] == 49407).all()
    assert torch.equal(a[:, length + 2 :], expected_tail)
    assert not ((a[:, 1 : length + 1] == 49406) | (a[:, 1 : length + 1] == 49407)).any()


def test_different_seeds_differ() -> None:
    a = clip.random_text_tokens(4, generator=torch.Generator().manual_seed(0))
    b = clip.random_text_tokens(4, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)


def test_token_errors() -> None:
    fn = "random_text_tokens"
    with pytest.raises(ValueError, match=rf"{fn}: num_texts must be an int >= 1, got 0"):
        clip.random_text_tokens(0)
    with pytest.raises(TypeError, match=rf"{fn}: num_texts must be an int, got True"):
        clip.random_text_tokens(True)
    with pytest.raises(ValueError, match=rf"{fn}: length must be an int >= 1, got 0"):
        clip.random_text_tokens(2, length=0)
    with pytest.raises(ValueError, match=rf"{fn}: length must be at most context_length - 2 = 8"):
        clip.random_text_tokens(2, length=9, context_length=10)
    with pytest.raises(ValueError, match=rf"{fn}: context_length must be an int >= 3, got 2"):
        clip.random_text_tokens(2, length=1, context_length=2)
    with pytest.raises(TypeError, match=rf"{fn}: generator must be a torch.Generator or None"):
        clip.random_text_tokens(2, generator=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=rf"{fn}: tokenizer must be a CLIP BPE tokenizer"):
        clip.random_text_tokens(2, tokenizer=lambda t: t)

    class NoVocab(TinyVocab):
        vocab_size = 5  # eot 7 outside

    with pytest.raises(ValueError, match=rf"{fn}: tokenizer must have an int vocab_size .*=5"):
        clip.random_text_tokens(2, tokenizer=NoVocab())


# ---------------------------------------------------------------- bank


def test_bank_features_are_normalised_text_features(
    model: nn.Module, bank: clip.RandomTextBank
) -> None:
    assert bank.features.shape == (40, 16) and bank.tokens.shape == (40, 77)
    assert bank.num_texts == 40
    expected = torch.cat(
        [clip.text_features(model, None, bank.tokens[i : i + 16]) for i in range(0, 40, 16)]
    ).detach()
    assert torch.equal(bank.features, expected)
    assert not bank.features.requires_grad
    again = clip.RandomTextBank.from_model(
        model, 40, generator=torch.Generator().manual_seed(0), batch_size=40
    )
    assert torch.equal(again.tokens, bank.tokens)  # seeded: the same texts
    torch.testing.assert_close(again.features, bank.features, rtol=0, atol=1e-6)  # any batching


def test_bank_dtype_eval_mode_and_params() -> None:
    model = tiny_custom_text_clip().train()
    g = torch.Generator().manual_seed(5)
    b64 = clip.RandomTextBank.from_model(model, 8, generator=g, dtype=torch.float64, length=3)
    assert b64.features.dtype == torch.float64 and b64.tokens.shape == (8, 77)
    assert all(m.training for m in model.modules())  # flags restored
    torch.testing.assert_close(b64.features.norm(dim=-1), torch.ones(8, dtype=torch.float64))
    with torch.no_grad():
        model.eval()
        ref = F.normalize(model.encode_text(b64.tokens), dim=-1).double()
        model.train()
    torch.testing.assert_close(b64.features, ref, rtol=0, atol=1e-6)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.text.ln_final.weight.mul_(-2.0)
    b = clip.RandomTextBank.from_model(
        model,
        8,
        length=3,
        generator=torch.Generator().manual_seed(5),
        params={"text.ln_final.weight": other.text.ln_final.weight},
    )
    ref_other = clip.RandomTextBank.from_model(
        other.eval(), 8, length=3, generator=torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(b.features, ref_other.features, rtol=0, atol=1e-6)


def test_bank_sampling_without_replacement_is_uniform(bank: clip.RandomTextBank) -> None:
    g = torch.Generator().manual_seed(7)
    small = clip.RandomTextBank(torch.eye(20), torch.zeros(20, 4, dtype=torch.long))
    counts = torch.zeros(20)
    for _ in range(2000):
        rows = small.sample(5, generator=g).argmax(dim=1)
        assert rows.unique().numel() == 5  # distinct rows within a step
        counts += torch.bincount(rows, minlength=20)
    assert counts.sum() == 10000
    assert chi_square(counts) < CHI2_999[19]
    # the real bank: rows are rows of the bank
    picked = bank.sample(10, generator=torch.Generator().manual_seed(0))
    assert all(any(torch.equal(r, f) for f in bank.features) for r in picked)


def test_bank_sampling_with_replacement_is_uniform() -> None:
    g = torch.Generator().manual_seed(8)
    small = clip.RandomTextBank(torch.eye(20), torch.zeros(20, 4, dtype=torch.long))
    rows = small.sample(20000, generator=g, replacement=True).argmax(dim=1)
    assert chi_square(torch.bincount(rows, minlength=20)) < CHI2_999[19]


def test_bank_sampling_is_reproducible(bank: clip.RandomTextBank) -> None:
    a = bank.sample(8, generator=torch.Generator().manual_seed(3))
    b = bank.sample(8, generator=torch.Generator().manual_seed(3))
    c = bank.sample(8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bank_errors(model: nn.Module, bank: clip.RandomTextBank) -> None:
    fn = "RandomTextBank.from_model"
    with pytest.raises(ValueError, match=rf"{fn}: num_texts must be an int >= 1, got 0"):
        clip.RandomTextBank.from_model(model, 0)
    with pytest.raises(ValueError, match=rf"{fn}: batch_size must be an int >= 1, got 0"):
        clip.RandomTextBank.from_model(model, 4, batch_size=0)
    with pytest.raises(TypeError, match=rf"{fn}: dtype must be a floating torch.dtype"):
        clip.RandomTextBank.from_model(model, 4, dtype=torch.long)
    with pytest.raises(TypeError, match=rf"{fn}: model must have method\(s\) encode_text"):
        clip.RandomTextBank.from_model(nn.Linear(1, 1), 4)
    with pytest.raises(ValueError, match=rf"{fn}: params must name parameters .*'x'"):
        clip.RandomTextBank.from_model(model, 4, params={"x": torch.zeros(1)})
    small = open_clip.CLIP(
        8,
        open_clip.CLIPVisionCfg(layers=1, width=8, patch_size=8, image_size=8, head_width=8),
        open_clip.CLIPTextCfg(vocab_size=1000, width=8, heads=1, layers=1),
    )
    with pytest.raises(ValueError, match=rf"{fn}: the tokenizer's vocabulary \(49408 ids\)"):
        clip.RandomTextBank.from_model(small, 4)
    fn = "RandomTextBank.sample"
    with pytest.raises(ValueError, match=rf"{fn}: num_samples must be at most the bank size 40"):
        bank.sample(41)
    with pytest.raises(ValueError, match=rf"{fn}: num_samples must be an int >= 1, got 0"):
        bank.sample(0)
    with pytest.raises(TypeError, match=rf"{fn}: generator must be a torch.Generator"):
        bank.sample(2, generator="g")  # type: ignore[arg-type]
    assert bank.sample(41, replacement=True).shape == (41, 16)


# ---------------------------------------------------------------- energy gap


def test_energy_gap_metric_equals_reference_over_whole_bank(bank: clip.RandomTextBank) -> None:
    f, f0 = torch.randn(3, 16), torch.randn(3, 16)
    per = clip.energy_gap_metric(f, f0, bank, reduction="none")
    ref = energy_gap_ref(f, f0, bank.features, 100.0)
    torch.testing.assert_close(per, ref, rtol=1e-5, atol=1e-5)
    mean = clip.energy_gap_metric(f, f0, bank.features, logit_scale=1.0)
    torch.testing.assert_close(mean, energy_gap_ref(f, f0, bank.features, 1.0).mean())
    torch.testing.assert_close(
        mean, losses.energy_gap(f, f0, bank.features, logit_scale=1.0), rtol=0, atol=0
    )


def test_energy_gap_metric_hand_value_and_no_grad() -> None:
    bank = clip.RandomTextBank(torch.eye(2), torch.zeros(2, 4, dtype=torch.long))
    f = torch.tensor([[1.0, 0.0]], requires_grad=True)
    out = clip.energy_gap_metric(f, torch.tensor([[0.0, 1.0]]), bank, logit_scale=2.0)
    assert out.item() == pytest.approx(4 * (1 + 1) / 4)
    assert not out.requires_grad
    assert clip.energy_gap_metric(f, f.detach(), bank).item() == 0.0


def test_sampled_regulariser_is_unbiased_for_the_bank_metric(bank: clip.RandomTextBank) -> None:
    # E over M-subsets of losses.energy_gap(f, f0, sample) = the whole-bank metric
    f, f0 = torch.randn(4, 16), torch.randn(4, 16)
    g = torch.Generator().manual_seed(11)
    draws = torch.stack(
        [losses.energy_gap(f, f0, bank.sample(8, generator=g)) for _ in range(3000)]
    )
    metric = clip.energy_gap_metric(f, f0, bank)
    assert abs(draws.mean() - metric) < 4 * draws.std() / 3000**0.5


def test_energy_gap_metric_errors() -> None:
    with pytest.raises(TypeError, match=r"energy_gap_metric: bank must be a RandomTextBank"):
        clip.energy_gap_metric(torch.ones(1, 2), torch.ones(1, 2), [[1.0, 0.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"energy_gap_metric: bank must have 2 dimension"):
        clip.energy_gap_metric(torch.ones(1, 2), torch.ones(1, 2), torch.ones(2))
    with pytest.raises(ValueError, match=r"energy_gap: text_features.shape\[1\] must equal"):
        clip.energy_gap_metric(torch.ones(1, 2), torch.ones(1, 2), torch.ones(4, 3))


def test_compiled_regulariser_fullgraph(bank: clip.RandomTextBank) -> None:
    # the whole per-step text side (sample M rows + energy gap) compiles without graph breaks
    f, f0 = torch.randn(4, 16), torch.randn(4, 16)

    def step(f: torch.Tensor, f0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        texts = bank.sample(8)
        return losses.energy_gap(f, f0, texts), texts

    loss, texts = torch.compile(step, fullgraph=True)(f, f0)
    rows = [int((bank.features == t).all(dim=1).nonzero()) for t in texts]
    assert len(set(rows)) == 8
    torch.testing.assert_close(loss, losses.energy_gap(f, f0, texts))
