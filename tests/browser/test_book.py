"""The built book as a reader sees it, checked in a real browser.

`make browser-test` (after `make book`) serves `_build/html` on 127.0.0.1 and opens every
page of `_toc.yml` in Chromium through Playwright. Every request that would leave 127.0.0.1
is refused, so a page that still needs a CDN (MathJax, the widget scripts, a font) fails
here instead of on a reader's offline laptop. For each page:

- it loads (HTTP 200), every resource it asks for loads, and nothing leaves 127.0.0.1;
- the browser console shows no error and no script throws;
- every ``<img>`` has loaded (``naturalWidth > 0``);
- MathJax has rendered every formula (an ``mjx-container`` in each ``.math`` element) and
  no raw ``$$``, ``\\(`` or ``\\[`` is left in the text;
- a chapter (a notebook) shows at least one of its figures from ``_images/``;
- every drawn figure a chapter places with a ``{figure}`` directive (book/figures/*.svg) is
  on its page, loaded (``naturalWidth > 0``) and carries the directive's alt text;
- a page that embeds widget state (``application/vnd.jupyter.widget-state+json``) shows
  its widgets, rendered by the embed script.

The search page must find "cache", and full-page screenshots of the intro and the first
chapter are saved in `_build/screenshots/` (CI keeps them).

Chromium is `/usr/bin/chromium` (Debian's `chromium` package), or the program named by
`KVLAB_CHROMIUM`. Playwright's own browser download (`playwright install`) is never used.
Without a built book or a Chromium these tests are skipped, unless `KVLAB_BROWSER_TEST=
required` (which `make browser-test` sets) makes that a failure. `KVLAB_BOOK_HTML` points
them at another built book.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HTML = Path(os.environ.get("KVLAB_BOOK_HTML", ROOT / "_build" / "html")).resolve()
SCREENSHOTS = ROOT / "_build" / "screenshots"
REQUIRED = os.environ.get("KVLAB_BROWSER_TEST") == "required"

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
TIMEOUT_MS = 30_000  # one page, or one thing to wait for on a page


# --- the pages ------------------------------------------------------------------------


def toc_files(toc_path: Path = ROOT / "_toc.yml") -> list[str]:
    """Every `file:` in the table of contents, root first, in reading order."""
    toc = yaml.safe_load(toc_path.read_text())
    files = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for value in node.values():
                if isinstance(value, (list, dict)):
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({k: v for k, v in toc.items() if k != "root"})
    return files


def strip_suffix(name: str) -> str:
    for suffix in (".ipynb", ".md"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


PAGES = [strip_suffix(f) for f in toc_files()]
ROOT_PAGE = PAGES[0]
CHAPTERS = [p for p in PAGES if (ROOT / f"{p}.ipynb").exists()]
SCREENSHOT_PAGES = [ROOT_PAGE] + CHAPTERS[:1]


def built_html(page: str) -> Path:
    return HTML / f"{page}.html"


def has_widget_state(page: str) -> bool:
    path = built_html(page)
    return path.exists() and WIDGET_STATE in path.read_text(encoding="utf-8", errors="replace")


# --- fixtures -------------------------------------------------------------------------


def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def find_chromium() -> str | None:
    if path := os.environ.get("KVLAB_CHROMIUM"):
        return path
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


@pytest.fixture(scope="session")
def base_url():
    """The built book, served from 127.0.0.1 on a free port for the whole session."""
    if not (HTML / "index.html").exists():
        _unavailable(f"no built book at {HTML}: run `make book` first")
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def browser():
    chromium = find_chromium()
    if chromium is None:
        _unavailable("no Chromium: apt-get install chromium, or set KVLAB_CHROMIUM")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed: pip install playwright (requirements-dev.txt)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class Visit:
    """What one page did in the browser."""

    url: str
    status: int | None = None
    errors: list[str] = field(default_factory=list)  # console errors and uncaught exceptions
    blocked: list[str] = field(default_factory=list)  # requests refused: not to 127.0.0.1
    failed: list[str] = field(default_factory=list)  # local requests that failed or gave >= 400
    info: dict = field(default_factory=dict)  # what COLLECT found in the rendered page


@pytest.fixture(scope="session")
def context(browser, base_url):
    """One browser context whose every request outside 127.0.0.1 is aborted."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
    ctx.set_default_timeout(TIMEOUT_MS)
    ctx.blocked = []  # (url, page url) for every refused request

    def only_localhost(route):
        url = route.request.url
        if urlsplit(url).hostname == "127.0.0.1":
            route.continue_()
        else:
            ctx.blocked.append(url)
            route.abort("blockedbyclient")

    ctx.route("**/*", only_localhost)
    yield ctx
    ctx.close()


# The embed script puts each widget view in a new `.widget-subarea` and draws the widget
# (a `.jupyter-widgets` element) inside it; a view that failed leaves its subarea empty.
RENDERED_WIDGETS = ("[...document.querySelectorAll('.widget-subarea')]"
                    ".filter(el => el.querySelector('.jupyter-widgets')).length")

# Run in the page once it has loaded, MathJax has typeset and the images have settled.
WAIT_FOR_MATH_AND_IMAGES = """async (timeoutMs) => {
  const timeout = new Promise(resolve => setTimeout(resolve, timeoutMs));
  const mj = window.MathJax;
  if (mj && mj.startup && mj.startup.promise) {
    await Promise.race([mj.startup.promise, timeout]);
  }
  const images = [...document.images];
  images.forEach(img => { img.loading = "eager"; });
  await Promise.race([timeout, Promise.all(images.map(img => img.complete ? null :
    new Promise(resolve => { img.addEventListener("load", resolve);
                             img.addEventListener("error", resolve); })))]);
}"""

COLLECT = """() => {
  const article = document.querySelector("article") || document.querySelector("main") || document.body;
  const skip = "pre, code, script, style, textarea, mjx-container, .highlight, .output";
  const raw = [];
  const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (node.parentElement && node.parentElement.closest(skip)) continue;
    const text = node.textContent;
    for (const token of ["$$", "\\\\(", "\\\\[", "\\\\begin{"]) {
      const at = text.indexOf(token);
      if (at >= 0) raw.push(text.slice(Math.max(0, at - 30), at + 40).trim());
    }
  }
  const math = [...document.querySelectorAll(".math")];
  return {
    title: document.title,
    articleText: article.innerText.trim().length,
    images: [...document.images].map(img => ({
      src: img.currentSrc || img.src, complete: img.complete, naturalWidth: img.naturalWidth,
      alt: img.getAttribute("alt") })),
    mathElements: math.length,
    mathUnrendered: math.filter(el => !el.querySelector("mjx-container"))
                        .map(el => el.textContent.trim().slice(0, 60)),
    mjxContainers: document.querySelectorAll("mjx-container").length,
    mathjaxVersion: window.MathJax && window.MathJax.version || null,
    rawMath: raw,
    figures: [...document.querySelectorAll("figure")].map(fig => {
      const img = fig.querySelector("img");
      return {id: fig.id, src: img ? (img.currentSrc || img.src) : null,
              alt: img ? img.getAttribute("alt") : null, naturalWidth: img ? img.naturalWidth : 0};
    }),
    widgetState: document.querySelectorAll('script[type="WIDGET_STATE"]').length,
    widgetViews: document.querySelectorAll('script[type="WIDGET_VIEW"]').length,
    widgetsRendered: RENDERED_WIDGETS,
  };
}"""
for _name in ("WIDGET_STATE", "WIDGET_VIEW", "RENDERED_WIDGETS"):
    COLLECT = COLLECT.replace(_name, globals()[_name])


def _is_favicon(url: str) -> bool:
    return urlsplit(url).path == "/favicon.ico"


def open_page(context, url: str, *, screenshot: Path | None = None) -> Visit:
    """Open `url` in a fresh tab, wait until it has settled, and record what happened."""
    visit = Visit(url=url)
    page = context.new_page()
    blocked_before = len(context.blocked)

    # The browser asks for /favicon.ico by itself when a page names no icon; its 404 says
    # nothing about the page, and arrives at a moment that varies from run to run.
    def on_console(msg):
        where = msg.location or {}
        if msg.type == "error" and not _is_favicon(where.get("url", "")):
            visit.errors.append(f"console: {msg.text} [{where.get('url', '')}:{where.get('lineNumber', '')}]")

    def on_request_failed(request):
        if urlsplit(request.url).hostname == "127.0.0.1" and not _is_favicon(request.url):
            visit.failed.append(f"{request.url} ({request.failure})")

    def on_response(response):
        if response.status >= 400 and not _is_favicon(response.url):
            visit.failed.append(f"{response.url} (HTTP {response.status})")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: visit.errors.append(f"uncaught: {exc}"))
    page.on("requestfailed", on_request_failed)
    page.on("response", on_response)
    try:
        response = page.goto(url, wait_until="load")
        visit.status = response.status if response else None
        page.evaluate(WAIT_FOR_MATH_AND_IMAGES, TIMEOUT_MS)
        views = page.evaluate(f'document.querySelectorAll(\'script[type="{WIDGET_VIEW}"]\').length')
        if views:
            try:
                page.wait_for_function(f"n => {RENDERED_WIDGETS} >= n", arg=views, timeout=TIMEOUT_MS)
            except Exception:  # reported by test_widgets_rendered, from the counts
                pass
        page.wait_for_load_state("networkidle")
        visit.info = page.evaluate(COLLECT)
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
    finally:
        visit.blocked = context.blocked[blocked_before:]
        page.close()
    return visit


@pytest.fixture(scope="session")
def visits(context, base_url):
    """Each page of the table of contents, opened once and shared by the tests below."""
    cache: dict[str, Visit] = {}

    def get(page: str) -> Visit:
        if page not in cache:
            shot = SCREENSHOTS / f"{page.replace('/', '__')}.png" if page in SCREENSHOT_PAGES else None
            cache[page] = open_page(context, f"{base_url}{page}.html", screenshot=shot)
        return cache[page]

    return get


def lines(items) -> str:
    return "\n  " + "\n  ".join(map(str, items))


# --- every page -----------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
def test_page_loads(visits, page):
    visit = visits(page)
    assert visit.status == 200, f"{visit.url}: HTTP {visit.status}"
    assert visit.info["title"], f"{visit.url}: no <title>"
    assert visit.info["articleText"] > 100, f"{visit.url}: the article is (almost) empty"
    assert not visit.failed, f"{visit.url}: resources that did not load:{lines(visit.failed)}"


@pytest.mark.parametrize("page", PAGES)
def test_works_offline(visits, page):
    visit = visits(page)
    assert not visit.blocked, (
        f"{visit.url} asked for resources outside the book (refused here, missing offline):"
        f"{lines(visit.blocked)}")


@pytest.mark.parametrize("page", PAGES)
def test_no_console_errors(visits, page):
    visit = visits(page)
    assert not visit.errors, f"{visit.url}: errors in the browser console:{lines(visit.errors)}"


@pytest.mark.parametrize("page", PAGES)
def test_images_loaded(visits, page):
    visit = visits(page)
    broken = [img["src"] for img in visit.info["images"] if not img["naturalWidth"]]
    assert not broken, f"{visit.url}: images that did not load:{lines(broken)}"


@pytest.mark.parametrize("page", PAGES)
def test_math_rendered(visits, page):
    info = visits(page).info
    raw = info["rawMath"]
    assert not raw, f"{page}: TeX left in the text, not rendered ({len(raw)} places):{lines(raw[:10])}"
    if info["mathElements"]:
        assert info["mathjaxVersion"], f"{page}: has math but MathJax did not load"
        assert info["mathjaxVersion"].startswith("3."), f"{page}: MathJax {info['mathjaxVersion']}"
        assert not info["mathUnrendered"], (
            f"{page}: {len(info['mathUnrendered'])} of {info['mathElements']} formulas not "
            f"rendered by MathJax:{lines(info['mathUnrendered'][:10])}")


@pytest.mark.parametrize("page", CHAPTERS)
def test_chapter_shows_its_figures(visits, page):
    visit = visits(page)
    figures = [img for img in visit.info["images"] if "/_images/" in img["src"]]
    assert figures, f"{visit.url}: a chapter without a single figure from _images/"
    assert all(img["naturalWidth"] for img in figures)


# A drawn figure in a chapter's markdown: ```{figure} ../book/figures/NAME.svg, then options.
DRAWN_FIGURE = re.compile(r"^(?:`{3,}|:{3,})\{figure\}\s*\.\./book/figures/(?P<file>[\w.-]+\.svg)\s*\n"
                          r"(?P<options>(?::[\w-]+:.*\n?)*)", re.M)


def drawn_figures(page: str) -> list[dict]:
    """The drawn figures a chapter's notebook places: file, the HTML id of its `:name:`, alt."""
    import nbformat
    from docutils.nodes import make_id

    found = []
    for cell in nbformat.read(ROOT / f"{page}.ipynb", as_version=4).cells:
        alt = cell.get("metadata", {}).get("mystnb", {}).get("image", {}).get("alt")
        if cell.cell_type == "code" and "drawn-figure" in cell.get("metadata", {}).get("tags", []) and alt:
            found.append({"file": None, "id": None, "alt": " ".join(alt.split())})  # drawn live by the cell
        if cell.cell_type != "markdown":
            continue
        for m in DRAWN_FIGURE.finditer(cell.source):
            options = dict(re.findall(r"^:([\w-]+):[ \t]*(.*)$", m["options"], re.M))
            found.append({"file": m["file"], "id": make_id(options.get("name", "")),
                          "alt": " ".join(options.get("alt", "").split())})
    return found


@pytest.mark.parametrize("page", CHAPTERS)
def test_drawn_figures_load_with_alt_text(visits, page):
    expected = drawn_figures(page)
    assert expected, f"{page}: no drawn figure (book/figures/*.svg, or a cell tagged drawn-figure) in the notebook"
    info = visits(page).info
    shown = {fig["id"]: fig for fig in info["figures"]}
    for want in expected:
        if want["file"] is None:  # drawn by a code cell as the page was built: an output image with that alt
            drawn = [img for img in info["images"] if " ".join((img.get("alt") or "").split()) == want["alt"]]
            assert drawn and drawn[0]["naturalWidth"] > 0, f"{page}: no loaded image with the alt text {want['alt']!r}"
            continue
        fig = shown.get(want["id"])
        assert fig, f"{page}: figure #{want['id']} ({want['file']}) is not on the page; figures: {sorted(shown)}"
        assert fig["src"] and fig["src"].endswith(f"/_images/{want['file']}"), f"{page}: #{want['id']} shows {fig['src']}"
        assert fig["naturalWidth"] > 0, f"{page}: {want['file']} did not load"
        assert want["alt"] and " ".join((fig["alt"] or "").split()) == want["alt"], (
            f"{page}: {want['file']} has alt text {fig['alt']!r}, the notebook says {want['alt']!r}")


def test_the_chapters_have_math(visits):
    typeset = {page: visits(page).info["mjxContainers"] for page in CHAPTERS}
    assert any(typeset.values()), f"no chapter has a formula typeset by MathJax: {typeset}"


WIDGET_PAGES = [p for p in PAGES if has_widget_state(p)] or [
    pytest.param(None, marks=pytest.mark.skip(reason="no page embeds widgets yet (the sampling chapter will)"))]


@pytest.mark.parametrize("page", WIDGET_PAGES)
def test_widgets_rendered(visits, page):
    """Active once a chapter saves widgets (the sampling chapter); until then it is skipped."""
    info = visits(page).info
    assert info["widgetState"], f"{page}: the built page has widget state, the browser saw none"
    assert info["widgetViews"], f"{page}: widget state but no widget view to show"
    assert info["widgetsRendered"] >= info["widgetViews"], (
        f"{page}: {info['widgetsRendered']} of {info['widgetViews']} widgets rendered "
        "(is the widget embed script, vendor/html-manager/embed-amd.js, loading?)")


# The sampling widget's controls, measured where they are drawn: each slider must show its
# label, a usable track and its value, and each button its whole label, inside the text column.
# (They once read "Ge…" with no values: the controls column was squeezed by the plot beside it.)
MEASURE_WIDGET_CONTROLS = """() => {
  const column = (document.querySelector("article") || document.querySelector("main") || document.body)
                   .getBoundingClientRect();
  const clipped = el => el.scrollWidth > el.clientWidth + 1;
  // Visible: has a size, is not hidden, and is what the browser draws at its centre (not cut
  // off by an overflow:hidden ancestor or covered by a neighbour).
  const visible = el => {
    const style = getComputedStyle(el);
    if (style.display === "none" || style.visibility === "hidden" || Number(style.opacity) === 0) return false;
    el.scrollIntoView({block: "center", inline: "nearest"});
    const r = el.getBoundingClientRect();
    if (r.width < 1 || r.height < 1) return false;
    const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
    return hit !== null && (hit === el || el.contains(hit));
  };
  const box = el => { const r = el.getBoundingClientRect(); return {left: r.left, right: r.right, width: r.width}; };
  const sliders = [...document.querySelectorAll(".jupyter-widgets.widget-slider")].map(el => {
    const label = el.querySelector(".widget-label");
    const readout = el.querySelector(".widget-readout");
    const track = el.querySelector(".slider-container") || el.querySelector(".slider");
    const column_now = (document.querySelector("article") || document.body).getBoundingClientRect();
    return {
      label: label ? label.textContent.trim() : null,
      labelVisible: label ? visible(label) && !clipped(label) : false,
      readout: readout ? (readout.textContent || readout.value || "").trim() : null,
      readoutVisible: readout ? visible(readout) && !clipped(readout) : false,
      trackWidth: track ? track.getBoundingClientRect().width : 0,
      box: box(el), column: {left: column_now.left, right: column_now.right},
    };
  });
  const buttons = [...document.querySelectorAll("button.jupyter-button, .jupyter-widgets.widget-button")].map(el => ({
    text: el.textContent.trim(), clipped: clipped(el), visible: visible(el), box: box(el),
    column: (() => { const c = (document.querySelector("article") || document.body).getBoundingClientRect();
                     return {left: c.left, right: c.right}; })(),
  }));
  return {column: {left: column.left, right: column.right, width: column.width}, sliders, buttons};
}"""

# The book's layout on a laptop (the whole page, sidebars and all) and on a narrow window
# where the sidebars fold away.
WIDGET_VIEWPORTS = [{"width": 1280, "height": 900}, {"width": 800, "height": 900}]
SAMPLING_PAGE = next((p for p in PAGES if p.endswith("_sampling")), None)


def measure_widget_controls(context, url: str, viewport: dict) -> dict:
    page = context.new_page()
    try:
        page.set_viewport_size(viewport)
        page.goto(url, wait_until="load")
        views = page.evaluate(f'document.querySelectorAll(\'script[type="{WIDGET_VIEW}"]\').length')
        page.wait_for_function(f"n => {RENDERED_WIDGETS} >= n", arg=views, timeout=TIMEOUT_MS)
        page.wait_for_load_state("networkidle")
        return page.evaluate(MEASURE_WIDGET_CONTROLS)
    finally:
        page.close()


@pytest.mark.parametrize("viewport", WIDGET_VIEWPORTS, ids=lambda v: f"{v['width']}px")
@pytest.mark.parametrize("page", WIDGET_PAGES)
def test_widget_controls_fit_the_column(context, base_url, page, viewport):
    """Every slider shows its label, a track and its value; every button its whole label."""
    sizes = measure_widget_controls(context, f"{base_url}{page}.html", viewport)
    problems = []
    for s in sizes["sliders"]:
        name = s["label"] or "(unlabelled slider)"
        if not s["labelVisible"]:
            problems.append(f"slider {name}: its label is hidden or cut off")
        if not s["readout"] or not s["readoutVisible"]:
            problems.append(f"slider {name}: its value is not visible (readout {s['readout']!r})")
        if s["trackWidth"] < 100:
            problems.append(f"slider {name}: its track is {s['trackWidth']:.0f}px wide (< 100px)")
        if s["box"]["right"] > s["column"]["right"] + 1 or s["box"]["left"] < s["column"]["left"] - 1:
            problems.append(f"slider {name}: sticks out of the text column ({s['box']} vs {s['column']})")
    for b in sizes["buttons"]:
        if b["clipped"] or not b["visible"]:
            problems.append(f"button {b['text']!r}: its label is cut off or hidden (width {b['box']['width']:.0f}px)")
        if b["box"]["right"] > b["column"]["right"] + 1:
            problems.append(f"button {b['text']!r}: sticks out of the text column")
    if page == SAMPLING_PAGE:
        labels = {s["label"] for s in sizes["sliders"]}
        for expected in ("temperature", "top-k (0=off)", "top-p (1=off)", "min-p (0=off)"):
            if expected not in labels:
                problems.append(f"the sampling widget has no {expected!r} slider (found {sorted(map(str, labels))})")
        if not any(b["text"] == "Generate" for b in sizes["buttons"]):
            problems.append("the sampling widget has no button reading 'Generate'")
    assert not problems, f"{page} at {viewport['width']}px:{lines(problems)}"


# --- the rest of the site -------------------------------------------------------------


def test_index_leads_to_the_first_page(context, base_url):
    page = context.new_page()
    try:
        page.goto(base_url, wait_until="load")
        page.wait_for_url(f"**/{ROOT_PAGE}.html")
    finally:
        page.close()


def test_search_finds_a_term(context, base_url):
    """Sphinx's search is JavaScript over searchindex.js: it must work from the files alone."""
    visit = Visit(url=f"{base_url}search.html?q=cache")
    page = context.new_page()
    page.on("console", lambda m: m.type == "error" and not _is_favicon((m.location or {}).get("url", ""))
            and visit.errors.append(f"console: {m.text}"))
    page.on("pageerror", lambda exc: visit.errors.append(f"uncaught: {exc}"))
    try:
        page.goto(visit.url, wait_until="load")
        page.wait_for_selector("#search-results ul.search li", timeout=TIMEOUT_MS)
        hits = page.eval_on_selector_all(
            "#search-results ul.search li a", "links => links.map(a => a.getAttribute('href'))")
    finally:
        page.close()
    assert hits, "searching for 'cache' found nothing"
    assert not visit.errors, f"search page: errors in the browser console:{lines(visit.errors)}"


def test_screenshots_saved(visits):
    for page in SCREENSHOT_PAGES:
        visits(page)
        path = SCREENSHOTS / f"{page.replace('/', '__')}.png"
        assert path.exists() and path.stat().st_size > 10_000, f"no screenshot at {path}"
