"""Checks for chapter 9, a small vLLM.

Each build step of the chapter is checked against a reference written here, on random or
adversarial cases, and run with kvlab's own version of that piece switched off (`without_kvlab`
in `_common`: calling it raises), so an answer that only calls the library is refused. The block manager is
run on random traces of allocate / append / fork / free against a reference that counts holders;
the paged write against the slot formula; the paged attention against dense attention over the
same keys, while watching that no contiguous copy of a request's keys is made; the scheduler's
step inside a real engine under a tight pool, every result compared with the request run alone;
the prefix cache's keys and matching on their own and inside a real engine. The left-padding
exercise is checked against its definition, the block-size experiment by running the chapter's
workload live, the prefill-count question against the rule of full blocks.
"""

from __future__ import annotations

import math
import numbers
import random

import torch
from torch.overrides import TorchFunctionMode

from ._common import call_learner, learner_check, passed, reject_number, require_answer, small_model

__all__ = ["check_block_manager", "check_paged_write", "check_paged_attention", "check_schedule",
           "check_prefix_cache", "check_left_pad", "check_block_size_waste", "check_prefilled_tokens",
           "WASTE_WORKLOAD", "reserved_over_used", "REFUSAL"]

REFUSAL = "this check runs your code without kvlab's own serving pieces: build it from the pieces above"


# What each check switches off while the learner's code runs: (module or class, attribute names).
def _pieces(group: str):
    from ... import paged
    from ...serving import block_manager, scheduler

    return {
        "blocks": [(paged.BlockPool, ("allocate", "take", "hold", "release")),
                   (block_manager.BlockManager, ("can_allocate", "allocate", "append_slot", "free"))],
        "write": [(paged, ("slot_mapping",)), (paged.BlockPool, ("write",))],
        "attention": [(paged, ("gather_kv", "paged_attention_blockwise", "paged_attention_gather", "slot_mapping")),
                      (paged.BlockPool, ("gather",))],
        "scheduler": [(scheduler.Scheduler, ("schedule", "preempt"))],
        "prefix": [(block_manager, ("block_hashes", "match_prefix"))],
    }[group]


def _learner(fn, *args, name: str, group: str, **kwargs):
    """The learner's call with kvlab's own version of the piece `group` switched off."""
    pieces = [vars(owner)[attr] for owner, attrs in _pieces(group) for attr in attrs]
    return call_learner(fn, *args, name=name, without=("own serving pieces", pieces), **kwargs)


# -- build step: the block manager ------------------------------------------------------------

class _RefBlocks:
    """The reference: holder counts per block."""

    def __init__(self, num_blocks: int, block_size: int):
        self.bs = block_size
        self.holders = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return sum(h == 0 for h in self.holders)


def _num_free(manager) -> int:
    n = manager.num_free
    n = n() if callable(n) else n
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise AssertionError(f"num_free must be an int (the number of free blocks), got {n!r}")
    return int(n)


def _trace(cls, seed: int, num_blocks: int, block_size: int, n_ops: int) -> None:
    rng = random.Random(seed)
    manager = _learner(cls, num_blocks, block_size, name="MyBlockManager", group="blocks")
    ref = _RefBlocks(num_blocks, block_size)
    live: list[tuple[list[int], list[int]]] = []  # (the learner's table, [n_tokens])
    where = f"[{num_blocks} blocks of {block_size}, trace {seed}]"

    def agree(op: str) -> None:
        got = _learner(_num_free, manager, name="MyBlockManager", group="blocks")
        if got != ref.num_free:
            if op.startswith("free") and got > ref.num_free:
                raise AssertionError(f"{where} after {op}: {got} free blocks, expected {ref.num_free}. A block another "
                                     "sequence still holds was freed: fork adds a holder to each block, and free "
                                     "returns a block to the free list only when its last holder lets go")
            raise AssertionError(f"{where} after {op}: num_free is {got}, expected {ref.num_free}")

    def take(blocks: list[int], op: str) -> None:
        for b in blocks:
            if not isinstance(b, numbers.Integral) or not 0 <= b < num_blocks:
                raise AssertionError(f"{where} {op} handed out {b!r}: block ids are ints in [0, {num_blocks - 1}]")
            if ref.holders[b] > 0:
                raise AssertionError(f"{where} {op} handed out block {b}, which a live sequence still holds (a block "
                                     "freed too early, or freed twice and now on the free list twice)")
            ref.holders[b] = 1
        if len(set(blocks)) != len(blocks):
            raise AssertionError(f"{where} {op} handed out the same block twice: {blocks}")

    for step in range(n_ops):
        kind = rng.choice(["allocate", "append", "append", "append", "fork", "free"] if live else ["allocate"])
        if kind == "allocate":
            n = rng.randint(1, 3 * block_size)
            need = math.ceil(n / block_size)
            before = ref.num_free
            table = _learner(manager.allocate, n, name="MyBlockManager.allocate", group="blocks")
            op = f"allocate({n})"
            if need > before:
                if table is not None:
                    raise AssertionError(f"{where} {op} with only {before} free blocks must return None")
                if _learner(_num_free, manager, name="MyBlockManager", group="blocks") != before:
                    raise AssertionError(f"{where} {op} failed but took blocks: allocate is all or nothing (check "
                                         "there are enough free blocks before taking any)")
                continue
            if not isinstance(table, list):
                raise AssertionError(f"{where} {op} must return the new block table, a list of block ids, got "
                                     f"{type(table).__name__}")
            if len(table) != need:
                raise AssertionError(f"{where} {op} returned {len(table)} blocks; {n} tokens in blocks of {block_size} "
                                     f"need {need}")
            take(table, op)
            live.append((table, [n]))
        elif kind == "append":
            table, n = rng.choice(live)
            n[0] += 1
            op = f"append_slot(table of {len(table)} blocks, {n[0]} tokens)"
            before = list(table)
            needed = n[0] > len(table) * block_size
            if needed and ref.num_free == 0:
                ok = _learner(manager.append_slot, table, n[0], name="MyBlockManager.append_slot", group="blocks")
                if ok is not False or table != before:
                    raise AssertionError(f"{where} {op}: the sequence needs a new block and none is free: return "
                                         "False and leave the table as it was")
                n[0] -= 1
                continue
            ok = _learner(manager.append_slot, table, n[0], name="MyBlockManager.append_slot", group="blocks")
            if ok is not True:
                raise AssertionError(f"{where} {op} must return True when the token has a slot, got {ok!r}")
            if table[: len(before)] != before:
                raise AssertionError(f"{where} {op} changed the existing entries of the table: only append")
            grown = table[len(before):]
            if needed and len(grown) != 1:
                raise AssertionError(f"{where} {op}: {len(before)} blocks of {block_size} hold {len(before) * block_size} "
                                     f"tokens, so token {n[0]} needs exactly one new block; the table grew by "
                                     f"{len(grown)}")
            if not needed and grown:
                if n[0] == len(before) * block_size:
                    raise AssertionError(f"{where} {op}: token {n[0]} still fits in the last block (positions "
                                         f"{(len(before) - 1) * block_size}..{len(before) * block_size - 1}); a new block "
                                         "only when the last one is full, not when it has just become full (off by one)")
                raise AssertionError(f"{where} {op}: a new block only when the last one is full; the table grew "
                                     f"although token {n[0]} fits in its {len(before)} blocks")
            take(grown, op)
        elif kind == "fork":
            table, n = rng.choice(live)
            op = "fork(table)"
            new = _learner(manager.fork, table, name="MyBlockManager.fork", group="blocks")
            if not isinstance(new, list) or new != table or new is table:
                raise AssertionError(f"{where} {op} must return a new list with the same block ids (a copy, so the "
                                     "two sequences can grow apart)")
            for b in new:
                ref.holders[b] += 1
            live.append((new, [n[0]]))
        else:
            table, n = live.pop(rng.randrange(len(live)))
            op = f"free(table of {len(table)} blocks)"
            _learner(manager.free, table, name="MyBlockManager.free", group="blocks")
            for b in table:
                ref.holders[b] -= 1
        agree(op)
    for table, _ in live:
        _learner(manager.free, table, name="MyBlockManager.free", group="blocks")
        for b in table:
            ref.holders[b] -= 1
    agree("freeing every sequence")
    if ref.num_free != num_blocks:
        raise AssertionError(f"{where} internal: the reference leaked")


@learner_check
def check_block_manager(cls) -> None:
    """`cls(num_blocks, block_size)` with allocate(n) / append_slot(table, n) / fork(table) / free(table) / num_free."""
    for seed, (num_blocks, block_size, n_ops) in enumerate([(6, 4, 80), (12, 2, 150), (3, 8, 60), (20, 1, 200),
                                                              (8, 3, 150)]):
        _trace(cls, seed, num_blocks, block_size, n_ops)
    passed("MyBlockManager")


# -- build step: the slot mapping and the paged write ------------------------------------------

def _slots_reference(block_tables, positions, block_size):
    return torch.stack([torch.tensor([int(block_tables[b, int(p) // block_size]) * block_size + int(p) % block_size
                                      for p in positions[b]]) for b in range(positions.size(0))])  # (B, T)


@learner_check
def check_paged_write(fn) -> None:
    """`fn(pool, block_tables, positions, new) -> slots`: write new (B, T, Hkv, D) in place, return slots (B, T)."""
    g = torch.Generator().manual_seed(0)
    #        NB, BS, Hkv, D, block tables (B, nb),              positions per row
    cases = [(8, 4, 2, 3, [[5, 0, 7]], [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]]),
             (9, 4, 1, 2, [[3, 8], [6, 1]], [[5], [2]]),
             (10, 2, 2, 2, [[9, 2, 6, 0], [1, 4, 3, 7]], [[4, 5, 6], [1, 2, 3]]),
             (6, 3, 2, 2, [[4, 1], [0, 5], [2, 3]], [[4], [0], [5]])]
    for NB, BS, Hkv, D, tables, positions in cases:
        tables_t, pos_t = torch.tensor(tables), torch.tensor(positions)
        B, T = pos_t.shape
        pool = torch.randn(NB, BS, Hkv, D, generator=g)
        new = torch.randn(B, T, Hkv, D, generator=g)
        want_slots = _slots_reference(tables_t, pos_t, BS)
        want = pool.clone()
        want.view(NB * BS, Hkv, D)[want_slots.reshape(-1)] = new.reshape(-1, Hkv, D)
        before = pool.clone()
        label = f"[{NB} blocks of {BS}, tables {tables}, positions {positions}]"
        got = _learner(fn, pool, tables_t.clone(), pos_t.clone(), new.clone(), name="my_paged_write", group="write")
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != (B, T):
            raise AssertionError(f"{label} return the slots, a (B, T) = {(B, T)} tensor")
        if not torch.equal(got.long(), want_slots):
            flat = [[int(p) for p in row] for row in pos_t]
            if got.tolist() == flat:
                raise AssertionError(f"{label} your slots are the positions themselves: a request's blocks are "
                                     "wherever its block table says")
            if got.tolist() == [[int(tables_t[b, p // BS]) + p % BS for p in row] for b, row in enumerate(flat)]:
                raise AssertionError(f"{label} block id + offset is not a slot: a block holds block_size slots, so "
                                     "block b starts at slot b · block_size")
            if B > 1 and got.tolist() == [[int(tables_t[0, p // BS]) * BS + p % BS for p in row] for row in flat]:
                raise AssertionError(f"{label} every row used row 0's block table: each row has its own")
            raise AssertionError(f"{label} wrong slots: position p of row b lives in block block_tables[b, p // "
                                 "block_size], at offset p % block_size")
        if torch.equal(pool, before):
            raise AssertionError(f"{label} the pool did not change: you wrote into a copy (indexing with a tensor, "
                                 "like pool[table], makes one); write through a view, e.g. "
                                 "pool.view(-1, Hkv, D)[slots] = ...")
        if not torch.equal(pool, want):
            changed = (pool != before).any(dim=-1).any(dim=-1).reshape(-1).nonzero().flatten().tolist()
            raise AssertionError(f"{label} the pool holds the wrong values (slots changed: {changed}); store new[b, t] "
                                 "at slot slots[b, t] and touch nothing else")
    passed("my_paged_write")


# -- build step: paged decode attention, block by block ----------------------------------------

def _dense(q, k_pool, v_pool, table, length, *, scale=True, mapping="grouped", keep=None):
    """Attention of one query (H, D) over the request's keys gathered in order (the reference)."""
    H, D = q.shape
    BS, Hkv = k_pool.shape[1], k_pool.shape[2]
    n = length if keep is None else keep
    k = torch.cat([k_pool[b] for b in table])[:n]  # (n, Hkv, D)
    v = torch.cat([v_pool[b] for b in table])[:n]
    heads = torch.arange(H) // (H // Hkv) if mapping == "grouped" else torch.arange(H) % Hkv
    s = torch.einsum("hd,nhd->hn", q, k[:, heads]) / (math.sqrt(D) if scale else 1.0)  # (H, n)
    return torch.einsum("hn,nhd->hd", torch.softmax(s, dim=-1), v[:, heads])


def _online_mistake(q, k_pool, v_pool, table, length, kind):
    """The one-pass softmax mistakes: `kind` "sum" (the running sum not rescaled) or "max" (each block
    normalised by its own max, nothing rescaled)."""
    H, D = q.shape
    BS, Hkv = k_pool.shape[1], k_pool.shape[2]
    heads = torch.arange(H) // (H // Hkv)
    m = torch.full((H,), float("-inf"))
    l, acc = torch.zeros(H), torch.zeros(H, D)
    for j in range(math.ceil(length / BS)):
        n = min(BS, length - j * BS)
        k, v = k_pool[table[j], :n][:, heads], v_pool[table[j], :n][:, heads]  # (n, H, D)
        s = torch.einsum("hd,nhd->hn", q, k) / math.sqrt(D)
        if kind == "max":
            p = torch.exp(s - s.amax(-1, keepdim=True))
            l, acc = l + p.sum(-1), acc + torch.einsum("hn,nhd->hd", p, v)
            continue
        m_new = torch.maximum(m, s.amax(-1))
        p = torch.exp(s - m_new[:, None])
        scale = torch.exp(m - m_new)
        l = l + p.sum(-1)  # "sum": not rescaled
        acc = acc * scale[:, None] + torch.einsum("hn,nhd->hd", p, v)
        m = m_new
    return acc / l[:, None]


class _CopyWatch(TorchFunctionMode):
    """Records the largest tensor an operation makes that is not a view of the pools."""

    def __init__(self, pools):
        super().__init__()
        self.storages = {p.untyped_storage().data_ptr() for p in pools}
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.storages:
                self.largest = max(self.largest, t.numel())
        return out


@learner_check
def check_paged_attention(fn) -> None:
    """`fn(q (H, D), k_pool, v_pool (NB, BS, Hkv, D), block_table, length) -> (H, D)`, block by block."""
    g = torch.Generator().manual_seed(0)
    #        H, Hkv, D, NB, BS, table,                            length, query scale
    cases = [(4, 4, 8, 12, 4, [7, 2, 9, 0], 13, 1.0),
             (4, 2, 8, 6, 8, [3], 8, 1.0),
             (2, 1, 4, 5, 4, [4, 1], 1, 1.0),
             (4, 2, 8, 16, 4, [11, 3, 14, 0, 8, 5, 1, 12, 6, 9], 38, 1.0),
             (4, 4, 8, 12, 4, [5, 10, 2], 11, 100.0)]
    for H, Hkv, D, NB, BS, table, length, qscale in cases:
        k_pool = torch.randn(NB, BS, Hkv, D, generator=g)
        v_pool = torch.randn(NB, BS, Hkv, D, generator=g)
        q = torch.randn(H, D, generator=g) * qscale
        if qscale > 1:  # large scores: the first block's best key is far below a later block's
            k_pool[table[0]] *= 0.05
        label = (f"[H={H}, Hkv={Hkv}, blocks of {BS}, table {table}, length {length}"
                 + (", large scores]" if qscale > 1 else "]"))
        want = _dense(q, k_pool, v_pool, table, length)
        pools = (k_pool, v_pool)
        before = [p.clone() for p in pools]
        watch = _CopyWatch(pools)
        with watch:
            got = _learner(fn, q.clone(), k_pool, v_pool, list(table), length, name="my_paged_attention", group="attention")
        if any(not torch.equal(p, b) for p, b in zip(pools, before)):
            raise AssertionError(f"{label} the pool changed: attention only reads it")
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != (H, D):
            raise AssertionError(f"{label} return a tensor of shape (H, D) = {(H, D)}")
        if not bool(torch.isfinite(got).all()):
            raise AssertionError(f"{label} the output holds inf or NaN: exp of a large score overflowed; subtract the "
                                 "running max before exponentiating")
        if not torch.allclose(got, want, atol=1e-5, rtol=1e-4):
            blocks = math.ceil(length / BS)
            wrong = {"the running sum was not rescaled when the max grew: multiply l by exp(m_old - m_new) too":
                     _online_mistake(q, k_pool, v_pool, table, length, "sum"),
                     "each block was normalised by its own max and the blocks added as they are: carry one running "
                     "max, and rescale the sum and the output whenever it grows": _online_mistake(q, k_pool, v_pool,
                                                                                                 table, length, "max"),
                     "the last block is only partly filled: mask the slots at positions >= length":
                     _dense(q, k_pool, v_pool, table, length, keep=blocks * BS),
                     "scale the scores by 1/sqrt(D)": _dense(q, k_pool, v_pool, table, length, scale=False),
                     "query head h reads key/value head h // (H // Hkv) (grouped, not tiled)":
                     _dense(q, k_pool, v_pool, table, length, mapping="tiled")}
            for hint, out in wrong.items():
                if out.shape == got.shape and torch.allclose(got, out, atol=1e-5, rtol=1e-4):
                    raise AssertionError(f"{label} {hint}")
            raise AssertionError(f"{label} wrong values (largest difference {(got - want).abs().max():.3g})")
        limit = 2 * BS * H * D  # a block's keys for every query head, twice over
        if length > 4 * BS and watch.largest > limit:
            raise AssertionError(f"{label} an operation made a tensor of {watch.largest} numbers, more than one block "
                                 f"needs ({limit}): read each block where it lies (k_pool[block] is a view) instead of "
                                 "copying the request's keys into one tensor")
    passed("my_paged_attention")


# -- build step: the scheduler's step -----------------------------------------------------------

def _alone(model, prompt, n):
    from ...generation import generate

    return generate(model, torch.tensor([prompt]), n, temperature=0)[0]


def _observed_schedule(fn, s):
    """The learner's `fn(s)` as the engine's schedule, with what a step must leave checked."""
    bs = s.blocks.block_size

    def schedule():
        running, waiting = list(s.running), list(s.waiting)
        try:
            batch = _learner(fn, s, name="my_schedule", group="scheduler")
        except RuntimeError as err:
            if "can_allocate" in str(err):
                raise AssertionError("a request was admitted without enough free blocks: admit the front of the "
                                     "queue only while s.blocks.can_allocate(it) is True") from err
            raise
        if not isinstance(batch, list) or {id(r) for r in batch} != {id(r) for r in s.running}:
            raise AssertionError("return this step's batch: the list of running requests (s.running)")
        if len(s.running) > s.max_batch_size:
            raise AssertionError(f"{len(s.running)} requests running, more than max_batch_size={s.max_batch_size}")
        gone = [r for r in running if r not in s.running]
        for r in gone:
            if r.table:
                raise AssertionError(f"request {r.id} was preempted but still holds blocks {r.table}: "
                                     "s.blocks.free(it) gives them back")
            if r not in s.waiting:
                raise AssertionError(f"request {r.id} was preempted and dropped: put it back in s.waiting")
        if gone and gone != running[len(running) - len(gone):]:
            raise AssertionError(f"preempted requests {[r.id for r in gone]} out of running {[r.id for r in running]}: "
                                 "preempt the most recently admitted (the end of s.running), so the oldest keep going")
        queue = gone + waiting  # victims first (the oldest of them at the front), then those already waiting
        new = [r for r in s.running if r not in running]
        if list(s.waiting) != queue[len(new):] and new == queue[: len(new)]:
            raise AssertionError("a preempted request goes back to the front of the queue (s.waiting.appendleft), "
                                 "so it is readmitted first")
        if new != queue[: len(new)] or new != s.running[len(s.running) - len(new):]:
            raise AssertionError("admit from the front of the queue, in order (the first request that does not fit "
                                 "waits, and so does everyone behind it), appending to s.running")
        if list(s.waiting) != queue[len(new):]:
            raise AssertionError("a preempted request goes back to the front of the queue (s.waiting.appendleft), "
                                 "so it is readmitted first")
        for r in s.running:
            if len(r.table) * bs < len(r.tokens):
                raise AssertionError(f"request {r.id} has no slot for the token it feeds this step: every running "
                                     "request gets s.blocks.append_slot(it) before the forward")
        if s.waiting and len(s.running) < s.max_batch_size and s.blocks.can_allocate(s.waiting[0]):
            raise AssertionError("a waiting request fits (a free slot in the batch and enough free blocks) but was "
                                 "not admitted: admit while both hold")
        return batch

    return schedule


@learner_check
def check_schedule(fn) -> None:
    """`fn(s)`: one scheduler step on `s` (a kvlab.serving.Scheduler): make room, preempt, admit; return the batch."""
    from ...serving import Engine

    model = small_model("gpt2", seed=1)
    for seed, (num_blocks, max_batch) in enumerate([(8, 3), (12, 2)]):
        g = torch.Generator().manual_seed(seed)
        engine = Engine(model, max_batch_size=max_batch, block_size=4, num_blocks=num_blocks, max_seq_len=28,
                        cpu_kernels=False)
        s = engine.scheduler
        engine.scheduler.schedule = _observed_schedule(fn, s)  # this engine's steps call the learner's code
        jobs = {}
        for _ in range(7):
            prompt = torch.randint(0, 61, (int(torch.randint(2, 13, (1,), generator=g)),), generator=g).tolist()
            n = int(torch.randint(4, 13, (1,), generator=g))
            jobs[engine.submit(prompt, n, temperature=0)] = (prompt, n)
            for _ in range(int(torch.randint(0, 3, (1,), generator=g))):  # arrivals between steps
                engine.step()
        steps = 0
        while engine.num_waiting or engine.num_running:
            engine.step()
            steps += 1
            if steps > 500:
                raise AssertionError("500 steps and the requests are not done: is a request admitted that never runs, "
                                     "or one preempted again and again?")
        for rid, (prompt, n) in jobs.items():
            if not torch.equal(engine.result(rid), _alone(model, prompt, n)):
                raise AssertionError(f"request {rid} gave other tokens than when run alone")
        if engine.pool.num_free != num_blocks:
            raise AssertionError(f"{num_blocks - engine.pool.num_free} blocks are still held after every request "
                                 "finished: a preempted request must give its blocks back (s.blocks.free)")
    passed("my_schedule")


# -- build step: a prefix cache ------------------------------------------------------------------

@learner_check
def check_prefix_cache(hash_fn, match_fn) -> None:
    """`hash_fn(tokens, block_size) -> keys of the full blocks`, `match_fn(keys, cached) -> blocks of the longest
    cached run from the first key`; then both inside a real engine."""
    from ...generation import generate
    from ...serving import Engine

    bs = 4
    a, b, c, x = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]
    keys = _learner(hash_fn, a + b + [3, 3], bs, name="my_block_hashes", group="prefix")
    if not isinstance(keys, list):
        raise AssertionError(f"return a list of keys, one per full block, got {type(keys).__name__}")
    if len(keys) != 2:
        raise AssertionError(f"10 tokens in blocks of 4: 2 full blocks, so 2 keys, got {len(keys)}. Only full blocks "
                             "are cached: a partly filled block is still being written")
    if _learner(hash_fn, a + b + [3, 3], bs, name="my_block_hashes", group="prefix") != keys:
        raise AssertionError("the same tokens must give the same keys every time")
    if _learner(hash_fn, a + b + c, bs, name="my_block_hashes", group="prefix")[:2] != keys:
        raise AssertionError("two prompts that begin with the same blocks must get the same keys for those blocks")
    if _learner(hash_fn, x + b, bs, name="my_block_hashes", group="prefix")[1] == keys[1]:
        raise AssertionError("block [5, 6, 7, 8] after [1, 2, 3, 4] and after [13, 14, 15, 16] got the same key, but "
                             "its keys and values differ (they depend on every token before them): hash the previous "
                             "block's key together with this block's tokens")
    k1, k2, k3 = _learner(hash_fn, a + b + c, bs, name="my_block_hashes", group="prefix")
    for cached, want in (({k1: 5, k2: 7, k3: 1}, [5, 7, 1]), ({k1: 5, k3: 9}, [5]), ({k2: 7, k3: 1}, []),
                         ({}, [])):
        got = _learner(match_fn, [k1, k2, k3], dict(cached), name="my_match_prefix", group="prefix")
        if got != want:
            if len(got) > len(want) and got[: len(want)] == want:
                raise AssertionError(f"keys 1, 2, 3 with keys {[i + 1 for i, k in enumerate((k1, k2, k3)) if k in cached]} "
                                     f"cached: got {got}, expected {want}. A prefix stops at its first miss: a block "
                                     "after a missing one was computed after different tokens")
            raise AssertionError(f"keys 1, 2, 3 with keys {[i + 1 for i, k in enumerate((k1, k2, k3)) if k in cached]} "
                                 f"cached (key -> block {list(cached.values())}): expected blocks {want}, got {got}")
    # Inside a real engine: requests that come after the first has finished.
    model = small_model("modern", seed=2)
    engine = Engine(model, max_batch_size=2, block_size=bs, num_blocks=24, prefix_sharing=True, max_seq_len=40,
                    cpu_kernels=False)
    engine.blocks.hash_blocks = lambda tokens, size: _learner(hash_fn, list(tokens), size, name="my_block_hashes", group="prefix")
    engine.blocks.match = lambda k, cached: _learner(match_fn, list(k), cached, name="my_match_prefix", group="prefix")
    system = [7, 3, 9, 1, 4, 4, 8, 2, 6, 5, 0, 3]  # three full blocks
    for prompt, hit in ((system + [11, 12], 0), (system + [20, 21, 22], 3), (system, 3), (system[:8] + [1, 1], 2),
                        ([30] + system[1:] + [5], 0)):
        before = engine.blocks.hits
        rid = engine.submit(prompt, 6, temperature=0)
        result = engine.run()[rid]
        if not torch.equal(result, generate(model, torch.tensor([prompt]), 6, temperature=0)[0]):
            raise AssertionError(f"a prompt of {len(prompt)} tokens gave other tokens with the prefix cache than "
                                 "without it")
        if engine.blocks.hits - before != hit:
            raise AssertionError(f"a prompt sharing {hit} full blocks with earlier (finished) requests reused "
                                 f"{engine.blocks.hits - before} of them")
    passed("my_block_hashes and my_match_prefix")


# -- reason: what a cached prefix saves ---------------------------------------------------------

@learner_check
def check_prefilled_tokens(answer) -> None:
    """`answer`: (tokens the first request prefills, tokens the second prefills) for the exercise's two requests."""
    answer = require_answer(answer, "my_prefilled")
    if not isinstance(answer, (tuple, list)) or len(answer) != 2 or not all(
            isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in answer):
        raise AssertionError(f"answer with two ints, (first, second), got {answer!r}")
    first, second = answer
    reject_number(first, 24, {
        20: "only full blocks are cached: 100 is not a multiple of 16, so the system prompt's last 4 tokens are in "
            "a partly filled block that was never shared",
        120: "the system prompt's full blocks are still in the cache: those are not prefilled",
    }, f"first request: {first} is not the number of its tokens outside the cached full blocks")
    reject_number(second, 1, {
        0: "the first new token is sampled from the logits after the prompt's last token, and a cache holds keys "
           "and values, not logits: something must still run",
        96: "every one of its 6 blocks is in the cache",
    }, f"second request: {second} is not what it must compute to get its first token")
    passed("my_prefilled")


# -- reason: left padding --------------------------------------------------------------------

@learner_check
def check_left_pad(fn) -> None:
    """`fn(lengths, T) -> (positions (B, T), mask (B, T, T))` for rows padded on the left."""
    for lengths, T in (([3, 5, 1], 5), ([4, 4], 4), ([2, 7, 6, 1], 8), ([1], 3)):
        label = f"[lengths {lengths}, T={T}]"
        got = call_learner(fn, torch.tensor(lengths), T, name="my_left_pad")
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise AssertionError(f"{label} return a pair (positions, mask)")
        positions, mask = got
        B = len(lengths)
        if not isinstance(positions, torch.Tensor) or tuple(positions.shape) != (B, T):
            raise AssertionError(f"{label} positions must be a (B, T) = {(B, T)} tensor")
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, T, T):
            raise AssertionError(f"{label} mask must be a (B, T, T) = {(B, T, T)} tensor")
        if mask.dtype != torch.bool:
            raise AssertionError(f"{label} mask must be a bool tensor (True = may attend), got {mask.dtype}")
        if positions.dtype.is_floating_point:
            raise AssertionError(f"{label} positions index a table: use an integer dtype, got {positions.dtype}")
        for b, n in enumerate(lengths):
            start = T - n  # the first real column
            real = positions[b, start:]
            if start > 0 and torch.equal(real, torch.arange(start, T)):
                raise AssertionError(f"{label} row {b}'s real tokens sit at positions {real.tolist()}: those are "
                                     "column numbers; a prompt's first token is at position 0 whatever the padding")
            if not torch.equal(real, torch.arange(n)):
                raise AssertionError(f"{label} row {b}: its real tokens must be at positions 0..{n - 1}, got "
                                     f"{real.tolist()}")
            if bool((positions[b, :start] < 0).any()):
                raise AssertionError(f"{label} row {b}: a pad's position indexes an embedding table: keep it >= 0")
            if not bool(mask[b].any(dim=-1).all()):
                raise AssertionError(f"{label} row {b}: a query row with no visible key makes the softmax 0/0 "
                                     "(NaN), and a NaN spreads; let every pad query see at least one key")
            for i in range(start, T):
                want = torch.zeros(T, dtype=torch.bool)
                want[start: i + 1] = True
                if bool(mask[b, i, :start].any()):
                    raise AssertionError(f"{label} row {b}: a real token attends to a pad key; pads must be "
                                         "invisible to every real query")
                if not torch.equal(mask[b, i], want):
                    raise AssertionError(f"{label} row {b}, query column {i}: it must see exactly the real keys "
                                         "at or before it (no future keys)")
    passed("my_left_pad")


# -- experiment: the block size ---------------------------------------------------------------

# The chapter's mixed workload, as the experiment runs it (see `reserved_over_used`).
WASTE_WORKLOAD = dict(n=24, seed=0, prompt_range=(8, 48), new_range=(8, 48), max_batch_size=8)


def reserved_over_used(block_size: int, *, model=None, kv: str = "paged") -> float:
    """Reserved over used KV bytes (summed over engine steps) for `WASTE_WORKLOAD`, greedy, no eos.

    The ratio depends only on the requests' lengths, so any model gives the same one."""
    from ...serving import Engine, mixed_workload
    from ...bench.serving import run_workload

    spec = WASTE_WORKLOAD
    model = small_model("gpt2") if model is None else model
    requests = mixed_workload(spec["n"], seed=spec["seed"], prompt_range=spec["prompt_range"],
                              new_range=spec["new_range"], vocab_size=model.config.vocab_size)
    longest = max(len(p) + n for p, n in requests)
    extra = dict(block_size=block_size) if kv == "paged" else {}
    engine = Engine(model, max_batch_size=spec["max_batch_size"], kv=kv, max_seq_len=longest, cpu_kernels=False,
                    **extra)
    return run_workload(engine, requests)["reserved_over_used"]


@learner_check
def check_block_size_waste(answer) -> None:
    """`answer`: reserved/used KV bytes of the chapter's workload with block_size=64 (within 0.01)."""
    answer = require_answer(answer, "my_waste_64")
    if isinstance(answer, bool) or not isinstance(answer, numbers.Real):
        raise AssertionError(f"answer with a number (reserved bytes / used bytes), got {answer!r}")
    truth = reserved_over_used(64)
    if abs(answer - truth) <= 0.01:
        passed("my_waste_64")
        return
    if abs(answer - reserved_over_used(16)) <= 0.01:
        raise AssertionError("that is the ratio with the chapter's block_size=16: change it to 64 and run again")
    if answer < 1:
        raise AssertionError("reserved memory holds every used byte and more: the ratio is at least 1; "
                             "did you divide used by reserved?")
    raise AssertionError(f"not what the workload gives with block_size=64 ({answer:.3f}); divide the sum of "
                         "kv_bytes_reserved() over every step by the sum of kv_bytes_used()")
