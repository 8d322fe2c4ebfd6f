"""Chapter 11's exercise checks: they pass right answers and catch the stub and plausible mistakes."""

import math

import pytest
import torch

import kvlab
from kvlab.course.checks.smaller import (SINK_SETUP, check_h2o_evictions, check_key_quantizer, check_mla_absorbed,
                                         check_sink_rotation, check_v2_bytes_per_token, h2o_reference,
                                         mla_naive_reference, sink_rotation_measured)


def stub(*args, **kwargs):
    raise NotImplementedError  # your code here


def assert_fails(check, answer, *words):
    with pytest.raises(AssertionError) as err:
        check(answer)
    for word in words:
        assert word in str(err.value), str(err.value)


def assert_not_done(check, answer, capsys):
    check(answer)
    assert "not done yet" in capsys.readouterr().out


# --------------------------------------------------------------------------- absorbed MLA


def mla_solution(q_nope, q_rope, latent, k_rope, w_uk, w_uv, scale, mask):
    scores = ((q_nope @ w_uk) @ latent.transpose(-2, -1) + q_rope @ k_rope.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ latent) @ w_uv.transpose(-2, -1)


def mla_values_first(q_nope, q_rope, latent, k_rope, w_uk, w_uv, scale, mask):  # also right: one einsum for the
    # weighted sum of latents and W_uv, which never makes a (.., S, Dn) tensor either
    weights = ((q_nope @ w_uk) @ latent.transpose(-2, -1) + q_rope @ k_rope.transpose(-2, -1)) * scale
    if mask is not None:
        weights = weights.masked_fill(~mask, float("-inf"))
    weights = weights.softmax(-1)
    return torch.einsum("bhts,bsc,hdc->bhtd", weights, latent[:, 0], w_uv)


def mla_naive(q_nope, q_rope, latent, k_rope, w_uk, w_uv, scale, mask):  # right numbers, the naive form
    k = torch.einsum("bsc,hdc->bhsd", latent[:, 0], w_uk)
    v = torch.einsum("bsc,hdc->bhsd", latent[:, 0], w_uv)
    k = torch.cat([k, k_rope.expand(-1, k.size(1), -1, -1)], dim=-1)
    scores = torch.cat([q_nope, q_rope], dim=-1) @ k.transpose(-2, -1) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def mla_no_mask(q_nope, q_rope, latent, k_rope, w_uk, w_uv, scale, mask):
    return mla_solution(q_nope, q_rope, latent, k_rope, w_uk, w_uv, scale, None)


def mla_latent_scale(q_nope, q_rope, latent, k_rope, w_uk, w_uv, scale, mask):
    return mla_solution(q_nope, q_rope, latent, k_rope, w_uk, w_uv, 1 / math.sqrt(latent.size(-1) + k_rope.size(-1)),
                        mask)


def mla_no_rope(q_nope, q_rope, latent, k_rope, w_uk, w_uv, scale, mask):
    return mla_solution(q_nope, torch.zeros_like(q_rope), latent, k_rope, w_uk, w_uv, scale, mask)


def mla_uk_for_values(q_nope, q_rope, latent, k_rope, w_uk, w_uv, scale, mask):
    return mla_solution(q_nope, q_rope, latent, k_rope, w_uk, w_uk, scale, mask)


def test_mla_check_passes_solutions(capsys):
    check_mla_absorbed(mla_solution)
    check_mla_absorbed(mla_values_first)
    assert capsys.readouterr().out.count("✓") == 2


def test_mla_check_not_done(capsys):
    assert_not_done(check_mla_absorbed, stub, capsys)


@pytest.mark.parametrize("wrong,words", [
    (mla_naive, ["naive form"]),
    (mla_no_mask, ["mask was ignored"]),
    (mla_latent_scale, ["1/sqrt(Dc + Dr)"]),
    (mla_no_rope, ["wrong values"]),
    (mla_uk_for_values, ["wrong values"]),
])
def test_mla_check_catches(wrong, words):
    assert_fails(check_mla_absorbed, wrong, *words)


def test_mla_reference_is_the_library_layer():
    """The check's written-out reference gives kvlab's naive form on a real layer's weights."""
    torch.manual_seed(0)
    layer = kvlab.MultiHeadLatentAttention(24, 3, 12, 4, bias=False)
    q_nope, q_rope = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 4)
    latent, k_rope = torch.randn(2, 1, 9, 12), torch.randn(2, 1, 9, 4)
    mask = torch.arange(9)[None, :] <= torch.arange(5, 9)[:, None]
    theirs, _ = layer.attend_naive(q_nope, q_rope, latent, k_rope, mask)
    ours = mla_naive_reference(q_nope, q_rope, latent, k_rope, layer.k_up.weight.view(3, 8, 12),
                               layer.v_up.weight.view(3, 8, 12), layer.scale, mask)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- heavy hitters


def h2o_solution(attn, budget, n_sinks, recent):
    kept, scores, out = [], {}, []
    for t in range(attn.size(0)):
        kept.append(t)
        scores[t] = 0.0
        victim = -1
        if len(kept) > budget:
            victim = min(kept[n_sinks:len(kept) - recent], key=lambda j: (scores[j], j))
            kept.remove(victim)
        for j in kept:
            scores[j] += float(attn[t, j])
        out.append(victim)
    return out


def h2o_variant(add_first=False, slot=False, recent_override=None, last_row=False, evict_max=False):
    def answer(attn, budget, n_sinks, recent):
        r = recent if recent_override is None else recent_override
        kept, scores, out = [], {}, []
        for t in range(attn.size(0)):
            kept.append(t)
            scores[t] = 0.0
            victim = -1
            if add_first:
                for j in kept:
                    scores[j] += float(attn[t, j])
            if len(kept) > budget:
                candidates = kept[n_sinks:len(kept) - r] if r else kept[n_sinks:]
                if last_row:
                    chosen = min(candidates, key=lambda j: (float(attn[t - 1, j]), j))
                elif evict_max:
                    chosen = max(candidates, key=lambda j: (scores[j], -j))
                else:
                    chosen = min(candidates, key=lambda j: (scores[j], j))
                victim = kept.index(chosen) if slot else chosen
                kept.remove(chosen)
            if not add_first:
                for j in kept:
                    scores[j] += float(attn[t, j])
            out.append(victim)
        return out
    return answer


def test_h2o_check_passes_solution_and_reference(capsys):
    check_h2o_evictions(h2o_solution)
    check_h2o_evictions(lambda *args: torch.tensor(h2o_solution(*args)))  # a tensor answer is fine too
    assert capsys.readouterr().out.count("✓") == 2


def test_h2o_solution_is_the_reference():
    from kvlab.course.checks.smaller import _recorded_maps
    for attn in _recorded_maps():
        assert h2o_solution(attn, 9, 1, 3) == h2o_reference(attn, 9, 1, 3)


def test_h2o_check_not_done(capsys):
    assert_not_done(check_h2o_evictions, stub, capsys)


@pytest.mark.parametrize("wrong,words", [
    (h2o_variant(add_first=True), ["added only after"]),
    (h2o_variant(slot=True), ["place in the cache"]),
    (h2o_variant(recent_override=0), ["newest"]),
    (h2o_variant(last_row=True), ["the reference evicts"]),
    (h2o_variant(evict_max=True), ["the reference evicts"]),
    (lambda attn, budget, n_sinks, recent: [-1] * attn.size(0), ["the reference evicts"]),
    (lambda attn, budget, n_sinks, recent: [-1] * 3, ["one entry per step"]),
])
def test_h2o_check_catches(wrong, words):
    assert_fails(check_h2o_evictions, wrong, *words)


def test_h2o_reference_matches_the_library_victim_rule():
    """Replaying the map with kvlab.eviction.heavy_hitter_victim on the scores gives the reference's choices."""
    g = torch.Generator().manual_seed(3)
    attn = torch.rand(30, 30, generator=g).tril()
    kept, scores, out = [], torch.zeros(0), []
    for t in range(30):
        kept.append(t)
        scores = torch.cat([scores, torch.zeros(1)])
        victim = -1
        if len(kept) > 10:
            i = int(kvlab.eviction.heavy_hitter_victim(scores[None], 2, 3)[0])
            victim = kept.pop(i)
            scores = torch.cat([scores[:i], scores[i + 1:]])
        scores += attn[t, kept]
        out.append(victim)
    assert out == h2o_reference(attn, 10, 2, 3)


# --------------------------------------------------------------------------- the key quantizer


def keys_solution(k, bits):
    lo = k.amin(-2, keepdim=True)
    step = (k.amax(-2, keepdim=True) - lo) / (2 ** bits - 1)
    step = torch.where(step > 0, step, torch.ones_like(step))
    lo, step = lo.half(), step.half()
    return ((k - lo.float()) / step.float()).round().clamp(0, 2 ** bits - 1).to(torch.uint8), lo, step


def keys_variant(per_token=False, floor=False, levels=False, zero_step=False, whole=False):
    def answer(k, bits):
        dim = -1 if per_token else -2
        lo, hi = k.amin(dim, keepdim=True), k.amax(dim, keepdim=True)
        if whole:
            lo, hi = k.amin().expand_as(lo), k.amax().expand_as(hi)
        step = (hi - lo) / (2 ** bits if levels else 2 ** bits - 1)
        if not zero_step:
            step = torch.where(step > 0, step, torch.ones_like(step))
        lo, step = lo.half(), step.half()
        q = (k - lo.float()) / step.float()
        q = q.floor() if floor else q.round()
        return q.clamp(0, 2 ** bits - 1).to(torch.uint8), lo, step
    return answer


def test_key_check_passes_solution_and_library_shapes(capsys):
    check_key_quantizer(keys_solution)
    assert "✓" in capsys.readouterr().out


def test_key_check_not_done(capsys):
    assert_not_done(check_key_quantizer, stub, capsys)


@pytest.mark.parametrize("wrong,words", [
    (keys_variant(per_token=True), ["one per token"]),
    (keys_variant(floor=True), ["rounded down"]),
    (keys_variant(levels=True), ["steps"]),
    (keys_variant(zero_step=True), ["constant channel"]),
    (keys_variant(whole=True), ["coarser"]),
    (lambda k, bits: keys_solution(k, bits)[0], ["three tensors"]),
    (lambda k, bits: tuple(t.float() for t in keys_solution(k, bits)), ["uint8"]),
])
def test_key_check_catches(wrong, words):
    assert_fails(check_key_quantizer, wrong, *words)


# --------------------------------------------------------------------------- the reason exercises


def test_v2_bytes(capsys):
    check_v2_bytes_per_token(60 * 576 * 2)
    assert "✓" in capsys.readouterr().out
    assert_not_done(check_v2_bytes_per_token, None, capsys)


@pytest.mark.parametrize("wrong,words", [
    (60 * 576, ["not bytes"]), (60 * 512 * 2, ["RoPE key"]), (2 * 60 * 576 * 2, ["twice"]),
    (60 * (512 + 128 * 64) * 2, ["shared by all heads"]), (60 * 2 * 128 * 128 * 2, ["multi-head"]),
    (12345, ["not MLA's bytes"]), ("69120", ["number of bytes"]),
])
def test_v2_bytes_catches(wrong, words):
    assert_fails(check_v2_bytes_per_token, wrong, *words)


def test_sink_rotation(capsys):
    truth = sink_rotation_measured()
    assert truth == SINK_SETUP["query_pos"] - SINK_SETUP["budget"] + 1
    check_sink_rotation(truth)
    assert "✓" in capsys.readouterr().out
    assert_not_done(check_sink_rotation, None, capsys)


@pytest.mark.parametrize("offset,words", [(2, ["place the key is read at"]), (-1, ["off by one"]),
                                          (1, ["off by one"]), (None, ["renumbered too"]), (29, ["next to the query"]),
                                          (500, ["not the rotation"])])
def test_sink_rotation_catches(offset, words):
    truth = sink_rotation_measured()
    answer = 0 if offset is None else truth + offset
    assert_fails(check_sink_rotation, answer, *words)


# --------------------------------------------------------------------------- the experiment


def test_window_budget_passes_the_measured_answer_and_refuses_its_neighbours(capsys):
    from kvlab.course.checks.smaller import WINDOW_BUDGETS, check_window_budget, window_losses

    losses = window_losses(WINDOW_BUDGETS)
    within = [b for b in WINDOW_BUDGETS if losses[b] - losses["full"] <= losses["noise"]]
    assert within, f"no window budget within the seed noise: {losses}"  # the exercise needs an answer
    truth = min(within)
    check_window_budget(truth)
    assert "✓" in capsys.readouterr().out
    assert_not_done(check_window_budget, None, capsys)
    i = WINDOW_BUDGETS.index(truth)
    if i + 1 < len(WINDOW_BUDGETS):
        assert_fails(check_window_budget, WINDOW_BUDGETS[i + 1], "smaller budget")
    if i > 0:
        assert_fails(check_window_budget, WINDOW_BUDGETS[i - 1], "larger budget")
    assert_fails(check_window_budget, 40, "one of")
