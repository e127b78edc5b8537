"""``python -m robustft.demo``: the main job of ``make demo``."""

from robustft.demo._main import main

if __name__ == "__main__":
    raise SystemExit(main())
