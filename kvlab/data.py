"""Data: fetching and verifying Tiny Shakespeare, splitting it, and cutting training batches.

Shape legend: B = batch size, T = block size (context length in tokens).

Tiny Shakespeare (1,115,394 bytes, Karpathy's char-rnn corpus) is found, in order, at an
explicit path, at ``$KVLAB_SHAKESPEARE``, in the cache directory, or downloaded there once.
Every copy is checked against a fixed sha256 before use, so a truncated or edited file is
an error, never a silently different experiment.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
import urllib.error
import urllib.request
from typing import Any, TypeVar, Union

import torch

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

SHIPPED_DIRS = ("data/shakespeare", "data/bench", "data/shakespeare_draft", "data/shakespeare_bpe")  # what an installed kvlab carries, as kvlab/_data/...
PACKAGE_DATA = pathlib.Path(__file__).resolve().parent / "_data"  # data/ inside an installed kvlab


def checkout_root() -> pathlib.Path | None:
    """The course repository kvlab runs from, or None for an installed copy (e.g. on Colab):
    an installed kvlab lives in site-packages, beside no `_toc.yml` and no `data/`."""
    repo = pathlib.Path(__file__).resolve().parent.parent
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


# --------------------------------------------------------------------------- splits and batches

_Seq = TypeVar("_Seq", str, list, tuple, torch.Tensor)


def train_val_split(data: _Seq, val_fraction: float = 0.1) -> tuple[_Seq, _Seq]:
    """Split a str, list, tuple or 1-D tensor into ``(train, val)`` without shuffling: the
    last ``val_fraction`` is validation, as is customary for a single long text (shuffled
    windows would leak neighbouring text into validation). Deterministic. Built in
    chapter 1; used in chapter 6."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
        raise TypeError(f"val_fraction must be a float in (0, 1), got {val_fraction!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if isinstance(data, torch.Tensor):
        if data.dim() != 1:
            raise ValueError(f"data must be 1-D when it is a tensor, got shape {tuple(data.shape)}")
    elif not isinstance(data, (str, list, tuple)):
        raise TypeError(
            f"data must be a str, list, tuple or 1-D torch.Tensor, got {type(data).__name__}"
        )
    n = len(data)
    n_train = int(n * (1.0 - val_fraction))
    if n_train == 0 or n_train == n:
        raise ValueError(
            f"data of length {n} is too short to split with val_fraction={val_fraction}: "
            "one side would be empty"
        )
    return data[:n_train], data[n_train:]


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")


def get_batch(
    data: torch.Tensor,
    batch_size: int,
    block_size: int,
    *,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``batch_size`` random windows of ``block_size`` tokens from the 1-D token
    tensor ``data``: inputs ``x`` (B, T) and targets ``y`` (B, T), where ``y`` is ``x``
    shifted one token left (each position predicts the next token). Offsets come from a
    CPU ``generator``, so a seed gives the same batches on CPU, CUDA or MPS. Both are int64
    on ``device``. Built in chapter 1; used for training in chapter 6."""
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"data must be a 1-D torch.Tensor of token ids, got {type(data).__name__}")
    if data.dim() != 1:
        raise ValueError(f"data must be 1-D, got shape {tuple(data.shape)}")
    if data.is_floating_point() or data.is_complex() or data.dtype == torch.bool:
        raise TypeError(f"data must hold integer token ids, got dtype {data.dtype}")
    _check_positive_int(batch_size, "batch_size")
    _check_positive_int(block_size, "block_size")
    if len(data) <= block_size:
        raise ValueError(
            f"data must be longer than block_size: len(data)={len(data)}, "
            f"block_size={block_size} (a window needs block_size + 1 tokens)"
        )
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU torch.Generator (for batches that match across "
            f"devices), got one on {generator.device}"
        )

    n_windows = len(data) - block_size  # start offsets whose window + 1 target fit
    starts = torch.randint(n_windows, (batch_size,), generator=generator)  # (B,)
    # unfold views every (T+1)-long window without copying; indexing gathers B of them
    windows = data.unfold(0, block_size + 1, 1)[starts.to(data.device)]  # (B, T+1)
    windows = windows.to(device=device, dtype=torch.long)
    # contiguous so callers can .view(-1) the targets for cross-entropy
    x = windows[:, :-1].contiguous()  # (B, T)
    y = windows[:, 1:].contiguous()  # (B, T)
    return x, y


# --------------------------------------------------------------------------- seq2seq toy data
#
# Chapter 8 trains an encoder-decoder on a task small enough to learn in about a minute on a
# CPU: reverse (or sort) a string of digits. A source is its symbols followed by EOS; the
# decoder reads BOS + target and must predict target + EOS (teacher forcing). Batches are
# right-padded with PAD, which the model masks out, so a sequence's outputs do not depend on
# how long its batch-mates are.

SEQ2SEQ_TASKS = ("reverse", "sort")


class Seq2SeqVocab:
    """A tiny shared vocabulary for toy seq2seq tasks: PAD=0, BOS=1, EOS=2, then one id per
    symbol (``"0123456789"`` by default, so digit d is id d + 3). ``encode`` maps a string
    to ids, ``decode`` maps ids back, stopping at the first EOS and skipping PAD and BOS.
    Built in chapter 8."""

    PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"

    def __init__(self, symbols: str = "0123456789"):
        if not isinstance(symbols, str) or not symbols:
            raise TypeError(f"symbols must be a non-empty str, got {symbols!r}")
        if len(set(symbols)) != len(symbols):
            raise ValueError(f"symbols must be distinct characters, got {symbols!r}")
        self.symbols = symbols
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.itos = [self.PAD, self.BOS, self.EOS, *symbols]
        self._stoi = {ch: i + 3 for i, ch in enumerate(symbols)}

    def __len__(self) -> int:
        return len(self.itos)

    def __repr__(self) -> str:
        return f"Seq2SeqVocab(symbols={self.symbols!r}, size={len(self)})"

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        unknown = sorted(set(text) - set(self._stoi))
        if unknown:
            raise ValueError(f"text has characters outside the vocabulary {self.symbols!r}: {unknown}")
        return [self._stoi[ch] for ch in text]

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            if i >= 3:
                out.append(self.itos[i])
        return "".join(out)


def toy_pairs(
    n: int,
    *,
    task: str = "reverse",
    min_len: int = 4,
    max_len: int = 10,
    seed: int = 0,
    symbols: str = "0123456789",
    exclude: set[str] | frozenset[str] | None = None,
) -> list[tuple[str, str]]:
    """``n`` distinct (source, target) string pairs for a toy task: ``"reverse"`` (``"3141"``
    -> ``"1413"``) or ``"sort"`` (``"3141"`` -> ``"1134"``). Lengths are uniform in
    [min_len, max_len]; sources in ``exclude`` are skipped, which keeps a held-out set out of
    the training data. The same arguments always give the same list. Built in chapter 8."""
    _check_positive_int(n, "n")
    _check_positive_int(min_len, "min_len")
    _check_positive_int(max_len, "max_len")
    if task not in SEQ2SEQ_TASKS:
        raise ValueError(f"task must be one of {SEQ2SEQ_TASKS}, got {task!r}")
    if min_len > max_len:
        raise ValueError(f"min_len={min_len} must be <= max_len={max_len}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not isinstance(symbols, str) or len(symbols) < 2:
        raise ValueError(f"symbols must be a str of at least 2 characters, got {symbols!r}")
    exclude = frozenset() if exclude is None else exclude
    available = sum(len(symbols) ** L for L in range(min_len, max_len + 1)) - len(exclude)
    if n > available // 2:  # rejection sampling would crawl (or never finish) past this
        raise ValueError(f"n={n} is too many distinct pairs for lengths {min_len}..{max_len}; "
                         "lengthen the strings or ask for fewer")
    g = torch.Generator().manual_seed(seed)
    seen: set[str] = set()
    pairs = []
    while len(pairs) < n:
        length = int(torch.randint(min_len, max_len + 1, (), generator=g))
        idx = torch.randint(len(symbols), (length,), generator=g).tolist()
        src = "".join(symbols[i] for i in idx)
        if src in seen or src in exclude:
            continue
        seen.add(src)
        tgt = src[::-1] if task == "reverse" else "".join(sorted(src))
        pairs.append((src, tgt))
    return pairs


def pad_sequences(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """Right-pad lists of ids to the longest one: (B, max length) int64. Built in chapter 8."""
    if not seqs:
        raise ValueError("seqs must hold at least one sequence")
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def seq2seq_batch(
    pairs: list[tuple[str, str]], vocab: Seq2SeqVocab, *, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tensors for teacher-forced training on (source, target) string pairs:

    ``src``     (B, S)  source ids + EOS, right-padded with PAD
    ``tgt_in``  (B, T)  BOS + target ids, what the decoder reads
    ``tgt_out`` (B, T)  target ids + EOS, what it must predict (PAD where there is nothing)

    ``tgt_out[:, t]`` is the token after ``tgt_in[:, t]``; a loss with ``ignore_index=PAD``
    skips the padding. Built in chapter 8."""
    if not isinstance(vocab, Seq2SeqVocab):
        raise TypeError(f"vocab must be a Seq2SeqVocab, got {type(vocab).__name__}")
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise ValueError("pairs must be a non-empty list of (source, target) strings")
    srcs, ins, outs = [], [], []
    for src, tgt in pairs:
        if not src:
            raise ValueError("every source must hold at least one symbol, got an empty string")
        s, t = vocab.encode(src), vocab.encode(tgt)
        srcs.append(s + [vocab.eos_id])
        ins.append([vocab.bos_id] + t)
        outs.append(t + [vocab.eos_id])
    return tuple(pad_sequences(x, vocab.pad_id).to(device) for x in (srcs, ins, outs))  # type: ignore[return-value]


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
