"""Evicting caches: a fixed budget of tokens per layer, and a policy that picks which token to drop.

Shape legend: B batch, H query heads, Hkv key/value heads, T tokens fed in this call, S tokens
kept (at most the budget), D head_dim, Q recent query rows kept for the observation-window vote.

A chapter 4 cache keeps every token (or, sliding, the newest W). An evicting cache keeps at most
`budget` tokens and, when a new token arrives at a full cache, drops one chosen by a policy:

    window   the oldest token, except the first `n_sinks` (StreamingLLM's attention sinks; with
             n_sinks=0 this is a sliding window)
    h2o      the token that has received the least attention so far, summed over every query and
             head since it arrived (H2O's "heavy hitters" are the ones that stay)
    snapkv   the token with the least attention from the last Q queries (an observation window),
             the votes smoothed over 5 neighbouring tokens: SnapKV's scoring rule, applied here
             at every eviction rather than once after the prompt; the newest `recent` >= Q tokens
             are never candidates (every candidate has all Q queries voting)
Every policy keeps the newest `recent` tokens and the first `n_sinks`; the victim is found by one
small function per policy (`window_victim`, `heavy_hitter_victim`, `observation_victim`).

Positions. Keys are cached after RoPE, at their true positions. Once tokens are dropped, the kept
ones are re-numbered as StreamingLLM does, by their place in the cache: the newest key sits at the
query's position and the others close up behind it, so no query ever sees a distance larger than
the budget (a model trained on 128 positions never saw larger ones). RoPE makes this cheap: a key
rotated for position p becomes the key for position p + d by one more rotation by d, so each read
rotates every kept key by (its place) - (its true position), zero for a contiguous run.

The policies that score need this step's attention: the model's attention calls `observe(q)` on
any layer cache that has it, right after `update`, and the cache computes the weights it needs
from its own keys. Decoding feeds one token at a time; a prefill may feed up to `budget` tokens
at once. Chapter 10's `reorder` and `crop` are not offered: beam search and speculative decoding
need a cache that keeps every token. Built in chapter 11.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import apply_rope, causal_mask, repeat_kv
from .cache import KVCache
from .layers import rope_cos_sin
from .validation import check_choice, check_non_negative_int, check_positive_int

__all__ = ["EVICTION_POLICIES", "window_victim", "heavy_hitter_victim", "observation_victim",
           "EvictingLayerCache", "evicting_cache"]

EVICTION_POLICIES = ("window", "h2o", "snapkv")
POOL = 5  # neighbouring tokens a SnapKV vote is averaged over (the authors' code: kernel_size=5)


def window_victim(scores: Tensor, n_sinks: int = 0, recent: int = 1) -> Tensor:
    """(B,) the slot to drop from a full cache holding S tokens, oldest first: the oldest that
    is not one of the first `n_sinks`. `scores` (B, S) is ignored but for its shape (a window
    needs no attention). Built in chapter 11."""
    B, S = scores.shape
    return torch.full((B,), n_sinks, dtype=torch.long, device=scores.device)


def heavy_hitter_victim(scores: Tensor, n_sinks: int = 0, recent: int = 1) -> Tensor:
    """(B,) the slot to drop: among the tokens that are neither the first `n_sinks` nor the newest
    `recent`, the one with the smallest accumulated attention `scores` (B, S). H2O. Built in
    chapter 11."""
    S = scores.size(1)
    candidates = scores[:, n_sinks:S - recent]  # (B, S - n_sinks - recent)
    return candidates.argmin(dim=1) + n_sinks


def observation_victim(votes: Tensor, n_sinks: int = 0, recent: int = 1) -> Tensor:
    """(B,) the slot to drop: `votes` (B, Q, S) are the attention rows of the last Q queries; they
    are summed, averaged over POOL neighbouring tokens (so a token next to an important one is
    kept with it), and the lowest outside the sinks and the newest `recent` goes. SnapKV's rule.
    Built in chapter 11."""
    summed = votes.sum(dim=1)  # (B, S)
    pooled = F.avg_pool1d(summed[:, None], POOL, stride=1, padding=POOL // 2, count_include_pad=False)[:, 0]
    return heavy_hitter_victim(pooled, n_sinks, recent)


_VICTIMS = {"window": window_victim, "h2o": heavy_hitter_victim, "snapkv": observation_victim}


class EvictingLayerCache:
    """One layer's cache of at most `budget` tokens; `policy` picks which to drop (module docstring).

    `rope` is (rotary dims, base) for a RoPE model, whose kept keys are re-numbered by their place
    in the cache; None for learned or no positions. Built in chapter 11.
    """

    def __init__(self, budget: int, policy: str = "window", *, n_sinks: int = 0, recent: int = 1,
                 observe_window: int = 8, rope: tuple[int, float] | None = None):
        check_positive_int("budget", budget)
        check_choice("policy", policy, EVICTION_POLICIES)
        check_non_negative_int("n_sinks", n_sinks)
        check_positive_int("recent", recent)
        check_positive_int("observe_window", observe_window)
        if policy == "snapkv" and recent < observe_window:
            raise ValueError(f"policy 'snapkv' needs recent >= observe_window (got recent={recent}, observe_window="
                             f"{observe_window}): a token newer than the observation window has fewer queries voting "
                             "for it, so it must not be a candidate (SnapKV always keeps its observation window)")
        if n_sinks + recent >= budget:
            raise ValueError(f"n_sinks + recent must leave room to evict: got n_sinks={n_sinks}, recent={recent} "
                             f"for budget={budget} (need n_sinks + recent < budget)")
        self.budget, self.policy, self.n_sinks, self.recent = budget, policy, n_sinks, recent
        self.observe_window, self.rope = observe_window, rope
        self.reset()

    def reset(self) -> None:
        self.k = self.v = None  # (B, Hkv, S, D): keys rotated for their true positions, oldest first
        self.pos = None  # (B, S) the true position of each kept token
        self.scores = None  # h2o: (B, S) attention received so far; snapkv: (B, Q, S) the last Q rows
        self._read_k = None  # the keys as last returned (re-numbered), for observe
        self.length = 0  # positions written so far (the next position to write)
        self.evicted = 0  # tokens dropped so far

    @property
    def kept(self) -> int:
        return 0 if self.k is None else self.k.size(2)

    def key_positions(self, input_pos: Tensor) -> Tensor:
        """(S,) the positions `update` gives the keys it returns: the newest at the last query's
        position, the others closed up behind it."""
        end = int(input_pos[0]) + input_pos.numel()
        S = min(self.kept + input_pos.numel(), self.budget)
        return torch.arange(end - S, end)

    def update(self, k: Tensor, v: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        B, _, T, _ = k.shape
        if T > 1 and self.kept + T > self.budget:
            raise ValueError(f"an evicting cache takes at most budget={self.budget} tokens before it is full "
                             f"(it holds {self.kept}, {T} were fed); feed the rest one token at a time")
        pos = torch.as_tensor(input_pos, device=k.device).expand(B, T)
        fresh = torch.zeros(B, *((self.observe_window,) if self.policy == "snapkv" else ()), T, device=k.device)
        if self.k is None:  # copies: k and v may be views of the layer's fused q/k/v output
            self.k, self.v, self.pos, self.scores = k.clone(), v.clone(), pos.clone(), fresh
        else:
            self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
            self.pos, self.scores = torch.cat([self.pos, pos], dim=1), torch.cat([self.scores, fresh], dim=-1)
        self.length = int(input_pos[-1]) + 1
        if self.kept > self.budget:
            self._evict(_VICTIMS[self.policy](self.scores, self.n_sinks, self.recent))
        self._read_k = self._renumbered(self.k)
        return self._read_k, self.v

    def _evict(self, victim: Tensor) -> None:
        """Drop slot victim[b] of every row b."""
        B, S = self.pos.shape
        keep = torch.ones(B, S, dtype=torch.bool, device=self.pos.device)
        keep[torch.arange(B), victim] = False
        index = keep.nonzero()[:, 1].view(B, S - 1)  # (B, S-1) kept slots, in order
        take = index[:, None, :, None].expand(-1, self.k.size(1), -1, self.k.size(3))
        self.k, self.v = self.k.gather(2, take), self.v.gather(2, take)
        self.pos = self.pos.gather(1, index)
        self.scores = self.scores.gather(-1, index if self.scores.dim() == 2 else
                                         index[:, None].expand(-1, self.scores.size(1), -1))
        self.evicted += 1

    def _renumbered(self, k: Tensor) -> Tensor:
        """The kept keys rotated from their true positions to their places in the cache."""
        if self.rope is None:
            return k
        S = self.pos.size(1)
        delta = torch.arange(self.length - S, self.length, device=k.device) - self.pos  # (B, S)
        if not delta.any():
            return k  # a contiguous run: every key is already where it should be
        dims, base = self.rope
        cos, sin = rope_cos_sin(delta.reshape(-1), dims, base)  # (B*S, dims)
        cos, sin = (t.view(*delta.shape, dims)[:, None].to(k.dtype) for t in (cos, sin))  # (B, 1, S, dims)
        return apply_rope(k, cos, sin)

    def observe(self, q: Tensor) -> None:
        """Add this step's attention to the scores: q (B, H, T, D) are the queries that just
        attended over the keys `update` returned."""
        if self.policy == "window":
            return
        k = repeat_kv(self._read_k, q.size(1) // self._read_k.size(1))  # (B, H, S, D)
        logits = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, S)
        T, S = logits.shape[-2:]
        if T > 1:
            logits = logits.masked_fill(~causal_mask(T, S, device=q.device), float("-inf"))
        weights = logits.softmax(dim=-1).sum(dim=1)  # (B, T, S): summed over heads
        if self.policy == "h2o":
            self.scores += weights.sum(dim=1)
        else:  # the last observe_window query rows
            self.scores = torch.cat([self.scores, weights], dim=1)[:, -self.observe_window:]

    @property
    def nbytes(self) -> int:
        """Bytes of the kept keys and values (the scores, one float per token or Q per token, are
        the policy's bookkeeping and are not counted)."""
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()


def evicting_cache(model, batch_size: int, budget: int, policy: str = "window", *, n_sinks: int = 0,
                   recent: int = 1, observe_window: int = 8) -> KVCache:
    """A KVCache for `model` whose layers keep at most `budget` tokens each (EvictingLayerCache).

    Decode one token at a time after a prefill of at most `budget` tokens. The budget may not
    exceed the model's own attention window (keys beyond it would never be seen). Built in
    chapter 11."""
    c = model.config
    check_positive_int("batch_size", batch_size)
    check_positive_int("budget", budget)
    if c.attention == "mla":
        raise ValueError("evicting_cache keeps per-head keys and values; an attention='mla' model caches a latent "
                         "and a RoPE key instead: use a GQA/MQA/MHA model")
    if c.window is not None and budget > c.window:
        raise ValueError(f"budget={budget} is larger than the model's attention window ({c.window}): keys beyond "
                         "the window are never attended, so keep budget <= window")
    rope = (c.head_dim, c.rope_base) if c.pos == "rope" else None
    layers = [EvictingLayerCache(budget, policy, n_sinks=n_sinks, recent=recent, observe_window=observe_window,
                                 rope=rope) for _ in range(c.n_layers)]
    return KVCache(layers, "dynamic", batch_size=batch_size)
