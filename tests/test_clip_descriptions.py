"""Class-description banks: reading CuPL / DRM files, the description head and the padded bank."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
import torch.nn.functional as F
from clip_models import tiny_custom_text_clip, tiny_resnet_clip, tiny_vit_clip, tokenizer
from reference.drm_ref import description_head_ref, read_cd_file_ref
from torch import nn

from robustft import clip
from robustft.clip._descriptions import (
    DescriptionBank,
    description_bank,
    description_head,
    load_descriptions,
)

NAMES = ["cat", "golden retriever", "dog"]
DESC = {
    "cat": ["a small feline with whiskers", "pointed ears and a long tail"],
    "golden retriever": "a large dog with a golden coat",
    "dog": ["a wet nose", "a wagging tail", "four legs and fur"],
}


@pytest.fixture(scope="module")
def tok() -> open_clip.tokenizer.SimpleTokenizer:
    return tokenizer()


@pytest.fixture(scope="module", params=["vit", "resnet", "custom_text"])
def model(request: pytest.FixtureRequest) -> nn.Module:
    return {"vit": tiny_vit_clip, "resnet": tiny_resnet_clip, "custom_text": tiny_custom_text_clip}[
        request.param
    ]()


class CharModel(nn.Module):
    """encode_text = (#characters, 1) as float: hand-computable features."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.seen_training: list[bool] = []
        self.batches: list[int] = []
        self.scale = nn.Parameter(torch.ones(()))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        self.batches.append(tokens.shape[0])
        return self.drop(torch.cat([tokens * self.scale, torch.ones_like(tokens)], 1).float())


def count(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[len(t)] for t in texts])


def unit(x: float, y: float) -> torch.Tensor:
    v = torch.tensor([float(x), float(y)])
    return v / v.norm()


def write(tmp_path: Path, data: Any, name: str = "cd.json") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return p


# ---------------------------------------------------------------- load_descriptions


def test_load_by_name_lists_and_strings_in_classname_order(tmp_path: Path) -> None:
    p = write(tmp_path, {"dog": DESC["dog"], "cat": DESC["cat"], "golden retriever": "x y"})
    got = load_descriptions(p, NAMES)
    assert list(got) == NAMES
    assert got["cat"] == tuple(DESC["cat"])
    assert got["golden retriever"] == ("x y",)
    assert got["dog"] == tuple(DESC["dog"])


def test_load_by_name_ignores_keys_of_other_classes(tmp_path: Path) -> None:
    p = write(tmp_path, {"cat": "c", "dog": "d", "golden retriever": "g", "zebra": "z"})
    assert load_descriptions(str(p), ["dog", "cat"]) == {"dog": ("d",), "cat": ("c",)}


def test_load_by_index_drm_iwildcam_layout(tmp_path: Path) -> None:
    # DRM's prompts/iwildcam_cd.json: keys "0" ... "C-1", one str per class
    p = write(tmp_path, {"1": "second", "0": "first", "2": ["third a", "third b"]})
    got = load_descriptions(p, NAMES, match="index")
    assert got == {
        "cat": ("first",),
        "golden retriever": ("second",),
        "dog": ("third a", "third b"),
    }


def test_load_by_order_is_drms_own_rule(tmp_path: Path) -> None:
    # DRM's result_cd_iwildcam.json is keyed by Latin names; DRM pairs entries with classes by position
    data = {"Felis catus": "whiskers", "Canis aureus": ["gold", "fur"], "Canis lupus": "nose"}
    p = write(tmp_path, data)
    got = load_descriptions(p, NAMES, match="order")
    assert got == {"cat": ("whiskers",), "golden retriever": ("gold", "fur"), "dog": ("nose",)}
    assert [list(v) for v in got.values()] == read_cd_file_ref(str(p))


def test_load_accepts_unicode(tmp_path: Path) -> None:
    p = write(tmp_path, {"café": "une tasse de café"})
    assert load_descriptions(p, ["café"]) == {"café": ("une tasse de café",)}


LOAD_ERRORS: list[tuple[str, Any, dict[str, Any], type[Exception], str]] = [
    (
        "missing class",
        {"cat": "c", "dgo": "d", "golden retriever": "g"},
        {},
        ValueError,
        r"cd\.json: descriptions must have a key for every class name; missing classes \['dog'\], "
        r"unexpected keys \['dgo'\]",
    ),
    (
        "empty list",
        {"cat": [], "dog": "d", "golden retriever": "g"},
        {},
        ValueError,
        r"cd\.json: descriptions of class 'cat' must hold at least one description, got \[\]",
    ),
    (
        "non-str entry",
        {"cat": ["ok", 3], "dog": "d", "golden retriever": "g"},
        {},
        TypeError,
        r"cd\.json: descriptions of class 'cat' must contain only str, got 3 at position 1",
    ),
    (
        "blank entry",
        {"cat": "c", "dog": ["  "], "golden retriever": "g"},
        {},
        ValueError,
        r"cd\.json: descriptions of class 'dog' must be non-blank, got '  ' at position 0",
    ),
    (
        "dict entry",
        {"cat": {"a": 1}, "dog": "d", "golden retriever": "g"},
        {},
        TypeError,
        r"cd\.json: descriptions of class 'cat' must be a str or a list of str, got dict",
    ),
    (
        "top level list",
        [["c"], ["g"], ["d"]],
        {},
        ValueError,
        r"cd\.json: must hold a JSON object \{class: \[description, \.\.\.\]\}, got list",
    ),
    (
        "invalid json",
        '{"cat": "c",}',
        {},
        ValueError,
        r"cd\.json: must be valid JSON, got .* at line 1 column 13",
    ),
    (
        "duplicate key",
        '{"cat": "c", "dog": "d", "cat": "e", "golden retriever": "g"}',
        {},
        ValueError,
        r"cd\.json: keys must be unique, got 'cat' more than once",
    ),
    (
        "index keys",
        {"0": "a", "1": "b", "3": "c"},
        {"match": "index"},
        ValueError,
        r"cd\.json: keys must be the class positions '0' \.\.\. '2' with match=\"index\"; missing "
        r"\['2'\], unexpected \['3'\]",
    ),
    (
        "order count",
        {"a": "a", "b": "b"},
        {"match": "order"},
        ValueError,
        r"cd\.json: must hold one entry per class with match=\"order\", got 2 entries for 3 classes",
    ),
    (
        "index entry",
        {"0": "a", "1": [], "2": "c"},
        {"match": "index"},
        ValueError,
        r"descriptions of class 'golden retriever' must hold at least one description",
    ),
    (
        "bad match",
        {"cat": "c"},
        {"match": "position"},
        ValueError,
        r"match must be one of 'name', 'index', 'order', got 'position'",
    ),
]


@pytest.mark.parametrize(
    ("data", "kwargs", "exc", "message"),
    [row[1:] for row in LOAD_ERRORS],
    ids=[row[0] for row in LOAD_ERRORS],
)
def test_load_errors_name_the_file_and_class(
    tmp_path: Path, data: Any, kwargs: dict[str, Any], exc: type[Exception], message: str
) -> None:
    p = write(tmp_path, data)
    with pytest.raises(exc, match=message) as info:
        load_descriptions(p, NAMES, **kwargs)
    assert str(info.value).startswith("load_descriptions: ")


def test_load_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"load_descriptions: path must be a str or os\.PathLike"):
        load_descriptions(3, NAMES)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"load_descriptions: classnames must be a sequence of str"):
        load_descriptions(write(tmp_path, {}), "cat")
    with pytest.raises(FileNotFoundError):
        load_descriptions(tmp_path / "absent.json", NAMES)


def test_match_is_keyword_only(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="positional argument"):
        load_descriptions(write(tmp_path, {"cat": "c"}), ["cat"], "name")  # type: ignore[misc]


# ---------------------------------------------------------------- description_head


def test_head_hand_computed_ragged() -> None:
    # class "a": "x" (1,1), "xyz" (3,1); class "b": "yy" (2,1) only
    head = description_head(CharModel(), count, {"a": ["x", "xyz"], "b": "yy"}, ["a", "b"])
    m = (unit(1, 1) + unit(3, 1)) / 2
    expected = torch.stack([m / m.norm(), unit(2, 1)])
    torch.testing.assert_close(head, expected)


def test_head_equals_zero_shot_head_for_one_templated_description(
    model: nn.Module, tok: Any
) -> None:
    templates = ["a photo of a {}."]
    desc = {c: [templates[0].format(c)] for c in NAMES}
    for bs in (1, 2, 256):
        got = description_head(model, tok, desc, NAMES, batch_size=bs)
        assert torch.equal(got, clip.zero_shot_head(model, tok, NAMES, templates, batch_size=bs))


def test_head_equals_zero_shot_head_for_every_template_as_a_description(
    model: nn.Module, tok: Any
) -> None:
    templates = ["a photo of a {}.", "itap of a {}.", "a {} in the wild."]
    desc = {c: [t.format(c) for t in templates] for c in NAMES}
    torch.testing.assert_close(
        description_head(model, tok, desc, NAMES),
        clip.zero_shot_head(model, tok, NAMES, templates),
        rtol=1e-6,
        atol=1e-7,
    )


def test_head_equals_drm_reference_float64(tok: Any) -> None:
    model = tiny_vit_clip().double()
    got = description_head(model, tok, DESC, NAMES, batch_size=2)
    assert got.dtype == torch.float64
    per_class = [[DESC[c]] if isinstance(DESC[c], str) else DESC[c] for c in NAMES]
    ref = description_head_ref(model, tok, per_class)  # type: ignore[arg-type]
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_head_from_a_drm_file(tmp_path: Path, tok: Any) -> None:
    model = tiny_vit_clip().double()
    p = write(tmp_path, {"0": "a cat", "1": "a golden dog", "2": ["a dog", "a wet nose"]})
    got = description_head(model, tok, load_descriptions(p, NAMES, match="index"), NAMES)
    ref = description_head_ref(model, tok, read_cd_file_ref(str(p)))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_head_batching_and_eval_mode() -> None:
    m = CharModel().train()
    desc = {"a": ["x", "xyz", "xy"], "b": ["yy", "y"]}
    ref = description_head(CharModel().eval(), count, desc, ["a", "b"])
    got = description_head(m, count, desc, ["a", "b"], batch_size=2)
    torch.testing.assert_close(got, ref)  # dropout off: the same as in eval mode
    assert m.batches == [2, 2, 1]
    assert m.seen_training == [False, False, False]
    assert m.training and m.drop.training  # restored


def test_head_no_grad_and_params() -> None:
    m = CharModel()
    head = description_head(m, count, {"a": ["x", "xyz"]}, ["a"])
    assert not head.requires_grad
    # params= swaps the scale: features (3 * #chars, 1)
    swapped = description_head(
        m, count, {"a": ["x", "xyz"]}, ["a"], params={"scale": torch.tensor(3.0)}
    )
    mean = (unit(3, 1) + unit(9, 1)) / 2
    torch.testing.assert_close(swapped, (mean / mean.norm())[None])


def test_head_ignores_descriptions_of_other_classes(tok: Any) -> None:
    model = tiny_vit_clip()
    full = description_head(model, tok, {**DESC, "zebra": "stripes"}, NAMES)
    torch.testing.assert_close(full, description_head(model, tok, DESC, NAMES))


def test_head_unit_rows_float32(model: nn.Module, tok: Any) -> None:
    head = description_head(model, tok, DESC, NAMES)
    assert head.shape == (3, 16) and head.dtype == torch.float32
    torch.testing.assert_close(head.norm(dim=-1), torch.ones(3))


# ---------------------------------------------------------------- description_bank


def test_bank_hand_computed() -> None:
    bank = description_bank(CharModel(), count, {"a": ["x", "xyz"], "b": "yy"}, ["a", "b"])
    assert isinstance(bank, DescriptionBank)
    assert torch.equal(bank.mask, torch.tensor([[True, True], [True, False]]))
    expected = torch.stack(
        [torch.stack([unit(1, 1), unit(3, 1)]), torch.stack([unit(2, 1), torch.zeros(2)])]
    )
    torch.testing.assert_close(bank.features, expected)


def test_bank_rows_are_each_descriptions_feature(model: nn.Module, tok: Any) -> None:
    bank = description_bank(model, tok, DESC, NAMES, batch_size=2)
    assert bank.features.shape == (3, 3, 16)
    assert bank.mask.tolist() == [[True, True, False], [True, False, False], [True, True, True]]
    for c, name in enumerate(NAMES):
        texts = [DESC[name]] if isinstance(DESC[name], str) else DESC[name]
        with torch.no_grad():
            ref = F.normalize(model.encode_text(tok(texts)), dim=-1)
        k = len(texts)
        torch.testing.assert_close(bank.features[c, :k], ref, rtol=1e-5, atol=1e-6)
        assert torch.equal(bank.features[c, k:], torch.zeros(3 - k, 16))


def test_head_is_the_renormalised_masked_mean_of_the_bank(model: nn.Module, tok: Any) -> None:
    bank = description_bank(model, tok, DESC, NAMES)
    mean = bank.features.sum(1) / bank.mask.sum(1, keepdim=True)
    torch.testing.assert_close(
        F.normalize(mean, dim=-1), description_head(model, tok, DESC, NAMES), rtol=1e-6, atol=1e-7
    )


def test_bank_float64_model(tok: Any) -> None:
    bank = description_bank(tiny_vit_clip().double(), tok, DESC, NAMES)
    assert bank.features.dtype == torch.float64 and bank.mask.dtype == torch.bool


# ---------------------------------------------------------------- argument errors


@pytest.mark.parametrize("fn", [description_head, description_bank])
def test_argument_errors(fn: Any) -> None:
    name = fn.__name__
    m = CharModel()
    cases: list[tuple[Any, type[Exception], str]] = [
        (lambda: fn("model", count, {"a": "x"}, ["a"]), TypeError, "model must be an open_clip"),
        (lambda: fn(m, "tok", {"a": "x"}, ["a"]), TypeError, "tokenizer must be callable"),
        (lambda: fn(m, count, [("a", "x")], ["a"]), TypeError, r"descriptions must be a mapping"),
        (lambda: fn(m, count, {"a": "x"}, "a"), TypeError, "classnames must be a sequence of str"),
        (lambda: fn(m, count, {"a": "x"}, []), ValueError, "classnames must hold at least one"),
        (
            lambda: fn(m, count, {"a": "x"}, ["a", "b"]),
            ValueError,
            r"descriptions must have a key for every class name; missing classes \['b'\]$",
        ),
        (
            lambda: fn(m, count, {"a": ["x", None]}, ["a"]),
            TypeError,
            r"descriptions of class 'a' must contain only str, got None at position 1",
        ),
        (
            lambda: fn(m, count, {"a": ""}, ["a"]),
            ValueError,
            r"descriptions of class 'a' must be non-blank, got '' at position 0",
        ),
        (
            lambda: fn(m, count, {"a": ()}, ["a"]),
            ValueError,
            r"descriptions of class 'a' must hold at least one description, got \[\]",
        ),
        (lambda: fn(m, count, {"a": "x"}, ["a"], batch_size=0), ValueError, "batch_size"),
        (
            lambda: fn(m, count, {"a": "x"}, ["a"], params={"nope": torch.ones(1)}),
            ValueError,
            r"params must name parameters or buffers of the model",
        ),
    ]
    for call, exc, message in cases:
        with pytest.raises(exc, match=message) as info:
            call()
        assert str(info.value).startswith(f"{name}: ")
    assert m.batches == []  # nothing was encoded before the checks failed


def test_keyword_only_options() -> None:
    with pytest.raises(TypeError, match="positional argument"):
        description_head(CharModel(), count, {"a": "x"}, ["a"], 4)  # type: ignore[misc]
    with pytest.raises(TypeError, match="positional argument"):
        description_bank(CharModel(), count, {"a": "x"}, ["a"], 4)  # type: ignore[misc]


def test_not_a_nan_for_ragged_counts() -> None:
    head = description_head(CharModel(), count, {"a": ["x"] * 5, "b": "y"}, ["a", "b"])
    assert bool(torch.isfinite(head).all())
    torch.testing.assert_close(head[0], unit(1, 1))
    assert math.isclose(float(head[1].norm()), 1.0, rel_tol=1e-6)
