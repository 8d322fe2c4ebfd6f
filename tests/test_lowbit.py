"""Low-bit caches (kvlab.lowbit, chapter 11, KIVI-style): codes pack and unpack losslessly, keys are
quantized per channel over a group of tokens and values per token, each within half a step; the
cache returns the newest tokens exactly and moves a group to low bits exactly when the formula says,
its bytes are the formula's, an 8-bit cache barely moves the model, and bad arguments are refused."""

import pytest
import torch

from kvlab.lowbit import (LOWBIT_BITS, LowBitLayerCache, dequantize, lowbit_bytes_per_token, lowbit_cache,
                          pack_codes, quantize_per_channel, quantize_per_token, unpack_codes)
from kvlab.quantized import group_size
from conftest import make_model

TINY = dict(vocab_size=61, max_seq_len=64)


def within_half_a_step(x, back, step_per_element):
    """Every element of `back` within half its own (float16-stored) step of `x`, up to float32 rounding."""
    err = (back - x).abs()
    bound = step_per_element.float() / 2 * (1 + 1e-4) + 1e-6
    return bool((err <= bound).all()), float((err / (step_per_element.float() / 2)).max())


# -- codes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", LOWBIT_BITS)
def test_pack_and_unpack_round_trip(bits):
    codes = torch.randint(0, 2 ** bits, (2, 3, 5, 16), generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    codes[0, 0, 0] = 2 ** bits - 1  # the largest code, every bit set
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 5, 16 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


# -- the two quantizers ----------------------------------------------------------------------------

@pytest.mark.parametrize("bits", LOWBIT_BITS)
def test_per_channel_statistics_are_taken_over_the_tokens(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 8, generator=g) * 3  # (B, Hkv, G tokens, D channels)
    x[..., 5] = x[..., 5] * 40 + 50  # an outlier channel: large in every token
    codes, lo, step = quantize_per_channel(x, bits)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert lo.shape == step.shape == (2, 3, 1, 8) and lo.dtype == step.dtype == torch.float16
    # Each channel's own minimum and range over the 16 tokens, and both ends of its codes used.
    torch.testing.assert_close(lo.float(), x.amin(dim=-2, keepdim=True), rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(step.float(), (x.amax(-2, keepdim=True) - x.amin(-2, keepdim=True)) / (2 ** bits - 1),
                               rtol=3e-3, atol=0)
    assert bool((codes.amin(dim=-2) == 0).all()) and bool((codes.amax(dim=-2) == 2 ** bits - 1).all())
    ok, worst = within_half_a_step(x, dequantize(codes, lo, step), step.expand_as(x))
    assert ok, f"error up to {worst:.3f} half-steps"
    # The outlier coarsens its own channel only.
    others = torch.cat([step[..., :5], step[..., 6:]], dim=-1).float()
    assert float(others.max()) < 0.1 * float(step[..., 5].float().min())


@pytest.mark.parametrize("bits", LOWBIT_BITS)
def test_per_token_statistics_are_taken_per_group_of_channels(bits):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 64, generator=g) * 3  # D=64: two groups of 32 channels
    x[..., 3] += 100  # an outlier in the first group
    codes, lo, step = quantize_per_token(x, bits)
    assert group_size(64) == 32 and codes.shape == x.shape and codes.dtype == torch.uint8
    assert lo.shape == step.shape == (2, 3, 5, 2) and lo.dtype == step.dtype == torch.float16
    grouped = x.unflatten(-1, (2, 32))
    torch.testing.assert_close(lo.float(), grouped.amin(-1), rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(step.float(), (grouped.amax(-1) - grouped.amin(-1)) / (2 ** bits - 1), rtol=3e-3, atol=0)
    ok, worst = within_half_a_step(x, dequantize(codes, lo, step), step.repeat_interleave(32, dim=-1))
    assert ok, f"error up to {worst:.3f} half-steps"
    assert float(step[..., 1].float().max()) < 0.25 * float(step[..., 0].float().min())  # group 1 keeps a fine step
    # D=8 is one group, D=48 three of 16.
    assert quantize_per_token(x[..., :8], bits)[1].shape == (2, 3, 5, 1)
    assert quantize_per_token(x[..., :48], bits)[1].shape == (2, 3, 5, 3)


@pytest.mark.parametrize("quantize", [quantize_per_channel, quantize_per_token])
@pytest.mark.parametrize("bits", LOWBIT_BITS)
def test_half_a_step_holds_for_numbers_far_from_zero(quantize, bits):
    """Key channels that are large in every token are the reason for per-channel keys; their minimum,
    stored as float16, must not move by more than the step (chapter 10's int8 rounds the minimum down
    and the step up to float16 for this reason)."""
    x = 20 + torch.rand(2, 3, 16, 8, generator=torch.Generator().manual_seed(2)) * 0.5
    codes, lo, step = quantize(x, bits)
    ok, worst = within_half_a_step(x, dequantize(codes, lo, step), step.expand_as(x))  # D=8: one group per token
    assert ok, f"error up to {worst:.2f} half-steps"


def test_dequantize_reads_both_layouts():
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (2, 4, 64), generator=g).to(torch.uint8)
    # Per channel: one (lo, step) per channel, shared by the 4 tokens.
    lo, step = torch.randn(2, 1, 64, generator=g).half(), torch.rand(2, 1, 64, generator=g).half()
    expected = codes.float() * step.float() + lo.float()
    assert torch.equal(dequantize(codes, lo, step), expected)
    # Per token, two groups of 32 channels: a pair per token and group.
    lo, step = torch.randn(2, 4, 2, generator=g).half(), torch.rand(2, 4, 2, generator=g).half()
    expected = codes.float() * step.float().repeat_interleave(32, -1) + lo.float().repeat_interleave(32, -1)
    assert torch.equal(dequantize(codes, lo, step), expected)
    # Per token, one group: a pair per token.
    lo, step = lo[..., :1], step[..., :1]
    assert torch.equal(dequantize(codes, lo, step), codes.float() * step.float() + lo.float())
    assert dequantize(codes, lo, step, torch.float16).dtype == torch.float16


@pytest.mark.parametrize("quantize", [quantize_per_channel, quantize_per_token])
def test_a_constant_comes_back_exactly(quantize):
    x = torch.full((2, 4, 8), 3.0)  # a zero range gets step 1: no 0/0 on the way to the codes
    codes, lo, step = quantize(x, 2)
    assert bool((step == 1).all()) and torch.equal(dequantize(codes, lo, step), x)


# -- the layer cache -------------------------------------------------------------------------------

@pytest.mark.parametrize("bits, D", [(2, 8), (4, 8), (8, 8), (4, 64)])
def test_the_cache_keeps_the_newest_exact_and_the_rest_quantized(bits, D):
    B, H, G, R = 2, 2, 4, 3
    g = torch.Generator().manual_seed(bits + D)
    layer = LowBitLayerCache(bits, group=G, residual=R)
    fed_k, fed_v, n = [], [], 0
    for T in [5, 1, 1, 1, 6, 1, 1, 2, 1, 9, 1]:
        k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
        pos = torch.arange(n, n + T)
        assert layer.key_positions(pos).tolist() == list(range(n + T))
        k_all, v_all = layer.update(k, v, pos)
        fed_k.append(k)
        fed_v.append(v)
        n += T
        keys, values = torch.cat(fed_k, dim=2), torch.cat(fed_v, dim=2)
        n_groups = max(0, (n - R) // G)  # a group moves once residual + group tokens are exact
        exact = n - n_groups * G
        assert len(layer.groups) == n_groups and layer.length == n, n
        assert R <= exact <= R + G - 1 or n < R
        assert k_all.shape == v_all.shape == (B, H, n, D)
        assert torch.equal(k_all[:, :, n - exact:], keys[:, :, n - exact:])
        assert torch.equal(v_all[:, :, n - exact:], values[:, :, n - exact:])
        for i in range(n_groups):
            span = slice(i * G, (i + 1) * G)
            kc, klo, kstep = quantize_per_channel(keys[:, :, span], bits)
            vc, vlo, vstep = quantize_per_token(values[:, :, span], bits)
            assert torch.equal(k_all[:, :, span], dequantize(kc, klo, kstep))
            assert torch.equal(v_all[:, :, span], dequantize(vc, vlo, vstep))
            assert within_half_a_step(keys[:, :, span], k_all[:, :, span], kstep.expand(B, H, G, D))[0]
            assert within_half_a_step(values[:, :, span], v_all[:, :, span],
                                      vstep.repeat_interleave(D // vstep.size(-1), dim=-1))[0]
        # Bytes: the formula for every quantized token, float32 for the exact ones.
        assert layer.nbytes == B * n_groups * G * lowbit_bytes_per_token(H, D, bits, G) + 2 * B * H * exact * D * 4
    assert n_groups >= 5
    layer.reset()
    assert layer.length == 0 and layer.groups == [] and layer.nbytes == 0


def test_bytes_per_token_by_hand():
    # 2 heads of 64 at 4 bits, groups of 32 tokens: keys 32 code bytes + 2·2·64/32 of statistics, values 32 + 2·2·2.
    assert lowbit_bytes_per_token(2, 64, 4, 32) == 2 * ((32 + 8) + (32 + 8))
    # 1 head of 8 at 2 bits, groups of 4: keys 2 + 4·8/4, values 2 + 4.
    assert lowbit_bytes_per_token(1, 8, 2, 4) == (2 + 8) + (2 + 4)


# -- through a model -------------------------------------------------------------------------------

@torch.no_grad()
def teacher_forced(model, x, cache, prefill):
    out = [model(x[:, :prefill], cache)]
    out += [model(x[:, t:t + 1], cache) for t in range(prefill, x.size(1))]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("style", ["modern", "gpt2"])
def test_an_8_bit_cache_barely_moves_the_model(style):
    model = make_model(style, seed=0, **TINY)
    x = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x)
    results = {}
    for bits in (8, 2):
        cache = lowbit_cache(model, 2, bits, group=4, residual=4)
        results[bits] = teacher_forced(model, x, cache, prefill=10)
        assert len(cache.layers[0].groups) == (40 - 4) // 4
    assert torch.equal(results[8].argmax(-1), full.argmax(-1))
    assert float((results[8] - full).abs().max()) < 0.1 * float((results[2] - full).abs().max())
    # With every token kept exact, nothing changes at all.
    exact = teacher_forced(model, x, lowbit_cache(model, 2, 2, group=4, residual=40), prefill=10)
    torch.testing.assert_close(exact, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style", ["modern", "gpt2"])
def test_the_cache_holds_copies_not_views(style):
    """What the cache holds is what nbytes counts: no exact tokens kept as a view into the layer's fused
    q/k/v output (which would keep the queries alive) or into a tensor whose oldest group has moved on."""
    model = make_model(style, seed=0, **TINY)
    cache = lowbit_cache(model, 2, 4, group=4, residual=4)
    x = torch.randint(0, 61, (2, 14), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model(x[:, :6], cache)  # nothing quantized yet: all exact
        for layer in cache.layers:
            assert layer.k_exact.untyped_storage().nbytes() + layer.v_exact.untyped_storage().nbytes() == layer.nbytes
        for t in range(6, 14):
            model(x[:, t:t + 1], cache)
    for layer in cache.layers:
        assert len(layer.groups) == 2
        held = sum(t.untyped_storage().nbytes() for g in layer.groups for t in g.values())
        held += layer.k_exact.untyped_storage().nbytes() + layer.v_exact.untyped_storage().nbytes()
        assert held == layer.nbytes


def test_bad_arguments_are_refused_by_name():
    model = make_model("modern", seed=0, **TINY)
    for call, name in [(lambda: lowbit_cache(model, 2, 3), "bits"),
                       (lambda: lowbit_cache(model, 2, 4, group=0), "group"),
                       (lambda: lowbit_cache(model, 2, 4, residual=0), "residual"),
                       (lambda: lowbit_cache(model, 0, 4), "batch_size"),
                       (lambda: LowBitLayerCache(16), "bits"),
                       (lambda: quantize_per_channel(torch.zeros(4, 8), 3), "bits"),
                       (lambda: quantize_per_token(torch.zeros(4, 8), 1), "bits")]:
        with pytest.raises(ValueError, match=name):
            call()
    with pytest.raises(TypeError, match="group"):
        lowbit_cache(model, 2, 4, group=2.0)
    mla = make_model("modern", seed=0, attention="mla", kv_latent_dim=12, n_kv_heads=None, **TINY)
    with pytest.raises(ValueError, match="mla"):
        lowbit_cache(mla, 2, 4)
