"""Parameter-efficient fine-tuning on parameter trees: LoRA and adapters as factor trees.

A low-rank update :math:`\\Delta W = s\\,BA` (LoRA) or an adapter folded into a layer,
:math:`W' = (I + W_{adp})W` (R-Adapter), is just another tree over the base weights, keyed by
their names — open_clip's fused ``nn.MultiheadAttention.in_proj_weight`` included, whole or per
q/k/v block. So every robustft tool applies to it without module surgery: average the factors
along a run (:mod:`robustft.averaging`, the state is the factors' size), interpolate the update
(:func:`rescale` is WiSE-FT on :math:`\\Delta W`), merge the updates of several runs
(:func:`delta` then :mod:`robustft.merging`), measure or bound them (L2-SP, balls), and fold them
back into plain weights (:func:`fold`) that ``open_clip`` loads.

Two ways to run a model with its factors: functionally, ``clip.image_features(model,
peft.apply(spec, factors, base=theta0), images)``; or attached, ``peft.attach_(model, spec,
factors)``, which makes the factors parameters of the model (for DDP, FSDP2 and any optimiser)
and adds the training-time extras no weight update can express (CLIP-LoRA's branch dropout,
R-Adapter's adapter dropping).
"""

from robustft.peft._io import header, load, save
from robustft.peft._module import attach_, attached, fold_
from robustft.peft._spec import BLOCKS, Spec, adapter, factor_names, is_factor, lora
from robustft.peft._trees import apply, delta, factorize, fold, init, rescale, size, split

__all__ = [
    "BLOCKS",
    "Spec",
    "adapter",
    "apply",
    "attach_",
    "attached",
    "delta",
    "factor_names",
    "factorize",
    "fold",
    "fold_",
    "header",
    "init",
    "is_factor",
    "load",
    "lora",
    "rescale",
    "save",
    "size",
    "split",
]
