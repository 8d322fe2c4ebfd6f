"""A decode step that `torch.compile` can capture whole: fixed shapes, positions as tensors.

Shape legend: B batch, C d_model, V vocab_size, Hkv key/value heads, N slots in the cache
(max_seq_len for a static cache, the window W for a sliding one), D head_dim.

`GPT.forward_unchecked` is written to be read: it turns positions into Python ints, slices the static
cache to the filled prefix [0, length) and skips the mask when it can. Each of those choices
makes every decode step a different program to a compiler: a new length is a new shape, an
int read from a tensor is a value baked into the graph. A compiled step would be compiled
again at every position. The step here gives the compiler one program for all positions:

- the position is a (1,) tensor on the device, never read back as a Python int;
- attention always runs over all N slots of the cache, with a mask built from positions, so
  every step has the same shapes (slots not written yet hold position -1 or lie in the future,
  and the mask hides them);
- the new key and value are written with `index_copy_` at a tensor index.

It walks the model's own blocks with the model's own weights (`Block.forward`, given a cache
that writes in place and returns the whole buffer), so it computes what `GPT.forward_unchecked` does.
On a GPU `torch.compile(mode="reduce-overhead")` then records the step as a CUDA graph: one
launch replays every kernel of the step. That needs the cache's memory to stay at the same
addresses from step to step, which is what a static (preallocated) cache gives and a
concatenating one cannot. Built in chapter 5.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .attention import attention_mask
from .cache import KVCache
from .layers import rope_cos_sin

__all__ = ["COMPILABLE_CACHE_KINDS", "compiled_decode_step", "decode_step_fixed_shape", "advance", "prepare_cache",
           "compile_mode"]

COMPILABLE_CACHE_KINDS = ("static", "sliding")


class _WriteInPlace:
    """A per-layer cache view for the fixed-shape step: write at `input_pos`, return all N slots."""

    def __init__(self, k: Tensor, v: Tensor, ring: int | None = None):
        self.k, self.v = k, v  # (B, Hkv, N, D), the layer cache's own buffers
        self.ring = ring  # a ring buffer's size W (position p lives in slot p mod W); None: slot p

    def update(self, k: Tensor, v: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        slot = input_pos if self.ring is None else input_pos % self.ring
        self.k.index_copy_(2, slot, k)  # k: (B, Hkv, 1, D) into slot of (B, Hkv, N, D)
        self.v.index_copy_(2, slot, v)
        return self.k, self.v


def decode_step_fixed_shape(model, token: Tensor, input_pos: Tensor, cache: KVCache) -> Tensor:
    """One decode step with every shape fixed: token (B, 1) at `input_pos` (1,) -> logits (B, V).

    The eager reference for what `compiled_decode_step` compiles; it writes into `cache`'s
    buffers but leaves its Python bookkeeping (`length`) to the caller (see `advance`). Built in
    chapter 5.
    """
    c = model.config
    if cache.kind == "static":
        k_pos = torch.arange(cache.max_seq_len, device=token.device)  # (N,): slot i holds position i
        window, pos_tables, ring = c.window, None, None
    else:  # a ring buffer: position p lives in slot p mod W, and each layer records which position
        W = cache.window
        window, ring = W, W
        pos_tables = [layer.pos for layer in cache.layers]
        slots = torch.arange(W, device=token.device)
        k_pos = torch.where(slots == input_pos % W, input_pos, pos_tables[0])  # (N,) after this write
    layers = [_WriteInPlace(layer.k, layer.v, ring) for layer in cache.layers]

    x = model.tok_emb(token)  # (B, 1, C)
    if model.pos_emb is not None:
        x = x + model.pos_emb(input_pos)
    rope = None
    if c.pos == "rope":
        cos, sin = rope_cos_sin(input_pos, model.rope_dim, c.rope_base)
        rope = (cos.to(x.dtype), sin.to(x.dtype))
    mask = attention_mask(input_pos, k_pos, window)  # (1, N): only filled, visible slots
    for block, layer in zip(model.blocks, layers):
        x = block(x, mask=mask, is_causal=False, rope=rope, cache=layer, input_pos=input_pos)
    if pos_tables is not None:
        for table in pos_tables:
            table.index_copy_(0, input_pos % window, input_pos)
    return model.lm_head(model.norm_f(x))[:, -1]  # (B, V)


def advance(cache: KVCache, length: int) -> None:
    """Record that positions 0..length-1 are now in `cache` (a fixed-shape step cannot: it has no ints)."""
    cache.mark_written(length)


def compile_mode(device: torch.device) -> str | None:
    """The `torch.compile` mode kvlab uses: CUDA graphs ("reduce-overhead") on CUDA, the default elsewhere."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else None


@functools.lru_cache(maxsize=None)
def _compiled(mode: str | None):
    # One compiled function per mode for the whole process: torch.compile keeps what it has
    # compiled with the function, so every later generation reuses it (same shapes, no recompile).
    return torch.compile(decode_step_fixed_shape, fullgraph=True, mode=mode)


def prepare_cache(cache: KVCache) -> None:
    """Tell the compiler the cache's buffers never move, so a CUDA graph may write into them."""
    mark = getattr(torch._dynamo, "mark_static_address", None)
    if mark is None:
        return
    for layer in cache.layers:
        for name in ("k", "v", "pos"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, Tensor) and tensor.device.type == "cuda":
                try:
                    mark(tensor, guard=False)
                except TypeError:  # older PyTorch: no guard argument
                    mark(tensor)


def compiled_decode_step(model, token: Tensor, input_pos: Tensor, cache: KVCache) -> Tensor:
    """`decode_step_fixed_shape` compiled with `fullgraph=True` (CUDA graphs on CUDA); logits (B, V).

    Like `decode_step_fixed_shape`, it leaves `cache.length` to the caller (`advance`). Compiling happens on the first call for a given
    model, batch size and cache size (seconds on a CPU); later positions reuse it. Built in
    chapter 5.
    """
    if cache.kind not in COMPILABLE_CACHE_KINDS:
        raise ValueError(f"a compiled decode step needs a cache of kind {COMPILABLE_CACHE_KINDS}, got {cache.kind!r}")
    step = _compiled(compile_mode(token.device))
    if token.device.type == "cuda" and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be overwritten now
    return step(model, token, input_pos, cache)
