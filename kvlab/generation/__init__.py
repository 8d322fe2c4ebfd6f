"""Generating text: the naive reference and the cached prefill / decode-step loop.

Shape legend: B batch, T prompt length, N new tokens, V vocab_size.

Generation is a handful of small functions:
    next_token       logits (B, V) -> token ids (B, 1) under a `kvlab.sampling.SamplingConfig`
    generate_naive   re-run the model over the whole sequence for every new token: O(N²)
                     work, no state, obviously correct — the reference
    prefill          run the prompt once, filling the cache; logits of the last position
    decode_step      feed one token at the next position, reading and extending the cache
    decode_loop      prefill, then choose a token and decode a step until done: the one loop
                     behind `generate`, the streaming command line and the timing bench, each
                     watching the tokens through a per-token hook
    generate         validate everything (the sampling keywords become one SamplingConfig),
                     then the loop (or the naive loop)
Built in chapter 4; `generate(..., compile=True)` (chapter 5) runs the decode steps through the
fixed-shape step of `kvlab.compiled`, compiled by `torch.compile`.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..cache import KVCache
from ..compiled import COMPILABLE_CACHE_KINDS, advance, compiled_decode_step, prepare_cache
from ..device import synchronize
from ..gpt import GPT
from ..sampling import SamplingConfig, resolve_sampling, sample
from ..validation import check_bool, check_int, check_non_negative_int

__all__ = ["next_token", "generate_naive", "prefill", "decode_step", "decode_loop", "generate"]


def next_token(
    logits: Tensor, sampling: SamplingConfig | None = None, *, temperature: float = 1.0, top_k=None, top_p=None,
    min_p=None, generator: torch.Generator | None = None,
) -> Tensor:
    """Choose the next token (B, 1) from last-position logits (B, V). temperature=0 is greedy.

    The settings come as one `SamplingConfig` (what the loops pass) or as its keywords.
    """
    sampling = resolve_sampling(sampling, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                generator=generator)
    if sampling.greedy:
        return logits.argmax(dim=-1, keepdim=True)
    return sample(sampling.probs(logits), sampling.generator)


@torch.inference_mode()
def generate_naive(model: GPT, idx: Tensor, max_new_tokens: int, **sampling) -> Tensor:
    """Generate by recomputing the whole sequence every step: the reference the cache must match.

    Step t runs the model over T + t tokens, so N new tokens cost O(N·(T+N)) token-forwards
    instead of O(T+N). Takes the same sampling keywords as `generate`. Built in chapter 4.
    """
    return generate(model, idx, max_new_tokens, use_cache=False, **sampling)


@torch.inference_mode()
def prefill(model: GPT, idx: Tensor, cache: KVCache) -> Tensor:
    """Run the prompt (B, T) through the model at positions 0..T-1, filling `cache`.

    Returns the logits (B, V) for the token after the prompt. The whole prompt goes through in
    one batched forward pass, which is why time-to-first-token is much less than T decode
    steps. Built in chapter 4.
    """
    start = model.check_inputs(idx, cache, 0)
    return model.forward_unchecked(idx, cache, start, last_only=True)[:, -1]


@torch.inference_mode()
def decode_step(model: GPT, token: Tensor, cache: KVCache) -> Tensor:
    """Feed one new token per sequence (B, 1) at position `cache.length`; return logits (B, V).

    Only this token's query, key and value are computed; its key and value are appended to the
    cache and its query attends over everything cached. Built in chapter 4.
    """
    start = cache.length
    return model.forward_unchecked(token, cache, start, last_only=True)[:, -1]


def check_generate_args(model, idx, max_new_tokens, use_cache, eos_id, cache, compile=False) -> int:
    """Every argument of `generate` but the sampling settings (a `SamplingConfig` checks its own
    when it is made), checked before any work. Returns the prompt length."""
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a kvlab.GPT, got {type(model).__name__}")
    model.check_inputs(idx)  # type, shape, dtype, non-empty, ids in the vocabulary
    check_non_negative_int("max_new_tokens", max_new_tokens)
    V = model.config.vocab_size
    check_int("eos_id", eos_id, low=0, high=V - 1, allow_none=True)
    check_bool("use_cache", use_cache)
    if cache is not None:
        if not use_cache:
            raise ValueError("a cache was passed with use_cache=False; pass one or the other")
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache from model.new_cache(), got {type(cache).__name__}")
        if cache.batch_size != idx.size(0):
            raise ValueError(f"cache was made for batch_size={cache.batch_size}, the prompt has {idx.size(0)} rows")
    check_bool("compile", compile)
    if compile:
        if not use_cache:
            raise ValueError("compile=True compiles the cached decode step; it needs use_cache=True")
        if cache is not None and cache.kind not in COMPILABLE_CACHE_KINDS:
            raise ValueError(f"compile=True needs a cache of kind {COMPILABLE_CACHE_KINDS} (fixed shapes), "
                             f"got kind={cache.kind!r}")
    B, T = idx.shape
    total = T + max_new_tokens
    window = cache.window if cache is not None and cache.kind == "sliding" else model.config.window
    slides = model.config.pos == "rope" and window is not None  # positions may run past max_seq_len
    if total > model.config.max_seq_len and not slides:
        raise ValueError(
            f"prompt ({T}) + max_new_tokens ({max_new_tokens}) = {total} exceeds the model's "
            f"max_seq_len={model.config.max_seq_len}; shorten one, or use a RoPE model with a sliding window")
    if cache is not None and cache.kind == "static" and total - 1 > cache.max_seq_len:
        raise ValueError(f"cache too small: it holds {cache.max_seq_len} positions, generation needs {total - 1}")
    return T


@torch.inference_mode()
def decode_loop(model: GPT, idx: Tensor, max_new_tokens: int, cache: KVCache | None, *, sampling: SamplingConfig,
                eos_id: int | None = None, compile: bool = False, on_token=None) -> Tensor:
    """Prefill `idx` (B, T), then choose a token and decode one step until `max_new_tokens`
    tokens, every row's `eos_id`, or `on_token` says stop; returns (B, T + new).

    `next_token(logits, sampling)` picks each token. `on_token(n, token)` is called as soon as
    token n (1, 2, ...) is chosen, so n=1 marks the time to first token: the timing bench
    synchronises and reads the clock there, the streaming command line prints, and a True answer
    ends generation. `cache=None` is the naive loop (the whole sequence recomputed every step);
    `compile=True` decodes with `kvlab.compiled`'s step. Arguments are not checked here
    (`generate` checks them). Built in chapter 4.
    """
    B, T = idx.shape
    out = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)
    out[:, :T] = idx
    if max_new_tokens == 0:
        return out
    if cache is not None:
        cache.reset()
        logits = prefill(model, idx, cache)
        if compile:
            prepare_cache(cache)
            input_pos = torch.tensor([T], device=idx.device)  # a tensor: one compiled step for every position
    else:
        logits = model.forward_unchecked(idx, None, 0, last_only=True)[:, -1]
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device) if eos_id is not None else None
    n = 0
    for n in range(1, max_new_tokens + 1):
        token = next_token(logits, sampling)  # (B, 1)
        if finished is not None:  # a finished row repeats eos_id
            token = torch.where(finished[:, None], eos_id, token)
            finished |= token[:, 0] == eos_id
        out[:, T + n - 1] = token[:, 0]
        stop = on_token is not None and on_token(n, token)
        if stop or n == max_new_tokens or (finished is not None and bool(finished.all())):
            break
        if compile:
            logits = compiled_decode_step(model, token, input_pos, cache)
            advance(cache, T + n)
            input_pos += 1
        elif cache is not None:
            logits = decode_step(model, token, cache)
        else:
            logits = model.forward_unchecked(out[:, : T + n], None, 0, last_only=True)[:, -1]
    return out[:, : T + n]


@torch.inference_mode()
def generate(
    model: GPT,
    idx: Tensor,
    max_new_tokens: int,
    *,
    use_cache: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    generator: torch.Generator | None = None,
    sampling: SamplingConfig | None = None,
    eos_id: int | None = None,
    cache: KVCache | None = None,
    stats: dict | None = None,
    compile: bool = False,
) -> Tensor:
    """Continue the prompts `idx` (B, T) by up to `max_new_tokens`; returns (B, T + new).

    temperature=0 is greedy; top_k None/0, top_p None/1.0 and min_p None/0 switch those filters
    off; `generator` draws the random numbers. The same settings may come as one
    `sampling=SamplingConfig(...)` instead (not both). With `eos_id`, a sequence that emits it is
    padded with it afterwards and generation stops once every sequence has. `use_cache=False`
    runs the naive recompute-everything loop.
    A `cache` you pass (e.g. `model.new_cache(B, kind="sliding", window=64)`) is reset first;
    by default `model.default_cache` makes one. Pass a dict as `stats` to have it filled with
    timings (prefill_s: the prompt's forward and the first token; decode_s, total_s,
    new_tokens), measured between device synchronisations. `compile=True` runs each decode step
    through `torch.compile` (CUDA graphs on a GPU; see `kvlab.compiled`): the same tokens, with a
    static or sliding cache only, and the first call for a new shape pays for compiling. The
    model runs as it is (on a CPU, `kvlab.cpu_kernels.fast_cpu_inference` chooses its linear
    kernel). Built in chapter 4 (`compile` in chapter 5).
    """
    sampling = resolve_sampling(sampling, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                generator=generator)
    T = check_generate_args(model, idx, max_new_tokens, use_cache, eos_id, cache, compile)
    if stats is not None and not isinstance(stats, dict):
        raise TypeError(f"stats must be None or a dict to fill, got {type(stats).__name__}")
    max_new_tokens = int(max_new_tokens)
    if use_cache and cache is None:
        cache = model.default_cache(idx.size(0), T + max_new_tokens)
    stamps: list[float] = []

    def clock(n: int, token) -> bool:  # the start, the first token (prefill done) and, later, the end
        if n <= 1:
            synchronize(idx.device)
            stamps.append(time.perf_counter())
        return False

    if stats is not None:
        clock(0, None)
    out = decode_loop(model, idx, max_new_tokens, cache if use_cache else None, sampling=sampling,
                      eos_id=None if eos_id is None else int(eos_id), compile=compile,
                      on_token=clock if stats is not None else None)
    if stats is not None and max_new_tokens:
        clock(0, None)
        start, first, end = stamps
        stats.update(prefill_s=first - start, decode_s=end - first, total_s=end - start, new_tokens=out.size(1) - T)
    return out
