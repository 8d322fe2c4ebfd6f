"""Checks for chapter 2's exercises: multi-head attention, an ALiBi bias, turning multi-head
attention into grouped-query attention, and the entropy experiment.

Each check compares the learner's function with a reference (`kvlab.SelfAttention`, the small
functions below) on several shapes, small cases first, so the first failure points at the
simplest thing that is wrong, and recognises the classic mistakes by name. The experiment's
check measures the answer live, on the reader's machine. Inputs come from a private
`torch.Generator`: a check never moves the notebook's global random state. Built in chapter 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ...attention import SelfAttention, attend, causal_mask
from ._common import call_learner, close, learner_check, methods_of, passed, require_answer

__all__ = ["alibi_slopes", "check_alibi_bias", "check_entropy_ratio", "check_multi_head_attention", "check_pool_kv",
           "mean_entropy", "pool_kv_reference"]


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


# --------------------------------------------------------------------------- multi-head attention


def _reference_mha(x: torch.Tensor, w_qkv: torch.Tensor, w_out: torch.Tensor, n_heads: int) -> torch.Tensor:
    C = x.size(-1)
    with torch.random.fork_rng(devices=[]):  # nn.Linear's init must not move the learner's RNG
        attn = SelfAttention(C, n_heads, bias=False).eval()
    with torch.no_grad():
        attn.qkv.weight.copy_(w_qkv)
        attn.out.weight.copy_(w_out)
        return attn(x, mask=causal_mask(x.size(1)))


def _kvlab_bases(cls: type) -> list[type]:
    # The class and the kvlab classes it inherits from (their methods are the library's attention).
    return [c for c in cls.__mro__ if c.__module__.startswith("kvlab.")]


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
            got = call_learner(fn, x.clone(), w_qkv.clone(), w_out.clone(), H, name="my_multi_head_attention",
                               without=("multi-head attention",
                                        [*methods_of(*_kvlab_bases(SelfAttention)), attend, _reference_mha]))
            close(got, _reference_mha(x, w_qkv, w_out, H), f"[B={B}, T={T}, C={C}, n_heads={H}] {hint}",
                  atol=1e-4, rtol=1e-4)
    passed("my_multi_head_attention")


# --------------------------------------------------------------------------- ALiBi


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi's slopes for `n_heads` heads (a power of two): 2^(-8/H), 2^(-16/H), ..., 2^(-8)."""
    return 2.0 ** (-8.0 * torch.arange(1, n_heads + 1, dtype=torch.float32) / n_heads)


def _alibi_reference(n_heads: int, T: int, S: int) -> torch.Tensor:
    q_pos = torch.arange(S - T, S)  # the queries are the last T of the S positions
    distance = (q_pos[:, None] - torch.arange(S)[None, :]).float()  # (T, S): how far back each key is
    bias = -alibi_slopes(n_heads)[:, None, None] * distance  # (H, T, S)
    return bias.masked_fill(distance < 0, float("-inf"))


def _alibi_variants(n_heads: int, T: int, S: int) -> list[tuple[torch.Tensor, str]]:
    """Wrong answers the check recognises, each with the hint it gives."""
    ref = _alibi_reference(n_heads, T, S)
    finite = torch.isfinite(ref)
    top_left = _alibi_reference(n_heads, T, T)
    top_left = torch.cat([top_left, torch.full((n_heads, T, S - T), float("-inf"))], dim=-1)
    slopes_from_one = 2.0 ** (-8.0 * torch.arange(0, n_heads, dtype=torch.float32) / n_heads)
    return [
        (torch.where(finite, -ref, ref), "the sign is flipped: a key further back should get a *lower* score"),
        (top_left, "the queries are the last T of the S positions (query i sits at position S - T + i), "
                   "as with the causal mask for a cache"),
        (torch.where(finite, ref, torch.zeros_like(ref)),
         "the future is not masked: a key after the query must get -inf"),
        (ref.flip(0), "the slopes are in the wrong order: head 0 has the largest slope"),
        (torch.where(finite, ref * slopes_from_one[:, None, None] / alibi_slopes(n_heads)[:, None, None], ref),
         "the slopes start one step too high: head h's slope is 2^(-8(h+1)/H)"),
    ]


@learner_check
def check_alibi_bias(fn: Callable) -> None:
    """`fn(n_heads, T, S) -> (H, T, S)`: ALiBi's additive bias for T queries that are the last T
    of S positions, -inf for keys after the query."""
    for H, T, S in [(1, 1, 1), (2, 3, 3), (4, 5, 5), (4, 1, 6), (8, 3, 7), (2, 4, 9)]:
        where = f"my_alibi_bias(n_heads={H}, T={T}, S={S})"
        got = call_learner(fn, H, T, S, name="my_alibi_bias")
        expected = _alibi_reference(H, T, S)
        if not isinstance(got, torch.Tensor):
            raise AssertionError(f"{where}: expected a torch.Tensor, got {type(got).__name__}")
        if tuple(got.shape) != (H, T, S):
            raise AssertionError(f"{where}: wrong shape {tuple(got.shape)}, expected (n_heads, T, S) = {(H, T, S)}")
        got = got.float()
        same_inf = torch.equal(torch.isneginf(got), torch.isneginf(expected))
        finite = torch.isfinite(expected)
        if same_inf and torch.allclose(got[finite], expected[finite], atol=1e-5, rtol=1e-5):
            continue
        for variant, hint in _alibi_variants(H, T, S):
            v_finite = torch.isfinite(variant)
            if (torch.equal(torch.isneginf(got), torch.isneginf(variant))
                    and torch.allclose(got[v_finite], variant[v_finite], atol=1e-5, rtol=1e-5)):
                raise AssertionError(f"{where}: {hint}.")
        raise AssertionError(f"{where}: wrong values. The bias is -slope_h × (query position - key position) "
                             "for keys at or before the query, and -inf after it.")
    passed("my_alibi_bias")


# --------------------------------------------------------------------------- MHA -> GQA by mean-pooling


def pool_kv_reference(w_qkv: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """A fused (3C, ...) qkv weight or bias of multi-head attention, its key and value heads
    averaged in groups of n_heads // n_kv_heads consecutive heads: (C + 2·Hkv·D, ...)."""
    C = w_qkv.shape[0] // 3
    D, G = C // n_heads, n_heads // n_kv_heads
    q, k, v = w_qkv.split([C, C, C])
    rest = w_qkv.shape[1:]

    def pool(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n_kv_heads, G, D, *rest).mean(1).reshape(n_kv_heads * D, *rest)  # (Hkv·D, ...)

    return torch.cat([q, pool(k), pool(v)])


@learner_check
def check_pool_kv(fn: Callable) -> None:
    """`fn(w_qkv, n_heads, n_kv_heads)`: the fused qkv weight (or bias) of a GQA layer whose key and
    value heads are the means of consecutive groups of the multi-head layer's heads."""
    g = torch.Generator().manual_seed(8)
    for C, H, Hkv, bias in [(8, 2, 1, False), (16, 4, 2, False), (16, 4, 4, False), (24, 6, 3, False),
                            (32, 8, 2, False), (16, 4, 2, True), (24, 6, 2, True)]:
        D, G = C // H, H // Hkv
        w = _randn(g, 3 * C) if bias else _randn(g, 3 * C, C)
        what = "bias" if bias else "weight"
        where = f"my_pool_kv(a {tuple(w.shape)} qkv {what}, n_heads={H}, n_kv_heads={Hkv})"
        got = call_learner(fn, w.clone(), H, Hkv, name="my_pool_kv")
        expected = pool_kv_reference(w, H, Hkv)
        if not isinstance(got, torch.Tensor):
            raise AssertionError(f"{where}: expected a torch.Tensor, got {type(got).__name__}")
        if tuple(got.shape) != tuple(expected.shape):
            raise AssertionError(f"{where}: wrong shape {tuple(got.shape)}, expected {tuple(expected.shape)}: "
                                 "the C query rows stay as they are, and keys and values shrink to "
                                 "n_kv_heads · D rows each.")
        if torch.allclose(got, expected, atol=1e-5, rtol=1e-5):
            continue
        q, k, v = w.split([C, C, C])
        rest = w.shape[1:]
        strided = torch.cat([q] + [t.reshape(G, Hkv, D, *rest).mean(0).reshape(Hkv * D, *rest) for t in (k, v)])
        summed = torch.cat([q] + [t.reshape(Hkv, G, D, *rest).sum(1).reshape(Hkv * D, *rest) for t in (k, v)])
        first = torch.cat([q] + [t.reshape(Hkv, G, D, *rest)[:, 0].reshape(Hkv * D, *rest) for t in (k, v)])
        swapped = torch.cat([q, expected[C + Hkv * D:], expected[C:C + Hkv * D]])
        if not torch.allclose(got[:C], q):
            hint = "the first C rows are the query projection: GQA keeps every query head, so leave them alone"
        elif torch.allclose(got, strided, atol=1e-5):
            hint = ("you grouped heads h, h + n_kv_heads, ...: the query heads that share key/value head j are "
                    "consecutive (jG ... jG + G - 1), so average consecutive heads")
        elif torch.allclose(got, summed, atol=1e-5):
            hint = "you summed each group's heads: average them, or the keys and values grow G times larger"
        elif torch.allclose(got, first, atol=1e-5):
            hint = "you kept one head per group: average the group's heads instead"
        elif torch.allclose(got, swapped, atol=1e-5):
            hint = "keys and values are swapped: the rows are queries, then keys, then values"
        else:
            hint = ("each of the n_kv_heads new key heads is the mean of D-row blocks of G consecutive old "
                    "key heads; the same for values")
        raise AssertionError(f"{where}: wrong values: {hint}.")
    passed("my_pool_kv")


# --------------------------------------------------------------------------- experiment: entropy and the scale


def mean_entropy(weights: torch.Tensor) -> float:
    """The mean over rows of -Σ w log w (nats), for weights (..., S) whose rows sum to 1."""
    return -(weights * weights.clamp_min(1e-30).log()).sum(-1).mean().item()


def _entropy_ratio(D: int, n_keys: int = 16, n_rows: int = 20000, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_rows, 1, D, generator=g)
    k = torch.randn(n_rows, n_keys, D, generator=g)
    scores = (q @ k.transpose(-2, -1)).squeeze(1)  # (n_rows, n_keys)
    return mean_entropy(scores.softmax(-1)) / mean_entropy((scores / math.sqrt(D)).softmax(-1))


@learner_check
def check_entropy_ratio(answer: float) -> None:
    """`answer`: the mean entropy of a softmax over 16 keys of unscaled q·k at D = 64, divided by the
    same with the scores divided by √D, for standard normal q and k; measured here within 0.03."""
    answer = require_answer(answer, "my_entropy_ratio")
    if isinstance(answer, torch.Tensor) and answer.numel() == 1:
        answer = answer.item()
    if isinstance(answer, bool) or not isinstance(answer, (int, float)):
        raise AssertionError(f"my_entropy_ratio should be a number (a ratio of entropies), got {type(answer).__name__}")
    expected = _entropy_ratio(64)
    if abs(answer - expected) <= 0.03:
        passed("my_entropy_ratio")
        return
    if abs(answer - 1 / expected) <= 0.1 / expected:
        hint = "the ratio is upside down: the entropy *without* the scale goes on top."
    elif abs(answer - 1.0) <= 0.03:
        hint = "both entropies came out equal: did you divide the scores by √D in one of the two runs?"
    elif any(abs(answer - _entropy_ratio(D, n_rows=4000)) <= 0.03 for D in (16, 256, 1024)):
        hint = "that is the ratio at another width: this question is about D = 64."
    else:
        hint = ("for many random (q, k) rows at D = 64 with 16 keys, take the softmax of q·k and of q·k/√D, "
                "average -Σ w ln w over the rows for each, and divide the first by the second.")
    raise AssertionError(f"my_entropy_ratio = {answer:.3g} is not what this machine measures: {hint}")
