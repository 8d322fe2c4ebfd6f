"""Checks for chapter 8's exercises: padding masks, cross-attention, cached greedy decoding.

Each check compares the learner's function with kvlab's own (`attention_reference`,
`Seq2SeqTransformer`, `greedy_decode`) on several shapes, small cases first. Inputs come from
private `torch.Generator`s and models are built inside `torch.random.fork_rng`, so a check
never moves the notebook's random state. Built in chapter 8.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..attention import attention_reference
from ..seq2seq import Seq2SeqConfig, Seq2SeqTransformer, greedy_decode
from ._common import call_learner, close, passed, learner_check

__all__ = ["check_padding_mask", "check_cross_attention", "check_greedy_decode"]


# --------------------------------------------------------------------------- padding mask


@learner_check
def check_padding_mask(fn: Callable) -> None:
    """`fn(lengths, S) -> (B, S) bool`: True at the first lengths[b] positions of row b."""
    cases = [([3], 3), ([1], 1), ([2, 5, 1], 5), ([4, 4], 7), ([1, 6, 3, 2], 9)]
    for lengths, S in cases:
        lengths_t = torch.tensor(lengths)
        got = call_learner(fn, lengths_t.clone(), S, name="my_padding_mask")
        expected = torch.arange(S)[None, :] < lengths_t[:, None]
        where = f"my_padding_mask(torch.tensor({lengths}), S={S})"
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (S, len(lengths)) and S != len(lengths):
            raise AssertionError(f"{where} has shape {tuple(got.shape)}: one row per sequence, one column "
                                 f"per position, so (B, S) = {(len(lengths), S)}.")
        if isinstance(got, torch.Tensor) and got.shape == expected.shape and got.dtype != torch.bool:
            raise AssertionError(f"{where} returned dtype {got.dtype}; return a bool tensor (True = a real "
                                 "token), which is what masked_fill and SDPA's attn_mask expect.")
        if isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.equal(got, ~expected):
            raise AssertionError(f"{where} is inverted: in kvlab a mask is True where attention is allowed, "
                                 "so True must mark the real tokens and False the padding.")
        close(got, expected, f"{where}: row b has lengths[b] real tokens at positions 0..lengths[b] - 1, "
                             "then padding. Check the first and last positions of each row.")
    passed("my_padding_mask")


# --------------------------------------------------------------------------- cross-attention


def _cross_cases(g: torch.Generator):
    """(q, k, v, pad_mask): one query, T < S, T > S, T == S, no padding, one real key."""
    def rand(*shape):
        return torch.randn(*shape, generator=g)

    def pad(lengths, S):
        return torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]

    yield rand(1, 1, 1, 8), rand(1, 1, 5, 8), rand(1, 1, 5, 8), pad([5], 5)
    yield rand(2, 2, 1, 8), rand(2, 2, 6, 8), rand(2, 2, 6, 8), pad([6, 3], 6)
    yield rand(2, 4, 3, 16), rand(2, 4, 7, 16), rand(2, 4, 7, 16), pad([7, 4], 7)
    yield rand(3, 2, 9, 8), rand(3, 2, 5, 8), rand(3, 2, 5, 8), pad([2, 5, 1], 5)
    yield rand(2, 2, 6, 32), rand(2, 2, 6, 32), rand(2, 2, 6, 32), pad([6, 2], 6)


@learner_check
def check_cross_attention(fn: Callable) -> None:
    """`fn(q, k, v, pad_mask) -> (B, H, T, D)`: every query attends over all of its source's real
    keys; compared with `kvlab.attention_reference` under the mask pad_mask[:, None, None, :]."""
    g = torch.Generator().manual_seed(8)
    for q, k, v, pad_mask in _cross_cases(g):
        B, H, T, D = q.shape
        where = f"q {tuple(q.shape)}, k/v {tuple(k.shape)}, pad_mask {tuple(pad_mask.shape)}"
        got = call_learner(fn, q.clone(), k.clone(), v.clone(), pad_mask.clone(), name="my_cross_attention")
        if isinstance(got, tuple):
            raise AssertionError(f"[{where}] return only the output tensor (B, H, T, D), not a tuple.")
        expected, _ = attention_reference(q, k, v, pad_mask[:, None, None, :])
        same_shape = isinstance(got, torch.Tensor) and got.shape == expected.shape
        if same_shape and not torch.allclose(got, expected, atol=1e-5):
            if torch.isnan(got).any():
                raise AssertionError(
                    f"[{where}] your output has NaNs: some softmax row had no allowed key at all. Only the "
                    "padded keys must be hidden: check the mask's polarity (masked_fill fills where its "
                    "mask is True) and how you broadcast pad_mask (B, S) against the scores (B, H, T, S).")
            hints = [
                ("causal", _variant(q, k, v, pad_mask, causal=True),
                 "this looks like a causal mask. Cross-attention is not causal: the whole source is known "
                 "before decoding starts, so every target position may look at every real source token."),
                ("no mask", _variant(q, k, v, None),
                 "padded keys got some weight. Hide them before the softmax so they get exactly zero."),
                ("unscaled", _variant(q, k, v, pad_mask, scale=1.0),
                 "your weights are too peaked: scale the scores as in the formula before the softmax."),
                ("scaled by D", _variant(q, k, v, pad_mask, scale=1.0 / D),
                 "the scale is off: the scores are divided by the square root of the head width."),
                ("swapped", _variant(q, v, k, pad_mask),
                 "keys decide *where* to look (they meet the queries in the scores), values are *what* "
                 "is read: check which is which."),
            ]
            for _, variant, hint in hints:
                if torch.allclose(got, variant, atol=1e-5):
                    raise AssertionError(f"[{where}] {hint}")
        close(got, expected, f"[{where}] out = softmax(q kᵀ / √D, hiding padded keys) v, per batch row and head.")
    passed("my_cross_attention")


def _variant(q, k, v, pad_mask, *, causal=False, scale=None):
    scores = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.size(-1)) if scale is None else scale)
    if pad_mask is not None:
        scores = scores.masked_fill(~pad_mask[:, None, None, :], float("-inf"))
    if causal:
        T, S = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


# --------------------------------------------------------------------------- greedy decoding

# Small random models with an untied output layer (a tied one mostly repeats the input token).
# Seeds chosen so that rows end with EOS at different steps, or never, and that the second case
# finishes every row before max_new_tokens; the tests pin these properties.
_DECODE_CASES = [
    # (label, config overrides, seed, source lengths, max_new_tokens)
    ("2 layers, 3 sources of lengths 5, 9, 2", dict(), 14, (5, 9, 2), 14),
    ("3 layers with grouped-query attention, 4 sources", dict(n_layers=3, n_kv_heads=2), 14, (7, 3, 8, 1), 16),
    ("1 layer, one source", dict(n_layers=1), 6, (6,), 12),
]
_BASE = dict(vocab_size=12, max_seq_len=32, d_model=32, n_layers=2, n_heads=4, tie_embeddings=False)


def _decode_case(overrides: dict, seed: int, lengths):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Seq2SeqTransformer(Seq2SeqConfig(**{**_BASE, **overrides}))
    g = torch.Generator().manual_seed(seed)
    src = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        src[i, :n] = torch.randint(3, _BASE["vocab_size"], (n,), generator=g)
    return model.eval(), src


def _same_up_to_eos(got: torch.Tensor, expected: torch.Tensor, eos_id: int) -> bool:
    for g_row, e_row in zip(got.tolist(), expected.tolist()):
        end = e_row.index(eos_id) + 1 if eos_id in e_row else len(e_row)
        if g_row[:end] != e_row[:end]:
            return False
    return True


@learner_check
def check_greedy_decode(fn: Callable) -> None:
    """`fn(model, src, max_new_tokens) -> (B, N)`: cached greedy decoding, compared token for
    token with `kvlab.greedy_decode`; the cross-attention keys must be projected once per layer."""
    for label, overrides, seed, lengths, n_new in _DECODE_CASES:
        model, src = _decode_case(overrides, seed, lengths)
        c = model.config
        expected = greedy_decode(model, src, n_new)
        calls = []
        hooks = [b.cross_attn.kv.register_forward_hook(lambda *_: calls.append(1)) for b in model.decoder]
        try:
            with torch.no_grad():
                got = call_learner(fn, model, src.clone(), n_new, name="my_greedy_decode")
        finally:
            for h in hooks:
                h.remove()
        where = f"[{label}, max_new_tokens={n_new}]"
        if not isinstance(got, torch.Tensor):
            raise AssertionError(f"{where} return a tensor of token ids (B, N), got {type(got).__name__}")
        if got.dim() == 2 and got.size(0) == expected.size(0) and not torch.equal(got, expected):
            if got.size(1) >= 1 and bool((got[:, 0] == c.bos_id).all()):
                raise AssertionError(f"{where} your output starts with BOS. Return only the generated tokens; "
                                     "BOS is the decoder's first input, not an output.")
            n = expected.size(1)
            if got.size(1) > n and torch.equal(got[:, :n], expected) and bool((got[:, n:] == c.pad_id).all()):
                raise AssertionError(f"{where} the tokens are right, but every row had finished after {n} "
                                     f"steps and you returned {got.size(1)} columns: stop as soon as every "
                                     "row has emitted EOS.")
            if got.shape == expected.shape and _same_up_to_eos(got, expected, c.eos_id):
                raise AssertionError(f"{where} every row is right up to its EOS, but not after it: after "
                                     "its EOS a row must hold only PAD (its later predictions are "
                                     "meaningless).")
        close(got, expected, f"{where} feed BOS first, then each step's argmax token, at consecutive positions; "
                             "the source's padding must be masked (model.encode and the cache do it for you).")
        if len(calls) != c.n_layers:
            raise AssertionError(
                f"{where} your tokens are right, but the cross-attention keys and values were projected "
                f"{len(calls)} times for {expected.size(1)} steps of a {c.n_layers}-layer decoder. They depend "
                f"only on the source: project them once per layer ({c.n_layers} in all) and reuse them.")
    passed("my_greedy_decode")
