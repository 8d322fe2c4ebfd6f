"""The model runner: one paged forward pass over requests of different lengths.

Shape legend: B rows (requests) in one forward, T tokens fed per row this forward (rows with
fewer are padded), S keys attended per row, C d_model, Hkv n_kv_heads, D head_dim, V vocab_size,
N valid tokens in the forward.

`forward_paged` runs the model's own modules: its embeddings, then each of its `Block`s exactly
as chapter 4's cached forward calls them, then its final norm and head. Only two things differ
from `GPT.forward`: positions are per row ((B, T), so one row may prefill a 40-token prompt while
the next decodes its 97th token), and the per-layer cache handed to each block is a
`PagedLayerCache`, whose `update(k, v)` writes the new keys and values into the pool at the
slots the rows' block tables name (the slot mapping) and returns each row's keys 0..S-1 (the
gather path of kvlab.paged). The mask, built from positions alone, lets a query at position q
see key j when j <= q; keys past a row's length are never seen, whatever their slots hold.
Padding is marked by `valid` (B, T): a pad is never written and its output never used.

`ModelRunner.run` turns a list of scheduled requests into those tensors: each request feeds the
tokens it has not cached yet. Built in chapter 9.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..gpt import GPT
from ..layers import rope_cos_sin
from ..paged import BlockPool, slot_mapping

__all__ = ["PagedLayerCache", "forward_paged", "ModelRunner"]


class PagedLayerCache:
    """What one block's attention sees as its cache: writes go to pool slots, reads gather slots."""

    def __init__(self, pool: BlockPool, layer: int, write_slots: Tensor, valid: Tensor, read_slots: Tensor):
        self.pool, self.layer = pool, layer
        self.write_slots, self.valid, self.read_slots = write_slots, valid, read_slots

    def update(self, k: Tensor, v: Tensor, input_pos=None) -> tuple[Tensor, Tensor]:
        """k, v (B, Hkv, T, D) of the fed tokens -> every row's keys and values (B, Hkv, S, D)."""
        valid = self.valid
        self.pool.write(self.layer, k.transpose(1, 2)[valid], v.transpose(1, 2)[valid], self.write_slots)  # (N, Hkv, D)
        return self.pool.gather(self.layer, self.read_slots)


def forward_paged(model: GPT, idx: Tensor, positions: Tensor, valid: Tensor, pool: BlockPool,
                  block_tables: Tensor, n_keys: int) -> Tensor:
    """Next-token logits (B, V) after each row's last valid token.

    `idx`, `positions` and `valid` are (B, T): token ids, their absolute positions in their own
    request, and False for padding (which must come after a row's real tokens). Keys and values
    of the valid tokens are written into `pool` through `block_tables` (B, nb); each row then
    attends over its keys at positions 0..n_keys-1. Built in chapter 9.
    """
    c = model.config
    B, T = idx.shape
    x = model.tok_emb(idx)  # (B, T, C)
    if model.pos_emb is not None:
        x = x + model.pos_emb(positions)  # each row's own positions
    x = model.drop(x)
    rope = None
    if c.pos == "rope":
        cos, sin = rope_cos_sin(positions.reshape(-1), c.head_dim, c.rope_base)  # (B·T, D)
        rope = tuple(t.view(B, 1, T, c.head_dim).to(x.dtype) for t in (cos, sin))  # broadcast over heads
    write_slots = slot_mapping(block_tables, positions, pool.block_size)[valid]  # (N,)
    key_pos = torch.arange(n_keys, device=idx.device)  # (S,)
    read_slots = slot_mapping(block_tables, key_pos.expand(B, n_keys), pool.block_size)  # (B, S)
    mask = (key_pos[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, S): j <= q
    for i, block in enumerate(model.blocks):
        cache = PagedLayerCache(pool, i, write_slots, valid, read_slots)
        x = block(x, mask=mask, is_causal=False, rope=rope, cache=cache)
    last = valid.sum(dim=1) - 1  # (B,): index of each row's last real token
    x = x[torch.arange(B, device=idx.device), last]  # (B, C)
    return model.lm_head(model.norm_f(x))  # (B, V)


class ModelRunner:
    """Runs a batch of requests through `forward_paged`. Decoding rows (one new token each) and
    prefilling rows go in separate passes: in the padded (B, T) layout one pass would pad every
    decode row to the longest new prompt. Built in chapter 9."""

    def __init__(self, model: GPT, pool: BlockPool):
        self.model, self.pool = model, pool

    def run(self, rows) -> Tensor:
        """Logits (len(rows), V), in the order of `rows`, after each one's uncached tokens."""
        decoding = [i for i, r in enumerate(rows) if len(r.tokens) - r.n_cached == 1]
        prefilling = [i for i, r in enumerate(rows) if len(r.tokens) - r.n_cached > 1]
        logits = torch.empty(len(rows), self.model.config.vocab_size, device=self.model.device,
                             dtype=self.model.dtype)
        for group in (decoding, prefilling):
            if group:
                logits[group] = self._forward([rows[i] for i in group])
        return logits

    def _forward(self, rows) -> Tensor:
        feeds = [r.tokens[r.n_cached:] for r in rows]
        B, T = len(rows), max(len(f) for f in feeds)
        idx = torch.zeros(B, T, dtype=torch.long)
        positions = torch.zeros(B, T, dtype=torch.long)  # pads sit at position 0
        valid = torch.zeros(B, T, dtype=torch.bool)
        tables = torch.zeros(B, max(len(r.table) for r in rows), dtype=torch.long)
        for b, (r, f) in enumerate(zip(rows, feeds)):
            idx[b, : len(f)] = torch.tensor(f)
            positions[b, : len(f)] = torch.arange(r.n_cached, len(r.tokens))
            valid[b, : len(f)] = True
            tables[b, : len(r.table)] = torch.tensor(r.table)
        n_keys = max(len(r.tokens) for r in rows)
        device = self.model.device
        return forward_paged(self.model, idx.to(device), positions.to(device), valid.to(device), self.pool,
                             tables.to(device), n_keys)
