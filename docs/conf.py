# Configuration file for the Sphinx documentation builder of sb3_trust.
#
# Build with ``make docs`` (``python -m sphinx -W --keep-going -b html docs docs/_build/html``):
# warnings are errors, so the build must stay warning-free.

import os
import sys

# The package is imported from the repository (also when it is not installed in editable mode)
sys.path.insert(0, os.path.abspath(".."))

# Read the version from the same file as setup.cfg
version_file = os.path.join(os.path.dirname(__file__), "..", "sb3_trust", "version.txt")
with open(version_file) as file_handler:
    __version__ = file_handler.read().strip()

# -- Project information -----------------------------------------------------

project = "SB3 Trust"
copyright = "2025, sb3_trust contributors"
author = "sb3_trust contributors"

# The short X.Y version and the full version
version = __version__
release = __version__

# -- General configuration ---------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
master_doc = "index"
language = "en"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
pygments_style = "sphinx"

# MyST: "$...$" maths in Markdown pages, and anchors for the benchmark page's headings
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

# -- Autodoc -----------------------------------------------------------------

# The constructors' parameters are documented in the class docstrings (SB3 style), not in __init__
autoclass_content = "class"
autodoc_member_order = "bysource"
# Type hints are shown in the signatures; the `:param x:` descriptions stay as written
autodoc_typehints = "signature"
autodoc_default_options = {"show-inheritance": True}

# -- Options for HTML output -------------------------------------------------

html_theme = "sphinx_rtd_theme"
html_title = f"SB3 Trust {__version__}"
htmlhelp_basename = "SB3Trustdoc"
