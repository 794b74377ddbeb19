"""The built website in a real browser (issue 16): every page renders without console
errors or requests to other hosts, shows its figures, links resolve, search works, and each
notebook page names the machine that produced it and offers Colab and download links."""

from __future__ import annotations

import re
import sys
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "build" / "site"
sys.path.insert(0, str(ROOT / "book"))
import build_site as build  # noqa: E402 - book/build_site.py

NOTEBOOKS = [p for _, p, _ in build.course_map()] + build.solutions()


def _html(relative: str) -> str:
    return relative.removesuffix(".ipynb") + ".html"


def _pngs(relative: str) -> int:
    nb = nbformat.read(str(ROOT / "build" / "book-src" / relative), as_version=4)
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


def _visit(page, url: str) -> list[str]:
    """Open ``url``; return the problems seen: console errors, page errors, failed requests
    and requests to any host but the local server."""
    problems: list[str] = []
    host = urllib.parse.urlparse(url).netloc
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.on(
        "request",
        lambda r: (
            problems.append(f"request to another host: {r.url}")
            if urllib.parse.urlparse(r.url).netloc not in (host, "") and not r.url.startswith("data:")
            else None
        ),
    )
    response = page.goto(url, wait_until="load")
    assert response is not None and response.status == 200, url
    page.wait_for_load_state("networkidle")
    return problems


@pytest.mark.parametrize("relative", ["index.ipynb", *NOTEBOOKS], ids=lambda p: Path(p).stem)
def test_page_renders_without_errors_and_shows_its_figures(page, base_url, relative):
    problems = _visit(page, f"{base_url}/{_html(relative)}")
    assert problems == []
    assert page.locator("article").count() == 1 and page.locator("h1").count() >= 1
    if relative == "index.ipynb":
        return
    expected = _pngs(relative)
    images = page.locator("div.cell_output img")
    assert images.count() >= expected, f"{relative}: {images.count()} images on the page, {expected} in the notebook"
    for i in range(images.count()):
        assert images.nth(i).evaluate("img => img.complete && img.naturalWidth > 0"), f"image {i} did not load"


def test_every_chapter_has_figures():
    chapters = [p for p in NOTEBOOKS if p.startswith("chapters/")]
    assert len(chapters) == 16
    assert [p for p in chapters if _pngs(p) < 1] == [], "every chapter draws at least one plot"


@pytest.mark.parametrize("relative", NOTEBOOKS, ids=lambda p: Path(p).stem)
def test_notebook_page_names_its_machine_and_offers_colab_and_download(site, relative):
    text = (site / _html(relative)).read_text(encoding="utf-8")
    assert "Where the numbers on this page come from" in text
    assert re.search(r"CPU: .+ cores.*torch \d+\.\d+", text), "the machine and torch version are named"
    colab = f"https://colab.research.google.com/github/vram-lab/vram-lab/blob/main/{relative}"
    assert colab in text
    assert f"_sources/{relative}" in text and (site / "_sources" / relative).is_file()


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("id"):
            self.ids.add(values["id"] or "")
        for name in ("href", "src"):
            if values.get(name) and tag in ("a", "img", "link", "script"):
                self.hrefs.append(values[name] or "")


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_internal_links_resolve(site):
    pages = sorted(p for p in site.rglob("*.html") if "_static" not in p.relative_to(site).parts)
    parsed = {p: _parse(p) for p in pages}
    broken = []
    for path, links in parsed.items():
        for href in links.hrefs:
            url = urllib.parse.urlparse(href)
            if url.scheme or href.startswith(("mailto:", "javascript:", "//")):
                continue
            target = (path.parent / urllib.parse.unquote(url.path)).resolve() if url.path else path
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{path.relative_to(site)} -> {href}")
            elif url.fragment and target.suffix == ".html":
                ids = parsed[target].ids if target in parsed else _parse(target).ids
                if url.fragment not in ids:
                    broken.append(f"{path.relative_to(site)} -> {href} (no such anchor)")
    assert broken == []
    assert len(pages) >= len(NOTEBOOKS) + 1


def test_search_box_finds_a_chapter(page, base_url):
    problems = _visit(page, f"{base_url}/search.html?q=fragmentation")
    page.wait_for_selector("#search-results ul li a", timeout=15_000)
    hrefs = page.locator("#search-results ul li a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
    assert any("05_anatomy_of_an_oom" in h for h in hrefs), hrefs
    assert problems == []
    assert (SITE / "index.html").read_text(encoding="utf-8").count('type="search"') >= 1


def test_chapter_02_runs_the_live_calculator_in_place_of_its_static_view(page, base_url):
    problems = _visit(page, f"{base_url}/chapters/02_training_memory_anatomy.html")
    page.wait_for_selector('#vramlab-calc[data-ready="1"]', state="attached", timeout=120_000)
    assert problems == [] and page.locator(".vramlab-calculator-fallback").count() == 0
    assert "Peak (steady state)" in page.inner_text("#calc-out")


def test_course_map_is_the_navigation(page, base_url):
    _visit(page, f"{base_url}/index.html")
    nav = page.locator("nav.bd-links a.reference.internal")
    targets = nav.evaluate_all("links => links.map(a => a.getAttribute('href'))")
    expected = ["calculator.html"] + [_html(p) for p in NOTEBOOKS]
    assert [t for t in targets if t.endswith(".html") and t != "#"] == expected
