"""The chapter 5 checks pass right answers and catch the stub and plausible wrong answers."""

import copy
import math
import time

import pytest
import torch

import kvlab
from kvlab.course.checks import measuring as checks


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


# -- my_bf16_step_times -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def bf16_model():
    torch.manual_seed(0)
    return kvlab.GPT(kvlab.GPTConfig(vocab_size=512, max_seq_len=64, d_model=128, n_layers=2, n_heads=4)).eval()


def measure_alternating(model, steps=16):
    """The exercise's solution: decode steps of the float32 model and a bfloat16 copy, alternating."""
    models = (model, copy.deepcopy(model).to(torch.bfloat16))
    prompt = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    runs, times = [], ([], [])
    with torch.inference_mode():
        for m in models:
            cache = m.new_cache(1, max_seq_len=8 + steps + 3)
            token = kvlab.prefill(m, prompt, cache).argmax(-1, keepdim=True)
            for _ in range(3):  # warm-up
                kvlab.decode_step(m, token, cache)
            runs.append((m, token, cache))
        for _ in range(steps):
            for (m, token, cache), out in zip(runs, times):
                t0 = time.perf_counter()
                kvlab.decode_step(m, token, cache)
                out.append(time.perf_counter() - t0)
    return times


def fake_times(ratio, fp32_s=0.002, n=8):
    """Step times whose ratio of medians is `ratio`, with the small jitter real times have."""
    fp32 = [fp32_s * (1 + 0.01 * i) for i in range(n)]
    return fp32, [t * ratio for t in fp32]


def test_bf16_times_pass_on_a_live_measurement(capsys):
    # Large enough that a step is mostly arithmetic, not the jitter of a busy machine.
    torch.manual_seed(0)
    model = kvlab.GPT(kvlab.GPTConfig(vocab_size=4096, max_seq_len=64, d_model=512, n_layers=4, n_heads=8)).eval()
    checks.check_bf16_step_times(measure_alternating(model), model)
    assert "my_bf16_step_times: all checks passed" in capsys.readouterr().out


def test_bf16_times_fail_on_the_stub(bf16_model, assert_not_done):
    assert_not_done(lambda: checks.check_bf16_step_times(None, bf16_model))


def rounds_of(*ratios, step_s=0.002):
    """A fixed "measurement" in place of the check's own: no timing noise in these tests."""
    return lambda model: (list(ratios), step_s)


def test_bf16_band_follows_the_checks_own_spread(bf16_model, monkeypatch, capsys):
    # A quiet machine: rounds agree, the band is narrow. A busy one: rounds spread, the band widens.
    monkeypatch.setattr(checks, "bf16_round_ratios", rounds_of(0.9, 0.92, 0.91, 0.9))
    with pytest.raises(AssertionError, match="accepts 0.67 to 1.24"):
        checks.check_bf16_step_times(fake_times(1.4), bf16_model)
    monkeypatch.setattr(checks, "bf16_round_ratios", rounds_of(0.9, 1.3, 1.1, 0.95))
    checks.check_bf16_step_times(fake_times(1.4), bf16_model)
    assert "all checks passed" in capsys.readouterr().out


QUIET = (0.88, 0.9, 0.93, 0.9)  # bfloat16 a little faster
EMULATED = (1.9, 2.0, 2.1, 2.0)  # no bfloat16 instructions: slower
EVEN = (0.97, 1.0, 1.03, 1.0)


@pytest.mark.parametrize("rounds, answer, match", [
    (QUIET, 0.5, "one number.*bytes predict"),  # the prediction, unmeasured
    (QUIET, 0.9, "one number"),  # a ratio without the measurements
    (QUIET, fake_times(0.9, fp32_s=2.0), "milliseconds"),  # 2 ms written as 2.0
    (QUIET, fake_times(0.9, fp32_s=0.05), "not the prefill or a whole"),  # 25 steps timed as one
    (QUIET, (fake_times(0.9)[0][:4], fake_times(0.9)[1][:4]), "at least 6"),
    (QUIET, ([0.002] * 8, [0.0018] * 8), "same time"),  # filled in, not measured
    (EMULATED, (fake_times(2.0)[1], fake_times(2.0)[0]), "upside down"),  # the pair swapped
    (EVEN, fake_times(0.5), "bytes predict"),  # 0.5 made up as times, on a machine that measures 1.0
    (QUIET, fake_times(3.0), "accepts"),
    (QUIET, ("fast", "slow"), "list of durations"),
    (QUIET, (fake_times(0.9)[0],), "pair"),
    (QUIET, {"fp32": [0.1], "bf16": [0.1]}, "keys torch.float32"),
])
def test_bf16_times_catch_wrong_answers(bf16_model, monkeypatch, rounds, answer, match):
    monkeypatch.setattr(checks, "bf16_round_ratios", rounds_of(*rounds))
    with pytest.raises(AssertionError, match=match):
        checks.check_bf16_step_times(answer, bf16_model)


@pytest.mark.parametrize("rounds, ratio", [(QUIET, 0.9), (EMULATED, 2.0), (EVEN, 1.0)])
def test_bf16_times_pass_right_answers(bf16_model, monkeypatch, capsys, rounds, ratio):
    monkeypatch.setattr(checks, "bf16_round_ratios", rounds_of(*rounds))
    checks.check_bf16_step_times(fake_times(ratio), bf16_model)
    fp32, bf16 = fake_times(ratio)
    checks.check_bf16_step_times({torch.float32: fp32, torch.bfloat16: bf16}, bf16_model)  # a dict by dtype too
    assert capsys.readouterr().out.count("all checks passed") == 2


def test_bf16_times_measure_again_before_failing(bf16_model, monkeypatch, capsys):
    measured = iter([([3.0, 3.1, 2.9, 3.0], 0.002), ([1.0, 1.05, 0.95, 1.0], 0.002)])  # a busy spell, then not
    monkeypatch.setattr(checks, "bf16_round_ratios", lambda model: next(measured))
    checks.check_bf16_step_times(fake_times(1.1), bf16_model)
    assert "all checks passed" in capsys.readouterr().out


def test_bf16_round_ratios_measure_both_dtypes(bf16_model):
    ratios, step_s = checks.bf16_round_ratios(bf16_model, rounds=2, steps=3)
    assert len(ratios) == 2 and all(r > 0 for r in ratios) and 0 < step_s < 1
    assert bf16_model.dtype == torch.float32  # the model passed in is left as it was
