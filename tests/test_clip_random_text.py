"""robustft.clip random texts (Lipsum-FT): tokens and the pre-encoded bank."""

from __future__ import annotations

import copy

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from clip_models import tiny_custom_text_clip, tiny_vit_clip, tokenizer
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from robustft import clip, losses

# chi-square critical values at p = 0.001 (scipy.stats.chi2.ppf(0.999, dof))
CHI2_999 = {7: 24.322, 19: 43.820, 15: 37.697}


def chi_square(counts: torch.Tensor) -> float:
    expected = counts.double().mean()
    return float(((counts.double() - expected) ** 2 / expected).sum())


class TinyVocab:
    """A CLIP-layout tokenizer with 10 ids: SOT inside the range, EOT the last id."""

    vocab_size, sot_token_id, eot_token_id, context_length = 10, 3, 9, 12

    def __call__(self, texts: list[str]) -> torch.Tensor:  # pragma: no cover - never called
        raise AssertionError


def tokenizer_standard() -> open_clip.tokenizer.SimpleTokenizer:
    return tokenizer()


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
    assert counts[3] == 0 and counts[9] == 0
    kept = counts[[0, 1, 2, 4, 5, 6, 7, 8]]
    assert chi_square(kept) < CHI2_999[7]
    assert (t.argmax(dim=-1) == 5).all()  # EOT is the largest id of every row


@pytest.mark.parametrize(
    ("vocab", "sot", "eot"),
    [(10, 3, 7), (10, 9, 8), (10, 9, 9), (10, 3, 10), (10, -1, 9), (2, 0, 1)],
)
def test_tokenizers_that_break_the_eot_promise_are_rejected(vocab: int, sot: int, eot: int) -> None:
    # EOT below another drawable id (or SOT) would not be each row's largest id: argmax pooling
    # would pool the wrong token, so such layouts are refused instead of silently mis-pooled
    class Odd(TinyVocab):
        vocab_size, sot_token_id, eot_token_id = vocab, sot, eot

    with pytest.raises(ValueError, match=r"random_text_tokens: tokenizer must have an int vocab"):
        clip.random_text_tokens(2, length=1, tokenizer=Odd())
    with pytest.raises(ValueError, match=r"RandomTextBank.from_model: tokenizer must have an int"):
        clip.RandomTextBank.from_model(tiny_vit_clip(), 2, tokenizer=Odd())


@given(seed=st.integers(0, 2**31), n=st.integers(1, 6))
def test_eot_is_the_row_maximum_for_every_accepted_tokenizer(seed: int, n: int) -> None:
    for vocab in (None, TinyVocab(), tokenizer_standard()):
        t = clip.random_text_tokens(
            n, length=3, generator=torch.Generator().manual_seed(seed), tokenizer=vocab
        )
        eot = 49407 if vocab is None else vocab.eot_token_id
        assert (t.amax(dim=-1) == eot).all() and (t.argmax(dim=-1) == 4).all()


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
        vocab_size = 5  # eot 9 outside

    with pytest.raises(ValueError, match=rf"{fn}: tokenizer must have an int vocab_size .*=5"):
        clip.random_text_tokens(2, tokenizer=NoVocab())
    with pytest.raises(ValueError, match=rf"{fn}: device must name a torch device .*'gpu:x'"):
        clip.random_text_tokens(2, device="gpu:x")
    with pytest.raises(TypeError, match=rf"{fn}: device must be None, a str or a torch.device"):
        clip.random_text_tokens(2, device=0)  # type: ignore[arg-type]


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
        rows = small.sample(5, generator=g, replacement=False).argmax(dim=1)
        assert rows.unique().numel() == 5  # distinct rows within a step
        counts += torch.bincount(rows, minlength=20)
    assert counts.sum() == 10000
    assert chi_square(counts) < CHI2_999[19]
    # the real bank: rows are rows of the bank
    picked = bank.sample(10, generator=torch.Generator().manual_seed(0), replacement=False)
    assert all(any(torch.equal(r, f) for f in bank.features) for r in picked)


@pytest.mark.parametrize("replacement", [True, False])
def test_key_sampling_is_uniform_and_reproducible(replacement: bool) -> None:
    small = clip.RandomTextBank(torch.eye(20), torch.zeros(20, 4, dtype=torch.long))
    counts = torch.zeros(20)
    for step in range(2000):
        rows = small.sample(5, key=torch.tensor(step), replacement=replacement).argmax(dim=1)
        if not replacement:
            assert rows.unique().numel() == 5
        counts += torch.bincount(rows, minlength=20)
    assert chi_square(counts) < CHI2_999[19]
    a = small.sample(6, key=123, replacement=replacement)
    assert torch.equal(a, small.sample(6, key=torch.tensor(123), replacement=replacement))
    assert not torch.equal(a, small.sample(6, key=124, replacement=replacement))


def test_key_stream_pairs_are_independent() -> None:
    # consecutive draws of one key and the same draw of consecutive keys are uncorrelated
    small = clip.RandomTextBank(torch.eye(8), torch.zeros(8, 4, dtype=torch.long))
    pairs = torch.zeros(8, 8)
    for step in range(1000):
        rows = small.sample(2, key=step).argmax(dim=1)
        pairs[rows[0], rows[1]] += 1
    assert chi_square(pairs.flatten()) < 110.0  # chi2.ppf(0.999, 63) = 103.4, margin for 1000


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
    with pytest.raises(TypeError, match=rf"{fn}: dtype must be a floating-point torch.dtype"):
        clip.RandomTextBank.from_model(model, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"{fn}: device must name a torch device"):
        clip.RandomTextBank.from_model(model, 4, device="nowhere")
    with pytest.raises(TypeError, match=rf"{fn}: device must be None, a str or a torch.device"):
        clip.RandomTextBank.from_model(model, 4, device=1.5)  # type: ignore[arg-type]
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
        bank.sample(41, replacement=False)
    with pytest.raises(ValueError, match=rf"{fn}: generator and key must not both be given"):
        bank.sample(2, key=0, generator=torch.Generator())
    with pytest.raises(TypeError, match=rf"{fn}: key must be an int or a 0-d integer tensor"):
        bank.sample(2, key=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match=rf"{fn}: key must be an int or a 0-d integer tensor"):
        bank.sample(2, key=torch.tensor(1.0))
    with pytest.raises(TypeError, match=rf"{fn}: key must be an int, got 1.5"):
        bank.sample(2, key=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"{fn}: key must fit in int64"):
        bank.sample(2, key=2**70)
    with pytest.raises(TypeError, match=rf"{fn}: replacement must be a bool"):
        bank.sample(2, replacement=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"{fn}: num_samples must be an int >= 1, got 0"):
        bank.sample(0)
    with pytest.raises(TypeError, match=rf"{fn}: generator must be a torch.Generator"):
        bank.sample(2, generator="g")  # type: ignore[arg-type]
    assert bank.sample(41, replacement=True).shape == (41, 16)


# ---------------------------------------------------------------- the bank as an estimator


def test_sampled_regulariser_is_unbiased_for_the_bank_average(bank: clip.RandomTextBank) -> None:
    # E over draws of losses.energy_gap(f, f0, sample) = the same quantity over the whole bank:
    # unbiased for the *bank's* objective (the docs: not for fresh texts, unless averaged over banks)
    f, f0 = torch.randn(4, 16), torch.randn(4, 16)
    whole = losses.energy_gap(f, reference_features=f0, text_features=bank.features)
    for replacement in (True, False):
        g = torch.Generator().manual_seed(11)
        draws = torch.stack(
            [
                losses.energy_gap(
                    f,
                    reference_features=f0,
                    text_features=bank.sample(8, generator=g, replacement=replacement),
                )
                for _ in range(3000)
            ]
        )
        assert abs(draws.mean() - whole) < 4 * draws.std() / 3000**0.5


def test_compiled_regulariser_fullgraph_no_recompiles(bank: clip.RandomTextBank) -> None:
    # the whole per-step text side (sample M rows by key + energy gap) compiles once
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    f, f0 = torch.randn(4, 16), torch.randn(4, 16)

    def step(
        f: torch.Tensor, f0: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        texts = bank.sample(8, key=key)
        return losses.energy_gap(f, reference_features=f0, text_features=texts), texts

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    seen = set()
    for i in range(10):
        loss, texts = compiled(f, f0, torch.tensor(i))
        assert torch.equal(texts, bank.sample(8, key=i))  # eager and compiled draw the same rows
        torch.testing.assert_close(
            loss, losses.energy_gap(f, reference_features=f0, text_features=texts)
        )
        seen.add(tuple(texts[:, 0].tolist()))
    assert len(seen) == 10  # a new draw every step
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0
    torch._dynamo.reset()


# ---------------------------------------------------------------- a given vocabulary

# chi-square critical values at p = 1e-6 (scipy.stats.chi2.ppf(1 - 1e-6, dof)): a hypothesis
# search over many vocabularies and seeds must not fail by chance
CHI2_1E6 = {1: 23.928, 2: 27.631, 3: 30.665, 4: 33.377, 5: 35.888, 6: 38.258, 7: 40.522}


def _old_tokens(
    n: int, length: int, context: int, g: torch.Generator, v: int, sot: int, eot: int
) -> torch.Tensor:
    """The draw of ``random_text_tokens`` before ``vocabulary`` existed, written out."""
    body = torch.randint(0, v - 2, (n, length), generator=g)
    lo, hi = sorted((sot, eot))
    body = body + (body >= lo).long()
    body = body + (body >= hi).long()
    out = torch.zeros(n, context, dtype=torch.long)
    out[:, 0], out[:, 1 : length + 1], out[:, length + 1] = sot, body, eot
    return out


@given(seed=st.integers(0, 2**31), n=st.integers(1, 6), length=st.integers(1, 8))
def test_no_vocabulary_is_bit_identical_to_before(seed: int, n: int, length: int) -> None:
    for tok_, (v, sot, eot), context in (
        (None, (49408, 49406, 49407), 77),
        (TinyVocab(), (10, 3, 9), 12),
    ):
        g_new, g_old = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        new = clip.random_text_tokens(n, length=length, generator=g_new, tokenizer=tok_)
        old = _old_tokens(n, length, context, g_old, v, sot, eot)
        assert torch.equal(new, old)
        # the same number of draws: the generator is left in the same state
        assert torch.equal(g_new.get_state(), g_old.get_state())
        again = clip.random_text_tokens(
            n,
            length=length,
            generator=torch.Generator().manual_seed(seed),
            tokenizer=tok_,
            vocabulary=None,
        )
        assert torch.equal(again, new)


def test_the_whole_vocabulary_given_equals_the_default() -> None:
    # the default maps draw i to the i-th non-special id: giving those ids sorted is the same draw
    for tok_, ids in (
        (None, torch.arange(49406)),
        (TinyVocab(), torch.tensor([0, 1, 2, 4, 5, 6, 7, 8])),
    ):
        a = clip.random_text_tokens(50, generator=torch.Generator().manual_seed(4), tokenizer=tok_)
        b = clip.random_text_tokens(
            50, generator=torch.Generator().manual_seed(4), tokenizer=tok_, vocabulary=ids
        )
        assert torch.equal(a, b)


@given(
    ids=st.sets(st.integers(0, 49405), min_size=1, max_size=12),
    seed=st.integers(0, 2**31),
    as_list=st.booleans(),
)
def test_vocabulary_draws_only_its_ids_in_the_layout(
    ids: set[int], seed: int, as_list: bool
) -> None:
    given_ids = sorted(ids, reverse=True)  # any order
    vocabulary = given_ids if as_list else torch.tensor(given_ids, dtype=torch.int32)
    t = clip.random_text_tokens(
        64, length=5, generator=torch.Generator().manual_seed(seed), vocabulary=vocabulary
    )
    assert t.dtype == torch.long and t.shape == (64, 77)
    assert set(t[:, 1:6].flatten().tolist()) <= ids
    assert (t[:, 0] == 49406).all() and (t[:, 6] == 49407).all() and (t[:, 7:] == 0).all()
    assert (t.argmax(dim=-1) == 6).all()  # EOT stays each row's largest id


@given(ids=st.sets(st.integers(0, 49405), min_size=2, max_size=8), seed=st.integers(0, 2**31))
def test_vocabulary_draws_are_uniform(ids: set[int], seed: int) -> None:
    vocabulary = torch.tensor(sorted(ids))
    t = clip.random_text_tokens(
        500, length=8, generator=torch.Generator().manual_seed(seed), vocabulary=vocabulary
    )
    body = t[:, 1:9].flatten()
    counts = (body.unsqueeze(1) == vocabulary.unsqueeze(0)).sum(0)
    assert int(counts.sum()) == 4000  # every token is one of the ids
    assert chi_square(counts) < CHI2_1E6[len(ids) - 1]


def test_vocabulary_draws_uniform_chi_square_fixed_seed() -> None:
    vocabulary = [0, 5, 17, 300, 4000, 20000, 49000, 49405]
    t = clip.random_text_tokens(
        1000, length=8, generator=torch.Generator().manual_seed(6), vocabulary=vocabulary
    )
    counts = torch.stack([(t[:, 1:9] == i).sum() for i in vocabulary])
    assert int(counts.sum()) == 8000 and chi_square(counts) < CHI2_999[7]


def test_vocabulary_on_a_device_and_the_global_generator() -> None:
    vocabulary = torch.tensor([4, 8, 15, 16, 23, 42])
    torch.manual_seed(3)
    a = clip.random_text_tokens(7, length=4, vocabulary=vocabulary, device="cpu")
    torch.manual_seed(3)
    b = clip.random_text_tokens(7, length=4, vocabulary=vocabulary.tolist())
    assert torch.equal(a, b) and set(a[:, 1:5].flatten().tolist()) <= set(vocabulary.tolist())


def test_vocabulary_errors() -> None:
    for fn, call in (
        ("random_text_tokens", lambda v, **kw: clip.random_text_tokens(2, vocabulary=v, **kw)),
        (
            r"RandomTextBank\.from_model",
            lambda v, **kw: clip.RandomTextBank.from_model(tiny_vit_clip(), 2, vocabulary=v, **kw),
        ),
    ):
        with pytest.raises(ValueError, match=rf"{fn}: vocabulary must hold at least one token"):
            call([])
        with pytest.raises(ValueError, match=rf"{fn}: vocabulary must hold at least one token"):
            call(torch.zeros(0, dtype=torch.long))
        with pytest.raises(ValueError, match=rf"{fn}: vocabulary must be a 1-D .*shape=\(2, 2\)"):
            call(torch.ones(2, 2, dtype=torch.long))
        with pytest.raises(TypeError, match=rf"{fn}: vocabulary must be a 1-D .*float32"):
            call(torch.tensor([1.0, 2.0]))
        with pytest.raises(TypeError, match=rf"{fn}: vocabulary must be .*torch.bool"):
            call(torch.tensor([True, False]))
        with pytest.raises(TypeError, match=rf"{fn}: vocabulary must be .*got an entry True"):
            call([1, True])
        with pytest.raises(TypeError, match=rf"{fn}: vocabulary must be .*got an entry 2.0"):
            call([1, 2.0])
        with pytest.raises(TypeError, match=rf"{fn}: vocabulary must be .*got 'abc'"):
            call("abc")
        with pytest.raises(TypeError, match=rf"{fn}: vocabulary must be .*got 7"):
            call(7)
        with pytest.raises(
            ValueError, match=rf"{fn}: vocabulary must hold distinct ids .*5 2 times"
        ):
            call([5, 6, 5])
        with pytest.raises(ValueError, match=rf"{fn}: .*in \[0, 49408\).*got id -1 outside"):
            call([3, -1])
        with pytest.raises(ValueError, match=rf"{fn}: .*got id 49408 outside .*\(1 such id"):
            call(torch.tensor([49408, 2]))
        with pytest.raises(ValueError, match=rf"{fn}: .*got the special id 49406 \(sot\)"):
            call([1, 49406])
        with pytest.raises(ValueError, match=rf"{fn}: .*got the special id 49407 \(eot\)"):
            call(np.array([49407, 1]).tolist())
        # the tokenizer's vocabulary decides what is valid
        with pytest.raises(ValueError, match=rf"{fn}: .*in \[0, 10\) other than sot 3 and eot 9"):
            call([10], tokenizer=TinyVocab())
        with pytest.raises(ValueError, match=rf"{fn}: .*got the special id 3 \(sot\)"):
            call([3], tokenizer=TinyVocab())
    # numpy integers are ints
    t = clip.random_text_tokens(3, length=2, vocabulary=[np.int64(7), np.int32(9)])
    assert set(t[:, 1:3].flatten().tolist()) <= {7, 9}


def test_bank_from_a_vocabulary(model: nn.Module) -> None:
    vocabulary = torch.tensor([320, 1125, 1929, 539])
    bank = clip.RandomTextBank.from_model(
        model, 12, length=3, generator=torch.Generator().manual_seed(8), vocabulary=vocabulary
    )
    tokens = clip.random_text_tokens(
        12, length=3, generator=torch.Generator().manual_seed(8), vocabulary=vocabulary
    )
    assert torch.equal(bank.tokens, tokens)
    assert set(bank.tokens[:, 1:4].flatten().tolist()) <= set(vocabulary.tolist())
    expected = clip.text_features(model, None, tokens).detach()
    torch.testing.assert_close(bank.features, expected, rtol=0, atol=1e-6)
    plain = clip.RandomTextBank.from_model(
        model, 12, length=3, generator=torch.Generator().manual_seed(8), vocabulary=None
    )
    before = clip.RandomTextBank.from_model(
        model, 12, length=3, generator=torch.Generator().manual_seed(8)
    )
    assert torch.equal(plain.tokens, before.tokens) and torch.equal(plain.features, before.features)
    assert not torch.equal(plain.tokens, bank.tokens)


# ---------------------------------------------------------------- token_vocabulary


def test_token_vocabulary_of_texts(tok: open_clip.tokenizer.SimpleTokenizer) -> None:
    texts = ["a photo of a dog.", "a dog", "A   DOG"]  # the BPE lower-cases and splits on spaces
    ids = clip.token_vocabulary(texts)
    expected = sorted({i for t in texts for i in tok.encode(t)})
    assert ids.tolist() == expected == [269, 320, 539, 1125, 1929]
    assert ids.dtype == torch.long and ids.ndim == 1
    assert torch.equal(clip.token_vocabulary(texts, tok), ids)  # the same tokenizer by default
    assert torch.equal(clip.token_vocabulary(tuple(texts)), ids)
    # the ids are a valid vocabulary, and random texts drawn from it use only them
    t = clip.random_text_tokens(20, generator=torch.Generator().manual_seed(0), vocabulary=ids)
    assert set(t[:, 1:9].flatten().tolist()) <= set(expected)


def test_token_vocabulary_truncates_as_the_model_sees_the_text() -> None:
    short = open_clip.get_tokenizer("ViT-B-32", context_length=5)  # SOT + 3 tokens + EOT
    ids = clip.token_vocabulary(["one two three four five"], short)
    full = open_clip.get_tokenizer("ViT-B-32").encode("one two three four five")
    assert ids.tolist() == sorted(full[:3])


class Rows:
    """A CLIP-layout tokenizer returning fixed rows (vocabulary of 10 ids, SOT 8, EOT 9)."""

    vocab_size, sot_token_id, eot_token_id, context_length = 10, 8, 9, 6

    def __init__(self, rows: list[list[int]] | list[list[float]]) -> None:
        self.rows = rows

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor(self.rows)


class ListRows(Rows):
    """Returns the rows as a list, not a tensor."""

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.rows  # type: ignore[return-value]


class OddEot(TinyVocab):
    eot_token_id = 5  # not the last id


def test_token_vocabulary_excludes_specials_and_padding_by_position() -> None:
    # id 0 inside a text is a token; the zeros after EOT are padding; a stray SOT/EOT is special
    rows = [[8, 0, 4, 9, 0, 0], [8, 5, 8, 6, 9, 0], [8, 7, 9, 3, 9, 2]]
    assert clip.token_vocabulary(["x", "y", "z"], Rows(rows)).tolist() == [0, 4, 5, 6, 7]
    # without 0 in any body, padding zeros are not counted
    assert clip.token_vocabulary(["x"], Rows([[8, 2, 9, 0, 0, 0]])).tolist() == [2]


def test_token_vocabulary_reads_any_number_of_texts_in_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from robustft.clip import _random_text

    texts = [f"word{i} thing{i % 3}" for i in range(11)]
    whole = clip.token_vocabulary(texts)
    monkeypatch.setattr(_random_text, "_CHUNK", 3)
    assert torch.equal(clip.token_vocabulary(texts), whole)


def test_token_vocabulary_errors() -> None:
    fn = "token_vocabulary"
    with pytest.raises(TypeError, match=rf"{fn}: texts must be a sequence of str, got 'a dog'"):
        clip.token_vocabulary("a dog")
    with pytest.raises(TypeError, match=rf"{fn}: texts must be a sequence of str, got 3"):
        clip.token_vocabulary(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"{fn}: texts must hold at least one text, got none"):
        clip.token_vocabulary([])
    with pytest.raises(TypeError, match=rf"{fn}: texts must contain only str, got 5"):
        clip.token_vocabulary(["a", 5])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=rf"{fn}: texts must hold at least one token, got 2 text"):
        clip.token_vocabulary(["", "   "])
    with pytest.raises(TypeError, match=rf"{fn}: tokenizer must be a CLIP BPE tokenizer"):
        clip.token_vocabulary(["a"], lambda t: t)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match=rf"{fn}: tokenizer must have an int vocab_size"):
        clip.token_vocabulary(["a"], OddEot())
    with pytest.raises(TypeError, match=rf"{fn}: tokenizer must return an integer \[texts, "):
        clip.token_vocabulary(["a"], Rows([[8.0, 1.0, 9.0]]))
    with pytest.raises(TypeError, match=rf"{fn}: tokenizer must return an integer .*list"):
        clip.token_vocabulary(["a"], ListRows([[8, 1, 9]]))
    with pytest.raises(ValueError, match=rf"{fn}: tokenizer must lay every text out as \[SOT"):
        clip.token_vocabulary(["a"], Rows([[8, 1, 2, 0]]))  # no EOT
    with pytest.raises(ValueError, match=rf"{fn}: tokenizer must lay every text out as \[SOT"):
        clip.token_vocabulary(["a"], Rows([[1, 2, 9, 0]]))  # no SOT first
    with pytest.raises(ValueError, match=rf"{fn}: tokenizer must return ids in \[0, vocab_size="):
        clip.token_vocabulary(["a"], Rows([[8, 12, 9, 0]]))
