"""Checks for chapter 5, measuring the cache.

The stopwatch check runs the learner's timer against a simulated accelerator: launching work
returns at once and the work finishes later, as on a GPU, so a timer that forgets to
synchronise measures nothing. The byte count is checked against the model's own parameters and
`kv_cache_bytes`; the KL divergence against a float32 `log_softmax` reference.
"""

from __future__ import annotations

import numbers
import time

import torch

from ..cache import kv_cache_bytes
from ..gpt import GPT, GPTConfig
from ._common import call_learner, passed, learner_check

__all__ = ["check_time_steps", "check_decode_bytes", "check_kl_divergence"]


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


# -- exercise: what lower precision costs -----------------------------------------------------

def kl_divergence(logits_ref: torch.Tensor, logits_other: torch.Tensor) -> torch.Tensor:
    """The reference: mean over positions of KL(p_ref || p_other), in nats, computed in float32."""
    log_p = torch.log_softmax(logits_ref.float(), dim=-1)
    log_q = torch.log_softmax(logits_other.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


@learner_check
def check_kl_divergence(fn) -> None:
    """`fn(logits_ref, logits_other) -> scalar`: mean KL divergence of other's distribution from ref's."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 40, generator=g) * 3
    extreme = torch.randn(2, 3, 30, generator=g) * 2000  # softmax underflows to exact zeros here
    cases = [
        ("two different distributions", base, torch.randn(6, 40, generator=g) * 3),
        ("the same logits", base, base.clone()),
        ("logits shifted by a constant (the same distributions)", base, base + 7.5),
        ("a batch of sequences (B, T, V)", torch.randn(2, 5, 33, generator=g), torch.randn(2, 5, 33, generator=g)),
        ("float32 against its bfloat16 rounding", base, base.to(torch.bfloat16)),
        ("very confident logits", extreme, extreme + torch.randn(2, 3, 30, generator=g)),
    ]
    for label, ref, other in cases:
        got = call_learner(fn, ref.clone(), other.clone(), name="my_kl_divergence")
        if isinstance(got, torch.Tensor):
            if got.numel() != 1:
                raise AssertionError(f"[{label}] return one number (the mean over positions), got shape "
                                     f"{tuple(got.shape)}")
            got = got.item()
        if isinstance(got, bool) or not isinstance(got, numbers.Real):
            raise AssertionError(f"[{label}] return a number, got {got!r}")
        expected = kl_divergence(ref, other).item()
        if abs(got - expected) <= 1e-4 * max(1.0, abs(expected)):
            continue
        hint = "KL(p || q) = sum over the vocabulary of p * (log p - log q), averaged over positions."
        if got != got or abs(got) == float("inf"):
            hint = ("Got nan or inf: softmax underflows to 0 for very unlikely tokens and log(0) = -inf. "
                    "Work with log-probabilities from torch.log_softmax throughout.")
        elif abs(got - kl_divergence(other, ref).item()) <= 1e-4 * max(1.0, abs(expected)):
            hint = "That is KL(q || p): weight by the reference distribution, p = softmax(logits_ref)."
        elif abs(got - expected * ref.shape[:-1].numel()) <= 1e-3 * max(1.0, abs(expected) * ref.shape[:-1].numel()):
            hint = "Average over the positions (every dimension but the last) instead of summing."
        raise AssertionError(f"[{label}] got {got:.6g}, expected {expected:.6g}. {hint}")
    passed("my_kl_divergence")
