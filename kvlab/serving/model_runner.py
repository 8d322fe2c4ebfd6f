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

`forward_packed` is the same pass in the packed layout servers use: the new tokens of all
requests laid end to end in one row, so nothing is padded, with a mask that keeps each token to
its own request's keys. `ModelRunner.run` turns a list of scheduled requests into those tensors:
each request feeds the tokens it has not cached yet; a step where every request decodes one
token uses the (B, 1) layout, any other step the packed one. Built in chapter 9.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..gpt import GPT
from ..layers import rope_cos_sin
from ..paged import BlockPool, slot_mapping

__all__ = ["PagedLayerCache", "forward_paged", "forward_packed", "ModelRunner"]


class PagedLayerCache:
    """What one block's attention sees as its cache: writes go to pool slots, reads gather slots."""

    def __init__(self, pool: BlockPool, layer: int, write_slots: Tensor, valid: Tensor | None, read_slots: Tensor):
        self.pool, self.layer = pool, layer
        self.write_slots, self.valid, self.read_slots = write_slots, valid, read_slots  # valid None: no padding

    def update(self, k: Tensor, v: Tensor, input_pos=None) -> tuple[Tensor, Tensor]:
        """k, v (B, Hkv, T, D) of the fed tokens -> every row's keys and values (B, Hkv, S, D)."""
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, T, Hkv, D)
        if self.valid is None:
            k, v = k.flatten(0, 1), v.flatten(0, 1)  # (N, Hkv, D): every token is real
        else:
            k, v = k[self.valid], v[self.valid]  # (N, Hkv, D): the pads left out
        self.pool.write(self.layer, k, v, self.write_slots)
        return self.pool.gather(self.layer, self.read_slots)


def _through_blocks(model: GPT, idx: Tensor, positions: Tensor, mask: Tensor, pool: BlockPool, write_slots: Tensor,
                    valid: Tensor, read_slots: Tensor) -> Tensor:
    """Embeddings, then every one of the model's `Block`s with a `PagedLayerCache`: hidden states (B, T, C)."""
    c = model.config
    B, T = idx.shape
    x = model.tok_emb(idx)  # (B, T, C)
    if model.pos_emb is not None:
        x = x + model.pos_emb(positions)  # each token's own position in its own request
    x = model.drop(x)
    rope = None
    if c.pos == "rope":
        cos, sin = rope_cos_sin(positions.reshape(-1), c.head_dim, c.rope_base)  # (B·T, D)
        rope = tuple(t.view(B, 1, T, c.head_dim).to(x.dtype) for t in (cos, sin))  # broadcast over heads
    keep = None if bool(valid.all()) else valid  # no padding: the layers skip the masked select
    for i, block in enumerate(model.blocks):
        x = block(x, mask=mask, is_causal=False, rope=rope, cache=PagedLayerCache(pool, i, write_slots, keep, read_slots))
    return x


def forward_paged(model: GPT, idx: Tensor, positions: Tensor, valid: Tensor, pool: BlockPool,
                  block_tables: Tensor, n_keys: int) -> Tensor:
    """Next-token logits (B, V) after each row's last valid token: the padded (B, T) layout.

    `idx`, `positions` and `valid` are (B, T): token ids, their absolute positions in their own
    request, and False for padding (which must come after a row's real tokens). Keys and values
    of the valid tokens are written into `pool` through `block_tables` (B, nb); each row then
    attends over its keys at positions 0..n_keys-1. Built in chapter 9.
    """
    B, T = idx.shape
    write_slots = slot_mapping(block_tables, positions, pool.block_size)[valid]  # (N,)
    key_pos = torch.arange(n_keys, device=idx.device)  # (S,)
    read_slots = slot_mapping(block_tables, key_pos.expand(B, n_keys), pool.block_size)  # (B, S)
    mask = (key_pos[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, S): j <= q
    x = _through_blocks(model, idx, positions, mask, pool, write_slots, valid, read_slots)
    last = valid.sum(dim=1) - 1  # (B,): index of each row's last real token
    x = x[torch.arange(B, device=idx.device), last]  # (B, C)
    return model.lm_head(model.norm_f(x))  # (B, V)


def forward_packed(model: GPT, idx: Tensor, positions: Tensor, seq: Tensor, pool: BlockPool, block_tables: Tensor,
                   n_keys: Tensor) -> Tensor:
    """Next-token logits (R, V) of R requests whose new tokens are laid end to end: the packed layout.

    `idx`, `positions` and `seq` are (N,): the tokens of request 0, then those of request 1, ...,
    with each token's position in its own request and the request it belongs to (0..R-1, in
    order). `block_tables` is (R, nb) and `n_keys` (R,) how many keys each request has once its
    tokens are written. Nothing is padded: the linear layers see exactly N rows. Attention runs
    over every request's keys laid end to end (S = n_keys.sum()) with a mask letting a token see
    only its own request's keys at positions up to its own. That mask wastes N·S scores on other
    requests, so callers keep N·S small (ModelRunner packs requests up to a budget). Built in
    chapter 9.
    """
    R, device = block_tables.size(0), idx.device
    write_slots = slot_mapping(block_tables[seq], positions[:, None], pool.block_size)[:, 0]  # (N,)
    key_seq = torch.repeat_interleave(torch.arange(R, device=device), n_keys)  # (S,): each key's request
    starts = torch.cumsum(n_keys, 0) - n_keys  # (R,): where each request's keys begin
    key_pos = torch.arange(key_seq.numel(), device=device) - starts[key_seq]  # (S,): position in its request
    read_slots = slot_mapping(block_tables[key_seq], key_pos[:, None], pool.block_size)[:, 0]  # (S,)
    mask = (key_seq[None, :] == seq[:, None]) & (key_pos[None, :] <= positions[:, None])  # (N, S)
    valid = torch.ones(1, idx.numel(), dtype=torch.bool, device=device)
    x = _through_blocks(model, idx[None], positions[None], mask[None, None], pool, write_slots, valid,
                        read_slots[None])  # (1, N, C)
    ends = torch.cumsum(torch.bincount(seq, minlength=R), 0) - 1  # (R,): each request's last token
    return model.lm_head(model.norm_f(x[0, ends]))  # (R, V)


class ModelRunner:
    """Runs a batch of requests forward: one token per request when all of them decode (the
    padded (B, 1) layout, where nothing is padded), else the packed layout, so a new prompt
    and the decoding requests share one pass and no prompt is padded to the longest. Packed
    passes are cut where their tokens × keys would pass `pack_budget` (the price of the packed
    mask), the way servers cap the tokens of one pass. Built in chapter 9."""

    def __init__(self, model: GPT, pool: BlockPool, pack_budget: int = 2**20):
        self.model, self.pool, self.pack_budget = model, pool, pack_budget

    def run(self, rows) -> Tensor:
        """Logits (len(rows), V), in the order of `rows`, after each one's uncached tokens."""
        if all(len(r.tokens) - r.n_cached == 1 for r in rows):
            return self._decode(rows)
        logits = torch.empty(len(rows), self.model.config.vocab_size, device=self.model.device,
                             dtype=self.model.dtype)
        for group in self._packs(rows):
            logits[group[0]: group[-1] + 1] = self._packed([rows[i] for i in group])
        return logits

    def _packs(self, rows) -> list[list[int]]:
        """Consecutive rows, grouped while (tokens fed) × (keys read) stays within the budget."""
        groups, n, s = [[]], 0, 0
        for i, r in enumerate(rows):
            fed, keys = len(r.tokens) - r.n_cached, len(r.tokens)
            if groups[-1] and (n + fed) * (s + keys) > self.pack_budget:
                groups.append([])
                n = s = 0
            groups[-1].append(i)
            n, s = n + fed, s + keys
        return groups

    def _packed(self, rows) -> Tensor:
        idx = torch.tensor([t for r in rows for t in r.tokens[r.n_cached:]])
        positions = torch.cat([torch.arange(r.n_cached, len(r.tokens)) for r in rows])
        seq = torch.cat([torch.full((len(r.tokens) - r.n_cached,), b) for b, r in enumerate(rows)])
        n_keys = torch.tensor([len(r.tokens) for r in rows])
        device = self.model.device
        return forward_packed(self.model, idx.to(device), positions.to(device), seq.to(device), self.pool,
                              self._tables(rows).to(device), n_keys.to(device))

    def _decode(self, rows) -> Tensor:
        idx = torch.tensor([[r.tokens[-1]] for r in rows])  # (B, 1)
        positions = torch.tensor([[r.n_cached] for r in rows])  # (B, 1)
        device = self.model.device
        return forward_paged(self.model, idx.to(device), positions.to(device),
                             torch.ones(len(rows), 1, dtype=torch.bool, device=device), self.pool,
                             self._tables(rows).to(device), max(len(r.tokens) for r in rows))

    @staticmethod
    def _tables(rows) -> Tensor:
        tables = torch.zeros(len(rows), max(len(r.table) for r in rows), dtype=torch.long)
        for b, r in enumerate(rows):
            tables[b, : len(r.table)] = torch.tensor(r.table)
        return tables
