"""Run notebooks' code cells in order in plain Python, one process per notebook (no Jupyter).

For machines without nbval/ipykernel (scripts/gpu_check.sh falls back to it). IPython magics
(`%pip ...`) are skipped, figures go to the Agg backend, and if IPython is missing its display
helpers become no-ops. A cell that raises fails its notebook; the exit status counts failures.

    python scripts/run_notebook_cells.py notebooks/*.ipynb
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

RUNNER = r'''
import json, sys, time, types, traceback
import matplotlib
matplotlib.use("Agg")
try:
    import IPython.display  # noqa: F401
except ImportError:  # display helpers as no-ops, so cells that show HTML still run
    ipy = types.ModuleType("IPython"); disp = types.ModuleType("IPython.display")
    for name in ("display", "HTML", "Markdown", "Image", "SVG", "clear_output"):
        setattr(disp, name, lambda *a, **k: None)
    ipy.display = disp; sys.modules["IPython"] = ipy; sys.modules["IPython.display"] = disp
import matplotlib.pyplot as plt
plt.show = lambda *a, **k: plt.close("all")
cells = json.load(open(sys.argv[1]))["cells"]
namespace = {"__name__": "__main__", "display": sys.modules["IPython.display"].display}
for i, cell in enumerate(cells):
    if cell["cell_type"] != "code":
        continue
    source = "".join(cell["source"])
    lines = source.splitlines()
    for j, line in enumerate(lines):  # an IPython magic becomes `pass`, keeping its block valid
        if line.lstrip().startswith(("%", "!")):
            lines[j] = line[: len(line) - len(line.lstrip())] + "pass"
    source = "\n".join(lines)
    t0 = time.perf_counter()
    try:
        exec(compile(source, f"{sys.argv[1]} cell {i}", "exec"), namespace)
    except Exception:
        traceback.print_exc()
        print(f"FAILED cell {i}")
        sys.exit(1)
    print(f"cell {i:3d} ok {time.perf_counter() - t0:6.1f} s", flush=True)
'''


def _run(path: str, env: dict) -> tuple[str, bool, float, str]:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RUNNER, os.path.abspath(path)],
                          cwd=os.path.dirname(os.path.abspath(path)), env=env, capture_output=True, text=True)
    return path, done.returncode == 0, time.perf_counter() - t0, done.stdout[-3000:] + "\n" + done.stderr[-6000:]


def main(paths: list[str]) -> int:
    """Run the notebooks, NOTEBOOK_JOBS (default 1) at a time; return the number that failed."""
    from concurrent.futures import ThreadPoolExecutor

    env = {**os.environ, "MPLBACKEND": "Agg"}
    jobs = max(1, int(os.environ.get("NOTEBOOK_JOBS", "1")))
    failures = 0
    with ThreadPoolExecutor(jobs) as pool:
        for path, ok, seconds, log in pool.map(lambda p: _run(p, env), paths):
            failures += not ok
            print(f"{'PASS' if ok else 'FAIL'} {path} ({seconds:.0f} s)", flush=True)
            if not ok:
                print(log)
    return failures


if __name__ == "__main__":
    if len(sys.argv) < 2 or any(not p.endswith(".ipynb") for p in sys.argv[1:]):
        sys.exit("usage: python scripts/run_notebook_cells.py NOTEBOOK.ipynb ...")
    sys.exit(main(sys.argv[1:]))
