"""A quantized KV cache: keys and values stored as int8, with a scale and an offset per group of channels.

Shape legend: B batch, Hkv key/value heads, T tokens fed in this call, S keys returned,
D head_dim, W sliding window, N capacity (max_seq_len), G groups of channels per vector (D / group).

Each key (and each value) vector of D numbers, for one token and one head, is cut into groups of
32 channels (`group_size(D)`). A group x is stored as 32 int8 numbers and two float16 numbers,
its minimum m and its step s = (max x - m) / 255: q = round((x - m) / s) - 128, read back as
(q + 128) * s + m, off by at most s / 2 per number. With D = 64 that is 64 + 2 * (2 + 2) = 72
bytes instead of 256 in float32: 0.28x the memory. The first version of this chapter used one
symmetric scale per vector, s = max|x| / 127 (68 bytes, 0.27x). Measured once on the shipped
model (CPU, float32; teacher-forced along the greedy texts of `kvlab.bench.BEYOND_PROMPTS`): the
mean change of the gap between the two best logits went from 0.0094 to 0.0054, keys causing
about 2.5x the values' share with the old rule; per-channel rescaling of keys did not help. With
`kvlab.bench.cache_quality(windows=200)`, KL 2.2e-5 -> 7.5e-6 nats. Greedy texts can still part at a near-tie
(a top-2 gap far below these changes): see `kvlab.bench.cache_quality`'s per-prompt report. Attention
itself still runs in the model's dtype: the cache dequantizes what it returns, so the saving is
in what is *kept*, not in the arithmetic.

The two layer caches here have the same interface as `kvlab.cache`'s (key_positions, update,
reset, length, nbytes, and chapter 10's reorder, save, crop) and are made by
`model.new_cache(..., quantize="int8")` (`int8_cache`).
Built in chapter 10.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .cache import KVCache, SlidingWindowLayerCache, StaticLayerCache
from .validation import check_positive_int

__all__ = ["QUANTIZE_KINDS", "GROUP_SIZE", "group_size", "float16_up", "float16_down", "quantize_int8", "dequantize_int8",
           "Int8StaticLayerCache", "Int8SlidingWindowLayerCache", "int8_cache"]

QUANTIZE_KINDS = (None, "int8")
GROUP_SIZE = 32  # channels sharing one scale and one offset


def group_size(head_dim: int) -> int:
    """Channels per group for vectors of `head_dim`: 32, or the largest divisor of 32 that divides
    head_dim (8 for head_dim 8, 16 for 48). Built in chapter 10."""
    return math.gcd(head_dim, GROUP_SIZE)


def float16_up(x: Tensor) -> Tensor:
    """float32 -> the smallest float16 >= x (x >= 0), so a step never shrinks in storage."""
    h = x.to(torch.float16)
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, math.inf)), h)


def float16_down(x: Tensor) -> Tensor:
    """float32 -> the largest float16 <= x, so no number falls below a stored minimum."""
    h = x.to(torch.float16)
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, -math.inf)), h)


def quantize_int8(x: Tensor, group: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(..., D) floats -> (..., D) int8, (..., G) float16 steps and (..., G) float16 minimums.

    Asymmetric (min/max) quantization per group of `group` channels (default `group_size(D)`):
    q = round((x - m) / s) - 128 with m the group's minimum and s = (max - m) / 255, both rounded
    outward to float16 so that every q stays in [-128, 127]. A constant group gets step 1, so
    no division by zero. Values must fit float16 (|x| < 65504), as activations do.
    Built in chapter 10.
    """
    D = x.size(-1)
    group = group or group_size(D)
    xg = x.float().unflatten(-1, (D // group, group))  # (..., G, group)
    lo = float16_down(xg.amin(-1))  # (..., G) float16
    step = float16_up((xg.amax(-1) - lo.float()) / 255.0)
    step = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.round((xg - lo.float()[..., None]) / step.float()[..., None]).clamp_(0, 255) - 128
    return q.to(torch.int8).flatten(-2), step, lo


def dequantize_int8(q: Tensor, step: Tensor, lo: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The inverse of `quantize_int8` (up to rounding): (q + 128) * s + m per group, in `dtype`.
    Built in chapter 10."""
    G = step.size(-1)
    qg = q.float().unflatten(-1, (G, q.size(-1) // G))  # (..., G, group)
    return ((qg + 128) * step.float()[..., None] + lo.float()[..., None]).flatten(-2).to(dtype)


ROW_TENSORS = ("k", "v", "k_scale", "v_scale", "k_offset", "v_offset")  # per-row, per-slot tensors of a layer


def _buffers(layer, batch_size, n_kv_heads, head_dim, slots, device) -> None:
    """Allocate a layer's int8 numbers (B, Hkv, slots, D) and float16 steps/minimums (B, Hkv, slots, G)."""
    shape = (batch_size, n_kv_heads, slots, head_dim)
    groups = shape[:-1] + (head_dim // group_size(head_dim),)
    for name in ("k", "v"):
        setattr(layer, name, torch.full(shape, -128, device=device, dtype=torch.int8))  # an empty slot reads 0
        setattr(layer, name + "_scale", torch.ones(groups, device=device, dtype=torch.float16))
        setattr(layer, name + "_offset", torch.zeros(groups, device=device, dtype=torch.float16))


def _nbytes(layer) -> int:
    return sum(t.numel() * t.element_size() for t in (getattr(layer, n) for n in ROW_TENSORS))


class Int8StaticLayerCache:
    """The preallocated cache of chapter 4, holding int8 keys/values with their steps and minimums.

    `update` quantizes the new keys and values, writes them at `input_pos`, and returns the
    dequantized prefix [0, end) in the model's dtype. Built in chapter 10.
    """

    kind = "static"

    def __init__(
        self, batch_size: int, n_kv_heads: int, head_dim: int, max_seq_len: int,
        *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
    ) -> None:
        _buffers(self, batch_size, n_kv_heads, head_dim, max_seq_len, device)
        self.dtype = dtype  # what `update` returns
        self.max_seq_len = max_seq_len
        self.length = 0

    key_positions = StaticLayerCache.key_positions  # the same positions as the float cache
    # reorder, save, crop and mark_written work on the tensors named in `row_tensors`: the float
    # cache's own, applied to the int8 numbers with their steps and minimums.
    row_tensors = ROW_TENSORS
    reorder, save, crop, mark_written = (StaticLayerCache.reorder, StaticLayerCache.save, StaticLayerCache.crop,
                                         StaticLayerCache.mark_written)

    def update(self, k: Tensor, v: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        start, end = int(input_pos[0]), int(input_pos[-1]) + 1
        self.k[:, :, start:end], self.k_scale[:, :, start:end], self.k_offset[:, :, start:end] = quantize_int8(k)
        self.v[:, :, start:end], self.v_scale[:, :, start:end], self.v_offset[:, :, start:end] = quantize_int8(v)
        self.length = end  # writing at an earlier position rewinds the cache
        k_all = dequantize_int8(self.k[:, :, :end], self.k_scale[:, :, :end], self.k_offset[:, :, :end],
                                self.dtype)  # (B, Hkv, S, D)
        v_all = dequantize_int8(self.v[:, :, :end], self.v_scale[:, :, :end], self.v_offset[:, :, :end], self.dtype)
        return k_all, v_all

    def reset(self) -> None:
        self.length = 0

    @property
    def nbytes(self) -> int:
        return _nbytes(self)


class Int8SlidingWindowLayerCache:
    """The ring buffer of chapter 4 (position p in slot p mod W), holding int8 keys/values.

    Same rules as `kvlab.cache.SlidingWindowLayerCache`: a decode step writes first and
    returns the ring; a multi-token step returns ring + new tokens, then keeps the last W.
    New keys are quantized before they are used, so a token's key reads the same whether it
    arrived in a chunk or alone. Built in chapter 10.
    """

    kind = "sliding"

    def __init__(
        self, batch_size: int, n_kv_heads: int, head_dim: int, window: int,
        *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
    ) -> None:
        _buffers(self, batch_size, n_kv_heads, head_dim, window, device)
        self.pos = torch.full((window,), -1, dtype=torch.long, device=device)  # position in each slot
        self.dtype = dtype
        self.window = window
        self.length = 0

    key_positions = SlidingWindowLayerCache.key_positions  # the same ring bookkeeping as the float cache
    row_tensors = ROW_TENSORS
    reorder, save, crop, mark_written = (SlidingWindowLayerCache.reorder, SlidingWindowLayerCache.save,
                                         SlidingWindowLayerCache.crop, SlidingWindowLayerCache.mark_written)

    def _ring(self) -> tuple[Tensor, Tensor]:
        return (dequantize_int8(self.k, self.k_scale, self.k_offset, self.dtype),  # (B, Hkv, W, D)
                dequantize_int8(self.v, self.v_scale, self.v_offset, self.dtype))

    def _write(self, slots, new: dict, sel) -> None:
        for name, t in new.items():
            getattr(self, name)[:, :, slots] = t[:, :, sel]

    def update(self, k: Tensor, v: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        start, T = int(input_pos[0]), k.size(2)
        qk, qv = quantize_int8(k), quantize_int8(v)  # each (int8 (B, Hkv, T, D), steps, minimums (B, Hkv, T, G))
        new = dict(zip(ROW_TENSORS, (qk[0], qv[0], qk[1], qv[1], qk[2], qv[2])))
        if T == 1:
            slot = start % self.window
            self._write(slot, new, 0)
            self.pos[slot] = start
            self.length = start + 1
            return self._ring()
        ring_k, ring_v = self._ring()
        k_all = torch.cat([ring_k, dequantize_int8(*qk, self.dtype)], dim=2)  # (B, Hkv, W + T, D)
        v_all = torch.cat([ring_v, dequantize_int8(*qv, self.dtype)], dim=2)
        keep = min(T, self.window)  # only the last W new tokens survive in the ring
        positions = torch.arange(start + T - keep, start + T, device=self.pos.device)
        slots = positions % self.window
        self._write(slots, new, slice(T - keep, T))
        self.pos[slots] = positions
        self.length = start + T
        return k_all, v_all

    def reset(self) -> None:
        self.pos.fill_(-1)
        self.length = 0

    @property
    def nbytes(self) -> int:
        return _nbytes(self)


def int8_cache(kind: str, *, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int,
               max_seq_len: int | None = None, window: int | None = None,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> KVCache:
    """A `KVCache` of int8 layer caches (kind "static" or "sliding"); what
    `model.new_cache(..., quantize="int8")` returns. Arguments are validated before anything is
    allocated. Built in chapter 10."""
    if kind not in ("static", "sliding"):
        raise ValueError(f"quantize='int8' works with kind 'static' or 'sliding', not kind={kind!r}")
    check_positive_int("batch_size", batch_size)
    if kind == "static":
        check_positive_int("max_seq_len", max_seq_len)
        layers = [Int8StaticLayerCache(batch_size, n_kv_heads, head_dim, max_seq_len, device=device, dtype=dtype)
                  for _ in range(n_layers)]
        cache = KVCache(layers, kind, max_seq_len=max_seq_len, batch_size=batch_size)
    else:
        check_positive_int("window", window)
        layers = [Int8SlidingWindowLayerCache(batch_size, n_kv_heads, head_dim, window, device=device, dtype=dtype)
                  for _ in range(n_layers)]
        cache = KVCache(layers, kind, window=window, batch_size=batch_size)
    cache.quantize = "int8"
    return cache
