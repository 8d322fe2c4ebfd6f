"""The KV cache: one object per layer behind one small interface, plus a thin container.

Shape legend: B batch, Hkv key/value heads, T tokens fed in this call, S keys returned,
D head_dim, W sliding window, N capacity (max_seq_len).

Every per-layer cache answers three questions:
    key_positions(input_pos) -> (S,)     absolute position of each key `update` will return
                                         (-1 marks an empty slot); asked *before* `update`
    update(k, v, input_pos)  -> (k_all, v_all), each (B, Hkv, S, D)
    reset()                              forget everything (keep the memory)
and keeps `length`, the number of positions written so far (the next position to write).
Chapter 10 adds two operations each cache does to itself, so no other module writes its tensors:
    reorder(index)           row i now holds what row index[i] held (beam search)
    crop(length, saved=None) forget every position >= length (speculative decoding's rollback);
                             a sliding ring also needs `saved = save(start, T)`, taken before the
                             write it undoes, since that write overwrote older positions' slots

`input_pos` is always a contiguous run of absolute positions on the CPU, (T,) long: the model
validates it once per forward, so the caches can read its first element for free.

Three kinds, from simplest to most practical:
    DynamicLayerCache        concatenates (torch.cat) — grows, copies everything every step
    StaticLayerCache         preallocates N slots and writes in place — no copies, fixed memory
    SlidingWindowLayerCache  a ring buffer of W slots — memory bounded however long you generate
Built in chapter 4.
"""

from __future__ import annotations


import torch
from torch import Tensor

from .validation import check_choice, check_int, check_non_negative_int, check_positive_int

__all__ = [
    "CACHE_KINDS",
    "DynamicLayerCache",
    "StaticLayerCache",
    "SlidingWindowLayerCache",
    "KVCache",
    "kv_cache_bytes",
]

CACHE_KINDS = ("dynamic", "static", "sliding")


def kv_cache_bytes(
    n_layers: int,
    n_kv_heads: int,
    head_dim: int,
    seq_len: int,
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Bytes a KV cache needs: layers × 2 (K and V) × kv-heads × head_dim × tokens × batch × bytes.

    GPT-2 small (12 layers, 12 heads of 64) in float32 needs 12·2·12·64·4 = 73,728 bytes per
    token — 75 MB for one 1024-token sequence. Grouped-query attention divides this by
    n_heads / n_kv_heads; a sliding window caps `seq_len` at the window. Built in chapter 4.
    """
    for name, value in [("n_layers", n_layers), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim),
                        ("seq_len", seq_len), ("batch_size", batch_size)]:
        check_non_negative_int(name, value)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return n_layers * 2 * n_kv_heads * head_dim * seq_len * batch_size * itemsize


def _check_length(layer, length) -> int:
    return check_int("length", length, low=0, high=layer.length, allowed=f"an int in [0, cache length {layer.length}]")


def _check_index(index) -> None:
    if not isinstance(index, Tensor) or index.dtype != torch.long or index.dim() != 1:
        raise TypeError("index must be a 1-D torch.long tensor of row numbers")


def reorder_slots(layer, index: Tensor, filled: int | None = None) -> None:
    """Gather the rows of every tensor named in `layer.row_tensors` (B, Hkv, slots, ·) by `index`.

    For the same number of rows the gather is written back in place, so the buffers keep their
    addresses (a CUDA graph may hold them); `filled` limits it to the slots [0, filled) that can
    be read. A different number of rows (one prompt fanned out to K beams) makes new tensors.
    """
    _check_index(index)
    for name in layer.row_tensors:
        t = getattr(layer, name)
        rows = index.to(t.device)
        if rows.numel() != t.size(0):
            setattr(layer, name, t.index_select(0, rows))
        elif filled is None:
            t.copy_(t.index_select(0, rows))
        else:
            t[:, :, :filled] = t[:, :, :filled].index_select(0, rows)


class DynamicLayerCache:
    """The concat cache: keep all keys/values and `torch.cat` the new ones on.

    The easiest cache to get right, and the one Hugging Face uses by default. Each step copies
    the whole cache into a new tensor, so total copying grows as O(N²) and memory is allocated
    afresh every step. Built in chapter 4.
    """

    kind = "dynamic"

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.length = 0

    def key_positions(self, input_pos: Tensor) -> Tensor:
        device = self.k.device if self.k is not None else None
        return torch.arange(self.length + input_pos.numel(), device=device)

    def update(self, k: Tensor, v: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        if self.k is None:
            # Copies, not the views we were given: k and v are slices of the layer's fused qkv
            # output, and keeping a view would keep that whole buffer (queries too) alive.
            self.k = k.clone(memory_format=torch.contiguous_format)
            self.v = v.clone(memory_format=torch.contiguous_format)
        else:
            self.k = torch.cat([self.k, k], dim=2)  # (B, Hkv, S + T, D)
            self.v = torch.cat([self.v, v], dim=2)
        self.length += k.size(2)
        return self.k, self.v

    def reset(self) -> None:
        self.k = self.v = None
        self.length = 0

    def reorder(self, index: Tensor) -> None:
        """Row i now holds what row `index[i]` held; `index` (R,) long may change the batch size."""
        _check_index(index)
        if self.k is not None:
            self.k = self.k.index_select(0, index.to(self.k.device))
            self.v = self.v.index_select(0, index.to(self.v.device))

    def save(self, start: int, T: int) -> None:
        """Nothing to save: a concatenating cache overwrites nothing (see `SlidingWindowLayerCache.save`)."""
        return None

    def crop(self, length: int, saved=None) -> None:
        """Forget every position >= `length`: cut the tensors."""
        length = _check_length(self, length)
        if self.k is not None:
            self.k, self.v = self.k[:, :, :length], self.v[:, :, :length]
        self.length = length

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()


class StaticLayerCache:
    """The preallocated cache: N slots allocated once, new keys written in place at `input_pos`.

    No copies and no allocation while generating, so the memory is known up front and the
    time per token stays flat. Attention reads only the filled prefix [0, length). Built in
    chapter 4.
    """

    kind = "static"

    def __init__(
        self, batch_size: int, n_kv_heads: int, head_dim: int, max_seq_len: int,
        *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_seq_len = max_seq_len
        self.length = 0

    def key_positions(self, input_pos: Tensor) -> Tensor:
        return torch.arange(int(input_pos[-1]) + 1, device=self.k.device)

    def update(self, k: Tensor, v: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        start, end = int(input_pos[0]), int(input_pos[-1]) + 1
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end  # writing at an earlier position rewinds the cache
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, Hkv, S, D) views, no copy

    def reset(self) -> None:
        # Old values may stay: slots at or past `length` are never returned.
        self.length = 0

    row_tensors = ("k", "v")  # (B, Hkv, N, D): what `reorder` gathers

    def reorder(self, index: Tensor) -> None:
        """Row i now holds what row `index[i]` held (only the filled slots [0, length) are moved)."""
        reorder_slots(self, index, filled=self.length)

    def save(self, start: int, T: int) -> None:
        """Nothing to save: a write at positions >= length overwrites no position that is kept."""
        return None

    def crop(self, length: int, saved=None) -> None:
        """Forget every position >= `length`: move the write position back (later slots are never read)."""
        self.length = _check_length(self, length)

    def mark_written(self, length: int) -> None:
        """Record that positions [0, length) are in the buffers, written there by a fixed-shape step
        that has no Python ints (`kvlab.compiled`)."""
        self.length = int(length)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class SlidingWindowLayerCache:
    """A ring buffer holding the last W positions: position p lives in slot p mod W.

    Memory is fixed at W tokens however long the generation runs, and attention is limited to
    the last W positions (as in Mistral-style sliding-window attention). A decode step writes
    first and attends over the ring; a multi-token step attends over ring + new tokens first,
    because writing T > 1 tokens could evict keys that its earliest queries still need.
    Built in chapter 4.
    """

    kind = "sliding"

    def __init__(
        self, batch_size: int, n_kv_heads: int, head_dim: int, window: int,
        *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, n_kv_heads, window, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = torch.full((window,), -1, dtype=torch.long, device=device)  # position in each slot
        self.window = window
        self.length = 0

    def key_positions(self, input_pos: Tensor) -> Tensor:
        start, T = int(input_pos[0]), input_pos.numel()
        if T == 1:
            slots = torch.arange(self.window, device=self.pos.device)
            return torch.where(slots == start % self.window, start, self.pos)
        new = torch.arange(start, start + T, device=self.pos.device)
        return torch.cat([self.pos, new])  # (W + T,)

    def update(self, k: Tensor, v: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        start, T = int(input_pos[0]), k.size(2)
        if T == 1:
            slot = start % self.window
            self.k[:, :, slot] = k[:, :, 0]
            self.v[:, :, slot] = v[:, :, 0]
            self.pos[slot] = start
            self.length = start + 1
            return self.k, self.v
        k_all = torch.cat([self.k, k], dim=2)  # (B, Hkv, W + T, D)
        v_all = torch.cat([self.v, v], dim=2)
        keep = min(T, self.window)  # only the last W new tokens survive in the ring
        positions = torch.arange(start + T - keep, start + T, device=self.pos.device)
        slots = positions % self.window
        self.k[:, :, slots] = k[:, :, T - keep:]
        self.v[:, :, slots] = v[:, :, T - keep:]
        self.pos[slots] = positions
        self.length = start + T
        return k_all, v_all

    def reset(self) -> None:
        self.pos.fill_(-1)
        self.length = 0

    row_tensors = ("k", "v")  # (B, Hkv, W, D): what `reorder`, `save` and `crop` move; `pos` is shared by all rows

    def reorder(self, index: Tensor) -> None:
        """Row i now holds what row `index[i]` held (in place for the same number of rows)."""
        reorder_slots(self, index)

    def save(self, start: int, T: int) -> dict:
        """Before feeding T tokens at positions start.., copy the ring slots they will overwrite:
        what `crop` needs to undo that write. At most W positions can be undone."""
        if T > self.window:
            raise ValueError(f"cannot save {T} positions of a sliding cache with window {self.window}: "
                             f"feed at most {self.window}")
        slots = torch.arange(start, start + T, device=self.pos.device) % self.window
        saved = {"slots": slots, "pos": self.pos[slots].clone()}
        for name in self.row_tensors:
            t = getattr(self, name)
            saved[name] = t[:, :, slots.to(t.device)].clone()
        return saved

    def crop(self, length: int, saved: dict | None = None) -> None:
        """Forget every position >= `length`: their slots get back what `saved` (from `save`, taken
        before the write that put them there) held."""
        length = _check_length(self, length)
        if length == self.length:
            return
        if saved is None:
            raise ValueError("a sliding-window cache overwrote older slots when it was fed: crop it with the copy "
                             "from save(start, T) taken before that write, or use a static cache")
        slots = saved["slots"].to(self.pos.device)
        undo = self.pos[slots] >= length  # slots now holding a forgotten position
        self.pos[slots[undo]] = saved["pos"][undo]
        for name in self.row_tensors:
            t = getattr(self, name)
            t[:, :, slots[undo].to(t.device)] = saved[name][:, :, undo.to(t.device)]
        self.length = length

    def mark_written(self, length: int) -> None:
        """Record that positions up to length - 1 are in the ring, written there (slots and `pos`) by a
        fixed-shape step that has no Python ints (`kvlab.compiled`)."""
        self.length = int(length)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class KVCache:
    """One layer cache per transformer block, and the checks that keep positions honest.

    Create one with `GPT.new_cache(...)`. `check(start, T)` is called by the model before any
    work, so a cache that is too small or fed out of order fails with a clear `ValueError`
    instead of silently attending to the wrong keys. Built in chapter 4.
    """

    def __init__(self, layers: list, kind: str, *, max_seq_len: int | None = None, window: int | None = None,
                 batch_size: int | None = None):
        check_choice("kind", kind, CACHE_KINDS)
        self.layers = layers
        self.kind = kind
        self.max_seq_len = max_seq_len  # capacity of a static cache; None = unbounded
        self.window = window  # attention window of a sliding cache
        self.batch_size = batch_size

    @classmethod
    def create(
        cls, kind: str, *, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int,
        max_seq_len: int | None = None, window: int | None = None,
        device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
    ) -> "KVCache":
        """Build a cache of the given kind; arguments are validated before anything is allocated.

        (Chapter 10's int8 caches are built by `kvlab.quantized.int8_cache`, or
        `model.new_cache(..., quantize="int8")`.)"""
        check_choice("kind", kind, CACHE_KINDS)
        check_positive_int("batch_size", batch_size)
        if kind == "static":
            check_positive_int("max_seq_len", max_seq_len)
            layers = [StaticLayerCache(batch_size, n_kv_heads, head_dim, max_seq_len, device=device, dtype=dtype)
                      for _ in range(n_layers)]
            return cls(layers, kind, max_seq_len=max_seq_len, batch_size=batch_size)
        if kind == "sliding":
            check_positive_int("window", window)
            layers = [SlidingWindowLayerCache(batch_size, n_kv_heads, head_dim, window, device=device, dtype=dtype)
                      for _ in range(n_layers)]
            return cls(layers, kind, window=window, batch_size=batch_size)
        if window is not None:
            raise ValueError("window is only used by kind='sliding'")
        return cls([DynamicLayerCache() for _ in range(n_layers)], kind, batch_size=batch_size)

    def __getitem__(self, i: int):
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def length(self) -> int:
        """Positions written so far: the position the next token goes to."""
        return self.layers[0].length

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache tensors right now."""
        return sum(_layer_bytes(layer) for layer in self.layers)

    def key_positions(self, input_pos: Tensor) -> Tensor:
        return self.layers[0].key_positions(input_pos)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def reorder(self, index: Tensor) -> None:
        """Row i of every layer now holds what row `index[i]` held; `index` is (R,) long and may be
        longer than the batch (one prompt fanned out to K beams). Built in chapter 10."""
        _check_index(index)
        for layer in self.layers:
            layer.reorder(index)
        self.batch_size = index.numel()

    def save(self, start: int, T: int) -> list | None:
        """What `crop` needs to undo feeding T tokens at positions start..: for a sliding ring, the slots
        they will overwrite (None for the other kinds, which overwrite nothing kept). Built in chapter 10."""
        saved = [layer.save(start, T) for layer in self.layers]
        return None if all(s is None for s in saved) else saved

    def crop(self, length: int, saved: list | None = None) -> None:
        """Forget every position >= `length`, as if those tokens had never been fed; a sliding ring
        needs `saved` from `save` taken before they were. Built in chapter 10."""
        _check_length(self, length)
        for i, layer in enumerate(self.layers):
            layer.crop(length, None if saved is None else saved[i])

    def mark_written(self, length: int) -> None:
        """Record that a fixed-shape step (`kvlab.compiled`) wrote positions up to length - 1."""
        for layer in self.layers:
            layer.mark_written(length)

    def check(self, start: int, T: int, batch_size: int) -> None:
        """Raise ValueError if feeding T tokens at positions start..start+T-1 is not allowed."""
        if self.batch_size is not None and batch_size != self.batch_size:
            raise ValueError(f"cache was made for batch_size={self.batch_size}, got a batch of {batch_size}")
        if self.kind == "static":
            if start > self.length:
                raise ValueError(
                    f"input_pos starts at {start} but the cache holds only {self.length} positions; "
                    "positions must continue from cache.length (or rewind to an earlier one)")
            if start + T > self.max_seq_len:
                raise ValueError(
                    f"cache too small: it holds max_seq_len={self.max_seq_len} positions but positions "
                    f"{start}..{start + T - 1} were fed; make it with a larger max_seq_len")
        elif start != self.length:
            raise ValueError(
                f"a {self.kind} cache only appends: input_pos must start at cache.length={self.length}, got {start}")

    def __repr__(self) -> str:
        extra = f", max_seq_len={self.max_seq_len}" if self.max_seq_len else ""
        extra += f", window={self.window}" if self.window else ""
        return f"KVCache(kind={self.kind!r}, layers={len(self)}, length={self.length}{extra}, nbytes={self.nbytes:,})"


def _layer_bytes(layer) -> int:
    """A layer cache's bytes: its own `nbytes`, or (for a hand-written cache) its k and v tensors."""
    if hasattr(layer, "nbytes"):
        return layer.nbytes
    tensors = [getattr(layer, name, None) for name in ("k", "v")]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
