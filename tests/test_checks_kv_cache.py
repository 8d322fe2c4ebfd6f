"""The chapter 4 checks pass right answers and catch the stub and plausible wrong answers."""

import pytest
import torch

from kvlab.checks import kv_cache as checks
from kvlab.checks._common import ExerciseNotDone


# -- my_kv_cache_bytes ------------------------------------------------------------------------

def kv_bytes(config, seq_len, batch_size=1, bytes_per_element=4):
    return config.n_layers * 2 * config.n_kv_heads * config.head_dim * seq_len * batch_size * bytes_per_element


def kv_bytes_stub(config, seq_len, batch_size=1, bytes_per_element=4):
    raise NotImplementedError  # your code here


def kv_bytes_no_two(config, seq_len, batch_size=1, bytes_per_element=4):
    return config.n_layers * config.n_kv_heads * config.head_dim * seq_len * batch_size * bytes_per_element


def kv_bytes_n_heads(config, seq_len, batch_size=1, bytes_per_element=4):
    return config.n_layers * 2 * config.n_heads * config.head_dim * seq_len * batch_size * bytes_per_element


def kv_bytes_d_model(config, seq_len, batch_size=1, bytes_per_element=4):
    return config.n_layers * 2 * config.d_model * seq_len * batch_size * bytes_per_element


def kv_bytes_elements(config, seq_len, batch_size=1, bytes_per_element=4):
    return config.n_layers * 2 * config.n_kv_heads * config.head_dim * seq_len * batch_size


def kv_bytes_float(config, seq_len, batch_size=1, bytes_per_element=4):
    return float(kv_bytes(config, seq_len, batch_size, bytes_per_element))  # 1024.0 is fine


def test_bytes_passes_on_a_correct_answer(capsys):
    checks.check_kv_cache_bytes(kv_bytes)
    checks.check_kv_cache_bytes(kv_bytes_float)
    assert "passed" in capsys.readouterr().out


def test_bytes_fails_on_the_stub():
    with pytest.raises(ExerciseNotDone, match="not written yet"):
        checks.check_kv_cache_bytes(kv_bytes_stub)


@pytest.mark.parametrize("wrong, hint", [
    (kv_bytes_no_two, "besides the keys"),
    (kv_bytes_n_heads, "grouped-query"),
    (kv_bytes_d_model, "grouped-query"),
    (kv_bytes_elements, "bytes per element"),
])
def test_bytes_fails_on_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        checks.check_kv_cache_bytes(wrong)


# -- my_sliding_window_mask -------------------------------------------------------------------

def window_mask(q_pos, k_pos, window):
    q, k = q_pos[:, None], k_pos[None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask = mask & (k > q - window)
    return mask


def window_mask_stub(q_pos, k_pos, window):
    raise NotImplementedError  # your code here


def window_mask_off_by_one(q_pos, k_pos, window):
    q, k = q_pos[:, None], k_pos[None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask = mask & (k >= q - window)
    return mask


def window_mask_one_short(q_pos, k_pos, window):
    q, k = q_pos[:, None], k_pos[None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask = mask & (k > q - window + 1)
    return mask


def window_mask_keeps_empty_slots(q_pos, k_pos, window):
    q, k = q_pos[:, None], k_pos[None, :]
    mask = k <= q
    if window is not None:
        mask = mask & (k > q - window)
    return mask


def window_mask_not_causal(q_pos, k_pos, window):
    q, k = q_pos[:, None], k_pos[None, :]
    mask = (k >= 0) & (q >= 0)
    if window is not None:
        mask = mask & ((q - k).abs() < window)
    return mask


def window_mask_by_index(q_pos, k_pos, window):
    # Builds the mask from shapes (a lower-right band), ignoring the positions themselves.
    T, S = len(q_pos), len(k_pos)
    i = torch.arange(S - T, S)[:, None]
    j = torch.arange(S)[None, :]
    mask = j <= i
    if window is not None:
        mask = mask & (j > i - window)
    return mask


def test_mask_passes_on_a_correct_answer(capsys):
    checks.check_sliding_window_mask(window_mask)
    checks.check_sliding_window_mask(lambda q, k, w: window_mask(q, k, w).float())  # 0/1 floats are fine
    assert "passed" in capsys.readouterr().out


def test_mask_fails_on_the_stub():
    with pytest.raises(ExerciseNotDone):
        checks.check_sliding_window_mask(window_mask_stub)


@pytest.mark.parametrize("wrong, hint", [
    (window_mask_off_by_one, "one key too many"),
    (window_mask_one_short, "one key too few"),
    (window_mask_keeps_empty_slots, "Empty slots"),
    (window_mask_not_causal, "future"),
    (window_mask_by_index, "wrong mask"),
])
def test_mask_fails_on_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        checks.check_sliding_window_mask(wrong)


# -- MyConcatCache ----------------------------------------------------------------------------

class ConcatCache:
    def __init__(self):
        self.k = self.v = None
        self.length = 0

    def key_positions(self, input_pos):
        return torch.arange(self.length + len(input_pos))

    def update(self, k, v, input_pos):
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
        self.length += k.size(2)
        return self.k, self.v

    def reset(self):
        self.k = self.v = None
        self.length = 0


class ConcatCacheStub:
    def __init__(self):
        self.length = 0

    def key_positions(self, input_pos):
        raise NotImplementedError  # your code here

    def update(self, k, v, input_pos):
        raise NotImplementedError  # your code here

    def reset(self):
        raise NotImplementedError  # your code here


class ConcatCacheStubInit:
    def __init__(self):
        raise NotImplementedError  # your code here


class ConcatOnHeads(ConcatCache):
    def update(self, k, v, input_pos):
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=1)
            self.v = torch.cat([self.v, v], dim=1)
        self.length += k.size(2)
        return self.k, self.v


class ConcatOnLastDim(ConcatCache):
    def update(self, k, v, input_pos):
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=-1)
            self.v = torch.cat([self.v, v], dim=-1)
        self.length += k.size(2)
        return self.k, self.v


class ConcatNewFirst(ConcatCache):
    def update(self, k, v, input_pos):
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([k, self.k], dim=2)
            self.v = torch.cat([v, self.v], dim=2)
        self.length += k.size(2)
        return self.k, self.v


class ConcatNoReset(ConcatCache):
    def reset(self):
        pass


class ConcatResetKeepsKeys(ConcatCache):
    def reset(self):
        self.length = 0


class ConcatNoLength(ConcatCache):
    def update(self, k, v, input_pos):
        out = super().update(k, v, input_pos)
        self.length = 0
        return out


class ConcatSwapsKV(ConcatCache):
    def update(self, k, v, input_pos):
        k_all, v_all = super().update(k, v, input_pos)
        return v_all, k_all


class ConcatWrongKeyPositions(ConcatCache):
    def key_positions(self, input_pos):
        return torch.arange(len(input_pos))  # forgets the keys already cached


def test_concat_cache_passes_on_a_correct_answer(capsys):
    checks.check_concat_cache(ConcatCache)
    assert "passed" in capsys.readouterr().out


@pytest.mark.parametrize("stub", [ConcatCacheStub, ConcatCacheStubInit])
def test_concat_cache_fails_on_the_stub(stub):
    with pytest.raises(ExerciseNotDone):
        checks.check_concat_cache(stub)


@pytest.mark.parametrize("wrong, hint", [
    (ConcatOnHeads, "failed inside the model"),
    (ConcatOnLastDim, "failed inside the model"),
    (ConcatNewFirst, "chunks"),  # decode steps alone cannot tell: one query, no mask
    (ConcatNoReset, "reusing the cache"),
    (ConcatResetKeepsKeys, "second prompt"),
    (ConcatNoLength, "length"),
    (ConcatSwapsKV, "greedy tokens differ"),
    (ConcatWrongKeyPositions, "chunks"),
])
def test_concat_cache_fails_on_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        checks.check_concat_cache(wrong)


# -- my_chunked_prefill -----------------------------------------------------------------------

def chunked_prefill(model, idx, cache, chunk_size):
    T = idx.size(1)
    for start in range(0, T, chunk_size):
        chunk = idx[:, start:start + chunk_size]
        logits = model(chunk, cache, input_pos=torch.arange(start, start + chunk.size(1)))
    return logits[:, -1]


def chunked_prefill_default_positions(model, idx, cache, chunk_size):
    logits = None
    for chunk in idx.split(chunk_size, dim=1):
        logits = model(chunk, cache)  # input_pos defaults to cache.length
    return logits[:, -1]


def chunked_prefill_stub(model, idx, cache, chunk_size):
    raise NotImplementedError  # your code here


def chunked_prefill_positions_from_zero(model, idx, cache, chunk_size):
    for start in range(0, idx.size(1), chunk_size):
        logits = model(idx[:, start:start + chunk_size], cache, input_pos=0)
    return logits[:, -1]


def chunked_prefill_drops_the_tail(model, idx, cache, chunk_size):
    T = idx.size(1)
    logits = None
    for start in range(0, T - chunk_size + 1, chunk_size):
        logits = model(idx[:, start:start + chunk_size], cache, input_pos=start)
    if logits is None:
        logits = model(idx, cache)
    return logits[:, -1]


def chunked_prefill_one_pass(model, idx, cache, chunk_size):
    return model(idx, cache)[:, -1]


def chunked_prefill_first_position(model, idx, cache, chunk_size):
    for chunk in idx.split(chunk_size, dim=1):
        logits = model(chunk, cache)
    return logits[:, 0]


def chunked_prefill_first_chunk_logits(model, idx, cache, chunk_size):
    first = None
    for chunk in idx.split(chunk_size, dim=1):
        logits = model(chunk, cache)
        first = logits if first is None else first
    return first[:, -1]


def chunked_prefill_keeps_time_axis(model, idx, cache, chunk_size):
    return chunked_prefill(model, idx, cache, chunk_size)[:, None]


def test_chunked_prefill_passes_on_correct_answers(capsys):
    checks.check_chunked_prefill(chunked_prefill)
    checks.check_chunked_prefill(chunked_prefill_default_positions)
    assert "passed" in capsys.readouterr().out


def test_chunked_prefill_fails_on_the_stub():
    with pytest.raises(ExerciseNotDone):
        checks.check_chunked_prefill(chunked_prefill_stub)


@pytest.mark.parametrize("wrong, hint", [
    (chunked_prefill_positions_from_zero, "cache.length is 1"),  # a static cache rewinds silently
    (chunked_prefill_drops_the_tail, "exactly once"),
    (chunked_prefill_one_pass, "at most chunk_size"),
    (chunked_prefill_first_position, "last position of the last chunk"),
    (chunked_prefill_first_chunk_logits, "last position of the last chunk"),
    (chunked_prefill_keeps_time_axis, "expected logits of shape"),
])
def test_chunked_prefill_fails_on_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        checks.check_chunked_prefill(wrong)


def test_chunked_prefill_positions_from_zero_fails_inside_the_model_on_an_appending_cache():
    # With only appending caches (dynamic, sliding), restarting at position 0 is a ValueError.
    def from_zero_dynamic(model, idx, cache, chunk_size):
        if cache.kind == "static":
            return chunked_prefill(model, idx, cache, chunk_size)
        return chunked_prefill_positions_from_zero(model, idx, cache, chunk_size)

    with pytest.raises(AssertionError, match="(?s)failed inside the model.*continues where"):
        checks.check_chunked_prefill(from_zero_dynamic)


def test_checks_leave_the_global_random_stream_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    checks.check_concat_cache(ConcatCache)
    checks.check_chunked_prefill(chunked_prefill)
    checks.check_sliding_window_mask(window_mask)
    torch.testing.assert_close(torch.rand(3), expected)
