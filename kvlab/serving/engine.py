"""The engine: continuous batching made of a block manager, a scheduler and a model runner.

Shape legend: B rows (requests) in one forward, T tokens fed per row, V vocab_size.

`Engine` is what a user calls: `submit` requests at any time (each with its own sampling
settings), `step`, collect results. A step is the chapter's four parts in order: the scheduler
makes room and admits (kvlab.serving.scheduler, over the block manager of
kvlab.serving.block_manager), the model runner runs one paged forward per group of rows
(kvlab.serving.model_runner), each request samples its next token with its own settings, and
the scheduler retires the finished ones. KV memory comes in blocks from one pool (`kv="paged"`)
or in one slab per batch slot (`kv="static"`, a block as long as `max_seq_len`).

`generate_batch` runs a list of prompts of different lengths together through the same paged
forward, one slab per row. Built in chapter 9.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ..cpu_kernels import fast_cpu_inference
from ..generation import next_token
from ..gpt import GPT
from ..paged import BlockPool
from ..sampling import SamplingConfig
from .block_manager import BlockManager
from .model_runner import ModelRunner, forward_paged
from .scheduler import Request, Scheduler

__all__ = ["Engine", "generate_batch", "mixed_workload"]


# -- validation ---------------------------------------------------------------------------------

def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_model(model) -> None:
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a kvlab.GPT, got {type(model).__name__}")
    window = model.config.window
    if window is not None and window < model.config.max_seq_len:  # a window as long as the model's reach never evicts
        raise ValueError(f"model has a sliding window (config.window={window}); kvlab.serving "
                         "serves full-attention models only: use kvlab.generate for this one")
    if model.config.attention == "mla":
        raise ValueError("model has latent attention (config.attention='mla'); kvlab.serving's paged blocks "
                         "hold per-head keys and values: use kvlab.generate for this one")


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


def choose_tokens(logits: Tensor, settings: list[SamplingConfig]) -> list[int]:
    """The next token of each row of `logits` (B, V), row b chosen with `settings[b]`: one argmax
    for the greedy rows together, then each sampling row with its own settings and generator."""
    tokens = [0] * len(settings)
    greedy = [b for b, s in enumerate(settings) if s.greedy]
    if greedy:
        for b, t in zip(greedy, logits[greedy].argmax(dim=-1).tolist()):
            tokens[b] = t
    for b, s in enumerate(settings):
        if not s.greedy:
            tokens[b] = int(next_token(logits[b: b + 1], s))
    return tokens


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
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, generator=generator)
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
    logits = forward_paged(model, idx, positions, valid, pool, tables, T)

    generated: list[list[int]] = [[] for _ in rows]
    active = list(range(B))
    for n in range(1, max_new_tokens + 1):
        still = []
        for j, b in enumerate(active):
            token = int(next_token(logits[j: j + 1], sampling))
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
        logits = forward_paged(model, idx, positions, valid, pool, tables[rows_t], int(positions.max()) + 1)
    return [torch.cat([r, torch.tensor(g, dtype=torch.long)]).to(device) for r, g in zip(results, generated)]


# -- continuous batching ------------------------------------------------------------------------

class Engine:
    """Continuous batching over one model: submit requests at any time, step, collect results.

    Every `step()` admits waiting requests into free batch slots (their prompts are prefilled
    in that step, and each gets its first token), runs one decode step for every other running
    request, and returns the ids that finished. Each request has its own sampling settings and,
    with `seed`, its own CPU generator, so its text does not depend on what else is in the batch.

    KV memory: `kv="paged"` (default) hands out blocks of `block_size` positions from a pool of
    `num_blocks` (default: enough for `max_batch_size` requests of `max_seq_len`) as requests
    grow; `kv="static"` gives each batch slot one slab of `max_seq_len` positions (a block that
    size). `max_seq_len` (default: the model's) bounds prompt + max_new_tokens per request.

    Out of blocks: a request waits to be admitted until free blocks hold its tokens; a running
    request that needs a new block when none is free preempts the most recently admitted
    request, which frees its blocks and goes back to the front of the queue, keeping the tokens
    it generated; when readmitted it recomputes their keys and values. Nothing is dropped, and
    greedy results are unchanged. With `prefix_sharing=True` (paged only) full blocks are cached
    by their prefix (kvlab.serving.block_manager): a request reuses the blocks of any request,
    running or finished, whose tokens began the same way, as long as the pool has not reused
    them; a request whose prefix is being computed in this very step waits one step for it.

    On a CPU, with `cpu_kernels=True` (default), the constructor makes chapter 5's linear-kernel
    choice for a full batch once (`kvlab.cpu_kernels.fast_cpu_inference`; the model keeps it, same
    weights and values; `kvlab.cpu_kernels.plain_linears(model)` undoes it). Built in chapter 9.
    """

    def __init__(self, model: GPT, *, max_batch_size: int, kv: str = "paged", block_size: int = 16,
                 num_blocks: int | None = None, prefix_sharing: bool = False, max_seq_len: int | None = None,
                 cpu_kernels: bool = True):
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
        if not isinstance(cpu_kernels, bool):
            raise TypeError(f"cpu_kernels must be a bool, got {type(cpu_kernels).__name__}")
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
        if cpu_kernels:  # once per engine, never per step: the CPU linear kernel measured fastest for a full batch
            fast_cpu_inference(model, int(max_batch_size))
        self.max_batch_size = int(max_batch_size)
        self.kv = kv
        self.block_size = int(block_size)
        self.max_seq_len = int(max_seq_len)
        self.prefix_sharing = prefix_sharing
        self.pool = BlockPool(n_layers=c.n_layers, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim,
                              num_blocks=int(num_blocks), block_size=self.block_size, device=model.device,
                              dtype=model.dtype)
        self.blocks = BlockManager(self.pool, prefix_caching=prefix_sharing)
        self.scheduler = Scheduler(self.blocks, self.max_batch_size)
        self.runner = ModelRunner(model, self.pool)
        self._done: dict[int, Tensor] = {}
        self._next_id = 0

    # -- the step: the chapter's parts in order -----------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[int]:
        """Admit waiting requests into free slots, run every running request forward (prefill
        for the new, one decode token for the others), sample, and return the ids of the
        requests that finished."""
        batch = self.scheduler.schedule()  # make room (preempt if the pool is dry), admit
        if not batch:
            return []
        logits = self.runner.run(batch)  # (B, V): the paged forward, one pass per group
        self.blocks.computed()  # the prefix blocks filled in this pass may now be shared
        tokens = choose_tokens(logits, [r.sampling for r in batch])  # each request with its own settings
        finished = self.scheduler.postprocess(batch, tokens)  # append, retire, free blocks
        for r in finished:
            self._done[r.id] = torch.tensor(r.tokens, dtype=torch.long, device=self.model.device)
        return [r.id for r in finished]

    # -- requests -----------------------------------------------------------------------------

    def submit(self, prompt, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, min_p: float | None = None, seed: int | None = None,
               eos_id: int | None = None) -> int:
        """Queue a request; returns its id. Every argument is checked first; a bad one raises
        TypeError/ValueError and leaves the engine as it was. Built in chapter 9."""
        c = self.model.config
        ids = _as_ids(prompt, "prompt", c.vocab_size)
        max_new_tokens = _check_new_tokens(max_new_tokens)
        if seed is not None and not _is_int(seed):
            raise TypeError(f"seed must be None or an int, got {seed!r}")
        generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, generator=generator)
        eos_id = _check_eos(eos_id, c.vocab_size)
        total = len(ids) + max_new_tokens
        if total > self.max_seq_len:
            raise ValueError(f"prompt ({len(ids)}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                             f"max_seq_len={self.max_seq_len}")
        capacity = self.pool.num_blocks * self.block_size
        if self.kv == "paged" and total - 1 > capacity:
            raise ValueError(f"prompt + max_new_tokens needs {total - 1} cached positions, more than the "
                             f"pool's {capacity} (num_blocks={self.pool.num_blocks} x block_size={self.block_size})")
        request = Request(id=self._next_id, prompt_len=len(ids), max_new_tokens=max_new_tokens, sampling=sampling,
                          eos_id=eos_id, tokens=ids)
        self._next_id += 1
        if max_new_tokens == 0:  # nothing to compute
            self._done[request.id] = torch.tensor(ids, dtype=torch.long, device=self.model.device)
        else:
            self.scheduler.add(request)
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
        while self.num_waiting or self.num_running:
            self.step()
        return dict(sorted(self._done.items()))

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def preemptions(self) -> int:
        """How many times a request was sent back to the queue."""
        return self.scheduler.preemptions

    @property
    def copies(self) -> int:
        """How many shared blocks were copied before a write (copy-on-write)."""
        return self.blocks.copies

    def block_tables(self) -> dict[int, list[int]]:
        """The block table of every running request: request id -> block ids, in position order."""
        return {r.id: list(r.table) for r in self.scheduler.running}

    def cached_lengths(self) -> dict[int, int]:
        """How many positions of every running request are in the cache: request id -> count."""
        return {r.id: r.n_cached for r in self.scheduler.running}

    # -- memory -------------------------------------------------------------------------------

    def kv_bytes_reserved(self) -> int:
        """Bytes of KV memory allocated to requests now: blocks handed out (a shared one once), or
        the slabs of occupied slots. Cached blocks no request holds are free, so not counted."""
        held = sum(1 for h in self.pool.holders if h > 0)
        return held * self.pool.bytes_per_block

    def kv_bytes_used(self) -> int:
        """Bytes of KV memory holding live tokens now (a shared position counted once)."""
        filled: dict[int, int] = {}
        bs = self.block_size
        for r in self.scheduler.running:
            for j, block in enumerate(r.table):
                filled[block] = max(filled.get(block, 0), min(bs, max(r.n_cached - j * bs, 0)))
        return sum(filled.values()) * self.pool.bytes_per_token


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
