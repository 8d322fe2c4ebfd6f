"""Colab, simulated: a fresh runtime installs kvlab with the chapters' first cell and runs them.

A virtual environment outside the checkout gets what a Colab runtime has before a chapter
runs (PyTorch and IPython). The first code cell of a chapter (the same in every chapter) then
runs under IPython with `google.colab` imported, as on Colab, so its `%pip install` installs
`kvlab[notebooks]` from git: from a clone of this repository's HEAD (git+file://), the only
change to the cell being the URL. Then, with the network closed (sockets refused, Hugging Face
offline, Tiny Shakespeare from a local verified copy), every chapter's setup cells run (its
code cells up to the one that imports kvlab), and the files the chapters read load from the
installed package: the shipped Shakespeare model, chapter 11's model family, every recorded benchmark,
the corpus.

It tests the committed HEAD, not uncommitted edits. PyTorch and IPython stand for the ones a
Colab runtime has preinstalled: those of the environment running the test, linked in, not
installed again. pip downloads the rest from the package index (transformers, ipywidgets,
matplotlib, ...), as on Colab. Most of the time is that pip install: on the 2-core AMD EPYC
the course is developed on, about 90 s of CPU in all; 6-7 minutes of wall time when the machine
was shared (load average 11), most of it waiting for the disk.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import kvlab.data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import set_repository  # noqa: E402  (scripts/set_repository.py: the URL and the install cell)

STEP_TIMEOUT_S = 900  # one pip install or one run of the cells; a hang fails instead of blocking CI

# Runs inside the fresh environment. `install CELL_FILE`: the cell under IPython with google.colab
# imported. `setup RESULT_FILE NOTEBOOK...`: each notebook's setup cells, network closed, then
# the shipped files; a summary goes to RESULT_FILE.
RUNNER = r'''
import json, socket, sys, types
from pathlib import Path

from IPython.core.interactiveshell import InteractiveShell

mode = sys.argv[1]
shell = InteractiveShell.instance()

def run(source, where):
    result = shell.run_cell(source, store_history=False)
    if not result.success:
        raise SystemExit(f"{where} failed: {result.error_in_exec or result.error_before_exec!r}")

if mode == "install":
    sys.modules["google.colab"] = types.ModuleType("google.colab")  # what the guard looks for
    run(Path(sys.argv[2]).read_text(), "the install cell")
    code = shell.user_ns.get("_exit_code")
    if code != 0:
        raise SystemExit(f"the install cell's pip exited with {code}")
    sys.exit(0)

def refused(*args, **kwargs):
    raise OSError("network access in the Colab simulation (only the package index is allowed, and only for pip)")

socket.socket.connect = socket.socket.connect_ex = refused
socket.create_connection = refused

summary = {"setup_cells": {}}
for name in sys.argv[3:]:
    nb = json.loads(Path(name).read_text(encoding="utf-8"))
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    shell.reset(new_session=False)
    ran = 0
    for cell in cells:
        source = "".join(cell["source"])
        run(source, f"{Path(name).name}, code cell {ran}")
        ran += 1
        if "import kvlab" in source or "from kvlab" in source:
            break
    else:
        raise SystemExit(f"{Path(name).name}: no code cell imports kvlab")
    summary["setup_cells"][Path(name).name] = ran

import torch
import kvlab, kvlab.bench, kvlab.data
summary["kvlab_file"] = kvlab.__file__
summary["checkout_root"] = str(kvlab.data.checkout_root())
model, tok = kvlab.load_shakespeare()
ids = torch.tensor([tok.encode("ROMEO:")])
out = kvlab.generate(model, ids, max_new_tokens=8, temperature=0)
summary["shakespeare_params"] = sum(p.numel() for p in model.parameters())
summary["shakespeare_sample"] = tok.decode(out[0].tolist())
summary["cache_family"] = {name: sum(p.numel() for p in kvlab.load_cache_family(name)[0].parameters())
                           for name in ("mha", "gqa", "mqa", "mla")}
summary["records"] = {}
for path in sorted((kvlab.data.PACKAGE_DATA / "bench").glob("*.json")):
    assert kvlab.bench.load_recorded(path.stem), path.stem
    summary["records"][path.stem] = kvlab.data.sha256_bytes(path.read_bytes())
summary["shipped"] = {p.relative_to(kvlab.data.PACKAGE_DATA).as_posix(): kvlab.data.sha256_bytes(p.read_bytes())
                      for p in sorted(kvlab.data.PACKAGE_DATA.rglob("*")) if p.is_file()}
summary["text_chars"] = len(kvlab.data.load_shakespeare_text())
import transformers, ipywidgets
summary["versions"] = {"transformers": transformers.__version__, "ipywidgets": ipywidgets.__version__}
Path(sys.argv[2]).write_text(json.dumps(summary))
'''


def _run(cmd: list, *, cwd: Path, env: dict, what: str) -> None:
    started = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=STEP_TIMEOUT_S)
    took = time.perf_counter() - started
    print(f"{what}: {took:.1f} s")
    if proc.returncode != 0:
        pytest.fail(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")


def _link_distributions(names: list[str], dest: Path) -> set[str]:
    """Symlink the installed distributions `names`, and every one they require, into `dest`:
    their packages, modules and .dist-info folders, so that Python and pip see them installed."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    dest.mkdir()
    found: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        found[name] = dist = metadata.distribution(name)
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    for dist in found.values():
        tops = {Path(str(f)).parts[0] for f in dist.files or []} - {"..", "__pycache__"}
        for top in tops:
            source = Path(str(dist.locate_file(top)))
            if source.exists() and not (dest / top).exists():
                (dest / top).symlink_to(source)
    return set(found)


def _clean_env(tmp: Path) -> dict:
    """The environment of a fresh runtime: nothing of this checkout or its virtual environment."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP"} and not k.startswith("JPY")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(Path(sys.prefix))))
    # PIP_NO_COMPILE: no .pyc for every installed file up front (transformers alone has
    # thousands); Python compiles what it imports.
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PIP_NO_COMPILE="1", MPLBACKEND="Agg",
               IPYTHONDIR=str(tmp / "ipython"), MPLCONFIGDIR=str(tmp / "mpl"))
    return env


def test_a_fresh_colab_runtime_runs_every_chapters_setup() -> None:
    # Its own temporary folder, not pytest's tmp_path: pytest removes old base folders when
    # another session starts, which can pull the environment away in the middle of a run.
    with tempfile.TemporaryDirectory(prefix="kvlab-colab-") as tmp:
        _simulate(Path(tmp))


def _simulate(tmp_path: Path) -> None:
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed: the simulation installs kvlab from a git clone of this repository")
    url = set_repository.repository_url(ROOT)
    cell = set_repository.install_cell(url)
    notebooks = set_repository.notebooks(ROOT)
    assert notebooks, "no notebooks"
    for path in notebooks:  # every chapter installs the same way, so running one cell runs them all
        first = "".join(set_repository.first_code_cell(json.loads(path.read_text(encoding="utf-8")))["source"])
        assert first == cell, (f"{path.name}: the first code cell is not the install cell for {url}; run "
                               f"`python scripts/set_repository.py {url}`. It is:\n{first}")

    work = tmp_path / "work"  # the runtime's working directory: no kvlab/ beside it
    work.mkdir()
    env = _clean_env(tmp_path)
    clone = tmp_path / "kvlab"
    _run([git, "clone", "--quiet", "--no-hardlinks", ROOT, clone], cwd=work, env=env, what="git clone")

    # A Colab runtime has pip, PyTorch and IPython before the chapter's first cell. PyTorch and
    # IPython (with what they require) are the ones this test runs with, linked in through a
    # .pth file rather than unpacked again (a 700 MB copy of torch would take most of the time).
    # pip goes into the venv itself, a current one as on Colab (the one `venv` bundles may be
    # too old to read a git+file:/// requirement).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=work, env=env, what="venv")
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, "pip>=24"], cwd=work, env=env,
         what="pip install pip")
    preinstalled = tmp_path / "preinstalled"
    linked = _link_distributions(["torch", "ipython"], preinstalled)
    Path(site, "colab_preinstalled.pth").write_text(f"{preinstalled}\n")
    print(f"preinstalled (linked): {len(linked)} distributions: {', '.join(sorted(linked))}")

    # The chapter's first cell, with the repository's URL replaced by the clone's.
    here = cell.replace(f"git+{url}", f"git+{clone.as_uri()}")
    assert here != cell and here.count("git+file://") == 1
    (work / "install_cell.py").write_text(here)
    (work / "runner.py").write_text(RUNNER)
    _run([python, work / "runner.py", "install", work / "install_cell.py"], cwd=work, env=env,
         what="the install cell (%pip install kvlab[notebooks] from git)")

    # Offline from here: the chapters' setup cells and the files they read.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               KVLAB_SHAKESPEARE=str(kvlab.data.shakespeare_path()))  # a verified local copy
    result = work / "result.json"
    chapters = [clone / "notebooks" / p.name for p in notebooks]
    _run([python, work / "runner.py", "setup", result, *chapters], cwd=work, env=env,
         what="every chapter's setup cells and the shipped files, offline")
    summary = json.loads(result.read_text())

    assert summary["kvlab_file"].startswith(str(venv)), f"kvlab imported from {summary['kvlab_file']}, not the install"
    assert summary["checkout_root"] == "None"
    assert sorted(summary["setup_cells"]) == [p.name for p in notebooks]
    assert all(n >= 2 for n in summary["setup_cells"].values()), summary["setup_cells"]
    # The installed package carries exactly the committed files under the shipped folders (data/shakespeare,
    # data/bench, ..., data/cache_family/NAME).
    committed = {}
    for folder in kvlab.data.SHIPPED_DIRS:
        for path in sorted((clone / folder).rglob("*")):
            if path.is_file() and path.suffix != ".md":
                committed[path.relative_to(clone / "data").as_posix()] = kvlab.data.sha256_bytes(path.read_bytes())
    assert summary["shipped"] == committed
    assert sorted(summary["records"]) == sorted(p.stem for p in (clone / "data/bench").glob("*.json"))
    assert summary["shakespeare_params"] > 1_000_000 and summary["shakespeare_sample"].startswith("ROMEO:")
    assert sorted(summary["cache_family"]) == ["gqa", "mha", "mla", "mqa"]
    assert all(800_000 < n < 803_000 for n in summary["cache_family"].values()), summary["cache_family"]
    assert summary["text_chars"] > 1_000_000
    print("installed:", summary["versions"], "sample:", repr(summary["shakespeare_sample"]))
