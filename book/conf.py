"""Sphinx configuration of the course website (``make book``; see book/build_site.py).

Sphinx with MyST-NB renders the notebooks with the outputs that ``make test`` produced (no
execution here: ``nb_execution_mode = "off"``); sphinx-book-theme gives the course map as
navigation, a search box, and per page "launch in Colab" and "download notebook" buttons.
Nothing is loaded from the network: the ipywidgets JavaScript (a CDN) is not included, and
widget outputs fall back to their static HTML, except chapter 02's memory calculator, which
build_site.py replaces by the live one (book/calculator.py: vramlab in the browser via Pyodide).
"""

from __future__ import annotations

from vramlab.notebooks import BRANCH, repository_url

project = "VRAM Lab"
author = "VRAM Lab contributors"
copyright = "VRAM Lab contributors, Apache-2.0"  # noqa: A001 - Sphinx's name for it

extensions = ["myst_nb"]
myst_enable_extensions = ["colon_fence"]
nb_execution_mode = "off"  # the outputs come from the test run (build/executed)
nb_ipywidgets_js: dict[str, dict[str, str]] = {}  # no CDN scripts: widgets show their static fallback
nb_mime_priority_overrides = [("html", "application/vnd.jupyter.widget-view+json", None)]
exclude_patterns = ["_build", "**.ipynb_checkpoints"]

html_theme = "sphinx_book_theme"
html_title = "VRAM Lab"
html_static_path = ["static"]
html_css_files = ["vramlab.css"]
html_last_updated_fmt = None
html_favicon = "static/favicon.svg"
html_context = {"default_mode": "light"}  # pydata-sphinx-theme logs an error when no mode is set
html_theme_options = {
    "repository_url": repository_url(),
    "repository_branch": BRANCH,
    "path_to_docs": "",
    "use_repository_button": True,
    "use_download_button": True,
    "launch_buttons": {"colab_url": "https://colab.research.google.com"},
    "home_page_in_toc": True,
    "show_toc_level": 2,
}
