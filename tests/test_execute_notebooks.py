"""scripts/execute_notebooks.py: what `make book` runs before Jupyter Book, so that the book shows
freshly executed outputs read from a jupyter-cache."""

import importlib
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def script(monkeypatch):
    # Imported by name from scripts/, so that its worker processes can import it too.
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    return importlib.import_module("execute_notebooks")


def write_notebook(path: Path, sources: list[str], alone: bool = False) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if alone:
        nb.metadata["kvlab"] = {"execute_alone": True}
    nbformat.write(nb, path)
    return path


@pytest.fixture
def kernel_env(monkeypatch):
    # The kernels must find this Python's ipykernel.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{__import__('os').environ.get('PATH', '')}")


def test_outputs_are_cached_where_jupyter_book_looks_them_up(tmp_path, kernel_env, script):
    from jupyter_cache import get_cache

    first = write_notebook(tmp_path / "a.ipynb", ["import os\nprint('threads', os.environ['OMP_NUM_THREADS'])"])
    second = write_notebook(tmp_path / "b.ipynb", ["print(6 * 7)"], alone=True)
    cache_dir = tmp_path / "cache"
    (cache_dir).mkdir()
    (cache_dir / "stale").write_text("an earlier build")  # emptied first
    assert script.main(["--jobs", "2", "--cache", str(cache_dir), str(first), str(second)]) == 0
    assert not (cache_dir / "stale").exists()
    cache = get_cache(str(cache_dir))
    outputs = {}
    for path in (first, second):
        # Jupyter Book matches the notebook as read from disk (no outputs) against the cache.
        _, merged = cache.merge_match_into_notebook(nbformat.read(path, as_version=4))
        outputs[path.name] = merged.cells[0].outputs[0]["text"]
    assert outputs["b.ipynb"] == "42\n"
    assert outputs["a.ipynb"].startswith("threads ")


def test_a_failing_notebook_is_reported_and_not_cached(tmp_path, kernel_env, capsys, script):
    from jupyter_cache import get_cache

    good = write_notebook(tmp_path / "good.ipynb", ["x = 1"])
    bad = write_notebook(tmp_path / "bad.ipynb", ["raise RuntimeError('broken chapter')"])
    cache_dir = tmp_path / "cache"
    assert script.main(["--jobs", "1", "--cache", str(cache_dir), str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "FAILED bad.ipynb" in out and "broken chapter" in out
    cache = get_cache(str(cache_dir))
    assert cache.match_cache_notebook(nbformat.read(good, as_version=4)) is not None
    with pytest.raises(KeyError):
        cache.match_cache_notebook(nbformat.read(bad, as_version=4))


def test_bad_arguments_are_refused(tmp_path, script):
    with pytest.raises(SystemExit):
        script.main([str(tmp_path / "missing.ipynb")])
    with pytest.raises(SystemExit):
        script.main(["--jobs", "0", str(write_notebook(tmp_path / "a.ipynb", ["1"]))])
