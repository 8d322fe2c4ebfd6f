"""Sampling filters: equal to Hugging Face's warpers, and sampled frequencies match the probabilities."""

import math

import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from kvlab.sampling import (SamplingConfig, logits_to_probs, min_p_filter, resolve_sampling, sample, top_k_filter,
                            top_p_filter)


def hf_probs(logits, temperature=1.0, top_k=None, top_p=None, min_p=None):
    """The same filters through Hugging Face, in the same order."""
    scores = logits.clone()
    dummy_ids = torch.zeros(logits.size(0), 1, dtype=torch.long)
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(dummy_ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(dummy_ids, scores)
    if top_p is not None and top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(dummy_ids, scores)
    if min_p:
        scores = MinPLogitsWarper(min_p)(dummy_ids, scores)
    return scores.softmax(-1)


SETTINGS = [
    dict(temperature=0.7), dict(temperature=1.6), dict(top_k=1), dict(top_k=5), dict(top_k=50),
    dict(top_k=10_000), dict(top_p=0.05), dict(top_p=0.5), dict(top_p=0.9), dict(top_p=0.999),
    dict(min_p=0.05), dict(min_p=0.3), dict(min_p=1.0),
    dict(temperature=0.8, top_k=40, top_p=0.9), dict(temperature=1.3, top_p=0.8, min_p=0.1),
    dict(temperature=0.5, top_k=20, top_p=0.95, min_p=0.02),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_filters_equal_hugging_face(settings, scale):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1000, generator=g) * scale
    ours = logits_to_probs(logits, **settings)
    theirs = hf_probs(logits, **settings)
    assert torch.equal(ours > 0, theirs > 0), "different tokens kept"
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.sum(-1), torch.ones(6))


def test_top_k_keeps_exactly_k_without_ties():
    logits = torch.randn(4, 100)
    assert ((top_k_filter(logits, 7) > -math.inf).sum(-1) == 7).all()


def test_top_k_keeps_ties_like_hugging_face():
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]])
    assert (top_k_filter(logits, 2) > -math.inf).tolist() == [[True, True, True, True, False]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda p: (top_p_filter(logits, p) > -math.inf).sum().item()  # noqa: E731
    assert kept(0.4) == 1 and kept(0.5) == 1 and kept(0.6) == 2 and kept(0.85) == 3 and kept(0.9) == 3
    assert kept(1e-9) == 1  # at least one token


def test_min_p_threshold_scales_with_the_top_probability():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = (min_p_filter(probs.log(), 0.2) > -math.inf).tolist()
    assert kept == [[True, True, True, False]]  # threshold 0.1


def test_temperature_zero_is_greedy_and_small_temperature_approaches_it():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    logits[torch.arange(3), torch.tensor([4, 17, 42])] = logits.max() + 0.1  # a clear winner per row
    # (unseeded, a near-tie between the top two made temperature 0.01 split the mass: a flaky test)
    greedy = logits_to_probs(logits, temperature=0)
    assert torch.equal(greedy.argmax(-1), logits.argmax(-1)) and torch.equal(greedy.sum(-1), torch.ones(3))
    assert (logits_to_probs(logits, temperature=0.01).max(-1).values > 0.99).all()


def test_disabled_filters_change_nothing():
    logits = torch.randn(2, 30)
    plain = logits.softmax(-1)
    for kw in (dict(top_k=0), dict(top_k=None), dict(top_p=1.0), dict(min_p=0.0), dict(min_p=None)):
        torch.testing.assert_close(logits_to_probs(logits, **kw), plain)


def test_sampled_frequencies_match_the_probabilities():
    probs = logits_to_probs(torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]), top_p=0.95)
    n = 40_000
    draws = sample(probs.expand(n, -1), torch.Generator().manual_seed(0))[:, 0]
    freq = torch.bincount(draws, minlength=6).float() / n
    # 5 standard errors of a binomial proportion: fails for a wrong distribution, not by chance.
    tolerance = 5 * torch.sqrt(probs[0] * (1 - probs[0]) / n) + 1e-9
    assert ((freq - probs[0]).abs() <= tolerance).all(), (freq, probs)
    assert freq[probs[0] == 0].sum() == 0


def test_the_same_cpu_generator_seed_gives_the_same_samples():
    probs = torch.softmax(torch.randn(4, 100), -1)
    a = sample(probs, torch.Generator().manual_seed(7))
    b = sample(probs, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(temperature=-0.1), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature="hot"), TypeError, "temperature"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_k=2.5), TypeError, "top_k"),
    (dict(top_k=True), TypeError, "top_k"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=-0.2), ValueError, "top_p"),
    (dict(top_p=1.01), ValueError, "top_p"),
    (dict(top_p=float("nan")), ValueError, "top_p"),
    (dict(min_p=-0.01), ValueError, "min_p"),
    (dict(min_p=1.5), ValueError, "min_p"),
    (dict(min_p=float("nan")), ValueError, "min_p"),
])
def test_bad_sampling_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        logits_to_probs(torch.randn(1, 10), **kwargs)


# -- SamplingConfig: the settings as one checked object ----------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(temperature=-0.1), ValueError, r"temperature must be a finite number >= 0 \(0 means greedy\), got -0.1"),
    (dict(temperature="hot"), TypeError, "temperature must be a finite number >= 0.*got 'hot'"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(top_k=-1), ValueError, r"top_k must be None or an int >= 0 \(0 or None disables it\), got -1"),
    (dict(top_k=2.5), TypeError, "top_k must be None or an int >= 0"),
    (dict(top_k=True), TypeError, "top_k"),
    (dict(top_p=0.0), ValueError, r"top_p must be None or a number in \(0, 1\]"),
    (dict(top_p=float("nan")), ValueError, "top_p"),
    (dict(min_p=1.5), ValueError, r"min_p must be None or a number in \[0, 1\]"),
    (dict(generator=123), TypeError, "generator must be a torch.Generator or None, got int"),
])
def test_sampling_config_refuses_bad_values_naming_them(kwargs, error, match):
    with pytest.raises(error, match=match):
        SamplingConfig(**kwargs)


def test_sampling_config_is_frozen_and_filters_like_the_keywords():
    config = SamplingConfig(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05)
    with pytest.raises(AttributeError):
        config.temperature = 2.0
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(1))
    assert torch.equal(config.probs(logits), logits_to_probs(logits, temperature=0.8, top_k=40, top_p=0.9, min_p=0.05))
    assert SamplingConfig(temperature=0).greedy and not config.greedy
    assert SamplingConfig() == SamplingConfig(1.0, None, None, None, None)


def test_resolve_sampling_takes_one_or_the_other():
    config = SamplingConfig(temperature=0.5)
    assert resolve_sampling(config) is config
    assert resolve_sampling(top_k=3) == SamplingConfig(top_k=3)
    with pytest.raises(TypeError, match="not both: got sampling= and temperature="):
        resolve_sampling(config, temperature=0.7)
    with pytest.raises(TypeError, match="sampling must be a kvlab.sampling.SamplingConfig"):
        resolve_sampling(dict(temperature=0.5))
