"""Speculative decoding: greedy output equals plain greedy, sampled output follows the target's
filtered distribution (a chi-square test on a small vocabulary), caches roll back cleanly."""

import math
import os

import pytest
import torch

import kvlab
from kvlab.course.checks._common import small_model
from kvlab.sampling import logits_to_probs
from kvlab.speculative import NGramDraft, rollback_cache, save_ring, speculative_generate


def prompt(T=5, V=61, seed=0):
    return torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(seed))


# -- greedy: the same tokens as plain greedy decoding ---------------------------------------------


@pytest.mark.parametrize("style", ["gpt2", "modern"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_greedy_with_a_model_draft_equals_generate(style, k):
    target = small_model(style, seed=0)
    draft = small_model(style, seed=1, n_layers=1)
    for T, N in [(1, 20), (6, 33), (4, 2), (3, 1)]:
        idx = prompt(T)
        expected = kvlab.generate(target, idx, N, temperature=0)
        assert torch.equal(speculative_generate(target, draft, idx, N, k=k, temperature=0), expected)


def test_greedy_with_the_target_as_its_own_draft_accepts_everything():
    target = small_model("gpt2", seed=0)
    stats = {}
    out = speculative_generate(target, target, prompt(), 40, k=4, temperature=0, stats=stats)
    assert torch.equal(out, kvlab.generate(target, prompt(), 40, temperature=0))
    assert stats["acceptance_rate"] == 1.0
    assert stats["tokens_per_target_forward"] > 4  # 5 tokens per verify round, 1 from the prefill


@pytest.mark.parametrize("k", [1, 4, 16])
def test_greedy_with_an_ngram_draft_equals_generate(k):
    target = small_model("modern", seed=2)
    idx = prompt(12)
    text = torch.randint(0, 61, (400,), generator=torch.Generator().manual_seed(5))
    for draft in (NGramDraft(3), NGramDraft(4, text, vocab_size=61)):
        stats = {}
        out = speculative_generate(target, draft, idx, 50, k=k, temperature=0, stats=stats)
        assert torch.equal(out, kvlab.generate(target, idx, 50, temperature=0))
        assert stats["target_forwards"] < 50  # the repetitive greedy text gets guessed


def test_greedy_on_the_shipped_model_past_its_window():
    model, tok = kvlab.load_shakespeare()
    idx = torch.tensor([tok.encode("ROMEO:\nWhat say you")])
    expected = kvlab.generate(model, idx, 150, temperature=0)  # 168 positions: past the 128 window
    stats = {}
    got = speculative_generate(model, NGramDraft(4), idx, 150, k=4, temperature=0, stats=stats)
    assert torch.equal(got, expected)
    assert stats["tokens_per_target_forward"] > 1.3  # prompt lookup alone: the greedy text repeats itself
    assert set(stats) >= {"acceptance_rate", "tokens_per_target_forward", "total_s", "tokens_per_s",
                          "target_forwards", "proposed", "accepted"}


# -- sampling: the target's distribution, exactly ---------------------------------------------------


def tiny_pair(V=6):
    target = small_model("gpt2", seed=0, vocab_size=V)
    draft = small_model("gpt2", seed=7, vocab_size=V, n_layers=1)
    return target, draft


def exact_two_token_distribution(model, idx, **filters):
    """P(x1, x2 | idx) under the model's filtered distribution, (V, V)."""
    with torch.no_grad():
        V = model.config.vocab_size
        p1 = logits_to_probs(model(idx)[0, -1], **filters)
        seqs = torch.cat([idx.repeat(V, 1), torch.arange(V)[:, None]], dim=1)
        p2 = logits_to_probs(model(seqs)[:, -1], **filters)
    return p1[:, None] * p2


def chi_square_p_value(counts, probs):
    """Pearson's test with cells of expected count < 5 pooled; the p-value from the regularised gamma."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(stat / 2)))


@pytest.mark.parametrize("kind, filters", [
    ("model", dict(temperature=1.0)),
    ("model", dict(temperature=0.7, top_k=3)),
    ("ngram", dict(temperature=1.3, top_p=0.9)),
    ("ngram", dict(temperature=1.0, min_p=0.1)),
], ids=["model-plain", "model-top_k", "ngram-top_p", "ngram-min_p"])
def test_sampled_tokens_follow_the_targets_distribution(kind, filters):
    """The joint distribution of the first two tokens: the first may be a kept guess, a resampled
    rejection or (with nothing guessed) a plain draw; the second a bonus or a correction."""
    V, n = 5, 1200
    target, draft = tiny_pair(V)
    if kind == "ngram":
        draft = NGramDraft(2, torch.randint(0, V, (200,), generator=torch.Generator().manual_seed(0)), vocab_size=V)
    idx = torch.tensor([[1, 4, 2]])
    probs = exact_two_token_distribution(target, idx, **filters).flatten()
    g = torch.Generator().manual_seed(1234)
    counts = torch.zeros(V * V)
    accepted = proposed = 0
    for _ in range(n):
        stats = {}
        out = speculative_generate(target, draft, idx, 2, k=3, generator=g, stats=stats, **filters)
        counts[out[0, 3] * V + out[0, 4]] += 1
        accepted, proposed = accepted + stats["accepted"], proposed + stats["proposed"]
    assert 0 < accepted < proposed  # guesses were both kept and rejected
    p_value = chi_square_p_value(counts, probs)
    tv = 0.5 * float((counts / n - probs).abs().sum())
    assert p_value > 1e-3 and tv < 0.1, (p_value, tv)


def test_the_distribution_test_catches_a_wrong_rule(monkeypatch):
    """Keeping every draft token (no accept/resample) gives the draft's distribution: the test sees it."""
    V, n = 5, 800
    target, draft = tiny_pair(V)
    idx = torch.tensor([[1, 4, 2]])
    probs = exact_two_token_distribution(target, idx).flatten()
    monkeypatch.setattr(kvlab.speculative.torch, "rand", lambda *a, **k: torch.zeros(()))  # always accept
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(V * V)
    for _ in range(n):
        out = speculative_generate(target, draft, idx, 2, k=3, generator=g)
        counts[out[0, 3] * V + out[0, 4]] += 1
    assert chi_square_p_value(counts, probs) < 1e-6


# -- rolling back ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["static", "dynamic", "sliding", "static-int8", "sliding-int8"])
@pytest.mark.parametrize("keep", [0, 2, 5])
def test_rollback_leaves_no_trace(kind, keep):
    model = small_model("modern", seed=0)
    base, _, q = kind.partition("-")
    kwargs = dict(kind=base, quantize=q or None)
    kwargs.update(max_seq_len=40) if base == "static" else kwargs.update(window=8) if base == "sliding" else None
    idx = prompt(20)
    cache, clean = model.new_cache(1, **kwargs), model.new_cache(1, **kwargs)
    model(idx[:, :10], cache)
    model(idx[:, :10], clean)
    for t in range(10, 13):
        model(idx[:, t:t + 1], cache)
        model(idx[:, t:t + 1], clean)
    saved = save_ring(cache, 13, 5)
    wrong = torch.randint(0, 61, (1, 5 - keep), generator=torch.Generator().manual_seed(9))
    model(torch.cat([idx[:, 13:13 + keep], wrong], dim=1), cache)  # 5 guesses at 13..17, the first `keep` right
    rollback_cache(cache, 13 + keep, saved)
    model(idx[:, 13:13 + keep], clean) if keep else None
    assert cache.length == clean.length == 13 + keep
    nxt = idx[:, 13 + keep:13 + keep + 1]
    torch.testing.assert_close(model(nxt, cache), model(nxt, clean), rtol=1e-5, atol=1e-5)
    more = idx[:, 14 + keep:17 + keep]
    torch.testing.assert_close(model(more, cache), model(more, clean), rtol=1e-5, atol=1e-5)


def test_a_sliding_ring_refuses_to_roll_back_without_its_saved_slots():
    model = small_model("modern")
    cache = model.new_cache(1, kind="sliding", window=4)
    model(prompt(6), cache)
    with pytest.raises(ValueError, match="save_ring"):
        rollback_cache(cache, 3)
    with pytest.raises(ValueError, match="length"):
        rollback_cache(cache, 7)


# -- the n-gram draft ---------------------------------------------------------------------------------


def test_ngram_draft_picks_the_most_frequent_continuation_of_the_longest_context():
    draft = NGramDraft(2, [0, 1, 2, 0, 1, 2, 0, 1, 3, 5, 1, 4])
    # after (0, 1): 2 twice, 3 once -> 2; after (5, 1): 4
    assert draft.propose([5, 0, 1], 1) == [2]
    assert draft.propose([3, 5, 1], 1) == [4]
    assert draft.propose([9, 9], 3) == []  # unseen tokens: nothing to propose
    # prompt lookup: the text itself wins over the table
    assert draft.propose([7, 8, 6, 7, 8], 3) == [6, 7, 8]


def test_ngram_draft_rejects_bad_input():
    with pytest.raises(ValueError, match="order"):
        NGramDraft(0)
    with pytest.raises(ValueError, match="ids"):
        NGramDraft(2, [1])
    with pytest.raises(ValueError, match="order"):
        NGramDraft(5, [0, 50256])


# -- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(k=0), ValueError, "k must"),
    (dict(k=-1), ValueError, "k must"),
    (dict(k=2.5), TypeError, "k must"),
    (dict(k=True), TypeError, "k must"),
    (dict(temperature=-1), ValueError, "temperature"),
    (dict(top_p=2.0), ValueError, "top_p"),
    (dict(generator="seed"), TypeError, "generator"),
    (dict(stats=[]), TypeError, "stats"),
])
def test_bad_arguments_are_named(kwargs, error, name):
    target = small_model("gpt2")
    with pytest.raises(error, match=name):
        speculative_generate(target, NGramDraft(2), prompt(), 5, **kwargs)


def test_bad_drafts_and_prompts():
    target = small_model("gpt2")
    other = small_model("gpt2", vocab_size=50)
    with pytest.raises(ValueError, match="draft has vocab_size=50"):
        speculative_generate(target, other, prompt(), 5)
    with pytest.raises(ValueError, match="draft has vocab_size"):
        speculative_generate(target, NGramDraft(2, vocab_size=99), prompt(), 5)
    with pytest.raises(TypeError, match="draft"):
        speculative_generate(target, "a draft", prompt(), 5)
    with pytest.raises(TypeError, match="target"):
        speculative_generate(NGramDraft(2), target, prompt(), 5)
    with pytest.raises(ValueError, match="one sequence"):
        speculative_generate(target, NGramDraft(2), torch.zeros(2, 3, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="max_seq_len"):
        speculative_generate(target, NGramDraft(2), prompt(), 500)
    assert torch.equal(speculative_generate(target, NGramDraft(2), prompt(), 0), prompt())
    assert math.isnan(_stats_without_guesses(target))


def _stats_without_guesses(target):
    stats = {}
    speculative_generate(target, NGramDraft(2), prompt(), 1, stats=stats)  # one token: nothing to guess
    return stats["acceptance_rate"]


@pytest.mark.skipif(not os.environ.get("KVLAB_SHAKESPEARE"), reason="reads Tiny Shakespeare from $KVLAB_SHAKESPEARE")
def test_the_chapter_10_bench_runs_and_reports_every_figure(capsys):
    import kvlab.bench.cli

    result = kvlab.bench.beyond(ks=(2,), new_tokens=12, windows=2, repeats=1, prompts=("ROMEO:\n",), toy_steps=2,
                                toy_test=20)
    runs = result["speculative"]["runs"]
    assert {r["draft"] for r in runs} == {"ngram (order 4, training text)", "draft model (1 layer)"}
    assert all(r["identical_tokens"] and r["k"] == 2 for r in runs)
    q = result["int8_cache"]
    assert q["ratio_to_float32"] <= 0.3 and q["positions"] == 2 * 128
    assert set(result["beam_toy_exact_match"]["sort"]) == {"beams_1", "beams_2", "beams_4"}
    with pytest.raises(SystemExit):
        kvlab.bench.cli.main(["--help"])
    assert "--beyond" in capsys.readouterr().out


def test_a_sampling_config_gives_the_same_tokens_as_the_keywords():
    target = small_model("gpt2", seed=0)
    draft = small_model("gpt2", seed=1, n_layers=1)
    settings = dict(temperature=0.9, top_k=30)
    by_keywords = speculative_generate(target, draft, prompt(), 20, k=3, **settings,
                                       generator=torch.Generator().manual_seed(4))
    config = kvlab.SamplingConfig(**settings, generator=torch.Generator().manual_seed(4))
    assert torch.equal(speculative_generate(target, draft, prompt(), 20, k=3, sampling=config), by_keywords)
    with pytest.raises(TypeError, match="not both"):
        speculative_generate(target, draft, prompt(), 20, sampling=config, temperature=0)
