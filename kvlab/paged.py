"""Paged KV memory: one pool of fixed-size blocks, a block table per request, and the gather.

Shape legend: L n_layers, NB num_blocks, BS block_size, P = NB·BS slots in the pool,
Hkv key/value heads, D head_dim, B rows (requests) in a forward, T tokens fed per row,
S keys attended per row, N tokens written in one forward.

A request does not own a slab of `max_seq_len` positions. It owns a list of block ids, its
**block table**: position p of the request lives in block `table[p // BS]`, at offset
`p % BS` inside it, so in slot `table[p // BS] · BS + p % BS` of the pool. Blocks are handed out
as the request grows and returned when it finishes, so the memory held follows the tokens
actually cached, give or take one partly filled block per request. Attention reads a request's
keys by *gathering* its slots in position order.

A block can be held by several requests at once (a shared prompt prefix): the pool counts its
holders, and returns it to the free list when the last one lets go. A request that must write
into a block someone else also holds first copies it into a block of its own (copy-on-write).
Built in chapter 9.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["slot_mapping", "gather_kv", "BlockPool"]


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
    block ids in order. This is what paged attention reads. Built in chapter 9.
    """
    blocks = pool[block_table]  # (nb, BS, Hkv, D): the request's blocks, in order
    flat = blocks.reshape(-1, *pool.shape[2:])  # (nb·BS, Hkv, D): position order
    return flat[:length].transpose(0, 1)  # (Hkv, length, D)


class BlockPool:
    """Keys and values of every layer in NB blocks of BS slots, with a free list and holder counts.

    `k` and `v` are (L, NB, BS, Hkv, D), allocated once. `allocate()` hands out a free block (or
    None when there is none), `hold(block)` adds a holder to a shared block, `release(block)`
    drops one and frees the block when none is left, `copy(src, dst)` copies a block's keys and
    values in every layer. `write` and `gather` are the two accesses a forward pass makes.
    Built in chapter 9.
    """

    def __init__(self, *, n_layers: int, n_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (n_layers, num_blocks, block_size, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.holders = [0] * num_blocks  # how many requests hold each block (0 = free)
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: block 0 is handed out first

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

    def allocate(self) -> int | None:
        """A free block with one holder, or None when the pool is full."""
        if not self._free:
            return None
        block = self._free.pop()
        self.holders[block] = 1
        return block

    def hold(self, block: int) -> None:
        """One more request holds an allocated block (a shared prefix)."""
        if self.holders[block] < 1:
            raise RuntimeError(f"block {block} is free; only an allocated block can be shared")
        self.holders[block] += 1

    def release(self, block: int) -> bool:
        """One holder lets go; returns True when that freed the block."""
        if self.holders[block] < 1:
            raise RuntimeError(f"block {block} is already free")
        self.holders[block] -= 1
        if self.holders[block] == 0:
            self._free.append(block)
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
        """Keys and values of one layer at pool slots `slots` (B, S): each (B, Hkv, S, D)."""
        L, NB, BS, Hkv, D = self.k.shape
        k = self.k[layer].view(NB * BS, Hkv, D)[slots]  # (B, S, Hkv, D)
        v = self.v[layer].view(NB * BS, Hkv, D)[slots]
        return k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, S, D)
