"""Speculative decoding: a cheap draft guesses k tokens, the target checks them all in one forward.

Shape legend: T prompt length, N new tokens, k draft tokens per round, V vocab_size.

A decode step of a small model on a CPU (or of a large one on a GPU) costs about the same for
one token as for a few: the time goes to reading the weights and to fixed per-call overhead,
not to arithmetic. So let a cheap *draft* propose k tokens, feed the newest token and the k
guesses to the *target* in one forward, and keep the guesses the target agrees with. Each
round then yields between 1 and k + 1 tokens for one target forward.

Nothing is approximated. Under greedy decoding a guess is kept only if it is the target's own
argmax, so the text is the target's greedy text token for token, in exact arithmetic: in floating
point the (k + 1)-token verify forward rounds differently from one-token steps, so a near-tie
between the two best logits can go the other way (chapter 10 counts how often). Under sampling, guess x
(drawn from the draft's q) is kept with probability min(1, p(x) / q(x)); at the first
rejection a token is drawn from max(0, p - q), renormalised; if all k are kept, a bonus token
is drawn from the target's next distribution. Each emitted token then follows the target's
distribution p exactly (Leviathan et al. 2023; Chen et al. 2023).

The target's cache has been written for all k + 1 fed positions; after a rejection the
positions past the last kept token must leave no trace: `rollback_cache` rewinds a static
cache, truncates a dynamic one, and restores the slots a sliding ring overwrote from a copy
saved before the forward (`save_ring`). Built in chapter 10.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from .cache import KVCache
from .device import synchronize
from .gpt import GPT
from .sampling import SamplingConfig, resolve_sampling
from .validation import check_int, check_non_negative_int, check_positive_int

__all__ = ["NGramDraft", "save_ring", "rollback_cache", "keep_greedy", "keep_sampled", "speculative_generate",
           "load_shakespeare_draft"]


# -- the n-gram draft ----------------------------------------------------------------------------


class NGramDraft:
    """A draft with no neural network: it continues the text with n-grams it has seen.

    To guess the next token it looks for the longest suffix of the text so far (up to `order`
    tokens) that it has seen before: first earlier in the text itself ("prompt lookup", which
    catches repetition), then in the table fitted on training text (`fit`), where each context
    maps to its most frequent next token. It proposes nothing when nothing matches. Its guesses
    are deterministic (q is all on the guess), which the acceptance rule handles like any other
    draft. Built in chapter 10.
    """

    def __init__(self, order: int = 4, ids: Tensor | list[int] | None = None, *, vocab_size: int | None = None):
        self.order = check_positive_int("order", order)
        check_positive_int("vocab_size", vocab_size, allow_none=True)
        self.vocab_size = vocab_size  # checked against the target's when given
        self.tables: list[dict[int, int]] = [{} for _ in range(self.order + 1)]  # [n]: context hash -> next
        self._base = 1
        if ids is not None:
            self.fit(ids)

    def fit(self, ids: Tensor | list[int]) -> "NGramDraft":
        """Count every n-gram (n = 1..order) of `ids` and keep each context's most frequent next token."""
        ids = torch.as_tensor(ids, dtype=torch.long).flatten().cpu()
        if ids.numel() < 2:
            raise ValueError(f"ids must hold at least 2 tokens to fit an n-gram table, got {ids.numel()}")
        if int(ids.min()) < 0:
            raise ValueError("ids must be non-negative token ids")
        base = max(int(ids.max()) + 1, self.vocab_size or 0)
        if self.tables[1] and base != self._base:
            raise ValueError(f"ids use {base} token ids, the table was fitted on {self._base}")
        if base ** (self.order + 1) >= 2 ** 62:
            raise ValueError(f"order={self.order} is too long for a vocabulary of {base} (n-grams are hashed in 64 bits)")
        self._base = base
        for n in range(1, self.order + 1):
            L = ids.numel() - n  # contexts that have a next token
            if L < 1:
                break
            ctx = torch.zeros(L, dtype=torch.long)
            for j in range(n):
                ctx = ctx * base + ids[j: j + L]
            pair = ctx * base + ids[n: n + L]  # (context, next) as one number
            pairs, counts = torch.unique(pair, return_counts=True)
            # Most frequent next token per context: sort by count, then (stably) by context, take the first.
            order = torch.argsort(counts, descending=True, stable=True)
            pairs = pairs[order]
            pairs = pairs[torch.argsort(pairs // base, stable=True)]
            ctxs = pairs // base
            first = torch.ones_like(ctxs, dtype=torch.bool)
            first[1:] = ctxs[1:] != ctxs[:-1]
            table = self.tables[n]
            for c, nxt in zip(ctxs[first].tolist(), (pairs[first] % base).tolist()):
                table.setdefault(c, nxt)  # an earlier fit keeps its answer
        return self

    def _hash(self, tokens: list[int]) -> int:
        h = 0
        for t in tokens:
            h = h * self._base + t
        return h

    def _next(self, text: str, tokens: list[int]) -> int | None:
        for n in range(min(self.order, len(tokens)), 0, -1):
            suffix = text[-n:]
            if n >= 2:  # the text itself: the latest earlier occurrence of the last n tokens
                at = text.rfind(suffix, 0, len(text) - 1)
                if at >= 0:
                    return tokens[at + n]
            if all(t < self._base for t in tokens[-n:]):
                nxt = self.tables[n].get(self._hash(tokens[-n:]))
                if nxt is not None:
                    return nxt
        return None

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to `k` guessed next tokens after `tokens` (fewer when nothing matches)."""
        tokens = list(tokens)
        text = "".join(map(chr, tokens))  # token ids as characters: str.rfind does the search
        out: list[int] = []
        for _ in range(k):
            nxt = self._next(text, tokens)
            if nxt is None:
                break
            out.append(nxt)
            tokens.append(nxt)
            text += chr(nxt)
        return out

    def __repr__(self) -> str:
        sizes = [len(t) for t in self.tables[1:]]
        return f"NGramDraft(order={self.order}, contexts per n={sizes})"


# -- rolling a cache back ------------------------------------------------------------------------


def save_ring(cache: KVCache, start: int, T: int) -> list[dict] | None:
    """Before feeding T tokens at positions start.., copy the sliding-ring slots they will overwrite.

    Returns what `rollback_cache` needs to undo the write (None for a static or dynamic cache,
    which need no copy): `cache.save(start, T)`, each layer cache saving its own slots. Built in
    chapter 10.
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    return cache.save(start, T)


def rollback_cache(cache: KVCache, length: int, saved: list[dict] | None = None) -> None:
    """Forget every position >= `length`, as if those tokens had never been fed.

    Static cache: move the write position back (old values past it are never read). Dynamic:
    cut the tensors. Sliding ring: the forward overwrote slots that held older positions, so
    `saved` (from `save_ring` before that forward) must be given; the slots of the forgotten
    positions get their old contents back. Each layer cache does this itself (`crop`). Built in
    chapter 10.
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    check_int("length", length, low=0, high=cache.length, allowed=f"an int in [0, cache.length={cache.length}]")
    if length == cache.length:
        return
    if cache.kind == "sliding" and saved is None:
        raise ValueError("a sliding-window cache overwrote older slots when it was fed: roll it back with the "
                         "copy from save_ring(cache, start, T) taken before that forward, or use a static cache")
    cache.crop(int(length), saved)


# -- speculative generation ----------------------------------------------------------------------


def _check_spec_args(target, draft, idx, max_new_tokens, k, stats):
    """Every argument of `speculative_generate` but the sampling settings (a `SamplingConfig`
    checks its own when it is made)."""
    if not isinstance(target, GPT):
        raise TypeError(f"target must be a kvlab.GPT, got {type(target).__name__}")
    if not isinstance(draft, (GPT, NGramDraft)):
        raise TypeError(f"draft must be a kvlab.GPT or a kvlab.speculative.NGramDraft, got {type(draft).__name__}")
    V = target.config.vocab_size
    draft_V = draft.config.vocab_size if isinstance(draft, GPT) else draft.vocab_size
    if draft_V is not None and draft_V != V:
        raise ValueError(f"draft has vocab_size={draft_V} but the target has {V}: they must share the tokenizer")
    check_int("k", k, low=1, note="draft tokens per round")
    target.check_inputs(idx)
    if idx.size(0) != 1:
        raise ValueError(f"idx must hold one sequence, shape (1, T), got {tuple(idx.shape)}: speculative decoding "
                         "here accepts a different number of tokens per round, so it runs one sequence at a time")
    check_non_negative_int("max_new_tokens", max_new_tokens)
    if stats is not None and not isinstance(stats, dict):
        raise TypeError(f"stats must be None or a dict to fill, got {type(stats).__name__}")
    total = idx.size(1) + max_new_tokens
    for name, model in (("target", target), ("draft", draft)):
        if isinstance(model, GPT):
            c = model.config
            if total > c.max_seq_len and not (c.pos == "rope" and c.window is not None):
                raise ValueError(f"prompt + max_new_tokens = {total} exceeds the {name}'s max_seq_len={c.max_seq_len}")
            if model.device != idx.device:
                raise ValueError(f"{name} is on {model.device} but idx is on {idx.device}")


def _cache_for(model: GPT, capacity: int) -> KVCache:
    """A static cache with room for `capacity` positions (a windowed model still masks to its window)."""
    return model.new_cache(1, max_seq_len=capacity, kind="static")


def _draw(probs: Tensor, generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def keep_greedy(logits: Tensor, guesses: list[int]) -> tuple[int, int]:
    """The greedy rule: how many guesses to keep, and the token after them.

    `logits` (m + 1, V) are the target's view after the newest token and after each guess. Guess
    i is kept while it is the target's own argmax; the next token is the target's argmax after
    the kept ones (its correction at the first mismatch, or a bonus token when all are kept).
    Built in chapter 10."""
    best = logits.argmax(dim=-1).tolist()
    n = 0
    while n < len(guesses) and guesses[n] == best[n]:
        n += 1
    return n, best[n]


def keep_sampled(p: Tensor, q_rows: list[Tensor] | None, guesses: list[int],
                 generator: torch.Generator | None) -> tuple[int, int]:
    """The sampling rule: how many guesses to keep, and the token after them.

    `p` (m + 1, V) holds the target's probabilities after the newest token and after each guess,
    `q_rows` the draft's probabilities for each guess (None for a draft that proposes tokens
    without a distribution, as if q put all its mass on its guess). Guess i is kept with
    probability min(1, p_i(g) / q_i(g)); at the first rejection the next token comes from the
    normalised max(0, p_i - q_i), and when every guess is kept it comes from p_m (the bonus).
    The tokens then follow p exactly. Built in chapter 10."""
    for i, g in enumerate(guesses):
        q_g = float(q_rows[i][g]) if q_rows else 1.0
        if float(torch.rand((), generator=generator)) < min(1.0, float(p[i, g]) / q_g):
            continue
        residual = (p[i] - q_rows[i]).clamp_(min=0) if q_rows else p[i].clone().index_fill_(0, torch.tensor(g), 0.0)
        if float(residual.sum()) <= 0:  # p == q: the rejection had probability 0; fall back to p
            residual = p[i]
        return i, _draw(residual / residual.sum(), generator)
    return len(guesses), _draw(p[len(guesses)], generator)


def _draft_guesses(draft: GPT, dcache: KVCache, out: list[int], fed: int, m: int,
                   sampling: SamplingConfig) -> tuple[list[int], list[Tensor], int]:
    """`m` guesses from a model draft after `out`, whose first `fed` tokens its cache holds:
    (guesses, the draft's distribution for each when sampling, positions now fed)."""
    guesses: list[int] = []
    q_rows: list[Tensor] = []
    feed = out[fed:]
    for _ in range(m):
        x = torch.tensor([feed], device=draft.device)
        d_logits = draft.forward_unchecked(x, dcache, fed, last_only=True)[0, -1]
        fed += len(feed)
        if sampling.greedy:
            g = int(d_logits.argmax())
        else:
            q = sampling.probs(d_logits.float()).cpu()
            g = _draw(q, sampling.generator)
            q_rows.append(q)
        guesses.append(g)
        feed = [g]
    return guesses, q_rows, fed


@torch.inference_mode()
def speculative_generate(
    target: GPT,
    draft: "GPT | NGramDraft",
    idx: Tensor,
    max_new_tokens: int,
    *,
    k: int = 4,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    generator: torch.Generator | None = None,
    sampling: SamplingConfig | None = None,
    stats: dict | None = None,
) -> Tensor:
    """Continue one prompt `idx` (1, T) by `max_new_tokens`, with `draft` guessing `k` tokens a round.

    `draft` is a smaller `kvlab.GPT` with the same vocabulary, or an `NGramDraft`. With
    temperature=0 the result equals `kvlab.generate(target, idx, ..., temperature=0)` up to floating-point
    rounding (a near-tie can flip); otherwise
    each token follows the target's distribution under the same temperature and filters (given as
    keywords or as one `sampling=SamplingConfig(...)`, not both). Pass a
    dict as `stats` to get acceptance_rate (kept guesses / guesses), tokens_per_target_forward
    (new tokens / target forwards, the prefill of all but the prompt's last token included), the counts behind them, total_s and
    tokens_per_s. Random draws use `generator` (a CPU generator) when given. A round is: guesses
    from the draft, one verify forward of the target, `keep_greedy` or `keep_sampled`, and the
    rollback of both caches (`rollback_cache`). Built in chapter 10.
    """
    sampling = resolve_sampling(sampling, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                generator=generator)
    _check_spec_args(target, draft, idx, max_new_tokens, k, stats)
    k, N = int(k), int(max_new_tokens)
    T = idx.size(1)
    if N == 0:
        return idx.clone()
    device = idx.device
    synchronize(device)
    t0 = time.perf_counter()
    counts = dict(target_forwards=0, draft_forwards=0, proposed=0, accepted=0, rounds=0)

    # The loop keeps one rule: the target's cache holds every token but the newest, which the
    # next verify forward feeds along with the guesses. So the prefill stops one token short.
    tcache = _cache_for(target, T + N + k + 1)
    if T > 1:
        target.forward_unchecked(idx[:, :-1], tcache, 0, last_only=True)
        counts["target_forwards"] += 1
    out = idx[0].tolist()
    model_draft = isinstance(draft, GPT)
    if model_draft:
        dcache = _cache_for(draft, T + N + k + 1)
        fed = 0  # positions of `out` the draft's cache holds

    while len(out) - T < N:
        L = len(out)  # the target's cache holds positions 0..L-2; out[L-1] is not fed yet
        m = min(k, N - (L - T) - 1)  # a round yields up to m + 1 tokens: no more than still wanted
        q_rows: list[Tensor] = []  # the draft's distribution for each guess (model draft, sampling)
        if m > 0 and model_draft:
            guesses, q_rows, fed = _draft_guesses(draft, dcache, out, fed, m, sampling)
            counts["draft_forwards"] += m
        else:
            guesses = draft.propose(out, m) if m > 0 else []
        m = len(guesses)

        x = torch.tensor([[out[-1]] + guesses], device=device)  # (1, m + 1)
        logits = target.forward_unchecked(x, tcache, L - 1)[0]  # (m + 1, V): the target's view after each token
        counts["target_forwards"] += 1
        counts["rounds"] += 1
        counts["proposed"] += m
        if sampling.greedy:
            n, nxt = keep_greedy(logits, guesses)
        else:
            n, nxt = keep_sampled(sampling.probs(logits.float()).cpu(), q_rows, guesses, sampling.generator)
        counts["accepted"] += n
        out += guesses[:n] + [nxt]
        rollback_cache(tcache, L + n)  # keep out[0..L-1] and the n kept guesses
        if model_draft:
            fed = min(fed, L + n)  # the draft fed out[L-1] and guesses 1..m-1; keep what matches `out`
            rollback_cache(dcache, fed)

    out = out[: T + N]
    synchronize(device)
    elapsed = time.perf_counter() - t0
    if stats is not None:
        proposed = counts["proposed"]
        stats.update(counts, new_tokens=N, k=k, total_s=elapsed, tokens_per_s=N / elapsed,
                     acceptance_rate=counts["accepted"] / proposed if proposed else math.nan,
                     tokens_per_target_forward=N / counts["target_forwards"])
    return torch.tensor([out], dtype=torch.long, device=device)


DRAFT_DIR = "data/shakespeare_draft"  # the shipped draft model, relative to the repository root


def load_shakespeare_draft(*, device: torch.device | str | None = None) -> GPT:
    """The one-layer draft model shipped beside the Shakespeare model (same 65-character
    tokenizer, RoPE with the same 128-position window; `scripts/train_draft.py` trained it), in
    eval mode, with its record on `.record`. From an installed kvlab, downloaded once and
    verified, like the Shakespeare model. Built in chapter 10.
    """
    from .data import checkout_root, repo_file
    from .pretrained import load_shakespeare

    root = checkout_root()
    if root is not None:
        folder = root / DRAFT_DIR
    else:
        for name in ("model.safetensors", "config.json", "tokenizer.json", "record.json"):
            folder = repo_file(f"{DRAFT_DIR}/{name}").parent
    model, _ = load_shakespeare(folder, device=device)
    return model
