"""Constraints around the pre-trained weights: projections onto balls centred at the anchor.

:func:`l2_ball` and :func:`mars_ball` project every tensor onto a ball around the pre-trained
weights (the keyword-only ``anchor=``); :func:`tpgm` learns those balls' radii on held-out data
(TPGM). The pure forms return new trees and never mutate their inputs, are branch-free and
differentiable; :func:`l2_ball_` and :func:`mars_ball_` write the same projection into the
trained parameters for per-step use, without a parameter-sized temporary. All work on sharded
(FSDP2 ``DTensor``) trees with global norms. Interpolation (WiSE-FT) and soups combine finished
runs and live in :mod:`robustft.merging`.
"""

from robustft.projections._balls import l2_ball, l2_ball_, mars_ball, mars_ball_
from robustft.projections._tpgm import tpgm

__all__ = ["l2_ball", "l2_ball_", "mars_ball", "mars_ball_", "tpgm"]
