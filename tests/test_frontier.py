"""Chapter 11's measurements (kvlab.bench.frontier): windows start with BOS, a dense cache fed one
token at a time gives the full forward's loss, bytes per token are the formula's for every kind of
cache, the sink share is the attention on position 0, and a method without its model is refused."""

import pytest
import torch
import torch.nn.functional as F

from kvlab.bench.frontier import family_windows, frontier, long_context, loss_through_cache, method_cache, sink_share
from kvlab.latent import kv_bytes_per_token
from kvlab.layers import rope_cos_sin
from kvlab.lowbit import lowbit_bytes_per_token
from conftest import make_model

TINY = dict(vocab_size=61, max_seq_len=64)


@pytest.fixture(scope="module")
def mha():
    return make_model("modern", seed=0, **TINY)


@pytest.fixture(scope="module")
def mla():
    return make_model("modern", seed=1, attention="mla", kv_latent_dim=12, rope_head_dim=4, n_kv_heads=None, **TINY)


def batch(B=2, L=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 61, (B, L), generator=g), torch.randint(0, 61, (B, L), generator=g)


# -- windows ---------------------------------------------------------------------------------------

def test_family_windows_start_with_bos_and_predict_the_window():
    ids = torch.arange(100)
    x, y = family_windows(ids, 99, length=8, n_windows=3, start=5)
    assert x.shape == y.shape == (3, 8)
    assert torch.equal(y, torch.arange(5, 29).view(3, 8))  # consecutive windows from `start`
    assert x[:, 0].tolist() == [99, 99, 99]  # BOS first: the first character is predicted from BOS alone
    assert torch.equal(x[:, 1:], y[:, :-1])
    x, y = family_windows(ids, 0, length=10, n_windows=10)  # exactly all of ids
    assert int(y[-1, -1]) == 99
    with pytest.raises(ValueError, match="need 101 tokens; ids has 100"):
        family_windows(ids, 0, length=10, n_windows=10, start=1)
    with pytest.raises(ValueError, match="length"):
        family_windows(ids, 0, length=0)
    with pytest.raises(ValueError, match="n_windows"):
        family_windows(ids, 0, n_windows=0)


# -- loss and bytes through a cache ----------------------------------------------------------------

@pytest.mark.parametrize("which", ["mha", "mla"])
def test_a_dense_cache_gives_the_full_forward_and_the_formula_bytes(which, request):
    model = request.getfixturevalue(which)
    x, y = batch()
    result = loss_through_cache(model, x, y, lambda B: method_cache(model, "dense", B, x.size(1)))
    with torch.no_grad():
        full = model(x)
    expected = F.cross_entropy(full.flatten(0, 1), y.flatten()).item()
    assert result["nats_per_char"] == pytest.approx(expected, abs=1e-5)
    assert result["top1_agreement"] == 1.0
    assert result["bytes_per_token"] == kv_bytes_per_token(model.config)


def test_the_bytes_of_the_smaller_caches(mha):
    c, (x, y) = mha.config, batch(B=2, L=16)
    dense = kv_bytes_per_token(c)
    evict = loss_through_cache(mha, x, y, lambda B: method_cache(mha, "evict", B, 16, budget=8, policy="h2o"))
    assert evict["bytes_per_token"] == dense * 8 / 16  # 8 tokens kept of 16
    lowbit = loss_through_cache(mha, x, y, lambda B: method_cache(mha, "lowbit", B, 16, bits=4, group=4, residual=4))
    per_layer = 12 * lowbit_bytes_per_token(c.n_kv_heads, c.head_dim, 4, 4) + 4 * 2 * c.n_kv_heads * c.head_dim * 4
    assert lowbit["bytes_per_token"] == c.n_layers * per_layer / 16  # 12 tokens in 3 groups, 4 exact
    int8 = loss_through_cache(mha, x, y, lambda B: method_cache(mha, "int8", B, 16))
    assert int8["bytes_per_token"] == c.n_layers * 2 * c.n_kv_heads * (c.head_dim + 4)  # int8 + a float16 step and minimum
    assert 0 < evict["top1_agreement"] < 1 and lowbit["top1_agreement"] > 0.9
    with pytest.raises(ValueError, match="kind"):
        method_cache(mha, "paged", 2, 16)


def test_frontier_gives_one_point_per_method_and_needs_every_member(mha, mla):
    x, y = batch(B=2, L=12, seed=1)
    methods = {"MHA": ("mha", "dense", {}), "MLA": ("mla", "dense", {}),
               "window 12": ("mha", "evict", dict(budget=12, policy="window")),
               "sinks 1 + window 6": ("mha", "evict", dict(budget=6, policy="window", n_sinks=1))}
    points = frontier({"mha": mha, "mla": mla}, x, y, methods)
    assert [p["label"] for p in points] == list(methods)
    by = {p["label"]: p for p in points}
    assert by["MHA"]["top1_agreement"] == by["MLA"]["top1_agreement"] == 1.0  # each against its own member
    assert by["window 12"]["nats_per_char"] == pytest.approx(by["MHA"]["nats_per_char"], abs=1e-5)  # nothing evicted
    assert by["sinks 1 + window 6"]["bytes_per_token"] == by["MHA"]["bytes_per_token"] / 2
    assert by["MLA"]["bytes_per_token"] == kv_bytes_per_token(mla.config)
    assert {"member", "kind", "args", "seconds"} <= set(points[0])
    with pytest.raises(ValueError, match="mla"):
        frontier({"mha": mha}, x, y, methods)


def test_long_context_a_budget_of_the_whole_window_is_the_sliding_window():
    model = make_model("modern", seed=0, window=8, **TINY)
    ids = torch.randint(0, 61, (200,), generator=torch.Generator().manual_seed(2))
    out = long_context(model, ids, 0, length=30, n_windows=2, budget=8, past=10)
    assert list(out) == ["sliding window 8", "window 8", "sinks 4 + window 8", "H2O 8", "SnapKV vote 8"]
    assert out["window 8"] == pytest.approx(out["sliding window 8"], abs=1e-5)
    assert out["sinks 4 + window 8"] != pytest.approx(out["window 8"], abs=1e-4)


# -- the sink share --------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["modern", "gpt2"])
def test_sink_share_is_the_attention_on_position_0(style):
    model = make_model(style, seed=3, **TINY)
    c = model.config
    x = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(3))
    share = sink_share(model, x, from_pos=6)
    assert share.shape == (c.n_layers, c.n_heads)
    # Layer 0 by hand: its input is the embedding alone, so its weights come from one call to its attention.
    block = model.blocks[0]
    with torch.no_grad():
        h = model.tok_emb(x)
        rope = None
        if c.pos == "rope":
            rope = rope_cos_sin(torch.arange(20), c.head_dim, c.rope_base)
        else:
            h = h + model.pos_emb(torch.arange(20))
        _, w = block.attn(block.norm1(h), is_causal=True, rope=rope, return_weights=True)  # (B, H, T, T)
    torch.testing.assert_close(share[0], w[:, :, 6:, 0].mean(dim=(0, 2)), atol=1e-6, rtol=1e-5)
    uniform = sum(1 / (p + 1) for p in range(6, 20)) / 14
    assert float((share - uniform).abs().max()) > 5e-3  # this model does not attend uniformly (next test's case)


@pytest.mark.parametrize("style", ["modern", "gpt2"])
def test_sink_share_of_uniform_attention_is_the_mean_of_one_over_p_plus_one(style):
    """With every query zero, each position p attends uniformly over its p + 1 keys: position 0 gets
    1/(p + 1), in every layer and head (the baseline chapter 11 compares the real shares with)."""
    model = make_model(style, seed=0, **TINY)
    d = model.config.d_model  # the first d_model outputs of the fused projection are the queries
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[:d] = 0
            if block.attn.qkv.bias is not None:
                block.attn.qkv.bias[:d] = 0
    x = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(4))
    share = sink_share(model, x, from_pos=8)
    expected = torch.tensor([1 / (p + 1) for p in range(8, 24)]).mean()
    torch.testing.assert_close(share, expected.expand(2, 4), atol=1e-6, rtol=1e-5)


def test_the_committed_record_was_measured_with_these_methods():
    """data/bench/cpu_frontier.json, which chapter 11 plots, describes FRONTIER_METHODS as they are: the
    same labels in the same order, each with the same member, cache kind and arguments."""
    import json
    from pathlib import Path

    from kvlab.bench.frontier import FRONTIER_METHODS, eviction_settings

    record = json.loads((Path(__file__).resolve().parents[1] / "data/bench/cpu_frontier.json").read_text())
    assert [p["label"] for p in record["points"]] == list(FRONTIER_METHODS)
    for p in record["points"]:
        assert (p["member"], p["kind"], p["args"]) == FRONTIER_METHODS[p["label"]], p["label"]
    assert list(record["long_context"]["nats_per_char"])[1:] == list(eviction_settings(record["long_context"]["budget"]))
