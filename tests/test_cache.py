"""The KV caches: every kind gives exactly what recomputing everything gives."""

import pytest
import torch

import kvlab
from kvlab.cache import KVCache, kv_cache_bytes
from conftest import make_model

STEPS = 200


def stepwise_logits(model, prompt, tokens, cache):
    """Prefill `prompt`, then decode `tokens` one at a time; logits after each call."""
    out = [kvlab.prefill(model, prompt, cache)]
    for t in range(tokens.size(1)):
        out.append(kvlab.decode_step(model, tokens[:, t:t + 1], cache))
    return torch.stack(out, 1)  # (B, 1 + N, V)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_cached_logits_equal_recomputed_logits(model, prompt, kind):
    seq = kvlab.generate(model, prompt, STEPS, temperature=0, use_cache=False)
    T = prompt.size(1)
    with torch.no_grad():
        full = model(seq)[:, T - 1:-1]  # logits that predicted each generated token
    cache = model.new_cache(2, kind=kind) if kind == "dynamic" else model.new_cache(2, max_seq_len=T + STEPS)
    cached = stepwise_logits(model, prompt, seq[:, T:-1], cache)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    assert cache.length == T + STEPS - 1


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_cached_greedy_tokens_equal_naive(model, prompt, kind):
    naive = kvlab.generate(model, prompt, STEPS, temperature=0, use_cache=False)
    cache = model.new_cache(2, kind=kind)
    cached = kvlab.generate(model, prompt, STEPS, temperature=0, cache=cache)
    assert torch.equal(cached, naive)
    assert len(set(naive[0, prompt.size(1):].tolist())) > 5, "degenerate test: greedy output barely varies"


def test_static_equals_dynamic(model, prompt):
    a = stepwise_logits(model, prompt, prompt[:, :5], model.new_cache(2, kind="static"))
    b = stepwise_logits(model, prompt, prompt[:, :5], model.new_cache(2, kind="dynamic"))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_sampled_tokens_equal_with_and_without_cache(model, prompt):
    kw = dict(temperature=0.9, top_k=20, top_p=0.9)
    a = kvlab.generate(model, prompt, 60, generator=torch.Generator().manual_seed(3), **kw)
    b = kvlab.generate(model, prompt, 60, use_cache=False, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["dynamic", "static", "sliding"])
def test_chunked_prefill_equals_one_pass(style, kind):
    window = 6 if kind == "sliding" else None
    model = make_model(style, window=window)
    x = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, kind=kind, window=window) if kind != "static" else model.new_cache(2)
        parts = [model(x[:, a:b], cache) for a, b in [(0, 9), (9, 10), (10, 17), (17, 23)]]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prompt_len", [5, 40])  # shorter and longer than the window
def test_sliding_cache_equals_naive_windowed_attention(style, prompt_len):
    W = 16
    full_attention = make_model(style)
    windowed = make_model(style, window=W)  # same weights, attention limited to the last W positions
    x = torch.randint(0, 97, (2, prompt_len), generator=torch.Generator().manual_seed(0))
    naive = kvlab.generate(windowed, x, STEPS, temperature=0, use_cache=False)
    cache = full_attention.new_cache(2, kind="sliding", window=W)
    cached = kvlab.generate(full_attention, x, STEPS, temperature=0, cache=cache)
    assert torch.equal(cached, naive)
    assert cache.nbytes == kv_cache_bytes(2, full_attention.config.n_kv_heads, 8, W, 2)
    # And it really is a different model from full attention over these lengths.
    assert not torch.equal(naive, kvlab.generate(full_attention, x, STEPS, temperature=0))


def test_sliding_logits_equal_naive_windowed_logits():
    W = 12
    model = make_model("modern", window=W)
    seq = kvlab.generate(model, torch.randint(0, 97, (1, 20)), 60, temperature=0, use_cache=False)
    with torch.no_grad():
        full = model(seq)[:, 19:-1]
    cached = stepwise_logits(model, seq[:, :20], seq[:, 20:-1], model.new_cache(1, kind="sliding"))
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_window_means_the_last_w_positions_independently_checked():
    # With one layer and RoPE (relative positions), windowed attention at position p is
    # exactly full attention over the last W tokens alone: an independent definition.
    W = 8
    windowed = make_model("modern", n_layers=1, window=W)
    full = make_model("modern", n_layers=1)
    x = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = windowed(x)[:, -1]
        b = full(x[:, -W:])[:, -1]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_rope_sliding_window_runs_past_max_seq_len():
    model = make_model("modern", max_seq_len=32, window=16)
    x = torch.randint(0, 97, (1, 10))
    naive = kvlab.generate(model, x, 100, temperature=0, use_cache=False)
    cached = kvlab.generate(model, x, 100, temperature=0)
    assert cached.shape == (1, 110)
    assert torch.equal(cached, naive)


def test_a_reused_cache_is_reset_between_prompts(model):
    cache = model.new_cache(1, kind="static")
    a = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(5))
    b = torch.randint(0, 97, (1, 4), generator=torch.Generator().manual_seed(6))
    kvlab.generate(model, a, 30, temperature=0, cache=cache)
    assert torch.equal(kvlab.generate(model, b, 30, temperature=0, cache=cache),
                       kvlab.generate(model, b, 30, temperature=0, use_cache=False))


def test_static_cache_can_rewind(model):
    x = torch.randint(0, 97, (1, 12))
    cache = model.new_cache(1)
    with torch.no_grad():
        model(x, cache)
        again = model(x[:, 8:], cache, input_pos=8)  # overwrite positions 8..11
        torch.testing.assert_close(again, model(x)[:, 8:], atol=1e-5, rtol=1e-5)


def test_memory_estimate_matches_allocated_bytes(style):
    model = make_model(style)
    c = model.config
    cache = model.new_cache(3, max_seq_len=50)
    assert cache.nbytes == kv_cache_bytes(c.n_layers, c.n_kv_heads, c.head_dim, 50, 3, torch.float32)
    assert kv_cache_bytes(12, 12, 64, 1024) == 12 * 2 * 12 * 64 * 1024 * 4
    assert kv_cache_bytes(12, 12, 64, 1, dtype=torch.bfloat16) == 36864
    dyn = model.new_cache(3, kind="dynamic")
    assert dyn.nbytes == 0
    with torch.no_grad():
        model(torch.zeros(3, 10, dtype=torch.long), dyn)
    assert dyn.nbytes == kv_cache_bytes(c.n_layers, c.n_kv_heads, c.head_dim, 10, 3)


def test_cache_misuse_is_a_clear_error(model):
    x = torch.zeros(1, 5, dtype=torch.long)
    small = model.new_cache(1, max_seq_len=4)
    with pytest.raises(ValueError, match="cache too small"):
        model(x, small)
    with pytest.raises(ValueError, match="cache too small"):
        kvlab.generate(model, x, 10, cache=model.new_cache(1, max_seq_len=8))
    dyn = model.new_cache(1, kind="dynamic")
    with torch.no_grad():
        model(x, dyn)
    with pytest.raises(ValueError, match="only appends"):
        model(x, dyn, input_pos=2)
    static = model.new_cache(1)
    with pytest.raises(ValueError, match="holds only 0"):
        model(x, static, input_pos=3)
    with pytest.raises(ValueError, match="batch_size=1"):
        model(torch.zeros(2, 5, dtype=torch.long), static)
    with pytest.raises(ValueError, match="kind must be one of"):
        model.new_cache(1, kind="paged")
    with pytest.raises(ValueError, match="needs a window"):
        model.new_cache(1, kind="sliding")
    with pytest.raises(ValueError, match="window must be a positive int"):
        model.new_cache(1, kind="sliding", window=0)
    with pytest.raises(ValueError, match="max_seq_len must be a positive int"):
        model.new_cache(1, max_seq_len=0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        model.new_cache(0)
    with pytest.raises(TypeError, match="KVCache"):
        model(x, cache="static")
    assert isinstance(model.new_cache(1), KVCache)


def test_a_hand_written_layer_cache_works_in_the_container(model, prompt):
    class ConcatCache:  # only the documented interface: no nbytes, no kind
        def __init__(self):
            self.k = self.v = None
            self.length = 0

        def key_positions(self, input_pos):
            return torch.arange(self.length + input_pos.numel())

        def update(self, k, v, input_pos):
            self.k = k if self.k is None else torch.cat([self.k, k], 2)
            self.v = v if self.v is None else torch.cat([self.v, v], 2)
            self.length += k.size(2)
            return self.k, self.v

        def reset(self):
            self.k = self.v = None
            self.length = 0

    cache = KVCache([ConcatCache() for _ in range(model.config.n_layers)], "dynamic", batch_size=2)
    out = kvlab.generate(model, prompt, 30, temperature=0, cache=cache)
    assert torch.equal(out, kvlab.generate(model, prompt, 30, temperature=0, use_cache=False))
    c = model.config
    assert cache.nbytes == kv_cache_bytes(c.n_layers, c.n_kv_heads, c.head_dim, 7 + 29, 2)
    assert "length=36" in repr(cache)
