"""What ships with kvlab and where the course lives.

The files under data/shakespeare, data/bench and the other folders of kvlab.data.SHIPPED_DIRS (chapter
11's model family among them, one folder per member) go into the installed package as kvlab/_data
(pyproject.toml); an installed kvlab (as on Colab) reads them from there and never downloads
them. The repository URL is written once, in _config.yml; the notebooks' install cells and the
pages that write it out agree with it (scripts/set_repository.py writes them).
(tests/test_colab_install.py installs kvlab for real and checks the same from the outside.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

import kvlab
from kvlab import data as kdata
from kvlab.pretrained import load_shakespeare
from kvlab.train import evaluate_split
from kvlab.train.family import BOS_CHAR, CACHE_FAMILY, FAMILY_TRAIN, family_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import set_repository  # noqa: E402

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs Python 3.11+ or tomli")

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())


def shipped_on_disk() -> list[str]:
    """Paths, relative to data/, of the files the package must carry (in folders inside a shipped
    folder too, e.g. cache_family/mqa/)."""
    return sorted(p.relative_to(ROOT / "data").as_posix() for folder in kdata.SHIPPED_DIRS
                  for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix != ".md")


# --------------------------------------------------------------------------- package data


def test_package_data_covers_exactly_the_shipped_files():
    tool = PYPROJECT["tool"]["setuptools"]
    assert tool["package-dir"]["kvlab._data"] == "data"
    # Every folder holding shipped files is a data package of its own (kvlab._data.<folder>, or
    # kvlab._data.<folder>.<subfolder>), listed in packages.
    folders = {Path(folder).relative_to("data") for folder in kdata.SHIPPED_DIRS} | {
        Path(f).parent for f in shipped_on_disk()}
    data_packages = {"kvlab._data." + ".".join(folder.parts) for folder in folders}
    assert data_packages <= set(tool["packages"])
    assert set(tool["package-data"]) == data_packages
    matched = sorted({p.relative_to(ROOT / "data").as_posix()
                      for package, patterns in tool["package-data"].items() for pattern in patterns
                      for p in (ROOT / "data").joinpath(*package.split(".")[2:]).glob(pattern) if p.is_file()})
    assert matched == shipped_on_disk(), (
        "pyproject.toml's package-data must match every file in the shipped data folders except the "
        "READMEs (and nothing else, e.g. not data/tinyshakespeare)")


def test_license_is_an_spdx_string():
    # The TOML-table form is deprecated by setuptools (an error from 2027).
    assert PYPROJECT["project"]["license"] == "MIT"
    assert any(r.startswith("setuptools>=77") for r in PYPROJECT["build-system"]["requires"])


def test_building_the_package_prints_no_setuptools_warning(tmp_path):
    # What a reader's `pip install` prints: no deprecation, no data folder "absent from packages".
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    for warning in ("SetuptoolsDeprecationWarning", "is absent from the `packages` configuration"):
        assert warning not in log, warning
    wheel = zipfile.ZipFile(next(tmp_path.glob("kvlab-*.whl")))
    shipped = sorted(n.removeprefix("kvlab/_data/") for n in wheel.namelist() if n.startswith("kvlab/_data/"))
    assert shipped == shipped_on_disk()
    # The wheel alone, with no checkout beside it, loads chapter 11's family from its package data.
    site = tmp_path / "site"
    wheel.extractall(site)
    code = ("import kvlab, kvlab.data\n"
            "assert kvlab.data.checkout_root() is None and kvlab.__file__.startswith(%r), kvlab.__file__\n"
            "model, tok = kvlab.load_cache_family('mla')\n"
            "print(model.config.attention, tok.vocab_size, model.record['steps'])" % str(site))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["mla", "66", str(FAMILY_TRAIN["max_steps"])]


def test_every_package_under_kvlab_is_listed():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "kvlab").rglob("__init__.py")}
    missing = sorted(on_disk - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml, or they will not be installed"
    assert "kvlab._data" in listed


def test_notebooks_extra_has_what_the_chapters_import_beyond_kvlab():
    extras = PYPROJECT["project"]["optional-dependencies"]
    names = {re.split(r"[<>=!~\[ ;]", spec)[0] for spec in extras["notebooks"]}
    assert {"transformers", "ipywidgets"} <= names
    # Colab's preinstalled ipywidgets (7.x) must satisfy the extra: upgrading it breaks Colab's widgets.
    assert "ipywidgets>=7.7" in extras["notebooks"]
    assert {"nbformat", "nbclient", "ipykernel"} <= {re.split(r"[<>=]", s)[0] for s in extras["student"]}


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """kvlab as a wheel installs it: no checkout, data/ copied to the package's _data/, no network."""
    package_data = tmp_path / "_data"
    for folder in kdata.SHIPPED_DIRS:
        shutil.copytree(ROOT / folder, package_data / Path(folder).name, ignore=shutil.ignore_patterns("*.md"))
    monkeypatch.setattr(kdata, "checkout_root", lambda: None)
    monkeypatch.setattr(kdata, "PACKAGE_DATA", package_data)

    def no_network(*args, **kwargs):
        raise AssertionError("an installed kvlab tried to download a course file")

    monkeypatch.setattr(kdata.urllib.request, "urlopen", no_network)
    return package_data


def test_installed_kvlab_reads_the_package_data(installed):
    record = kvlab.bench.load_recorded("cpu_fp32_vs_hf")
    assert record == json.loads((ROOT / "data/bench/cpu_fp32_vs_hf.json").read_text())
    model, _ = kvlab.load_shakespeare()
    reference, _ = kvlab.load_shakespeare(ROOT / "data/shakespeare")
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    assert kdata.repo_file("data/shakespeare/config.json") == installed / "shakespeare/config.json"
    family, _ = kvlab.load_cache_family("mqa")
    for (name, a), b in zip(family.state_dict().items(), load_shakespeare(ROOT / "data/cache_family/mqa")[0]
                            .state_dict().values()):
        assert torch.equal(a, b), name
    assert kdata.repo_file("data/cache_family/mqa/config.json") == installed / "cache_family/mqa/config.json"


def test_installed_kvlab_names_a_missing_file(installed):
    (installed / "bench/cpu_fp32_vs_hf.json").unlink()
    with pytest.raises(FileNotFoundError, match="cpu_fp32_vs_hf.json.*installed kvlab package"):
        kdata.repo_file("data/bench/cpu_fp32_vs_hf.json")
    with pytest.raises(FileNotFoundError, match="no recorded benchmark"):
        kvlab.bench.load_recorded("cpu_fp32_vs_hf")


def test_checkout_reads_data_directly():
    assert kdata.checkout_root() == ROOT
    assert kdata.repo_file("data/bench/cpu_fp32_vs_hf.json") == ROOT / "data/bench/cpu_fp32_vs_hf.json"


@pytest.mark.parametrize("relpath", ["data/tinyshakespeare/input.txt", "data/bench/../../pyproject.toml",
                                     "kvlab/data.py", "data/bench", "/etc/passwd"])
def test_repo_file_refuses_paths_outside_the_shipped_folders(relpath):
    with pytest.raises(ValueError, match="relpath must name a file under data/shakespeare or data/bench"):
        kdata.repo_file(relpath)


def test_unknown_records():
    with pytest.raises(FileNotFoundError, match="no recorded benchmark"):
        kvlab.bench.load_recorded("cpu_nothing")
    with pytest.raises(ValueError, match="name"):
        kvlab.bench.load_recorded("../secrets")


# --------------------------------------------------------------------------- chapter 11's family

FAMILY = ROOT / "data/cache_family"


def test_the_family_ships_finished_in_float16_within_its_budget():
    from safetensors import safe_open

    record = json.loads((FAMILY / "record.json").read_text())
    assert record["smoke"] is False
    total = 0
    for member in CACHE_FAMILY:
        folder = FAMILY / member
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "record.json",
                                                            "tokenizer.json"]
        assert record["runs"][member]["steps"] == FAMILY_TRAIN["max_steps"]
        with safe_open(folder / "model.safetensors", "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, member
        total += sum(p.stat().st_size for p in folder.iterdir())
    assert total <= 8 * 2**20, f"the family takes {total / 2**20:.2f} MB; the budget is 8 MB"


@pytest.mark.parametrize("member", list(CACHE_FAMILY))
def test_load_cache_family_gives_the_member_as_defined(member):
    model, tok = kvlab.load_cache_family(member)
    assert model.config == family_config(member)
    assert not model.training and {p.dtype for p in model.parameters()} == {torch.float32}
    assert tok.vocab_size == 66 and tok.encode(BOS_CHAR) == [FAMILY_TRAIN["bos_id"]]
    assert model.record["run"] == member and model.record["steps"] == FAMILY_TRAIN["max_steps"]


@pytest.mark.parametrize("bad", ["mha-seed2", "MQA", "", None, 1])
def test_load_cache_family_refuses_an_unknown_member(bad):
    with pytest.raises(ValueError, match="member must be one of mha, gqa, mqa, mla"):
        kvlab.load_cache_family(bad)


@pytest.mark.skipif(not os.environ.get("KVLAB_SHAKESPEARE"),
                    reason="recomputing the validation loss reads Tiny Shakespeare from $KVLAB_SHAKESPEARE")
def test_a_members_recorded_validation_loss_is_reproduced():
    from kvlab.data import load_shakespeare_text, train_val_split

    model, tok = kvlab.load_cache_family("mqa")
    ids = torch.tensor(tok.encode(train_val_split(load_shakespeare_text())[1]))
    loss = evaluate_split(model, ids, 128, bos=FAMILY_TRAIN["bos_id"])
    assert loss == pytest.approx(model.record["val_nats_per_char"], abs=2e-3)


# --------------------------------------------------------------------------- the repository URL


def test_repository_url_is_written_once_in_config():
    url = set_repository.repository_url(ROOT)
    assert set_repository.URL_FORM.match(url), url
    assert CONFIG["repository"]["url"] == url  # `url: *repo_url`: the same anchor
    assert CONFIG["parse"]["myst_substitutions"]["repo_url"] == url


def test_every_install_cell_installs_from_the_configured_repository():
    url = set_repository.repository_url(ROOT)
    expected = set_repository.install_cell(url)
    assert f'"kvlab[notebooks] @ git+{url}"' in expected
    for path in set_repository.notebooks(ROOT):
        first = "".join(set_repository.first_code_cell(json.loads(path.read_text(encoding="utf-8")))["source"])
        assert first == expected, (f"{path.name}: its first code cell is not the install cell for {url}; "
                                   f"run `make set-repository URL={url}`")


def test_setup_page_shows_the_install_cell():
    url = set_repository.repository_url(ROOT)
    assert set_repository.install_cell(url) in (ROOT / "book" / "setup.md").read_text(encoding="utf-8")


def test_pages_name_no_other_course_repository():
    url = set_repository.repository_url(ROOT)
    for path in [*set_repository.text_files(ROOT), ROOT / "pyproject.toml", ROOT / "kvlab" / "data" / "__init__.py"]:
        # A GitHub URL of a repository named like the course, other than the course's own: a
        # stale copy (after the course moved) that set_repository.py did not reach.
        found = re.findall(r"https://github\.com/[\w.-]+/[\w.-]*kvlab[\w.-]*", path.read_text(encoding="utf-8"))
        stale = sorted({m.removesuffix(".git").rstrip(".") for m in found} - {url})
        assert not stale, f"{path.relative_to(ROOT)} names {stale}, not {url} (_config.yml)"


def test_set_repository_moves_every_copy(tmp_path):
    for name in ("_config.yml", "README.md", "notebooks", "book"):
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    new = "https://github.com/someone-else/kvlab-fork"
    changed = set_repository.set_repository(new, tmp_path)
    assert tmp_path / "_config.yml" in changed
    assert set_repository.repository_url(tmp_path) == new
    config = yaml.safe_load((tmp_path / "_config.yml").read_text())
    assert config["repository"]["url"] == new
    for path in set_repository.notebooks(tmp_path):
        nb = json.loads(path.read_text(encoding="utf-8"))
        assert "".join(set_repository.first_code_cell(nb)["source"]) == set_repository.install_cell(new)
        old = json.loads((ROOT / "notebooks" / path.name).read_text(encoding="utf-8"))
        first = nb["cells"].index(set_repository.first_code_cell(nb))
        assert len(nb["cells"]) == len(old["cells"])
        assert [c for i, c in enumerate(nb["cells"]) if i != first] == [c for i, c in enumerate(old["cells"]) if i != first]
    old_url = set_repository.repository_url(ROOT)
    for path in set_repository.text_files(tmp_path):
        assert not set_repository.literal_url(old_url).search(path.read_text(encoding="utf-8")), path
    with pytest.raises(SystemExit, match="https://github.com/ORG/REPO"):
        set_repository.set_repository("git@github.com:someone/kvlab.git", tmp_path)


def test_kvlab_downloads_no_course_file():
    """The only download left in kvlab is Tiny Shakespeare, from its public source."""
    for path in sorted((ROOT / "kvlab").rglob("*.py")):
        for url in re.findall(r"https://raw\.githubusercontent\.com/[^\s\"')]+", path.read_text(encoding="utf-8")):
            assert url == kdata.SHAKESPEARE_URL, f"{path.relative_to(ROOT)} downloads {url}: ship the file in data/ instead"
