"""Hypothesis strategies shared by the test modules: parameter trees, logits, features."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st

FLOAT_DTYPES = (torch.float32, torch.float64)

key_names = st.from_regex(r"[a-z]{1,4}(\.[a-z0-9]{1,4}){0,2}", fullmatch=True)
shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)
dtypes = st.sampled_from(FLOAT_DTYPES)


@st.composite
def tensors(
    draw: Any, shape: tuple[int, ...], dtype: torch.dtype, *, scale: float = 3.0
) -> torch.Tensor:
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


@st.composite
def structures(
    draw: Any, *, min_keys: int = 1, max_keys: int = 5
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """A tree structure: key -> (shape, dtype)."""
    keys = draw(st.lists(key_names, min_size=min_keys, max_size=max_keys, unique=True))
    return {k: (draw(shapes), draw(dtypes)) for k in keys}


@st.composite
def trees_like(
    draw: Any, structure: dict[str, tuple[tuple[int, ...], torch.dtype]], *, scale: float = 3.0
) -> dict[str, torch.Tensor]:
    return {k: draw(tensors(s, d, scale=scale)) for k, (s, d) in structure.items()}


@st.composite
def trees(
    draw: Any, *, min_keys: int = 1, max_keys: int = 5, scale: float = 3.0
) -> dict[str, torch.Tensor]:
    """A random parameter tree (random key set, shapes and float32/float64 dtypes)."""
    return draw(trees_like(draw(structures(min_keys=min_keys, max_keys=max_keys)), scale=scale))


@st.composite
def tree_pairs(draw: Any, n: int = 2, **kw: Any) -> list[dict[str, torch.Tensor]]:
    """``n`` trees sharing one structure."""
    structure = draw(structures(**kw))
    return [draw(trees_like(structure)) for _ in range(n)]


@st.composite
def logits(
    draw: Any,
    *,
    max_batch: int = 6,
    max_classes: int = 6,
    scale: float = 5.0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``[B, C]`` logits with B >= 1, C >= 2."""
    b = draw(st.integers(1, max_batch))
    c = draw(st.integers(2, max_classes))
    return draw(tensors((b, c), dtype or draw(dtypes), scale=scale))


@st.composite
def features(draw: Any, n: int, d: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``[n, d]`` raw (unnormalised) features, bounded away from zero norm."""
    x = draw(tensors((n, d), dtype))
    return x + torch.sign(x) * 0.1
