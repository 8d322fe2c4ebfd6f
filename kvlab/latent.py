"""Multi-head latent attention (MLA, DeepSeek-V2): cache one small latent per token, not keys and values.

Shape legend:
    B  batch size           T  tokens fed in this call      S  positions attended over
    C  d_model              H  query heads                  Dn head_dim (d_model // n_heads), per-head
                                                               key ("no position" part) and value width
    Dc kv_latent_dim, the width of the cached latent c_kv
    Dr rope_head_dim, the width of the decoupled RoPE part of each query and of the one shared RoPE key

What one layer computes for a token x (C):
    c_kv   = RMSNorm(W_dkv x)                 (Dc)      the latent: the only thing cached besides k_rope
    k_rope = RoPE(W_kr x)                     (Dr)      one RoPE key shared by all heads (cached)
    q_h    = [W_q,h x, RoPE(W_qr,h x)]        (Dn + Dr) per head: a "no position" part and a RoPE part
    k_h    = [W_uk,h c_kv, k_rope]            (Dn + Dr) keys decompressed from the latent
    v_h    = W_uv,h c_kv                      (Dn)
and then ordinary attention with scale 1/sqrt(Dn + Dr), heads merged, output projection W_o.

Two ways to run the same numbers:
    naive     decompress every cached latent into H keys and values, then attend (cheap when T == S:
              training and prefill)
    absorbed  q_h·k_h = (W_uk,hᵀ q_h)·c_kv + q_rope,h·k_rope: fold W_uk into the query, attend against
              the cached latents themselves (one shared "key" of Dc + Dr numbers, like multi-query
              attention), and apply W_uv,h after the weighted sum, right before W_o (W_o·W_uv could
              even be multiplied ahead of time). No per-head key or value is ever built.
Why the RoPE part is separate: RoPE rotates a key by its position, and a rotation sitting between
W_uk and the query would depend on both positions, so W_uk could not be folded into the query. So
positions get their own small key, Dr numbers per token, and the latent stays position-free.

A model with learned or sinusoidal positions (added to the residual stream) needs no RoPE part:
Dr = 0 and the cache holds the latent alone.

The cache per layer per token: Dc + Dr numbers instead of 2·Hkv·Dn. The layer caches here are
chapter 4's, holding the latent in the slot for keys and the RoPE key in the slot for values, so
`update`, `reorder`, `save` and `crop` are theirs unchanged. Built in chapter 11.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import apply_rope, causal_mask, merge_heads, split_heads
from .cache import CACHE_KINDS, DynamicLayerCache, KVCache, SlidingWindowLayerCache, StaticLayerCache
from .layers import RMSNorm
from .validation import check_positive_int

__all__ = ["MLA_FORMS", "latent_cache_bytes", "kv_bytes_per_token", "LatentDynamicLayerCache",
           "LatentStaticLayerCache", "LatentSlidingWindowLayerCache", "latent_cache", "MultiHeadLatentAttention",
           "set_mla_form"]

MLA_FORMS = ("auto", "naive", "absorbed")


# -- how many bytes --------------------------------------------------------------------------


def latent_cache_bytes(n_layers: int, kv_latent_dim: int, rope_head_dim: int, seq_len: int, batch_size: int = 1,
                       dtype: torch.dtype = torch.float32) -> int:
    """Bytes an MLA cache needs: layers × (Dc + Dr) × tokens × batch × bytes per number.

    DeepSeek-V2 (60 layers, Dc = 512, Dr = 64) in bfloat16 keeps 60·576·2 = 69,120 bytes per
    token; the same 60 layers as 128-head multi-head attention with Dn = 128 would keep
    60·2·128·128·2 = 3,932,160. Built in chapter 11.
    """
    for name, value in [("n_layers", n_layers), ("kv_latent_dim", kv_latent_dim), ("rope_head_dim", rope_head_dim),
                        ("seq_len", seq_len), ("batch_size", batch_size)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    return n_layers * (kv_latent_dim + rope_head_dim) * seq_len * batch_size * itemsize


def kv_bytes_per_token(config, dtype: torch.dtype = torch.float32) -> int:
    """Bytes one token adds to a GPT's cache, for any `GPTConfig`: n_layers · 2 · Hkv · D for
    multi-head, grouped-query and multi-query attention, n_layers · (Dc + Dr) for latent attention.
    Built in chapter 11."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if getattr(config, "attention", "mha") == "mla":
        return config.n_layers * (config.kv_latent_dim + config.rope_head_dim) * itemsize
    return config.n_layers * 2 * config.n_kv_heads * config.head_dim * itemsize


# -- the layer caches: chapter 4's, holding (latent, RoPE key) ------------------------------


def _row_bytes(layer) -> int:
    return sum(t.numel() * t.element_size() for t in (layer.k, layer.v) if t is not None)


class _Names:
    """Read the two slots by what they hold in a latent cache."""

    @property
    def latent(self) -> Tensor | None:
        """The cached latents c_kv, (B, 1, slots, Dc)."""
        return self.k

    @property
    def rope_key(self) -> Tensor | None:
        """The cached RoPE keys, already rotated, (B, 1, slots, Dr)."""
        return self.v

    @property
    def nbytes(self) -> int:
        return _row_bytes(self)


class LatentDynamicLayerCache(_Names, DynamicLayerCache):
    """Chapter 4's concatenating cache fed (latent, RoPE key) instead of (key, value).
    Built in chapter 11."""


class LatentStaticLayerCache(_Names, StaticLayerCache):
    """Chapter 4's preallocated cache with N slots of (latent (Dc), RoPE key (Dr)) per row.
    Built in chapter 11."""

    def __init__(self, batch_size: int, kv_latent_dim: int, rope_head_dim: int, max_seq_len: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.k = torch.zeros(batch_size, 1, max_seq_len, kv_latent_dim, device=device, dtype=dtype)  # (B, 1, N, Dc)
        self.v = torch.zeros(batch_size, 1, max_seq_len, rope_head_dim, device=device, dtype=dtype)  # (B, 1, N, Dr)
        self.max_seq_len = max_seq_len
        self.length = 0


class LatentSlidingWindowLayerCache(_Names, SlidingWindowLayerCache):
    """Chapter 4's ring of W slots holding (latent, RoPE key). The RoPE key is cached already
    rotated, so a slot keeps its absolute position (`pos`), as in the float ring. Built in chapter 11."""

    def __init__(self, batch_size: int, kv_latent_dim: int, rope_head_dim: int, window: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.k = torch.zeros(batch_size, 1, window, kv_latent_dim, device=device, dtype=dtype)  # (B, 1, W, Dc)
        self.v = torch.zeros(batch_size, 1, window, rope_head_dim, device=device, dtype=dtype)  # (B, 1, W, Dr)
        self.pos = torch.full((window,), -1, dtype=torch.long, device=device)  # position in each slot
        self.window = window
        self.length = 0


def latent_cache(kind: str, *, n_layers: int, batch_size: int, kv_latent_dim: int, rope_head_dim: int,
                 max_seq_len: int | None = None, window: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> KVCache:
    """A `KVCache` of latent layer caches: what `model.new_cache(...)` returns for an MLA model.
    Arguments are validated before anything is allocated. Built in chapter 11."""
    if kind not in CACHE_KINDS:
        raise ValueError(f"kind must be one of {CACHE_KINDS}, got {kind!r}")
    check_positive_int("n_layers", n_layers)
    check_positive_int("batch_size", batch_size)
    check_positive_int("kv_latent_dim", kv_latent_dim)
    if isinstance(rope_head_dim, bool) or not isinstance(rope_head_dim, int) or rope_head_dim < 0:
        raise ValueError(f"rope_head_dim must be an int >= 0, got {rope_head_dim!r}")
    shape = dict(device=device, dtype=dtype)
    if kind == "static":
        check_positive_int("max_seq_len", max_seq_len)
        layers = [LatentStaticLayerCache(batch_size, kv_latent_dim, rope_head_dim, max_seq_len, **shape)
                  for _ in range(n_layers)]
        cache = KVCache(layers, kind, max_seq_len=max_seq_len, batch_size=batch_size)
    elif kind == "sliding":
        check_positive_int("window", window)
        layers = [LatentSlidingWindowLayerCache(batch_size, kv_latent_dim, rope_head_dim, window, **shape)
                  for _ in range(n_layers)]
        cache = KVCache(layers, kind, window=window, batch_size=batch_size)
    else:
        if window is not None:
            raise ValueError("window is only used by kind='sliding'")
        cache = KVCache([LatentDynamicLayerCache() for _ in range(n_layers)], kind, batch_size=batch_size)
    cache.latent = True  # what it holds: (latent, RoPE key) per token, not keys and values
    return cache


# -- the attention layer ---------------------------------------------------------------------


class MultiHeadLatentAttention(nn.Module):
    """Latent attention (DeepSeek-V2's MLA) with a decoupled RoPE key, in a naive and an absorbed form.

    Called like `SelfAttention` (x, mask, is_causal, rope, cache, input_pos, return_weights) and fed
    the RoPE tables for Dr, not D. `form` picks the computation: "naive" (decompress, then attend),
    "absorbed" (attend against the latents) or "auto" (absorbed for a decode step that reads a
    cache, naive otherwise, as servers do). Unlike DeepSeek-V2 the query is not compressed (at this
    size it saves nothing worth a second norm) and the up-projections have no bias (a key bias would
    not fold into the query). Built in chapter 11.
    """

    def __init__(self, d_model: int, n_heads: int, kv_latent_dim: int, rope_head_dim: int, *, bias: bool = True,
                 dropout: float = 0.0, norm_eps: float = 1e-5):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        check_positive_int("kv_latent_dim", kv_latent_dim)
        if isinstance(rope_head_dim, bool) or not isinstance(rope_head_dim, int) or rope_head_dim < 0 \
                or rope_head_dim % 2:
            raise ValueError(f"rope_head_dim must be an even int >= 0, got {rope_head_dim!r}")
        self.d_model, self.n_heads = d_model, n_heads
        self.head_dim = Dn = d_model // n_heads
        self.kv_latent_dim, self.rope_head_dim = Dc, Dr = kv_latent_dim, rope_head_dim
        self.dropout = dropout
        self.scale = 1.0 / math.sqrt(Dn + Dr)  # the query·key width, as if keys were built in full
        self.q = nn.Linear(d_model, n_heads * (Dn + Dr), bias=bias)  # W_q and W_qr, per head [Dn | Dr]
        self.kv_down = nn.Linear(d_model, Dc + Dr, bias=bias)  # W_dkv and W_kr: [latent | RoPE key]
        self.kv_norm = RMSNorm(Dc, eps=norm_eps)
        self.k_up = nn.Linear(Dc, n_heads * Dn, bias=False)  # W_uk
        self.v_up = nn.Linear(Dc, n_heads * Dn, bias=False)  # W_uv
        self.out = nn.Linear(d_model, d_model, bias=bias)  # W_o
        self.form = "auto"

    def project(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x (B, T, C) -> q_nope (B, H, T, Dn), q_rope (B, H, T, Dr), latent (B, 1, T, Dc), k_rope (B, 1, T, Dr):
        what every form starts from; the last two are what the cache keeps."""
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, -1).transpose(1, 2)  # (B, H, T, Dn + Dr)
        q_nope, q_rope = q.split([self.head_dim, self.rope_head_dim], dim=-1)
        latent, k_rope = self.kv_down(x).split([self.kv_latent_dim, self.rope_head_dim], dim=-1)
        latent = self.kv_norm(latent)[:, None]  # (B, T, Dc) -> (B, 1, T, Dc): one "head" shared by all
        k_rope = k_rope[:, None]  # (B, 1, T, Dr)
        if rope is not None:
            cos, sin = rope
            q_rope, k_rope = apply_rope(q_rope, cos, sin), apply_rope(k_rope, cos, sin)
        return q_nope, q_rope, latent, k_rope

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool,
                return_weights: bool) -> tuple[Tensor, Tensor | None]:
        """softmax(q kᵀ · scale) v over (B, H, T, ·) queries and (B, H or 1, S, ·) keys and values."""
        if return_weights:  # written out: the weights are what the caller wants to see
            if is_causal:
                mask = causal_mask(q.size(-2), k.size(-2), device=q.device)
            scores = q @ k.transpose(-2, -1) * self.scale  # (B, H, T, S)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(scores, dim=-1)
            return weights @ v, weights
        H = q.size(1)
        k = k.expand(-1, H, -1, -1)  # one shared latent "head" seen by every query head: a view, no copy
        v = v.expand(-1, H, -1, -1)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=p,
                                           scale=self.scale)
        return y, None

    def attend_naive(self, q_nope, q_rope, latent, k_rope, mask=None, is_causal=False, return_weights=False):
        """Decompress the (cached) latents into per-head keys and values, then attend: (B, H, T, Dn)."""
        B, _, S, _ = latent.shape
        k_nope = split_heads(self.k_up(latent[:, 0]), self.n_heads)  # (B, S, H*Dn) -> (B, H, S, Dn)
        v = split_heads(self.v_up(latent[:, 0]), self.n_heads)  # (B, H, S, Dn)
        k = torch.cat([k_nope, k_rope.expand(B, self.n_heads, S, self.rope_head_dim)], dim=-1)  # (B, H, S, Dn + Dr)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, H, T, Dn + Dr)
        return self._attend(q, k, v, mask, is_causal, return_weights)

    def attend_absorbed(self, q_nope, q_rope, latent, k_rope, mask=None, is_causal=False, return_weights=False):
        """Attend against the latents themselves, W_uk folded into the query and W_uv applied after
        the weighted sum: (B, H, T, Dn). Equal to `attend_naive` up to rounding."""
        H, Dn, Dc = self.n_heads, self.head_dim, self.kv_latent_dim
        w_uk = self.k_up.weight.view(H, Dn, Dc)  # k_nope,h = W_uk,h c: (Dn, Dc) per head
        w_uv = self.v_up.weight.view(H, Dn, Dc)
        q_latent = q_nope @ w_uk  # (B, H, T, Dn) @ (H, Dn, Dc) -> (B, H, T, Dc): q_hᵀ W_uk,h
        q = torch.cat([q_latent, q_rope], dim=-1)  # (B, H, T, Dc + Dr)
        k = torch.cat([latent, k_rope], dim=-1)  # (B, 1, S, Dc + Dr): the cache, as it is
        y_latent, weights = self._attend(q, k, latent, mask, is_causal, return_weights)  # (B, H, T, Dc)
        return y_latent @ w_uv.transpose(-2, -1), weights  # (B, H, T, Dc) @ (H, Dc, Dn) -> (B, H, T, Dn)

    def forward(self, x: Tensor, *, mask: Tensor | None = None, is_causal: bool = False,
                rope: tuple[Tensor, Tensor] | None = None, cache=None, input_pos: Tensor | None = None,
                return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """x: (B, T, C) -> (B, T, C). With a `cache`, the new latents and RoPE keys are stored at
        `input_pos` and attention runs over everything the cache returns."""
        if self.form not in MLA_FORMS:
            raise ValueError(f"form must be one of {MLA_FORMS}, got {self.form!r}")
        if (rope is None) != (self.rope_head_dim == 0):
            raise ValueError(f"rope_head_dim={self.rope_head_dim} needs RoPE tables of that width"
                             if rope is None else "RoPE tables were passed to a latent attention without a RoPE part")
        q_nope, q_rope, latent, k_rope = self.project(x, rope)
        if cache is not None:
            latent, k_rope = cache.update(latent, k_rope, input_pos)  # (B, 1, S, Dc), (B, 1, S, Dr)
        absorbed = self.form == "absorbed" or (self.form == "auto" and cache is not None and x.size(1) == 1)
        attend = self.attend_absorbed if absorbed else self.attend_naive
        y, weights = attend(q_nope, q_rope, latent, k_rope, mask, is_causal, return_weights)  # (B, H, T, Dn)
        out = self.out(merge_heads(y))
        return (out, weights) if return_weights else out


def set_mla_form(model: nn.Module, form: str) -> None:
    """Run every latent attention layer of `model` in `form` ("auto", "naive" or "absorbed").
    Built in chapter 11."""
    if form not in MLA_FORMS:
        raise ValueError(f"form must be one of {MLA_FORMS}, got {form!r}")
    layers = [m for m in model.modules() if isinstance(m, MultiHeadLatentAttention)]
    if not layers:
        raise ValueError("the model has no latent attention layers (its config.attention is not 'mla')")
    for layer in layers:
        layer.form = form
