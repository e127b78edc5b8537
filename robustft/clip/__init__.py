"""open_clip integration: zero-shot heads, random-text banks, CoOp contexts, parameter selection.

The one robustft module that knows open_clip's models and tokenizers — and it still never imports
``open_clip`` itself: models are used through their methods and attributes (``encode_image``,
``encode_text``, ``token_embedding``, ``visual``) and tokenizers through ``__call__`` and their
special-token ids, so ``import robustft.clip`` is cheap and works with any open_clip ``CLIP`` or
``CustomTextCLIP`` you build or load (``open_clip.create_model_and_transforms(name,
pretrained=...)``). The one exception is :func:`token_vocabulary` called without a tokenizer,
which builds open_clip's standard BPE tokenizer on first use.
"""

from typing import TYPE_CHECKING

from robustft._checks import moved_names
from robustft.clip._context import encode_text_with_context, init_context
from robustft.clip._descriptions import (
    DescriptionBank,
    description_bank,
    description_head,
    load_descriptions,
)
from robustft.clip._forward import frozen_copy_features, image_features, text_features
from robustft.clip._heads import context_prototypes, zero_shot_head
from robustft.clip._params import norm_affine_names, text_names, visual_names
from robustft.clip._random_text import RandomTextBank, random_text_tokens, token_vocabulary
from robustft.clip._scale import logit_scale

__all__ = [
    "DescriptionBank",
    "RandomTextBank",
    "context_prototypes",
    "description_bank",
    "description_head",
    "encode_text_with_context",
    "frozen_copy_features",
    "image_features",
    "init_context",
    "load_descriptions",
    "logit_scale",
    "norm_affine_names",
    "random_text_tokens",
    "text_features",
    "text_names",
    "token_vocabulary",
    "visual_names",
    "zero_shot_head",
]

# Public names that moved or were removed, and where they went (CHANGELOG, docs/migration.md)
_MOVED = {
    "energy_gap_metric": "moved to robustft.metrics.energy_gap: "
    "metrics.energy_gap(f, reference_features=f0, text_features=bank.features)",
}

if not TYPE_CHECKING:  # runtime only: type checkers keep flagging unknown names
    __getattr__ = moved_names(__name__, _MOVED)
