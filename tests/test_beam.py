"""Beam search: equal to Hugging Face's on converted GPT-2 models, equal to greedy with one beam,
equal to a naive recompute-everything reference for seq2seq, and the cache reordered correctly."""

import math
import warnings

import pytest
import torch

import kvlab
from kvlab.beam import search, beam_search, beam_step_seq2seq, reorder_cache
from kvlab.course.checks._common import small_model
from kvlab.seq2seq import CrossAttentionCache, Seq2SeqConfig, Seq2SeqTransformer, greedy_decode

transformers = pytest.importorskip("transformers")


def hf_pair(V, L, C, H, seed, init=0.02, P=64):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=V, n_positions=P, n_embd=C, n_layer=L, n_head=H,
                                     initializer_range=init, bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    return hf, kvlab.from_hf_gpt2(hf).eval()


def hf_beams(hf, idx, N, K, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf.generate(idx, attention_mask=torch.ones_like(idx), num_beams=K, do_sample=False,
                           max_new_tokens=N, **kwargs)


# (vocab, layers, width, heads, init std, batch, prompt, new tokens, beams)
SHAPES = [
    (50, 2, 32, 4, 0.2, 1, 5, 10, 3),
    (97, 2, 64, 4, 0.2, 2, 7, 12, 4),
    (64, 3, 48, 4, 0.2, 3, 1, 16, 2),
    (50, 1, 32, 2, 0.02, 2, 4, 9, 5),  # GPT-2's own init: nearly flat distributions, close scores
    (40, 2, 32, 4, 0.2, 2, 3, 6, 1),
]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"V{s[0]}-B{s[5]}-T{s[6]}-N{s[7]}-K{s[8]}" for s in SHAPES])
def test_beam_search_equals_hugging_face(shape):
    V, L, C, H, init, B, T, N, K = shape
    hf, model = hf_pair(V, L, C, H, seed=0, init=init)
    idx = torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(1))
    expected = hf_beams(hf, idx, N, K, min_new_tokens=N, eos_token_id=None, pad_token_id=0)
    for kind in ("static", "dynamic", "sliding"):
        got = beam_search(model, idx, N, num_beams=K, cache_kind=kind)
        assert torch.equal(got, expected), (kind, got, expected)


@pytest.mark.parametrize("V, B, T, N, K, lp", [(12, 3, 3, 10, 3, 1.0), (10, 2, 2, 12, 4, 0.5),
                                               (16, 2, 4, 8, 2, 2.0), (8, 4, 1, 14, 3, -1.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_search_with_eos_and_length_penalty_equals_hugging_face(V, B, T, N, K, lp, seed):
    hf, model = hf_pair(V, 2, 32, 4, seed=seed, init=0.3)
    eos = 3
    idx = torch.randint(4, V, (B, T), generator=torch.Generator().manual_seed(seed))
    expected = hf_beams(hf, idx, N, K, eos_token_id=eos, pad_token_id=eos, length_penalty=lp)
    got = beam_search(model, idx, N, num_beams=K, eos_id=eos, length_penalty=lp)
    assert torch.equal(got, expected), (got, expected)


def test_beam_search_is_not_greedy_here():
    """The HF comparisons would prove little if beam search just returned the greedy text."""
    hf, model = hf_pair(50, 2, 32, 4, seed=0, init=0.2)
    idx = torch.randint(1, 50, (4, 3), generator=torch.Generator().manual_seed(0))
    beams = beam_search(model, idx, 10, num_beams=4)
    greedy = kvlab.generate(model, idx, 10, temperature=0)
    assert not torch.equal(beams, greedy)
    log_p = lambda seq: torch.log_softmax(model(seq[None]).float(), -1)[0, 2:-1].gather(1, seq[3:, None]).sum()  # noqa: E731
    with torch.no_grad():
        better = [log_p(b) >= log_p(g) - 1e-4 for b, g in zip(beams, greedy)]
    assert all(better)  # the beam's text is at least as likely as the greedy one


@pytest.mark.parametrize("style", ["gpt2", "modern"])
def test_one_beam_is_greedy_decoding(style):
    model = small_model(style, seed=3)
    idx = torch.randint(0, 61, (3, 4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(beam_search(model, idx, 12, num_beams=1), kvlab.generate(model, idx, 12, temperature=0))
    greedy = kvlab.generate(model, idx, 30, temperature=0, eos_id=5)
    assert torch.equal(beam_search(model, idx, 30, num_beams=1, eos_id=5), greedy)


def test_int8_cache_beams_match_a_fake_quantized_float_run():
    """With quantize='int8' the reordered int8 rows and their scales travel together."""
    model = small_model("modern", seed=1)
    idx = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(0))
    for kind in ("static", "sliding"):
        int8 = beam_search(model, idx, 10, num_beams=3, cache_kind=kind, quantize="int8")
        fp32 = beam_search(model, idx, 10, num_beams=3, cache_kind=kind)
        assert int8.shape == fp32.shape
        assert (int8 == fp32).float().mean() > 0.8  # int8 rounding may flip a close call, not the whole text


@pytest.mark.parametrize("kind", ["static", "dynamic", "sliding", "static-int8", "sliding-int8"])
def test_reorder_cache_gathers_rows(kind):
    model = small_model("modern", seed=0)
    base, _, q = kind.partition("-")
    kwargs = dict(kind=base, quantize=q or None)
    if base == "static":
        kwargs["max_seq_len"] = 16
    if base == "sliding":
        kwargs["window"] = 6
    cache = model.new_cache(3, **kwargs)
    idx = torch.randint(0, 61, (3, 9), generator=torch.Generator().manual_seed(0))
    model(idx[:, :4], cache)
    for t in range(4, 9):
        model(idx[:, t:t + 1], cache)
    before = [{name: getattr(layer, name).clone() for name in ("k", "v", "k_scale", "v_scale")
               if getattr(layer, name, None) is not None} for layer in cache.layers]
    index = torch.tensor([2, 0, 0, 1])
    reorder_cache(cache, index)
    assert cache.batch_size == 4 and cache.length == 9
    for layer, old in zip(cache.layers, before):
        for name, t in old.items():
            n = layer.length if base == "static" else t.size(2)
            torch.testing.assert_close(getattr(layer, name)[:, :, :n], t[index][:, :, :n], rtol=0, atol=0)
    # The reordered cache continues exactly like a cache filled with the reordered rows.
    fresh = model.new_cache(4, **kwargs)
    model(idx[index][:, :4], fresh)
    for t in range(4, 9):
        model(idx[index][:, t:t + 1], fresh)
    nxt = torch.randint(0, 61, (4, 1), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(nxt, cache), model(nxt, fresh), rtol=1e-5, atol=1e-5)


def test_reorder_cache_rejects_bad_input():
    model = small_model("gpt2")
    with pytest.raises(TypeError, match="cache"):
        reorder_cache(object(), torch.tensor([0]))
    with pytest.raises(TypeError, match="index"):
        reorder_cache(model.new_cache(1), torch.tensor([0.0]))


# -- seq2seq ---------------------------------------------------------------------------------------


def seq2seq_model(seed=0, V=13, n_kv_heads=None):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Seq2SeqTransformer(Seq2SeqConfig(vocab_size=V, max_seq_len=24, d_model=32, n_layers=2, n_heads=4,
                                                 n_kv_heads=n_kv_heads)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    return model


def sources(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, 13, (B, 7), generator=g)
    src[1, 5:] = 0  # padding
    src[2, 3:] = 0
    return src


def naive_seq2seq_beams(model, src, N, K, length_penalty=1.0):
    """The reference: every step re-runs the whole decoder over each beam's tokens (no caches)."""
    c = model.config
    pad_mask = src != c.pad_id
    memory = model.encode(src, pad_mask)
    B = src.size(0)
    mem_k, mask_k = memory.repeat_interleave(K, 0), pad_mask.repeat_interleave(K, 0)
    state = {"seqs": torch.full((B * K, 1), c.bos_id)}

    def reorder(rows):
        state["seqs"] = state["seqs"][rows]

    def step(tokens):
        state["seqs"] = torch.cat([state["seqs"], tokens], dim=1)
        return model.decode(state["seqs"], mem_k, mask_k)[:, -1]

    first = model.decode(torch.full((B, 1), c.bos_id), memory, pad_mask)[:, -1]
    state["seqs"] = state["seqs"][:B].repeat_interleave(K, 0)
    out, _ = search(first, step, reorder, K=K, N=N, eos_id=c.eos_id, length_penalty=length_penalty, fill=c.pad_id)
    return out


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_seq2seq_beam_search_equals_the_uncached_reference(K, n_kv_heads):
    model = seq2seq_model(seed=K, n_kv_heads=n_kv_heads)
    src = sources()
    with torch.no_grad():
        expected = naive_seq2seq_beams(model, src, 12, K)
    assert torch.equal(beam_search(model, src, 12, num_beams=K), expected)


def test_seq2seq_one_beam_is_greedy_decode():
    for seed in range(3):
        model = seq2seq_model(seed)
        src = sources(seed=seed)
        assert torch.equal(beam_search(model, src, 15, num_beams=1), greedy_decode(model, src, 15))


def test_seq2seq_cross_cache_is_computed_once_and_never_copied(monkeypatch):
    model = seq2seq_model(seed=0)
    src = sources()
    projections = []
    hooks = [block.cross_attn.kv.register_forward_hook(lambda *_: projections.append(1)) for block in model.decoder]
    made = []
    original = CrossAttentionCache.from_memory.__func__

    def spy(cls, layers, memory, mask):
        cache = original(cls, layers, memory, mask)
        made.append(cache)
        return cache

    monkeypatch.setattr(CrossAttentionCache, "from_memory", classmethod(spy))
    seen = []
    real_attend = kvlab.beam.attend

    def spy_attend(q, k, v, mask=None, **kw):
        seen.append((k.data_ptr(), v.data_ptr(), k.size(0), q.size(2)))
        return real_attend(q, k, v, mask, **kw)

    monkeypatch.setattr(kvlab.beam, "attend", spy_attend)
    try:
        out = beam_search(model, src, 10, num_beams=4)
    finally:
        for h in hooks:
            h.remove()
    assert len(made) == 1 and len(projections) == model.config.n_layers  # projected once per layer
    shared = {(k.data_ptr(), v.data_ptr()) for k, v in made[0].kv}
    assert {(kp, vp) for kp, vp, _, _ in seen} <= shared  # every step read the one copy
    assert all(b == src.size(0) for _, _, b, _ in seen)  # B sources, not B·K beam rows
    assert {t for *_, t in seen} == {1, 4}  # the first step has one query per source, then K
    assert out.size(0) == src.size(0)


def test_beam_step_seq2seq_equals_decode_with_copied_cross_cache():
    model = seq2seq_model(seed=1, n_kv_heads=2)
    src = sources()
    K = 3
    pad_mask = src != 0
    with torch.no_grad():
        memory = model.encode(src, pad_mask)
        shared = model.new_cache(memory, pad_mask, max_seq_len=8)
        copied = model.new_cache(memory.repeat_interleave(K, 0), pad_mask.repeat_interleave(K, 0), max_seq_len=8)
        reorder_cache(shared, torch.arange(3).repeat_interleave(K))
        tokens = torch.randint(3, 13, (9, 4), generator=torch.Generator().manual_seed(0))
        for t in range(4):
            a = beam_step_seq2seq(model, tokens[:, t:t + 1], t, shared.self_attn, shared.cross)
            b = model.decode(tokens[:, t:t + 1], cache=copied)[:, -1]
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# -- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(num_beams=0), ValueError, "num_beams"),
    (dict(num_beams=-2), ValueError, "num_beams"),
    (dict(num_beams=2.0), TypeError, "num_beams"),
    (dict(num_beams=True), TypeError, "num_beams"),
    (dict(num_beams=2, length_penalty=math.nan), ValueError, "length_penalty"),
    (dict(num_beams=2, length_penalty=math.inf), ValueError, "length_penalty"),
    (dict(num_beams=2, length_penalty="1"), TypeError, "length_penalty"),
    (dict(num_beams=2, eos_id=61), ValueError, "eos_id"),
    (dict(num_beams=2, cache_kind="paged"), ValueError, "cache_kind"),
    (dict(num_beams=2, quantize="int4"), ValueError, "quantize"),
])
def test_bad_arguments_are_named(kwargs, error, name):
    model = small_model("gpt2")
    with pytest.raises(error, match=name):
        beam_search(model, torch.zeros(1, 3, dtype=torch.long), 4, **kwargs)


def test_bad_model_and_lengths():
    model = small_model("gpt2")
    with pytest.raises(TypeError, match="model"):
        beam_search(object(), torch.zeros(1, 3, dtype=torch.long), 4, num_beams=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        beam_search(model, torch.zeros(1, 3, dtype=torch.long), 0, num_beams=2)
    with pytest.raises(ValueError, match="max_seq_len"):
        beam_search(model, torch.zeros(1, 3, dtype=torch.long), 200, num_beams=2)
    with pytest.raises(ValueError, match="num_beams"):
        beam_search(model, torch.zeros(1, 3, dtype=torch.long), 4, num_beams=0)
