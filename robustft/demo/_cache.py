"""The cache of pre-trained demo models: one home for where it lives and what its key holds.

Pre-training is the demo's longest step and is deterministic, so its result is kept under
:func:`cache_root` in a folder whose name holds a digest of everything it depends on: the
versions of robustft, torch and open_clip, the model config, the steps, the seed, the scale
mode and the code (docstrings aside) of the modules that draw the world and run the
pre-training. A change to
any of them is a new folder; an unreadable entry is pre-trained again.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import robustft
from robustft.demo import _data, _model, _world

__all__ = ["cache_folder", "cache_root", "pretrained"]


def cache_root() -> Path:
    """Where pre-trained demo models are cached: ``$ROBUSTFT_CACHE``, else the user cache."""
    if os.environ.get("ROBUSTFT_CACHE"):
        return Path(os.environ["ROBUSTFT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "robustft"


def _code(path: Path) -> str:
    """The module's code without its docstrings and comments (a docs edit keeps the cache)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            node.body = [  # type: ignore[attr-defined]
                n for n in body
                if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
                        and isinstance(n.value.value, str))
            ]  # fmt: skip
    return ast.dump(tree)


def cache_folder(steps: int, seed: int, *, learned_scale: bool = False) -> Path:
    """The cache folder of one pre-training (versions, config, sources and settings in its key)."""
    sources = [_code(Path(m.__file__ or "")) for m in (_world, _data, _model)]
    key = json.dumps(
        [robustft.__version__, torch.__version__, open_clip.__version__, _model.MODEL_CONFIG,
         steps, seed, learned_scale, [hashlib.sha256(s.encode()).hexdigest() for s in sources]]
    )  # fmt: skip
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    scale = "-learned" if learned_scale else ""
    return cache_root() / f"demo-clip-{steps}-{seed}{scale}-{digest}"


def pretrained(
    data: _data.Splits,
    *,
    steps: int,
    seed: int = 0,
    learned_scale: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[nn.Module, dict[str, Any]]:
    """The pre-trained demo CLIP and its pre-training statistics, from the cache or trained.

    Returns:
        The model (:func:`robustft.demo._model.build_model` after
        :func:`robustft.demo._model.pretrain`) and ``pretrain``'s statistics.
    """
    folder = cache_folder(steps, seed, learned_scale=learned_scale)
    if (folder / "model.safetensors").is_file():
        model = _model.build_model(seed=seed)
        try:
            model.load_state_dict(load_file(str(folder / "model.safetensors")))
            stats = json.loads((folder / "pretrain.json").read_text(encoding="utf-8"))
            stats["seen_tokens"] = set(stats["seen_tokens"])
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as err:
            log(f"  the cached model in {folder} is damaged ({err}); pre-training it again")
        else:
            log(f"  the demo's CLIP ({steps} pre-training steps) from the cache {folder}")
            return model.eval(), stats
    log(f"  pre-training the demo's CLIP ({steps} steps; cached in {folder} afterwards)")
    model = _model.build_model(seed=seed)  # afresh: a failed load may have filled it partly
    stats = _model.pretrain(
        model, _model.build_tokenizer(), data, steps=steps, seed=seed, learned_scale=learned_scale
    )
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"))  # fmt: skip
        record = {**stats, "seen_tokens": sorted(stats["seen_tokens"])}
        (tmp / "pretrain.json").write_text(json.dumps(record), encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError as err:
        log(f"  could not cache the model in {folder} ({err}); it is pre-trained again next time")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model, stats
