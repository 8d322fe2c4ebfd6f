"""Checks for chapter 10's exercises: reordering the cache for beam search, and measuring how
often an n-gram draft's guesses are kept.

`check_reorder_cache` compares the learner's reorder with a gather of each layer's rows and then
runs a whole beam search with it, against `kvlab.beam_search`. `check_acceptance_rate` reruns
the experiment live. Models come from `small_model` (its own random stream) or the shipped
Shakespeare model, so a check never moves the notebook's random state. Built in chapter 10.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import cache as _cache_module
from .. import quantized as _quantized_module
from ..beam import reorder_cache
from ._common import call_learner, learner_check, methods_of, passed, require_answer, small_model

__all__ = ["check_reorder_cache", "check_acceptance_rate", "check_int8_bytes_per_token", "ACCEPTANCE_SETUP"]

# The experiment's fixed setup: the shipped model, this prompt, greedy, an NGramDraft of this
# order fitted on nothing (it guesses only from the text so far), and this many new tokens.
ACCEPTANCE_SETUP = dict(prompt="ROMEO:\n", order=4, new_tokens=128)


def _filled_cache(model, B: int, T: int, seed: int):
    cache = model.new_cache(B, max_seq_len=32)
    idx = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model(idx[:, : T - 2], cache)
        for t in range(T - 2, T):
            model(idx[:, t: t + 1], cache)
    return cache


# kvlab's own reordering, and any layer cache's own `reorder` method, switched off while the learner's runs.
_LAYER_CACHES = [cls for module in (_cache_module, _quantized_module) for name, cls in vars(module).items()
                 if isinstance(cls, type) and name.endswith("LayerCache")]
_REORDER_OFF = ("cache reordering", [reorder_cache, *methods_of(*_LAYER_CACHES, containing="reorder")])

@learner_check
def check_reorder_cache(fn: Callable) -> None:
    """`fn(cache, index)` makes row i of every layer of a static `KVCache` hold row index[i]."""
    from ..beam import beam_search, search

    for style, B, index in [("gpt2", 3, [2, 0, 1]), ("modern", 4, [0, 0, 3, 1]), ("gpt2", 2, [1, 1])]:
        model = small_model(style, seed=B)
        cache = _filled_cache(model, B, 9, seed=B)
        before = [(layer.k.clone(), layer.v.clone()) for layer in cache.layers]
        idx = torch.tensor(index)
        result = call_learner(fn, cache, idx.clone(), name="my_reorder_cache", without=_REORDER_OFF)
        where = f"[{style} model, batch {B}, index {index}]"
        if result is not None and result is not cache:
            raise AssertionError(f"{where} my_reorder_cache should change the cache it is given (and return None); "
                                 "beam search keeps using that same cache object.")
        if cache.length != 9:
            raise AssertionError(f"{where} cache.length changed from 9 to {cache.length}: reordering moves rows "
                                 "(beams), it does not add or drop positions.")
        for i, (layer, (k, v)) in enumerate(zip(cache.layers, before)):
            n = layer.length
            got_k, got_v = layer.k[:, :, :n], layer.v[:, :, :n]
            if torch.equal(got_k, k[:, :, :n]) and not torch.equal(k[idx][:, :, :n], k[:, :, :n]):
                which = "any layer" if i == 0 else f"layer {i} (layer 0 was)"
                raise AssertionError(f"{where} the keys of {which} were not reordered: loop over every layer "
                                     "of cache.layers.")
            expected_k = k[idx][:, :, :n]
            if not torch.equal(got_k, expected_k):
                if len(set(index)) == len(index):  # a permutation: was it applied backwards?
                    inverse = torch.empty_like(expected_k)
                    inverse[idx] = k[:, :, :n]
                    if torch.equal(got_k, inverse):
                        raise AssertionError(f"{where} the rows went the wrong way: new row i must *receive* old row "
                                             "index[i] (a gather, k[index]), not be sent to row index[i].")
                if k.size(1) > max(index) and torch.equal(got_k, k[:, idx][:, :, :n]):
                    raise AssertionError(f"{where} the keys were gathered along the heads axis: beams are rows of "
                                         "the batch axis, dim 0 of each (B, Hkv, S, D) tensor.")
                raise AssertionError(f"{where} the keys of layer {i} are not k[index]: row i must become a copy of "
                                     "row index[i] of the batch axis (dim 0).")
            if not torch.equal(got_v, v[idx][:, :, :n]):
                raise AssertionError(f"{where} the keys are right but the values of layer {i} are not: a beam "
                                     "continues its parent's values too.")
    # The whole of beam search, with the learner's reorder.
    model = small_model("modern", seed=5)
    idx = torch.randint(0, 61, (2, 4), generator=torch.Generator().manual_seed(0))
    K, N = 3, 10
    with torch.inference_mode():
        cache = model.new_cache(2 * K, max_seq_len=N + 4)
        model(idx.repeat_interleave(K, 0), cache)
        first = model(idx, model.new_cache(2, max_seq_len=4))[:, -1]

        def step(tokens):
            return model(tokens, cache)[:, -1]

        out, _ = search(first, step,
                        lambda rows: call_learner(fn, cache, rows, name="my_reorder_cache", without=_REORDER_OFF),
                        K=K, N=N, eos_id=None, length_penalty=1.0, fill=0)
    expected = beam_search(model, idx, N, num_beams=K)[:, 4:]
    if not torch.equal(out, expected):
        raise AssertionError("each reorder looked right, but a whole beam search with my_reorder_cache gives other "
                             "tokens than kvlab.beam_search: check that only the filled positions matter and that "
                             "nothing else about the cache changes.")
    passed("my_reorder_cache")


def acceptance_rate_k(k: int) -> dict:
    """The experiment of `check_acceptance_rate`, run with `k` guesses a round; returns the stats."""
    from ..pretrained import load_shakespeare
    from ..speculative import NGramDraft, speculative_generate

    model, tok = load_shakespeare()
    idx = torch.tensor([tok.encode(ACCEPTANCE_SETUP["prompt"])])
    stats: dict = {}
    speculative_generate(model, NGramDraft(ACCEPTANCE_SETUP["order"]), idx, ACCEPTANCE_SETUP["new_tokens"], k=k,
                         temperature=0, stats=stats)
    return stats


@learner_check
def check_acceptance_rate(answer) -> None:
    """`answer`: the acceptance rate (a fraction) of the prompt-lookup draft at k=8 in the fixed setup."""
    value = require_answer(answer, "my_acceptance_rate")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AssertionError(f"my_acceptance_rate should be a number, got {type(value).__name__}.")
    value = float(value)
    at_8 = acceptance_rate_k(8)
    truth = at_8["acceptance_rate"]
    if 1 < value <= 100 and abs(value / 100 - truth) < 0.02:
        raise AssertionError("that looks like a percentage: give the rate as a fraction between 0 and 1.")
    if abs(value - at_8["tokens_per_target_forward"]) < 0.02:
        raise AssertionError("that is the tokens per target forward, not the acceptance rate: the rate is "
                             "kept guesses / all guesses, between 0 and 1.")
    if abs(value - truth) > 0.02:
        at_4 = acceptance_rate_k(4)["acceptance_rate"]
        if abs(value - at_4) < 0.02:
            raise AssertionError("that is the rate at the chapter's k=4: change k to 8 and measure again.")
        raise AssertionError("not the rate this setup gives at k=8 (more than 0.02 away): run "
                             "speculative_generate with k=8, temperature=0, a stats dict, and read "
                             "stats['acceptance_rate'].")
    passed("my_acceptance_rate")


@learner_check
def check_int8_bytes_per_token(answer) -> None:
    """`answer`: bytes per token of one sequence's int8 cache for GPT-2 small (12 layers, 12 heads of 64)."""
    from ..gpt import GPT, GPTConfig

    value = require_answer(answer, "my_int8_bytes_per_token")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AssertionError(f"my_int8_bytes_per_token should be a number of bytes, got {type(value).__name__}.")
    L, H, D = 12, 12, 64
    per_head = D + (D // 32) * (2 + 2)  # int8 numbers, then a float16 step and minimum per group of 32
    truth = L * 2 * H * per_head
    # Measured, not only computed: a real int8 cache of a GPT-2-shaped model (tiny vocabulary: the
    # cache does not depend on it), 8 positions, divided by 8.
    with torch.random.fork_rng(devices=[]):
        model = GPT(GPTConfig(vocab_size=8, max_seq_len=8, d_model=H * D, n_layers=L, n_heads=H))
    measured = model.new_cache(1, max_seq_len=8, quantize="int8").nbytes // 8
    assert measured == truth
    wrong = {
        L * H * per_head: "that counts the keys only: the values are cached (and quantized) too.",
        L * 2 * H * D: "that leaves out the steps and minimums: each group of 32 numbers brings two float16s.",
        L * 2 * H * (D + 4): "that is one 4-byte scale per vector (or a step without its minimum); here each group "
                             "of 32 channels has a float16 step and a float16 minimum.",
        L * 2 * H * (D + (D // 32) * 8): "the step and the minimum are float16: 2 bytes each, not 4.",
        L * 2 * (H * D + (D // 32) * 4): "that is one set of steps for all heads together; here each head has its own.",
        L * 2 * H * D * 4: "that is the float32 cache: int8 stores one byte per number.",
    }
    if value in wrong:
        raise AssertionError(wrong[value])
    if value != truth:
        raise AssertionError("not the int8 cache's bytes per token: count, per layer, keys and values, per head "
                             "head_dim int8 numbers plus a float16 step and a float16 minimum per group of 32.")
    passed("my_int8_bytes_per_token")
