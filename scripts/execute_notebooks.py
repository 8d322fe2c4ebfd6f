"""Execute the chapters for the book, several at a time, into a fresh jupyter-cache.

`make book` runs this before `jupyter-book build`. Jupyter Book executes notebooks one after
another; on a machine with two or more cores, running them side by side halves the build.
Each notebook runs top to bottom in its own kernel exactly as Jupyter Book would run it (the
same jupyter-cache call, in the notebook's folder, with the timeout of `_config.yml`), and
its outputs go into a jupyter-cache that this script first empties. The book is then built
with `execute_notebooks: cache`: Jupyter Book finds every notebook in that cache and shows
its outputs. Because the cache is emptied every time, no page can show outputs from an older
kvlab or an older notebook.

With J notebooks running at once on N cores, each kernel gets N // J math threads (at least
one), so kernels do not spin-wait on each other. A notebook whose metadata has
`"kvlab": {"execute_alone": true}` (a chapter that times things, whose numbers would suffer
from a neighbour) runs after the others, alone, with every thread.

    python scripts/execute_notebooks.py [--jobs J] [--cache DIR] notebooks/*.ipynb

A notebook that fails is reported with its traceback and the exit status is 1; nothing of it
is cached.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _execute(path: str, threads: int, timeout: int) -> tuple[str, str | None, str | None, float]:
    """In a worker process: run one notebook; returns (path, executed notebook JSON or None, error, seconds)."""
    import nbformat
    from jupyter_cache.executors.utils import single_nb_execution

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    nb = nbformat.read(path, as_version=4)
    result = single_nb_execution(nb, cwd=str(Path(path).parent), timeout=timeout, allow_errors=False,
                                 meta_override=True)
    if result.err is not None:
        return path, None, result.exc_string or repr(result.err), result.time
    return path, nbformat.writes(nb), None, result.time


def _timeout_from_config() -> int:
    import yaml

    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    return int(config.get("execute", {}).get("timeout", 300))


def _alone(path: str) -> bool:
    import nbformat

    return bool(nbformat.read(path, as_version=4).metadata.get("kvlab", {}).get("execute_alone", False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", help="the .ipynb files to execute")
    parser.add_argument("--jobs", type=int, default=None,
                        help="notebooks at once (default: the number of CPU cores, at most 4)")
    parser.add_argument("--cache", default=str(ROOT / "_build" / ".jupyter_cache"),
                        help="the jupyter-cache folder, emptied first (default _build/.jupyter_cache, as in _config.yml)")
    args = parser.parse_args(argv)
    paths = [str(Path(p).resolve()) for p in args.notebooks]
    missing = [p for p in paths if not Path(p).is_file() or not p.endswith(".ipynb")]
    if missing:
        parser.error(f"notebooks must be existing .ipynb files; not: {', '.join(missing)}")
    cores = os.cpu_count() or 1
    jobs = args.jobs if args.jobs is not None else min(cores, 4)
    if jobs < 1:
        parser.error(f"--jobs must be >= 1, got {jobs}")
    timeout = _timeout_from_config()

    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn
    import nbformat

    shutil.rmtree(args.cache, ignore_errors=True)
    cache = get_cache(args.cache)
    alone = [p for p in paths if _alone(p)]
    together = [p for p in paths if p not in alone]
    failures = 0
    start = time.perf_counter()

    def collect(done):
        nonlocal failures
        path, text, error, seconds = done.result()
        name = Path(path).name
        if error is not None:
            failures += 1
            print(f"FAILED {name} after {seconds:.0f} s:\n{error}", flush=True)
            return
        cache.cache_notebook_bundle(CacheBundleIn(nbformat.reads(text, as_version=4), path,
                                                  data={"execution_seconds": seconds}),
                                    check_validity=False, overwrite=True)
        print(f"executed {name} in {seconds:.0f} s", flush=True)

    context = multiprocessing.get_context("spawn")
    for group, workers in ((together, min(jobs, max(len(together), 1))), (alone, 1)):
        if not group:
            continue
        threads = max(1, cores // workers)
        print(f"executing {len(group)} notebook(s), {workers} at a time, {threads} thread(s) each", flush=True)
        with futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            pending = [pool.submit(_execute, p, threads, timeout) for p in group]
            for done in futures.as_completed(pending):
                collect(done)
    print(f"{len(paths) - failures} of {len(paths)} notebooks executed in {time.perf_counter() - start:.0f} s "
          f"(cache: {args.cache})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
