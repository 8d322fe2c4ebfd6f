"""Checks for chapter 1's exercises: BPE encoding with learned merges, decoding a stream of
tokens without splitting a character, losses per character, and the domain experiment.

Each check compares the learner's function with a small reference (the plain-Python BPE steps
below, Python's incremental UTF-8 decoder, a formula) on fixed cases first and random ones
after, so the first failure points at the simplest thing that is wrong. The experiment's check
measures the answer live, on the reader's machine. Random
inputs come from private generators: a check never moves the notebook's random state. Built in
chapter 1.
"""

from __future__ import annotations

import codecs
import math
import numbers
import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._common import call_learner, learner_check, passed, require_answer

__all__ = [
    "check_bpe_encode",
    "check_stream_decode",
    "check_nats_per_char",
    "check_domain_ratio",
    "other_text",
]


def _run(fn: Callable, *args: Any, name: str, where: str, hint: str = "", without=None) -> Any:
    """Call the learner's function; an exception it raises becomes a failed check with a hint
    (a stub's NotImplementedError becomes ExerciseNotDone, as everywhere). `without`: see call_learner."""
    try:
        return call_learner(fn, *args, name=name, without=without)
    except AssertionError:
        raise
    except Exception as err:  # the learner's bug, reported as a failed check
        raise AssertionError(f"{where}: your function raised {type(err).__name__}: {err}. {hint}".rstrip()) from err


def _int_list(value: Any, what: str, where: str) -> list[int]:
    """`value` as a list of Python ints (a list, tuple or 1-D tensor is fine)."""
    if isinstance(value, (str, bytes)) or value is None:
        raise AssertionError(f"{where}: {what} should be a list of int ids, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.is_floating_point():
            raise AssertionError(f"{where}: {what} should be a 1-D list of int ids, got a tensor "
                                 f"of shape {tuple(value.shape)} and dtype {value.dtype}")
        value = value.tolist()
    try:
        out = list(value)
    except TypeError:
        raise AssertionError(f"{where}: {what} should be a list of int ids, got {type(value).__name__}") from None
    for i in out:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise AssertionError(f"{where}: {what} should hold ints, found {i!r} ({type(i).__name__})")
    return [int(i) for i in out]


def _show(ids: Sequence[int], limit: int = 12) -> str:
    ids = list(ids)
    return str(ids) if len(ids) <= limit else f"[{', '.join(map(str, ids[:limit]))}, ...] ({len(ids)} ids)"


# --------------------------------------------------------------------------- BPE training steps


def _pair_counts(ids: Sequence[int]) -> Counter:
    return Counter(zip(ids, ids[1:]))  # every adjacent position, overlaps included


def _most_frequent_pair(ids: Sequence[int]) -> tuple[int, int]:
    counts = _pair_counts(ids)
    return max(counts, key=counts.__getitem__)  # ties: Counter keeps first-seen order


def _merge(ids: Sequence[int], pair: tuple[int, int], new_id: int) -> list[int]:
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


# --------------------------------------------------------------------------- BPE encoding


def _train_merges(text: str, n_merges: int) -> dict[tuple[int, int], int]:
    """Reference byte-level BPE training on one string (no pre-splitting)."""
    ids = list(text.encode("utf-8"))
    merges: dict[tuple[int, int], int] = {}
    for k in range(n_merges):
        if len(ids) < 2:
            break
        pair = _most_frequent_pair(ids)
        merges[pair] = 256 + k
        ids = _merge(ids, pair, 256 + k)
    return merges


def _apply_merges(ids: list[int], merges: dict[tuple[int, int], int]) -> list[int]:
    for pair, new_id in sorted(merges.items(), key=lambda item: item[1]):  # learned order
        ids = _merge(ids, pair, new_id)
    return ids


def _encode(text: str, merges: dict[tuple[int, int], int]) -> list[int]:
    return _apply_merges(list(text.encode("utf-8")), merges)


_BPE_TRAIN_TEXT = (
    "the theme of the thesis: there the thin thief thought then, then thanked them. "
    "aaaaaa abab abab ab. naïve café, naïve café! 🙂🙂 🙂"
)
_BPE_TEXTS = [
    "the thief",
    "then the theme, there!",
    "aaaaaaa",
    "abababab ab",
    "xyz",  # no merge applies
    "",
    "naïve café 🙂",
    "Ünïcödé ✓ — and new words: thermometer",
    _BPE_TRAIN_TEXT,
]


@learner_check
def check_bpe_encode(fn: Callable) -> None:
    """`fn(text, merges) -> list[int]`: the UTF-8 bytes of `text`, then every merge applied in
    the order it was learned (lowest new id first), whatever order the dict holds them in."""
    rng = random.Random(4)
    full = _train_merges(_BPE_TRAIN_TEXT, 40)
    cases = [({p: i for p, i in full.items() if i < 256 + 6}, t) for t in _BPE_TEXTS[:3]]
    cases += [(full, t) for t in _BPE_TEXTS]
    items = list(full.items())
    rng.shuffle(items)
    shuffled = dict(items)  # same merges, stored out of order
    cases += [(shuffled, t) for t in _BPE_TEXTS]
    for merges, text in cases:
        order = "in learned order" if list(merges.values()) == sorted(merges.values()) else "stored out of order"
        where = f"my_bpe_encode({text[:24]!r}{'...' if len(text) > 24 else ''}, {len(merges)} merges {order})"
        got = _int_list(_run(fn, text, dict(merges), name="my_bpe_encode", where=where,
                             without=("BPE encoder", [_encode, _apply_merges, _merge])), "the result", where)
        expected = _encode(text, merges)
        if got == expected:
            continue
        byte_ids = list(text.encode("utf-8"))
        if not text.isascii() and got == _apply_merges([ord(c) for c in text], merges):
            raise AssertionError(f"{where}: your ids match a start from the characters' code points. "
                                 "Byte-level BPE starts from the UTF-8 bytes of the text (ids 0-255).")
        if got == byte_ids:
            raise AssertionError(f"{where}: you returned the raw bytes; now apply the merges.")
        if order == "stored out of order":
            hint = (" The merges must be applied in the order they were learned, which is the order of "
                    "their new ids, not the order the dict happens to store them in.")
        elif any(i >= 256 + len(merges) or i < 0 for i in got):
            hint = " Some ids are neither bytes nor new ids from merges."
        else:
            hint = (" Apply each merge to the whole sequence (all its occurrences) before the next "
                    "merge: a later merge can build on an earlier one's new id.")
        raise AssertionError(f"{where}: got {_show(got)}, expected {_show(expected)}.{hint}")
    passed("my_bpe_encode")


# --------------------------------------------------------------------------- streaming decode


_STREAM_CASES = [
    [b"To", b" be", b",", b" or"],  # ASCII: every token is whole characters
    [b"\xf0", b"\x9f", b"\x99", b"\x82"],  # one emoji, one byte per token
    [b"caf\xc3", b"\xa9 ", b"ok"],  # a token ends inside a character, the next completes it
    [b"\xe6\xb7", b"\xb1\xf0\x9f", b"\xa6\x9c!"],  # incomplete characters at both ends of a token
    [b"na\xc3\xafve", b"", b" \xe2\x80", b"\x94", b" \xe2\x9c\x93"],  # an empty piece, then a dash
    [b"\xc3", b"\xa9", b"\xc3", b"\xa9"],  # two characters, each split in half
]


def _stream_reference(pieces: Sequence[bytes]) -> list[str]:
    """What can be shown after each token: every character whose last byte has arrived."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    return [decoder.decode(piece) for piece in pieces]


@learner_check
def check_stream_decode(fn: Callable) -> None:
    """`fn(pieces) -> list[str]`: one string per token, each character shown as soon as its last
    byte has arrived and never before; joined, the strings are the whole decoded text."""
    rng = random.Random(11)
    cases = [list(c) for c in _STREAM_CASES]
    text = "naïve café 🙂 深 — ✓ to be, or not"
    for _ in range(4):  # the same text cut at random byte positions
        raw = text.encode("utf-8")
        cuts = sorted(rng.sample(range(1, len(raw)), 9))
        cases.append([raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)])])
    for pieces in cases:
        where = f"my_stream_decode({pieces})"
        got = _run(fn, list(pieces), name="my_stream_decode", where=where)
        expected = _stream_reference(pieces)
        if isinstance(got, (str, bytes)) or not isinstance(got, (list, tuple)):
            raise AssertionError(f"{where}: return a list with one string per token, got {type(got).__name__}")
        if len(got) != len(pieces):
            raise AssertionError(f"{where}: got {len(got)} strings for {len(pieces)} tokens; return one string "
                                 "per token (an empty string when nothing can be shown yet)")
        if any(not isinstance(s, str) for s in got):
            raise AssertionError(f"{where}: every item should be a str, got {[type(s).__name__ for s in got]}")
        if list(got) == expected:
            continue
        whole = b"".join(pieces).decode("utf-8")
        if any("\ufffd" in s for s in got):
            hint = ("you showed the replacement character �: a token can end in the middle of a multi-byte "
                    "character, and those bytes are not text yet. Hold them back until the rest arrives.")
        elif "".join(got) != whole:
            hint = (f"joined, your strings give {''.join(got)!r}, but the whole text is {whole!r}: no byte may "
                    "be dropped or shown twice.")
        else:
            hint = ("the joined text is right but a character is shown too late: show each character with "
                    "the token that brings its last byte.")
        raise AssertionError(f"{where}: got {list(got)}, expected {expected}: {hint}")
    passed("my_stream_decode")


# --------------------------------------------------------------------------- nats per character


@learner_check
def check_nats_per_char(fn: Callable) -> None:
    """`fn(nats_per_token, n_tokens, n_chars) -> float`: the same total loss spread over the
    characters instead of the tokens."""
    cases = [(1.5, 100, 100), (3.3, 1000, 2257), (2.0, 50, 200), (4.0, 371, 1115), (0.0, 10, 30)]
    for nats_per_token, n_tokens, n_chars in cases:
        where = f"my_nats_per_char({nats_per_token}, n_tokens={n_tokens}, n_chars={n_chars})"
        got = _run(fn, nats_per_token, n_tokens, n_chars, name="my_nats_per_char", where=where)
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, bool) or not isinstance(got, numbers.Real):
            raise AssertionError(f"{where}: return a number, got {type(got).__name__}")
        expected = nats_per_token * n_tokens / n_chars
        if math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9):
            continue
        if n_tokens != n_chars and math.isclose(got, nats_per_token * n_chars / n_tokens, rel_tol=1e-6):
            hint = ("you scaled the wrong way: a tokenizer that packs more characters into each token spreads "
                    "each token's loss over more characters, so the loss per character is smaller.")
        elif math.isclose(got, expected / math.log(2), rel_tol=1e-6) or math.isclose(
                got, nats_per_token / math.log(2), rel_tol=1e-6):
            hint = "that is in bits; keep the natural logarithm's unit, nats."
        else:
            hint = "the total loss of the text is the same whichever unit you divide it by: count it first."
        raise AssertionError(f"{where}: got {got:.4g}, expected a different value: {hint}")
    passed("my_nats_per_char")


# --------------------------------------------------------------------------- experiment: another domain


OTHER_TEXT_MODULES = ("attention", "cache", "gpt", "sampling", "train")


def other_text() -> str:
    """Modern technical English for the domain experiment: the docstrings of five kvlab modules."""
    import importlib

    return "\n\n".join(importlib.import_module(f"kvlab.{name}").__doc__ for name in OTHER_TEXT_MODULES)


def _token_ratio(bpe, gpt2, text: str) -> float:
    return len(bpe.encode(text)) / len(gpt2.encode(text))


@learner_check
def check_domain_ratio(answer: Any) -> None:
    """`answer`: how many times as many tokens the 1,024-token Shakespeare BPE needs as GPT-2's
    tokenizer for `other_text()`, measured here, on this machine, within 0.02."""
    answer = require_answer(answer, "my_token_ratio")
    if isinstance(answer, torch.Tensor) and answer.numel() == 1:
        answer = answer.item()
    if isinstance(answer, bool) or not isinstance(answer, numbers.Real):
        raise AssertionError(f"my_token_ratio should be a number (a ratio of token counts), got {type(answer).__name__}")
    from ...data import load_shakespeare_text, train_val_split
    from ...tokenizers import BPETokenizer, GPT2Tokenizer

    train_text, val_text = train_val_split(load_shakespeare_text())
    bpe = BPETokenizer.train(train_text, vocab_size=1024)
    gpt2 = GPT2Tokenizer()
    text = other_text()
    expected = _token_ratio(bpe, gpt2, text)
    if abs(answer - expected) <= 0.02:
        passed("my_token_ratio")
        return
    shakespeare = _token_ratio(bpe, gpt2, val_text)
    if abs(answer - shakespeare) <= 0.02:
        hint = "that is the ratio on Shakespeare's validation text; measure it on other_text."
    elif abs(answer - 1 / expected) <= 0.02:
        hint = "that ratio is upside down: divide our BPE's token count by GPT-2's."
    elif abs(answer - len(text) / len(bpe.encode(text))) <= 0.02 or abs(
            answer - len(text) / len(gpt2.encode(text))) <= 0.02:
        hint = "that is characters per token for one tokenizer; the answer compares the two token counts."
    else:
        hint = ("encode other_text with the chapter's 1,024-token BPE (trained on the training split) and with "
                "GPT-2's tokenizer, and divide the first count by the second.")
    raise AssertionError(f"my_token_ratio = {answer:.3g} is not what this machine measures: {hint}")
