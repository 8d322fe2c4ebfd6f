"""Tests for kvlab.data: finding and verifying Tiny Shakespeare, splits and batches.

Most tests use a small synthetic "corpus" and monkeypatch the expected sha256/size, so they
run anywhere with no network. Tests of the real file read it from $KVLAB_SHAKESPEARE and
skip when it is not set.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import urllib.error
import urllib.request

import pytest
import torch

import kvlab.data as data
from kvlab.data import (
    SHAKESPEARE_NUM_BYTES,
    SHAKESPEARE_SHA256,
    default_cache_dir,
    download_shakespeare,
    get_batch,
    load_shakespeare_text,
    shakespeare_path,
    train_val_split,
    verify_shakespeare,
)

_real_urlopen = urllib.request.urlopen  # saved before any test patches it

FAKE_TEXT = "First Citizen:\nBefore we proceed, hear me speak.\nÆ ünïcode 🙂\n" * 20
FAKE_BYTES = FAKE_TEXT.encode("utf-8")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> pathlib.Path:
    """A small file standing in for Tiny Shakespeare: the expected hash/size point at it,
    $KVLAB_SHAKESPEARE is cleared, and any attempt to reach the network fails the test."""
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", hashlib.sha256(FAKE_BYTES).hexdigest())
    monkeypatch.setattr(data, "SHAKESPEARE_NUM_BYTES", len(FAKE_BYTES))
    monkeypatch.delenv("KVLAB_SHAKESPEARE", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("unexpected download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    path = tmp_path / "good" / "input.txt"
    path.parent.mkdir()
    path.write_bytes(FAKE_BYTES)
    return path


class _FakeResponse(io.BytesIO):
    """What urlopen returns, enough for `with urlopen(...) as r: r.read()`."""


def _serve(monkeypatch: pytest.MonkeyPatch, payload: bytes) -> list[str]:
    calls: list[str] = []

    def fake_urlopen(url, timeout=None):
        assert timeout is not None and timeout > 0  # never hang forever
        calls.append(url)
        return _FakeResponse(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return calls


# --------------------------------------------------------------------------- verification


def test_constants() -> None:
    assert SHAKESPEARE_NUM_BYTES == 1_115_394
    assert len(SHAKESPEARE_SHA256) == 64
    assert data.SHAKESPEARE_URL.endswith("tinyshakespeare/input.txt")


def test_explicit_path_accepted(fake: pathlib.Path) -> None:
    assert shakespeare_path(fake) == fake
    assert shakespeare_path(str(fake)) == fake
    assert load_shakespeare_text(fake) == FAKE_TEXT


def test_truncated_file_rejected_with_details(fake: pathlib.Path, tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "truncated.txt"
    bad.write_bytes(FAKE_BYTES[:-10])
    with pytest.raises(ValueError) as info:
        shakespeare_path(bad)
    msg = str(info.value)
    assert str(bad) in msg
    assert data.SHAKESPEARE_SHA256 in msg  # expected
    assert hashlib.sha256(FAKE_BYTES[:-10]).hexdigest() in msg  # actual
    assert f"{len(FAKE_BYTES):,} bytes" in msg and f"{len(FAKE_BYTES) - 10:,} bytes" in msg


def test_corrupted_same_size_file_rejected(fake: pathlib.Path, tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "corrupt.txt"
    bad.write_bytes(FAKE_BYTES.replace(b"Citizen", b"Citizem", 1))
    with pytest.raises(ValueError, match="not the expected Tiny Shakespeare"):
        verify_shakespeare(bad)
    with pytest.raises(ValueError, match="not the expected"):
        load_shakespeare_text(bad)


def test_missing_explicit_path(fake: pathlib.Path, tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match="no Tiny Shakespeare file"):
        shakespeare_path(tmp_path / "nope.txt")


# --------------------------------------------------------------------------- resolution order


def test_env_var_honoured(fake: pathlib.Path, monkeypatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("KVLAB_SHAKESPEARE", str(fake))
    # an empty cache dir and no network: only the env var can satisfy this
    assert shakespeare_path(cache_dir=tmp_path / "empty") == fake


def test_explicit_path_beats_env_var(fake: pathlib.Path, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("KVLAB_SHAKESPEARE", str(tmp_path / "does-not-exist.txt"))
    assert shakespeare_path(fake) == fake


def test_env_var_missing_or_bad(fake: pathlib.Path, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("KVLAB_SHAKESPEARE", str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="KVLAB_SHAKESPEARE"):
        shakespeare_path(cache_dir=tmp_path / "empty")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"not shakespeare")
    monkeypatch.setenv("KVLAB_SHAKESPEARE", str(bad))
    with pytest.raises(ValueError, match="bad.txt"):
        shakespeare_path(cache_dir=tmp_path / "empty")


def test_cached_copy_used_without_download(fake: pathlib.Path) -> None:
    # `fake` lives at <dir>/input.txt, exactly where a cache dir keeps it
    assert shakespeare_path(cache_dir=fake.parent) == fake


def test_bad_cached_copy_is_an_error(fake: pathlib.Path, tmp_path: pathlib.Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "input.txt").write_bytes(FAKE_BYTES[:100])
    with pytest.raises(ValueError, match="truncated, edited"):
        shakespeare_path(cache_dir=cache)


def test_no_download_when_disabled(fake: pathlib.Path, tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match="download=False"):
        shakespeare_path(cache_dir=tmp_path / "empty", download=False)


def test_default_cache_dir_in_checkout() -> None:
    repo = pathlib.Path(data.__file__).resolve().parents[2]  # kvlab/data/__init__.py -> the repository
    expected = (
        repo / "data" / "tinyshakespeare"
        if (repo / "_toc.yml").is_file() or (repo / "pyproject.toml").is_file()
        else pathlib.Path.home() / ".cache" / "kvlab" / "tinyshakespeare"
    )
    assert default_cache_dir() == expected


# --------------------------------------------------------------------------- downloading


def test_download_from_file_url(fake: pathlib.Path, monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", _real_urlopen)
    monkeypatch.setattr(data, "SHAKESPEARE_URL", fake.as_uri())
    cache = tmp_path / "cache"
    got = shakespeare_path(cache_dir=cache)
    assert got == cache / "input.txt"
    assert got.read_bytes() == FAKE_BYTES
    assert sorted(p.name for p in cache.iterdir()) == ["input.txt"]  # no temp files left
    # the second call finds the cached copy
    monkeypatch.setattr(data, "SHAKESPEARE_URL", (tmp_path / "gone.txt").as_uri())
    assert shakespeare_path(cache_dir=cache) == got


def test_download_with_fake_urlopen_good(fake: pathlib.Path, monkeypatch, tmp_path) -> None:
    calls = _serve(monkeypatch, FAKE_BYTES)
    cache = tmp_path / "deep" / "cache"  # created on demand
    assert load_shakespeare_text(cache_dir=cache) == FAKE_TEXT
    assert calls == [data.SHAKESPEARE_URL]


def test_corrupt_download_leaves_nothing(fake: pathlib.Path, monkeypatch, tmp_path) -> None:
    _serve(monkeypatch, FAKE_BYTES[: len(FAKE_BYTES) // 2])
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(ValueError) as info:
        shakespeare_path(cache_dir=cache)
    assert "the download from" in str(info.value)
    assert data.SHAKESPEARE_SHA256 in str(info.value)
    assert list(cache.iterdir()) == []


def test_download_failure_is_explained(fake: pathlib.Path, monkeypatch, tmp_path) -> None:
    def offline(url, timeout=None):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(OSError, match="KVLAB_SHAKESPEARE"):
        shakespeare_path(cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "input.txt").exists()


def test_download_shakespeare_explicit_url(fake: pathlib.Path, monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", _real_urlopen)
    dest = tmp_path / "x" / "copy.txt"
    assert download_shakespeare(dest, url=fake.as_uri()) == dest
    assert dest.read_bytes() == FAKE_BYTES



# --------------------------------------------------------------------------- the real file


@pytest.fixture
def real_path() -> pathlib.Path:
    env = os.environ.get("KVLAB_SHAKESPEARE")
    if not env:
        pytest.skip("set KVLAB_SHAKESPEARE to a local Tiny Shakespeare input.txt to run this")
    return pathlib.Path(env)


def test_real_file_verifies(real_path: pathlib.Path) -> None:
    assert shakespeare_path() == real_path
    text = load_shakespeare_text()
    assert len(real_path.read_bytes()) == SHAKESPEARE_NUM_BYTES
    assert len(text) == 1_115_394  # pure ASCII: one char per byte
    assert text.startswith("First Citizen:\nBefore we proceed any further, hear me speak.")
    train, val = train_val_split(text)
    assert (len(train), len(val)) == (1_003_854, 111_540)


# --------------------------------------------------------------------------- splits


def test_split_str_list_tensor() -> None:
    s = "abcdefghij" * 10  # length 100
    train, val = train_val_split(s)
    assert (train, val) == (s[:90], s[90:])
    lst = list(range(100))
    assert train_val_split(lst, 0.25) == (lst[:75], lst[75:])
    t = torch.arange(100)
    tt, tv = train_val_split(t, val_fraction=0.2)
    assert torch.equal(tt, t[:80]) and torch.equal(tv, t[80:])
    assert torch.equal(torch.cat([tt, tv]), t)


def test_split_is_deterministic() -> None:
    s = "".join(chr(97 + (i * 7) % 26) for i in range(1000))
    assert train_val_split(s) == train_val_split(s)
    assert train_val_split(s)[1] == s[-100:]


@pytest.mark.parametrize("bad", [0, 1, 0.0, 1.0, -0.1, 1.5, float("nan")])
def test_split_bad_fraction_value(bad: float) -> None:
    with pytest.raises(ValueError, match=r"val_fraction must be a number in \(0, 1\)"):
        train_val_split("abcdefghij", bad)


@pytest.mark.parametrize("bad", [True, "0.1", None])
def test_split_bad_fraction_type(bad) -> None:
    with pytest.raises(TypeError, match="val_fraction"):
        train_val_split("abcdefghij", bad)


def test_split_bad_data() -> None:
    with pytest.raises(ValueError, match="1-D"):
        train_val_split(torch.zeros(4, 4))
    with pytest.raises(TypeError, match="str, list, tuple or 1-D torch.Tensor"):
        train_val_split({1, 2, 3})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="too short"):
        train_val_split("a", 0.5)
    with pytest.raises(ValueError, match="too short"):
        train_val_split([1, 2], 0.9)  # the train side would be empty
    assert train_val_split("ab", 0.5) == ("a", "b")


# --------------------------------------------------------------------------- batches


def test_get_batch_shapes_and_shift() -> None:
    tokens = torch.arange(1000)
    x, y = get_batch(tokens, 8, 16, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.long
    assert x.is_contiguous() and y.is_contiguous()
    # data is arange, so every row is consecutive and y is x moved one token on
    assert torch.equal(y, x + 1)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x - x[:, :1], torch.arange(16).expand(8, 16))
    assert int(y.max()) <= 999


def test_get_batch_matches_data_windows() -> None:
    tokens = torch.randint(0, 50, (300,), generator=torch.Generator().manual_seed(1))
    x, y = get_batch(tokens, 4, 10, generator=torch.Generator().manual_seed(2))
    starts = torch.randint(300 - 10, (4,), generator=torch.Generator().manual_seed(2))
    for b, s in enumerate(starts.tolist()):
        assert torch.equal(x[b], tokens[s : s + 10])
        assert torch.equal(y[b], tokens[s + 1 : s + 11])


def test_get_batch_reproducible() -> None:
    tokens = torch.arange(5000)
    g1, g2 = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(1234)
    a = [get_batch(tokens, 4, 32, generator=g1) for _ in range(3)]
    b = [get_batch(tokens, 4, 32, generator=g2) for _ in range(3)]
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][0], a[1][0])  # the generator advances between calls
    xc, _ = get_batch(tokens, 4, 32, generator=torch.Generator().manual_seed(99))
    assert not torch.equal(xc, a[0][0])


def test_get_batch_edge_and_dtypes() -> None:
    # exactly block_size + 1 tokens: the one possible window
    tokens = torch.tensor([5, 6, 7, 8], dtype=torch.uint8)
    x, y = get_batch(tokens, 3, 3, generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.long
    assert x.tolist() == [[5, 6, 7]] * 3 and y.tolist() == [[6, 7, 8]] * 3
    x, _ = get_batch(torch.arange(10, dtype=torch.int32), 2, 4, generator=torch.Generator(),
                     device=torch.device("cpu"))
    assert x.device.type == "cpu" and x.dtype == torch.long


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_get_batch_same_on_cuda() -> None:
    tokens = torch.arange(2000)
    cpu = get_batch(tokens, 4, 8, generator=torch.Generator().manual_seed(3))
    gpu = get_batch(tokens.cuda(), 4, 8, generator=torch.Generator().manual_seed(3), device="cuda")
    assert gpu[0].device.type == "cuda"
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        get_batch(tokens, 4, 8, generator=torch.Generator(device="cuda"))


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        ({"batch_size": 0}, ValueError, "batch_size must be a positive int"),
        ({"batch_size": -2}, ValueError, "batch_size must be a positive int"),
        ({"batch_size": 2.0}, TypeError, "batch_size must be a positive int"),
        ({"batch_size": True}, TypeError, "batch_size must be a positive int"),
        ({"block_size": 0}, ValueError, "block_size must be a positive int"),
        ({"block_size": "8"}, TypeError, "block_size must be a positive int"),
        ({"block_size": 100}, ValueError, "longer than block_size"),
        ({"block_size": 150}, ValueError, "longer than block_size"),
        ({"data": torch.zeros(100)}, TypeError, "integer token ids"),
        ({"data": torch.zeros(10, 10, dtype=torch.long)}, ValueError, "1-D"),
        ({"data": list(range(100))}, TypeError, "torch.Tensor"),
        ({"generator": None}, TypeError, "generator must be a torch.Generator"),
    ],
)
def test_get_batch_bad_arguments(kwargs: dict, exc: type, pattern: str) -> None:
    args = {
        "data": torch.arange(100),
        "batch_size": 2,
        "block_size": 8,
        "generator": torch.Generator().manual_seed(0),
    }
    args.update(kwargs)
    generator = args.pop("generator")
    with pytest.raises(exc, match=pattern):
        get_batch(**args, generator=generator)
