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
`cache_quality(windows=200)`, KL 2.2e-5 -> 7.5e-6 nats. Greedy texts can still part at a near-tie
(a top-2 gap far below these changes): see `cache_quality`'s per-prompt report. Attention
itself still runs in the model's dtype: the cache dequantizes what it returns, so the saving is
in what is *kept*, not in the arithmetic.

The two layer caches here have the same interface as `kvlab.cache`'s (key_positions, update,
reset, length, nbytes) and are made by `model.new_cache(..., quantize="int8")`.
Built in chapter 10.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .cache import SlidingWindowLayerCache, StaticLayerCache

__all__ = ["QUANTIZE_KINDS", "GROUP_SIZE", "group_size", "quantize_int8", "dequantize_int8",
           "Int8StaticLayerCache", "Int8SlidingWindowLayerCache", "cache_quality"]

QUANTIZE_KINDS = (None, "int8")
GROUP_SIZE = 32  # channels sharing one scale and one offset


def group_size(head_dim: int) -> int:
    """Channels per group for vectors of `head_dim`: 32, or the largest divisor of 32 that divides
    head_dim (8 for head_dim 8, 16 for 48). Built in chapter 10."""
    return math.gcd(head_dim, GROUP_SIZE)


def _round_up(x: Tensor) -> Tensor:
    """float32 -> the smallest float16 >= x (x >= 0), so a step never shrinks in storage."""
    h = x.to(torch.float16)
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, math.inf)), h)


def _round_down(x: Tensor) -> Tensor:
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
    lo = _round_down(xg.amin(-1))  # (..., G) float16
    step = _round_up((xg.amax(-1) - lo.float()) / 255.0)
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


def make_int8_layers(kind: str, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, *,
                     max_seq_len: int | None, window: int | None, device, dtype) -> list:
    """The int8 layer caches for `KVCache.create(..., quantize="int8")` (arguments already checked)."""
    if kind == "static":
        return [Int8StaticLayerCache(batch_size, n_kv_heads, head_dim, max_seq_len, device=device, dtype=dtype)
                for _ in range(n_layers)]
    if kind == "sliding":
        return [Int8SlidingWindowLayerCache(batch_size, n_kv_heads, head_dim, window, device=device, dtype=dtype)
                for _ in range(n_layers)]
    raise ValueError(f"quantize='int8' works with kind 'static' or 'sliding', not kind={kind!r}")


# -- measuring ------------------------------------------------------------------------------------


@torch.no_grad()
def cache_quality(model, val_ids: Tensor, prompts: list[Tensor], *, quantize: str = "int8", windows: int = 64,
                  block_size: int | None = None, new_tokens: int = 256, batch_size: int = 16) -> dict:
    """How much a quantized cache changes a model, against the float cache of its own dtype.

    Teacher-forced, over `windows` consecutive windows of `val_ids` (each run through a fresh
    static cache, so every key is read back from the cache): mean KL(p_float || p_quantized)
    per position, top-1 agreement, and the validation loss with each cache. Free-running, for
    each prompt (1, T): `new_tokens` greedy tokens with each sliding/static cache, the fraction
    of positions that agree and the first position that differs (with the float model's top-2
    logit gap there and the largest change the quantized cache made to a logit), plus the
    agreement of the quantized cache's greedy choice along the float text (teacher-forced). Also the bytes of
    each cache for one `new_tokens`-token sequence, float32 and bfloat16 by the formula.
    Built in chapter 10.
    """
    import torch.nn.functional as F

    from .cache import kv_cache_bytes
    from .generate import generate

    c = model.config
    block = block_size or c.max_seq_len
    n = min(windows, (val_ids.numel() - 1) // block)
    if n < 1:
        raise ValueError(f"val_ids has {val_ids.numel()} tokens; it needs more than block_size={block}")
    ids = val_ids[: n * block + 1].to(model.device)
    x_all, y_all = ids[:-1].view(n, block), ids[1:].view(n, block)
    kl = agree = loss_f = loss_q = 0.0
    for i in range(0, n, batch_size):
        x, y = x_all[i: i + batch_size], y_all[i: i + batch_size]
        B = x.size(0)
        lf = model(x, model.new_cache(B, max_seq_len=block)).float().log_softmax(-1)  # (B, T, V)
        lq = model(x, model.new_cache(B, max_seq_len=block, quantize=quantize)).float().log_softmax(-1)
        kl += float(F.kl_div(lq, lf, log_target=True, reduction="sum"))
        agree += float((lf.argmax(-1) == lq.argmax(-1)).sum())
        loss_f += float(F.nll_loss(lf.flatten(0, 1), y.flatten(), reduction="sum"))
        loss_q += float(F.nll_loss(lq.flatten(0, 1), y.flatten(), reduction="sum"))
    positions = n * block
    slides = c.pos == "rope" and c.window is not None
    kind = dict(kind="sliding") if slides else {}
    greedy = []
    for idx in prompts:
        T = idx.size(1)
        size = {} if slides else dict(max_seq_len=T + new_tokens)
        a = generate(model, idx, new_tokens, temperature=0, cache=model.new_cache(1, **kind, **size))
        b = generate(model, idx, new_tokens, temperature=0,
                     cache=model.new_cache(1, **kind, **size, quantize=quantize))
        same = (a[0, T:] == b[0, T:]).cpu()
        differs = (~same).nonzero()
        # Teacher-forced along the float text: does the quantized cache choose the same next token?
        cache = model.new_cache(1, **kind, **size, quantize=quantize)
        logits = model(a[:, :-1], cache)[0, T - 1:]  # (new_tokens, V)
        first = int(differs[0]) if differs.numel() else None
        entry = dict(agreement=float(same.float().mean()), first_difference=first,
                     agreement_along_float_text=float((logits.argmax(-1) == a[0, T:]).float().mean()))
        if first is not None:  # how close a call it was: the float model's top-2 logit gap there
            float_logits = model(a[:, :T + first], model.new_cache(1, **kind, **size))[0, -1]  # predicts new token `first`
            top2 = float_logits.float().topk(2).values
            entry["top2_gap_at_first_difference"] = float(top2[0] - top2[1])
            entry["logit_change_at_first_difference"] = float((logits[first] - float_logits).abs().max())
        greedy.append(entry)
    per_token = dict(n_layers=c.n_layers, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim, seq_len=new_tokens)
    q_bytes = model.new_cache(1, max_seq_len=new_tokens, quantize=quantize).nbytes
    fp32 = kv_cache_bytes(**per_token, dtype=torch.float32)
    bf16 = kv_cache_bytes(**per_token, dtype=torch.bfloat16)
    return {
        "quantize": quantize, "windows": n, "positions": positions,
        "kl_nats": kl / positions, "top1_agreement": agree / positions,
        "val_loss_float": loss_f / positions, "val_loss_quantized": loss_q / positions,
        "val_loss_change": (loss_q - loss_f) / positions,
        "greedy": greedy,
        "greedy_agreement": sum(g["agreement"] for g in greedy) / max(len(greedy), 1),
        "greedy_agreement_along_float_text": sum(g["agreement_along_float_text"] for g in greedy) / max(len(greedy), 1),
        "bytes": {"float32": fp32, "bfloat16": bf16, quantize: q_bytes},
        "ratio_to_float32": q_bytes / fp32, "ratio_to_bfloat16": q_bytes / bf16,
    }
