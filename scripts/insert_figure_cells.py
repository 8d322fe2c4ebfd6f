"""Put each drawn figure into its chapter: one markdown cell with a MyST `{figure}` directive.

    python scripts/insert_figure_cells.py          # insert or update the cells
    python scripts/insert_figure_cells.py --check  # fail if any chapter's cell is missing or stale

The figures, their alt text, captions and places come from `FIGURES` in draw_figures.py. Each
cell has the id `figure-<name>` and goes right after the cell whose id is the figure's `after`,
so running the script again (say, after a merge moved cells around) updates the existing cell
instead of adding a second one. No other cell is touched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))
from draw_figures import FIGURES, ROOT, Figure  # noqa: E402

NOTEBOOKS = ROOT / "notebooks"


def cell_id(fig: Figure) -> str:
    return f"figure-{fig.name}"


def cell_source(fig: Figure) -> str:
    """The markdown of a figure's cell (path relative to the notebook, as the book needs)."""
    lines = [
        f"```{{figure}} ../book/figures/{fig.name}.svg",
        f":name: fig-{fig.name}",
        f":alt: {fig.alt}",
        "",
        fig.caption,
        "```",
    ]
    if fig.note:
        lines += ["", fig.note]
    return "\n".join(lines)


def place(nb, fig: Figure) -> bool:
    """Insert or refresh `fig`'s cell in `nb`; True if the notebook changed."""
    ids = [c.get("id") for c in nb.cells]
    source = cell_source(fig)
    if cell_id(fig) in ids:
        cell = nb.cells[ids.index(cell_id(fig))]
        if cell.source == source:
            return False
        cell.source = source
        return True
    if fig.after not in ids:
        raise SystemExit(f"{fig.notebook}: no cell with id {fig.after!r} to put figure {fig.name} after")
    cell = nbformat.v4.new_markdown_cell(source)
    cell.id = cell_id(fig)
    nb.cells.insert(ids.index(fig.after) + 1, cell)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; fail if a cell is missing or stale")
    args = parser.parse_args(argv)
    stale = []
    for stem in sorted({fig.notebook for fig, _ in FIGURES}):
        path = NOTEBOOKS / f"{stem}.ipynb"
        nb = nbformat.read(path, as_version=4)
        changed = [fig.name for fig, _ in FIGURES if fig.notebook == stem and place(nb, fig)]
        if changed and args.check:
            stale += [f"{path.name}: {name}" for name in changed]
        elif changed:
            nbformat.write(nb, path)
            print(f"{path.relative_to(ROOT)}: {', '.join(changed)}")
    if stale:
        print("figure cells missing or out of date (run scripts/insert_figure_cells.py):",
              *stale, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
