"""Checks for chapter 9, serving many requests.

The block-table gather is checked against reading the pool position by position; the
left-padding positions and mask against their definition (real tokens at positions 0..len-1,
pads never seen by a real token, every query row seeing at least one key); the block-size
experiment by running the chapter's workload through `kvlab.serving.Engine` live.
"""

from __future__ import annotations

import numbers

import torch

from ._common import call_learner, learner_check, passed, require_answer, small_model

__all__ = ["check_gather_kv", "check_left_pad", "check_block_size_waste", "WASTE_WORKLOAD", "reserved_over_used"]


# -- exercise: the block-table gather ---------------------------------------------------------

def _gather_reference(pool, table, length):
    bs = pool.size(1)
    return torch.stack([pool[int(table[p // bs]), p % bs] for p in range(length)], dim=1)  # (Hkv, length, D)


@learner_check
def check_gather_kv(fn) -> None:
    """`fn(pool, block_table, length) -> (Hkv, length, D)`: a request's keys in position order."""
    g = torch.Generator().manual_seed(0)
    cases = [(8, 4, 2, 3, [5, 0, 7], 10), (6, 2, 1, 4, [3, 1, 4, 0, 5], 9), (5, 8, 3, 2, [2], 8),
             (4, 3, 2, 2, [1, 3], 1), (10, 1, 2, 2, [9, 2, 6, 0], 4)]
    for NB, BS, Hkv, D, table, length in cases:
        pool = torch.randn(NB, BS, Hkv, D, generator=g)
        before = pool.clone()
        table_t = torch.tensor(table)
        expected = _gather_reference(pool, table_t, length)
        label = f"[{NB} blocks of {BS}, table {table}, length {length}]"
        got = call_learner(fn, pool, table_t, length, name="my_gather_kv")
        if not isinstance(got, torch.Tensor):
            raise AssertionError(f"{label} return a tensor, got {type(got).__name__}")
        if not torch.equal(pool, before):
            raise AssertionError(f"{label} the pool changed: gather reads it, it must never write to it")
        if got.shape == (length, Hkv, D) and torch.equal(got, expected.transpose(0, 1)):
            raise AssertionError(f"{label} right values, wrong layout: got (length, Hkv, D) = {tuple(got.shape)}; "
                                 "attention wants heads first, (Hkv, length, D)")
        if got.shape[:1] == (Hkv,) and got.dim() == 3 and got.size(1) > length:
            raise AssertionError(f"{label} got {got.size(1)} positions for a request of length {length}: the "
                                 "last block is only partly filled; keep the first `length` positions")
        if tuple(got.shape) != (Hkv, length, D):
            raise AssertionError(f"{label} wrong shape {tuple(got.shape)}, expected (Hkv, length, D) = "
                                 f"{(Hkv, length, D)}")
        if not torch.equal(got, expected):
            in_order = _gather_reference(pool, torch.arange(len(table)), length)
            sorted_ = _gather_reference(pool, torch.tensor(sorted(table)), length)
            if torch.equal(got, in_order):
                raise AssertionError(f"{label} you read blocks 0, 1, 2, ... of the pool: a request's blocks are "
                                     "wherever its block table says")
            if torch.equal(got, sorted_):
                raise AssertionError(f"{label} the blocks come out in the order of their ids; the block table's "
                                     "order is the order of the positions")
            raise AssertionError(f"{label} wrong values: position p lives in block block_table[p // block_size] "
                                 "at offset p % block_size")
    passed("my_gather_kv")


# -- exercise: left padding --------------------------------------------------------------------

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
    from ..serving import Engine, mixed_workload
    from ..serving_bench import run_workload

    spec = WASTE_WORKLOAD
    model = small_model("gpt2") if model is None else model
    requests = mixed_workload(spec["n"], seed=spec["seed"], prompt_range=spec["prompt_range"],
                              new_range=spec["new_range"], vocab_size=model.config.vocab_size)
    longest = max(len(p) + n for p, n in requests)
    extra = dict(block_size=block_size) if kv == "paged" else {}
    engine = Engine(model, max_batch_size=spec["max_batch_size"], kv=kv, max_seq_len=longest, **extra)
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
