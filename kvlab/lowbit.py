"""Low-bit caches: keys quantized per channel, values per token, the newest tokens kept exact (KIVI).

Shape legend: B batch, Hkv key/value heads, T tokens fed in this call, S keys returned,
D head_dim, G tokens per quantized group, R tokens kept in full precision.

Chapter 10's int8 cache gives every vector of D numbers its own minimum and step. At 4 or 2 bits
that is not enough: a few key *channels* carry large values in every token (outliers live in
channels), so one step per token is sized by the outlier and rounds the other channels to almost
nothing. KIVI's answer, built here:

- keys per channel: a group of G consecutive tokens is quantized together, each channel with
  its own minimum and step, taken over those G tokens;
- values per token: each value vector with its own minimum and step, as in chapter 10;
- the newest tokens stay in full precision: the cache quantizes a group only when more than R
  exact tokens are waiting, so between R and R + G - 1 recent tokens are always exact (the
  attention of the next query leans most on them).

A b-bit code is an integer 0 .. 2^b - 1, packed 8/b to a byte; each minimum and step is float16.
Per token and head that is b·D/8 bytes of key codes plus 4·D/G of key statistics, and b·D/8 of
value codes plus 4 of value statistics (D ≤ 32; one pair per 32 channels above that); `nbytes`
counts exactly the tensors held. Attention still runs in the model's dtype on the dequantized
keys and values, rebuilt at every read: the saving is in what is kept. Chapter 10's `reorder` and
`crop` are not offered (a crop would have to split a quantized group). Built in chapter 11.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .cache import KVCache
from .quantized import float16_down, float16_up, group_size
from .validation import check_choice, check_positive_int

__all__ = ["LOWBIT_BITS", "quantize_per_channel", "quantize_per_token", "dequantize", "pack_codes",
           "unpack_codes", "LowBitLayerCache", "lowbit_cache", "lowbit_bytes_per_token"]

LOWBIT_BITS = (2, 4, 8)


def _min_step(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """float16 minimum and step for the range [lo, hi] and 2^bits levels, rounded outward as chapter 10
    does (the minimum down, the step up), so the levels still cover the range after float16 rounding;
    a zero range gets step 1."""
    lo16 = float16_down(lo)
    step = (hi - lo16.float()) / (2 ** bits - 1)
    step = torch.where(step > 0, step, torch.ones_like(step))
    return lo16, float16_up(step)


def _codes(x: Tensor, lo: Tensor, step: Tensor, bits: int) -> Tensor:
    return ((x - lo.float()) / step.float()).round().clamp(0, 2 ** bits - 1).to(torch.uint8)


def quantize_per_channel(x: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """x (..., G, D): G tokens of D channels -> (codes (..., G, D) uint8, lo (..., 1, D), step (..., 1, D)),
    each channel with its own float16 minimum and step over the G tokens. KIVI's keys. Built in
    chapter 11."""
    check_choice("bits", bits, LOWBIT_BITS)
    lo, step = _min_step(x.amin(dim=-2, keepdim=True), x.amax(dim=-2, keepdim=True), bits)
    return _codes(x, lo, step, bits), lo, step


def quantize_per_token(x: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """x (..., T, D) -> (codes (..., T, D) uint8, lo (..., T, n), step (..., T, n)): each token's vector,
    cut into n groups of `group_size(D)` channels, with a float16 minimum and step per group.
    KIVI's values (and chapter 10's rule). Built in chapter 11."""
    check_choice("bits", bits, LOWBIT_BITS)
    D = x.size(-1)
    g = group_size(D)
    grouped = x.unflatten(-1, (D // g, g))  # (..., T, n, g)
    lo, step = _min_step(grouped.amin(dim=-1), grouped.amax(dim=-1), bits)  # (..., T, n)
    codes = _codes(grouped, lo[..., None], step[..., None], bits)
    return codes.flatten(-2), lo, step


def dequantize(codes: Tensor, lo: Tensor, step: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Codes back to numbers: code · step + lo, with lo and step either per channel (..., 1, D) or
    per token and group (..., T, n). Built in chapter 11."""
    if lo.size(-1) in (1, codes.size(-1)):  # one pair per channel, or per token when one group spans D
        return (codes.to(torch.float32) * step.float() + lo.float()).to(dtype)
    n = lo.size(-1)
    grouped = codes.unflatten(-1, (n, codes.size(-1) // n)).to(torch.float32)
    return (grouped * step.float()[..., None] + lo.float()[..., None]).flatten(-2).to(dtype)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes (..., D) of `bits` bits -> (..., D·bits/8) bytes, 8/bits codes per byte."""
    per = 8 // bits
    c = codes.unflatten(-1, (codes.size(-1) // per, per))  # (..., D/per, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.uint8) * bits
    return (c << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_codes(packed: Tensor, bits: int) -> Tensor:
    """The inverse of pack_codes: (..., D·bits/8) bytes -> (..., D) codes."""
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
    return ((packed[..., None] >> shifts) & (2 ** bits - 1)).flatten(-2)


def lowbit_bytes_per_token(n_kv_heads: int, head_dim: int, bits: int, group: int) -> float:
    """Bytes per token and layer of the quantized part (codes + float16 statistics), as stated in the
    module docstring; the exact recent tokens cost what the model's dtype costs. Built in chapter 11."""
    keys = bits * head_dim / 8 + 4 * head_dim / group
    values = bits * head_dim / 8 + 4 * (head_dim // group_size(head_dim))
    return n_kv_heads * (keys + values)


class LowBitLayerCache:
    """One layer's KIVI-style cache: quantized groups of `group` tokens, then at least `residual`
    exact tokens (module docstring). Built in chapter 11."""

    def __init__(self, bits: int, *, group: int = 32, residual: int = 32):
        check_choice("bits", bits, LOWBIT_BITS)
        check_positive_int("group", group)
        check_positive_int("residual", residual)
        self.bits, self.group, self.residual = bits, group, residual
        self.reset()

    def reset(self) -> None:
        self.groups: list[dict] = []  # one per quantized group: packed codes and statistics
        self.k_exact = self.v_exact = None  # (B, Hkv, R..R+G-1, D) the newest tokens
        self.length = 0

    def key_positions(self, input_pos: Tensor) -> Tensor:
        return torch.arange(int(input_pos[0]) + input_pos.numel())

    def update(self, k: Tensor, v: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        if self.k_exact is None:  # copies: k and v may be views of the layer's fused q/k/v output
            self.k_exact, self.v_exact = k.clone(), v.clone()
        else:
            self.k_exact, self.v_exact = torch.cat([self.k_exact, k], dim=2), torch.cat([self.v_exact, v], dim=2)
        self.length = int(input_pos[-1]) + 1
        while self.k_exact.size(2) >= self.residual + self.group:  # the oldest exact group goes to low bits
            k_old, v_old = self.k_exact[:, :, :self.group], self.v_exact[:, :, :self.group]
            self.k_exact = self.k_exact[:, :, self.group:].clone()  # a copy: no view keeps the group alive
            self.v_exact = self.v_exact[:, :, self.group:].clone()
            kc, klo, kstep = quantize_per_channel(k_old, self.bits)
            vc, vlo, vstep = quantize_per_token(v_old, self.bits)
            self.groups.append(dict(k=pack_codes(kc, self.bits), klo=klo, kstep=kstep,
                                    v=pack_codes(vc, self.bits), vlo=vlo, vstep=vstep))
        dtype = k.dtype
        keys = [dequantize(unpack_codes(g["k"], self.bits), g["klo"], g["kstep"], dtype) for g in self.groups]
        values = [dequantize(unpack_codes(g["v"], self.bits), g["vlo"], g["vstep"], dtype) for g in self.groups]
        return torch.cat(keys + [self.k_exact], dim=2), torch.cat(values + [self.v_exact], dim=2)

    @property
    def nbytes(self) -> int:
        held = [t for g in self.groups for t in g.values()]
        held += [t for t in (self.k_exact, self.v_exact) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)


def lowbit_cache(model, batch_size: int, bits: int, *, group: int = 32, residual: int = 32) -> KVCache:
    """A KVCache for `model` with KIVI-style low-bit layers (LowBitLayerCache). Built in chapter 11."""
    c = model.config
    check_positive_int("batch_size", batch_size)
    check_choice("bits", bits, LOWBIT_BITS)
    if c.attention == "mla":
        raise ValueError("lowbit_cache quantizes per-head keys and values; an attention='mla' model caches a latent "
                         "and a RoPE key instead: use a GQA/MQA/MHA model")
    layers = [LowBitLayerCache(bits, group=group, residual=residual) for _ in range(c.n_layers)]
    return KVCache(layers, "dynamic", batch_size=batch_size)
