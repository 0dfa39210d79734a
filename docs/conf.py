"""Sphinx configuration of the perturbkit documentation (``make docs`` -> docs/_build/html/index.html).

Sources: the Markdown pages of this folder (MyST), the executed tutorials ``tutorials/*.ipynb`` (written by
``python docs/notebooks.py`` or by the test run; rendered as they are, never executed here) and the API
reference generated from the docstrings (numpy style, read by numpydoc). Built with warnings as errors.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the package of this checkout, installed or not

import perturbkit  # noqa: E402

project = "perturbkit"
author = "the perturbkit authors"
copyright = "the perturbkit authors, BSD-3-Clause"
version = release = perturbkit.__version__

extensions = [
    "myst_nb",  # Markdown (MyST) pages and Jupyter notebooks
    "sphinx.ext.autodoc",
    "numpydoc",  # numpy-style docstrings
]

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]

# the tutorials are executed once, before the build (docs/notebooks.py); the build renders their outputs
nb_execution_mode = "off"
nb_merge_streams = True
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "description"
numpydoc_show_class_members = False  # autodoc lists the members
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = False

html_theme = "sphinx_book_theme"
html_title = f"perturbkit {release}"
html_theme_options = {"show_toc_level": 2, "use_download_button": True}
html_show_sourcelink = False
html_last_updated_fmt = None


def setup(app):
    """numpydoc reports a docstring that is not in numpy style (an unknown section, ...) as a Python warning;
    make it a Sphinx warning, so that the build (warnings as errors) fails on it."""
    import warnings

    from sphinx.util import logging

    logger = logging.getLogger("numpydoc")
    show = warnings.showwarning

    def numpydoc_to_sphinx(message, category, filename, lineno, file=None, line=None):
        if "numpydoc" in str(filename):
            logger.warning(f"numpydoc: {message}")
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = numpydoc_to_sphinx
