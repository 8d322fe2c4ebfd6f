"""The learner's view, checked while nbval runs every chapter top to bottom (`make test-notebooks`).

nbval runs each notebook exactly as learners get it, with every exercise stub left unfilled.
On top of "no cell raises", this plugin fails the run when:
- a learner's check cell (tag `exercise-check`) printed a pass, or did not print the "not done
  yet" line: a solution would then be standing in for the learner's answer;
- a solution cell (tag `solution`) did not print its own check's pass line;
- after the last cell, the learner checks, run once more in the same kernel, do not all say
  "not done": some cell rebound a learner's name on the way.
The exercise convention is described in book/instructors.md and kvlab/course/student.py.
"""

from __future__ import annotations

from collections import defaultdict

import nbformat
import pytest

from kvlab.course.checks import is_not_done_line

PASS_LINE = "all checks passed"
AUDIT_NAME = "learner checks, run again after the last cell"


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _stream_text(outputs) -> str:
    return "".join(o.get("text", "") for o in outputs or [] if o.get("output_type") == "stream")


def pytest_collection_modifyitems(session, config, items):
    """After each notebook's last cell, add one more cell: every learner check of the notebook."""
    try:
        from nbval.plugin import IPyNbCell
    except ImportError:  # not an nbval run
        return
    last_index: dict = {}
    for i, item in enumerate(items):
        if isinstance(item, IPyNbCell):
            last_index[item.parent] = i
    for parent, i in sorted(last_index.items(), key=lambda kv: kv[1], reverse=True):
        checks = [c.source for c in parent.nb.cells if c.cell_type == "code" and "exercise-check" in _tags(c)]
        if not checks:
            continue
        cell = nbformat.v4.new_code_cell("\n".join(checks), metadata={"tags": ["exercise-check"]})
        audit = IPyNbCell.from_parent(parent, name=AUDIT_NAME, cell_num=items[i].cell_num + 1, cell=cell,
                                      options=defaultdict(bool, check=False))
        items.insert(i + 1, audit)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    cell = getattr(item, "cell", None)
    if call.when != "call" or report.failed or cell is None or getattr(item, "test_outputs", None) is None:
        return
    tags, text = _tags(cell), _stream_text(item.test_outputs)
    problem = None
    if "exercise-check" in tags:
        if PASS_LINE in text:
            problem = "a learner check reported a pass with every stub unfilled: a solution stands in for the learner"
        elif not any(is_not_done_line(line) for line in text.splitlines()):
            problem = "a learner check did not report its exercise as not done"
    elif "solution" in tags and PASS_LINE not in text:
        problem = "a solution cell did not print its own check's pass line"
    if problem:
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid}: {problem}\n--- the cell printed ---\n{text[-3000:]}"
