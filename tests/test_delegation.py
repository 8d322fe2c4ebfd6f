"""Every check of a re-implement or build exercise refuses an answer that calls kvlab's own version.

A check is the course's promise that the learner wrote the piece. Each case below is the answer a
learner could write in one line by calling the library (or the check's own reference); the check
must fail it with the "without kvlab's ..." message, and the library must work again afterwards.
"""

from __future__ import annotations

import pytest
import torch

import kvlab
from kvlab import checks
from kvlab.course.checks import _common
from kvlab.course.checks import attention as attention_checks
from kvlab.course.checks import beyond as beyond_checks
from kvlab.course.checks import smaller as smaller_checks
from kvlab.course.checks import tokens as token_checks
from kvlab.train import TrainConfig, lr_at


def delegate_mha(x, w_qkv, w_out, n_heads):
    C = x.size(-1)
    layer = kvlab.SelfAttention(C, n_heads, bias=False)
    with torch.no_grad():
        layer.qkv.weight.copy_(w_qkv)
        layer.out.weight.copy_(w_out)
    return layer(x, is_causal=True)


def delegate_lr(step, warmup, max_steps, lr, min_lr):
    return lr_at(step, TrainConfig(warmup_steps=warmup, max_steps=max_steps, lr=lr, min_lr=min_lr))


def delegate_kv_bytes(config, seq_len, batch_size, bytes_per_element):
    dtype = {1: torch.int8, 2: torch.float16, 4: torch.float32, 8: torch.float64}[bytes_per_element]
    return kvlab.kv_cache_bytes(config.n_layers, config.n_kv_heads, config.head_dim, seq_len, batch_size, dtype)


def delegate_layer_step(block, x, input_pos, layer_cache, cross_kv, pad_mask):
    mask = kvlab.attention_mask(input_pos, layer_cache.key_positions(input_pos))
    return block(x, cross_kv, mask=mask, cross_mask=pad_mask[:, None, None, :], cache=layer_cache, input_pos=input_pos)


def delegate_decoder_step(model, tgt, input_pos, self_cache, cross_kv, pad_mask):
    cross = kvlab.seq2seq.CrossAttentionCache(cross_kv, pad_mask[:, None, None, :])
    return model.decode(tgt, cache=kvlab.seq2seq.EncoderDecoderCache(self_cache, cross), input_pos=int(input_pos[0]))


def delegate_greedy_round(target, cache, tokens, guesses):  # right, but rolls back with kvlab's rollback_cache
    L = len(tokens)
    best = target(torch.tensor([[tokens[-1]] + guesses]), cache, input_pos=L - 1)[0].argmax(-1).tolist()
    n = 0
    while n < len(guesses) and guesses[n] == best[n]:
        n += 1
    kvlab.speculative.rollback_cache(cache, L + n)
    return guesses[:n] + [best[n]]


def delegate_greedy_round_generate(target, cache, tokens, guesses):  # kvlab's whole speculative decoder
    draft = kvlab.speculative.NGramDraft(1)
    draft.propose = lambda text, k: list(guesses)[:k]
    out = kvlab.speculative.speculative_generate(target, draft, torch.tensor([tokens]), len(guesses) + 1,
                                                 k=max(len(guesses), 1), temperature=0)
    return out[0, len(tokens):].tolist()


def delegate_greedy_round_keep(target, cache, tokens, guesses):  # kvlab's greedy rule, the cache's own crop
    L = len(tokens)
    logits = target(torch.tensor([[tokens[-1]] + guesses]), cache, input_pos=L - 1)[0]
    n, nxt = kvlab.speculative.keep_greedy(logits, guesses)
    cache.crop(L + n)
    return guesses[:n] + [nxt]


def delegate_accept_sampled(p, q, guesses, generator):  # kvlab's sampler on stand-in models
    model = kvlab.GPT(kvlab.GPTConfig(vocab_size=p.size(-1), max_seq_len=8, d_model=8, n_layers=1, n_heads=1))
    out = kvlab.speculative.speculative_generate(model, model, torch.tensor([[0]]), 1, k=max(len(guesses), 1),
                                                 generator=generator)
    return 0, int(out[0, -1])


def hand_dequantize(q, step, low):
    return ((q.float().unflatten(-1, (step.size(-1), -1)) + 128) * step.float()[..., None]
            + low.float()[..., None]).flatten(-2)


def delegate_mla_absorbed(q_nope, q_rope, latent, k_rope, w_uk, w_uv, scale, mask):  # kvlab's absorbed form
    H, Dn, Dc = w_uk.shape
    layer = kvlab.MultiHeadLatentAttention(H * Dn, H, Dc, q_rope.size(-1), bias=False)
    with torch.no_grad():
        layer.k_up.weight.copy_(w_uk.reshape(H * Dn, Dc))
        layer.v_up.weight.copy_(w_uv.reshape(H * Dn, Dc))
    return layer.attend_absorbed(q_nope, q_rope, latent, k_rope, mask)[0]


def delegate_h2o(attn, budget, n_sinks, recent):  # the replay around kvlab's victim rule
    kept, scores, out = [], torch.zeros(0), []
    for t in range(attn.size(0)):
        kept.append(t)
        scores = torch.cat([scores, torch.zeros(1)])
        victim = -1
        if len(kept) > budget:
            i = int(kvlab.eviction.heavy_hitter_victim(scores[None], n_sinks, recent)[0])
            victim = kept.pop(i)
            scores = torch.cat([scores[:i], scores[i + 1:]])
        scores += attn[t, kept]
        out.append(victim)
    return out


DELEGATING = {  # check -> an answer that only calls kvlab
    "check_bpe_encode": (checks.check_bpe_encode, lambda text, merges: token_checks._encode(text, merges)),
    "check_multi_head_attention": (checks.check_multi_head_attention, delegate_mha),
    "check_multi_head_attention (the check's own reference)": (
        checks.check_multi_head_attention, lambda x, w_qkv, w_out, H: attention_checks._reference_mha(x, w_qkv, w_out, H)),
    "check_apply_rope": (checks.check_apply_rope, lambda x, positions, base: kvlab.attention.apply_rope(
        x, *kvlab.layers.rope_cos_sin(positions, x.size(-1), base))),
    "check_kv_cache_bytes": (checks.check_kv_cache_bytes, delegate_kv_bytes),
    "check_concat_cache": (checks.check_concat_cache, kvlab.cache.DynamicLayerCache),
    "check_modern_forward": (checks.check_modern_forward,
                             lambda model, idx, cache, input_pos: model(idx, cache, input_pos)),
    "check_lr_at": (checks.check_lr_at, delegate_lr),
    "check_top_p_filter": (checks.check_top_p_filter, kvlab.sampling.top_p_filter),
    "check_greedy_decode": (checks.check_greedy_decode,
                            lambda model, src, n: kvlab.seq2seq.greedy_decode(model, src, n)),
    "check_greedy_decode (through beam search)": (
        checks.check_greedy_decode, lambda model, src, n: kvlab.beam_search(model, src, n, num_beams=1)),
    "check_project_memory": (checks.check_project_memory,
                             lambda model, memory: [b.cross_attn.project_memory(memory) for b in model.decoder]),
    "check_project_memory (through the library's cross cache)": (
        checks.check_project_memory, lambda model, memory: kvlab.seq2seq.CrossAttentionCache.from_memory(
            model.decoder, memory, torch.ones(memory.shape[:2], dtype=torch.bool)).kv),
    "check_decoder_layer_step": (checks.check_decoder_layer_step, delegate_layer_step),
    "check_decoder_step": (checks.check_decoder_step, delegate_decoder_step),
    "check_greedy_by_hand": (checks.check_greedy_by_hand,
                             lambda model, src, n: kvlab.seq2seq.greedy_decode(model, src, n)),
    "check_reorder_cache": (checks.check_reorder_cache, kvlab.beam.reorder_cache),
    "check_greedy_round (kvlab's rollback)": (beyond_checks.check_greedy_round, delegate_greedy_round),
    "check_greedy_round (kvlab's speculative_generate)": (beyond_checks.check_greedy_round,
                                                          delegate_greedy_round_generate),
    "check_accept_sampled": (beyond_checks.check_accept_sampled, delegate_accept_sampled),
    "check_accept_sampled (kvlab's keep_sampled)": (beyond_checks.check_accept_sampled,
                                                    lambda p, q, guesses, generator: kvlab.speculative.keep_sampled(
                                                        p, list(q), guesses, generator)),
    "check_greedy_round (kvlab's keep_greedy)": (beyond_checks.check_greedy_round, delegate_greedy_round_keep),
    "check_int8_quantizer": (lambda pair: beyond_checks.check_int8_quantizer(*pair),
                             (kvlab.quantized.quantize_int8, kvlab.quantized.dequantize_int8)),
    "check_mla_absorbed": (smaller_checks.check_mla_absorbed, delegate_mla_absorbed),
    "check_h2o_evictions": (smaller_checks.check_h2o_evictions, delegate_h2o),
    "check_h2o_evictions (the check's own reference)": (smaller_checks.check_h2o_evictions,
                                                        smaller_checks.h2o_reference),
    "check_mla_absorbed (the check's own reference)": (smaller_checks.check_mla_absorbed,
                                                       smaller_checks.mla_naive_reference),
    "check_key_quantizer": (smaller_checks.check_key_quantizer, kvlab.lowbit.quantize_per_channel),
    "check_int8_quantizer (kvlab's quantizer, a hand dequantizer)": (
        lambda pair: beyond_checks.check_int8_quantizer(*pair), (kvlab.quantized.quantize_int8, hand_dequantize)),
}


@pytest.mark.parametrize("case", list(DELEGATING))
def test_check_refuses_an_answer_that_calls_kvlab(case):
    check, answer = DELEGATING[case]
    with pytest.raises(AssertionError, match="without kvlab's"):
        check(answer)
    assert not _common._REFUSALS  # every switch is back on
    # ...and the library works again: the same call outside the check.
    model = kvlab.GPT(kvlab.GPTConfig.from_preset("tiny")).eval()
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 256)


def test_without_kvlab_switches_every_name_and_restores():
    from kvlab.attention import apply_rope  # a name bound before the block, as a learner's import is

    x, cos, sin = torch.randn(1, 1, 2, 4), torch.ones(2, 4), torch.zeros(2, 4)
    with _common.without_kvlab("rotation", kvlab.attention.apply_rope):
        for call in (apply_rope, kvlab.attention.apply_rope):
            with pytest.raises(_common.DelegationRefused, match="without kvlab's rotation"):
                call(x, cos, sin)
    torch.testing.assert_close(apply_rope(x, cos, sin), x)


def test_without_kvlab_restores_after_a_failure():
    with pytest.raises(RuntimeError):
        with _common.without_kvlab("forward", kvlab.GPT.forward):
            raise RuntimeError("the learner's bug")
    model = kvlab.GPT(kvlab.GPTConfig.from_preset("tiny")).eval()
    assert model(torch.tensor([[1]])).shape == (1, 1, 256)


def test_without_kvlab_refuses_what_it_cannot_switch():
    with pytest.raises(TypeError, match="Python functions"):
        with _common.without_kvlab("torch", torch.matmul):
            pass
