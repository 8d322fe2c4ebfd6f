"""Checks for chapter 5, measuring the cache.

The stopwatch check runs the learner's timer against a simulated accelerator: launching work
returns at once and the work finishes later, as on a GPU, so a timer that forgets to
synchronise measures nothing. The byte count is checked against the model's own parameters and
`kv_cache_bytes`; the batch at which a decode step turns compute-bound against the same counts
on shape-only (meta) models. The bfloat16 experiment takes the learner's measured step times,
not a ratio alone; the check measures again, the two models' steps alternating, in several rounds,
and accepts the learner's ratio within the band its own rounds span, widened by a margin, so the
band grows with the machine's noise and a busy machine cannot fail a correct measurement.
"""

from __future__ import annotations

import copy
import math
import numbers
import statistics
import time

import torch

from ...cache import kv_cache_bytes
from ...device import synchronize
from ...generation import decode_step, prefill
from ...gpt import GPT, GPTConfig
from ._common import call_learner, learner_check, passed, require_answer

__all__ = ["check_time_steps", "check_decode_bytes", "check_compute_bound_batch", "check_bf16_step_times"]


# -- exercise: a fair stopwatch ---------------------------------------------------------------

class SimulatedDevice:
    """An accelerator in miniature: `step()` queues work and returns at once; `sync()` waits for it.

    The first `slow_calls` steps cost `slow` seconds (first-call set-up, as in a real warm-up),
    every later one `fast` seconds. Work queues: a step launched while the device is busy
    starts when the earlier work ends.
    """

    def __init__(self, slow_calls: int = 1, slow: float = 0.25, fast: float = 0.01):
        self.slow_calls, self.slow, self.fast = slow_calls, slow, fast
        self.busy_until = time.perf_counter()
        self.steps = 0
        self.syncs = 0

    def step(self) -> None:
        cost = self.slow if self.steps < self.slow_calls else self.fast
        self.steps += 1
        self.busy_until = max(self.busy_until, time.perf_counter()) + cost

    def sync(self) -> None:
        self.syncs += 1
        wait = self.busy_until - time.perf_counter()
        if wait > 0:
            time.sleep(wait)


@learner_check
def check_time_steps(fn) -> None:
    """`fn(step, sync, warmup, repeats) -> list of seconds`: a timer that is fair to asynchronous devices."""
    for warmup, repeats, slow_calls in ((1, 6, 1), (3, 4, 3), (2, 3, 1)):
        device = SimulatedDevice(slow_calls=slow_calls)
        times = call_learner(fn, device.step, device.sync, warmup, repeats, name="my_time_steps")
        label = f"warmup={warmup}, repeats={repeats}"
        device.sync()  # let any work still queued finish before the next case
        if isinstance(times, torch.Tensor):
            times = times.tolist()
        if not isinstance(times, (list, tuple)) or not all(
                isinstance(t, numbers.Real) and not isinstance(t, bool) for t in times):
            raise AssertionError(f"[{label}] return a list of durations in seconds (floats), got {times!r}")
        if len(times) != repeats:
            raise AssertionError(f"[{label}] return one duration per timed call: expected {repeats}, got {len(times)}")
        if device.steps != warmup + repeats:
            raise AssertionError(f"[{label}] step() was called {device.steps} times; expected {warmup} untimed "
                                 f"warm-up calls and then {repeats} timed ones")
        if max(times) > 5:
            raise AssertionError(f"[{label}] these look like milliseconds ({times[0]:.3g}, ...): return seconds")
        if min(times) < 0.5 * device.fast:
            raise AssertionError(
                f"[{label}] some calls took {min(times) * 1e3:.2f} ms, but each step's work takes "
                f"{device.fast * 1e3:.0f} ms: step() only launches the work, as on a GPU. Call sync() "
                "before you stop the clock.")
        if times[0] > device.fast + 0.5 * device.slow:
            raise AssertionError(
                f"[{label}] the first timed call took {times[0] * 1e3:.0f} ms, the others about "
                f"{sorted(times)[len(times) // 2] * 1e3:.0f} ms: the warm-up's work was still running when "
                "its clock started. Call sync() before you start the clock too.")
        if max(times) > device.fast + 0.5 * device.slow:
            raise AssertionError(f"[{label}] a timed call took {max(times) * 1e3:.0f} ms: did the warm-up calls "
                                 "run first, and is each call timed on its own?")
    passed("my_time_steps")


# -- exercise: the bytes a decode step reads --------------------------------------------------

def decode_bytes(model: GPT, context_len: int, batch_size: int) -> int:
    """The reference: every weight the step multiplies or adds, once, plus the cache it reads."""
    c = model.config
    matrices = list(model.blocks.parameters()) + list(model.norm_f.parameters()) + list(model.lm_head.parameters())
    weights = sum(p.numel() for p in matrices) * model.dtype.itemsize
    return weights + kv_cache_bytes(c.n_layers, c.n_kv_heads, c.head_dim, context_len, batch_size, model.dtype)


def _meta_model(dtype=torch.float32, **config) -> GPT:
    with torch.device("meta"):  # shapes only: no memory, no random numbers
        return GPT(GPTConfig(**config)).to(dtype)


@learner_check
def check_decode_bytes(fn) -> None:
    """`fn(model, context_len, batch_size) -> int`: bytes one decode step reads from memory."""
    gpt2 = dict(vocab_size=50257, max_seq_len=1024, d_model=768, n_layers=12, n_heads=12)
    cases = [
        ("GPT-2 small, fp32, 32 cached tokens", _meta_model(**gpt2), 32, 1),
        ("GPT-2 small, fp32, batch 8 at 1023 tokens", _meta_model(**gpt2), 1023, 8),
        ("GPT-2 small in bfloat16", _meta_model(torch.bfloat16, **gpt2), 500, 2),
        ("a Llama-style model: untied output layer, 2 of 8 heads cache keys",
         _meta_model(vocab_size=1000, max_seq_len=512, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2,
                     norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False), 300, 3),
        ("an empty cache", _meta_model(vocab_size=256, max_seq_len=64, d_model=64, n_layers=2, n_heads=4), 0, 4),
    ]
    for label, model, context_len, batch in cases:
        got = call_learner(fn, model, context_len, batch, name="my_decode_bytes")
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, bool) or not isinstance(got, numbers.Real) or got != int(got):
            raise AssertionError(f"[{label}] return a whole number of bytes (an int), got {got!r}")
        got, expected = int(got), decode_bytes(model, context_len, batch)
        if got == expected:
            continue
        c, elt = model.config, model.dtype.itemsize
        cache = kv_cache_bytes(c.n_layers, c.n_kv_heads, c.head_dim, context_len, batch, model.dtype)
        weights = expected - cache
        tok = model.tok_emb.weight.numel() * elt
        pos = model.pos_emb.weight.numel() * elt if model.pos_emb is not None else 0
        hint = "Count every parameter the step multiplies by or adds (once), then add the cache it reads."
        if cache and got == weights:
            hint = "That is the weights alone: the step's queries also read every cached key and value."
        elif got == weights * batch + cache and batch > 1:
            hint = ("The weights are read once per step for the whole batch: every sequence's row is "
                    "multiplied by the same matrix while it is in the processor.")
        elif cache and got == weights + cache // c.n_kv_heads * c.n_heads and c.n_kv_heads != c.n_heads:
            hint = "The cache holds n_kv_heads heads per layer, not n_heads."
        elif got == expected // elt * 4 and elt != 4:
            hint = f"This model is in {model.dtype}: {elt} bytes per number, not 4."
        elif got in (expected + pos, expected + tok + pos, expected + tok) or (
                c.tie_embeddings and got in (expected + tok - pos, expected - tok + pos)):
            hint = ("The step looks up one row of the embedding tables per sequence, which is negligible, so "
                    "leave the tables out; but with tied embeddings the output layer multiplies by the whole "
                    "token table (count it once).")
        elif c.tie_embeddings and got == expected - tok:
            hint = "The output layer (tied to the token embedding) is the largest matrix the step reads."
        raise AssertionError(f"[{label}] got {got:,} bytes, expected {expected:,}. {hint}")
    passed("my_decode_bytes")


# -- exercise: when does batching stop being free? ------------------------------------------

def compute_bound_batch(model: GPT, context_len: int, flops_per_s: float, bytes_per_s: float, *,
                        flops_per_weight: float = 2.0, cache_per_sequence: bool = True,
                        heads_per_cached: int | None = None, bytes_per_number: int | None = None) -> float:
    """The reference: the batch size B at which a decode step's arithmetic time equals its memory time.

    Per step, with P weights, C cached numbers per sequence and b bytes per number:
    arithmetic 2·B·(P + g·C) floating-point operations (each cached number is read by the g query
    heads of its group), memory (P + B·C)·b bytes. Equal times give
    B = P·b/bw ÷ (2(P + g·C)/F − C·b/bw); when that divisor is not positive the cache grows as
    fast as the arithmetic and the step never turns compute-bound: `math.inf`. The keywords
    switch in catalogued mistakes, so the check can name the one a learner made.
    """
    c = model.config
    weights = [*model.blocks.parameters(), *model.norm_f.parameters(), *model.lm_head.parameters()]
    P = sum(p.numel() for p in {id(p): p for p in weights}.values())
    C = c.n_layers * 2 * c.n_kv_heads * c.head_dim * context_len
    g = c.n_heads // c.n_kv_heads if heads_per_cached is None else heads_per_cached
    b = model.dtype.itemsize if bytes_per_number is None else bytes_per_number
    if cache_per_sequence:
        divisor = flops_per_weight * (P + g * C) / flops_per_s - C * b / bytes_per_s
        return P * b / bytes_per_s / divisor if divisor > 0 else math.inf
    # the mistake of reading the cache once for the whole batch, like the weights
    return (P + C) * b / bytes_per_s / (flops_per_weight * (P + g * C) / flops_per_s)


@learner_check
def check_compute_bound_batch(fn) -> None:
    """`fn(model, context_len, flops_per_s, bytes_per_s) -> float`: the batch size at which a decode
    step's arithmetic takes as long as its memory reads (`math.inf` if it never does)."""
    gpt2 = dict(vocab_size=50257, max_seq_len=1024, d_model=768, n_layers=12, n_heads=12)
    llama = dict(vocab_size=32000, max_seq_len=4096, d_model=512, n_layers=4, n_heads=8, n_kv_heads=2,
                 norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False)
    fp32, bf16 = (lambda: _meta_model(**gpt2)), (lambda: _meta_model(torch.bfloat16, **gpt2))
    cases = [
        ("GPT-2 small, fp32, an empty cache", fp32, 0, 1e12, 1e11),
        ("GPT-2 small, fp32, 32 cached tokens", fp32, 32, 2e11, 2e10),
        ("GPT-2 small in bfloat16, 32 cached tokens", bf16, 32, 1e12, 1e11),
        ("GPT-2 small in bfloat16, 1000 cached tokens", bf16, 1000, 1e13, 1e12),
        ("GPT-2 small, fp32, 1000 cached tokens", fp32, 1000, 4e10, 2e10),
        ("a Llama-style model, 4 query heads per cached head, 3000 cached tokens",
         lambda: _meta_model(**llama), 3000, 1e12, 4e11),
    ]
    name = "my_compute_bound_batch"
    for label, build, context_len, F, bw in cases:
        model = build()
        got = call_learner(fn, model, context_len, F, bw, name=name)
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, bool) or not isinstance(got, numbers.Real):
            raise AssertionError(f"[{label}] return a number (a batch size, or math.inf), got {got!r}")
        got = float(got)
        expected = compute_bound_batch(model, context_len, F, bw)
        setting = f"[{label}, {F:.0e} FLOP/s, {bw:.0e} bytes/s]"
        if math.isinf(expected) and math.isinf(got) and got > 0:
            continue
        if math.isfinite(expected) and math.isfinite(got) and math.isclose(got, expected, rel_tol=1e-3):
            continue
        def near(**mistake):
            value = compute_bound_batch(model, context_len, F, bw, **mistake)
            return (math.isinf(value) and math.isinf(got)) or (
                math.isfinite(value) and math.isfinite(got) and math.isclose(got, value, rel_tol=1e-3))
        hint = ("Write the step's arithmetic time and its memory time as functions of B, set them equal "
                "and solve for B.")
        c = model.config
        if math.isinf(expected):
            hint = (f"here the step never becomes compute-bound, whatever the batch: each sequence adds its "
                    "cache to the bytes read, and compare how fast that grows with how fast the arithmetic "
                    "grows. Return math.inf when no positive B makes the times equal.")
        elif got < 0:
            hint = "a batch size is positive: did the equation's solution come out negative? Then there is none."
        elif model.dtype.itemsize != 4 and near(bytes_per_number=4):
            hint = f"this model is in {model.dtype}: {model.dtype.itemsize} bytes per number."
        elif near(flops_per_weight=1.0):
            hint = "a multiply-add is two floating-point operations: 2 per weight per sequence."
        elif context_len and near(cache_per_sequence=False):
            hint = ("every sequence has its own cache: the weights are read once per step, but the cache "
                    "bytes grow with the batch.")
        elif c.n_heads != c.n_kv_heads and near(heads_per_cached=1):
            hint = (f"with {c.n_heads} query heads and {c.n_kv_heads} key/value heads, every cached number is "
                    f"read by {c.n_heads // c.n_kv_heads} query heads: that much arithmetic per cached byte.")
        elif context_len and near(heads_per_cached=0):
            hint = "the attention over the cache does arithmetic too: 2 operations per cached number per query head."
        elif context_len == 0 and math.isclose(got, 1 / expected, rel_tol=1e-3):
            hint = "upside down: the larger the processor's FLOP/s, the larger the batch it takes to keep it busy."
        raise AssertionError(f"{setting} got {got:.4g}, expected {expected:.4g}. Hint: {hint}")
    passed(name)


# -- experiment: what bfloat16 buys on this machine ---------------------------------------

MIN_STEPS = 6  # timed decode steps per dtype the learner's answer must hold


def bf16_round_ratios(model: GPT, *, rounds: int = 4, steps: int = 5,
                      prompt_len: int = 8) -> tuple[list[float], float]:
    """bfloat16 ÷ float32 decode-step time of `model` (float32), batch 1, after a `prompt_len`-token
    prompt, on the model's device: one ratio of medians per round of `steps` steps of each, and
    the median float32 step in seconds.

    Within a round the two models' steps alternate, so both share whatever else the machine is
    doing; the spread of the rounds' ratios shows how much that disturbs the measurement.
    """
    device = model.device
    other = copy.deepcopy(model).to(torch.bfloat16)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len),
                           generator=torch.Generator().manual_seed(0)).to(device)
    ratios, fp32_steps = [], []
    with torch.inference_mode():
        runs = []
        for m in (model, other):
            cache = m.new_cache(1, max_seq_len=prompt_len + 1 + rounds * steps)
            token = prefill(m, prompt, cache).argmax(-1, keepdim=True)
            decode_step(m, token, cache)  # warm-up
            runs.append((m, token, cache))
        for _ in range(rounds):
            times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
            for _ in range(steps):
                for m, token, cache in runs:
                    synchronize(device)
                    t0 = time.perf_counter()
                    decode_step(m, token, cache)
                    synchronize(device)
                    times[m.dtype].append(time.perf_counter() - t0)
            ratios.append(statistics.median(times[torch.bfloat16]) / statistics.median(times[torch.float32]))
            fp32_steps += times[torch.float32]
    return ratios, statistics.median(fp32_steps)


BF16_MARGIN = 0.35  # relative, on each side of the band the check's own rounds span
FP32_STEP_FACTOR = 8  # the learner's float32 step and the check's, apart by more: not the same thing timed


def _step_times(value, label: str) -> list[float]:
    # One list of measured durations, validated; `label` names it in messages.
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, numbers.Real):
        raise AssertionError(f"{label}: give the measured step times (a list of seconds), not one number. "
                             "The check needs your measurements, not only their ratio.")
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(t, numbers.Real) and not isinstance(t, bool) for t in value):
        raise AssertionError(f"{label} should be a list of durations in seconds, got {value!r}")
    if len(value) < MIN_STEPS:
        raise AssertionError(f"{label} holds {len(value)} times: time at least {MIN_STEPS} decode steps of "
                             "each model, so that one slow step cannot decide the median")
    if not all(t > 0 for t in value):
        raise AssertionError(f"{label} should hold positive durations in seconds, got {value!r}")
    if len(set(value)) == 1:
        raise AssertionError(f"{label} holds the same time {len(value)} times: measured times always "
                             "differ a little. Time the steps; do not fill in a prediction.")
    return [float(t) for t in value]


@learner_check
def check_bf16_step_times(answer, model: GPT) -> None:
    """`answer`: `(float32_times, bfloat16_times)`, the measured durations in seconds of at least six
    batch-1 decode steps of `model` (float32) and of a bfloat16 copy of it, after an 8-token prompt,
    on its device, the two models' steps alternating. The check measures the ratio of medians again,
    alternating too, in several rounds, and accepts the learner's ratio within the band its rounds
    span, widened by `BF16_MARGIN` on each side; a busy machine widens the band with the spread."""
    name = "my_bf16_step_times"
    value = require_answer(answer, name)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        raise AssertionError(f"{name} = {value!r} is one number: give the measurements themselves, "
                             "(float32 step times, bfloat16 step times), each a list of seconds. "
                             + ("0.5 is what the bytes predict; the exercise asks what your machine does. "
                                if value == 0.5 else ""))
    if isinstance(value, dict):
        if set(value) != {torch.float32, torch.bfloat16}:
            raise AssertionError(f"{name}: a dict should have the keys torch.float32 and torch.bfloat16, got "
                                 f"{sorted(map(str, value))}")
        value = (value[torch.float32], value[torch.bfloat16])
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise AssertionError(f"{name} should be a pair (float32 step times, bfloat16 step times), got {value!r}")
    if model.dtype != torch.float32:
        raise ValueError(f"pass the float32 model to the check; this one is in {model.dtype}")
    fp32 = _step_times(value[0], f"{name}[0] (the float32 steps)")
    bf16 = _step_times(value[1], f"{name}[1] (the bfloat16 steps)")
    ratio = statistics.median(bf16) / statistics.median(fp32)

    rounds, step_s = bf16_round_ratios(model)
    yours_s = statistics.median(fp32)
    if not 1 / FP32_STEP_FACTOR <= yours_s / step_s <= FP32_STEP_FACTOR:
        unit = ("these look like milliseconds: give seconds. " if 300 < yours_s / step_s < 3000 else "")
        raise AssertionError(
            f"your float32 decode step took {yours_s:.3g} s (the median of your times), the check's "
            f"{step_s:.3g} s: more than {FP32_STEP_FACTOR:g}x apart, so they do not time the same thing. "
            f"{unit}Time one decode step (one new token for one sequence), not the prefill or a whole "
            "generation.")
    low, high = min(rounds) / (1 + BF16_MARGIN), max(rounds) * (1 + BF16_MARGIN)
    if not low <= ratio <= high:  # a busy moment can spoil one measurement: measure once more
        rounds += bf16_round_ratios(model)[0]
        low, high = min(rounds) / (1 + BF16_MARGIN), max(rounds) * (1 + BF16_MARGIN)
    if low <= ratio <= high:
        print(f"your bfloat16 / float32 step ratio: {ratio:.2f}; the check measured "
              f"{', '.join(f'{r:.2f}' for r in rounds)}")
        passed(name)
        return
    hint = ("time the two models the same way (batch 1, an 8-token prompt, decode steps after a warm-up), "
            "alternating one step of each, and keep float32 first in the pair.")
    if low <= 1 / ratio <= high and not low <= 1 <= high:
        hint = "upside down: the pair is (float32 times, bfloat16 times), in that order."
    elif math.isclose(ratio, 0.5, rel_tol=1e-6):
        hint = ("exactly 0.5 is what the bytes predict, not what this machine does. Whether bfloat16 pays "
                "depends on the processor's instructions for it: measure both steps.")
    raise AssertionError(f"your times give bfloat16 / float32 = {ratio:.3g}, but the check measured "
                         f"{', '.join(f'{r:.2f}' for r in rounds)} here (it accepts {low:.2f} to {high:.2f}). "
                         f"Hint: {hint}")
