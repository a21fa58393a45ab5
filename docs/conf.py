"""Sphinx configuration: Markdown pages (MyST), the CLI reference from the click commands
(sphinx-click) and the Python reference from ``bsconv_surgery.__all__`` (autodoc).
Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html``."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))  # document this checkout, not an installed copy

project = "bsconv-surgery"
author = "bsconv-surgery authors"
copyright = "bsconv-surgery authors"

extensions = ["myst_parser", "sphinx_click", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
autodoc_member_order = "groupwise"
autodoc_typehints = "description"
html_theme = "alabaster"
html_title = "bsconv-surgery"
smartquotes = False  # keep "--option" as typed, not an en dash
