"""Paged KV memory: one pool of fixed-size blocks, a block table per request, and paged attention.

Shape legend: L n_layers, NB num_blocks, BS block_size, P = NB·BS slots in the pool,
H query heads, Hkv key/value heads, D head_dim, B rows (requests) in a forward, T tokens fed
per row, S keys attended per row, N tokens written in one forward.

A request does not own a slab of `max_seq_len` positions. It owns a list of block ids, its
**block table**: position p of the request lives in block `table[p // BS]`, at offset
`p % BS` inside it, so in slot `table[p // BS] · BS + p % BS` of the pool (`slot_mapping`).
Blocks are handed out as the request grows and returned when it finishes, so the memory held
follows the tokens actually cached, give or take one partly filled block per request.

Attention over a request's keys can read the pool two ways, computed equal here:

- `paged_attention_blockwise` walks the block table one block at a time, reading each block
  where it lies, and combines the blocks with an online softmax (a running max and a running
  sum, rescaled whenever the max grows). No copy of a request's keys is ever made: this is
  how paged kernels (vLLM's PagedAttention, FlashDecoding, FlashInfer) work.
- `paged_attention_gather` first gathers every row's keys and values into one contiguous
  (B, S, Hkv, D) copy, then runs one ordinary softmax. It copies O(S) bytes per layer and step,
  but it is a handful of large tensor operations, which in plain PyTorch on a CPU can beat a
  Python loop over blocks.

The pool also counts the holders of each block: a block shared by several requests (a common
prompt prefix) returns to the free list only when the last holder lets go. Free blocks leave
in the order they were freed (least recently freed first), so a freed block that still holds
a cached prefix survives as long as possible (kvlab.serving.block_manager). Built in chapter 9.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["slot_mapping", "gather_kv", "paged_attention_blockwise", "paged_attention_gather", "BlockPool"]


def slot_mapping(block_table: Tensor, positions: Tensor, block_size: int) -> Tensor:
    """Pool slots of `positions` (B, T) for requests whose block tables are `block_table` (B, nb).

    Slot = block_table[position // block_size] · block_size + position % block_size, row by row.
    Built in chapter 9.
    """
    blocks = block_table.gather(1, positions // block_size)  # (B, T): which block holds each position
    return blocks * block_size + positions % block_size  # (B, T)


def gather_kv(pool: Tensor, block_table: Tensor, length: int) -> Tensor:
    """The first `length` cached keys (or values) of one request, in position order: (Hkv, length, D).

    `pool` is one layer's (NB, BS, Hkv, D) block storage and `block_table` (nb,) the request's
    block ids in order. This is a copy: the gather path of paged attention. Built in chapter 9.
    """
    blocks = pool[block_table]  # (nb, BS, Hkv, D): the request's blocks, in order (a copy)
    flat = blocks.reshape(-1, *pool.shape[2:])  # (nb·BS, Hkv, D): position order
    return flat[:length].transpose(0, 1)  # (Hkv, length, D)


def paged_attention_blockwise(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor,
                              lengths: Tensor) -> Tensor:
    """One decode query per row attending over its cached keys, read block by block: (B, H, D).

    `q` (B, H, D); `k_pool`, `v_pool` one layer's (NB, BS, Hkv, D); `block_tables` (B, nb) block
    ids (entries past a row's last block may be anything valid); `lengths` (B,) keys per row.
    Each step of the loop reads one block per row and folds it into a running max `m`, a running
    sum of exponentials `l` and a running weighted sum of values `acc`; whenever the max grows,
    the old `l` and `acc` are rescaled by exp(old max − new max). Built in chapter 9.
    """
    B, H, D = q.shape
    NB, BS, Hkv, _ = k_pool.shape
    qg = q.view(B, Hkv, H // Hkv, D) / math.sqrt(D)  # (B, Hkv, R, D): R query heads per kv head
    m = torch.full((B, Hkv, H // Hkv), float("-inf"), dtype=q.dtype, device=q.device)  # running max
    l = torch.zeros_like(m)  # running sum of exp(score - m)
    acc = torch.zeros_like(qg)  # running sum of exp(score - m) · value
    offsets = torch.arange(BS, device=q.device)
    for j in range(math.ceil(int(lengths.max()) / BS)):
        ids = block_tables[:, j]  # (B,): each row's j-th block
        k, v = k_pool[ids], v_pool[ids]  # (B, BS, Hkv, D): one block per row, the working set
        s = torch.einsum("bgrd,bsgd->bgrs", qg, k)  # (B, Hkv, R, BS)
        seen = (j * BS + offsets)[None, :] < lengths[:, None]  # (B, BS): slots past the length hold no key
        s = s.masked_fill(~seen[:, None, None, :], float("-inf"))
        m_new = torch.maximum(m, s.amax(dim=-1))  # (B, Hkv, R); finite after the first block
        scale = torch.exp(m - m_new)  # rescales what was summed under the old max
        p = torch.exp(s - m_new[..., None])  # (B, Hkv, R, BS)
        l = l * scale + p.sum(dim=-1)
        acc = acc * scale[..., None] + torch.einsum("bgrs,bsgd->bgrd", p, v)
        m = m_new
    return (acc / l[..., None]).reshape(B, H, D)


def paged_attention_gather(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor,
                           lengths: Tensor) -> Tensor:
    """The same as `paged_attention_blockwise`, by one gather of every row's keys and values: (B, H, D).

    Copies each row's S = max(lengths) keys and values into a contiguous tensor, then runs one
    masked softmax. Built in chapter 9.
    """
    B, H, D = q.shape
    NB, BS, Hkv, _ = k_pool.shape
    S = int(lengths.max())
    key_pos = torch.arange(S, device=q.device)  # (S,)
    slots = slot_mapping(block_tables, key_pos.expand(B, S), BS)  # (B, S)
    k = k_pool.reshape(NB * BS, Hkv, D)[slots]  # (B, S, Hkv, D): the copy
    v = v_pool.reshape(NB * BS, Hkv, D)[slots]
    qg = q.view(B, Hkv, H // Hkv, D) / math.sqrt(D)
    s = torch.einsum("bgrd,bsgd->bgrs", qg, k)  # (B, Hkv, R, S)
    s = s.masked_fill(~(key_pos[None, :] < lengths[:, None])[:, None, None, :], float("-inf"))
    return torch.einsum("bgrs,bsgd->bgrd", torch.softmax(s, dim=-1), v).reshape(B, H, D)


class BlockPool:
    """Keys and values of every layer in NB blocks of BS slots, with a free list and holder counts.

    `k` and `v` are (L, NB, BS, Hkv, D), allocated once. `allocate()` hands out the free block
    freed longest ago (or None when there is none), `take(block)` hands out one particular free
    block (a cached prefix found again), `hold(block)` adds a holder to an allocated block,
    `release(block)` drops one and frees the block when none is left, `copy(src, dst)` copies a
    block's keys and values in every layer. `write` and `gather` are the two accesses a forward
    pass makes. Built in chapter 9.
    """

    def __init__(self, *, n_layers: int, n_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (n_layers, num_blocks, block_size, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.holders = [0] * num_blocks  # how many requests hold each block (0 = free)
        self._free = dict.fromkeys(range(num_blocks))  # insertion order = order freed: block 0 leaves first

    @property
    def bytes_per_token(self) -> int:
        """Bytes of keys and values one position takes in every layer."""
        L, _, _, Hkv, D = self.k.shape
        return 2 * L * Hkv * D * self.k.element_size()

    @property
    def bytes_per_block(self) -> int:
        return self.block_size * self.bytes_per_token

    @property
    def num_free(self) -> int:
        return len(self._free)

    def is_free(self, block: int) -> bool:
        return block in self._free

    def allocate(self) -> int | None:
        """The block freed longest ago, now with one holder; None when the pool is full."""
        if not self._free:
            return None
        return self.take(next(iter(self._free)))

    def take(self, block: int) -> int:
        """Hand out one particular free block, with one holder."""
        if block not in self._free:
            raise RuntimeError(f"block {block} is not free")
        del self._free[block]
        self.holders[block] = 1
        return block

    def hold(self, block: int) -> None:
        """One more request holds an allocated block (a shared prefix)."""
        if self.holders[block] < 1:
            raise RuntimeError(f"block {block} is free; only an allocated block can be shared")
        self.holders[block] += 1

    def release(self, block: int) -> bool:
        """One holder lets go; returns True when that freed the block (it joins the end of the free list)."""
        if self.holders[block] < 1:
            raise RuntimeError(f"block {block} is already free")
        self.holders[block] -= 1
        if self.holders[block] == 0:
            self._free[block] = None
            return True
        return False

    def copy(self, src: int, dst: int) -> None:
        """Copy block `src`'s keys and values into block `dst`, in every layer (copy-on-write)."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    def write(self, layer: int, k: Tensor, v: Tensor, slots: Tensor) -> None:
        """Store N new keys and values (N, Hkv, D) of one layer at pool slots `slots` (N,)."""
        L, NB, BS, Hkv, D = self.k.shape
        self.k[layer].view(NB * BS, Hkv, D).index_copy_(0, slots, k)
        self.v[layer].view(NB * BS, Hkv, D).index_copy_(0, slots, v)

    def gather(self, layer: int, slots: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of one layer at pool slots `slots` (B, S): each (B, Hkv, S, D), a copy."""
        L, NB, BS, Hkv, D = self.k.shape
        flat = slots.reshape(-1)  # index_select copies whole rows: faster than indexing with a 2-D tensor
        k = self.k[layer].view(NB * BS, Hkv, D).index_select(0, flat).view(*slots.shape, Hkv, D)  # (B, S, Hkv, D)
        v = self.v[layer].view(NB * BS, Hkv, D).index_select(0, flat).view(*slots.shape, Hkv, D)
        return k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, S, D)
