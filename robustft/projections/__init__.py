"""Constraints around the pre-trained weights: projections onto balls centred at the anchor.

:func:`l2_ball` and :func:`mars_ball` project every tensor onto a ball around the pre-trained
weights (the keyword-only ``anchor=``); :func:`tpgm` learns those balls' radii on held-out data
(TPGM). :func:`spd` (selective projection decay) and :func:`ftp` (fast trainable projection,
per-tensor MARS radii learned online) are TPGM's successors as post-step operations: ``(init,
update, update_)`` factories whose states record their settings, run after any optimiser's step
(SPD also reads the gradient before it, :meth:`Spd.prepare`). The pure forms return new trees and never mutate their inputs, are branch-free and
differentiable; :func:`l2_ball_` and :func:`mars_ball_` write the same projection into the
trained parameters for per-step use, without a parameter-sized temporary. All work on sharded
(FSDP2 ``DTensor``) trees with global norms. Interpolation (WiSE-FT) and soups combine finished
runs and live in :mod:`robustft.merging`.
"""

from typing import TYPE_CHECKING

from robustft._checks import keyword_hints, moved_names
from robustft.projections._balls import l2_ball, l2_ball_, mars_ball, mars_ball_
from robustft.projections._ftp import Ftp, FtpState, ftp
from robustft.projections._spd import Spd, SpdState, spd
from robustft.projections._tpgm import tpgm

__all__ = [
    "Ftp",
    "FtpState",
    "Spd",
    "SpdState",
    "ftp",
    "l2_ball",
    "l2_ball_",
    "mars_ball",
    "mars_ball_",
    "spd",
    "tpgm",
]

keyword_hints(globals(), ["l2_ball", "l2_ball_", "mars_ball", "mars_ball_", "tpgm"])

# Public names that moved or were removed, and where they went (CHANGELOG, docs/migration.md)
_MOVED = {
    "wise": "moved to robustft.merging.wise, with the pre-trained side keyword-only: "
    "merging.wise(params, anchor=anchor, alpha=alpha)",
}

if not TYPE_CHECKING:  # runtime only: type checkers keep flagging unknown names
    __getattr__ = moved_names(__name__, _MOVED)
