"""Data: the Tiny Shakespeare corpus (found, downloaded, verified) and the files the course ships.

Tiny Shakespeare (1,115,394 bytes, Karpathy's char-rnn corpus) is found, in order, at an
explicit path, at ``$KVLAB_SHAKESPEARE``, in the cache directory, or downloaded there once.
Every copy is checked against a fixed sha256 before use, so a truncated or edited file is
an error, never a silently different experiment.

The rest of the data code lives in two modules beside this one, and every name is importable
from `kvlab.data` as well:
    kvlab.data.batches      the train/validation split and training batches (chapters 1, 6)
    kvlab.data.seq2seq_toy  chapter 8's toy task: vocabulary, (source, target) pairs, batches
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
import urllib.error
import urllib.request
from typing import Union

from .batches import get_batch, train_val_split
from .seq2seq_toy import SEQ2SEQ_TASKS, Seq2SeqVocab, pad_sequences, seq2seq_batch, toy_pairs

PathLike = Union[str, os.PathLike]

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_NUM_BYTES = 1_115_394
SHAKESPEARE_ENV_VAR = "KVLAB_SHAKESPEARE"
SHAKESPEARE_FILENAME = "input.txt"
DOWNLOAD_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------- verification


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``. Built in chapter 1."""
    return hashlib.sha256(data).hexdigest()


def _check_shakespeare_bytes(data: bytes, source: str) -> None:
    # The constants are read at call time (not bound as defaults) so tests can
    # monkeypatch them to verify small synthetic files.
    actual = sha256_bytes(data)
    if actual != SHAKESPEARE_SHA256 or len(data) != SHAKESPEARE_NUM_BYTES:
        raise ValueError(
            f"{source} is not the expected Tiny Shakespeare file: "
            f"expected sha256 {SHAKESPEARE_SHA256} and {SHAKESPEARE_NUM_BYTES:,} bytes, "
            f"got sha256 {actual} and {len(data):,} bytes. The file is truncated, edited or "
            "a different text; delete it or point to a good copy "
            f"(explicit path, ${SHAKESPEARE_ENV_VAR}, or let kvlab download it)."
        )


def verify_shakespeare(path: PathLike) -> pathlib.Path:
    """Check that ``path`` holds exactly Tiny Shakespeare (sha256 and size) and return it
    as a ``Path``; raise ``FileNotFoundError`` or a ``ValueError`` naming the path, the
    expected and the actual sha256 and size. Cheap: the file is 1 MB. Built in chapter 1."""
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no Tiny Shakespeare file at {path}")
    _check_shakespeare_bytes(path.read_bytes(), str(path))
    return path


# --------------------------------------------------------------------------- locating the file


def default_cache_dir() -> pathlib.Path:
    """Where a downloaded copy is kept: ``data/tinyshakespeare`` in the course repository
    when kvlab runs from a checkout (``checkout_root``), otherwise
    ``~/.cache/kvlab/tinyshakespeare``. Built in chapter 1."""
    repo = checkout_root()
    if repo is not None:
        return repo / "data" / "tinyshakespeare"
    return pathlib.Path.home() / ".cache" / "kvlab" / "tinyshakespeare"


def _write_atomically(dest: pathlib.Path, data: bytes) -> pathlib.Path:
    """Write `data` to a temporary file beside `dest`, then move it into place with os.replace:
    readers see the old file or the whole new one, and a failure leaves nothing behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp_name, dest)
    except BaseException:
        pathlib.Path(tmp_name).unlink(missing_ok=True)
        raise
    return dest


def download_shakespeare(
    dest: PathLike, *, url: str | None = None, timeout: float = DOWNLOAD_TIMEOUT_S
) -> pathlib.Path:
    """Download Tiny Shakespeare to ``dest`` and verify it before it lands: the bytes are
    checked in memory, written to a temporary file beside ``dest`` and moved into place with
    ``os.replace``, so a failed or corrupt download never leaves a file behind. Built in
    chapter 1."""
    url = SHAKESPEARE_URL if url is None else url
    dest = pathlib.Path(dest).expanduser()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except urllib.error.URLError as e:
        raise OSError(
            f"could not download Tiny Shakespeare from {url}: {e.reason}. If you are offline, "
            f"fetch the file elsewhere and pass path= or set ${SHAKESPEARE_ENV_VAR}"
        ) from e
    _check_shakespeare_bytes(data, f"the download from {url}")
    return _write_atomically(dest, data)


def shakespeare_path(
    path: PathLike | None = None,
    *,
    download: bool = True,
    cache_dir: PathLike | None = None,
) -> pathlib.Path:
    """Return the path of a verified Tiny Shakespeare file. Looks at ``path`` if given,
    else ``$KVLAB_SHAKESPEARE``, else ``<cache_dir>/input.txt`` (``default_cache_dir()``
    unless given), else downloads it there when ``download`` is true. An explicit path or
    environment variable that is missing is an error, not a reason to look elsewhere.
    Built in chapter 1."""
    if path is not None:
        return verify_shakespeare(path)
    env = os.environ.get(SHAKESPEARE_ENV_VAR)
    if env:
        if not pathlib.Path(env).expanduser().is_file():
            raise FileNotFoundError(
                f"${SHAKESPEARE_ENV_VAR} is set to {env!r}, but no file is there; "
                "fix or unset it"
            )
        return verify_shakespeare(env)
    cache = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cached = cache / SHAKESPEARE_FILENAME
    if cached.is_file():
        return verify_shakespeare(cached)
    if not download:
        raise FileNotFoundError(
            f"Tiny Shakespeare is not at {cached} and download=False; pass path=, set "
            f"${SHAKESPEARE_ENV_VAR}, or allow the download from {SHAKESPEARE_URL}"
        )
    return download_shakespeare(cached)


# --------------------------------------------------------------------------- files the course ships
#
# The trained Shakespeare model (data/shakespeare) and chapter 5's benchmark records
# (data/bench) are committed once, under the repository's data/. The package build copies
# them into the installed package as kvlab/_data/ (pyproject.toml: package-dir and
# package-data), so a kvlab installed from git (as on Colab) has them without any download.

SHIPPED_DIRS = ("data/shakespeare", "data/bench", "data/shakespeare_draft", "data/shakespeare_bpe",
                "data/cache_family")  # what an installed kvlab carries, as kvlab/_data/...
PACKAGE_DATA = pathlib.Path(__file__).resolve().parents[1] / "_data"  # data/ inside an installed kvlab


def checkout_root() -> pathlib.Path | None:
    """The course repository kvlab runs from, or None for an installed copy (e.g. on Colab):
    an installed kvlab lives in site-packages, beside no `_toc.yml` and no `data/`."""
    repo = pathlib.Path(__file__).resolve().parents[2]  # kvlab/data/__init__.py -> the repository
    return repo if (repo / "_toc.yml").is_file() and (repo / "data").is_dir() else None


def repo_file(relpath: str) -> pathlib.Path:
    """A file the course ships under `data/` (the Shakespeare model, benchmark records), by its
    path in the repository, e.g. ``"data/bench/cpu_fp32_vs_hf.json"``.

    From a checkout, the file in `data/`; from an installed kvlab (``pip install`` from git, as
    on Colab), the copy the install put in the package (`kvlab/_data/`). Nothing is downloaded.
    Raises ``ValueError`` for a path outside `SHIPPED_DIRS` and ``FileNotFoundError`` naming
    the file when it is not there. Built in chapter 5.
    """
    if not isinstance(relpath, str):
        raise TypeError(f"relpath must be a str such as 'data/bench/cpu_fp32_vs_hf.json', got {relpath!r}")
    parts = pathlib.PurePosixPath(relpath).parts
    if len(parts) < 3 or ".." in parts or "/".join(parts[:2]) not in SHIPPED_DIRS:
        raise ValueError(f"relpath must name a file under {' or '.join(SHIPPED_DIRS)}, got {relpath!r}")
    root = checkout_root()
    path = root / relpath if root is not None else PACKAGE_DATA.joinpath(*parts[1:])
    if not path.is_file():
        where = "in the checkout" if root is not None else "in the installed kvlab package"
        raise FileNotFoundError(f"{relpath} is not a file the course ships: no {path} ({where})")
    return path


def load_shakespeare_text(
    path: PathLike | None = None,
    *,
    download: bool = True,
    cache_dir: PathLike | None = None,
) -> str:
    """The whole of Tiny Shakespeare as one string (about 1.1 million characters), found and
    verified by ``shakespeare_path``. Built in chapter 1; trained on in chapter 6."""
    return shakespeare_path(path, download=download, cache_dir=cache_dir).read_text(
        encoding="utf-8"
    )


__all__ = [
    "SHAKESPEARE_NUM_BYTES",
    "SHAKESPEARE_SHA256",
    "SHAKESPEARE_URL",
    "SEQ2SEQ_TASKS",
    "Seq2SeqVocab",
    "default_cache_dir",
    "download_shakespeare",
    "get_batch",
    "repo_file",
    "load_shakespeare_text",
    "pad_sequences",
    "seq2seq_batch",
    "sha256_bytes",
    "shakespeare_path",
    "toy_pairs",
    "train_val_split",
    "verify_shakespeare",
]
