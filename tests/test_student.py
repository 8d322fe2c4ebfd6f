"""The exercise convention, the student edition and the bulk grader, on a small synthetic chapter
and on every real one; and the plugin (notebooks/conftest.py) with which nbval's run of every
chapter checks that no solution stands in for the learner."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from kvlab.course.checks import is_not_done_line
from kvlab.course.student import (build_student_edition, exercises_in, grade_notebook,
                                  is_solution_cell, student_notebook)

ROOT = Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

CHECKS_CELL = '''\
from kvlab.course.checks import learner_check, passed
from kvlab.course.checks._common import call_learner


@learner_check
def check_double(fn):
    assert call_learner(fn, 21, name="my_double") == 42, "my_double(21) should be 42"
    passed("my_double")


@learner_check
def check_square(fn):
    assert call_learner(fn, 3, name="my_square") == 9, "my_square(3) should be 9"
    passed("my_square")
'''


def tagged(source, *tags):
    cell = new_code_cell(source)
    cell.metadata["tags"] = list(tags)
    return cell


def exercise(label, name, body):
    return [
        new_markdown_cell(f"```{{exercise}} {name}\n:label: {label}\n\nWrite `my_{name}`.\n```"),
        tagged(f"def my_{name}(x):\n    raise NotImplementedError  # your code here", "exercise-stub"),
        new_markdown_cell(f"```{{solution-start}} {label}\n:class: dropdown\n```"),
        tagged(f"def solution_{name}(x):\n    {body}\n\n\ncheck_{name}(solution_{name})", "solution"),
        new_markdown_cell("```{solution-end}\n```"),
        tagged(f"check_{name}(my_{name})", "exercise-check"),
    ]


def chapter():
    nb = new_notebook()
    nb.cells = [new_markdown_cell("# A chapter"), new_code_cell(CHECKS_CELL)]
    nb.cells += exercise("ex-double", "double", "return 2 * x")
    nb.cells += exercise("ex-square", "square", "return x * x")
    nb.cells[3].outputs = [nbformat.v4.new_output("stream", text="stale")]
    return nb


def test_student_notebook_drops_solutions_only():
    nb = chapter()
    student = student_notebook(nb)
    assert len(student.cells) == len(nb.cells) - 6
    assert not any(is_solution_cell(c) for c in student.cells)
    assert sum("exercise-stub" in c.metadata.get("tags", []) for c in student.cells) == 2
    assert all(c.get("outputs", []) == [] for c in student.cells if c.cell_type == "code")
    assert [c.source for c in nb.cells if not is_solution_cell(c)] == [c.source for c in student.cells]
    assert exercises_in(student) == [("ex-double", 4), ("ex-square", 7)]


def test_grading_counts_not_done_as_a_fail_and_passes_finished_work(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    nbformat.write(chapter(), src / "ch.ipynb")
    (student,) = build_student_edition(src, tmp_path / "student")
    # The chapter as published, solutions included: they never stand in for the learner.
    for path in (src / "ch.ipynb", student):
        grade = grade_notebook(path)
        assert all(r.startswith("fail: not done") for r in grade.results.values()), grade.results
    # A learner who answered one right and one wrong.
    nb = nbformat.read(student, as_version=4)
    stubs = [c for c in nb.cells if "exercise-stub" in c.metadata.get("tags", [])]
    stubs[0].source = "def my_double(x):\n    return x + x"
    stubs[1].source = "def my_square(x):\n    return 2 * x"
    nbformat.write(nb, tmp_path / "learner.ipynb")
    grade = grade_notebook(tmp_path / "learner.ipynb")
    assert grade.results["ex-double"] == "pass"
    assert grade.results["ex-square"].startswith("fail: AssertionError: my_square(3) should be 9"), grade.results


# --------------------------------------------------------------------------- the real chapters


def _tags(cell):
    return cell.get("metadata", {}).get("tags", [])


def _parse(source: str) -> ast.Module:
    """A cell as Python (IPython's %magics and !commands turned into calls first)."""
    from IPython.core.inputtransformer2 import TransformerManager

    return ast.parse(TransformerManager().transform_cell(source))


def _defined(source: str) -> set[str]:
    """Names a cell binds at top level (functions, classes, assignments)."""
    names = set()
    for node in _parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def _used(source: str) -> set[str]:
    return {n.id for n in ast.walk(_parse(source)) if isinstance(n, ast.Name)}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_chapter_follows_the_exercise_convention(path):
    """Stub, solution under its own name ending with a check of itself, then the learner's check;
    no solution rebinds a learner's name, and no other cell needs a name only a solution defines
    (the student edition removes the solutions)."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    stubs = [c for c in code if "exercise-stub" in _tags(c)]
    solutions = [c for c in code if "solution" in _tags(c)]
    check_cells = [c for c in code if "exercise-check" in _tags(c)]
    assert len(stubs) == len(solutions) == len(check_cells) >= 3, path.name
    learner_names = set().union(*(_defined(c.source) for c in stubs))
    solution_names = set().union(*(_defined(c.source) for c in solutions))
    assert not learner_names & solution_names, f"solutions rebind learner names: {learner_names & solution_names}"
    for cell in solutions:
        calls = [n for n in ast.walk(_parse(cell.source)) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Attribute) and n.func.attr.startswith("check_")]
        assert calls, f"{path.name}: a solution cell must end by running its check:\n{cell.source[:200]}"
    others = [c for c in code if "solution" not in _tags(c)]
    other_names = set().union(*(_defined(c.source) | _used(c.source) for c in others))
    shared = (solution_names - learner_names - {"_"}) & other_names  # `_` is a throwaway everywhere
    assert not shared, (f"{path.name}: solutions bind names that other cells also bind or use: {shared}; "
                        "the student edition (no solutions) would behave differently")
    for cell in check_cells:
        assert _used(cell.source) & learner_names, f"{path.name}: a check cell must check the learner's name"


def _nbval(folder: Path) -> subprocess.CompletedProcess:
    """Run nbval (with the chapters' conftest.py, the learner's-view plugin) on `folder`."""
    for path in folder.glob("*.ipynb"):  # stored without outputs, as the chapters are
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        nbformat.write(nb, path)
    shutil.copy(ROOT / "notebooks" / "conftest.py", folder / "conftest.py")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                           "--nbval-current-env", str(folder)], cwd=folder, capture_output=True, text=True,
                          timeout=300)


def test_the_chapters_nbval_run_checks_the_learners_view(tmp_path):
    """`make test-notebooks` runs every chapter top to bottom as learners get it, stubs unfilled
    (nbval), and notebooks/conftest.py fails that run when a learner check reports a pass or no
    "not done", when a solution's own check does not pass, or when the learner checks, run again
    after the last cell, do not all say "not done". A chapter that follows the convention passes;
    the three ways a solution can stand in for the learner each fail."""
    good = tmp_path / "good"
    good.mkdir()
    nbformat.write(chapter(), good / "ch.ipynb")
    result = _nbval(good)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "learner checks, run again after the last cell" in _nbval_items(good)

    def broken(name, edit):
        folder = tmp_path / name
        folder.mkdir()
        nb = chapter()
        edit(nb)
        nbformat.write(nb, folder / "ch.ipynb")
        return _nbval(folder)

    def solution_takes_the_learners_name(nb):
        nb.cells[5].source = nb.cells[5].source.replace("solution_double", "my_double")

    def later_cell_rebinds_it(nb):
        nb.cells.append(new_code_cell("def my_double(x):\n    return 2 * x"))

    def solution_that_fails(nb):
        nb.cells[5].source = nb.cells[5].source.replace("return 2 * x", "return 3 * x")

    for name, edit, says in [("rebound", solution_takes_the_learners_name, "stands in for the learner"),
                             ("late", later_cell_rebinds_it, "stands in for the learner"),
                             ("failing", solution_that_fails, "AssertionError")]:
        result = broken(name, edit)
        assert result.returncode != 0 and says in result.stdout, (name, result.stdout[-3000:])


def _nbval_items(folder: Path) -> str:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                           "--nbval-current-env", "--collect-only", str(folder)], cwd=folder,
                          capture_output=True, text=True, timeout=120).stdout
