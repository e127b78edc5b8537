"""Sphinx configuration for the robustft docs (MyST markdown, autodoc, napoleon, furo)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

from robustft import __version__

project = "robustft"
author = "robustft developers"
copyright = "2026, robustft developers"
version = release = __version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = [
    "_build",
    "Thumbs.db",
    ".DS_Store",
    "demo_results/*.md",
]  # included by the demo guide
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_member_order = "bysource"
autodoc_default_options: dict[str, object] = {}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# No network at build time: intersphinx inventories are not fetched (links render as text).
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
nitpicky = False
suppress_warnings = ["myst.header"]

html_theme = "furo"
html_title = f"robustft {release}"
