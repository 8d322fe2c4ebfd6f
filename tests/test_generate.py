"""generate(): the public contract — shapes, eos, reproducibility and every bad input."""

import pytest
import torch

import kvlab
from conftest import make_model


def test_returns_prompt_plus_new_tokens(model, prompt):
    out = kvlab.generate(model, prompt, 13)
    assert out.shape == (2, 20) and out.dtype == torch.long
    assert torch.equal(out[:, :7], prompt)
    assert torch.equal(kvlab.generate(model, prompt, 0), prompt)


def test_generate_naive_is_the_uncached_path(model, prompt):
    assert torch.equal(kvlab.generate_naive(model, prompt, 20, temperature=0),
                       kvlab.generate(model, prompt, 20, temperature=0, use_cache=False))


def test_seeded_generator_reproduces_and_different_seeds_differ(model, prompt):
    run = lambda seed: kvlab.generate(model, prompt, 40, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_top_k_one_is_greedy(model, prompt):
    assert torch.equal(kvlab.generate(model, prompt, 30, top_k=1, generator=torch.Generator().manual_seed(0)),
                       kvlab.generate(model, prompt, 30, temperature=0))


def test_eos_stops_and_pads(model, prompt):
    greedy = kvlab.generate(model, prompt, 40, temperature=0)
    eos = int(greedy[0, 12])  # a token row 0 emits at step 5
    first = lambda row: next(i for i in range(7, 47) if int(greedy[row, i]) == eos) if eos in greedy[row, 7:].tolist() else None  # noqa: E731,E501
    out = kvlab.generate(model, prompt, 40, temperature=0, eos_id=eos)
    stops = [first(r) for r in range(2)]
    expected_len = 47 if None in stops else max(stops) + 1
    assert out.shape[1] == expected_len
    for r, stop in enumerate(stops):
        end = stop + 1 if stop is not None else expected_len
        assert torch.equal(out[r, :end], greedy[r, :end])
        assert (out[r, end:] == eos).all()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=2.0), TypeError, "max_new_tokens"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(top_k=-3), ValueError, "top_k"),
    (dict(top_k=1.5), TypeError, "top_k"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(min_p=-0.5), ValueError, "min_p"),
    (dict(min_p=2.0), ValueError, "min_p"),
    (dict(eos_id=97), ValueError, "eos_id"),
    (dict(eos_id=-1), ValueError, "eos_id"),
    (dict(generator=123), TypeError, "generator"),
    (dict(max_new_tokens=400), ValueError, "max_seq_len=320"),
    (dict(cache="static"), TypeError, "KVCache"),
    (dict(use_cache=False, cache=None), None, None),
])
def test_bad_generate_arguments_fail_before_any_work(kwargs, error, match):
    model = make_model("gpt2")
    calls = []
    model.tok_emb.register_forward_hook(lambda *a: calls.append(1))
    kwargs = {"max_new_tokens": 5, **kwargs}
    if error is None:  # the control case: valid arguments do run the model
        kvlab.generate(model, torch.zeros(1, 3, dtype=torch.long), **kwargs)
        assert calls
        return
    with pytest.raises(error, match=match):
        kvlab.generate(model, torch.zeros(1, 3, dtype=torch.long), **kwargs)
    assert not calls, "the model ran before the bad argument was rejected"


@pytest.mark.parametrize("idx, error, match", [
    (torch.tensor([[1.0, 2.0]]), TypeError, "integer token ids"),
    (torch.tensor([[5, 97]]), ValueError, "token ids must be in"),
    (torch.tensor([[-4, 1]]), ValueError, "token ids must be in"),
    (torch.zeros(1, 0, dtype=torch.long), ValueError, "at least one token"),
    (torch.zeros(0, 3, dtype=torch.long), ValueError, "at least one token"),
    (torch.tensor([3, 4]), ValueError, r"shape \(B, T\)"),
])
def test_bad_prompts(idx, error, match):
    with pytest.raises(error, match=match):
        kvlab.generate(make_model("gpt2"), idx, 5)


def test_other_bad_arguments():
    model = make_model("gpt2")
    x = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="kvlab.GPT"):
        kvlab.generate(torch.nn.Linear(2, 2), x, 5)
    with pytest.raises(ValueError, match="batch_size=1"):
        kvlab.generate(model, x, 5, cache=model.new_cache(1))
    with pytest.raises(ValueError, match="use_cache=False"):
        kvlab.generate(model, x, 5, use_cache=False, cache=model.new_cache(2))
    # A sliding cache does not let a learned-position model run past its positions.
    with pytest.raises(ValueError, match="max_seq_len"):
        kvlab.generate(model, x, 400, cache=model.new_cache(2, kind="sliding", window=8))


def test_numpy_scalars_are_accepted_like_python_numbers():
    np = pytest.importorskip("numpy")
    model = make_model("gpt2")
    x = torch.zeros(1, 3, dtype=torch.long)
    a = kvlab.generate(model, x, np.int64(6), top_k=np.int64(5), temperature=np.float32(0.8),
                       generator=torch.Generator().manual_seed(0))
    b = kvlab.generate(model, x, 6, top_k=5, temperature=float(np.float32(0.8)), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_prompt_on_another_device_is_a_clear_error():
    with pytest.raises(ValueError, match="idx is on meta but the model is on cpu"):
        kvlab.generate(make_model("gpt2"), torch.zeros(1, 3, dtype=torch.long, device="meta"), 5)


def test_stats_are_filled_and_checked(model, prompt):
    stats = {}
    out = kvlab.generate(model, prompt, 9, temperature=0, stats=stats)
    assert out.shape == (2, 16) and stats["new_tokens"] == 9
    assert stats["total_s"] >= stats["prefill_s"] + stats["decode_s"] - 1e-6 and stats["prefill_s"] > 0
    with pytest.raises(TypeError, match="stats"):
        kvlab.generate(model, prompt, 3, stats=[])


def test_compile_argument_checks():
    model = make_model("gpt2")  # compile=True: checked before anything compiles
    idx = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="use_cache"):
        kvlab.generate(model, idx, 4, use_cache=False, compile=True)
    with pytest.raises(ValueError, match="kind"):
        kvlab.generate(model, idx, 4, cache=model.new_cache(1, kind="dynamic"), compile=True)
    with pytest.raises(TypeError, match="compile"):
        kvlab.generate(model, idx, 4, compile="yes")


@pytest.mark.parametrize("settings", [dict(temperature=0), dict(temperature=0.9, top_k=20),
                                      dict(temperature=1.2, top_p=0.8, min_p=0.05)])
def test_a_sampling_config_gives_the_same_tokens_as_the_keywords(model, prompt, settings):
    by_keywords = kvlab.generate(model, prompt, 25, **settings, generator=torch.Generator().manual_seed(3))
    config = kvlab.SamplingConfig(**settings, generator=torch.Generator().manual_seed(3))
    assert torch.equal(kvlab.generate(model, prompt, 25, sampling=config), by_keywords)
    logits = torch.randn(2, 97, generator=torch.Generator().manual_seed(0))
    config = kvlab.SamplingConfig(**settings, generator=torch.Generator().manual_seed(1))
    assert torch.equal(kvlab.next_token(logits, config),
                       kvlab.next_token(logits, **settings, generator=torch.Generator().manual_seed(1)))


def test_sampling_given_twice_or_of_the_wrong_type_is_refused_before_any_work():
    model = make_model("gpt2")
    calls = []
    model.tok_emb.register_forward_hook(lambda *a: calls.append(1))
    x = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="not both"):
        kvlab.generate(model, x, 5, sampling=kvlab.SamplingConfig(temperature=0), top_k=5)
    with pytest.raises(TypeError, match="sampling must be a kvlab.sampling.SamplingConfig"):
        kvlab.generate(model, x, 5, sampling={"temperature": 0})
    assert not calls
