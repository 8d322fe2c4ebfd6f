"""The student edition of the chapters, and grading learners' notebooks in bulk.

Every exercise in a chapter notebook is four tagged pieces, in order:
    markdown  ```{exercise} ...  with a :label:
    code      tagged "exercise-stub"   the signature, raising NotImplementedError (my_thing)
    markdown  ```{solution-start} <label> ... then a code cell tagged "solution", then
              ```{solution-end}; the solution has its own name (solution_thing) and ends
              by running the check on itself, so it never replaces the learner's my_thing
    code      tagged "exercise-check"  calls kvlab.checks.check_...(the learner's function),
              which prints "✗ ... not done yet" while the stub is unfilled

    python -m kvlab.student build notebooks/ student/
        writes each notebook with the solution blocks removed and outputs cleared: learners
        get the stubs and the checks, everything else untouched.
    python -m kvlab.student grade submissions/*.ipynb [--json report.json]
        runs each notebook top to bottom (continuing past failures) and reports, per
        exercise, whether its check passed; "not done" (the stub left as it was) is a fail.

Built for instructors; see book/instructors.md. The command's name is kvlab.student (the file
kvlab/student.py runs this module's `main`); the tools are course code, so they live here.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["is_solution_cell", "student_notebook", "build_student_edition", "exercises_in", "execute_notebook",
           "grade_executed", "grade_notebook", "main"]

_LABEL = re.compile(r":label:\s*(\S+)")


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def is_solution_cell(cell) -> bool:
    """True for the parts of a solution block: the tagged code cell and its start/end markers."""
    if "solution" in _tags(cell):
        return True
    if cell.get("cell_type") == "markdown":
        text = "".join(cell.get("source", "")).lstrip()
        return text.startswith(("```{solution-start}", "```{solution-end}", ":::{solution-start}",
                                ":::{solution-end}"))
    return False


def student_notebook(nb):
    """A copy of notebook `nb` (nbformat) without solutions and without outputs."""
    import copy

    out = copy.deepcopy(nb)
    out.cells = [cell for cell in out.cells if not is_solution_cell(cell)]
    for cell in out.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    out.metadata.pop("widgets", None)
    return out


def _require(module: str):
    """Import one of the notebook tools, or say what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise SystemExit(f"python -m kvlab.student needs the package {module!r}: pip install nbformat nbclient "
                         "ipykernel (or pip install 'kvlab[student]')") from err


def build_student_edition(src: str | Path, dest: str | Path) -> list[Path]:
    """Write the student edition of every notebook in `src` (a folder or one .ipynb) into `dest`."""
    nbformat = _require("nbformat")

    src, dest = Path(src), Path(dest)
    paths = sorted(src.glob("*.ipynb")) if src.is_dir() else [src]
    if not paths:
        raise FileNotFoundError(f"no .ipynb notebooks in {src}")
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        target = dest / path.name
        nbformat.write(student_notebook(nb), target)
        written.append(target)
    return written


def exercises_in(nb) -> list[tuple[str, int]]:
    """(label, index of its check cell) for every exercise, in order."""
    found, label = [], None
    for i, cell in enumerate(nb.cells):
        text = "".join(cell.get("source", ""))
        if cell.cell_type == "markdown" and "{exercise}" in text:
            match = _LABEL.search(text)
            label = match.group(1) if match else f"exercise-{len(found) + 1}"
        elif cell.cell_type == "code" and "exercise-check" in _tags(cell):
            found.append((label or f"exercise-{len(found) + 1}", i))
            label = None
    return found


@dataclass
class Grade:
    notebook: str
    results: dict[str, str] = field(default_factory=dict)  # label -> "pass" | "fail: ..." | "not run"

    @property
    def passed(self) -> int:
        return sum(r == "pass" for r in self.results.values())


def execute_notebook(path: str | Path, *, timeout: int = 600, cwd: str | Path | None = None):
    """Run a notebook top to bottom, continuing past errors; return the executed notebook."""
    nbformat = _require("nbformat")
    NotebookClient = _require("nbclient").NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, allow_errors=True, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd or path.parent)}})
    client.execute()
    return nb


def grade_executed(nb, name: str = "") -> Grade:
    """Pass/fail for each exercise of an executed notebook: an error or a "not done" line is a fail."""
    from .checks._common import NOT_DONE_MARK, is_not_done_line

    grade = Grade(notebook=name)
    for label, index in exercises_in(nb):
        outputs = nb.cells[index].get("outputs", [])
        errors = [o for o in outputs if o.get("output_type") == "error"]
        text = "".join("".join(o.get("text", "")) for o in outputs if o.get("output_type") == "stream")
        not_done = [line for line in text.splitlines() if is_not_done_line(line)]
        if nb.cells[index].get("execution_count") is None:
            grade.results[label] = "not run"
        elif errors:
            first_line = (errors[0].get("evalue", "").splitlines() or [""])[0]
            grade.results[label] = f"fail: {errors[0].get('ename')}: {first_line[:200]}"
        elif not_done:
            reason = not_done[0][len(NOT_DONE_MARK):].split(" (not done yet")[0]
            grade.results[label] = f"fail: not done: {reason[:200]}"
        else:
            grade.results[label] = "pass"
    return grade


def grade_notebook(path: str | Path, *, timeout: int = 600, cwd: str | Path | None = None) -> Grade:
    """Execute a notebook top to bottom, continuing past errors; pass/fail for each exercise check."""
    return grade_executed(execute_notebook(path, timeout=timeout, cwd=cwd), str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvlab.student",
                                     description="Build the student edition of the chapters, or grade notebooks.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write notebooks with solutions removed")
    build.add_argument("src", help="a folder of notebooks (e.g. notebooks/) or one .ipynb")
    build.add_argument("dest", help="output folder (e.g. student/)")
    grade = sub.add_parser("grade", help="run notebooks and report pass/fail per exercise")
    grade.add_argument("notebooks", nargs="+", help="submitted .ipynb files")
    grade.add_argument("--json", dest="json_path", help="also write the report as JSON here")
    grade.add_argument("--timeout", type=int, default=600, help="seconds one cell may run (default 600)")
    args = parser.parse_args(argv)

    if args.command == "build":
        for path in build_student_edition(args.src, args.dest):
            print(f"wrote {path}")
        return 0
    grades = []
    for nb_path in args.notebooks:
        if not Path(nb_path).is_file():
            parser.error(f"no such notebook: {nb_path}")
        g = grade_notebook(nb_path, timeout=args.timeout)
        grades.append(g)
        print(f"{g.notebook}: {g.passed}/{len(g.results)} exercises pass")
        for label, result in g.results.items():
            print(f"  {label:<32} {result}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps([g.__dict__ for g in grades], indent=2) + "\n")
    return 0
