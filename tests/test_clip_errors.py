"""Table-driven error battery: every callable of robustft.clip.__all__ raises the house errors.

Each row calls one public callable with one bad argument and checks the exception type and the
``fn: arg must be <allowed>, got <value>`` message. ``test_table_covers_all`` fails when a public
name ships without a row. The per-module test files hold the exhaustive per-argument cases.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from clip_models import tiny_vit_clip, tokenizer
from torch import nn

from robustft import clip

MODEL = tiny_vit_clip()
TOK = tokenizer()
IMAGES = torch.randn(2, 3, 32, 32)
TOKENS = TOK(["a cat"])
CTX = clip.init_context(MODEL, TOK)
BANK = clip.RandomTextBank(torch.eye(4), torch.zeros(4, 77, dtype=torch.long))

# (public name, call, exception, message regex)
TABLE: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    ("RandomTextBank", lambda: BANK.sample(0), ValueError, r"RandomTextBank.sample: num_samples"),
    ("RandomTextBank", lambda: BANK.sample(2, key="k"), TypeError, r"RandomTextBank.sample: key"),
    (
        "RandomTextBank",
        lambda: clip.RandomTextBank.from_model(MODEL, 2, device="nowhere"),
        ValueError,
        r"RandomTextBank.from_model: device must name a torch device .*, got 'nowhere'",
    ),
    (
        "RandomTextBank",
        lambda: clip.RandomTextBank.from_model("model", 2),
        TypeError,
        r"RandomTextBank.from_model: model must be an open_clip model",
    ),
    (
        "context_prototypes",
        lambda: clip.context_prototypes(MODEL, TOK, ["cat"], ["{} {}"]),
        ValueError,
        r"context_prototypes: templates given as str must contain exactly one '\{\}'",
    ),
    (
        "encode_text_with_context",
        lambda: clip.encode_text_with_context(MODEL, CTX, ["cat"], TOK, chunk_size=-1),
        ValueError,
        r"encode_text_with_context: chunk_size must be an int >= 1, got -1",
    ),
    (
        "encode_text_with_context",
        lambda: clip.encode_text_with_context(MODEL, CTX.long(), ["cat"], TOK),
        TypeError,
        r"encode_text_with_context: context must be a floating-point tensor",
    ),
    (
        "frozen_copy_features",
        lambda: clip.frozen_copy_features(MODEL, IMAGES, params={"nope": IMAGES}),
        ValueError,
        r"frozen_copy_features: params must name parameters or buffers .*'nope'",
    ),
    (
        "image_features",
        lambda: clip.image_features(MODEL, None, IMAGES.long()),
        TypeError,
        r"image_features: images must be a floating-point tensor, got dtype torch.int64",
    ),
    (
        "image_features",
        lambda: clip.image_features(nn.Linear(1, 1), None, IMAGES),
        TypeError,
        r"image_features: model must have method\(s\) encode_image",
    ),
    (
        "init_context",
        lambda: clip.init_context(MODEL, TOK, 3),
        TypeError,
        r"init_context: text must be a str such as 'a photo of a', got 3",
    ),
    (
        "logit_scale",
        lambda: clip.logit_scale(MODEL, max=-1.0),
        ValueError,
        r"logit_scale: max must be in \(0.0, inf\), got -1.0",
    ),
    (
        "norm_affine_names",
        lambda: clip.norm_affine_names(MODEL, under="nope"),
        ValueError,
        r"norm_affine_names: under must name a submodule",
    ),
    (
        "token_vocabulary",
        lambda: clip.token_vocabulary("a cat", TOK),
        TypeError,
        r"token_vocabulary: texts must be a sequence of str, got 'a cat'",
    ),
    (
        "token_vocabulary",
        lambda: clip.token_vocabulary([], TOK),
        ValueError,
        r"token_vocabulary: texts must hold at least one text, got none",
    ),
    (
        "random_text_tokens",
        lambda: clip.random_text_tokens(2, device=3),
        TypeError,
        r"random_text_tokens: device must be None, a str or a torch.device, got 3",
    ),
    (
        "random_text_tokens",
        lambda: clip.random_text_tokens(2, length=80),
        ValueError,
        r"random_text_tokens: length must be at most context_length - 2 = 75",
    ),
    (
        "text_features",
        lambda: clip.text_features(MODEL, None, TOKENS.float()),
        TypeError,
        r"text_features: tokens must be an integer tensor of token ids, got torch.float32",
    ),
    (
        "text_names",
        lambda: clip.text_names(42),
        TypeError,
        r"text_names: model must be an open_clip model \(torch.nn.Module\) or its parameter tree",
    ),
    (
        "visual_names",
        lambda: clip.visual_names({"text.w": torch.zeros(1)}),
        ValueError,
        r"visual_names: model must have parameters under 'visual.'",
    ),
    (
        "zero_shot_head",
        lambda: clip.zero_shot_head(MODEL, TOK, ["cat"], ["a {0}."]),
        ValueError,
        r"zero_shot_head: templates given as str must contain exactly one '\{\}'",
    ),
    (
        "zero_shot_head",
        lambda: clip.zero_shot_head(MODEL, TOK, ["cat"], ["a {}."], batch_size=0),
        ValueError,
        r"zero_shot_head: batch_size must be an int >= 1, got 0",
    ),
]


@pytest.mark.parametrize(
    ("name", "call", "error", "message"),
    TABLE,
    ids=[f"{row[0]}-{i}" for i, row in enumerate(TABLE)],
)
def test_error(name: str, call: Callable[[], Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()


def test_table_covers_all() -> None:
    # DescriptionBank is a result type (a NamedTuple description_bank builds), validated there
    covered = {row[0] for row in TABLE + DESCRIPTION_TABLE} | {"DescriptionBank"}
    public = {n for n in clip.__all__ if callable(getattr(clip, n))}
    assert public == set(clip.__all__)  # every public name is a callable
    assert public - covered == set(), (
        f"public clip callables without an error row: {public - covered}"
    )


def test_fsdp_modules_are_rejected() -> None:
    from torch.distributed.fsdp import FSDPModule

    class Toy(nn.Module):
        def encode_image(self, x: torch.Tensor) -> torch.Tensor:
            return x

        encode_text = encode_image

    def sharded() -> nn.Module:  # fully_shard swaps the class to a FSDPModule subclass like this
        module = Toy()
        module.__class__ = type("FSDPToy", (FSDPModule, Toy), {})
        return module

    for call in (
        lambda m: clip.image_features(m, None, IMAGES),
        lambda m: clip.frozen_copy_features(m, IMAGES),
        lambda m: clip.zero_shot_head(m, TOK, ["cat"], ["{}"]),
    ):
        with pytest.raises(TypeError, match=r"model must be an unsharded module, got an FSDP"):
            call(sharded())


# ---------------------------------------------------------------- class-description banks

from robustft.clip._descriptions import (  # noqa: E402
    description_bank,
    description_head,
    load_descriptions,
)

DESCRIPTION_TABLE: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    (
        "description_head",
        lambda: description_head(MODEL, TOK, {"cat": "whiskers"}, ["cat", "dog"]),
        ValueError,
        r"description_head: descriptions must have a key for every class name; missing classes "
        r"\['dog'\]",
    ),
    (
        "description_head",
        lambda: description_head(MODEL, TOK, {"cat": ["whiskers", 1]}, ["cat"]),
        TypeError,
        r"description_head: descriptions of class 'cat' must contain only str, got 1 at position 1",
    ),
    (
        "description_bank",
        lambda: description_bank(MODEL, TOK, {"cat": []}, ["cat"]),
        ValueError,
        r"description_bank: descriptions of class 'cat' must hold at least one description",
    ),
    (
        "description_bank",
        lambda: description_bank(MODEL, TOK, ["whiskers"], ["cat"]),
        TypeError,
        r"description_bank: descriptions must be a mapping \{class name: \[description, \.\.\.\]\}",
    ),
    (
        "load_descriptions",
        lambda: load_descriptions(3, ["cat"]),  # type: ignore[arg-type]
        TypeError,
        r"load_descriptions: path must be a str or os\.PathLike, got 3",
    ),
    (
        "load_descriptions",
        lambda: load_descriptions("cd.json", ["cat"], match="key"),  # type: ignore[arg-type]
        ValueError,
        r"load_descriptions: match must be one of 'name', 'index', 'order', got 'key'",
    ),
]


@pytest.mark.parametrize(
    ("name", "call", "error", "message"),
    DESCRIPTION_TABLE,
    ids=[f"{row[0]}-{i}" for i, row in enumerate(DESCRIPTION_TABLE)],
)
def test_description_error(
    name: str, call: Callable[[], Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message) as info:
        call()
    assert str(info.value).startswith(f"{name}: ")
