"""Chapter 9's exercise checks: they pass right answers, print the not-done line for the stubs
(without raising), and catch plausible mistakes with a hint."""

import pytest
import torch

from kvlab.checks import check_block_size_waste, check_gather_kv, check_left_pad
from kvlab.checks._common import NOT_DONE_MARK
from kvlab.checks.serving import reserved_over_used
from kvlab.paged import gather_kv


def stub(*args, **kwargs):
    raise NotImplementedError  # your code here


def assert_not_done(check, answer, capsys):
    check(answer)  # must not raise
    out = capsys.readouterr().out
    assert out.startswith(NOT_DONE_MARK) and "not done yet" in out


# -- my_gather_kv -------------------------------------------------------------------------------

def gather_in_pool_order(pool, table, length):
    return gather_kv(pool, torch.arange(len(table)), length)


def gather_sorted(pool, table, length):
    return gather_kv(pool, torch.sort(table).values, length)


def gather_untrimmed(pool, table, length):
    return pool[table].reshape(-1, *pool.shape[2:]).transpose(0, 1)


def gather_positions_first(pool, table, length):
    return pool[table].reshape(-1, *pool.shape[2:])[:length]


def gather_wrong_offset(pool, table, length):
    bs = pool.size(1)
    return torch.stack([pool[int(table[p % len(table)]), p // len(table) % bs] for p in range(length)], dim=1)


def test_gather_passes_the_solution(capsys):
    check_gather_kv(gather_kv)
    assert "✓ my_gather_kv" in capsys.readouterr().out


def test_gather_stub_is_not_done(capsys):
    assert_not_done(check_gather_kv, stub, capsys)


@pytest.mark.parametrize("wrong,match", [
    (gather_in_pool_order, "block table says"),
    (gather_sorted, "order of their ids"),
    (gather_untrimmed, "partly filled"),
    (gather_positions_first, "heads first"),
    (gather_wrong_offset, "offset"),
])
def test_gather_catches_mistakes(wrong, match):
    with pytest.raises(AssertionError, match=match):
        check_gather_kv(wrong)


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
    assert_not_done(check_left_pad, stub, capsys)


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
    assert_not_done(check_block_size_waste, None, capsys)
    with pytest.raises(AssertionError, match="block_size=16"):
        check_block_size_waste(reserved_over_used(16))
    with pytest.raises(AssertionError, match="at least 1"):
        check_block_size_waste(1 / truth)
    with pytest.raises(AssertionError, match="a number"):
        check_block_size_waste("1.6")
