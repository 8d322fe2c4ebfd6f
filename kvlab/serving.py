"""Serving many requests: ragged batches, continuous batching, paged KV memory, shared prefixes.

Shape legend: B rows (requests) in one forward, T tokens fed per row this forward (rows with
fewer are padded), S keys attended per row, C d_model, H n_heads, Hkv n_kv_heads, D head_dim,
V vocab_size.

One forward pass, `forward_rows`, serves every case. Each row brings its own tokens at its own
positions (`positions`, (B, T), not one shared range), so a row may be prefilling a 40-token
prompt while the next decodes its 97th token. Padding is marked by `valid` (B, T): a pad is
never written to the cache and its output is never used. New keys and values go into a
`BlockPool` (kvlab.paged) at the slots the row's block table names; then every row gathers
its keys 0..S-1 back in position order and attends with a mask built from positions alone:
key j is visible to a query at position q when j <= q. Keys past a row's own length are
therefore never seen, whatever is in the slots they point to.

`generate_batch` runs a list of prompts of different lengths together, one block per row (a
"static slab" is a block as long as the longest request). `Engine` is continuous batching:
requests join and leave a running batch at every step, each with its own sampling settings,
and their KV memory comes in blocks from one pool (`kv="paged"`) or in one slab per batch slot
(`kv="static"`). With `prefix_sharing=True` requests whose prompts begin with the same full
blocks hold those blocks together. Built in chapter 9.
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import apply_rope, repeat_kv
from .generate import next_token
from .gpt import GPT
from .layers import rope_cos_sin
from .paged import BlockPool, slot_mapping
from .sampling import check_sampling_args
from .speedups import measured_linears

__all__ = ["forward_rows", "generate_batch", "Engine", "mixed_workload"]


# -- one forward pass over ragged rows ----------------------------------------------------------

def forward_rows(model: GPT, idx: Tensor, positions: Tensor, valid: Tensor, pool: BlockPool,
                 block_tables: Tensor, n_keys: int) -> Tensor:
    """Next-token logits (B, V) after each row's last valid token.

    `idx`, `positions` and `valid` are (B, T): token ids, their absolute positions in their own
    request, and False for padding (which must come after a row's real tokens). Keys and values
    of the valid tokens are written into `pool` through `block_tables` (B, nb); each row then
    attends over its keys at positions 0..n_keys-1. The same steps as `GPT._forward` and
    `Block.forward`, with per-row positions and a gather in place of the cache. Built in chapter 9.
    """
    model_dtype = model.dtype
    c = model.config
    B, T = idx.shape
    H, Hkv, D = c.n_heads, c.n_kv_heads, c.head_dim
    device = idx.device
    bs = pool.block_size

    x = model.tok_emb(idx)  # (B, T, C)
    if model.pos_emb is not None:
        x = x + model.pos_emb(positions)  # each row's own positions
    x = model.drop(x)
    rope = None
    if c.pos == "rope":
        cos, sin = rope_cos_sin(positions.reshape(-1), D, c.rope_base)  # (B·T, D)
        rope = (cos.view(B, 1, T, D).to(model_dtype), sin.view(B, 1, T, D).to(model_dtype))

    write_slots = slot_mapping(block_tables, positions, bs)[valid]  # (N,)
    key_pos = torch.arange(n_keys, device=device)  # (S,)
    read_slots = slot_mapping(block_tables, key_pos.expand(B, n_keys), bs)  # (B, S)
    mask = (key_pos[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, S): j <= q

    for i, block in enumerate(model.blocks):
        attn = block.attn
        h = block.norm1(x)
        q, k, v = attn.qkv(h).split([c.d_model, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        pool.write(i, k.transpose(1, 2)[valid], v.transpose(1, 2)[valid], write_slots)  # (N, Hkv, D)
        k_all, v_all = pool.gather(i, read_slots)  # (B, Hkv, S, D)
        n_rep = H // Hkv
        k_all, v_all = repeat_kv(k_all, n_rep), repeat_kv(v_all, n_rep)  # (B, H, S, D)
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)  # (B, H, T, D)
        x = x + block.attn_drop(attn.out(y.transpose(1, 2).reshape(B, T, c.d_model)))
        x = x + block.mlp(block.norm2(x))
    last = valid.sum(dim=1) - 1  # (B,): index of each row's last real token
    x = x[torch.arange(B, device=device), last]  # (B, C)
    return model.lm_head(model.norm_f(x))  # (B, V)


# -- validation ---------------------------------------------------------------------------------

def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_model(model) -> None:
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a kvlab.GPT, got {type(model).__name__}")
    if model.config.window is not None:
        raise ValueError(f"model has a sliding window (config.window={model.config.window}); kvlab.serving "
                         "serves full-attention models only: use kvlab.generate for this one")


def _as_ids(prompt, name: str, vocab_size: int) -> list[int]:
    """A 1-D tensor or a list of ints -> a non-empty list of ids in the vocabulary."""
    if isinstance(prompt, Tensor):
        if prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids, got dtype {prompt.dtype}")
        if prompt.dim() != 1:
            raise ValueError(f"{name} must be a 1-D tensor of token ids, got shape {tuple(prompt.shape)}")
        ids = prompt.tolist()
    elif isinstance(prompt, (list, tuple)):
        if not all(_is_int(t) for t in prompt):
            raise TypeError(f"{name} must be a list of ints (token ids)")
        ids = [int(t) for t in prompt]
    else:
        raise TypeError(f"{name} must be a 1-D tensor or a list of token ids, got {type(prompt).__name__}")
    if not ids:
        raise ValueError(f"{name} is empty: a prompt needs at least one token")
    lo, hi = min(ids), max(ids)
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{name} has token ids in [{lo}, {hi}]; they must be in [0, {vocab_size - 1}]")
    return ids


def _check_new_tokens(max_new_tokens) -> int:
    if not _is_int(max_new_tokens):
        raise TypeError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    return int(max_new_tokens)


def _check_eos(eos_id, vocab_size: int) -> int | None:
    if eos_id is not None and (not _is_int(eos_id) or not 0 <= eos_id < vocab_size):
        raise ValueError(f"eos_id must be None or an int in [0, {vocab_size - 1}], got {eos_id!r}")
    return None if eos_id is None else int(eos_id)


# -- ragged batches -----------------------------------------------------------------------------

@torch.inference_mode()
def generate_batch(
    model: GPT, prompts, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
    top_p: float | None = None, min_p: float | None = None, generator: torch.Generator | None = None,
    eos_id: int | None = None,
) -> list[Tensor]:
    """Continue prompts of different lengths together; one result per prompt: prompt + new tokens.

    `prompts` is a list of 1-D token-id tensors or lists of ints. A result ends at `eos_id` if the
    row emitted it. Every row keeps its own positions, so in float32 with temperature 0 each
    result equals `kvlab.generate(model, prompt[None], ...)` for that prompt alone. With a
    `generator`, rows draw from it one after another. Built in chapter 9.
    """
    _check_model(model)
    if not isinstance(prompts, (list, tuple)):
        raise TypeError("prompts must be a list of 1-D token-id tensors or lists of ints, "
                        f"got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt")
    c = model.config
    rows = [_as_ids(p, f"prompts[{i}]", c.vocab_size) for i, p in enumerate(prompts)]
    max_new_tokens = _check_new_tokens(max_new_tokens)
    check_sampling_args(temperature, top_k, top_p, min_p)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    eos_id = _check_eos(eos_id, c.vocab_size)
    longest = max(len(r) for r in rows) + max_new_tokens
    if longest > c.max_seq_len:
        raise ValueError(f"the longest prompt + max_new_tokens = {longest} exceeds the model's "
                         f"max_seq_len={c.max_seq_len}; shorten it or lower max_new_tokens")
    device = model.device
    results = [torch.tensor(r, dtype=torch.long) for r in rows]
    if max_new_tokens == 0:
        return [r.to(device) for r in results]

    B = len(rows)
    slab = longest - 1  # positions a row ever caches: the last new token is never fed back
    pool = BlockPool(n_layers=c.n_layers, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim, num_blocks=B,
                     block_size=max(slab, 1), device=device, dtype=model.dtype)
    tables = torch.arange(B, device=device)[:, None]  # (B, 1): row b owns block b, its slab

    # Prefill: right-padded prompts, each row at positions 0..len-1.
    lengths = torch.tensor([len(r) for r in rows], device=device)
    T = int(lengths.max())
    idx = torch.zeros(B, T, dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        idx[b, : len(r)] = torch.tensor(r, device=device)
    positions = torch.arange(T, device=device).expand(B, T)
    valid = positions < lengths[:, None]  # (B, T)
    positions = positions * valid  # pads sit at position 0: they see one real key and are ignored
    logits = forward_rows(model, idx, positions, valid, pool, tables, T)

    choose = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, generator=generator)
    generated: list[list[int]] = [[] for _ in rows]
    active = list(range(B))
    for n in range(1, max_new_tokens + 1):
        still = []
        for j, b in enumerate(active):
            token = int(next_token(logits[j: j + 1], **choose))
            generated[b].append(token)
            if token != eos_id and n < max_new_tokens:
                still.append(b)
        active = still
        if not active:
            break
        # Decode: each active row feeds its last token at its own next position.
        rows_t = torch.tensor(active, device=device)
        idx = torch.tensor([[generated[b][-1]] for b in active], device=device)  # (B', 1)
        positions = (lengths[rows_t] + n - 1)[:, None]  # (B', 1): a different position per row
        valid = torch.ones_like(idx, dtype=torch.bool)
        logits = forward_rows(model, idx, positions, valid, pool, tables[rows_t], int(positions.max()) + 1)
    return [torch.cat([r, torch.tensor(g, dtype=torch.long)]).to(device) for r, g in zip(results, generated)]


# -- continuous batching ------------------------------------------------------------------------

@dataclass
class _Request:
    """One request's settings and progress. `tokens` is prompt + generated so far; the first
    `n_cached` of them have their keys and values in the blocks of `table`."""

    id: int
    prompt_len: int
    max_new_tokens: int
    sampling: dict  # temperature, top_k, top_p, min_p, generator
    eos_id: int | None
    tokens: list[int]
    n_cached: int = 0
    table: list[int] = field(default_factory=list)
    admitted_at: int = -1  # order of admission, for choosing whom to preempt

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - self.prompt_len


class Engine:
    """Continuous batching over one model: submit requests at any time, step, collect results.

    Every `step()` admits waiting requests into free batch slots (their prompts are prefilled
    in that step, and each gets its first token), runs one decode step for every other running
    request, and returns the ids that finished. The decoding rows share one forward pass and the
    prefilling rows another, so a one-token row is never padded to a new prompt's length. Each request has its
    own sampling settings and, with `seed`, its own CPU generator, so its text does not depend
    on what else is in the batch.

    KV memory: `kv="paged"` (default) hands out blocks of `block_size` positions from a pool of
    `num_blocks` (default: enough for `max_batch_size` requests of `max_seq_len`) as requests
    grow; `kv="static"` gives each batch slot one slab of `max_seq_len` positions (a block that
    size). `max_seq_len` (default: the model's) bounds prompt + max_new_tokens per request.

    Out of blocks: a request waits to be admitted until its prompt's blocks are free; a running
    request that needs a new block when none is free preempts the most recently admitted
    request, which frees its blocks and goes back to the front of the queue, keeping the tokens
    it generated; when readmitted it recomputes their keys and values. Nothing is dropped, and
    greedy results are unchanged. With `prefix_sharing=True` (paged only) a request reuses the
    blocks of a running request whose prompt starts with the same full blocks; a request whose
    prefix is being computed in this very step waits one step for it. Built in chapter 9.
    """

    def __init__(self, model: GPT, *, max_batch_size: int, kv: str = "paged", block_size: int = 16,
                 num_blocks: int | None = None, prefix_sharing: bool = False, max_seq_len: int | None = None):
        _check_model(model)
        c = model.config
        if not _is_int(max_batch_size) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
        if kv not in ("paged", "static"):
            raise ValueError(f"kv must be 'paged' or 'static', got {kv!r}")
        if not _is_int(block_size) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        if num_blocks is not None and (not _is_int(num_blocks) or num_blocks < 1):
            raise ValueError(f"num_blocks must be None or an int >= 1, got {num_blocks!r}")
        if not isinstance(prefix_sharing, bool):
            raise TypeError(f"prefix_sharing must be a bool, got {type(prefix_sharing).__name__}")
        if max_seq_len is None:
            max_seq_len = c.max_seq_len
        if not _is_int(max_seq_len) or not 1 <= max_seq_len <= c.max_seq_len:
            raise ValueError(f"max_seq_len must be an int in [1, {c.max_seq_len}] (the model's), got {max_seq_len!r}")
        if kv == "static":
            if prefix_sharing:
                raise ValueError("prefix_sharing needs kv='paged': slabs cannot be shared")
            if num_blocks is not None:
                raise ValueError("num_blocks is for kv='paged'; kv='static' has one slab per batch slot")
            block_size, num_blocks = max_seq_len, max_batch_size
        elif num_blocks is None:
            num_blocks = max_batch_size * math.ceil(max_seq_len / block_size)
        self.model = model
        self.max_batch_size = int(max_batch_size)
        self.kv = kv
        self.block_size = int(block_size)
        self.max_seq_len = int(max_seq_len)
        self.prefix_sharing = prefix_sharing
        self.pool = BlockPool(n_layers=c.n_layers, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim,
                              num_blocks=int(num_blocks), block_size=self.block_size, device=model.device,
                              dtype=model.dtype)
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._done: dict[int, Tensor] = {}
        self._next_id = 0
        self._admissions = 0
        self._prefixes: dict[tuple[int, ...], int] = {}  # prompt prefix (full blocks) -> block holding its end
        self._prefix_of: dict[int, tuple[int, ...]] = {}  # the reverse, to forget a freed block
        self._computing: set[int] = set()  # prefix blocks being filled in the current step
        self.preemptions = 0  # how many times a request was sent back to the queue
        self.copies = 0  # how many shared blocks were copied before a write (copy-on-write)

    # -- requests -----------------------------------------------------------------------------

    def submit(self, prompt, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, min_p: float | None = None, seed: int | None = None,
               eos_id: int | None = None) -> int:
        """Queue a request; returns its id. Every argument is checked first; a bad one raises
        TypeError/ValueError and leaves the engine as it was. Built in chapter 9."""
        c = self.model.config
        ids = _as_ids(prompt, "prompt", c.vocab_size)
        max_new_tokens = _check_new_tokens(max_new_tokens)
        check_sampling_args(temperature, top_k, top_p, min_p)
        if seed is not None and not _is_int(seed):
            raise TypeError(f"seed must be None or an int, got {seed!r}")
        eos_id = _check_eos(eos_id, c.vocab_size)
        total = len(ids) + max_new_tokens
        if total > self.max_seq_len:
            raise ValueError(f"prompt ({len(ids)}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                             f"max_seq_len={self.max_seq_len}")
        capacity = self.pool.num_blocks * self.block_size
        if self.kv == "paged" and total - 1 > capacity:
            raise ValueError(f"prompt + max_new_tokens needs {total - 1} cached positions, more than the "
                             f"pool's {capacity} (num_blocks={self.pool.num_blocks} x block_size={self.block_size})")
        generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        request = _Request(id=self._next_id, prompt_len=len(ids), max_new_tokens=max_new_tokens,
                           sampling=dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                         generator=generator),
                           eos_id=eos_id, tokens=ids)
        self._next_id += 1
        self._waiting.append(request)
        return request.id

    def result(self, request_id: int) -> Tensor:
        """Prompt + new tokens of a finished request (ending at its eos_id if it emitted it)."""
        if request_id in self._done:
            return self._done[request_id]
        if not _is_int(request_id) or not 0 <= request_id < self._next_id:
            raise ValueError(f"request_id {request_id!r} was never returned by submit()")
        raise ValueError(f"request {request_id} has not finished yet: call step() or run()")

    def run(self) -> dict[int, Tensor]:
        """Step until every request is done; the results of every request submitted so far."""
        while self._waiting or self._running:
            self.step()
        return dict(sorted(self._done.items()))

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def block_tables(self) -> dict[int, list[int]]:
        """The block table of every running request: request id -> block ids, in position order."""
        return {r.id: list(r.table) for r in self._running}

    def cached_lengths(self) -> dict[int, int]:
        """How many positions of every running request are in the cache: request id -> count."""
        return {r.id: r.n_cached for r in self._running}

    # -- memory -------------------------------------------------------------------------------

    def kv_bytes_reserved(self) -> int:
        """Bytes of KV memory allocated to requests now: blocks handed out (a shared one once), or
        the slabs of occupied slots."""
        held = sum(1 for h in self.pool.holders if h > 0)
        return held * self.pool.bytes_per_block

    def kv_bytes_used(self) -> int:
        """Bytes of KV memory holding live tokens now (a shared position counted once)."""
        filled: dict[int, int] = {}
        bs = self.block_size
        for r in self._running:
            for j, block in enumerate(r.table):
                filled[block] = max(filled.get(block, 0), min(bs, max(r.n_cached - j * bs, 0)))
        return sum(filled.values()) * self.pool.bytes_per_token

    # -- the scheduler ------------------------------------------------------------------------

    def _release(self, r: _Request) -> None:
        for block in r.table:
            if self.pool.release(block) and block in self._prefix_of:
                del self._prefixes[self._prefix_of.pop(block)]
        r.table = []

    def _finish(self, r: _Request, finished: list[int]) -> None:
        self._release(r)
        self._done[r.id] = torch.tensor(r.tokens, dtype=torch.long, device=self.model.device)
        finished.append(r.id)

    def _admit(self, r: _Request) -> bool:
        """Give `r` the blocks for its tokens (sharing what it can); False if it must wait."""
        bs, pool = self.block_size, self.pool
        shared: list[int] = []
        if self.prefix_sharing:
            for j in range(len(r.tokens) // bs):
                block = self._prefixes.get(tuple(r.tokens[: (j + 1) * bs]))
                if block is None:
                    break
                if block in self._computing:
                    return False  # its prefix is being computed right now: wait one step and share it
                shared.append(block)
        n_cached = len(shared) * bs
        if n_cached == len(r.tokens):
            n_cached -= 1  # recompute the last token for its logits: it writes into the last shared block
        need = math.ceil(len(r.tokens) / bs) - len(shared) + (n_cached < len(shared) * bs)
        if pool.num_free < need:
            return False
        for block in shared:
            pool.hold(block)
        r.table = list(shared)
        r.n_cached = n_cached
        if n_cached < len(shared) * bs:
            self._make_writable(r, len(shared) - 1)
        while len(r.table) * bs < len(r.tokens):
            r.table.append(pool.allocate())
        if self.prefix_sharing:  # offer this prompt's own full blocks to later requests
            for j in range(len(shared), r.prompt_len // bs):
                key = tuple(r.tokens[: (j + 1) * bs])
                if key not in self._prefixes:
                    self._prefixes[key] = r.table[j]
                    self._prefix_of[r.table[j]] = key
                    self._computing.add(r.table[j])
        r.admitted_at = self._admissions
        self._admissions += 1
        return True

    def _make_writable(self, r: _Request, j: int) -> None:
        """Copy-on-write: before `r` writes into its j-th block, make sure no one else holds it."""
        block = r.table[j]
        if self.pool.holders[block] > 1:
            own = self.pool.allocate()
            if own is None:  # admission counts this block; later writes never land in a shared one
                raise RuntimeError("no free block for copy-on-write")
            self.pool.copy(block, own)
            self.pool.release(block)
            r.table[j] = own
            self.copies += 1

    def _preempt(self) -> _Request:
        """Send the most recently admitted running request back to the front of the queue."""
        victim = max(self._running, key=lambda r: r.admitted_at)
        self._running.remove(victim)
        self._release(victim)
        victim.n_cached = 0
        self._waiting.appendleft(victim)
        self.preemptions += 1
        return victim

    def _forward(self, rows: list[_Request]) -> Tensor:
        """One `forward_rows` over `rows`, each feeding its uncached tokens; logits (B, V)."""
        device = self.model.device
        feeds = [r.tokens[r.n_cached:] for r in rows]
        B, T = len(rows), max(len(f) for f in feeds)
        idx = torch.zeros(B, T, dtype=torch.long)
        positions = torch.zeros(B, T, dtype=torch.long)  # pads sit at position 0
        valid = torch.zeros(B, T, dtype=torch.bool)
        for b, (r, f) in enumerate(zip(rows, feeds)):
            idx[b, : len(f)] = torch.tensor(f)
            positions[b, : len(f)] = torch.arange(r.n_cached, len(r.tokens))
            valid[b, : len(f)] = True
        tables = torch.zeros(B, max(len(r.table) for r in rows), dtype=torch.long)
        for b, r in enumerate(rows):
            tables[b, : len(r.table)] = torch.tensor(r.table)
        n_keys = max(len(r.tokens) for r in rows)
        return forward_rows(self.model, idx.to(device), positions.to(device), valid.to(device), self.pool,
                            tables.to(device), n_keys)

    @torch.inference_mode()
    def step(self) -> list[int]:
        """Admit waiting requests into free slots, run every running request forward (prefill
        for the new, one decode token for the others), sample, and return the ids of the
        requests that finished."""
        finished: list[int] = []
        bs = self.block_size
        # 1. Every running request needs a writable block for the token it feeds this step.
        for r in sorted(self._running, key=lambda r: r.admitted_at):
            if r not in self._running:
                continue  # preempted below by an earlier request
            j = r.n_cached // bs
            while j >= len(r.table):
                block = self.pool.allocate()
                if block is not None:
                    r.table.append(block)
                elif self._preempt() is r:
                    break
            if r in self._running:
                self._make_writable(r, j)
        # 2. Admit from the front of the queue while there are slots and blocks.
        while self._waiting and len(self._running) < self.max_batch_size:
            r = self._waiting[0]
            if r.n_generated >= r.max_new_tokens:  # max_new_tokens == 0: nothing to compute
                self._waiting.popleft()
                self._finish(r, finished)
                continue
            if not self._admit(r):
                break
            self._running.append(self._waiting.popleft())
        if not self._running:
            return finished
        # 3. The forward passes: one for the rows decoding a single token, one for the rows
        # prefilling a prompt. Apart, a decode row is not padded to the longest new prompt.
        rows = list(self._running)
        decoding = [r for r in rows if len(r.tokens) - r.n_cached == 1]
        prefilling = [r for r in rows if len(r.tokens) - r.n_cached > 1]
        logits = {}
        # On a CPU, the linear kernel this machine measured fastest for a full batch (kvlab.speedups).
        with measured_linears(self.model, self.max_batch_size):
            for group in (decoding, prefilling):
                if group:
                    logits.update(zip((r.id for r in group), self._forward(group)))
        self._computing.clear()
        # 4. Each request chooses its next token with its own settings.
        for r in rows:
            r.n_cached = len(r.tokens)
            token = int(next_token(logits[r.id][None], **r.sampling))
            r.tokens.append(token)
            if token == r.eos_id or r.n_generated >= r.max_new_tokens:
                self._running.remove(r)
                self._finish(r, finished)
        return finished


# -- a workload for measurements ----------------------------------------------------------------

def mixed_workload(n: int, *, seed: int = 0, prompt_range: tuple[int, int] = (16, 128),
                   new_range: tuple[int, int] = (16, 128), vocab_size: int = 256) -> list[tuple[list[int], int]]:
    """`n` requests (prompt ids, max_new_tokens) with lengths drawn uniformly from the ranges
    (inclusive) by a seeded CPU generator: the same list on every machine. Built in chapter 9."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        T = int(torch.randint(prompt_range[0], prompt_range[1] + 1, (1,), generator=g))
        N = int(torch.randint(new_range[0], new_range[1] + 1, (1,), generator=g))
        out.append((torch.randint(0, vocab_size, (T,), generator=g).tolist(), N))
    return out
