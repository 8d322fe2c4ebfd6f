"""The exercise convention, the student edition and the bulk grader: on a small synthetic
chapter, and on every real chapter run top to bottom as a learner would run it."""

import ast
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from kvlab.checks import is_not_done_line
from kvlab.student import (build_student_edition, execute_notebook, exercises_in, grade_executed, grade_notebook,
                           is_solution_cell, student_notebook)

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))

CHECKS_CELL = '''\
from kvlab.checks import learner_check, passed
from kvlab.checks._common import call_learner


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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_chapter_run_top_to_bottom_leaves_every_exercise_to_the_learner(path, tmp_path):
    """The chapter exactly as learners open it, run top to bottom with every stub unfilled: each
    learner check prints "not done" (never a pass), each solution's own check passes, and at the
    end every learner name still holds the learner's stub (the checks, run again, say "not done")."""
    nb = nbformat.read(path, as_version=4)
    check_sources = [c.source for c in nb.cells if c.cell_type == "code" and "exercise-check" in _tags(c)]
    audit = tagged("\n".join(check_sources), "exercise-check")
    nb.cells.append(new_markdown_cell("```{exercise} audit\n:label: ex-audit\n```"))
    nb.cells.append(audit)
    nbformat.write(nb, tmp_path / path.name)
    executed = execute_notebook(tmp_path / path.name, cwd=path.parent)
    errors = [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(executed.cells)
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"cells that raised: {errors}"
    grade = grade_executed(executed, path.name)
    wrong = {label: r for label, r in grade.results.items() if not r.startswith("fail: not done")}
    assert not wrong, f"learner checks that did not say 'not done': {wrong}"
    audit_lines = [line for line in _stream(executed.cells[-1]).splitlines() if is_not_done_line(line)]
    n_checks = sum(s.count("checks.check_") for s in check_sources)
    assert len(audit_lines) >= len(check_sources) and n_checks, "run again at the end, every check says 'not done'"
    for cell in executed.cells:
        if cell.cell_type == "code" and "solution" in _tags(cell):
            assert "all checks passed" in _stream(cell), f"a solution's own check did not pass:\n{cell.source[:300]}"


def _stream(cell) -> str:
    return "".join("".join(o.get("text", "")) for o in cell.get("outputs", []) if o.get("output_type") == "stream")
