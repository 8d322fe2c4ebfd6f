"""The chapter 4 checks pass right answers and catch the stub and plausible wrong answers."""

import functools

import pytest
import torch

from kvlab.course.checks import kv_cache as checks
from kvlab.course.checks._common import ExerciseNotDone, is_not_done_line


def assert_not_done(capsys, name):
    """The public check printed the "not done yet" line for `name` and returned without raising."""
    lines = capsys.readouterr().out.splitlines()
    assert any(is_not_done_line(line) and name in line for line in lines), lines
    assert not any(line.startswith("✓") for line in lines), lines


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


def test_bytes_reports_the_stub_as_not_done(capsys):
    assert checks.check_kv_cache_bytes(kv_bytes_stub) is None
    assert_not_done(capsys, "my_kv_cache_bytes")
    with pytest.raises(ExerciseNotDone, match="not written yet"):  # the undecorated check still raises
        checks.check_kv_cache_bytes.__wrapped__(kv_bytes_stub)


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


def test_mask_reports_the_stub_as_not_done(capsys):
    checks.check_sliding_window_mask(window_mask_stub)
    assert_not_done(capsys, "my_sliding_window_mask")


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
    """The chapter's cache: right, but torch.cat copies every cached key at every step."""

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


class GrowingCache:
    """The exercise's answer: spare room, doubled when full, new keys written in place."""

    def __init__(self):
        self.k = self.v = None
        self.length = 0

    def key_positions(self, input_pos):
        return torch.arange(self.length + len(input_pos))

    def update(self, k, v, input_pos):
        B, H, T, D = k.shape
        end = self.length + T
        if self.k is None or end > self.k.size(2):
            new_k, new_v = k.new_empty(B, H, max(2 * end, 16), D), v.new_empty(B, H, max(2 * end, 16), D)
            if self.k is not None:
                new_k[:, :, :self.length] = self.k[:, :, :self.length]
                new_v[:, :, :self.length] = self.v[:, :, :self.length]
            self.k, self.v = new_k, new_v
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reset(self):
        self.length = 0


class GrowingByOne(GrowingCache):
    """Right tokens, but grows by exactly what is needed: a new buffer (and a full copy) every step."""

    def update(self, k, v, input_pos):
        B, H, T, D = k.shape
        end = self.length + T
        if self.k is None or end > self.k.size(2):
            new_k, new_v = k.new_empty(B, H, end, D), v.new_empty(B, H, end, D)
            if self.k is not None:
                new_k[:, :, :self.length] = self.k[:, :, :self.length]
                new_v[:, :, :self.length] = self.v[:, :, :self.length]
            self.k, self.v = new_k, new_v
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


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
    checks.check_concat_cache(GrowingCache)
    assert "✓ MyConcatCache: all checks passed" in capsys.readouterr().out


@pytest.mark.parametrize("stub", [ConcatCacheStub, ConcatCacheStubInit])
def test_concat_cache_reports_the_stub_as_not_done(stub, capsys):
    checks.check_concat_cache(stub)
    assert_not_done(capsys, "MyConcatCache")


@pytest.mark.parametrize("wrong, hint", [
    (ConcatOnHeads, "failed inside the model"),
    (ConcatOnLastDim, "failed inside the model"),
    (ConcatNewFirst, "chunks"),  # decode steps alone cannot tell: one query, no mask
    (ConcatNoReset, "reusing the cache"),
    (ConcatResetKeepsKeys, "second prompt"),
    (ConcatNoLength, "length"),
    (ConcatSwapsKV, "greedy tokens differ"),
    (ConcatWrongKeyPositions, "chunks"),
    (ConcatCache, "moved to a new address"),  # right tokens, but a full copy every step
    (GrowingByOne, "moved to a new address"),
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


def test_chunked_prefill_reports_the_stub_as_not_done(capsys):
    checks.check_chunked_prefill(chunked_prefill_stub)
    assert_not_done(capsys, "my_chunked_prefill")


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
    checks.check_concat_cache(GrowingCache)
    checks.check_chunked_prefill(chunked_prefill)
    checks.check_sliding_window_mask(window_mask)
    checks.check_modern_forward(modern_forward)
    torch.testing.assert_close(torch.rand(3), expected)


# -- my_modern_forward -------------------------------------------------------------------------

def modern_forward(model, idx, cache, input_pos):
    """Written independently of the check's reference: SDPA, kvlab's repeat_kv and attention_mask."""
    from kvlab.attention import apply_rope, attention_mask, repeat_kv
    from kvlab.layers import rope_cos_sin

    c = model.config
    B, T = idx.shape
    H, Hkv, D, C = c.n_heads, c.n_kv_heads, c.head_dim, c.d_model
    cos, sin = rope_cos_sin(input_pos, D, c.rope_base)
    window = cache.window if cache.kind == "sliding" else c.window
    mask = attention_mask(input_pos, cache.key_positions(input_pos), window)
    x = model.tok_emb(idx)
    for i, blk in enumerate(model.blocks):
        q, k, v = blk.attn.qkv(blk.norm1(x)).split([C, Hkv * D, Hkv * D], dim=-1)
        q = apply_rope(q.view(B, T, H, D).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(B, T, Hkv, D).transpose(1, 2), cos, sin)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        k, v = cache.layers[i].update(k, v, input_pos)
        y = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, H // Hkv), repeat_kv(v, H // Hkv),
                                                             attn_mask=mask)
        x = x + blk.attn.out(y.transpose(1, 2).reshape(B, T, C))
        x = x + blk.mlp(blk.norm2(x))
    return model.lm_head(model.norm_f(x))


def modern_forward_stub(model, idx, cache, input_pos):
    raise NotImplementedError  # your code here


def modern_forward_forgets_repeat_kv(model, idx, cache, input_pos):
    """Attends q (H heads) to the cache's Hkv heads directly: the shapes do not broadcast."""
    from kvlab.attention import apply_rope, attention_mask, attention_reference
    from kvlab.layers import rope_cos_sin

    c = model.config
    B, T = idx.shape
    H, Hkv, D, C = c.n_heads, c.n_kv_heads, c.head_dim, c.d_model
    cos, sin = rope_cos_sin(input_pos, D, c.rope_base)
    mask = attention_mask(input_pos, cache.key_positions(input_pos), cache.window)
    x = model.tok_emb(idx)
    for i, blk in enumerate(model.blocks):
        q, k, v = blk.attn.qkv(blk.norm1(x)).split([C, Hkv * D, Hkv * D], dim=-1)
        q = apply_rope(q.view(B, T, H, D).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(B, T, Hkv, D).transpose(1, 2), cos, sin)
        k, v = cache.layers[i].update(k, v.view(B, T, Hkv, D).transpose(1, 2), input_pos)
        y, _ = attention_reference(q, k, v, mask)
        x = x + blk.attn.out(y.transpose(1, 2).reshape(B, T, C))
        x = x + blk.mlp(blk.norm2(x))
    return model.lm_head(model.norm_f(x))


def modern_forward_repeats_before_the_cache(model, idx, cache, input_pos):
    """Stores n_heads heads of keys in the cache: a static cache of n_kv_heads refuses them."""
    from kvlab.attention import apply_rope, attention_mask, attention_reference
    from kvlab.layers import rope_cos_sin

    c = model.config
    B, T = idx.shape
    H, Hkv, D, C = c.n_heads, c.n_kv_heads, c.head_dim, c.d_model
    cos, sin = rope_cos_sin(input_pos, D, c.rope_base)
    mask = attention_mask(input_pos, cache.key_positions(input_pos), cache.window)
    x = model.tok_emb(idx)
    for i, blk in enumerate(model.blocks):
        q, k, v = blk.attn.qkv(blk.norm1(x)).split([C, Hkv * D, Hkv * D], dim=-1)
        q = apply_rope(q.view(B, T, H, D).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(B, T, Hkv, D).transpose(1, 2), cos, sin).repeat_interleave(H // Hkv, dim=1)
        v = v.view(B, T, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
        k, v = cache.layers[i].update(k, v, input_pos)
        y, _ = attention_reference(q, k, v, mask)
        x = x + blk.attn.out(y.transpose(1, 2).reshape(B, T, C))
        x = x + blk.mlp(blk.norm2(x))
    return model.lm_head(model.norm_f(x))


def test_modern_forward_passes_on_correct_answers(capsys):
    checks.check_modern_forward(modern_forward)
    checks.check_modern_forward(checks._reference_forward)
    assert capsys.readouterr().out.count("✓ my_modern_forward: all checks passed") == 2


def test_modern_forward_reports_the_stub_as_not_done(capsys):
    assert checks.check_modern_forward(modern_forward_stub) is None
    assert_not_done(capsys, "my_modern_forward")
    with pytest.raises(ExerciseNotDone):
        checks.check_modern_forward.__wrapped__(modern_forward_stub)


@pytest.mark.parametrize("wrong, hint", [
    (functools.partial(checks._reference_forward, rope_at="relative"), "absolute position"),
    (functools.partial(checks._reference_forward, mask="top-left"), "aligned top-left"),
    (functools.partial(checks._reference_forward, mask="no-window"), "cache.window"),
    (functools.partial(checks._reference_forward, share="tile"), "repeat_interleave"),
    (modern_forward_forgets_repeat_kv, "(?s)failed inside the model.*repeat_kv"),
    (modern_forward_repeats_before_the_cache, "(?s)failed inside the model.*n_kv_heads"),
], ids=["relative-rope", "top-left-mask", "no-window", "tiled-heads", "no-repeat-kv", "repeat-before-cache"])
def test_modern_forward_fails_on_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint) as err:
        checks.check_modern_forward(wrong)
    assert not isinstance(err.value, ExerciseNotDone)


# -- my_divergence_position (experiment) -------------------------------------------------------

@pytest.fixture(scope="module")
def divergence_case():
    from kvlab.generate import generate

    model = checks._model("gpt2", seed=3)
    prompt = torch.randint(0, 61, (1, 6), generator=torch.Generator().manual_seed(1))
    full = generate(model, prompt, 60, temperature=0)
    windowed = generate(model, prompt, 60, temperature=0, cache=model.new_cache(1, kind="sliding", window=8))
    first = int((full != windowed)[0].nonzero()[0])
    assert first > 8  # the case measures something: the answer is not the window itself
    return model, prompt, first


def test_divergence_passes_on_the_measured_answer(divergence_case, capsys):
    model, prompt, first = divergence_case
    checks.check_window_divergence(first, model, prompt, window=8, max_new_tokens=60)
    checks.check_window_divergence(torch.tensor(first), model, prompt, window=8, max_new_tokens=60)
    assert capsys.readouterr().out.count("✓ my_divergence_position: all checks passed") == 2


def test_divergence_reports_no_answer_as_not_done(divergence_case, capsys):
    model, prompt, _ = divergence_case
    checks.check_window_divergence(None, model, prompt, window=8, max_new_tokens=60)
    assert_not_done(capsys, "my_divergence_position")


@pytest.mark.parametrize("offset, hint", [(-6, "generated tokens only"), (-1, "whose logits chose"),
                                          (None, "measure it")])
def test_divergence_fails_on_wrong_answers(divergence_case, offset, hint):
    model, prompt, first = divergence_case
    answer = 8 if offset is None else first + offset
    with pytest.raises(AssertionError, match=hint):
        checks.check_window_divergence(answer, model, prompt, window=8, max_new_tokens=60)


def test_divergence_rejects_a_window_that_changes_nothing(divergence_case):
    model, prompt, _ = divergence_case
    with pytest.raises(ValueError, match="never differ"):
        checks.check_window_divergence(10, model, prompt, window=200, max_new_tokens=20)
