"""Files the repository ships under data/: the manifest matches them, and an installed kvlab
(no checkout, as on Colab) downloads and verifies them, here from a file:// copy."""

import json
import shutil

import pytest
import torch

import kvlab
from kvlab import data as kdata


def test_manifest_lists_exactly_the_shipped_files_with_their_hashes():
    root = kdata.checkout_root()
    assert root is not None  # the tests run from a checkout
    manifest = json.loads(kdata.REPO_MANIFEST.read_text())
    on_disk = {p.relative_to(root).as_posix(): p for folder in kdata.SHIPPED_DIRS
               for p in (root / folder).iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix != ".md"}
    fix = "regenerate it: python -c 'import kvlab.data as d; d.write_repo_manifest()'"
    assert sorted(manifest) == sorted(on_disk), f"kvlab/repo_files.json lists other files than data/ holds; {fix}"
    for rel, path in on_disk.items():
        body = path.read_bytes()
        assert manifest[rel] == {"sha256": kdata.sha256_bytes(body), "bytes": len(body)}, f"{rel} changed; {fix}"


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """kvlab as if pip-installed: no checkout, an empty home, the repository served from file://."""
    served = tmp_path / "served"
    root = kdata.checkout_root()
    for folder in kdata.SHIPPED_DIRS:
        shutil.copytree(root / folder, served / folder)
    monkeypatch.setattr(kdata, "checkout_root", lambda: None)
    monkeypatch.setattr(kdata, "REPO_RAW_URL", served.as_uri())
    home = tmp_path / "home"
    monkeypatch.setattr(kdata.pathlib.Path, "home", classmethod(lambda cls: home))
    return served, home, root


def test_installed_kvlab_downloads_and_verifies(installed):
    served, home, root = installed
    record = kvlab.bench.load_recorded("cpu_fp32_vs_hf")
    assert record == json.loads((root / "data/bench/cpu_fp32_vs_hf.json").read_text())
    assert (home / ".cache/kvlab/repo/data/bench/cpu_fp32_vs_hf.json").is_file()
    model, tok = kvlab.load_shakespeare()
    assert (home / ".cache/kvlab/repo/data/shakespeare/model.safetensors").is_file()
    reference, _ = kvlab.load_shakespeare(root / "data/shakespeare")
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    (served / "data/bench/cpu_fp32_vs_hf.json").unlink()  # a second call reads the verified copy
    assert kvlab.bench.load_recorded("cpu_fp32_vs_hf") == record


def test_installed_kvlab_rejects_a_changed_file_and_keeps_nothing(installed):
    served, home, _ = installed
    target = served / "data/bench/cpu_fp32_vs_hf.json"
    target.write_text(target.read_text().replace("float32", "float64", 1))
    with pytest.raises(ValueError, match="does not match kvlab's manifest"):
        kvlab.bench.load_recorded("cpu_fp32_vs_hf")
    cached = home / ".cache/kvlab/repo/data/bench"
    assert not cached.exists() or not any(cached.iterdir())  # no file, no partial download


def test_unknown_files_and_names():
    with pytest.raises(FileNotFoundError, match="no recorded benchmark"):
        kvlab.bench.load_recorded("cpu_nothing")
    with pytest.raises(ValueError, match="name"):
        kvlab.bench.load_recorded("../secrets")


def test_installed_kvlab_refuses_files_outside_the_manifest(installed):
    with pytest.raises(FileNotFoundError, match="not a file the course repository ships"):
        kdata.repo_file("data/shakespeare/other.bin")
