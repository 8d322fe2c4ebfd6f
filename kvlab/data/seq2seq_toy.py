"""The toy seq2seq data of chapter 8: a tiny vocabulary, (source, target) pairs, padded batches.

Shape legend: B = batch size, S = source length, T = target length (+1 for BOS or EOS).

Chapter 8 trains an encoder-decoder on a task small enough to learn in about a minute on a
CPU: reverse (or sort) a string of digits. A source is its symbols followed by EOS; the
decoder reads BOS + target and must predict target + EOS (teacher forcing). Batches are
right-padded with PAD, which the model masks out, so a sequence's outputs do not depend on
how long its batch-mates are. Built in chapter 8.
"""

from __future__ import annotations

import torch

from ..validation import check_choice, check_int, check_positive_int

__all__ = ["SEQ2SEQ_TASKS", "Seq2SeqVocab", "toy_pairs", "pad_sequences", "seq2seq_batch"]

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
    check_positive_int("n", n)
    check_positive_int("min_len", min_len)
    check_positive_int("max_len", max_len)
    check_choice("task", task, SEQ2SEQ_TASKS)
    if min_len > max_len:
        raise ValueError(f"min_len={min_len} must be <= max_len={max_len}")
    check_int("seed", seed)
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
