"""A plain transcription of DRM's description head (vaynexie/DRM, ``src/models/zeroshot.py``,
``get_zeroshot_classifier``, the concept-description branch), for the description-bank tests.

DRM reads a JSON file of concept descriptions and takes entry ``k`` of the file, in file order,
for class ``k``; each entry is one description (a string) or a list of them. Per class: tokenize,
encode, L2-normalise each row, average, renormalise. (The authors then scale the head by
``logit_scale.exp()``; robustft's heads are unscaled, the scale enters the logits, so that
factor is left out here.) Written from the code's steps, not copied.
"""

from __future__ import annotations

import json
from typing import Any

import torch


def read_cd_file_ref(path: str) -> list[list[str]]:
    """The descriptions of each class in file order (a string entry is one description)."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    out = []
    for key in list(data.keys()):
        entry = data[key]
        out.append([entry] if isinstance(entry, str) else list(entry))
    return out


def description_head_ref(model: Any, tokenizer: Any, per_class: list[list[str]]) -> torch.Tensor:
    """``[classes, dim]``: per class the renormalised mean of its normalised description features."""
    rows = []
    with torch.no_grad():
        for texts in per_class:
            tokens = tokenizer(texts)
            emb = model.encode_text(tokens)
            emb = emb / emb.norm(dim=-1, keepdim=True)
            emb = emb.mean(dim=0, keepdim=True)
            emb = emb / emb.norm()
            rows.append(emb[0])
    return torch.stack(rows)
