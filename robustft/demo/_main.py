"""Entry point of ``make demo``."""

from __future__ import annotations

import sys

import robustft


def main(argv: list[str] | None = None) -> int:
    """Print what the embedded benchmark runs; returns the process exit code."""
    print(f"robustft {robustft.__version__} — robust fine-tuning demo")
    print(
        "The embedded benchmark (scikit-learn digits, a tiny open_clip model, no downloads) will\n"
        "fine-tune with FT, CLIPood (MMS + BMA), Lipsum-FT, KD, L2-SP, WiSE-FT and TPGM, and print\n"
        "ID / shifted accuracy, ECE and open-set AUROC per method. It lands with the demo issue."
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
