"""Latent attention (kvlab.latent, chapter 11): the absorbed form equals the naive one, the cache holds
only (latent, RoPE key), generation through every cache kind matches the uncached loop, bad configs are
refused by field name, and an MLA model saves and loads like any other."""

import math

import pytest
import torch

import kvlab
from kvlab.attention import attention_mask
from kvlab.latent import (LatentDynamicLayerCache, LatentSlidingWindowLayerCache, LatentStaticLayerCache,
                          MultiHeadLatentAttention, kv_bytes_per_token, latent_cache, latent_cache_bytes, set_mla_form)
from kvlab.layers import rope_cos_sin
from conftest import STYLES, make_model

MLA = dict(attention="mla", kv_latent_dim=12)  # with the conftest styles: 4 heads of 8, Dr = 4 under RoPE


def mla_model(style="modern", seed=0, **overrides):
    overrides = {**MLA, **overrides}
    if style == "modern":
        overrides.setdefault("n_kv_heads", None)  # MLA has no key/value heads of its own
    return make_model(style, seed, **overrides)


# -- the absorbed form ------------------------------------------------------------------------

SHAPES = [  # d_model, n_heads, kv_latent_dim, rope_head_dim
    (32, 4, 12, 4), (48, 3, 64, 8), (64, 8, 16, 0), (96, 2, 24, 16),
]


def _feed(layer, x, starts, cache, form):
    """Run `x` (B, T, C) through `layer` in chunks beginning at `starts`, with a cache; the outputs and weights."""
    layer.form = form
    Dr = layer.rope_head_dim
    outs, weights = [], []
    bounds = list(starts) + [x.size(1)]
    for start, end in zip(bounds, bounds[1:]):
        pos = torch.arange(start, end)
        rope = rope_cos_sin(pos, Dr) if Dr else None
        k_pos = cache.key_positions(pos)
        mask = attention_mask(pos, k_pos)
        y, w = layer(x[:, start:end], mask=mask, rope=rope, cache=cache, input_pos=pos, return_weights=True)
        y_fast = layer(x[:, start:end], mask=mask, rope=rope, cache=_Replay(cache), input_pos=pos)
        torch.testing.assert_close(y_fast, y, rtol=0, atol=1e-5)  # the fused kernel agrees with the written-out path
        outs.append(y)
        weights.append(w)
    return torch.cat(outs, dim=1), weights


class _Replay:
    """A cache view that returns what the real cache holds now, without writing again."""

    def __init__(self, cache):
        self.cache = cache

    def update(self, latent, k_rope, input_pos):
        end = int(input_pos[-1]) + 1
        return self.cache.k[:, :, :end], self.cache.v[:, :, :end]


@torch.no_grad()
@pytest.mark.parametrize("d_model, n_heads, Dc, Dr", SHAPES)
def test_absorbed_equals_naive_prefill_and_decode(d_model, n_heads, Dc, Dr):
    torch.manual_seed(d_model + Dc)
    layer = MultiHeadLatentAttention(d_model, n_heads, Dc, Dr).eval()
    B, T = 2, 11
    x = torch.randn(B, T, d_model)
    starts = [0, 6, 7, 8, 10]  # a prefill of 6, decode steps, a chunk of 2, a last decode step
    results = {}
    for form in ("naive", "absorbed"):
        cache = LatentStaticLayerCache(B, Dc, Dr, T)
        results[form] = _feed(layer, x, starts, cache, form)
        assert cache.length == T
    (y_naive, w_naive), (y_abs, w_abs) = results["naive"], results["absorbed"]
    torch.testing.assert_close(y_abs, y_naive, rtol=0, atol=1e-5)
    for a, b in zip(w_abs, w_naive):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # and the cached run equals one uncached pass over the whole sequence
    rope = rope_cos_sin(torch.arange(T), Dr) if Dr else None
    for form in ("naive", "absorbed"):
        layer.form = form
        torch.testing.assert_close(layer(x, is_causal=True, rope=rope), y_naive, rtol=0, atol=1e-5)


@torch.no_grad()
def test_a_broken_absorption_is_caught():
    # Fold the value up-projection in with the wrong orientation (W_uv instead of its per-head
    # transpose, the "catalogued mistake"): shapes still fit when Dc == Dn, the numbers do not.
    torch.manual_seed(0)
    layer = MultiHeadLatentAttention(32, 4, 8, 4).eval()
    x = torch.randn(1, 5, 32)
    rope = rope_cos_sin(torch.arange(5), 4)
    q_nope, q_rope, latent, k_rope = layer.project(x, rope)
    good, _ = layer.attend_absorbed(q_nope, q_rope, latent, k_rope, is_causal=True)
    naive, _ = layer.attend_naive(q_nope, q_rope, latent, k_rope, is_causal=True)
    torch.testing.assert_close(good, naive, rtol=0, atol=1e-5)
    w_uv = layer.v_up.weight.view(4, 8, 8)
    y_latent, _ = layer._attend(torch.cat([q_nope @ layer.k_up.weight.view(4, 8, 8), q_rope], -1),
                                torch.cat([latent, k_rope], -1), latent, None, True, False)
    broken = y_latent @ w_uv  # should be w_uv.transpose(-2, -1)
    assert (broken - naive).abs().max() > 1e-3


# -- the cache holds only the latent and the RoPE key -------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("kind", ["dynamic", "static", "sliding"])
def test_the_cache_holds_only_latent_and_rope_key(kind):
    model = mla_model(window=8 if kind == "sliding" else None)
    c = model.config
    assert (c.kv_latent_dim, c.rope_head_dim) == (12, 4)
    B, T = 2, 6
    cache = model.new_cache(B, kind=kind, **({"max_seq_len": T} if kind == "static" else {}))
    model(torch.randint(0, c.vocab_size, (B, T)), cache)
    slots = {"dynamic": T, "static": T, "sliding": 8}[kind]
    for layer in cache.layers:
        tensors = {k: v for k, v in vars(layer).items() if isinstance(v, torch.Tensor)}
        assert set(tensors) == ({"k", "v", "pos"} if kind == "sliding" else {"k", "v"})
        assert tuple(layer.latent.shape) == (B, 1, slots, c.kv_latent_dim)
        assert tuple(layer.rope_key.shape) == (B, 1, slots, c.rope_head_dim)
    per_token = (c.kv_latent_dim + c.rope_head_dim) * c.n_layers * 4  # float32
    assert cache.nbytes == per_token * B * slots == latent_cache_bytes(c.n_layers, 12, 4, slots, B)
    assert kv_bytes_per_token(c) == per_token
    assert kv_bytes_per_token(c, torch.float16) == per_token // 2


def test_bytes_per_token_of_the_family_and_of_deepseek_v2():
    from kvlab.train.family import CACHE_FAMILY, family_config

    per_token = {name: kv_bytes_per_token(family_config(name)) for name in CACHE_FAMILY}
    assert per_token["mla"] <= per_token["mha"] / 4
    assert per_token["mha"] > per_token["gqa"] > per_token["mqa"]
    # DeepSeek-V2: 60 layers, Dc 512, Dr 64, bfloat16
    assert latent_cache_bytes(60, 512, 64, 1, dtype=torch.bfloat16) == 69_120


def test_the_family_has_matched_parameter_counts():
    from kvlab.train.family import CACHE_FAMILY, FAMILY_TRAIN, family_config

    counts = {name: kvlab.GPT(family_config(name)).num_params() for name in CACHE_FAMILY}
    base = counts["mha"]
    assert all(abs(n - base) / base < 1e-3 for n in counts.values()), counts
    assert 2 * base * len(CACHE_FAMILY) <= 8_000_000  # float16 weights of the shipped members
    assert FAMILY_TRAIN["bos_id"] == family_config("mha").vocab_size - 1


# -- generation: cached == uncached ------------------------------------------------------------


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("kind", ["dynamic", "static", "sliding"])
@pytest.mark.parametrize("form", ["auto", "naive", "absorbed"])
def test_cached_generation_equals_uncached(style, kind, form, prompt):
    window = 8 if kind == "sliding" else None
    model = mla_model(style, seed=1 if style == "gpt2" else 0, window=window)  # seeds whose greedy text varies
    set_mla_form(model, form)
    reference = kvlab.generate(model, prompt, 20, temperature=0, use_cache=False)
    cache = model.new_cache(prompt.size(0), kind=kind)
    got = kvlab.generate(model, prompt, 20, temperature=0, cache=cache)
    assert torch.equal(got, reference)
    assert len(set(reference[:, prompt.size(1):].flatten().tolist())) > 4  # not a degenerate repetition


@torch.no_grad()
def test_logits_cached_equal_uncached_and_the_forms_agree():
    model = mla_model()
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    full = model(x)
    for form in ("naive", "absorbed"):
        set_mla_form(model, form)
        cache = model.new_cache(2, kind="static")
        parts = [model(x[:, :5], cache)] + [model(x[:, i:i + 1], cache) for i in range(5, 12)]
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-4)


def test_beam_search_and_the_fixed_shape_step_run_on_the_latent_cache(prompt):
    from kvlab.compiled import advance, decode_step_fixed_shape

    model = mla_model()
    beams = kvlab.beam_search(model, prompt[:1], 6, num_beams=3)
    assert beams.size(-1) == prompt.size(1) + 6
    with torch.no_grad():
        cache = model.new_cache(1, kind="static", max_seq_len=16)
        logits = model(prompt[:1], cache)[:, -1]
        token = logits.argmax(-1, keepdim=True)
        step = decode_step_fixed_shape(model, token, torch.tensor([prompt.size(1)]), cache)
        advance(cache, prompt.size(1) + 1)
        reference = model.new_cache(1, kind="static", max_seq_len=16)
        model(prompt[:1], reference)
        torch.testing.assert_close(step, model(token, reference)[:, -1], rtol=0, atol=1e-5)


# -- the cache's own operations ---------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("kind", ["dynamic", "static", "sliding"])
def test_reorder_and_crop(kind):
    model = mla_model(window=8 if kind == "sliding" else None)
    V = model.config.vocab_size
    torch.manual_seed(1)
    x = torch.randint(0, V, (3, 13))
    index = torch.tensor([1, 1, 0, 2])
    cache = model.new_cache(3, kind=kind)
    model(x[:, :12], cache)
    cache.reorder(index)
    reference = model.new_cache(4, kind=kind)
    model(x[index, :12], reference)
    torch.testing.assert_close(model(x[index, 12:], cache), model(x[index, 12:], reference))

    cache = model.new_cache(3, kind=kind)
    model(x[:, :9], cache)
    saved = cache.save(9, 4)
    model(torch.randint(0, V, (3, 4)), cache)
    cache.crop(9, saved)
    reference = model.new_cache(3, kind=kind)
    model(x[:, :9], reference)
    torch.testing.assert_close(model(x[:, 9:], cache), model(x[:, 9:], reference))


def test_layer_cache_types():
    model = mla_model(window=8)
    types = {"dynamic": LatentDynamicLayerCache, "static": LatentStaticLayerCache,
             "sliding": LatentSlidingWindowLayerCache}
    for kind, cls in types.items():
        cache = model.new_cache(1, kind=kind)
        assert type(cache.layers[0]) is cls and cache.latent


# -- refusals ---------------------------------------------------------------------------------

BASE = dict(vocab_size=50, max_seq_len=16, d_model=32, n_layers=1, n_heads=4, pos="rope")


@pytest.mark.parametrize("overrides, field", [
    (dict(attention="latent"), "attention"),
    (dict(attention="mla"), "kv_latent_dim"),
    (dict(attention="mla", kv_latent_dim=0), "kv_latent_dim"),
    (dict(attention="mla", kv_latent_dim=8.0), "kv_latent_dim"),
    (dict(attention="mla", kv_latent_dim=8, rope_head_dim=3), "rope_head_dim"),
    (dict(attention="mla", kv_latent_dim=8, rope_head_dim=0), "rope_head_dim"),
    (dict(attention="mla", kv_latent_dim=8, rope_head_dim=4, pos="learned"), "rope_head_dim"),
    (dict(attention="mla", kv_latent_dim=8, n_kv_heads=2), "n_kv_heads"),
    (dict(kv_latent_dim=8), "kv_latent_dim"),
    (dict(rope_head_dim=4), "rope_head_dim"),
])
def test_bad_configs_are_refused_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        kvlab.GPTConfig(**{**BASE, **overrides})


def test_derived_rope_head_dim_and_round_trip():
    c = kvlab.GPTConfig(**BASE, attention="mla", kv_latent_dim=8)
    assert c.rope_head_dim == 4 and c.n_kv_heads == 4
    assert kvlab.GPTConfig(**c.to_dict()) == c
    learned = kvlab.GPTConfig(**{**BASE, "pos": "learned"}, attention="mla", kv_latent_dim=8)
    assert learned.rope_head_dim == 0


def test_what_mla_does_not_do_is_refused():
    model = mla_model()
    with pytest.raises(ValueError, match="quantize"):
        model.new_cache(1, quantize="int8")
    with pytest.raises(ValueError, match="attention='mla'"):
        kvlab.generate_batch(model, [[1, 2, 3]], 2)
    with pytest.raises(ValueError, match="form"):
        set_mla_form(model, "fast")
    with pytest.raises(ValueError, match="no latent attention"):
        set_mla_form(make_model("gpt2"), "naive")
    with pytest.raises(ValueError, match="kv_latent_dim"):
        latent_cache("static", n_layers=1, batch_size=1, kv_latent_dim=0, rope_head_dim=0, max_seq_len=4)


# -- saving and loading -----------------------------------------------------------------------


@torch.no_grad()
def test_save_and_load_round_trip(tmp_path):
    from kvlab.train import export_model, load_checkpoint, save_checkpoint

    model = mla_model()
    x = torch.randint(0, model.config.vocab_size, (1, 9))
    expected = model(x)
    loaded = load_checkpoint(save_checkpoint(tmp_path / "ckpt.safetensors", model))["model"].eval()
    assert loaded.config == model.config and loaded.config.attention == "mla"
    torch.testing.assert_close(loaded(x), expected)

    tokenizer = kvlab.CharTokenizer([chr(32 + i) for i in range(model.config.vocab_size)])
    export_model(tmp_path / "exported", model, tokenizer, {"what": "a test"})
    again, _ = kvlab.load_shakespeare(tmp_path / "exported")
    torch.testing.assert_close(again(x), expected)
    half = model.half()
    export_model(tmp_path / "fp16", half, tokenizer, {"what": "float16 storage"})
    from_half, _ = kvlab.load_shakespeare(tmp_path / "fp16")
    assert from_half.dtype == torch.float32
    torch.testing.assert_close(from_half(x), expected, rtol=0, atol=0.1)


def test_rope_tables_fit_the_rope_part():
    model = mla_model()
    assert model.rope_dim == model.config.rope_head_dim == 4
    assert math.isclose(model.blocks[0].attn.scale, 1 / math.sqrt(8 + 4))
