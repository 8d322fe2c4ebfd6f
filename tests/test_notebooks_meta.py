"""The chapters as files: what every notebook in notebooks/ must be before it is committed.

These read the .ipynb files and _config.yml; nothing is executed (nbval and the book build
run the notebooks). A chapter must open on Colab (a guarded install cell first, the
launch button configured), run anywhere including on a Mac's MPS (no float64), be stored
clean (no outputs, no widget state) with the python3 kernel, and end the same way as the
others (a Summary and Exercises headings).
"""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())

COLAB_GUARD = re.compile(r"""^if\s+["']google\.colab["']\s+in\s+sys\.modules\s*:""", re.M)


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def headings(nb) -> list[str]:
    found = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            found += re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", cell.source, re.M)
    return found


def code_without_comments(source: str) -> str:
    """The cell's Python without comments, so that a comment may mention float64.
    IPython lines (%magic, !shell) are dropped first; code that still does not tokenize is
    searched as it is."""
    lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
    code = "\n".join(lines)
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return code
    return " ".join(tok.string for tok in tokens if tok.type != tokenize.COMMENT)


def ids(paths):
    return [p.stem for p in paths]


notebook = pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))


@notebook
def test_first_code_cell_is_the_colab_install(path):
    cells = code_cells(read(path))
    assert cells, f"{path.name}: no code cell"
    first = cells[0].source
    assert COLAB_GUARD.search(first), (
        f"{path.name}: the first code cell must install kvlab only on Colab, under "
        f"`if \"google.colab\" in sys.modules:`; it is:\n{first}")
    assert "import sys" in first, f"{path.name}: the Colab guard needs `import sys` in the same cell"
    installs = [line for line in first.splitlines() if re.search(r"\bpip\b\s+install", line)]
    assert installs, f"{path.name}: the Colab cell installs nothing"
    for line in installs:
        assert line.startswith((" ", "\t")), f"{path.name}: `{line.strip()}` runs outside the Colab guard"
        # Colab's own torch and ipywidgets match its runtime; reinstalling them breaks it.
        assert not re.search(r"\b(torch|ipywidgets)\b", line), f"{path.name}: `{line.strip()}` reinstalls a Colab package"
    assert CONFIG["repository"]["url"] in first, (
        f"{path.name}: the Colab cell should install from {CONFIG['repository']['url']} (_config.yml)")


@notebook
def test_stored_without_outputs(path):
    nb = read(path)
    with_outputs = [i for i, cell in enumerate(code_cells(nb)) if cell.outputs]
    counted = [i for i, cell in enumerate(code_cells(nb)) if cell.execution_count is not None]
    assert not with_outputs, f"{path.name}: code cells {with_outputs} have stored outputs (run `make strip`)"
    assert not counted, f"{path.name}: code cells {counted} have execution counts (run `make strip`)"
    assert "widgets" not in nb.metadata, f"{path.name}: stored widget state (run `make strip`)"


@notebook
def test_solutions_open_folded_where_learners_work(path):
    # Colab folds a cell whose metadata says "cellView": "form" and whose source starts with
    # `#@title`; JupyterLab and Notebook 7 fold one whose metadata has jupyter.source_hidden. The
    # book keeps its own dropdowns (the solution-start/end blocks), and nbval still runs the cell.
    nb = read(path)
    solutions = [cell for cell in code_cells(nb) if "solution" in cell.metadata.get("tags", [])]
    for cell in solutions:
        first = cell.source.split("\n", 1)[0]
        where = f"{path.name}: the solution cell starting {cell.source[:60]!r}"
        assert first.startswith("#@title Solution"), f"{where} needs a `#@title Solution: ...` first line (Colab's form)"
        assert cell.metadata.get("cellView") == "form", f"{where} needs metadata cellView: form (Colab)"
        assert cell.metadata.get("jupyter", {}).get("source_hidden") is True, (
            f"{where} needs metadata jupyter.source_hidden: true (JupyterLab, Notebook 7)")
    unfolded = [cell.source[:40] for cell in code_cells(nb) if "solution" not in cell.metadata.get("tags", [])
                and cell.metadata.get("jupyter", {}).get("source_hidden")]
    assert not unfolded, f"{path.name}: only solutions are folded, not {unfolded}"


@notebook
def test_no_stored_errors(path):
    errors = [(i, out.get("ename")) for i, cell in enumerate(code_cells(read(path)))
              for out in cell.outputs if out.get("output_type") == "error"]
    assert not errors, f"{path.name}: code cells with a stored error: {errors}"


@notebook
def test_kernel_is_python3(path):
    kernelspec = read(path).metadata.get("kernelspec", {})
    assert kernelspec.get("name") == "python3", f"{path.name}: kernelspec {kernelspec}"
    assert kernelspec.get("language", "python") == "python"


@notebook
def test_no_float64(path):
    """MPS has no float64: a chapter that asks for it fails on a Mac."""
    offending = []
    for i, cell in enumerate(code_cells(read(path))):
        code = code_without_comments(cell.source)
        if re.search(r"\bfloat64\b|\.\s*double\s*\(", code):
            offending.append(i)
    assert not offending, f"{path.name}: float64 or .double() in code cells {offending}"


@notebook
def test_has_summary_and_exercises(path):
    found = headings(read(path))
    for title in ("Summary", "Exercises"):
        assert any(re.search(rf"\b{title}\b", h) for h in found), (
            f"{path.name}: no '{title}' heading (headings: {found})")


def test_colab_launch_button_configured():
    launch = CONFIG.get("launch_buttons", {})
    assert launch.get("colab_url") == "https://colab.research.google.com", launch
    repository = CONFIG.get("repository", {})
    assert repository.get("url", "").startswith("https://github.com/"), (
        "Colab opens a notebook from its GitHub repository: set repository.url in _config.yml")
    assert repository.get("branch"), "repository.branch is needed for the launch button's URL"


def test_toc_chapters_exist():
    toc = (ROOT / "_toc.yml").read_text()
    for name in re.findall(r"^\s*-?\s*file:\s*(notebooks/\S+)", toc, re.M):
        assert (ROOT / f"{name}.ipynb").exists() or (ROOT / name).exists(), f"_toc.yml lists {name}, which does not exist"
