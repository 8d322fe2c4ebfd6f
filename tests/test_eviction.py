"""Evicting caches (kvlab.eviction, chapter 11): a budget the sequence fits in changes nothing, the
window policy is chapter 4's sliding cache, sinks stay, kept keys are re-numbered to exactly the keys
RoPE gives at their places, H2O and SnapKV score with the model's own attention, the victims are the
ones the rules name, bytes follow the formula, and bad arguments are refused by name."""

import pytest
import torch

from kvlab.attention import apply_rope
from kvlab.eviction import (EVICTION_POLICIES, EvictingLayerCache, evicting_cache, heavy_hitter_victim,
                            observation_victim, window_victim)
from kvlab.layers import rope_cos_sin
from conftest import make_model

# With the conftest styles: d_model 32, 2 layers, 4 heads of 8 (2 KV heads in the RoPE style).
TINY = dict(vocab_size=61, max_seq_len=64)


@pytest.fixture(params=["modern", "gpt2"])
def any_model(request):
    """A RoPE model (GQA, 2 KV heads) and a learned-position GPT-2 style one."""
    return make_model(request.param, seed=0, **TINY)


@pytest.fixture
def rope_model():
    return make_model("modern", seed=0, **TINY)


def tokens(B, L, seed=0):
    return torch.randint(0, TINY["vocab_size"], (B, L), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def teacher_forced(model, x, cache, prefill=1, after_step=None):
    """Logits for every position of x: the first `prefill` tokens in one call, then one token per call.
    `after_step(n)` is called with the number of tokens fed so far after each call."""
    out = [model(x[:, :prefill], cache)]
    if after_step:
        after_step(prefill)
    for t in range(prefill, x.size(1)):
        out.append(model(x[:, t:t + 1], cache))
        if after_step:
            after_step(t + 1)
    return torch.cat(out, dim=1)  # (B, L, V)


def attention_weights(model, x):
    """Per layer, the (B, H, T, T) attention weights of a plain causal forward of x."""
    weights = []

    def ask(module, args, kwargs):
        return args, {**kwargs, "return_weights": True}

    def keep(module, args, kwargs, output):
        weights.append(output[1])
        return output[0]

    hooks = [h for block in model.blocks for h in (block.attn.register_forward_pre_hook(ask, with_kwargs=True),
                                                   block.attn.register_forward_hook(keep, with_kwargs=True))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return weights


# -- nothing evicted: the full forward -----------------------------------------------------------

@pytest.mark.parametrize("policy", EVICTION_POLICIES)
@pytest.mark.parametrize("budget", [20, 25])
def test_a_budget_the_sequence_fits_in_changes_nothing(any_model, policy, budget):
    x = tokens(2, 20)
    with torch.no_grad():
        full = any_model(x)
    cache = evicting_cache(any_model, 2, budget, policy, n_sinks=1, recent=3, observe_window=3)
    cached = teacher_forced(any_model, x, cache, prefill=5)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    assert cache.length == 20 and all(layer.evicted == 0 and layer.kept == 20 for layer in cache.layers)


# -- the window policy -----------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [4, 7])
def test_window_without_sinks_is_the_chapter_4_sliding_cache(any_model, budget):
    x = tokens(2, 24, seed=1)
    ours = evicting_cache(any_model, 2, budget, "window")
    sliding = any_model.new_cache(2, kind="sliding", window=budget)
    a = teacher_forced(any_model, x, ours, prefill=budget)
    b = teacher_forced(any_model, x, sliding, prefill=budget)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        full = any_model(x)
    assert not torch.allclose(a[:, budget:], full[:, budget:], atol=1e-3)  # eviction did change the logits
    assert all(layer.evicted == 24 - budget and layer.kept == budget for layer in ours.layers)


def test_window_with_sinks_keeps_the_sinks_and_the_newest(rope_model):
    budget, n_sinks = 7, 2
    cache = evicting_cache(rope_model, 2, budget, "window", n_sinks=n_sinks)
    seen = []

    def check(n):
        expected = list(range(n)) if n <= budget else list(range(n_sinks)) + list(range(n - budget + n_sinks, n))
        for layer in cache.layers:
            assert layer.pos.tolist() == [expected, expected], n
            assert layer.length == n and layer.evicted == max(0, n - budget)
        assert cache.key_positions(torch.tensor([n])).tolist() == list(range(n + 1 - min(n + 1, budget), n + 1))
        seen.append(n)

    teacher_forced(rope_model, tokens(2, 20), cache, prefill=3, after_step=check)
    assert seen == list(range(3, 21))


# -- re-numbering ----------------------------------------------------------------------------------

def test_rope_rotations_compose():
    """What the re-numbering relies on: a key rotated for p, rotated again by d, is the key for p + d."""
    k = torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(0))
    p, d = torch.tensor([0, 3, 7, 20, 41]), torch.tensor([0, 5, -2, 13, 1])
    twice = apply_rope(apply_rope(k, *rope_cos_sin(p, 8)), *rope_cos_sin(d, 8))
    torch.testing.assert_close(twice, apply_rope(k, *rope_cos_sin(p + d, 8)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy, kwargs", [("window", dict(n_sinks=2)), ("h2o", dict(n_sinks=1, recent=2)),
                                            ("snapkv", dict(recent=3, observe_window=3))])
def test_kept_keys_are_the_keys_of_the_kept_tokens_placed_contiguously(rope_model, policy, kwargs):
    """Layer 0's keys depend only on the token and its position, so the keys an evicting cache returns
    must equal the keys a plain forward computes when the kept tokens stand contiguously at the places
    the cache gives them (the newest at the query's position), row by row."""
    B, L, budget = 2, 16, 6
    x = tokens(B, L, seed=2)
    cache = evicting_cache(rope_model, B, budget, policy, **kwargs)
    layer = cache.layers[0]
    returned = []
    update = layer.update
    layer.update = lambda k, v, pos: returned.append(update(k, v, pos)) or returned[-1]
    checked = []

    def check(n):
        k, v = returned[-1]
        S = layer.kept
        assert k.shape == (B, 2, S, 8)
        ref_idx = x[:, :n].clone()
        ref_idx[:, n - S:] = x[:, :n].gather(1, layer.pos)  # the kept tokens, in order, at places n-S..n-1
        ref = rope_model.new_cache(B, kind="dynamic")
        with torch.no_grad():
            rope_model(ref_idx, ref)
        torch.testing.assert_close(k, ref.layers[0].k[:, :, n - S:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, ref.layers[0].v[:, :, n - S:], atol=1e-6, rtol=1e-6)
        checked.append(bool((layer.pos != torch.arange(n - S, n)).any()))

    teacher_forced(rope_model, x, cache, prefill=4, after_step=check)
    assert sum(checked) >= L - budget - 1  # most steps held a gap, so the keys really were re-rotated


# -- scores ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefill", [1, 6])
def test_h2o_scores_are_the_attention_each_token_received(rope_model, prefill):
    """With nothing evicted, a layer's H2O score of token j is the attention it received, summed over
    every head and every query since it arrived: the column sums of the model's own weights, and so
    n·H in all after n tokens (each head's row sums to 1)."""
    B, n, H = 2, 12, rope_model.config.n_heads
    x = tokens(B, n, seed=3)
    cache = evicting_cache(rope_model, B, 16, "h2o")
    teacher_forced(rope_model, x, cache, prefill=prefill)
    for layer, w in zip(cache.layers, attention_weights(rope_model, x)):
        assert layer.scores.shape == (B, n)
        torch.testing.assert_close(layer.scores.sum(dim=1), torch.full((B,), float(n * H)), atol=1e-4, rtol=0)
        torch.testing.assert_close(layer.scores, w.sum(dim=(1, 2)), atol=1e-4, rtol=1e-5)


def test_snapkv_keeps_the_last_rows_of_attention(rope_model):
    B, n, Q = 2, 11, 4
    x = tokens(B, n, seed=4)
    cache = evicting_cache(rope_model, B, 16, "snapkv", recent=Q, observe_window=Q)
    teacher_forced(rope_model, x, cache, prefill=5)
    for layer, w in zip(cache.layers, attention_weights(rope_model, x)):
        assert layer.scores.shape == (B, Q, n)
        torch.testing.assert_close(layer.scores, w[:, :, n - Q:].sum(dim=1), atol=1e-5, rtol=1e-5)


def test_window_keeps_no_scores_worth_reading(rope_model):
    cache = evicting_cache(rope_model, 2, 16, "window")
    teacher_forced(rope_model, tokens(2, 9), cache, prefill=3)
    assert all(float(layer.scores.abs().sum()) == 0 for layer in cache.layers)


# -- the victims -----------------------------------------------------------------------------------

def test_window_victim_is_the_oldest_after_the_sinks():
    scores = torch.tensor([[0.0, 9, 9, 9, 9, 9], [5.0, 1, 0, 2, 3, 4]])
    assert window_victim(scores).tolist() == [0, 0]
    assert window_victim(scores, n_sinks=2, recent=3).tolist() == [2, 2]


def test_heavy_hitter_victim_is_the_least_attended_outside_sinks_and_recent():
    scores = torch.tensor([[0.0, 5, 3, 1, 4, 0.1, 0.2],
                           [9.0, 2, 0.5, 7, 8, 0.7, 0]])
    # The smallest scores overall sit in the sink (row 0) and among the newest two (both rows): protected.
    assert heavy_hitter_victim(scores, n_sinks=1, recent=2).tolist() == [3, 2]
    assert heavy_hitter_victim(scores, n_sinks=0, recent=2).tolist() == [0, 2]
    assert heavy_hitter_victim(scores, n_sinks=1, recent=1).tolist() == [5, 2]


def test_each_row_drops_its_own_victim():
    """H2O in a batch of two: row 0's queries look at tokens 0 and 2, row 1's at token 1, so row 0 drops
    token 1 and row 1 token 2; keys, values, positions and scores follow each row's choice."""
    layer = EvictingLayerCache(3, "h2o", recent=1)
    e = torch.eye(4) * 5  # keys and queries along one axis each: a dot product of 25 or 0
    targets = [(0, 0), (0, 1), (2, 1)]  # (row 0, row 1): the token each step's query looks at
    for n in range(4):
        k = e[n].expand(2, 1, 1, 4)
        v = torch.stack([e[n] + 1, e[n] + 2]).view(2, 1, 1, 4)
        k_all, v_all = layer.update(k, v, torch.tensor([n]))
        if n < 3:
            layer.observe(torch.stack([e[targets[n][0]], e[targets[n][1]]]).view(2, 1, 1, 4))
    assert layer.pos.tolist() == [[0, 2, 3], [0, 1, 3]]
    torch.testing.assert_close(k_all[:, 0], torch.stack([e[[0, 2, 3]], e[[0, 1, 3]]]))
    torch.testing.assert_close(v_all[:, 0], torch.stack([e[[0, 2, 3]] + 1, e[[0, 1, 3]] + 2]))
    torch.testing.assert_close(layer.scores, torch.tensor([[2.0, 1, 0], [1, 2, 0]]), atol=1e-4, rtol=0)


def test_observation_victim_sums_the_rows_and_pools_over_five_neighbours():
    summed = torch.tensor([[9.0, 1, 1, 1, 9, 9, 9, 0.5, 9, 9, 0],
                           [0.0, 9, 9, 9, 9, 9, 9, 9, 1, 1, 1]])
    first = torch.rand(2, 11, generator=torch.Generator().manual_seed(0)) * summed
    votes = torch.stack([first, summed - first], dim=1)  # (B, Q=2, S): two rows that add up to `summed`
    S = summed.size(1)
    pooled = torch.tensor([[float(row[max(0, j - 2):j + 3].mean()) for j in range(S)] for row in summed])
    expected = (pooled[:, 1:S - 1].argmin(dim=1) + 1).tolist()  # n_sinks=1, recent=1
    assert expected == [1, 9]
    assert summed[0, 1:S - 1].argmin().item() + 1 == 7  # without pooling, row 0 would drop the lone dip
    assert observation_victim(votes, n_sinks=1, recent=1).tolist() == expected


# -- memory and arguments --------------------------------------------------------------------------

def test_nbytes_counts_the_kept_keys_and_values(rope_model):
    c = rope_model.config
    B, budget = 3, 6
    cache = evicting_cache(rope_model, B, budget, "h2o", recent=2)
    assert cache.nbytes == 0

    def check(n):
        S = min(n, budget)
        assert cache.nbytes == c.n_layers * 2 * B * c.n_kv_heads * S * c.head_dim * 4

    teacher_forced(rope_model, tokens(B, 10), cache, prefill=2, after_step=check)


def held_bytes(t):
    return t.untyped_storage().nbytes()


def test_the_cache_holds_copies_not_views_of_the_projection(any_model):
    """After a prefill, the kept keys and values are the cache's own tensors: a view into the layer's
    fused q/k/v output would keep the queries alive too, and nbytes would undercount what is held
    (chapter 4's DynamicLayerCache copies for this reason)."""
    cache = evicting_cache(any_model, 2, 16, "h2o")
    with torch.no_grad():
        any_model(tokens(2, 10), cache)
    for layer in cache.layers:
        assert held_bytes(layer.k) + held_bytes(layer.v) == layer.nbytes


def test_reset_empties_the_cache(rope_model):
    cache = evicting_cache(rope_model, 2, 5, "snapkv", recent=2, observe_window=2)
    teacher_forced(rope_model, tokens(2, 8), cache)
    cache.reset()
    assert cache.length == 0 and cache.nbytes == 0
    assert all(layer.kept == 0 and layer.evicted == 0 and layer.pos is None for layer in cache.layers)


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(budget=0), ValueError, "budget"),
    (dict(budget=2.5), TypeError, "budget"),
    (dict(budget=8, policy="lru"), ValueError, "policy"),
    (dict(budget=8, n_sinks=-1), ValueError, "n_sinks"),
    (dict(budget=8, recent=0), ValueError, "recent"),
    (dict(budget=8, policy="snapkv", observe_window=0), ValueError, "observe_window"),
    (dict(budget=8, policy="snapkv", recent=2, observe_window=3), ValueError, "recent >= observe_window"),
    (dict(budget=5, n_sinks=3, recent=2), ValueError, "n_sinks \\+ recent"),
    (dict(budget=5, n_sinks=4), ValueError, "n_sinks \\+ recent"),
    (dict(budget=1), ValueError, "n_sinks \\+ recent"),  # recent=1 leaves nothing to evict
])
def test_bad_arguments_are_refused_by_name(rope_model, kwargs, error, name):
    with pytest.raises(error, match=name):
        evicting_cache(rope_model, 2, **kwargs)


def test_bad_models_and_feeds_are_refused(rope_model):
    with pytest.raises(ValueError, match="batch_size"):
        evicting_cache(rope_model, 0, 8)
    windowed = make_model("modern", seed=0, window=8, **TINY)
    evicting_cache(windowed, 2, 8)  # the whole window may be kept
    with pytest.raises(ValueError, match="window"):
        evicting_cache(windowed, 2, 9)
    mla = make_model("modern", seed=0, attention="mla", kv_latent_dim=12, n_kv_heads=None, **TINY)
    with pytest.raises(ValueError, match="mla"):
        evicting_cache(mla, 2, 8)
    cache = evicting_cache(rope_model, 2, 6)
    x = tokens(2, 10)
    with pytest.raises(ValueError, match="budget=6"):
        with torch.no_grad():
            rope_model(x[:, :7], cache)
    with torch.no_grad():
        rope_model(x[:, :4], cache)
        with pytest.raises(ValueError, match="budget=6"):
            rope_model(x[:, 4:7], cache)  # 4 + 3 tokens do not fit before the cache is full
        rope_model(x[:, 4:6], cache)  # 4 + 2 do
        rope_model(x[:, 6:7], cache)  # and then one token at a time
    assert cache.length == 7 and cache.layers[0].kept == 6


def test_the_layer_cache_alone():
    layer = EvictingLayerCache(4, "window", n_sinks=1)
    g = torch.Generator().manual_seed(0)
    for n in range(6):
        k, v = torch.randn(1, 2, 1, 4, generator=g), torch.randn(1, 2, 1, 4, generator=g)
        k_all, v_all = layer.update(k, v, torch.tensor([n]))
        assert torch.equal(v_all[:, :, -1:], v) and torch.equal(k_all[:, :, -1:], k)  # no RoPE: keys as given
    assert layer.pos.tolist() == [[0, 3, 4, 5]] and layer.kept == 4 and layer.evicted == 2
