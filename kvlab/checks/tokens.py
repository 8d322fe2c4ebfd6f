"""Checks for chapter 1's exercises: a character tokenizer, the two steps of BPE training, BPE
encoding with learned merges, and cutting training batches.

Each check compares the learner's function with a small reference (kvlab's `CharTokenizer`,
the plain-Python BPE steps below, or properties every correct batch has) on fixed cases first
and random ones after, so the first failure points at the simplest thing that is wrong. Random
inputs come from private generators: a check never moves the notebook's random state. Built in
chapter 1.
"""

from __future__ import annotations

import numbers
import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..tokenizers import CharTokenizer
from ._common import call_learner, passed, learner_check

__all__ = [
    "check_char_tokenizer",
    "check_most_frequent_pair",
    "check_merge",
    "check_bpe_encode",
    "check_get_batch",
]


def _run(fn: Callable, *args: Any, name: str, where: str, hint: str = "") -> Any:
    """Call the learner's function; an exception it raises becomes a failed check with a hint
    (a stub's NotImplementedError becomes ExerciseNotDone, as everywhere)."""
    try:
        return call_learner(fn, *args, name=name)
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


# --------------------------------------------------------------------------- characters

_CHAR_TEXTS = [
    "hello world",
    "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer",
    "zyxwvutsrqponmlkjihgfedcba",
    "aaaa",
    "Q",
    "naïve café — “quotes”, 🙂 and ✓\ttabs",
]


@learner_check
def check_char_tokenizer(fn: Callable) -> None:
    """`fn(text) -> (encode, decode)`: the ids must equal `kvlab.CharTokenizer.from_text(text)`'s
    (one id per distinct character, in sorted order) and `decode(encode(s)) == s`."""
    rng = random.Random(1)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ .,;:!?'\n-éß—🙂"
    texts = _CHAR_TEXTS + ["".join(rng.choice(alphabet) for _ in range(n)) for n in (40, 300)]
    for text in texts:
        where = f"my_char_tokenizer({text[:24]!r}{'...' if len(text) > 24 else ''})"
        result = _run(fn, text, name="my_char_tokenizer", where=where)
        if not (isinstance(result, tuple) and len(result) == 2 and all(callable(f) for f in result)):
            raise AssertionError(f"{where}: return a pair of functions (encode, decode), "
                                 f"got {type(result).__name__}")
        encode, decode = result
        ref = CharTokenizer.from_text(text)
        ids = _int_list(_run(encode, text, name="encode", where=f"{where}, encode"), "encode(text)", where)
        if len(ids) != len(text):
            raise AssertionError(f"{where}: encode(text) gave {len(ids)} ids for {len(text)} characters; "
                                 "a character tokenizer gives exactly one id per character.")
        n_chars = len(set(text))
        if ids and (min(ids) < 0 or max(ids) >= n_chars):
            raise AssertionError(f"{where}: the text has {n_chars} distinct characters, so the ids should "
                                 f"be 0 .. {n_chars - 1}; you returned ids from {min(ids)} to {max(ids)}.")
        back = _run(decode, ids, name="decode", where=f"{where}, decode")
        if back != text:
            raise AssertionError(f"{where}: decode(encode(text)) did not give the text back "
                                 f"(got {str(back)[:40]!r}). decode must invert encode exactly.")
        expected = ref.encode(text)
        if ids != expected:
            raise AssertionError(
                f"{where}: encode and decode invert each other, but your ids differ from kvlab's "
                f"(first ids {_show(ids, 8)} vs {_show(expected, 8)}). Number the characters in sorted "
                "order, so that the same text always gives the same ids on every machine.")
        # encode/decode must work on any text made of known characters, not only the whole text
        part = text[len(text) // 3:][::-1]
        if part:
            got = _int_list(_run(encode, part, name="encode", where=f"{where}, encode(part)"),
                            "encode(part)", where)
            if got != ref.encode(part):
                raise AssertionError(f"{where}: encoding a reversed slice of the text gave the wrong ids; "
                                     "each character's id must not depend on where it appears.")
            if _run(decode, got, name="decode", where=f"{where}, decode(part)") != part:
                raise AssertionError(f"{where}: decode failed on the ids of a slice of the text.")
    passed("my_char_tokenizer")


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


def _random_ids(rng: random.Random, n: int, n_symbols: int) -> list[int]:
    return [rng.randrange(n_symbols) for _ in range(n)]


_PAIR_CASES = [
    [5, 7],  # a single pair
    [1, 2, 3, 1, 2],  # (1, 2) twice
    [4, 4, 4, 4],  # (4, 4) at three overlapping positions
    [9, 8, 1, 1, 1, 2, 3, 2, 3],  # (1, 1) and (2, 3) tie at 2: (1, 1) comes first
    [0, 1, 2, 3, 4, 5],  # every pair once: the first one wins
    [6, 5, 0, 1, 2, 0, 1],  # (0, 1) twice, the second time as the very last pair
]


@learner_check
def check_most_frequent_pair(fn: Callable) -> None:
    """`fn(ids) -> (a, b)`: the adjacent pair occurring most often in `ids` (every position
    counts, overlaps included); on a tie, the pair whose first occurrence comes first."""
    rng = random.Random(2)
    cases = [list(c) for c in _PAIR_CASES]
    cases += [_random_ids(rng, n, k) for n, k in [(2, 3), (10, 3), (30, 4), (60, 6), (200, 8), (500, 20)]]
    for ids in cases:
        where = f"my_most_frequent_pair({_show(ids)})"
        original = list(ids)
        got = _run(fn, list(ids), name="my_most_frequent_pair", where=where)
        if isinstance(got, torch.Tensor):
            got = got.tolist()
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            raise AssertionError(f"{where}: return the pair itself, a tuple (a, b) of two ids, "
                                 f"got {got!r}")
        got = tuple(got)
        counts = _pair_counts(original)
        expected = _most_frequent_pair(original)
        if got == expected:
            continue
        if got not in counts:
            raise AssertionError(f"{where}: {got} is not a pair of neighbours in ids (a pair is "
                                 "(ids[i], ids[i + 1]), in that order).")
        if counts[got] == counts[expected]:
            raise AssertionError(
                f"{where}: {got} is one of several pairs tied at {counts[got]} occurrences. Break the "
                "tie by taking the pair that occurs first in ids, so training is reproducible.")
        raise AssertionError(
            f"{where}: {got} occurs {counts[got]} time(s), but another pair occurs {counts[expected]} "
            "times. Count the pair at every position i = 0 .. len(ids) - 2, the last pair and "
            "overlapping ones (like (4, 4) in 4, 4, 4) included.")
    passed("my_most_frequent_pair")


_MERGE_CASES = [
    # (ids, pair, new_id)
    ([1, 2, 3], (1, 2), 99),  # at the start
    ([3, 1, 2], (1, 2), 99),  # at the very end
    ([1, 2, 1, 2, 1, 2], (1, 2), 7),  # back to back
    ([1, 1, 1], (1, 1), 5),  # overlapping: only one merge fits, the left one
    ([1, 1, 1, 1], (1, 1), 5),  # two merges, not three
    ([2, 1, 1, 1, 1, 1, 3], (1, 1), 9),
    ([4, 5, 6], (5, 4), 9),  # only the reversed pair: nothing to merge
    ([11, 2, 1, 23, 1, 2], (1, 2), 50),  # ids are whole numbers: 11 and 23 hold no 1, 2
    ([8], (8, 8), 9),
    ([], (1, 2), 3),
]


@learner_check
def check_merge(fn: Callable) -> None:
    """`fn(ids, pair, new_id) -> list[int]`: every occurrence of `pair`, scanned left to
    right, replaced by `new_id`; overlapping occurrences merge once (1, 1, 1 -> new, 1)."""
    rng = random.Random(3)
    cases = [(list(i), p, n) for i, p, n in _MERGE_CASES]
    for n, k in [(12, 3), (40, 2), (80, 4), (300, 6)]:
        ids = _random_ids(rng, n, k)
        cases.append((ids, _most_frequent_pair(ids), k + 10))
    for ids, pair, new_id in cases:
        where = f"my_merge({_show(ids)}, {pair}, {new_id})"
        given = list(ids)
        got = _int_list(_run(fn, given, pair, new_id, name="my_merge", where=where), "the result", where)
        if given != ids:
            raise AssertionError(f"{where}: your function changed the ids it was given; build and "
                                 "return a new list instead.")
        expected = _merge(ids, pair, new_id)
        if got == expected:
            continue
        if got[:-1] == expected or got == expected[:-1] or got[:-1] == expected[:-1]:
            hint = " Look at the end of the list: the last id (or the last pair) is handled wrongly."
        elif got.count(new_id) > expected.count(new_id) or len(got) > len(ids) - got.count(new_id):
            # more merges than fit, or merges that did not shorten the list (new_id is never in ids)
            hint = (" A pair's two ids become one: after replacing a pair, continue after its second id. "
                    "Each id takes part in one merge only, so 1, 1, 1 merges once, on the left.")
        elif got.count(new_id) < expected.count(new_id):
            hint = (" Some occurrences were not merged: look for the pair at every position, scanning "
                    "left to right, the last position too.")
        else:
            hint = " Keep every id that is not part of a merged pair, in its place."
        raise AssertionError(f"{where}: got {_show(got)}, expected {_show(expected)}.{hint}")
    passed("my_merge")


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
        got = _int_list(_run(fn, text, dict(merges), name="my_bpe_encode", where=where), "the result", where)
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


# --------------------------------------------------------------------------- batches


def _batch(fn: Callable, data: torch.Tensor, B: int, T: int, seed: int, where: str):
    g = torch.Generator().manual_seed(seed)
    hint = ("A window needs block_size + 1 tokens (the inputs and one more target), so the start "
            "offsets must leave room for it at the end of data.")
    result = _run(fn, data.clone(), B, T, g, name="my_get_batch", where=where, hint=hint)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise AssertionError(f"{where}: return a pair (x, y), got {type(result).__name__}")
    x, y = result
    for label, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise AssertionError(f"{where}: {label} should be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != (B, T):
            raise AssertionError(f"{where}: {label} has shape {tuple(t.shape)}, expected "
                                 f"(batch_size, block_size) = ({B}, {T}).")
        if t.dtype != torch.long:
            raise AssertionError(f"{where}: {label} has dtype {t.dtype}; token ids for an embedding "
                                 "table and cross-entropy targets must be torch.long (int64).")
    return x, y


def _starts(data: torch.Tensor, x: torch.Tensor, y: torch.Tensor, where: str) -> list[int]:
    """Check that every row is a window of `data` with its targets; return the start offsets.
    `data` holds distinct values, so a row's first token gives its offset."""
    position = {int(v): i for i, v in enumerate(data.tolist())}
    n, T = len(data), x.size(1)
    starts = []
    for row in range(x.size(0)):
        s = position.get(int(x[row, 0]))
        if s is None or s + T > n or not torch.equal(x[row], data[s:s + T]):
            raise AssertionError(f"{where}: row {row} of x is not a run of {T} consecutive tokens of data. "
                                 "Each row of x is a slice data[s : s + block_size].")
        if torch.equal(y[row], x[row]):
            raise AssertionError(f"{where}: y equals x. The target at each position is the token that "
                                 "comes next in data, so y is x's window shifted by one.")
        if s + T + 1 > n or not torch.equal(y[row], data[s + 1:s + T + 1]):
            if s + T + 1 > n:
                raise AssertionError(f"{where}: row {row} starts at offset {s}, where there is no room "
                                     f"for its last target: a window needs block_size + 1 = {T + 1} tokens.")
            raise AssertionError(f"{where}: row {row} of y is not the next token after each position of x "
                                 "(the same window, shifted by one).")
        starts.append(s)
    return starts


@learner_check
def check_get_batch(fn: Callable) -> None:
    """`fn(data, batch_size, block_size, generator) -> (x, y)`: random windows of `data` with
    `y` shifted by one, every valid offset reachable, and the randomness all drawn from
    `generator` (the same seed gives the same batch)."""
    g = torch.Generator().manual_seed(5)
    for n, B, T in [(50, 4, 8), (9, 6, 8), (40, 3, 1), (12, 300, 4), (1000, 16, 64)]:
        data = torch.randperm(n, generator=g) + 1000  # distinct values: a token fixes its offset
        where = f"my_get_batch(data of {n} tokens, batch_size={B}, block_size={T})"
        x, y = _batch(fn, data, B, T, seed=11, where=where)
        starts = _starts(data, x, y, where)
        if B >= 100:  # enough draws to see every one of the n - T valid offsets
            missing = sorted(set(range(n - T)) - set(starts))
            if missing == [n - T - 1]:
                raise AssertionError(f"{where}: in {B} windows the last valid offset ({n - T - 1}) never "
                                     "came up: your offsets stop one short of the end.")
            if missing:
                raise AssertionError(f"{where}: in {B} windows the offsets {missing[:6]} never came up; "
                                     "draw the start offsets uniformly over every valid position.")
        # Same generator seed, different global seeds: the batch must not change.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(123)
            x1, y1 = _batch(fn, data, B, T, seed=21, where=where)
            torch.manual_seed(456)
            x2, y2 = _batch(fn, data, B, T, seed=21, where=where)
        if not (torch.equal(x1, x2) and torch.equal(y1, y2)):
            raise AssertionError(f"{where}: the same generator seed gave different batches. Draw all "
                                 "randomness from the generator you are given (generator=generator).")
        if n - T > 1 and B > 1:
            x3, _ = _batch(fn, data, B, T, seed=22, where=where)
            if torch.equal(x3, x1) and len(set(starts)) > 1:
                raise AssertionError(f"{where}: two different generator seeds gave the same batch; the "
                                     "offsets should be random draws from the generator.")
    passed("my_get_batch")

