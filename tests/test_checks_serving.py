"""Chapter 9's exercise checks: they pass right answers, print the not-done line for the stubs
(without raising), catch plausible mistakes with a hint, and refuse answers that call kvlab's own
version of the piece being built."""

import math
from collections import deque

import pytest
import torch

from kvlab import paged
from kvlab.course.checks import (check_block_manager, check_block_size_waste, check_left_pad, check_paged_attention,
                                 check_paged_write, check_prefilled_tokens, check_prefix_cache, check_schedule)
from kvlab.course.checks._common import NOT_DONE_MARK
from kvlab.course.checks.serving import REFUSAL, reserved_over_used
from kvlab.serving import block_manager
from kvlab.serving.scheduler import Scheduler


def stub(*args, **kwargs):
    raise NotImplementedError  # your code here


def assert_not_done(check, *answers, capsys):
    check(*answers)  # must not raise
    out = capsys.readouterr().out
    assert out.startswith(NOT_DONE_MARK) and "not done yet" in out


# -- the block manager --------------------------------------------------------------------------

class BlockManager:
    """The chapter's solution."""

    def __init__(self, num_blocks, block_size):
        self.block_size = block_size
        self.free_blocks = deque(range(num_blocks))
        self.holders = [0] * num_blocks

    @property
    def num_free(self):
        return len(self.free_blocks)

    def _take(self):
        block = self.free_blocks.popleft()
        self.holders[block] = 1
        return block

    def allocate(self, n_tokens):
        need = math.ceil(n_tokens / self.block_size)
        if need > self.num_free:
            return None
        return [self._take() for _ in range(need)]

    def append_slot(self, table, n_tokens):
        if n_tokens <= len(table) * self.block_size:
            return True
        if not self.free_blocks:
            return False
        table.append(self._take())
        return True

    def fork(self, table):
        for block in table:
            self.holders[block] += 1
        return list(table)

    def free(self, table):
        for block in table:
            self.holders[block] -= 1
            if self.holders[block] == 0:
                self.free_blocks.append(block)


class AppendEveryToken(BlockManager):
    def append_slot(self, table, n_tokens):
        if not self.free_blocks:
            return n_tokens <= len(table) * self.block_size
        table.append(self._take())
        return True


class AppendOneEarly(BlockManager):
    def append_slot(self, table, n_tokens):
        if n_tokens < len(table) * self.block_size:
            return True
        if not self.free_blocks:
            return False
        table.append(self._take())
        return True


class FreeIgnoresHolders(BlockManager):
    def free(self, table):
        for block in table:
            if block not in self.free_blocks:
                self.free_blocks.append(block)
            self.holders[block] = 0


class ForkWithoutHolders(BlockManager):
    def fork(self, table):
        return list(table)


class AllocatePartly(BlockManager):
    def allocate(self, n_tokens):
        need = math.ceil(n_tokens / self.block_size)
        table = [self._take() for _ in range(min(need, self.num_free))]
        return table if len(table) == need else None


class OnKvlabPool:
    """Delegates to kvlab's BlockPool: refused."""

    def __init__(self, num_blocks, block_size):
        self.pool = paged.BlockPool(n_layers=1, n_kv_heads=1, head_dim=1, num_blocks=num_blocks, block_size=block_size)
        self.block_size = block_size

    @property
    def num_free(self):
        return self.pool.num_free

    def allocate(self, n_tokens):
        need = math.ceil(n_tokens / self.block_size)
        return [self.pool.allocate() for _ in range(need)] if need <= self.pool.num_free else None

    def append_slot(self, table, n_tokens):
        if n_tokens <= len(table) * self.block_size:
            return True
        block = self.pool.allocate()
        if block is None:
            return False
        table.append(block)
        return True

    def fork(self, table):
        for b in table:
            self.pool.hold(b)
        return list(table)

    def free(self, table):
        for b in table:
            self.pool.release(b)


class StubManager:
    def __init__(self, num_blocks, block_size):
        raise NotImplementedError


def test_block_manager_passes_the_solution(capsys):
    check_block_manager(BlockManager)
    assert "✓ MyBlockManager" in capsys.readouterr().out


def test_block_manager_stub_is_not_done(capsys):
    assert_not_done(check_block_manager, StubManager, capsys=capsys)


@pytest.mark.parametrize("wrong,match", [
    (AppendEveryToken, "only when the last one is full"),
    (AppendOneEarly, "off by one"),
    (FreeIgnoresHolders, "still holds"),
    (ForkWithoutHolders, "still holds"),
    (AllocatePartly, "all or nothing"),
    (OnKvlabPool, REFUSAL),
])
def test_block_manager_catches_mistakes(wrong, match):
    with pytest.raises(AssertionError, match=match):
        check_block_manager(wrong)


# -- the slot mapping and the paged write ------------------------------------------------------

def paged_write(pool, block_tables, positions, new):
    NB, BS, Hkv, D = pool.shape
    blocks = block_tables.gather(1, positions // BS)  # (B, T)
    slots = blocks * BS + positions % BS
    pool.view(NB * BS, Hkv, D)[slots.reshape(-1)] = new.reshape(-1, Hkv, D)
    return slots


def write_position_is_slot(pool, block_tables, positions, new):
    NB, BS, Hkv, D = pool.shape
    pool.view(NB * BS, Hkv, D)[positions.reshape(-1)] = new.reshape(-1, Hkv, D)
    return positions


def write_no_times_block_size(pool, block_tables, positions, new):
    NB, BS, Hkv, D = pool.shape
    slots = block_tables.gather(1, positions // BS) + positions % BS
    pool.view(NB * BS, Hkv, D)[slots.reshape(-1)] = new.reshape(-1, Hkv, D)
    return slots


def write_row0_table(pool, block_tables, positions, new):
    return paged_write(pool, block_tables[:1].expand_as(block_tables), positions, new)


def write_into_a_copy(pool, block_tables, positions, new):
    NB, BS, Hkv, D = pool.shape
    slots = block_tables.gather(1, positions // BS) * BS + positions % BS
    flat = pool.reshape(NB * BS, Hkv, D)[torch.arange(NB * BS)]  # a copy
    flat[slots.reshape(-1)] = new.reshape(-1, Hkv, D)
    return slots


def write_with_kvlab(pool, block_tables, positions, new):
    slots = paged.slot_mapping(block_tables, positions, pool.size(1))
    pool.view(-1, *pool.shape[2:])[slots.reshape(-1)] = new.reshape(-1, *pool.shape[2:])
    return slots


def test_paged_write_passes_the_solution(capsys):
    check_paged_write(paged_write)
    assert "✓ my_paged_write" in capsys.readouterr().out


def test_paged_write_stub_is_not_done(capsys):
    assert_not_done(check_paged_write, stub, capsys=capsys)


@pytest.mark.parametrize("wrong,match", [
    (write_position_is_slot, "block table says"),
    (write_no_times_block_size, "block_size slots"),
    (write_row0_table, "row 0's block table"),
    (write_into_a_copy, "copy"),
    (write_with_kvlab, REFUSAL),
])
def test_paged_write_catches_mistakes(wrong, match):
    with pytest.raises(AssertionError, match=match):
        check_paged_write(wrong)


# -- paged attention, block by block ------------------------------------------------------------

def paged_attention(q, k_pool, v_pool, block_table, length, *, rescale_sum=True, carry_max=True, subtract_max=True):
    H, D = q.shape
    BS, Hkv = k_pool.shape[1], k_pool.shape[2]
    group = torch.arange(H) // (H // Hkv)  # the kv head of each query head
    m = torch.full((H,), float("-inf"))
    l = torch.zeros(H)
    acc = torch.zeros(H, D)
    for j, block in enumerate(block_table):
        n = min(BS, length - j * BS)
        if n <= 0:
            break
        k = k_pool[block, :n][:, group]  # (n, H, D): a view of the block, then one row per query head
        v = v_pool[block, :n][:, group]
        s = torch.einsum("hd,nhd->hn", q, k) / math.sqrt(D)  # (H, n)
        if not carry_max:
            p = torch.exp(s - s.amax(-1, keepdim=True))
            l, acc = l + p.sum(-1), acc + torch.einsum("hn,nhd->hd", p, v)
            continue
        m_new = torch.maximum(m, s.amax(-1)) if subtract_max else torch.zeros(H)
        scale = torch.exp(m - m_new) if subtract_max else torch.ones(H)
        p = torch.exp(s - m_new[:, None])
        l = (l * scale if rescale_sum else l) + p.sum(-1)
        acc = acc * scale[:, None] + torch.einsum("hn,nhd->hd", p, v)
        m = m_new
    return acc / l[:, None]


def attention_sum_not_rescaled(*args):
    return paged_attention(*args, rescale_sum=False)


def attention_max_not_carried(*args):
    return paged_attention(*args, carry_max=False)


def attention_no_max(*args):
    return paged_attention(*args, subtract_max=False)


def attention_whole_blocks(q, k_pool, v_pool, block_table, length):
    return paged_attention(q, k_pool, v_pool, block_table, len(block_table) * k_pool.size(1))


def attention_no_scale(q, k_pool, v_pool, block_table, length):
    return paged_attention(q * math.sqrt(q.size(-1)), k_pool, v_pool, block_table, length)


def attention_by_gather(q, k_pool, v_pool, block_table, length):
    H, D = q.shape
    Hkv = k_pool.size(2)
    k = k_pool[torch.tensor(block_table)].reshape(-1, Hkv, D)[:length]  # (S, Hkv, D): a contiguous copy
    v = v_pool[torch.tensor(block_table)].reshape(-1, Hkv, D)[:length]
    group = torch.arange(H) // (H // Hkv)
    s = torch.einsum("hd,shd->hs", q, k[:, group]) / math.sqrt(D)
    return torch.einsum("hs,shd->hd", torch.softmax(s, -1), v[:, group])


def attention_with_kvlab(q, k_pool, v_pool, block_table, length):
    out = paged.paged_attention_blockwise(q[None], k_pool, v_pool, torch.tensor([block_table]), torch.tensor([length]))
    return out[0]


def test_paged_attention_passes_the_solution(capsys):
    check_paged_attention(paged_attention)
    assert "✓ my_paged_attention" in capsys.readouterr().out


def test_paged_attention_stub_is_not_done(capsys):
    assert_not_done(check_paged_attention, stub, capsys=capsys)


@pytest.mark.parametrize("wrong,match", [
    (attention_sum_not_rescaled, "running sum was not rescaled"),
    (attention_max_not_carried, "its own max"),
    (attention_no_max, "overflowed"),
    (attention_whole_blocks, "partly filled"),
    (attention_no_scale, "1/sqrt"),
    (attention_by_gather, "view"),
    (attention_with_kvlab, REFUSAL),
])
def test_paged_attention_catches_mistakes(wrong, match):
    with pytest.raises(AssertionError, match=match):
        check_paged_attention(wrong)


def test_the_refusal_is_undone_afterwards():
    with pytest.raises(AssertionError, match=REFUSAL):
        check_paged_attention(attention_with_kvlab)
    q, pool = torch.randn(1, 2, 4), torch.randn(3, 2, 2, 4)
    paged.paged_attention_blockwise(q, pool, pool, torch.tensor([[2, 0]]), torch.tensor([3]))  # works again


# -- the scheduler's step -----------------------------------------------------------------------

def schedule(s, *, victim=-1, front=True, room=True, check_blocks=True, free=True):
    for r in list(s.running):  # oldest first
        while room and r in s.running and not s.blocks.append_slot(r):
            out = s.running.pop(victim)  # the most recently admitted
            if free:
                s.blocks.free(out)
            s.waiting.appendleft(out) if front else s.waiting.append(out)
    while s.waiting and len(s.running) < s.max_batch_size and (not check_blocks or s.blocks.can_allocate(s.waiting[0])):
        r = s.waiting.popleft()
        s.blocks.allocate(r)
        s.running.append(r)
    return list(s.running)


def schedule_oldest(s):
    return schedule(s, victim=0)


def schedule_to_the_back(s):
    return schedule(s, front=False)


def schedule_no_room(s):
    return schedule(s, room=False)


def schedule_unchecked(s):
    return schedule(s, check_blocks=False)


def schedule_no_free(s):
    return schedule(s, free=False)


def schedule_too_many(s):
    while s.waiting and s.blocks.can_allocate(s.waiting[0]):
        r = s.waiting.popleft()
        s.blocks.allocate(r)
        s.running.append(r)
    return schedule(s)


def schedule_any_that_fits(s):
    schedule(s)
    for r in list(s.waiting):  # also anyone further back who fits: the front request may starve
        if len(s.running) < s.max_batch_size and s.blocks.can_allocate(r):
            s.waiting.remove(r)
            s.blocks.allocate(r)
            s.running.append(r)
    return list(s.running)


def schedule_with_kvlab(s):
    return Scheduler.schedule(s)


def test_schedule_passes_the_solution(capsys):
    check_schedule(schedule)
    assert "✓ my_schedule" in capsys.readouterr().out


def test_schedule_stub_is_not_done(capsys):
    assert_not_done(check_schedule, stub, capsys=capsys)


@pytest.mark.parametrize("wrong,match", [
    (schedule_oldest, "most recently admitted"),
    (schedule_to_the_back, "front of the queue"),
    (schedule_no_room, "append_slot"),
    (schedule_unchecked, "can_allocate"),
    (schedule_no_free, "give"),
    (schedule_too_many, "max_batch_size"),
    (schedule_any_that_fits, "in order"),
    (schedule_with_kvlab, REFUSAL),
])
def test_schedule_catches_mistakes(wrong, match):
    with pytest.raises(AssertionError, match=match):
        check_schedule(wrong)


def test_schedule_check_workload_preempts():
    """The check's workload must reach the preemption path (with kvlab's own scheduler)."""
    from kvlab.course.checks._common import small_model
    from kvlab.serving import Engine

    engine = Engine(small_model("gpt2", seed=1), max_batch_size=3, block_size=4, num_blocks=8, max_seq_len=28,
                    cpu_kernels=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(7):
        prompt = torch.randint(0, 61, (int(torch.randint(2, 13, (1,), generator=g)),), generator=g).tolist()
        engine.submit(prompt, int(torch.randint(4, 13, (1,), generator=g)), temperature=0)
        for _ in range(int(torch.randint(0, 3, (1,), generator=g))):
            engine.step()
    engine.run()
    assert engine.preemptions > 0


# -- the prefix cache ---------------------------------------------------------------------------

def block_hashes(tokens, block_size):
    keys, previous = [], None
    for j in range(len(tokens) // block_size):
        previous = hash((previous, tuple(tokens[j * block_size:(j + 1) * block_size])))
        keys.append(previous)
    return keys


def match_prefix(keys, cached):
    blocks = []
    for key in keys:
        if key not in cached:
            break
        blocks.append(cached[key])
    return blocks


def hashes_unchained(tokens, block_size):
    return [hash(tuple(tokens[j * block_size:(j + 1) * block_size])) for j in range(len(tokens) // block_size)]


def hashes_with_partial(tokens, block_size):
    return block_hashes(tokens + [0] * (-len(tokens) % block_size), block_size)


def match_past_misses(keys, cached):
    return [cached[k] for k in keys if k in cached]


def hashes_with_kvlab(tokens, block_size):
    return block_manager.block_hashes(tokens, block_size)


def test_prefix_cache_passes_the_solution(capsys):
    check_prefix_cache(block_hashes, match_prefix)
    assert "✓ my_block_hashes and my_match_prefix" in capsys.readouterr().out


def test_prefix_cache_stub_is_not_done(capsys):
    assert_not_done(check_prefix_cache, stub, stub, capsys=capsys)


@pytest.mark.parametrize("hashes,match,hint", [
    (hashes_unchained, match_prefix, "every token before"),
    (hashes_with_partial, match_prefix, "Only full blocks"),
    (block_hashes, match_past_misses, "first miss"),
    (hashes_with_kvlab, match_prefix, REFUSAL),
])
def test_prefix_cache_catches_mistakes(hashes, match, hint):
    with pytest.raises(AssertionError, match=hint):
        check_prefix_cache(hashes, match)


# -- my_prefilled -------------------------------------------------------------------------------

def test_prefilled_tokens(capsys):
    check_prefilled_tokens((24, 1))
    assert "✓ my_prefilled" in capsys.readouterr().out
    assert_not_done(check_prefilled_tokens, None, capsys=capsys)
    for wrong, hint in (((20, 1), "full blocks"), ((120, 1), "still in the cache"), ((24, 0), "logits"),
                        ((24, 96), "6 blocks"), ((23, 1), "first request"), ((24, 2), "second request"),
                        ("24", "two ints")):
        with pytest.raises(AssertionError, match=hint):
            check_prefilled_tokens(wrong)


# -- my_left_pad --------------------------------------------------------------------------------

def left_pad(lengths, T):
    cols = torch.arange(T)
    start = (T - lengths)[:, None]  # (B, 1): first real column of each row
    real = cols[None, :] >= start  # (B, T)
    positions = (cols[None, :] - start).clamp(min=0)
    mask = real[:, None, :] & (cols[None, None, :] <= cols[None, :, None])  # (B, T, T)
    mask |= torch.eye(T, dtype=torch.bool)[None] & ~real[:, :, None]  # a pad query sees itself
    return positions, mask


def left_pad_column_positions(lengths, T):
    _, mask = left_pad(lengths, T)
    return torch.arange(T).expand(len(lengths), T), mask


def left_pad_sees_pads(lengths, T):
    positions, _ = left_pad(lengths, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return positions, causal.expand(len(lengths), T, T).clone()


def left_pad_nan_rows(lengths, T):
    positions, mask = left_pad(lengths, T)
    real = positions > 0
    real |= torch.arange(T)[None, :] >= (T - lengths)[:, None]
    return positions, mask & real[:, :, None]


def left_pad_negative(lengths, T):
    positions, mask = left_pad(lengths, T)
    return torch.arange(T)[None, :] - (T - lengths)[:, None], mask


def left_pad_float_mask(lengths, T):
    positions, mask = left_pad(lengths, T)
    return positions, mask.float()


def test_left_pad_passes_the_solution(capsys):
    check_left_pad(left_pad)
    assert "✓ my_left_pad" in capsys.readouterr().out


def test_left_pad_stub_is_not_done(capsys):
    assert_not_done(check_left_pad, stub, capsys=capsys)


@pytest.mark.parametrize("wrong,match", [
    (left_pad_column_positions, "column numbers"),
    (left_pad_sees_pads, "pad key"),
    (left_pad_nan_rows, "NaN"),
    (left_pad_negative, ">= 0"),
    (left_pad_float_mask, "bool"),
])
def test_left_pad_catches_mistakes(wrong, match):
    with pytest.raises(AssertionError, match=match):
        check_left_pad(wrong)


# -- my_waste_64 --------------------------------------------------------------------------------

def test_block_size_waste(capsys):
    truth = reserved_over_used(64)
    check_block_size_waste(truth)
    assert "✓ my_waste_64" in capsys.readouterr().out
    assert_not_done(check_block_size_waste, None, capsys=capsys)
    with pytest.raises(AssertionError, match="block_size=16"):
        check_block_size_waste(reserved_over_used(16))
    with pytest.raises(AssertionError, match="at least 1"):
        check_block_size_waste(1 / truth)
    with pytest.raises(AssertionError, match="a number"):
        check_block_size_waste("1.6")
