"""The chapter 5 checks pass right answers and catch the stub and plausible wrong answers."""

import time

import pytest
import torch

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


# -- my_kl_divergence -------------------------------------------------------------------------

def kl(logits_ref, logits_other):
    log_p = torch.log_softmax(logits_ref.float(), dim=-1)
    log_q = torch.log_softmax(logits_other.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def kl_stub(logits_ref, logits_other):
    raise NotImplementedError  # your code here


def kl_naive(logits_ref, logits_other):
    p = torch.softmax(logits_ref.float(), dim=-1)
    q = torch.softmax(logits_other.float(), dim=-1)
    return (p * (p.log() - q.log())).sum(-1).mean()


def kl_reversed(logits_ref, logits_other):
    return kl(logits_other, logits_ref)


def kl_summed(logits_ref, logits_other):
    return kl(logits_ref, logits_other) * logits_ref.shape[:-1].numel()


def kl_per_position(logits_ref, logits_other):
    log_p = torch.log_softmax(logits_ref.float(), dim=-1)
    log_q = torch.log_softmax(logits_other.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def test_kl_passes_on_a_correct_answer(capsys):
    checks.check_kl_divergence(kl)
    checks.check_kl_divergence(lambda a, b: float(kl(a, b)))
    assert "passed" in capsys.readouterr().out


def test_kl_fails_on_the_stub(assert_not_done):
    assert_not_done(lambda: checks.check_kl_divergence(kl_stub))


@pytest.mark.parametrize("wrong, match", [
    (kl_naive, "log_softmax"),
    (kl_reversed, r"KL\(q \|\| p\)"),
    (kl_summed, "Average over the positions"),
    (kl_per_position, "one number"),
])
def test_kl_catches_wrong_answers(wrong, match):
    with pytest.raises(AssertionError, match=match):
        checks.check_kl_divergence(wrong)
