"""The block manager: which blocks of the pool each request holds, and a prefix cache.

A request is anything with `tokens` (its prompt and the tokens generated so far), `n_cached`
(how many of them have their keys and values in the cache) and `table` (its block table).
The manager gives a request blocks for its tokens when it is admitted (`allocate`), a slot for
each new token (`append_slot`: a new block only when the last one is full) and takes them all
back when it finishes or is preempted (`free`). Holder counts live in the pool
(kvlab.paged.BlockPool): a block shared by several requests is freed by its last holder.

With `prefix_caching=True`, every full block a request prefills is keyed by a hash of its tokens
and of every token before it (`block_hashes`), so a later request whose tokens begin the same way
finds it (`match_prefix`) and skips computing it. A cached block outlives its requests: when its
last holder lets go it joins the end of the pool's free list with its key still attached, and is
overwritten only when it reaches the front, least recently freed first. Built in chapter 9.
"""

from __future__ import annotations

import math

from ..paged import BlockPool

__all__ = ["block_hashes", "match_prefix", "BlockManager"]


def block_hashes(tokens: list[int], block_size: int) -> list[int]:
    """One key per *full* block of `tokens`: the hash of the previous block's key and this block's
    tokens, so equal keys mean equal tokens from position 0 to the block's end. Built in chapter 9."""
    keys, previous = [], None
    for j in range(len(tokens) // block_size):
        previous = hash((previous, tuple(tokens[j * block_size: (j + 1) * block_size])))
        keys.append(previous)
    return keys


def match_prefix(keys: list[int], cached: dict[int, int]) -> list[int]:
    """The blocks of the longest run of `keys`, from the first, found in `cached` (key -> block).
    Built in chapter 9."""
    blocks = []
    for key in keys:
        if key not in cached:
            break  # a prefix ends at its first miss: later blocks depend on this one
        blocks.append(cached[key])
    return blocks


class BlockManager:
    """Per-request block bookkeeping over a `BlockPool`, with an optional prefix cache.

    `can_allocate(r)` / `allocate(r)` give an admitted request blocks for all its tokens, reusing
    cached prefix blocks; `append_slot(r)` makes room for the token a running request feeds next
    (False when the pool is full); `free(r)` gives everything back and marks `r` uncached.
    `computed()` tells the manager that this step's forward has filled the blocks it handed
    out, so other requests may now share them. Built in chapter 9.
    """

    def __init__(self, pool: BlockPool, *, prefix_caching: bool = False, hash_blocks=block_hashes,
                 match=match_prefix):
        self.pool = pool
        self.block_size = pool.block_size
        self.prefix_caching = prefix_caching
        self.hash_blocks, self.match = hash_blocks, match  # the chapter's check swaps in the learner's
        self.cached: dict[int, int] = {}  # prefix key -> block holding it
        self._key_of: dict[int, int] = {}  # block -> its key, to forget it when the block is reused
        self._pending: set[int] = set()  # cached blocks being filled in the current step
        self.copies = 0  # shared blocks copied before a write (copy-on-write)
        self.hits = 0  # prefix blocks found in the cache instead of computed

    # -- admission ------------------------------------------------------------------------------

    def _plan(self, r) -> tuple[list[int], int] | None:
        """(the cached blocks `r` can reuse, how many blocks it needs from the free list), or None
        if a block it would reuse is still being filled in this step."""
        hits = self.match(self.hash_blocks(r.tokens, self.block_size), self.cached) if self.prefix_caching else []
        if any(b in self._pending for b in hits):
            return None
        need = math.ceil(len(r.tokens) / self.block_size) - len(hits)
        whole = bool(hits) and len(hits) * self.block_size == len(r.tokens)
        if whole and not self.pool.is_free(hits[-1]):
            need += 1  # its last token is recomputed into the last hit block: a private copy first
        return hits, need + sum(self.pool.is_free(b) for b in hits)

    def can_allocate(self, r) -> bool:
        """True when the free blocks (after reusing cached ones) hold every token of `r`."""
        plan = self._plan(r)
        return plan is not None and plan[1] <= self.pool.num_free

    def allocate(self, r) -> None:
        """Give `r` blocks for all its tokens: the cached prefix first, then fresh blocks."""
        plan = self._plan(r)
        if plan is None or plan[1] > self.pool.num_free:
            raise RuntimeError("not enough free blocks for this request: ask can_allocate first")
        hits, _ = plan
        for b in hits:  # a cached block nobody holds comes off the free list; a held one gains a holder
            if self.pool.is_free(b):
                self.pool.take(b)
            else:
                self.pool.hold(b)
        self.hits += len(hits)
        r.table = list(hits)
        r.n_cached = len(hits) * self.block_size
        if r.n_cached == len(r.tokens):  # the whole prompt hit: recompute the last token for its logits
            r.n_cached -= 1
            self._make_writable(r, len(hits) - 1)
        while len(r.table) * self.block_size < len(r.tokens):
            r.table.append(self._fresh())
        if self.prefix_caching:  # offer the full blocks computed now to later requests
            for j, key in enumerate(self.hash_blocks(r.tokens, self.block_size)[len(hits):], start=len(hits)):
                if key not in self.cached:
                    self.cached[key], self._key_of[r.table[j]] = r.table[j], key
                    self._pending.add(r.table[j])

    def _fresh(self) -> int:
        """A free block with no key: the least recently freed, forgetting the prefix it cached."""
        block = self.pool.allocate()
        if block is None:
            raise RuntimeError("the pool is full")
        key = self._key_of.pop(block, None)
        if key is not None:
            del self.cached[key]
        return block

    def _make_writable(self, r, j: int) -> None:
        """Copy-on-write: before `r` writes into its j-th block, make sure no one else holds it."""
        block = r.table[j]
        if self.pool.holders[block] > 1:
            own = self._fresh()
            self.pool.copy(block, own)
            self.pool.release(block)
            r.table[j] = own
            self.copies += 1

    def computed(self) -> None:
        """The forward of this step has run: the blocks it filled may now be shared."""
        self._pending.clear()

    # -- running ----------------------------------------------------------------------------------

    def append_slot(self, r) -> bool:
        """Make sure the block for position `r.n_cached` (the token `r` feeds next) exists; a new
        block only when the last one is full. False when one is needed and none is free."""
        if r.n_cached < len(r.table) * self.block_size:
            return True
        if self.pool.num_free == 0:
            return False
        r.table.append(self._fresh())
        return True

    def free(self, r) -> None:
        """Give back every block of `r` (a shared one loses a holder); `r` is no longer cached."""
        for block in reversed(r.table):  # the last blocks are freed first, so the prefix is evicted last
            self.pool.release(block)
        r.table, r.n_cached = [], 0
