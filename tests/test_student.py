"""The student edition and the bulk grader, on a small synthetic chapter and on the real ones."""

from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from kvlab.student import build_student_edition, exercises_in, grade_notebook, is_solution_cell, student_notebook

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def tagged(source, *tags):
    cell = new_code_cell(source)
    cell.metadata["tags"] = list(tags)
    return cell


def exercise(label, name, solution, check):
    return [
        new_markdown_cell(f"```{{exercise}} {name}\n:label: {label}\n\nWrite `{name}`.\n```"),
        tagged(f"def {name}(x):\n    raise NotImplementedError  # your code here", "exercise-stub"),
        new_markdown_cell(f"```{{solution-start}} {label}\n:class: dropdown\n```"),
        tagged(f"def {name}(x):\n    {solution}", "solution"),
        new_markdown_cell("```{solution-end}\n```"),
        tagged(check, "exercise-check"),
    ]


def chapter():
    nb = new_notebook()
    nb.cells = [new_markdown_cell("# A chapter"), new_code_cell("y = 21")]
    nb.cells += exercise("ex-double", "double", "return 2 * x", "assert double(y) == 42")
    nb.cells += exercise("ex-square", "square", "return x * x", "assert square(3) == 9")
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


def test_grading_passes_solutions_and_fails_stubs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    nbformat.write(chapter(), src / "ch.ipynb")
    (student,) = build_student_edition(src, tmp_path / "student")
    solved = grade_notebook(src / "ch.ipynb")
    assert solved.results == {"ex-double": "pass", "ex-square": "pass"}
    unsolved = grade_notebook(student)
    assert all(r.startswith("fail: NotImplementedError") for r in unsolved.results.values()), unsolved.results


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_chapter_student_edition_fails_at_every_check(path, tmp_path):
    """Solutions removed, each chapter runs up to its checks and every check fails there."""
    (student,) = build_student_edition(path, tmp_path)
    nb = nbformat.read(student, as_version=4)
    assert len(exercises_in(nb)) >= 3, "every chapter needs at least three checked exercises"
    grade = grade_notebook(student, cwd=path.parent)
    failures = {label: r for label, r in grade.results.items() if not r.startswith("fail")}
    assert not failures, f"checks that did not fail on the stubs: {failures}"
