"""The demo's rendered world and caption grammar (``robustft.demo._world``), and its cache key."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch

from robustft import clip
from robustft.demo import _cache, _world
from robustft.demo._data import CLEAN, SHIFTS, load_splits, pretrain_batch


def _bank() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    glyphs = torch.rand(40, 8, 8, generator=g)
    labels = torch.arange(10).repeat(4)
    return glyphs, labels


def test_render_is_deterministic_and_in_range() -> None:
    glyphs, labels = _bank()
    objects = torch.arange(len(_world.OBJECTS))
    scenes = _world.draw_scenes(objects, torch.arange(40), labels, torch.Generator().manual_seed(1))
    a = _world.render(scenes, glyphs, torch.Generator().manual_seed(2))
    b = _world.render(scenes, glyphs, torch.Generator().manual_seed(2))
    assert a.shape == (len(objects), 3, _world.SIZE, _world.SIZE)
    assert torch.equal(a, b)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    # every image shows something: the object is lighter than its dark background
    assert bool((a.amax(dim=(1, 2, 3)) > a.mean(dim=(1, 2, 3)) + 0.1).all())


def test_draw_scenes_gives_each_digit_a_glyph_of_its_class() -> None:
    _, labels = _bank()
    g = torch.Generator().manual_seed(3)
    objects = torch.randint(0, len(_world.OBJECTS), (500,), generator=g)
    pool = torch.arange(0, 20)  # half the bank, every digit
    with pytest.raises(ValueError, match="glyph_pool has no glyph of the digit 'one'"):
        _world.draw_scenes(torch.tensor([1]), torch.tensor([0]), labels, g)
    scenes = _world.draw_scenes(objects, pool, labels, g, colour=[2], texture=[0, 4])
    digits = objects < len(_world.DIGITS)
    glyph = scenes[digits, -1]
    assert torch.equal(labels[glyph], objects[digits])
    assert set(glyph.tolist()) <= set(pool.tolist())
    assert set(scenes[:, 1].tolist()) == {2} and set(scenes[:, 6].tolist()) == {0, 4}
    with pytest.raises(ValueError, match=r"draw_scenes: unknown attributes \['shade'\]"):
        _world.draw_scenes(objects, pool, labels, g, shade=[0])


def test_captions_name_the_object_and_only_true_attributes() -> None:
    g = torch.Generator().manual_seed(4)
    # a small red seven on the right, outlined, on a navy checkered background
    scene = [7, 0, 0, 2, 1, 3, 2, 0]
    true = {a: v[scene[1 + i]] for i, (a, v) in enumerate(_world.ATTRIBUTES.items())}
    assert true == {"colour": "red", "size": "small", "position": "right", "style": "outlined",
                    "background": "navy", "texture": "checkered"}  # fmt: skip
    seen: set[str] = set()
    for _ in range(200):
        words = set(_world.caption(scene, g).rstrip(".").split())
        assert "seven" in words
        for attribute, values in _world.ATTRIBUTES.items():
            named = words & set(values)
            assert named <= {true[attribute]}, (attribute, words)
            seen |= named
    assert seen == set(true.values())  # every attribute is named some of the time
    assert _world.caption(scene, g, keep=0.0).endswith(" seven.")
    orange = [_world.caption([0, 5, 0, 0, 1, 0, 0, 0], g) for _ in range(200)]
    assert any(" an orange " in c or " an outlined " in c for c in orange)  # the article agrees
    assert not any(" a orange " in c or " a outlined " in c for c in orange)


def test_vocabulary_covers_every_caption() -> None:
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=24)
    vocabulary = set(clip.token_vocabulary(_world.vocabulary_texts(), tokenizer).tolist())
    data = load_splits()
    _, captions = pretrain_batch(data, 256, torch.Generator().manual_seed(5))
    used = set(clip.token_vocabulary(captions, tokenizer).tolist())
    assert used <= vocabulary
    assert any(c.count(" ") <= 4 for c in captions)  # the plain half: object-only captions


def test_splits_draw_the_domains_they_name() -> None:
    data = load_splits()
    assert set(CLEAN) == set(_world.ATTRIBUTES)
    for attributes in SHIFTS.values():
        assert set(attributes) == set(_world.ATTRIBUTES)
    # the shifted sets are the test glyphs, image for image: same labels, other pixels
    for name, images in data.shifted.items():
        assert images.shape == data.test_x.shape, name
        assert not torch.equal(images, data.test_x), name


def test_cache_key_ignores_docstrings_but_not_code(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"
    a.write_text('"""Doc."""\n\ndef f():\n    """One."""\n    return 1\n')
    b.write_text('"""Other doc."""\n\ndef f():\n    """Two."""\n    return 1\n')
    c.write_text('"""Doc."""\n\ndef f():\n    """One."""\n    return 2\n')
    assert _cache._code(a) == _cache._code(b) != _cache._code(c)
