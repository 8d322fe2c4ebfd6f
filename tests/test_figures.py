"""The drawn figures: every chapter shows at least one, each file exists, is referenced where
the script says, with its alt text, and redrawing it gives the committed bytes.

The figures are SVG files in book/figures/, drawn by scripts/draw_figures.py and placed in the
chapters by scripts/insert_figure_cells.py. The browser test (tests/browser) checks that each
one loads in the built book.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib
import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FIGURES_DIR = ROOT / "book" / "figures"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SVG_NS = "{http://www.w3.org/2000/svg}"

# A MyST figure directive in a markdown cell: ```{figure} path, then :option: lines.
FIGURE_RE = re.compile(r"^(`{3,}|:{3,})\{figure\}\s*(?P<path>\S+)\s*\n(?P<options>(?::[\w-]+:.*\n?)*)", re.M)
OPTION_RE = re.compile(r"^:(?P<key>[\w-]+):[ \t]*(?P<value>.*)$", re.M)


def load_script(name: str):
    """Import scripts/<name>.py as a module (scripts/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


draw_figures = load_script("draw_figures")
insert_figure_cells = load_script("insert_figure_cells")
FIGURES = [fig for fig, _ in draw_figures.FIGURES]


def figure_directives(path: Path) -> list[dict]:
    """Every {figure} directive in a notebook's markdown cells: path, options, cell id."""
    found = []
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "markdown":
            continue
        for m in FIGURE_RE.finditer(cell.source):
            options = {o["key"]: o["value"].strip() for o in OPTION_RE.finditer(m["options"])}
            found.append({"path": m["path"], "options": options, "cell": cell.get("id")})
    return found


def test_figure_directive_parser():
    source = "```{figure} ../book/figures/x.svg\n:name: fig-x\n:alt: A box.\n\nCaption.\n```\n"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(source)])
    parsed = [{"path": m["path"], "opts": dict((o["key"], o["value"]) for o in OPTION_RE.finditer(m["options"]))}
              for m in FIGURE_RE.finditer(nb.cells[0].source)]
    assert parsed == [{"path": "../book/figures/x.svg", "opts": {"name": "fig-x", "alt": "A box."}}]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_chapter_shows_a_drawn_figure(path):
    """A drawn picture of the idea: an SVG from book/figures/ in a {figure}, or a code cell tagged
    `drawn-figure` that draws one live (e.g. from a real engine's state) with alt text."""
    drawn = [d for d in figure_directives(path) if d["path"].startswith("../book/figures/")]
    nb = nbformat.read(path, as_version=4)
    drawn += [c for c in nb.cells if c.cell_type == "code" and "drawn-figure" in c.metadata.get("tags", [])
              and c.metadata.get("mystnb", {}).get("image", {}).get("alt")]
    assert drawn, (f"{path.name}: no {{figure}} of a drawn figure from book/figures/, and no code cell "
                   "tagged drawn-figure with mystnb.image.alt text")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_figure_directives_resolve_and_have_alt_text(path):
    for d in figure_directives(path):
        target = (path.parent / d["path"]).resolve()
        assert target.is_file(), f"{path.name}: {{figure}} {d['path']} does not exist ({target})"
        assert d["options"].get("alt"), f"{path.name}: {{figure}} {d['path']} has no :alt: text"
        assert d["options"].get("name"), f"{path.name}: {{figure}} {d['path']} has no :name: to refer to it by"


@pytest.mark.parametrize("fig", FIGURES, ids=[f.name for f in FIGURES])
def test_figure_is_in_its_chapter_as_drawn(fig):
    path = ROOT / "notebooks" / f"{fig.notebook}.ipynb"
    assert path.exists(), f"{fig.name}: its chapter {path.name} does not exist"
    mine = [d for d in figure_directives(path) if d["path"] == f"../book/figures/{fig.name}.svg"]
    assert len(mine) == 1, f"{path.name} shows {fig.name}.svg {len(mine)} times, expected once"
    assert mine[0]["options"]["alt"] == fig.alt, (
        f"{path.name}: the alt text of {fig.name} differs from scripts/draw_figures.py "
        "(run scripts/insert_figure_cells.py)")
    assert mine[0]["options"]["name"] == f"fig-{fig.name}"
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if c.get("id") == insert_figure_cells.cell_id(fig))
    assert cell.source == insert_figure_cells.cell_source(fig), (
        f"{path.name}: the cell of {fig.name} is out of date (run scripts/insert_figure_cells.py)")


def test_alt_texts_and_captions_are_written():
    names = [fig.name for fig in FIGURES]
    assert len(set(names)) == len(names), f"figure names repeat: {names}"
    for fig in FIGURES:
        assert len(fig.alt.split()) >= 15, f"{fig.name}: alt text too short to describe a drawing"
        assert "\n" not in fig.alt, f"{fig.name}: alt text must be one line (a directive option)"
        assert fig.caption.strip(), f"{fig.name}: no caption"


@pytest.mark.parametrize("fig", FIGURES, ids=[f.name for f in FIGURES])
def test_svg_file_is_a_sized_svg(fig):
    path = FIGURES_DIR / f"{fig.name}.svg"
    assert path.is_file(), f"{path} is missing: run scripts/draw_figures.py"
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG_NS}svg", f"{path.name}: not an SVG document"
    # A browser gives an <img> of an SVG a natural width only from these.
    assert root.get("width") and root.get("height") and root.get("viewBox"), f"{path.name}: no size"
    text = path.read_text(encoding="utf-8")
    assert "<dc:date>" not in text, f"{path.name}: a date in the metadata makes every redraw differ"


def test_no_orphan_figures():
    drawn = {f"{fig.name}.svg" for fig in FIGURES}
    on_disk = {p.name for p in FIGURES_DIR.glob("*.svg")}
    assert on_disk <= drawn, f"SVGs in book/figures/ that no script draws: {sorted(on_disk - drawn)}"


def test_book_does_not_exclude_the_figures():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    for pattern in config.get("exclude_patterns", []):
        for fig in FIGURES:
            rel = f"book/figures/{fig.name}.svg"
            assert not fnmatch.fnmatch(rel, pattern) and not rel.startswith(pattern.rstrip("/") + "/"), (
                f"_config.yml's exclude_patterns entry {pattern!r} would drop {rel}")


def drawn_with(path: Path) -> str | None:
    m = re.search(r"matplotlib (\S+); scripts/draw_figures\.py", path.read_text(encoding="utf-8"))
    return m[1] if m else None


def test_redrawing_reproduces_the_committed_files(tmp_path):
    versions = {drawn_with(FIGURES_DIR / f"{fig.name}.svg") for fig in FIGURES}
    assert None not in versions, "a committed SVG does not say which matplotlib drew it"
    if versions != {matplotlib.__version__}:
        pytest.skip(f"the figures were drawn with matplotlib {sorted(versions)}, this is "
                    f"{matplotlib.__version__}: glyph paths may differ, so bytes are not compared")
    try:
        with matplotlib.rc_context(draw_figures.RC):
            draw_figures.check_fonts()
    except RuntimeError as exc:  # a system DejaVu would draw different glyph paths
        pytest.skip(f"not matplotlib's bundled fonts here: {exc}")
    draw_figures.draw_all(tmp_path)
    differ = [fig.name for fig in FIGURES
              if (tmp_path / f"{fig.name}.svg").read_bytes() != (FIGURES_DIR / f"{fig.name}.svg").read_bytes()]
    assert not differ, f"redrawn figures differ from the committed ones (run scripts/draw_figures.py): {differ}"
