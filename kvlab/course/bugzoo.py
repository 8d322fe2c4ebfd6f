"""The bug zoo: five layer caches that each hide one bug, for chapter 4's "find the bug" exercises.

Shape legend: B batch, Hkv key/value heads, T tokens fed in this call, S keys returned,
D head_dim, W sliding window, N capacity (max_seq_len).

Every specimen has the interface of the caches in `kvlab.cache` (`kind`, `length`,
`key_positions`, `update`, `reset`) and the same constructor as kvlab's cache of its kind:
    kind "dynamic"   Cache()
    kind "static"    Cache(batch_size, n_kv_heads, head_dim, max_seq_len)
    kind "sliding"   Cache(batch_size, n_kv_heads, head_dim, window)
so any of them plugs into a model with `kvlab.KVCache([...one per layer...], kind, ...)`.
Nothing raises: each one runs and quietly gives wrong tokens in some situation. A docstring
tells what a user of the cache saw (the symptom), never the cause. To hunt one down:

    from kvlab import bugzoo, checks
    checks.check_cache(bugzoo.CacheC)             # which named check fails, and how
    print(inspect.getsource(bugzoo.CacheC))       # then read the code

The answers are kept out of the docstrings on purpose; instructors find them in `_BUGS` at
the end of this file. Built for chapter 4's exercises; see book/instructors.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SPECIMENS", "CacheA", "CacheB", "CacheC", "CacheD", "CacheE"]


class CacheA:
    """A ring-buffer sliding-window cache (kind "sliding"): position p lives in slot p mod W.

    Reported symptom: in a chat session that reuses one cache for prompt after prompt, the
    first prompt always generates the same tokens as a sliding-window model without a cache.
    Later prompts sometimes do not, and give different tokens than the same prompt run
    through a brand-new cache. Nothing raises.
    """

    kind = "sliding"

    def __init__(self, batch_size: int, n_kv_heads: int, head_dim: int, window: int,
                 *, device=None, dtype: torch.dtype = torch.float32) -> None:
        shape = (batch_size, n_kv_heads, window, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slot_pos = torch.full((window,), -1, dtype=torch.long, device=device)  # -1: empty slot
        self.window = window
        self.length = 0

    def key_positions(self, input_pos: Tensor) -> Tensor:
        start, T = int(input_pos[0]), input_pos.numel()
        if T == 1:  # decode: the new key will overwrite slot start % W
            slots = torch.arange(self.window, device=self.slot_pos.device)
            return torch.where(slots == start % self.window, start, self.slot_pos)
        new = torch.arange(start, start + T, device=self.slot_pos.device)
        return torch.cat([self.slot_pos, new])  # (W + T,): the ring, then the new tokens

    def update(self, k: Tensor, v: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        start, T = int(input_pos[0]), k.size(2)
        if T == 1:
            slot = start % self.window
            self.k[:, :, slot] = k[:, :, 0]
            self.v[:, :, slot] = v[:, :, 0]
            self.slot_pos[slot] = start
            self.length = start + 1
            return self.k, self.v
        k_all = torch.cat([self.k, k], dim=2)  # (B, Hkv, W + T, D)
        v_all = torch.cat([self.v, v], dim=2)
        keep = min(T, self.window)
        positions = torch.arange(start + T - keep, start + T, device=self.slot_pos.device)
        slots = positions % self.window
        self.k[:, :, slots] = k[:, :, T - keep:]
        self.v[:, :, slots] = v[:, :, T - keep:]
        self.slot_pos[slots] = positions
        self.length = start + T
        return k_all, v_all

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
        self.length = 0


class CacheB:
    """A preallocated cache that keeps keys and values together in one buffer (kind "static").

    Reported symptom: generation runs without an error, `length` counts exactly the positions
    fed, and memory is exactly what the formula predicts, yet the tokens differ from
    generation without a cache almost at once, for every prompt.
    """

    kind = "static"

    def __init__(self, batch_size: int, n_kv_heads: int, head_dim: int, max_seq_len: int,
                 *, device=None, dtype: torch.dtype = torch.float32) -> None:
        # One buffer: kv[0] holds the keys, kv[1] the values.
        self.kv = torch.zeros((2, batch_size, n_kv_heads, max_seq_len, head_dim), device=device, dtype=dtype)
        self.max_seq_len = max_seq_len
        self.length = 0

    def key_positions(self, input_pos: Tensor) -> Tensor:
        return torch.arange(int(input_pos[-1]) + 1, device=self.kv.device)

    def update(self, k: Tensor, v: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        start, end = int(input_pos[0]), int(input_pos[-1]) + 1
        self.kv[:, :, :, start:end] = torch.stack([k, v])  # (2, B, Hkv, T, D)
        self.length = end
        values, keys = self.kv[:, :, :, :end]  # each (B, Hkv, S, D)
        return keys, values

    def reset(self) -> None:
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class CacheC:
    """A preallocated cache (kind "static") with a fast path for one-token decode steps.

    Reported symptom: the first generated token always matches generation without a cache;
    the tokens after it drift away. A prompt fed in chunks of several tokens gives the right
    logits, and `length` is right after every step.
    """

    kind = "static"

    def __init__(self, batch_size: int, n_kv_heads: int, head_dim: int, max_seq_len: int,
                 *, device=None, dtype: torch.dtype = torch.float32) -> None:
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_seq_len = max_seq_len
        self.length = 0

    def key_positions(self, input_pos: Tensor) -> Tensor:
        return torch.arange(int(input_pos[-1]) + 1, device=self.k.device)

    def update(self, k: Tensor, v: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        if k.size(2) == 1:  # a decode step: one token, appended after the cached ones
            self.length += 1
            self.k[:, :, self.length] = k[:, :, 0]
            self.v[:, :, self.length] = v[:, :, 0]
        else:
            start, end = int(input_pos[0]), int(input_pos[-1]) + 1
            self.k[:, :, start:end] = k
            self.v[:, :, start:end] = v
            self.length = end
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
        self.length = 0

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class CacheD:
    """A ring-buffer sliding-window cache (kind "sliding"), built to save memory.

    Reported symptom: generation matches a sliding-window model without a cache as long as
    the sequence is shorter than the window, and a long prompt prefilled in one pass gives the
    right logits. Once decoding reaches the window's length the logits are off, and a few
    tokens later the tokens differ.
    """

    kind = "sliding"

    def __init__(self, batch_size: int, n_kv_heads: int, head_dim: int, window: int,
                 *, device=None, dtype: torch.dtype = torch.float32) -> None:
        # The newest position in a window is the query's own, so the ring keeps the ones before it.
        self.size = window - 1
        shape = (batch_size, n_kv_heads, self.size, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = torch.full((self.size,), -1, dtype=torch.long, device=device)  # -1: empty slot
        self.window = window
        self.length = 0

    def key_positions(self, input_pos: Tensor) -> Tensor:
        start, T = int(input_pos[0]), input_pos.numel()
        if T == 1:
            slots = torch.arange(self.size, device=self.pos.device)
            return torch.where(slots == start % self.size, start, self.pos)
        new = torch.arange(start, start + T, device=self.pos.device)
        return torch.cat([self.pos, new])

    def update(self, k: Tensor, v: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        start, T = int(input_pos[0]), k.size(2)
        if T == 1:
            slot = start % self.size
            self.k[:, :, slot] = k[:, :, 0]
            self.v[:, :, slot] = v[:, :, 0]
            self.pos[slot] = start
            self.length = start + 1
            return self.k, self.v
        k_all = torch.cat([self.k, k], dim=2)  # (B, Hkv, size + T, D)
        v_all = torch.cat([self.v, v], dim=2)
        keep = min(T, self.size)
        positions = torch.arange(start + T - keep, start + T, device=self.pos.device)
        slots = positions % self.size
        self.k[:, :, slots] = k[:, :, T - keep:]
        self.v[:, :, slots] = v[:, :, T - keep:]
        self.pos[slots] = positions
        self.length = start + T
        return k_all, v_all

    def reset(self) -> None:
        self.pos.fill_(-1)
        self.length = 0


class CacheE:
    """A concat cache (kind "dynamic"): new keys and values are concatenated onto the old.

    Reported symptom: greedy generation matches generation without a cache token for token,
    for every prompt tried. But a long prompt fed in chunks (chunked prefill) gives wrong
    logits for every chunk after the first, though the first chunk is right.
    """

    kind = "dynamic"

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.length = 0

    def key_positions(self, input_pos: Tensor) -> Tensor:
        start = int(input_pos[0])
        return torch.arange(start, start + self.length + input_pos.numel())

    def update(self, k: Tensor, v: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=2)  # (B, Hkv, S + T, D)
            self.v = torch.cat([self.v, v], dim=2)
        self.length += k.size(2)
        return self.k, self.v

    def reset(self) -> None:
        self.k = self.v = None
        self.length = 0


SPECIMENS = ("CacheA", "CacheB", "CacheC", "CacheD", "CacheE")


# -- for instructors and tests only: what is wrong, and which checks notice -------------------

@dataclass(frozen=True)
class _Bug:
    kind: str  # the cache kind the specimen implements
    bug: str  # the true cause
    fix: str  # the smallest correct change
    fails: tuple[str, ...]  # the named checks in kvlab.course.checks.bugzoo that fail, the bug's own first


_BUGS: dict[str, _Bug] = {
    "CacheA": _Bug(
        "sliding",
        "reset() zeroes the key/value tensors and the length but leaves `slot_pos`, the position "
        "held by each slot. The next prompt's mask treats the zeroed slots as real keys at their old "
        "positions: a zero key scores 0, so they still take a share of every softmax they enter.",
        "reset() must mark every slot empty again: self.slot_pos.fill_(-1) (zeroing k and v is "
        "not needed).",
        ("check_reset_between_prompts",),
    ),
    "CacheB": _Bug(
        "static",
        "keys and values are swapped: update() unpacks the packed buffer as `values, keys`, but "
        "kv[0] holds the keys. Every attention through the cache uses values as keys and keys as "
        "values, including the prefill, so everything after it is wrong.",
        "keys, values = self.kv[:, :, :, :end]",
        ("check_keys_values", "check_decode_positions", "check_chunked_prefill_mask"),
    ),
    "CacheC": _Bug(
        "static",
        "wrong position offset: the decode fast path increments `length` before writing, so the "
        "key of position p lands in slot p + 1, one slot late. The step's attention reads slots "
        "0..p, so the query never sees its own key (slot p holds zeros, or the previous token's "
        "key) and every later step sees shifted keys.",
        "write at slot self.length (the new token's position), then increment; or drop the fast "
        "path and write at input_pos as for T > 1.",
        ("check_decode_positions",),
    ),
    "CacheD": _Bug(
        "sliding",
        "off-by-one eviction: the ring has W - 1 slots instead of W. A decode step writes its own "
        "key first, so from position W - 1 on it evicts position p - W + 1, which the query at p "
        "still attends to; each decode query sees W - 1 keys. (Multi-token steps attend over "
        "ring + new keys before writing, so they are unaffected; that is why prefill looks right.)",
        "self.size = window.",
        ("check_window_eviction",),
    ),
    "CacheE": _Bug(
        "dynamic",
        "the mask is not shifted: key_positions numbers the keys from input_pos[0] instead of 0, "
        "so the mask the model builds from them is the top-left aligned causal mask (the one "
        "F.scaled_dot_product_attention(is_causal=True) uses), wrong whenever T < S. A prefill "
        "from position 0 has T == S and kvlab skips the mask for a one-token step on a dynamic "
        "cache, so only chunked prefill (T > 1 after the first chunk) shows it.",
        "return torch.arange(self.length + input_pos.numel()).",
        ("check_chunked_prefill_mask",),
    ),
}
