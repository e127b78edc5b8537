"""The embedded end-to-end benchmark behind ``make demo`` (``python -m robustft.demo``)."""
