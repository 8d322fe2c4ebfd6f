"""Seq2SeqTransformer: shapes, padding masks, the two caches, decoding, bad inputs, toy data."""

import pytest
import torch

from kvlab.cache import DynamicLayerCache, StaticLayerCache
from kvlab.data import Seq2SeqVocab, seq2seq_batch, toy_pairs
from kvlab.seq2seq import (
    CrossAttentionCache,
    EncoderDecoderCache,
    Seq2SeqConfig,
    Seq2SeqTransformer,
    greedy_decode,
    toy_accuracy,
    train_toy,
)

BASE = dict(vocab_size=17, max_seq_len=40, d_model=32, n_layers=2, n_heads=4)
STYLES = {
    "classic": {},
    "modern": dict(n_kv_heads=2, norm="rmsnorm", mlp="swiglu", bias=False),
    "sinusoidal": dict(pos="sinusoidal"),
}


def make_model(style: str = "classic", seed: int = 0, **overrides) -> Seq2SeqTransformer:
    torch.manual_seed(seed)
    model = Seq2SeqTransformer(Seq2SeqConfig(**{**BASE, **STYLES[style], **overrides}))
    with torch.no_grad():  # larger weights: logits that depend on everything, not near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    return model.eval()


@pytest.fixture(params=sorted(STYLES))
def model(request):
    return make_model(request.param)


def padded_sources(lengths=(5, 9, 2), width=None, seed=1, vocab_size=17) -> torch.Tensor:
    """Random sources of the given lengths (ids 3.., no PAD/BOS/EOS), right-padded with 0."""
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    src = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        src[i, :n] = torch.randint(3, vocab_size, (n,), generator=g)
    return src


@pytest.fixture(scope="module")
def trained():
    """A small model trained briefly on digit reversal: it emits varied digits and EOS."""
    vocab = Seq2SeqVocab()
    torch.manual_seed(0)
    model = Seq2SeqTransformer(Seq2SeqConfig(vocab_size=len(vocab), max_seq_len=12, d_model=32, n_layers=2,
                                             n_heads=4, d_ff=64))
    history = train_toy(model, toy_pairs(2000, seed=0), vocab, steps=60, batch_size=32, lr=5e-3)
    return model, vocab, history


# --------------------------------------------------------------------------- config


def test_config_derives_fields():
    c = Seq2SeqConfig(d_model=48, n_heads=6)
    assert c.head_dim == 8 and c.n_kv_heads == 6 and c.d_ff == 192


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=30, n_heads=4), "divisible"),
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(norm="batchnorm"), "norm"),
    (dict(pos="rope"), "pos"),
    (dict(n_layers=0), "n_layers"),
    (dict(pad_id=13), "pad_id"),
    (dict(bos_id=0), "must differ"),
    (dict(dropout=1.0), "dropout"),
    (dict(pos="sinusoidal", d_model=33, n_heads=3), "even d_model"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Seq2SeqConfig(**kwargs)


def test_model_wants_a_config():
    with pytest.raises(TypeError, match="Seq2SeqConfig"):
        Seq2SeqTransformer(dict(BASE))


# --------------------------------------------------------------------------- shapes and masks


def test_shapes(model):
    src, tgt = padded_sources(), torch.randint(3, 17, (3, 6))
    with torch.no_grad():
        memory = model.encode(src)
        assert memory.shape == (3, 9, 32)
        assert model(src, tgt).shape == (3, 6, 17)
        assert model.decode(tgt, memory, src != 0).shape == (3, 6, 17)
        logits, weights = model.decode(tgt, memory, src != 0, return_cross_weights=True)
    assert len(weights) == 2 and weights[0].shape == (3, 4, 6, 9)


def test_padding_does_not_change_a_sources_outputs(model):
    """A source alone and the same source padded inside a longer batch give the same results."""
    src = padded_sources((5, 9, 2))
    tgt = torch.randint(3, 17, (3, 7))
    with torch.no_grad():
        batch_memory, batch_logits = model.encode(src), model(src, tgt)
        for i, n in enumerate((5, 9, 2)):
            torch.testing.assert_close(model.encode(src[i:i + 1, :n]), batch_memory[i:i + 1, :n],
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model(src[i:i + 1, :n], tgt[i:i + 1]), batch_logits[i:i + 1],
                                       atol=1e-5, rtol=1e-5)
    # Extra padding columns change nothing either.
    wider = padded_sources((5, 9, 2), width=15)
    with torch.no_grad():
        torch.testing.assert_close(model(wider, tgt), batch_logits, atol=1e-5, rtol=1e-5)


def test_padding_tokens_get_no_cross_attention(model):
    src = padded_sources((5, 9, 2))
    with torch.no_grad():
        _, weights = model.decode(torch.randint(3, 17, (3, 4)), model.encode(src), src != 0,
                                  return_cross_weights=True)
    for w in weights:
        assert torch.all(w.masked_select(~(src != 0)[:, None, None, :].expand_as(w)) == 0)
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))


def test_explicit_pad_mask_overrides_pad_id(model):
    src = padded_sources((5, 9, 2))
    mask = src != 0
    mask[1, 7:] = False  # treat the last two real tokens of row 1 as padding
    with torch.no_grad():
        torch.testing.assert_close(model.encode(src, mask)[1:2, :7], model.encode(src[1:2, :7]),
                                   atol=1e-5, rtol=1e-5)


def test_encoder_is_bidirectional_and_decoder_is_causal(model):
    src, tgt = padded_sources((8,)), torch.randint(3, 17, (1, 6))
    src2, tgt2 = src.clone(), tgt.clone()
    src2[0, -1] = 3 if src[0, -1] != 3 else 4  # change the last source token
    tgt2[0, 4:] = (tgt2[0, 4:] - 2) % 14 + 3  # change the last two target tokens
    with torch.no_grad():
        assert not torch.allclose(model.encode(src)[0, 0], model.encode(src2)[0, 0])  # first sees last
        y, y2 = model(src, tgt), model(src, tgt2)
    torch.testing.assert_close(y[:, :4], y2[:, :4])  # earlier target positions never see later ones
    assert not torch.allclose(y[:, 4:], y2[:, 4:])


def test_return_cross_weights_matches_the_fast_path(model):
    src, tgt = padded_sources(), torch.randint(3, 17, (3, 5))
    with torch.no_grad():
        memory = model.encode(src)
        fast = model.decode(tgt, memory, src != 0)
        slow, _ = model.decode(tgt, memory, src != 0, return_cross_weights=True)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- the caches


@pytest.mark.parametrize("kind, layer_type", [("static", StaticLayerCache), ("dynamic", DynamicLayerCache)])
def test_new_cache_reuses_kvlab_caches_and_projects_once(model, kind, layer_type):
    src = padded_sources()
    with torch.no_grad():
        memory = model.encode(src)
        cache = model.new_cache(memory, src != 0, max_seq_len=16 if kind == "static" else None, kind=kind)
    assert isinstance(cache, EncoderDecoderCache) and isinstance(cache.cross, CrossAttentionCache)
    assert all(isinstance(layer, layer_type) for layer in cache.self_attn.layers)
    c = model.config
    assert len(cache.cross.kv) == c.n_layers
    assert cache.cross.kv[0][0].shape == (3, c.n_kv_heads, 9, c.head_dim)
    assert cache.cross.mask.shape == (3, 1, 1, 9) and cache.length == 0
    assert cache.cross.nbytes == c.n_layers * 2 * 3 * c.n_kv_heads * 9 * c.head_dim * 4
    for layer, (k, v) in zip(model.decoder, cache.cross.kv):
        k2, v2 = layer.cross_attn.project_memory(memory)
        torch.testing.assert_close(k, k2)
        torch.testing.assert_close(v, v2)


def test_cached_decode_in_steps_and_chunks_matches_one_pass(model):
    src, tgt = padded_sources(), torch.randint(3, 17, (3, 9))
    with torch.no_grad():
        memory = model.encode(src)
        full = model.decode(tgt, memory, src != 0)
        for kind in ("static", "dynamic"):
            cache = model.new_cache(memory, src != 0, kind=kind)
            pieces = [model.decode(tgt[:, a:b], cache=cache) for a, b in [(0, 3), (3, 4), (4, 8), (8, 9)]]
            torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
            assert cache.length == 9
            # A static cache can rewind: positions 4.. again, with different tokens.
            if kind == "static":
                again = model.decode(tgt[:, 4:], cache=cache, input_pos=4)
                torch.testing.assert_close(again, full[:, 4:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cache_kind", ["static", "dynamic"])
def test_greedy_cached_equals_uncached(model, cache_kind):
    src = padded_sources((5, 9, 2, 7))
    cached, cl = greedy_decode(model, src, 20, cache_kind=cache_kind, return_logits=True)
    naive, nl = greedy_decode(model, src, 20, use_cache=False, return_logits=True)
    assert torch.equal(cached, naive)
    torch.testing.assert_close(cl, nl, atol=1e-5, rtol=1e-5)


def test_greedy_on_a_trained_model_batches_with_padding_and_eos(trained):
    model, vocab, _ = trained
    pairs = toy_pairs(40, seed=5)
    src, _, tgt_out = seq2seq_batch(pairs, vocab)
    cached, cl = greedy_decode(model, src, 12, return_logits=True)
    naive, nl = greedy_decode(model, src, 12, use_cache=False, return_logits=True)
    assert torch.equal(cached, naive)
    torch.testing.assert_close(cl, nl, atol=1e-5, rtol=1e-5)
    # Rows finish at different steps; after its EOS a row holds only PAD.
    ends = []
    for row in cached.tolist():
        assert vocab.eos_id in row
        end = row.index(vocab.eos_id)
        assert all(t == vocab.pad_id for t in row[end + 1:])
        ends.append(end)
    assert len(set(ends)) > 1
    # Each row decodes as it would alone (its padding does not matter).
    for i in (0, 7, 21):
        n = int((src[i] != vocab.pad_id).sum())
        alone = greedy_decode(model, src[i:i + 1, :n], 12)
        assert torch.equal(alone[0], cached[i, :alone.size(1)])


def _count_projections(model):
    calls = []
    hooks = [block.cross_attn.kv.register_forward_hook(lambda *_: calls.append(1)) for block in model.decoder]
    return calls, hooks


def test_cross_keys_are_projected_once_per_layer_with_the_cache(model):
    src = padded_sources((5, 9, 2))
    calls, hooks = _count_projections(model)
    try:
        out = greedy_decode(model, src, 20)
        cached_calls = len(calls)
        calls.clear()
        naive = greedy_decode(model, src, 20, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    steps = out.size(1)
    assert steps == 20 and torch.equal(out, naive)
    assert cached_calls == model.config.n_layers
    assert len(calls) == model.config.n_layers * steps


def test_reset_keeps_the_cross_cache(model):
    src, tgt = padded_sources(), torch.randint(3, 17, (3, 5))
    with torch.no_grad():
        cache = model.new_cache(model.encode(src), src != 0)
        first = model.decode(tgt, cache=cache)
        cache.reset()
        assert cache.length == 0
        calls, hooks = _count_projections(model)
        second = model.decode(tgt, cache=cache)
        for h in hooks:
            h.remove()
    assert calls == [] and torch.equal(first, second)
    assert "EncoderDecoderCache" in repr(cache)


def test_max_new_tokens_zero_and_one(model):
    src = padded_sources()
    assert greedy_decode(model, src, 0).shape == (3, 0)
    out, logits = greedy_decode(model, src, 0, return_logits=True)
    assert logits.shape == (3, 0, 17)
    assert torch.equal(greedy_decode(model, src, 1), greedy_decode(model, src, 1, use_cache=False))


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("make_src, kwargs, error, match", [
    (lambda: torch.zeros(2, 0, dtype=torch.long), {}, ValueError, "src must have shape"),
    (lambda: torch.tensor([[3, 4, 0], [0, 0, 0]]), {}, ValueError, r"src rows \[1\] are empty"),
    (lambda: torch.tensor([[3, 4, 17]]), {}, ValueError, r"src ids must be in \[0, 16\]"),
    (lambda: torch.tensor([[3, -1]]), {}, ValueError, "src ids"),
    (lambda: torch.rand(1, 3), {}, TypeError, "src must hold integer"),
    (lambda: [[3, 4]], {}, TypeError, "src must be a torch.Tensor"),
    (lambda: torch.tensor([3, 4]), {}, ValueError, "src must have shape"),
    (lambda: torch.full((1, 41), 3), {}, ValueError, "max_seq_len"),
    (lambda: torch.tensor([[3, 4]]), dict(max_new_tokens=-1), ValueError, "max_new_tokens must be an int >= 0"),
    (lambda: torch.tensor([[3, 4]]), dict(max_new_tokens=2.0), TypeError, "max_new_tokens"),
    (lambda: torch.tensor([[3, 4]]), dict(max_new_tokens=41), ValueError, "max_new_tokens=41"),
    (lambda: torch.tensor([[3, 4]]), dict(cache_kind="sliding"), ValueError, "cache_kind"),
    (lambda: torch.tensor([[3, 4]]), dict(src_pad_mask=torch.ones(1, 2)), TypeError, "src_pad_mask must be a bool"),
    (lambda: torch.tensor([[3, 4]]), dict(src_pad_mask=torch.ones(1, 3, dtype=torch.bool)), ValueError,
     "src_pad_mask must have the shape"),
])
def test_greedy_rejects_bad_inputs(make_src, kwargs, error, match):
    model = make_model()
    kwargs = {"max_new_tokens": 5, **kwargs}
    with pytest.raises(error, match=match):
        greedy_decode(model, make_src(), **kwargs)


def test_greedy_wants_a_seq2seq_model():
    with pytest.raises(TypeError, match="Seq2SeqTransformer"):
        greedy_decode(torch.nn.Linear(2, 2), torch.tensor([[3]]), 2)


def test_decode_rejects_bad_inputs():
    model = make_model()
    src = padded_sources()
    with torch.no_grad():
        memory = model.encode(src)
        cache = model.new_cache(memory, src != 0, max_seq_len=4)
    tgt = torch.randint(3, 17, (3, 2))
    cases = [
        (lambda: model.decode(tgt[:2], memory, src != 0), ValueError, "batch size"),
        (lambda: model.decode(tgt), ValueError, "needs memory and src_pad_mask"),
        (lambda: model.decode(tgt, memory, src != 0, cache=cache), ValueError, "not both"),
        (lambda: model.decode(tgt, cache="cache"), TypeError, "EncoderDecoderCache"),
        (lambda: model.decode(tgt[:2], cache=cache), ValueError, "batch_size=3"),
        (lambda: model.decode(tgt, cache=cache, input_pos=3), ValueError, "input_pos starts at 3"),
        (lambda: model.decode(torch.randint(3, 17, (3, 5)), cache=cache), ValueError, "cache too small"),
        (lambda: model.decode(tgt, memory, src != 0, input_pos=39), ValueError, "exceed max_seq_len"),
        (lambda: model.decode(tgt, memory, src != 0, input_pos=-1), ValueError, "input_pos"),
        (lambda: model.decode(tgt + 20, memory, src != 0), ValueError, "tgt ids"),
        (lambda: model.decode(tgt, memory[..., :8], src != 0), ValueError, "memory must have shape"),
        (lambda: model.decode(tgt, memory.long(), src != 0), TypeError, "memory must be a float"),
        (lambda: model.decode(tgt, memory, (src != 0)[:, :4]), ValueError, "src_pad_mask must have the shape"),
        (lambda: model.new_cache(memory, src != 0, kind="sliding"), ValueError, "kind"),
        (lambda: model.new_cache(memory, src != 0, max_seq_len=8, kind="dynamic"), ValueError, "only used"),
        (lambda: model(src, tgt[:2]), ValueError, "batch size"),
        (lambda: model(src, torch.randint(3, 17, (3, 41))), ValueError, "tgt has 41 positions"),
        (lambda: model(src, tgt.float()), TypeError, "tgt must hold integer"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
    assert cache.length == 0  # nothing was written by the failed calls


# --------------------------------------------------------------------------- toy data and training


def test_vocab_round_trip():
    vocab = Seq2SeqVocab()
    assert len(vocab) == 13 and (vocab.pad_id, vocab.bos_id, vocab.eos_id) == (0, 1, 2)
    assert vocab.encode("3141") == [6, 4, 7, 4]
    assert vocab.decode([1, 6, 4, 2, 9, 0]) == "31"  # BOS skipped, stops at EOS
    assert vocab.decode(torch.tensor([6, 0, 0])) == "3"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.encode("12a")
    with pytest.raises(ValueError, match="distinct"):
        Seq2SeqVocab("aab")


def test_toy_pairs_are_deterministic_distinct_and_honour_exclude():
    a, b = toy_pairs(300, seed=3), toy_pairs(300, seed=3)
    assert a == b and a != toy_pairs(300, seed=4)
    assert len({s for s, _ in a}) == 300
    assert all(4 <= len(s) <= 10 and t == s[::-1] for s, t in a)
    test = {s for s, _ in toy_pairs(200, seed=9, min_len=4, max_len=4)}
    train = toy_pairs(2000, seed=0, min_len=4, max_len=4, exclude=test)
    assert not test & {s for s, _ in train}
    assert all(t == "".join(sorted(s)) for s, t in toy_pairs(50, task="sort", seed=1))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(n=0), ValueError, "n must be a positive int"),
    (dict(n=10, task="copy"), ValueError, "task"),
    (dict(n=10, min_len=5, max_len=4), ValueError, "min_len"),
    (dict(n=10, seed=1.5), TypeError, "seed"),
    (dict(n=100, min_len=1, max_len=1), ValueError, "too many"),
])
def test_toy_pairs_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        toy_pairs(**kwargs)


def test_seq2seq_batch_shifts_and_pads():
    vocab = Seq2SeqVocab()
    src, tgt_in, tgt_out = seq2seq_batch([("123", "321"), ("45", "54")], vocab)
    assert src.tolist() == [[4, 5, 6, 2], [7, 8, 2, 0]]
    assert tgt_in.tolist() == [[1, 6, 5, 4], [1, 8, 7, 0]]
    assert tgt_out.tolist() == [[6, 5, 4, 2], [8, 7, 2, 0]]
    with pytest.raises(ValueError, match="empty string"):
        seq2seq_batch([("", "")], vocab)
    with pytest.raises(TypeError, match="Seq2SeqVocab"):
        seq2seq_batch([("1", "1")], None)


def test_training_reduces_the_loss_and_is_repeatable(trained):
    model, vocab, history = trained
    loss = history["loss"]
    assert len(loss) == 60 and len(history["lr"]) == 60
    assert sum(loss[-10:]) / 10 < 0.8 * sum(loss[:10]) / 10
    assert not model.training
    assert 0.0 <= toy_accuracy(model, toy_pairs(50, seed=7), vocab) <= 1.0
    torch.manual_seed(0)
    again = Seq2SeqTransformer(model.config)
    assert train_toy(again, toy_pairs(2000, seed=0), vocab, steps=3, batch_size=32, lr=5e-3)["loss"] == loss[:3]
