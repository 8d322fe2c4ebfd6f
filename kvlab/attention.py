"""Attention from scratch: masks, the reference softmax attention, and multi-head attention.

Shape legend used throughout:
    B  batch size
    T  query length (tokens fed in this call)
    S  key/value length (tokens attended over; S == T without a cache)
    C  d_model, the width of the residual stream
    H  number of query heads
    Hkv number of key/value heads (Hkv == H for classic multi-head attention; Hkv < H is
       grouped-query attention, Hkv == 1 multi-query attention)
    D  head_dim, so C == H * D

Masks are boolean with True meaning "may attend". They are built from absolute positions
(`q_pos`, `k_pos`), never from shapes alone: a decode step has one query at position p and
keys at 0..p, and a mask aligned to the top-left corner would let that query see only key 0.
Built in chapter 2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


__all__ = [
    "causal_mask",
    "attention_mask",
    "attention_reference",
    "attend",
    "AttentionBase",
    "repeat_kv",
    "split_heads",
    "merge_heads",
    "SelfAttention",
    "CrossAttention",
]


def causal_mask(T: int, S: int | None = None, *, device: torch.device | str | None = None) -> Tensor:
    """Boolean (T, S) mask for T queries that are the *last* T of S positions.

    Query i sits at absolute position S - T + i and may see keys 0..S - T + i: the mask is
    aligned to the bottom-right corner, which is what a decode step (T=1) or a chunked prefill
    needs. With S == T it is the familiar lower triangle. Built in chapter 2.
    """
    S = T if S is None else S
    if T < 1 or S < T:
        raise ValueError(f"need 1 <= T <= S, got T={T}, S={S}")
    q_pos = torch.arange(S - T, S, device=device)
    k_pos = torch.arange(S, device=device)
    return attention_mask(q_pos, k_pos)


def attention_mask(q_pos: Tensor, k_pos: Tensor, window: int | None = None) -> Tensor:
    """Boolean (T, S) mask from absolute query positions (T,) and key positions (S,).

    A key is visible when it exists (position >= 0; caches mark empty slots with -1), is not in
    the future (k <= q) and, with a sliding `window`, is one of the query's last `window`
    positions (k > q - window). Built in chapter 2 (causal) and chapter 4 (window).
    """
    q = q_pos[:, None]  # (T, 1)
    k = k_pos[None, :]  # (1, S)
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= k > q - window
    return mask


def attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Scaled dot-product attention written out: softmax(q kᵀ / √D) v.

    q: (..., T, D), k and v: (..., S, D), mask broadcastable to (..., T, S), True = attend.
    Returns the output (..., T, D) and the attention weights (..., T, S), which the heatmaps
    plot. This is the definition every faster path is tested against. Built in chapter 2.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (..., T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return weights @ v, weights


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> Tensor:
    """Fast attention through PyTorch's fused kernel (`F.scaled_dot_product_attention`).

    `is_causal=True` asks the kernel for its own causal mask, which is only right when T == S
    (its mask is aligned top-left); callers pass an explicit `mask` in every other case.
    Built in chapter 2.
    """
    if is_causal and q.size(-2) != k.size(-2):
        raise ValueError(
            f"is_causal=True needs as many queries as keys (got T={q.size(-2)}, S={k.size(-2)}); "
            "pass an explicit mask built with attention_mask instead"
        )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, Hkv, S, D) -> (B, Hkv * n_rep, S, D): share each key/value head among n_rep query heads.

    This is how grouped-query attention is computed: the cache stores only Hkv heads (that is
    the memory saving) and they are broadcast to the H query heads at attention time.
    Built in chapter 2.
    """
    if n_rep == 1:
        return x
    B, Hkv, S, D = x.shape
    return x[:, :, None].expand(B, Hkv, n_rep, S, D).reshape(B, Hkv * n_rep, S, D)


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    """(B, T, H·D) -> (B, H, T, D): one slice of the channels per head. Built in chapter 2."""
    B, T, _ = x.shape
    return x.view(B, T, n_heads, -1).transpose(1, 2)  # (B, T, H*D) -> (B, H, T, D)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, T, D) -> (B, T, H·D), the inverse of `split_heads`. Built in chapter 2."""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)  # (B, H, T, D) -> (B, T, H*D)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, D) queries or keys by their positions; cos/sin are (T, D).

    Pairs are (i, i + D/2) — the "rotate half" layout used by Llama-family checkpoints, so
    their weights load without permutation. Built in chapter 3.
    """
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class AttentionBase(nn.Module):
    """Shared head bookkeeping and the final attend + output projection."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None, bias: bool, dropout: float):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if n_kv_heads < 1 or n_heads % n_kv_heads != 0:
            raise ValueError(f"n_kv_heads={n_kv_heads} must be >= 1 and divide n_heads={n_heads}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def attend_and_project(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, return_weights: bool
    ) -> Tensor | tuple[Tensor, Tensor]:
        n_rep = self.n_heads // self.n_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, H, S, D)
        if return_weights:  # the slow, explicit path: the weights are what we want to see
            if is_causal:
                mask = causal_mask(q.size(-2), k.size(-2), device=q.device)
            y, weights = attention_reference(q, k, v, mask)
            return self.out(merge_heads(y)), weights
        p = self.dropout if self.training else 0.0
        y = attend(q, k, v, mask, is_causal=is_causal, dropout_p=p)  # (B, H, T, D)
        return self.out(merge_heads(y))


class SelfAttention(AttentionBase):
    """Multi-head (or grouped-query) self-attention with an optional KV cache.

    One fused projection makes queries, keys and values: a single matrix multiply is faster
    than three when decoding one token at a time. `forward` takes the attention mask from the
    caller because it depends only on positions, so the model builds it once for all layers.
    Built in chapter 2; the cache arrives in chapter 4.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        *,
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__(d_model, n_heads, n_kv_heads, bias, dropout)
        kv_dim = self.n_kv_heads * self.head_dim
        self.qkv = nn.Linear(d_model, d_model + 2 * kv_dim, bias=bias)

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
        cache=None,
        input_pos: Tensor | None = None,
        return_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x: (B, T, C) -> (B, T, C). With a `cache`, the new keys/values are stored at
        `input_pos` and attention runs over everything the cache returns."""
        kv_dim = self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([self.d_model, kv_dim, kv_dim], dim=-1)
        q = split_heads(q, self.n_heads)  # (B, H, T, D)
        k = split_heads(k, self.n_kv_heads)  # (B, Hkv, T, D)
        v = split_heads(v, self.n_kv_heads)  # (B, Hkv, T, D)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, input_pos)  # (B, Hkv, S, D)
            if hasattr(cache, "observe"):  # an evicting cache scores its keys by the attention they get (ch. 11)
                cache.observe(q)
        return self.attend_and_project(q, k, v, mask, is_causal, return_weights)


class CrossAttention(AttentionBase):
    """Attention from decoder queries to encoder outputs ("memory").

    Keys and values depend only on the memory, so a decoder computes them once per source
    sequence (`project_memory`) and reuses them at every step. Built in chapter 8.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        *,
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__(d_model, n_heads, n_kv_heads, bias, dropout)
        kv_dim = self.n_kv_heads * self.head_dim
        self.q = nn.Linear(d_model, d_model, bias=bias)
        self.kv = nn.Linear(d_model, 2 * kv_dim, bias=bias)

    def project_memory(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """memory: (B, S, C) -> keys and values, each (B, Hkv, S, D)."""
        k, v = self.kv(memory).chunk(2, dim=-1)
        return split_heads(k, self.n_kv_heads), split_heads(v, self.n_kv_heads)

    def forward(
        self,
        x: Tensor,
        memory_kv: tuple[Tensor, Tensor],
        *,
        mask: Tensor | None = None,
        return_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x: (B, T, C) queries; memory_kv from `project_memory`; mask (B, 1, 1, S) hides padding."""
        q = split_heads(self.q(x), self.n_heads)  # (B, H, T, D)
        k, v = memory_kv
        return self.attend_and_project(q, k, v, mask, False, return_weights)
