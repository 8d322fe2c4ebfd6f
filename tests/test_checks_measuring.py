"""The chapter 5 checks pass right answers and catch the stub and plausible wrong answers."""

import math
import time

import pytest
import torch

import kvlab
from kvlab.checks import measuring as checks


# -- my_time_steps ----------------------------------------------------------------------------

def time_steps(step, sync, warmup, repeats):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def time_steps_stub(step, sync, warmup, repeats):
    raise NotImplementedError  # your code here


def time_steps_no_sync(step, sync, warmup, repeats):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def time_steps_sync_after_only(step, sync, warmup, repeats):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def time_steps_no_warmup(step, sync, warmup, repeats):
    return time_steps(step, sync, 0, repeats)


def time_steps_ms(step, sync, warmup, repeats):
    return [1000 * t for t in time_steps(step, sync, warmup, repeats)]


def time_steps_total(step, sync, warmup, repeats):
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    sync()
    return [time.perf_counter() - t0]


def test_timer_passes_on_a_correct_answer(capsys):
    checks.check_time_steps(time_steps)
    assert "passed" in capsys.readouterr().out


def test_timer_fails_on_the_stub(assert_not_done):
    assert_not_done(lambda: checks.check_time_steps(time_steps_stub))


@pytest.mark.parametrize("wrong, match", [
    (time_steps_no_sync, "before you stop the clock"),
    (time_steps_sync_after_only, "before you start the clock"),
    (time_steps_no_warmup, "warm-up"),
    (time_steps_ms, "milliseconds"),
    (time_steps_total, "one duration per timed call"),
])
def test_timer_catches_wrong_answers(wrong, match):
    with pytest.raises(AssertionError, match=match):
        checks.check_time_steps(wrong)


# -- my_decode_bytes --------------------------------------------------------------------------

def decode_bytes(model, context_len, batch_size):
    c = model.config
    elt = model.tok_emb.weight.element_size()
    weights = sum(p.numel() for p in model.blocks.parameters()) + sum(p.numel() for p in model.norm_f.parameters())
    weights += model.lm_head.weight.numel()
    cache = c.n_layers * 2 * c.n_kv_heads * c.head_dim * context_len * batch_size
    return (weights + cache) * elt


def decode_bytes_stub(model, context_len, batch_size):
    raise NotImplementedError  # your code here


def decode_bytes_weights_only(model, context_len, batch_size):
    return decode_bytes(model, 0, batch_size)


def decode_bytes_per_sequence(model, context_len, batch_size):
    return batch_size * decode_bytes(model, context_len, 1)


def decode_bytes_all_params(model, context_len, batch_size):
    c = model.config
    extra = model.num_params() - (decode_bytes(model, 0, 1) // model.tok_emb.weight.element_size())
    return decode_bytes(model, context_len, batch_size) + extra * model.tok_emb.weight.element_size()


def decode_bytes_fp32(model, context_len, batch_size):
    return decode_bytes(model, context_len, batch_size) // model.tok_emb.weight.element_size() * 4


def decode_bytes_n_heads(model, context_len, batch_size):
    c = model.config
    return decode_bytes(model, 0, 1) + (c.n_layers * 2 * c.n_heads * c.head_dim * context_len * batch_size
                                        * model.tok_emb.weight.element_size())


def test_decode_bytes_passes_on_a_correct_answer(capsys):
    checks.check_decode_bytes(decode_bytes)
    assert "passed" in capsys.readouterr().out


def test_decode_bytes_fails_on_the_stub(assert_not_done):
    assert_not_done(lambda: checks.check_decode_bytes(decode_bytes_stub))


@pytest.mark.parametrize("wrong, match", [
    (decode_bytes_weights_only, "weights alone"),
    (decode_bytes_per_sequence, "once per step for the whole batch"),
    (decode_bytes_all_params, "embedding tables"),
    (decode_bytes_fp32, "bytes per number"),
    (decode_bytes_n_heads, "n_kv_heads"),
])
def test_decode_bytes_catches_wrong_answers(wrong, match):
    with pytest.raises(AssertionError, match=match):
        checks.check_decode_bytes(wrong)


# -- my_compute_bound_batch ------------------------------------------------------------------

def weights_and_cache(model, context_len):
    c = model.config
    P = sum(p.numel() for p in model.blocks.parameters()) + sum(p.numel() for p in model.norm_f.parameters())
    P += model.lm_head.weight.numel()
    return P, c.n_layers * 2 * c.n_kv_heads * c.head_dim * context_len, model.tok_emb.weight.element_size()


def compute_bound_batch(model, context_len, flops_per_s, bytes_per_s):
    P, C, b = weights_and_cache(model, context_len)
    g = model.config.n_heads // model.config.n_kv_heads
    # B * 2 (P + g C) / F = (P + B C) b / bw
    divisor = 2 * (P + g * C) / flops_per_s - C * b / bytes_per_s
    return P * b / bytes_per_s / divisor if divisor > 0 else math.inf


def compute_bound_batch_stub(model, context_len, flops_per_s, bytes_per_s):
    raise NotImplementedError  # your code here


def compute_bound_one_flop(model, context_len, flops_per_s, bytes_per_s):
    return 2 * compute_bound_batch(model, context_len, flops_per_s, bytes_per_s)


def compute_bound_no_cache(model, context_len, flops_per_s, bytes_per_s):
    return compute_bound_batch(model, 0, flops_per_s, bytes_per_s)


def compute_bound_shared_cache(model, context_len, flops_per_s, bytes_per_s):
    P, C, b = weights_and_cache(model, context_len)
    g = model.config.n_heads // model.config.n_kv_heads
    return (P + C) * b / bytes_per_s / (2 * (P + g * C) / flops_per_s)


def compute_bound_no_groups(model, context_len, flops_per_s, bytes_per_s):
    P, C, b = weights_and_cache(model, context_len)
    divisor = 2 * (P + C) / flops_per_s - C * b / bytes_per_s
    return P * b / bytes_per_s / divisor if divisor > 0 else math.inf


def compute_bound_never_inf(model, context_len, flops_per_s, bytes_per_s):
    P, C, b = weights_and_cache(model, context_len)
    g = model.config.n_heads // model.config.n_kv_heads
    return P * b / bytes_per_s / (2 * (P + g * C) / flops_per_s - C * b / bytes_per_s)


def compute_bound_fp32_bytes(model, context_len, flops_per_s, bytes_per_s):
    P, C, b = weights_and_cache(model, context_len)
    g = model.config.n_heads // model.config.n_kv_heads
    divisor = 2 * (P + g * C) / flops_per_s - C * 4 / bytes_per_s
    return P * 4 / bytes_per_s / divisor if divisor > 0 else math.inf


def test_compute_bound_batch_passes_on_a_correct_answer(capsys):
    checks.check_compute_bound_batch(compute_bound_batch)
    assert "my_compute_bound_batch: all checks passed" in capsys.readouterr().out


def test_compute_bound_batch_fails_on_the_stub(assert_not_done):
    assert_not_done(lambda: checks.check_compute_bound_batch(compute_bound_batch_stub))


@pytest.mark.parametrize("wrong, match", [
    (compute_bound_one_flop, "two floating-point operations"),
    (compute_bound_no_cache, "never becomes compute-bound|own cache"),
    (compute_bound_shared_cache, "never becomes compute-bound|own cache"),
    (compute_bound_no_groups, "query heads"),
    (compute_bound_never_inf, "never becomes compute-bound|positive"),
    (compute_bound_fp32_bytes, "bytes per number"),
])
def test_compute_bound_batch_catches_wrong_answers(wrong, match):
    with pytest.raises(AssertionError, match=match):
        checks.check_compute_bound_batch(wrong)


def test_compute_bound_batch_at_an_empty_cache_depends_on_the_machine_only():
    # P cancels: the batch at which the weights' arithmetic catches up with reading them is F·b / (2·bw).
    model = checks._meta_model(vocab_size=50257, max_seq_len=1024, d_model=768, n_layers=12, n_heads=12)
    assert math.isclose(checks.compute_bound_batch(model, 0, 1e12, 1e11), 1e12 * 4 / (2 * 1e11))


# -- my_bf16_step_ratio -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def bf16_model():
    torch.manual_seed(0)
    return kvlab.GPT(kvlab.GPTConfig(vocab_size=512, max_seq_len=64, d_model=128, n_layers=2, n_heads=4)).eval()


def test_bf16_ratio_passes_on_a_live_measurement(bf16_model, capsys):
    checks.check_bf16_step_ratio(checks.bf16_step_ratio(bf16_model), bf16_model)
    assert "my_bf16_step_ratio: all checks passed" in capsys.readouterr().out


def test_bf16_ratio_fails_on_the_stub(bf16_model, assert_not_done):
    assert_not_done(lambda: checks.check_bf16_step_ratio(None, bf16_model))


@pytest.mark.parametrize("ratio, match", [
    (lambda live: 100 * live if live > 0.05 else 1000.0, "percentage|measured"),
    (lambda live: 5 * live, "measured"),
    (lambda live: live / 5, "measured"),
    (lambda live: "0.8", "positive number"),
    (lambda live: -live, "positive number"),
])
def test_bf16_ratio_catches_wrong_answers(bf16_model, monkeypatch, ratio, match):
    monkeypatch.setattr(checks, "bf16_step_ratio", lambda model: 0.9)  # a fixed "measurement": no timing noise
    with pytest.raises(AssertionError, match=match):
        checks.check_bf16_step_ratio(ratio(0.9), bf16_model)


def test_bf16_ratio_names_the_catalogued_mistakes(bf16_model, monkeypatch):
    monkeypatch.setattr(checks, "bf16_step_ratio", lambda model: 2.0)  # bfloat16 emulated: slower
    with pytest.raises(AssertionError, match="upside down"):
        checks.check_bf16_step_ratio(0.5, bf16_model)
    with pytest.raises(AssertionError, match="percentage"):
        checks.check_bf16_step_ratio(200.0, bf16_model)
    monkeypatch.setattr(checks, "bf16_step_ratio", lambda model: 1.0)
    with pytest.raises(AssertionError, match="what the bytes predict"):
        checks.check_bf16_step_ratio(0.5, bf16_model)
    checks.check_bf16_step_ratio(1.2, bf16_model)  # within 30%: passes


def test_bf16_ratio_measures_again_before_failing(bf16_model, monkeypatch, capsys):
    measured = iter([3.0, 1.0])  # one busy moment, then a normal run
    monkeypatch.setattr(checks, "bf16_step_ratio", lambda model: next(measured))
    checks.check_bf16_step_ratio(1.1, bf16_model)
    assert "all checks passed" in capsys.readouterr().out
