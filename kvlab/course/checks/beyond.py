"""Checks for chapter 10: its three build steps (one greedy round of speculative decoding, the
acceptance rule for sampling, the int8 quantizer) and its exercises (reordering the cache for
beam search; bytes of an int8 cache; tokens per round; how often an n-gram draft's guesses are
kept; where int8 greedy text parts from float32).

`check_reorder_cache` compares the learner's reorder with a gather of each layer's rows and then
runs a whole beam search with it, against `kvlab.beam_search`. `check_greedy_round` drives the
learner's round through whole generations and compares them with plain greedy decoding;
`check_accept_sampled` tests the emitted tokens' distribution with a sample count computed so
that a right rule fails with probability below 1e-6; `check_int8_quantizer` holds every number
within half a step of its group. The build checks run with kvlab's own version switched off
(`without_kvlab`). The experiments are rerun live. Models come from `small_model` (its own random
stream) or the shipped Shakespeare model, and random draws from the checks' own generators, so a
check never moves the notebook's random state. Built in chapter 10.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ... import cache as _cache_module
from ... import quantized as _quantized_module
from ... import speculative as _speculative_module
from ...beam import reorder_cache
from ._common import (call_learner, close, judge_number, learner_check, methods_of, passed, require_answer,
                      small_model)

__all__ = ["check_reorder_cache", "check_greedy_round", "check_accept_sampled", "check_int8_quantizer",
           "check_acceptance_rate", "check_int8_bytes_per_token", "check_tokens_per_round", "check_int8_parting",
           "draws_needed", "ACCEPTANCE_SETUP", "PARTING_SETUP", "ROUND_SETUP"]

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
    from ...beam import beam_search, search

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
    from ...pretrained import load_shakespeare
    from ...speculative import NGramDraft, speculative_generate

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
    from ...gpt import GPT, GPTConfig

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
    judge_number(value, truth, wrong, "not the int8 cache's bytes per token: count, per layer, keys and values, per "
                 "head head_dim int8 numbers plus a float16 step and a float16 minimum per group of 32.",
                 "my_int8_bytes_per_token")


# --------------------------------------------------------------------------- build step: one greedy round

# kvlab's own speculative decoding and its rollback, switched off while the learner's round runs; the
# model's forward and the cache's own `crop` stay on.
_SPECULATIVE_OFF = ("speculative decoding (speculative_generate, keep_greedy, keep_sampled, rollback_cache)",
                    [_speculative_module.speculative_generate, _speculative_module.keep_greedy,
                     _speculative_module.keep_sampled, _speculative_module.rollback_cache])
ROUND_SETUP = dict(prompt="ROMEO:\n", new_tokens=64, k=4)  # the whole-generation part of check_greedy_round


def _as_tokens(result, where: str) -> list[int]:
    if isinstance(result, torch.Tensor):
        result = result.flatten().tolist()
    if not isinstance(result, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in result):
        raise AssertionError(f"{where} my_greedy_round should return the new tokens as a list of ints, got {result!r}.")
    return list(result)


class _ForwardCounter:
    """Counts the target's forwards (calls of its first block) and the tokens fed to each."""

    def __init__(self, model):
        self.fed: list[int] = []
        self._hook = model.blocks[0].register_forward_pre_hook(lambda mod, args: self.fed.append(args[0].size(1)))

    def remove(self):
        self._hook.remove()


def _greedy_round(fn, model, cache, tokens, guesses, where):
    """One call of the learner's round, with kvlab's speculative decoding off; returns its tokens, checked."""
    counter = _ForwardCounter(model)
    layers = [(layer.k, layer.v) for layer in cache.layers]
    try:
        with torch.no_grad():
            result = call_learner(fn, model, cache, list(tokens), list(guesses), name="my_greedy_round",
                                  without=_SPECULATIVE_OFF)
    finally:
        counter.remove()
    new = _as_tokens(result, where)
    m = len(guesses)
    if counter.fed != [m + 1]:
        raise AssertionError(f"{where} the target ran {len(counter.fed)} forward(s) feeding {counter.fed} tokens: a round "
                             f"verifies all {m} guesses in ONE forward of the newest token and the guesses ({m + 1} "
                             "tokens at positions len(tokens)-1 ...), whose logits say what the target predicts after "
                             "each of them.")
    if any(a is not layer.k or b is not layer.v for (a, b), layer in zip(layers, cache.layers)):
        raise AssertionError(f"{where} the cache's tensors were replaced: roll the cache back with its own "
                             "cache.crop(length), which forgets positions without touching the tensors from outside.")
    return new


@learner_check
def check_greedy_round(fn: Callable) -> None:
    """`fn(target, cache, tokens, guesses) -> new tokens`: one round of greedy speculative decoding.

    `cache` (static) holds every token of `tokens` but the last; the round feeds the last token and
    the guesses in one forward, returns the kept guesses plus the target's own next token, and
    leaves the cache holding every token but the newest again (rolled back with `cache.crop`).
    """
    from ...generation import generate
    from ...pretrained import load_shakespeare
    from ...speculative import NGramDraft, load_shakespeare_draft

    model, tok = load_shakespeare()
    prompt = tok.encode(ROUND_SETUP["prompt"])
    T, N, k = len(prompt), ROUND_SETUP["new_tokens"], ROUND_SETUP["k"]
    with torch.no_grad():
        ref = generate(model, torch.tensor([prompt]), N, temperature=0)[0].tolist()
    V = model.config.vocab_size

    # Single rounds with guesses chosen to be kept or not, 10 tokens into the greedy text.
    tokens = ref[: T + 10]
    L = len(tokens)
    right = ref[L: L + k]  # what the target itself would say next
    wrong_at = lambda i: right[:i] + [(right[i] + 1) % V] + right[i + 1:]  # noqa: E731
    cases = [("all 4 guesses right", right, 4), ("guess 2 wrong", wrong_at(2), 2), ("guess 0 wrong", wrong_at(0), 0),
             ("no guesses", [], 0)]
    for label, guesses, kept in cases:
        cache = model.new_cache(1, max_seq_len=L + k + 2, kind="static")
        with torch.no_grad():
            model(torch.tensor([tokens[:-1]]), cache)
        where = f"[{label}: guesses {guesses}]"
        new = _greedy_round(fn, model, cache, tokens, guesses, where)
        expected = ref[L: L + kept + 1]
        if new != expected:
            if kept == len(guesses) and new == expected[:-1]:
                raise AssertionError(f"{where} every guess was kept and the round returned only the guesses: the verify "
                                     "forward's last row is the target's prediction after the last guess, a bonus token "
                                     f"that costs nothing ({len(guesses) + 1} tokens from one forward).")
            if new[: kept] == expected[: kept] and len(new) == kept:
                raise AssertionError(f"{where} the round returned the {kept} kept guesses but not the target's own token "
                                     "at the first mismatch: every round ends with one token of the target's (its "
                                     "correction, or the bonus when all guesses are kept).")
            raise AssertionError(f"{where} returned {new}, not the longest prefix of guesses that agree with the target's "
                                 "argmax followed by the target's own next token: row i of the verify forward's logits "
                                 "is the target's prediction after fed token i (the newest token, then guess 0, 1, ...).")
        if cache.length != L + kept:
            stale = cache.length - (L + kept)
            raise AssertionError(f"{where} after the round the cache holds {cache.length} positions; it should hold "
                                 f"{L + kept}: every token but the newest (len(tokens) + kept guesses). "
                                 + ("The rejected guesses' keys are still in it: roll it back with cache.crop(length)."
                                    if stale > 0 else "It was rolled back too far: kept guesses must stay."))

    # Whole generations: the round driven by a prompt-lookup n-gram draft and by the draft model.
    def propose_model(draft_model):
        def propose(tokens, n):
            with torch.no_grad():
                return generate(draft_model, torch.tensor([tokens]), n, temperature=0)[0, len(tokens):].tolist()
        return propose

    for name, propose in (("n-gram draft", NGramDraft(4).propose), ("draft model", propose_model(load_shakespeare_draft()))):
        tokens = list(prompt)
        cache = model.new_cache(1, max_seq_len=T + N + k + 2, kind="static")
        with torch.no_grad():
            model(torch.tensor([tokens[:-1]]), cache)
        rounds = 0
        while len(tokens) - T < N:
            guesses = propose(tokens, min(k, T + N - len(tokens) - 1))
            where = f"[{name}, k={k}, round {rounds}]"
            new = _greedy_round(fn, model, cache, tokens, guesses, where)
            if not 1 <= len(new) <= len(guesses) + 1:
                raise AssertionError(f"{where} a round returns between 1 and len(guesses) + 1 tokens, got {len(new)}.")
            tokens += new
            rounds += 1
        tokens = tokens[: T + N]
        if tokens != ref:
            at = next(i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b) - T
            raise AssertionError(f"[{name}, k={k}] every single round looked right, but the generated text differs from "
                                 f"plain greedy decoding at new token {at}: check that the cache keeps exactly the "
                                 "kept positions and that each round feeds the newest token at position len(tokens)-1.")
        if rounds >= N:
            raise AssertionError(f"[{name}] {rounds} rounds for {N} tokens: no guess was ever kept.")
    passed("my_greedy_round")


# --------------------------------------------------------------------------- build step: the acceptance rule

# The statistical test: the tokens a rule emits are counted over n draws and their distribution
# must lie within total variation TV_TOLERANCE of the exact one. By the Bretagnolle-Huber-Carol
# inequality, P(sum |p_hat - p| >= 2t) <= 2^V exp(-2 n t^2) for n draws over V outcomes, so
# n = (V ln 2 + ln(tests / FALSE_FAIL)) / (2 t^2) draws keep a right rule's chance of failing any of
# the check's tests below FALSE_FAIL; a rule whose distribution is more than 2t away fails with at
# least the same certainty.
TV_TOLERANCE = 0.05
FALSE_FAIL = 1e-6
_SAMPLING_TESTS = 2


def draws_needed(V: int, tolerance: float = TV_TOLERANCE, false_fail: float = FALSE_FAIL, tests: int = _SAMPLING_TESTS) -> int:
    """Draws per test so that a right sampler fails any of `tests` tests with probability < `false_fail`."""
    return math.ceil((V * math.log(2) + math.log(tests / false_fail)) / (2 * tolerance ** 2))


# p and q for one guess, over 4 tokens: sum min(p, q) = 0.6 of guesses kept.
ACCEPT_P = (0.10, 0.40, 0.20, 0.30)
ACCEPT_Q = (0.40, 0.10, 0.30, 0.20)
BONUS_P = (0.05, 0.15, 0.60, 0.20)  # the target's distribution after the last guess (the bonus token)


def _sampled_round(fn, p, q, guesses, generator, where):
    result = call_learner(fn, p.clone(), q.clone(), list(guesses), generator, name="my_accept_sampled",
                          without=_SPECULATIVE_OFF)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise AssertionError(f"{where} my_accept_sampled should return (n_kept, next_token), got {result!r}.")
    n, nxt = result
    if isinstance(n, torch.Tensor):
        n = int(n)
    if not isinstance(n, int) or not 0 <= n <= len(guesses):
        raise AssertionError(f"{where} n_kept should be an int between 0 and {len(guesses)}, got {n!r}.")
    if nxt is None and n == len(guesses):
        raise AssertionError(f"{where} every guess was kept and no next token came back: the bonus token was dropped. "
                             "When all m guesses are kept, draw one more token from p[m], the target's distribution "
                             "after the last guess.")
    if isinstance(nxt, torch.Tensor) and nxt.numel() == 1:
        nxt = int(nxt)
    if not isinstance(nxt, int) or isinstance(nxt, bool) or not 0 <= nxt < p.size(-1):
        raise AssertionError(f"{where} next_token should be a token id (an int below {p.size(-1)}), got {nxt!r}.")
    return n, nxt


def _tv(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


@learner_check
def check_accept_sampled(fn: Callable) -> None:
    """`fn(p, q, guesses, generator) -> (n_kept, next_token)`: the acceptance rule of one sampled round.

    `p` (m + 1, V): the target's probabilities after the newest token and after each guess; `q`
    (m, V): the draft's, guess i drawn from q[i]. Keep guess i with probability min(1, p/q); at the
    first rejection draw the next token from max(0, p - q) renormalised; if all are kept, a bonus
    token from p[m]. Every random number from `generator`.
    """
    p1, q1, pb = (torch.tensor(v) for v in (ACCEPT_P, ACCEPT_Q, BONUS_P))
    V = p1.numel()
    n_draws = draws_needed(V)

    # Deterministic cases first. A guess the target gives probability 0 is always rejected.
    g = torch.Generator().manual_seed(0)
    p_zero = torch.stack([torch.tensor([0.0, 0.5, 0.5, 0.0]), pb])
    for _ in range(20):
        n, nxt = _sampled_round(fn, p_zero, q1[None], [0], g, "[a guess with p = 0]")
        if n != 0:
            raise AssertionError("[a guess with p = 0] the target never says this token, yet the guess was kept: keep "
                                 "guess i with probability min(1, p[i, g] / q[i, g]).")
        if nxt not in (1, 2):
            raise AssertionError(f"[a guess with p = 0] after the rejection the next token was {nxt}, which the target "
                                 "gives probability 0: draw it from max(0, p - q), renormalised.")
    # The same draws from two generators seeded alike.
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(5)
        runs.append([_sampled_round(fn, torch.stack([p1, pb]), q1[None], [i % V], g, "[reproducibility]")
                     for i in range(16)])
    if runs[0] != runs[1]:
        raise AssertionError("two runs with generators seeded alike gave different results: draw every random number "
                             "with the generator you are given (torch.rand(..., generator=generator), "
                             "torch.multinomial(..., generator=generator)).")

    # Test 1: the first emitted token, with one guess drawn from q, must follow p.
    g = torch.Generator().manual_seed(1)
    guesses = torch.multinomial(q1, n_draws, replacement=True, generator=torch.Generator().manual_seed(2)).tolist()
    counts, kept = torch.zeros(V), 0
    p_rows = torch.stack([p1, pb])
    for x in guesses:
        n, nxt = _sampled_round(fn, p_rows, q1[None], [x], g, "[one guess]")
        counts[x if n == 1 else nxt] += 1
        kept += n
    tv = _tv(counts, p1)
    if tv > TV_TOLERANCE:
        residual = (p1 - q1).clamp(min=0)
        alpha = float(torch.minimum(p1, q1).sum())
        from_p = torch.minimum(p1, q1) + (1 - alpha) * p1
        keep_if_larger = torch.where(p1 >= q1, q1, 0) + float(q1[p1 < q1].sum()) * residual / residual.sum()
        detail = (f"[one guess, {n_draws:,} draws] the emitted tokens' distribution is {tv:.3f} from the target's p in "
                  f"total variation (a right rule stays within {TV_TOLERANCE}); counts {counts.int().tolist()}, "
                  f"expected about {[round(n_draws * v) for v in ACCEPT_P]}. ")
        if _tv(counts, from_p) <= TV_TOLERANCE:
            raise AssertionError(detail + "It matches drawing from p itself after a rejection: the tokens the draft "
                                 "already offered too often then come out twice. Draw from the residual max(0, p - q), "
                                 "renormalised.")
        if _tv(counts, keep_if_larger) <= TV_TOLERANCE:
            raise AssertionError(detail + "It matches keeping a guess whenever p >= q and rejecting it otherwise: keep it "
                                 "with probability min(1, p/q) (draw u from U(0, 1), keep if u < p/q).")
        raise AssertionError(detail + "Check the acceptance probability min(1, p[i, g] / q[i, g]) and the residual.")
    # Test 2: with p = q on every guess all are kept, and the bonus token must follow p[m].
    g = torch.Generator().manual_seed(3)
    q2 = torch.stack([q1, p1])
    p2 = torch.stack([q1, p1, pb])
    guess_pairs = torch.stack([torch.multinomial(row, n_draws, replacement=True,
                                                 generator=torch.Generator().manual_seed(4 + i)) for i, row in
                               enumerate(q2)], dim=1).tolist()
    counts = torch.zeros(V)
    for pair in guess_pairs:
        n, nxt = _sampled_round(fn, p2, q2, pair, g, "[p = q on both guesses]")
        if n != 2:
            raise AssertionError("[p = q on both guesses] a guess was rejected where p = q: min(1, p/q) = 1, so it is "
                                 "always kept.")
        counts[nxt] += 1
    tv = _tv(counts, pb)
    if tv > TV_TOLERANCE:
        hint = (" It matches p[m - 1]: the bonus comes from the last row, p[m], the target's prediction after the last "
                "guess." if _tv(counts, p1) <= TV_TOLERANCE else " Draw the bonus from p[m], the last row.")
        raise AssertionError(f"[p = q on both guesses, {n_draws:,} draws] the bonus tokens' distribution is {tv:.3f} "
                             f"from p[m] in total variation.{hint}")
    passed("my_accept_sampled")


# --------------------------------------------------------------------------- build step: the int8 quantizer

_QUANTIZE_OFF = ("int8 quantizer (quantize_int8, dequantize_int8)",
                 [_quantized_module.quantize_int8, _quantized_module.dequantize_int8])
QUANT_GROUP = 32


def _quant_test_tensor() -> torch.Tensor:
    """(2, 3, 5, 64) numbers with the cases that break a quantizer: a large channel in one group,
    a constant group, a tight group far from zero, a group of negatives."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 64, generator=g)
    x[..., 3] *= 40  # one large channel: group 0 of every vector spans far more than group 1
    x[0, 0, 0, 32:] = 0.75  # a constant group (0.75 is exact in float16: the minimum is not rounded below it)
    x[1, 2, 4, :32] = 100.04 + 0.02 * torch.rand(32, generator=g)  # tight, far from zero: float16 rounds m up
    x[1, 1, 1, 32:] = -3.0 - torch.rand(32, generator=g)
    return x


@learner_check
def check_int8_quantizer(quantize: Callable, dequantize: Callable) -> None:
    """`quantize(x) -> (q, step, low)` and `dequantize(q, step, low) -> x_hat`: the chapter's int8
    scheme, groups of 32 channels, each with a float16 minimum and step."""
    x = _quant_test_tensor()
    G = x.size(-1) // QUANT_GROUP
    result = call_learner(quantize, x.clone(), name="my_quantize_int8", without=_QUANTIZE_OFF)
    if not (isinstance(result, tuple) and len(result) == 3 and all(isinstance(t, torch.Tensor) for t in result)):
        raise AssertionError(f"my_quantize_int8 should return three tensors (q, step, low), got {type(result).__name__}.")
    q, step, low = result
    if q.dtype != torch.int8 or tuple(q.shape) != tuple(x.shape):
        raise AssertionError(f"q should be int8 of x's shape {tuple(x.shape)}, got {q.dtype} {tuple(q.shape)}: one byte "
                             "per number, q = round((x - m) / s) - 128 in [-128, 127].")
    groups = tuple(x.shape[:-1]) + (G,)
    for name, t in (("step", step), ("low", low)):
        if t.numel() == 1 or (t.dim() == x.dim() and t.size(-1) == 1):
            raise AssertionError(f"{name} has shape {tuple(t.shape)}: one {name} for the whole tensor or vector. Each "
                                 f"group of {QUANT_GROUP} channels has its own, shape (..., D / {QUANT_GROUP}) = {groups}.")
        if tuple(t.shape) != groups:
            raise AssertionError(f"{name} should have shape (..., D / {QUANT_GROUP}) = {groups}, got {tuple(t.shape)}.")
        if t.dtype != torch.float16:
            raise AssertionError(f"{name} is {t.dtype}: store it as float16 (2 bytes), as the chapter counts.")
    per_vector = x.size(-1) * q.element_size() + G * (step.element_size() + low.element_size())
    assert per_vector == 64 + 2 * (2 + 2)  # the 72 bytes the chapter states, for D = 64
    s, m = step.float(), low.float()
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise AssertionError("a step is 0 (or not finite): a constant group, all 32 numbers equal, has max - min = 0, "
                             "and (x - m) / 0 is 0 / 0 = NaN. Give such a group any positive step (1, say).")
    xg = x.unflatten(-1, (G, QUANT_GROUP))  # (..., G, 32)
    slack = 1e-6 * (xg.abs() + 1)  # float32 arithmetic
    if bool((m[..., None] > xg + slack).any()) or bool((m[..., None] + 255 * s[..., None] < xg - slack).any()):
        raise AssertionError("some numbers lie outside [low, low + 255 * step], the range the 256 levels cover: "
                             "converting the minimum (or the step) to float16 rounded it the wrong way. Round the "
                             "minimum down and the step up when you store them (float16 keeps 11 significant bits), "
                             "and compute q with the stored values.")
    span = xg.amax(-1) - xg.amin(-1)
    # Not coarser than the group itself needs (float16 rounding outward allowed: a little over span / 255).
    coarse = (s > span / 255 * 1.01 + 1e-3) & (span > 0)
    if bool(coarse.any()):
        i = tuple(coarse.nonzero()[0].tolist())
        raise AssertionError(f"a step is {float(s[i]):.4g} for a group whose numbers span only {float(span[i]):.4g} "
                             f"(step {float(span[i]) / 255:.4g} would do): a step shared by the whole tensor (or vector) "
                             "is set by its largest numbers and rounds every other group coarsely. Each group of "
                             f"{QUANT_GROUP} takes its own min and max.")
    x_hat = ((q.float().unflatten(-1, (G, QUANT_GROUP)) + 128) * s[..., None] + m[..., None])  # (..., G, 32)
    err = x_hat - xg
    over = err.abs() > s[..., None] / 2 + slack
    if bool(over.any()):
        if bool((err <= slack).all()):
            raise AssertionError("errors up to a whole step, every number read back too small: q was rounded down "
                                 "(floor, or a cast to int8, which truncates); round to the nearest level with torch.round.")
        raise AssertionError(f"reading back (q + 128) * step + low is off by up to {float((err.abs() / s[..., None]).max()):.2f} "
                             "steps; rounding to the nearest level keeps every number within half a step. Round with "
                             "torch.round (a cast to int8 truncates) and compute q with the stored float16 low and step.")
    # The dequantizer, on the quantizer's output and on arbitrary stored numbers.
    g = torch.Generator().manual_seed(1)
    q_any = torch.randint(-128, 128, (3, 2, 64), generator=g, dtype=torch.int8)
    s_any = (torch.rand(3, 2, 2, generator=g) + 0.01).half()
    m_any = torch.randn(3, 2, 2, generator=g).half()
    for args, what in (((q, step, low), "your quantizer's output"), ((q_any, s_any, m_any), "arbitrary stored numbers")):
        expected = ((args[0].float().unflatten(-1, (2, QUANT_GROUP)) + 128) * args[1].float()[..., None]
                    + args[2].float()[..., None]).flatten(-2)
        got = call_learner(dequantize, *(a.clone() for a in args), name="my_dequantize_int8", without=_QUANTIZE_OFF)
        if isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.allclose(
                got.float(), expected - 128 * args[1].float().repeat_interleave(QUANT_GROUP, -1), atol=1e-4, rtol=1e-5):
            raise AssertionError(f"[{what}] the dequantizer forgot the + 128: q = round((x - m) / s) - 128, so x is "
                                 "read back as (q + 128) * s + m.")
        close(got.float() if isinstance(got, torch.Tensor) else got, expected,
              f"[{what}] my_dequantize_int8 should read each number back as (q + 128) * step + low, in float32, with "
              "the step and low of its own group of 32 channels.", atol=1e-4, rtol=1e-5)
    passed("my_quantize_int8 and my_dequantize_int8")


# --------------------------------------------------------------------------- reason: tokens per round

# A target and a draft that ignore the context: the same p and q at every position.
ROUND_P = (0.5, 0.3, 0.2)
ROUND_Q = (0.2, 0.3, 0.5)
ROUND_K = 8


def tokens_per_round_simulated(k: int = ROUND_K, rounds: int = 200_000, seed: int = 0) -> float:
    """Mean tokens per round of the acceptance rule with the context-free ROUND_P and ROUND_Q, `k` guesses, simulated."""
    p, q = torch.tensor(ROUND_P), torch.tensor(ROUND_Q)
    g = torch.Generator().manual_seed(seed)
    guesses = torch.multinomial(q, rounds * k, replacement=True, generator=g).view(rounds, k)
    kept = torch.rand(rounds, k, generator=g) < (p / q).clamp(max=1)[guesses]  # (rounds, k)
    n = kept.long().cumprod(dim=1).sum(dim=1)  # guesses kept before the first rejection
    return float((n + 1).float().mean())  # plus the target's own token (its correction or the bonus)


@learner_check
def check_tokens_per_round(answer) -> None:
    """`answer`: the expected tokens one round yields at k = 8 for the context-free p and q of the exercise."""
    value = require_answer(answer, "my_tokens_per_round")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AssertionError(f"my_tokens_per_round should be a number, got {type(value).__name__}.")
    value, k = float(value), ROUND_K
    p, q = torch.tensor(ROUND_P), torch.tensor(ROUND_Q)
    alpha = float(torch.minimum(p, q).sum())
    geometric = lambda a, n: (1 - a ** n) / (1 - a)  # noqa: E731  1 + a + ... + a^(n-1)
    truth = geometric(alpha, k + 1)
    simulated = tokens_per_round_simulated()
    assert abs(simulated - truth) < 0.05  # the formula and the rule agree (0.05 is about nine standard errors)
    tv = 0.5 * float((p - q).abs().sum())
    by_guess = float((q * (p / q).clamp(max=1)).sum())
    wrong = [
        (alpha, "that is the chance that one guess is kept; the question asks how many tokens a whole round yields."),
        (1 + k * alpha, "that counts every guess as checked; guess i is only checked if guesses 0..i-1 were all kept."),
        (alpha * geometric(alpha, k), "that counts the kept guesses only: every round also emits one token of the "
                                      "target's own (its correction, or the bonus when all are kept)."),
        (geometric(alpha, k), "close: but when all 8 guesses are kept the round still yields the bonus token."),
        (k + 1.0, "that is every guess kept, which needs q = p."),
        (1 / (1 - alpha), "that is the limit for unlimited guesses; with 8 the round stops at 9 tokens."),
        (geometric(float((p * q).sum()), k + 1), "sum p(x) q(x) is the chance that two independent draws agree, not "
                                                 "the chance that the acceptance rule keeps a guess."),
        (geometric(1 - 2 * tv, k + 1), "total variation is half the sum of |p - q|, and a guess is kept with "
                                       "probability 1 - TV(p, q) = sum min(p, q)."),
        (geometric(float((p / q).clamp(max=1).mean()), k + 1), "min(1, p/q) averaged with equal weights: the draft "
                                                               "guesses x with probability q(x), so weight by q."),
    ]
    assert abs(by_guess - alpha) < 1e-6
    if abs(value - truth) > 0.01:
        for number, hint in wrong:
            if abs(value - number) <= 0.01:
                raise AssertionError(hint)
        raise AssertionError("not the expected tokens per round (more than 0.01 away): find the chance that one guess "
                             "is kept, then the chance that a round keeps at least i guesses.")
    print(f"(a simulation of 200,000 rounds of the acceptance rule gives {simulated:.3f} tokens per round)")
    passed("my_tokens_per_round")


# --------------------------------------------------------------------------- experiment: where int8 greedy text parts

# The experiment's fixed setup: the shipped model, this prompt, greedy, this many new tokens, sliding caches.
PARTING_SETUP = dict(prompt="GLOUCESTER:\n", new_tokens=160)


def int8_parting() -> dict:
    """The experiment of `check_int8_parting`: the first generated position where the int8 cache's
    greedy text differs from the float32 cache's (None if they never do), with both texts."""
    from ...generation import generate
    from ...pretrained import load_shakespeare

    model, tok = load_shakespeare()
    idx = torch.tensor([tok.encode(PARTING_SETUP["prompt"])])
    N = PARTING_SETUP["new_tokens"]
    with torch.inference_mode():
        a = generate(model, idx, N, temperature=0, cache=model.new_cache(1, kind="sliding"))
        b = generate(model, idx, N, temperature=0, cache=model.new_cache(1, kind="sliding", quantize="int8"))
    T = idx.size(1)
    differs = (a[0, T:] != b[0, T:]).nonzero()
    return dict(first=int(differs[0]) if differs.numel() else None, prompt_len=T, float_ids=a, int8_ids=b)


@learner_check
def check_int8_parting(answer) -> None:
    """`answer`: the first generated position (0 = the first new character) where the int8 cache's
    greedy text differs from the float32 cache's, in the fixed setup; -1 if they never differ."""
    value = require_answer(answer, "my_parting_position")
    if isinstance(value, bool) or not isinstance(value, int):
        raise AssertionError(f"my_parting_position should be an int (a position), got {type(value).__name__}.")
    measured = int8_parting()
    first, T = measured["first"], measured["prompt_len"]
    truth = -1 if first is None else first
    if value == truth:
        passed("my_parting_position")
        return
    if first is not None:
        if value == first + T:
            raise AssertionError("that counts the prompt too: count from the first generated character (position 0).")
        if value == first + 1:
            raise AssertionError("off by one: the first generated character is position 0.")
        if value == first - 1:
            raise AssertionError("off by one: give the position of the first character that differs, not the one "
                                 "before it.")
    if value == -1:
        raise AssertionError("the two texts do differ in this setup: generate all "
                             f"{PARTING_SETUP['new_tokens']} characters with each cache.")
    raise AssertionError("not where the two greedy texts first part in this setup: generate with "
                         "cache=model.new_cache(1, kind='sliding') and with quantize='int8' added, and compare the new "
                         "tokens.")
