"""Checks for chapter 2's exercises: the causal mask, attention, multi-head attention, GQA.

Each check compares the learner's function with kvlab's own (`causal_mask`,
`attention_reference`, `SelfAttention`, `repeat_kv`) on several shapes, small cases first, so
the first failure points at the simplest thing that is wrong. Inputs come from a private
`torch.Generator`: a check never moves the notebook's global random state. Built in chapter 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..attention import SelfAttention, attention_reference, causal_mask, repeat_kv
from ._common import call_learner, close, passed, learner_check

__all__ = ["check_causal_mask", "check_attention", "check_multi_head_attention", "check_repeat_kv"]


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


# --------------------------------------------------------------------------- causal mask


@learner_check
def check_causal_mask(fn: Callable) -> None:
    """`fn(T, S) -> (T, S) bool`: True where query i (the i-th of the last T positions) may
    see key j. Square cases come first, then shorter query blocks down to one query."""
    cases = [(1, 1), (4, 4), (7, 7), (1, 5), (2, 6), (3, 8), (5, 6)]
    for T, S in cases:
        got = call_learner(fn, T, S, name="my_causal_mask")
        expected = causal_mask(T, S)
        where = f"my_causal_mask({T}, {S})"
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (T, S) and got.dtype != torch.bool:
            raise AssertionError(
                f"{where} returned dtype {got.dtype}; return a bool tensor (True = may attend), "
                "which is what masked_fill and SDPA's attn_mask expect."
            )
        if (
            isinstance(got, torch.Tensor)
            and T < S
            and tuple(got.shape) == (T, S)
            and torch.equal(got, torch.ones(T, S, dtype=torch.bool).tril())
        ):
            raise AssertionError(
                f"{where}: your mask is aligned to the top-left corner. With T < S the T queries are "
                "the newest T positions, not the first T: a decode step's single query must see "
                "every key. Build the mask from the queries' and keys' positions."
            )
        close(
            got,
            expected,
            f"{where}: query row i sits at position S - T + i and may see every key at a position "
            "up to and including its own.",
        )
    passed("my_causal_mask")


# --------------------------------------------------------------------------- attention


def _attention_cases(g: torch.Generator):
    """(q, k, v, mask) tuples: no batch, batch and heads, T < S, one query, broadcast masks."""
    yield _randn(g, 4, 8), _randn(g, 4, 8), _randn(g, 4, 8), None
    yield _randn(g, 2, 3, 5, 16), _randn(g, 2, 3, 5, 16), _randn(g, 2, 3, 5, 16), None
    yield _randn(g, 2, 3, 6, 16), _randn(g, 2, 3, 6, 16), _randn(g, 2, 3, 6, 16), causal_mask(6)
    yield _randn(g, 2, 2, 3, 8), _randn(g, 2, 2, 9, 8), _randn(g, 2, 2, 9, 8), causal_mask(3, 9)
    yield _randn(g, 1, 4, 1, 32), _randn(g, 1, 4, 7, 32), _randn(g, 1, 4, 7, 32), causal_mask(1, 7)
    # A padding mask (B, 1, 1, S): the last two keys of the second sequence are padding.
    pad = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    pad[1, ..., 3:] = False
    yield _randn(g, 2, 2, 4, 8), _randn(g, 2, 2, 5, 8), _randn(g, 2, 2, 5, 8), pad


def _diagnose_weights(w: torch.Tensor, q: torch.Tensor, k: torch.Tensor, mask, where: str) -> None:
    """Name the usual mistakes before the plain comparison: wrong softmax dim, masking after the
    softmax or not at all, and the missing 1/√D."""
    ones = torch.ones(w.shape[:-1])
    if not torch.allclose(w.sum(-1), ones, atol=1e-4):
        columns_sum_to_one = q.size(-2) == k.size(-2) and torch.allclose(w.sum(-2), ones, atol=1e-4)
        if columns_sum_to_one:
            raise AssertionError(
                f"[{where}] your weights sum to 1 down each column. Each query's weights over "
                "the keys (one row, the last dimension) should sum to 1: check the softmax's dim."
            )
        also = "" if mask is None else " Masked keys must be removed before the softmax normalises the row."
        raise AssertionError(f"[{where}] each query's weights over the keys should sum to 1.{also}")
    if mask is not None and (w * ~mask.expand_as(w)).abs().max() > 1e-6:
        raise AssertionError(
            f"[{where}] masked keys (mask False) got nonzero weight: they must be excluded "
            "before the softmax, so that they get exactly zero weight."
        )
    unscaled = q @ k.transpose(-2, -1)
    if mask is not None:
        unscaled = unscaled.masked_fill(~mask, float("-inf"))
    if torch.allclose(w, unscaled.softmax(-1), atol=1e-5):
        raise AssertionError(
            f"[{where}] your weights are too peaked: the dot products of D-dimensional vectors "
            "grow with D. Scale the scores as in the formula before the softmax."
        )


@learner_check
def check_attention(fn: Callable) -> None:
    """`fn(q, k, v, mask=None) -> (out, weights)` against `kvlab.attention_reference` on
    several shapes, with and without masks (including T < S and a single query)."""
    g = torch.Generator().manual_seed(2)
    for q, k, v, mask in _attention_cases(g):
        masked = "no mask" if mask is None else f"mask {tuple(mask.shape)}"
        where = f"q {tuple(q.shape)}, k {tuple(k.shape)}, {masked}"
        args = (q.clone(), k.clone(), v.clone()) + (() if mask is None else (mask.clone(),))
        result = call_learner(fn, *args, name="my_attention")
        if not (isinstance(result, tuple) and len(result) == 2):
            raise AssertionError(f"[{where}] return a pair (out, weights), got {type(result).__name__}")
        out, weights = result
        exp_out, exp_w = attention_reference(q, k, v, mask)
        if isinstance(weights, torch.Tensor) and weights.shape == exp_w.shape:
            _diagnose_weights(weights.detach().float(), q, k, mask, where)
        close(weights, exp_w, f"[{where}] weights should be softmax(q kᵀ / √D) over the keys, D = q.size(-1).")
        close(out, exp_out, f"[{where}] the weights are right; out should be the weighted sum of the values.")
    passed("my_attention")


# --------------------------------------------------------------------------- multi-head attention


def _reference_mha(x: torch.Tensor, w_qkv: torch.Tensor, w_out: torch.Tensor, n_heads: int) -> torch.Tensor:
    C = x.size(-1)
    with torch.random.fork_rng(devices=[]):  # nn.Linear's init must not move the learner's RNG
        attn = SelfAttention(C, n_heads, bias=False).eval()
    with torch.no_grad():
        attn.qkv.weight.copy_(w_qkv)
        attn.out.weight.copy_(w_out)
        return attn(x, mask=causal_mask(x.size(1)))


@learner_check
def check_multi_head_attention(fn: Callable) -> None:
    """`fn(x, w_qkv, w_out, n_heads) -> (B, T, C)`: causal multi-head self-attention without
    biases, compared with `kvlab.SelfAttention` holding the same weights. One head and one token
    first, then one head, then several heads, so the hint names the part that breaks."""
    g = torch.Generator().manual_seed(3)
    stages = [
        (
            [(1, 1, 8, 1), (2, 1, 12, 1)],
            "With one head and one token, attention just passes the token's value through, so the "
            "projections are off: w_qkv stacks W_q, W_k, W_v along its first dimension and, like "
            "nn.Linear's weight, is (out_features, in_features); w_out is applied the same way.",
        ),
        (
            [(1, 5, 8, 1), (2, 7, 12, 1)],
            "One token works but several don't: check the causal mask (each position sees itself "
            "and earlier positions) and the 1/√D scaling.",
        ),
        (
            [(2, 5, 16, 4), (1, 6, 12, 3), (2, 1, 8, 2), (3, 4, 24, 2)],
            "One head works but several don't. Check how C is split into heads: each head owns D = "
            "C // n_heads consecutive features of every token, and the head dimension must end up "
            "next to the batch dimension, (B, H, T, D), before attending; merging must undo exactly "
            "that. The scale uses the head width D, not C.",
        ),
    ]
    for cases, hint in stages:
        for B, T, C, H in cases:
            x = _randn(g, B, T, C)
            w_qkv = _randn(g, 3 * C, C) / math.sqrt(C)
            w_out = _randn(g, C, C) / math.sqrt(C)
            got = call_learner(fn, x.clone(), w_qkv.clone(), w_out.clone(), H, name="my_multi_head_attention")
            close(got, _reference_mha(x, w_qkv, w_out, H), f"[B={B}, T={T}, C={C}, n_heads={H}] {hint}",
                  atol=1e-4, rtol=1e-4)
    passed("my_multi_head_attention")


# --------------------------------------------------------------------------- grouped-query attention


@learner_check
def check_repeat_kv(fn: Callable) -> None:
    """`fn(x, n_rep)`: (B, Hkv, S, D) -> (B, Hkv * n_rep, S, D), query head h reading key/value
    head h // n_rep, compared with `kvlab.attention.repeat_kv`."""
    g = torch.Generator().manual_seed(4)
    cases = [((1, 2, 3, 4), 2), ((2, 3, 5, 8), 4), ((2, 4, 1, 4), 2), ((1, 1, 6, 4), 4), ((2, 2, 3, 4), 1)]
    for shape, n_rep in cases:
        x = _randn(g, *shape)
        got = call_learner(fn, x.clone(), n_rep, name="my_repeat_kv")
        where = f"x {tuple(shape)}, n_rep={n_rep}"
        tiled = x.repeat(1, n_rep, 1, 1)
        if isinstance(got, torch.Tensor) and got.shape == tiled.shape and shape[1] > 1 and n_rep > 1 \
                and torch.equal(got, tiled):
            raise AssertionError(
                f"[{where}] every head is there but in the wrong order. The query heads come in groups "
                "of n_rep consecutive heads, and all heads of one group share the same key/value head."
            )
        close(got, repeat_kv(x, n_rep), f"[{where}] output head h must be a copy of input head h // n_rep.")
    passed("my_repeat_kv")
