"""robustft.peft: every raise, with the function, the argument and the value in the message."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from robustft import peft
from robustft.peft import _spec

LORA = peft.lora(rank=1, alpha=1, targets="w")
QKV = peft.lora(rank=1, alpha=1, targets=["*in_proj_weight", "w"], qkv=("q", "v"))
ADAPTER = peft.adapter(targets="w")
W = {"w": torch.zeros(2, 2)}
F_OK = {"w_lora_A": torch.zeros(1, 2), "w_lora_B": torch.zeros(2, 1)}
FUSED = {"a.in_proj_weight": torch.zeros(6, 2)}


class _CudaGenerator(torch.Generator):
    """A CPU generator that reports a CUDA device (the check reads ``generator.device``)."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", 0)


CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    # ------------------------------------------------------------ lora()
    (
        "lora-rank-type",
        lambda: peft.lora(rank=1.5, alpha=1, targets="w"),
        TypeError,
        r"lora: rank must be an int, got 1.5",
    ),
    (
        "lora-rank-bool",
        lambda: peft.lora(rank=True, alpha=1, targets="w"),
        TypeError,
        r"lora: rank must be an int, got True",
    ),
    (
        "lora-rank-low",
        lambda: peft.lora(rank=0, alpha=1, targets="w"),
        ValueError,
        r"lora: rank must be an int >= 1, got 0",
    ),
    (
        "lora-alpha-type",
        lambda: peft.lora(rank=1, alpha="2", targets="w"),
        TypeError,
        r"lora: alpha must be .*got '2'",
    ),
    (
        "lora-alpha-zero",
        lambda: peft.lora(rank=1, alpha=0, targets="w"),
        ValueError,
        r"lora: alpha must be .*\(0, inf\).*got 0",
    ),
    (
        "lora-alpha-inf",
        lambda: peft.lora(rank=1, alpha=float("inf"), targets="w"),
        ValueError,
        r"lora: alpha must be .*got inf",
    ),
    (
        "lora-alpha-nan",
        lambda: peft.lora(rank=1, alpha=float("nan"), targets="w"),
        ValueError,
        r"lora: alpha must not be NaN, got nan",
    ),
    (
        "lora-scaling-type",
        lambda: peft.lora(rank=1, alpha=1, targets="w", scaling=1),
        TypeError,
        r"lora: scaling must be one of 'rank', 'sqrt_rank', got 1",
    ),
    (
        "lora-scaling-value",
        lambda: peft.lora(rank=1, alpha=1, targets="w", scaling="sqrt"),
        ValueError,
        r"lora: scaling must be one of 'rank', 'sqrt_rank', got 'sqrt'",
    ),
    (
        "lora-qkv-str",
        lambda: peft.lora(rank=1, alpha=1, targets="w", qkv="qkv"),
        ValueError,
        r"lora: qkv must be a non-empty tuple of blocks from \('q', 'k', 'v'\) or None, got 'qkv'",
    ),
    (
        "lora-qkv-empty",
        lambda: peft.lora(rank=1, alpha=1, targets="w", qkv=()),
        ValueError,
        r"lora: qkv must be a non-empty tuple .*got \(\)",
    ),
    (
        "lora-qkv-set",
        lambda: peft.lora(rank=1, alpha=1, targets="w", qkv={"q"}),
        ValueError,
        r"lora: qkv must be a non-empty tuple .*got \{'q'\}",
    ),
    (
        "lora-qkv-unknown",
        lambda: peft.lora(rank=1, alpha=1, targets="w", qkv=("q", "o")),
        ValueError,
        r"lora: qkv must list distinct blocks from \('q', 'k', 'v'\), got \('q', 'o'\)",
    ),
    (
        "lora-qkv-repeated",
        lambda: peft.lora(rank=1, alpha=1, targets="w", qkv=["k", "k"]),
        ValueError,
        r"lora: qkv must list distinct blocks .*got \('k', 'k'\)",
    ),
    (
        "lora-dropout-one",
        lambda: peft.lora(rank=1, alpha=1, targets="w", dropout=1.0),
        ValueError,
        r"lora: dropout must be .*\[0, 1\).*got 1.0",
    ),
    (
        "lora-dropout-negative",
        lambda: peft.lora(rank=1, alpha=1, targets="w", dropout=-0.1),
        ValueError,
        r"lora: dropout must be .*got -0.1",
    ),
    (
        "lora-dropout-type",
        lambda: peft.lora(rank=1, alpha=1, targets="w", dropout="0.1"),
        TypeError,
        r"lora: dropout must be .*got '0.1'",
    ),
    (
        "lora-targets-none",
        lambda: peft.lora(rank=1, alpha=1, targets=None),
        ValueError,
        r"lora: targets must name the weights to reparametrise .*got None",
    ),
    (
        "lora-targets-empty",
        lambda: peft.lora(rank=1, alpha=1, targets=""),
        ValueError,
        r"lora: targets must name the weights .*got ''",
    ),
    # ------------------------------------------------------------ adapter()
    (
        "adapter-rank-type",
        lambda: peft.adapter(targets="w", rank="2"),
        TypeError,
        r"adapter: rank must be an int, got '2'",
    ),
    (
        "adapter-rank-low",
        lambda: peft.adapter(targets="w", rank=0),
        ValueError,
        r"adapter: rank must be an int >= 1, got 0",
    ),
    (
        "adapter-drop-one",
        lambda: peft.adapter(targets="w", drop=1),
        ValueError,
        r"adapter: drop must be .*\[0, 1\).*got 1",
    ),
    (
        "adapter-drop-type",
        lambda: peft.adapter(targets="w", drop=None),
        TypeError,
        r"adapter: drop must be .*got None",
    ),
    (
        "adapter-targets-none",
        lambda: peft.adapter(targets=None),
        ValueError,
        r"adapter: targets must name the weights .*got None",
    ),
    # ------------------------------------------------------------ factor names
    ("parse", lambda: _spec.parse("w.weight"), ValueError, r"not a factor key: 'w.weight'"),
    (
        "targets_of-spec",
        lambda: _spec.targets_of("apply", "lora", F_OK),
        TypeError,
        r"apply: spec must be a robustft.peft.Spec \(from lora\(\) or adapter\(\)\), got 'lora'",
    ),
    # ------------------------------------------------------------ init()
    (
        "init-spec",
        lambda: peft.init({"rank": 1}, W),
        TypeError,
        r"init: spec must be a robustft.peft.Spec .*got dict with keys \['rank'\]",
    ),
    (
        "init-params",
        lambda: peft.init(LORA, [torch.zeros(2, 2)]),
        TypeError,
        r"init: params must be a mapping .*got list of length 1",
    ),
    (
        "init-params-leaf",
        lambda: peft.init(LORA, {"w": [1.0]}),
        TypeError,
        r"init: params must have torch.Tensor leaves, got non-tensor leaves \(list\) at keys \['w'\]",
    ),
    (
        "init-generator-type",
        lambda: peft.init(LORA, W, generator=0),
        TypeError,
        r"init: generator must be a torch.Generator or None, got 0",
    ),
    (
        "init-generator-device",
        lambda: peft.init(LORA, W, generator=_CudaGenerator()),
        ValueError,
        r"init: generator must be a CPU generator, got one on cuda:0",
    ),
    (
        "init-dtype-int",
        lambda: peft.init(LORA, W, dtype=torch.int64),
        TypeError,
        r"init: dtype must be a floating torch.dtype or None, got torch.int64",
    ),
    (
        "init-dtype-str",
        lambda: peft.init(LORA, W, dtype="float32"),
        TypeError,
        r"init: dtype must be a floating torch.dtype or None, got 'float32'",
    ),
    (
        "init-targets-unmatched",
        lambda: peft.init(peft.lora(rank=1, alpha=1, targets="v*"), W),
        ValueError,
        r"init: spec.targets must match at least one key .*\['v\*'\]",
    ),
    (
        "init-targets-regex",
        lambda: peft.init(peft.lora(rank=1, alpha=1, targets=re.compile("x")), W),
        ValueError,
        r"init: spec.targets must match at least one key, got regex 'x'",
    ),
    (
        "init-targets-none-selected",
        lambda: peft.init(peft.lora(rank=1, alpha=1, targets=lambda k: False), W),
        ValueError,
        r"init: spec.targets must select at least one weight of params, got <function .*which "
        r"selects none of its 1 tensor\(s\)",
    ),
    (
        "init-targets-factors-only",
        lambda: peft.init(peft.lora(rank=1, alpha=1, targets="*lora*"), {**W, **F_OK}),
        ValueError,
        r"init: spec.targets must select at least one weight of params, got '\*lora\*'",
    ),
    (
        "init-targets-not-2d",
        lambda: peft.init(
            peft.lora(rank=1, alpha=1, targets="l.*"),
            {"l.weight": torch.zeros(2, 2), "l.bias": torch.zeros(2)},
        ),
        ValueError,
        r"init: spec.targets must select 2-d weights only, got 1 other tensor\(s\): l.bias \(2,\)",
    ),
    (
        "init-adapter-name",
        lambda: peft.init(peft.adapter(targets="visual.proj"), {"visual.proj": torch.zeros(2, 2)}),
        ValueError,
        r"init: adapter targets must be \[out, in\] layer weights named '...weight' "
        r"\(their bias is '...bias'\), got \['visual.proj'\]",
    ),
    (
        "init-targets-type",
        lambda: peft.init(peft.lora(rank=1, alpha=1, targets=5), W),
        TypeError,
        r"^init: spec.targets must be .*got 5",
    ),
    # ------------------------------------------------------------ apply / delta / fold
    (
        "apply-spec",
        lambda: peft.apply(None, F_OK, base=W),
        TypeError,
        r"apply: spec must be a robustft.peft.Spec .*got None",
    ),
    (
        "apply-factors",
        lambda: peft.apply(LORA, None, base=W),
        TypeError,
        r"apply: factors must be a mapping .*got None",
    ),
    (
        "apply-base",
        lambda: peft.apply(LORA, F_OK, base=[1]),
        TypeError,
        r"apply: base must be a mapping .*got list of length 1",
    ),
    (
        "apply-not-a-factor",
        lambda: peft.apply(LORA, {**F_OK, "w": torch.zeros(2, 2)}, base=W),
        ValueError,
        r"apply: factors must hold factor tensors only .*got key 'w'",
    ),
    (
        "apply-empty",
        lambda: peft.apply(LORA, {}, base=W),
        ValueError,
        r"apply: factors must not be empty",
    ),
    (
        "apply-missing-part",
        lambda: peft.apply(LORA, {"w_lora_A": torch.zeros(1, 2)}, base=W),
        ValueError,
        r"apply: factors of 'w' must be \['lora_A', 'lora_B'\] for a lora spec \(rank "
        r"1, qkv None\), got \['lora_A'\]",
    ),
    (
        "apply-adapter-parts",
        lambda: peft.apply(ADAPTER, F_OK, base=W),
        ValueError,
        r"apply: factors of 'w' must be \['adapter'\] for a adapter spec .*got \['lora_A', "
        r"'lora_B'\]",
    ),
    (
        "apply-qkv-blocks",
        lambda: peft.apply(
            QKV,
            {
                "a.in_proj_weight_lora_A_q": torch.zeros(1, 2),
                "a.in_proj_weight_lora_B_q": torch.zeros(2, 1),
            },
            base=FUSED,
        ),
        ValueError,
        r"apply: factors of 'a.in_proj_weight' must be \['lora_A_q', 'lora_A_v', "
        r"'lora_B_q', 'lora_B_v'\] .*got \['lora_A_q', 'lora_B_q'\]",
    ),
    (
        "delta-missing-weight",
        lambda: peft.delta(LORA, F_OK, base={"v": torch.zeros(2, 2)}),
        ValueError,
        r"delta: base must hold every weight the factors update, missing \['w'\]",
    ),
    (
        "fold-not-2d",
        lambda: peft.fold(LORA, F_OK, base={"w": torch.zeros(2)}),
        ValueError,
        r"fold: base\['w'\] must be 2-d, got shape \(2,\)",
    ),
    (
        "apply-fused-whole",
        lambda: peft.apply(
            QKV,
            {
                "a.in_proj_weight_lora_A": torch.zeros(1, 2),
                "a.in_proj_weight_lora_B": torch.zeros(6, 1),
            },
            base=FUSED,
        ),
        ValueError,
        r"apply: factors of 'a.in_proj_weight' must be per q/k/v block for this spec "
        r"and a weight of shape \(6, 2\), got parts \['lora_A', 'lora_B'\]",
    ),
    (
        "apply-blocks-not-fused",
        lambda: peft.apply(
            QKV,
            {f"w_lora_{x}_{b}": torch.zeros(1, 1) for x in "AB" for b in "qv"},
            base={"w": torch.zeros(4, 2)},
        ),
        ValueError,
        r"apply: factors of 'w' must be one pair for the whole weight for this spec and "
        r"a weight of shape \(4, 2\)",
    ),
    (
        "apply-shape",
        lambda: peft.apply(LORA, {**F_OK, "w_lora_A": torch.zeros(1, 3)}, base=W),
        ValueError,
        r"apply: factors\['w_lora_A'\] must have shape \(1, 2\) for base\['w'\] of shape "
        r"\(2, 2\) and rank 1, got \(1, 3\)",
    ),
    (
        "apply-shape-rank",
        lambda: peft.apply(
            LORA, {"w_lora_A": torch.zeros(2, 2), "w_lora_B": torch.zeros(2, 2)}, base=W
        ),
        ValueError,
        r"apply: factors\['w_lora_(A|B)'\] must have shape .*rank 1, got \(2, 2\)",
    ),
    (
        "apply-adapter-shape",
        lambda: peft.apply(ADAPTER, {"w_adapter": torch.zeros(2, 3)}, base=W),
        ValueError,
        r"apply: factors\['w_adapter'\] must have shape \(2, 2\)",
    ),
    (
        "apply-int-factor",
        lambda: peft.apply(
            LORA, {**F_OK, "w_lora_A": torch.zeros(1, 2, dtype=torch.int64)}, base=W
        ),
        TypeError,
        r"apply: factors\['w_lora_A'\] must be floating-point, got torch.int64",
    ),
    # ------------------------------------------------------------ rescale
    (
        "rescale-spec",
        lambda: peft.rescale(1, F_OK, 0.5),
        TypeError,
        r"rescale: spec must be a robustft.peft.Spec",
    ),
    (
        "rescale-factors",
        lambda: peft.rescale(LORA, 1, 0.5),
        TypeError,
        r"rescale: factors must be a mapping",
    ),
    (
        "rescale-keys",
        lambda: peft.rescale(LORA, W, 0.5),
        ValueError,
        r"rescale: factors must hold factor tensors only .*got key 'w'",
    ),
    (
        "rescale-weight-type",
        lambda: peft.rescale(LORA, F_OK, "half"),
        TypeError,
        r"rescale: weight must be .*got 'half'",
    ),
    (
        "rescale-weight-nan",
        lambda: peft.rescale(LORA, F_OK, float("nan")),
        ValueError,
        r"rescale: weight must not be NaN, got nan",
    ),
    # ------------------------------------------------------------ factorize
    (
        "factorize-spec",
        lambda: peft.factorize("lora", W),
        TypeError,
        r"factorize: spec must be a robustft.peft.Spec",
    ),
    (
        "factorize-adapter",
        lambda: peft.factorize(ADAPTER, W),
        ValueError,
        r"factorize: spec must be a LoRA spec \(peft.lora\); an adapter's update W_adp·W is "
        r"multiplicative, got kind 'adapter'",
    ),
    (
        "factorize-updates",
        lambda: peft.factorize(LORA, [torch.zeros(2, 2)]),
        TypeError,
        r"factorize: updates must be a mapping",
    ),
    (
        "factorize-base",
        lambda: peft.factorize(LORA, W, base=3),
        TypeError,
        r"factorize: base must be a mapping .*got 3",
    ),
    (
        "factorize-not-2d",
        lambda: peft.factorize(LORA, {"w": torch.zeros(3)}),
        ValueError,
        r"factorize: updates\['w'\] must be a 2-d floating tensor, got Tensor\(shape=\(3,\)",
    ),
    (
        "factorize-int",
        lambda: peft.factorize(LORA, {"w": torch.zeros(2, 2, dtype=torch.int32)}),
        ValueError,
        r"factorize: updates\['w'\] must be a 2-d floating tensor, got .*torch.int32",
    ),
    # ------------------------------------------------------------ split / size / header
    ("split", lambda: peft.split(None), TypeError, r"split: tree must be a mapping"),
    ("size", lambda: peft.size([1]), TypeError, r"size: factors must be a mapping"),
    (
        "header-spec",
        lambda: peft.header(None, F_OK),
        TypeError,
        r"header: spec must be a robustft.peft.Spec, got None",
    ),
    (
        "header-factors",
        lambda: peft.header(LORA, None),
        TypeError,
        r"header: factors must be a mapping",
    ),
    (
        "header-keys",
        lambda: peft.header(LORA, W),
        ValueError,
        r"header: factors must hold factor tensors only .*got key 'w'",
    ),
    # ------------------------------------------------------------ attach_ / fold_
    (
        "attach-module",
        lambda: peft.attach_({"w": 1}, LORA, F_OK),
        TypeError,
        r"attach_: module must be a torch.nn.Module, got dict",
    ),
    (
        "attach-spec",
        lambda: peft.attach_(nn.Linear(2, 2), "lora", F_OK),
        TypeError,
        r"attach_: spec must be a robustft.peft.Spec",
    ),
    (
        "attach-missing-weight",
        lambda: peft.attach_(nn.Linear(2, 2), LORA, F_OK),
        ValueError,
        r"attach_: module must hold every weight the factors update, missing \['w'\]",
    ),
    (
        "attach-shape",
        lambda: peft.attach_(
            nn.Linear(3, 2),
            peft.lora(rank=1, alpha=1, targets="weight"),
            {"weight_lora_A": torch.zeros(1, 2), "weight_lora_B": torch.zeros(2, 1)},
        ),
        ValueError,
        r"attach_: factors\['weight_lora_A'\] must have shape \(1, 3\)",
    ),
    (
        "fold_-module",
        lambda: peft.fold_("model"),
        TypeError,
        r"fold_: module must be a torch.nn.Module, got 'model'",
    ),
    (
        "fold_-not-attached",
        lambda: peft.fold_(nn.Linear(2, 2)),
        ValueError,
        r"fold_: module has no factors attached \(see attach_\)",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_raises(call: Callable[[], Any], error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        call()


# ---------------------------------------------------------------- attach_: module-level checks


class _Proj(nn.Module):
    """A module that reads a raw 2-d parameter (like open_clip's ``visual.proj``)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.randn(3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.proj


def test_attach_twice_raises_and_names_the_spec() -> None:
    net = nn.Sequential(nn.Linear(2, 2))
    spec = peft.lora(rank=1, alpha=1, targets="0.weight")
    f = peft.init(spec, dict(net.named_parameters()))
    peft.attach_(net, spec, f)
    with pytest.raises(ValueError, match=r"attach_: module already has factors attached \(Spec\("):
        peft.attach_(net, spec, f)


def test_attach_dropout_needs_a_linear_or_an_attention() -> None:
    m = _Proj()
    spec = peft.lora(rank=1, alpha=1, targets="proj", dropout=0.1)
    f = peft.init(spec, dict(m.named_parameters()))
    with pytest.raises(
        ValueError,
        match=r"attach_: spec.dropout > 0 needs the input of each target's layer .*got \['proj'\] "
        r"read by _Proj ''; use dropout=0 for these weights",
    ):
        peft.attach_(m, spec, f)
    assert not any(peft.is_factor(n) for n, _ in m.named_parameters())  # nothing half-attached
    assert peft.attached(m) is None and all(p.requires_grad for p in m.parameters())
    # without dropout the same weight is attached through the weight swap
    spec0 = peft.lora(rank=1, alpha=1, targets="proj")
    peft.attach_(m, spec0, peft.init(spec0, dict(m.named_parameters())))
    # and an attention weight that is not an in- or out-projection is refused too
    mha = nn.MultiheadAttention(4, 2, kdim=3, vdim=3)
    spec = peft.lora(rank=1, alpha=1, targets="q_proj_weight", dropout=0.1)
    with pytest.raises(ValueError, match=r"got \['q_proj_weight'\] read by MultiheadAttention ''"):
        peft.attach_(mha, spec, peft.init(spec, dict(mha.named_parameters())))


def test_attach_dropout_refuses_separate_qkv_weights() -> None:
    mha = nn.MultiheadAttention(4, 2, kdim=3, vdim=3)
    spec = peft.lora(rank=1, alpha=1, targets="out_proj.weight", dropout=0.1)
    with pytest.raises(
        ValueError,
        match=r"attach_: '' has separate q/k/v weights; only the fused in_proj_weight layout is "
        r"supported with dropout",
    ):
        peft.attach_(mha, spec, peft.init(spec, dict(mha.named_parameters())))
    # without dropout the out_proj of such an attention attaches (weight swap)
    spec = peft.lora(rank=1, alpha=1, targets="out_proj.weight")
    peft.attach_(mha, spec, peft.init(spec, dict(mha.named_parameters())))


@pytest.mark.parametrize("extra", [{"add_bias_kv": True}, {"add_zero_attn": True}])
def test_attach_dropout_refuses_what_the_explicit_attention_does_not_compute(
    extra: dict[str, bool],
) -> None:
    # the explicit attention has no bias_k / bias_v and no zero-attention column: attaching with
    # dropout must refuse such an attention rather than silently compute another function
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, **extra).eval()
    spec = peft.lora(rank=1, alpha=1, targets="in_proj_weight", dropout=0.2)
    with pytest.raises(ValueError, match=r"attach_: .*(add_bias_kv|bias_k|add_zero_attn)"):
        peft.attach_(mha, spec, peft.init(spec, dict(mha.named_parameters())))


# ---------------------------------------------------------------- save / load


def test_save_errors(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"save: spec must be a robustft.peft.Spec, got None"):
        peft.save(tmp_path / "f.safetensors", None, F_OK)
    with pytest.raises(TypeError, match=r"save: factors must be a mapping"):
        peft.save(tmp_path / "f.safetensors", LORA, [1])
    assert list(tmp_path.iterdir()) == []


def test_save_names_itself_for_keys_that_are_not_factors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^save: factors must hold factor tensors only .*'w'"):
        peft.save(tmp_path / "f.safetensors", LORA, W)
    assert list(tmp_path.iterdir()) == []


def test_save_to_a_missing_folder_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):  # the docstring's contract: "OSError: the file cannot be written"
        peft.save(tmp_path / "no" / "such" / "f.safetensors", LORA, F_OK)
    assert list(tmp_path.iterdir()) == []


def _write(path: Path, meta: dict[str, str] | None, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=meta)
    return path


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"load: path must be an existing factor file, got"):
        peft.load(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match=r"load: path must be an existing factor file"):
        peft.load(tmp_path)  # a folder
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 5)
    with pytest.raises(
        ValueError, match=r"load: '.*bad.safetensors' is not a readable safetensors"
    ):
        peft.load(bad)
    p = _write(tmp_path / "plain.safetensors", {"format": "pt"}, F_OK)
    with pytest.raises(
        ValueError,
        match=r"load: '.*plain.safetensors' has no 'robustft.peft' "
        r"metadata: it is not a factor file written by robustft.peft.save",
    ):
        peft.load(p)
    good = json.loads(peft.header(LORA, F_OK)["robustft.peft"])
    for name, meta in [
        ("json", "{not json"),
        ("missing", json.dumps({k: v for k, v in good.items() if k != "rank"})),
        ("qkv", json.dumps({**good, "qkv": 3})),
        ("alpha", json.dumps({**good, "alpha": "two"})),
    ]:
        p = _write(tmp_path / f"{name}.safetensors", {"robustft.peft": meta}, F_OK)
        with pytest.raises(
            ValueError,
            match=rf"load: '.*{name}.safetensors' has damaged "
            r"'robustft.peft' metadata",
        ):
            peft.load(p)
    # tensors that do not fit the recorded spec
    p = _write(tmp_path / "adapter.safetensors", peft.header(ADAPTER, {"w_adapter": W["w"]}), F_OK)
    with pytest.raises(
        ValueError,
        match=r"load: factors of 'w' must be \['adapter'\] for a "
        r"adapter spec",
    ):
        peft.load(p)
