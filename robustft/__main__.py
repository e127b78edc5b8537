"""``python -m robustft``: the ``robustft`` command (:mod:`robustft.recipes`)."""

import sys

from robustft.recipes._cli import main

sys.exit(main())
