"""Beam search: follow the `num_beams` most likely continuations, reordering the KV cache each step.

Shape legend: B batch (prompts or sources), K num_beams, T prompt length, N new tokens,
V vocab_size, C d_model, H n_heads, Hkv n_kv_heads, D head_dim, S source length.

Greedy decoding keeps one continuation and commits to its best next token. Beam search keeps K
of them ("beams") and scores each by the sum of its tokens' log-probabilities. Every step, each
beam proposes every token of the vocabulary (K·V candidates), the best are kept, and several of
the new beams may descend from the same parent while other parents die out. The cache therefore
has K rows per prompt, and after every step row i must hold the keys and values of the new
beam i's *parent*: `reorder_cache` gathers the rows (an `index_select` on the batch axis of
every layer cache).

Scoring follows Hugging Face's `generate(num_beams=..., do_sample=False)` with its defaults, so
that the two give the same tokens:
- each step keeps the best 2K candidates; those that end with `eos_id` and rank among the
  first K become finished hypotheses, scored sum_logprob / new_len ** length_penalty (new_len
  counts the generated tokens, EOS included); the best K candidates that did not end continue;
- at the last step every kept candidate is finished the same way; the best finished
  hypothesis is returned;
- a prompt stops early once it has K finished hypotheses and its best running beam, scored at
  its current length, cannot beat the worst of them (Hugging Face's `early_stopping=False`).
Without `eos_id` all hypotheses have N tokens, so the length penalty changes nothing.

For `Seq2SeqTransformer` the cross-attention keys and values are computed once per source and
shared by its K beams without a copy: the beams' K queries attend to their source's keys as K
query positions of one sequence (cross-attention has no causal mask). Built in chapter 10.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import merge_heads, split_heads, attend, repeat_kv
from .cache import KVCache
from .gpt import GPT
from .validation import check_int, check_number

if TYPE_CHECKING:
    from .data import Seq2SeqVocab
    from .seq2seq import CrossAttentionCache, EncoderDecoderCache, Seq2SeqTransformer

__all__ = ["reorder_cache", "search", "beam_search", "beam_step_seq2seq"]

_NEG = -1.0e9  # the score of a beam that must not be chosen (finite, as Hugging Face's, so sums stay finite)


def reorder_cache(cache: "KVCache | EncoderDecoderCache", index: Tensor) -> None:
    """Make row i of every layer cache hold what row `index[i]` held; `index` is (R,) long.

    This is the whole of beam search's cache bookkeeping: a new beam continues its parent, so
    it needs its parent's keys and values. `index` may be longer than the batch (to fan one
    prompt out to K beams after the prefill). Works on `KVCache` of every kind, int8 ones
    included, and on the self-attention part of an `EncoderDecoderCache`. Built in chapter 10.
    """
    kv = getattr(cache, "self_attn", cache)  # an EncoderDecoderCache reorders its growing part only
    if not isinstance(kv, KVCache):
        raise TypeError(f"cache must be a KVCache or an EncoderDecoderCache, got {type(cache).__name__}")
    if not isinstance(index, Tensor) or index.dtype != torch.long or index.dim() != 1:
        raise TypeError("index must be a 1-D torch.long tensor of row numbers")
    kv.reorder(index)  # each layer cache gathers its own rows (kvlab.cache, kvlab.quantized)


# -- checks ---------------------------------------------------------------------------------------


def _check_beam_args(model, idx, max_new_tokens, num_beams, length_penalty, eos_id) -> None:
    from .seq2seq import Seq2SeqTransformer

    if not isinstance(model, (GPT, Seq2SeqTransformer)):
        raise TypeError(f"model must be a kvlab.GPT or a kvlab.Seq2SeqTransformer, got {type(model).__name__}")
    check_int("num_beams", num_beams, low=1)
    check_int("max_new_tokens", max_new_tokens, low=1)
    check_number("length_penalty", length_penalty)
    check_int("eos_id", eos_id, low=0, high=model.config.vocab_size - 1, allow_none=True)


# -- the search, whatever the model ---------------------------------------------------------------


def search(first_logits: Tensor, step, reorder, *, K: int, N: int, eos_id: int | None,
            length_penalty: float, fill: int) -> tuple[Tensor, Tensor]:
    """Beam search over N steps. `first_logits` (B, V) are the logits after the prompt; `step`
    feeds (B·K, 1) tokens and returns (B·K, V) logits; `reorder(index)` reorders the cache rows.
    Returns the best finished hypothesis per row, (B, n) padded with `fill`, and its length (B,)."""
    B, V = first_logits.shape
    device = first_logits.device
    log_probs = F.log_softmax(first_logits.float(), dim=-1)[:, None, :].expand(B, K, V)  # all K beams alike
    running = torch.full((B, K), _NEG, device=device)
    running[:, 0] = 0.0  # ... so only beam 0 may propose at the first step (no duplicate beams)
    seqs = torch.empty(B, K, 0, dtype=torch.long, device=device)  # the running beams' tokens
    fin_scores = torch.full((B, K), _NEG, device=device)  # finished hypotheses, best first
    fin_seqs = torch.full((B, K, N), fill, dtype=torch.long, device=device)
    fin_len = torch.zeros(B, K, dtype=torch.long, device=device)
    fin_real = torch.zeros(B, K, dtype=torch.bool, device=device)  # slot holds a real hypothesis
    done = torch.zeros(B, dtype=torch.bool, device=device)  # no running beam can beat the finished ones
    first_k = torch.arange(2 * K, device=device) < K

    for n in range(N):  # n tokens generated so far
        candidates = (log_probs + running[:, :, None]).reshape(B, K * V)
        scores, flat = candidates.topk(2 * K, dim=1)  # (B, 2K), best first
        parent, token = flat // V, flat % V
        grown = torch.cat([seqs.gather(1, parent[:, :, None].expand(-1, -1, n)), token[:, :, None]], dim=2)
        last = n + 1 == N
        if last:
            ends = torch.ones_like(token, dtype=torch.bool)  # out of room: every candidate ends here
        elif eos_id is not None:
            ends = token == eos_id
        else:
            ends = torch.zeros_like(token, dtype=torch.bool)

        # Finished hypotheses: ending candidates among the best K, in prompts still improving.
        real = ends & first_k & ~done[:, None]
        normed = torch.where(real, scores / (n + 1) ** length_penalty, _NEG)
        padded = F.pad(grown, (0, N - n - 1), value=fill)  # (B, 2K, N)
        all_scores = torch.cat([fin_scores, normed], dim=1)  # (B, 3K)
        fin_scores, keep = all_scores.topk(K, dim=1)
        fin_seqs = torch.cat([fin_seqs, padded], dim=1).gather(1, keep[:, :, None].expand(-1, -1, N))
        fin_len = torch.cat([fin_len, torch.full_like(token, n + 1)], dim=1).gather(1, keep)
        fin_real = torch.cat([fin_real, real], dim=1).gather(1, keep)
        if last:
            break

        # Running beams: the best K candidates that did not end.
        running, chosen = (scores + ends.float() * _NEG).topk(K, dim=1)
        seqs = grown.gather(1, chosen[:, :, None].expand(-1, -1, n + 1))
        parents = parent.gather(1, chosen)  # (B, K): which old beam each new beam continues

        best_possible = running[:, 0] / (n + 1) ** length_penalty
        done |= fin_real.all(dim=1) & ~(best_possible > fin_scores.min(dim=1).values)
        if bool(done.all()) or bool(ends.all()):
            break
        rows = (torch.arange(B, device=device)[:, None] * K + parents).reshape(-1)  # (B·K,)
        reorder(rows)
        logits = step(seqs[:, :, -1].reshape(B * K, 1))  # (B·K, V)
        log_probs = F.log_softmax(logits.float(), dim=-1).view(B, K, V)

    length = fin_len[:, 0]
    return fin_seqs[:, 0, : int(length.max())], length


# -- GPT -----------------------------------------------------------------------------------------


@torch.inference_mode()
def beam_search(
    model: "GPT | Seq2SeqTransformer",
    idx: Tensor,
    max_new_tokens: int,
    *,
    num_beams: int,
    length_penalty: float = 1.0,
    eos_id: int | None = None,
    cache_kind: str | None = None,
    quantize: str | None = None,
) -> Tensor:
    """The most likely continuation found by beam search with `num_beams` beams per row.

    For a `kvlab.GPT`, `idx` is the prompts (B, T) and the result is (B, T + n), the prompt
    followed by the best beam's tokens; with `eos_id`, a row that finished early is padded with
    `eos_id`, and n is the longest row's new tokens. Without `eos_id` and with
    `length_penalty=1.0` the tokens equal Hugging Face's `generate(num_beams=num_beams,
    do_sample=False)`. `cache_kind` picks the cache ("static", "dynamic", "sliding"; by
    default what `kvlab.generate` would use), `quantize="int8"` an int8 one.

    For a `kvlab.Seq2SeqTransformer`, `idx` is the sources (B, S), right-padded with PAD; the
    result is the target tokens (B, n) without BOS, as `greedy_decode` returns them (PAD after
    EOS); `eos_id` defaults to the model's. num_beams=1 is greedy decoding. Built in chapter 10.
    """
    from .seq2seq import Seq2SeqTransformer

    _check_beam_args(model, idx, max_new_tokens, num_beams, length_penalty, eos_id)
    if isinstance(model, Seq2SeqTransformer):
        if cache_kind is not None or quantize is not None:
            raise ValueError("cache_kind and quantize are for a GPT; a seq2seq beam search uses a static cache")
        return _beam_search_seq2seq(model, idx, int(max_new_tokens), int(num_beams), float(length_penalty),
                                    eos_id)
    model.check_inputs(idx)
    B, T = idx.shape
    K, N = int(num_beams), int(max_new_tokens)
    c = model.config
    slides = c.pos == "rope" and c.window is not None
    if T + N > c.max_seq_len and not slides:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({N}) = {T + N} exceeds the model's "
                         f"max_seq_len={c.max_seq_len}")
    if cache_kind is None:
        cache_kind = "sliding" if slides else "static"
    if cache_kind not in ("static", "dynamic", "sliding"):
        raise ValueError(f"cache_kind must be 'static', 'dynamic' or 'sliding', got {cache_kind!r}")
    if cache_kind == "static":
        cache = model.new_cache(B, max_seq_len=T + N, quantize=quantize)
    elif cache_kind == "sliding":
        cache = model.new_cache(B, kind="sliding", window=c.window or T + N, quantize=quantize)
    else:
        cache = model.new_cache(B, kind="dynamic", quantize=quantize)

    first = model.forward_unchecked(idx, cache, 0, last_only=True)[:, -1]  # (B, V): the prompt runs once per row
    reorder_cache(cache, torch.arange(B, device=idx.device).repeat_interleave(K))  # fan out to K beams

    def step(tokens: Tensor) -> Tensor:
        return model.forward_unchecked(tokens, cache, cache.length, last_only=True)[:, -1]

    fill = eos_id if eos_id is not None else 0
    new, _ = search(first, step, lambda rows: reorder_cache(cache, rows), K=K, N=N, eos_id=eos_id,
                     length_penalty=length_penalty, fill=fill)
    return torch.cat([idx, new.to(idx.device)], dim=1)


# -- Seq2SeqTransformer --------------------------------------------------------------------------


def beam_step_seq2seq(model: "Seq2SeqTransformer", tokens: Tensor, start: int, self_cache: KVCache,
                      cross: "CrossAttentionCache") -> Tensor:
    """One decoder step for R = B·K beam rows: tokens (R, 1) -> logits (R, V).

    The self-attention cache has R rows; the cross-attention cache (`cross`, a
    `CrossAttentionCache`) has only the B sources. Each source's K beam queries are folded into
    one sequence of K queries, (R, H, 1, D) -> (B, H, K, D), so they all attend to that source's
    keys as they are: the cross keys and values are never copied per beam. Built in chapter 10.
    """
    R = tokens.size(0)
    B = cross.kv[0][0].size(0)
    K = R // B
    input_pos = torch.arange(start, start + 1)
    x = model._embed(tokens, start)  # (R, 1, C)
    for i, block in enumerate(model.decoder):
        x = x + block.self_attn(block.norm1(x), cache=self_cache.layers[i], input_pos=input_pos)  # one query: no mask
        ca = block.cross_attn
        q = ca.q(block.norm2(x)).view(B, K, -1)  # (R, 1, C) -> (B, K, C): K beams as K queries
        q = split_heads(q, ca.n_heads)  # (B, H, K, D)
        k, v = cross.kv[i]  # (B, Hkv, S, D): shared by the K beams
        n_rep = ca.n_heads // ca.n_kv_heads
        y = attend(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), cross.mask)  # (B, H, K, D)
        x = x + ca.out(merge_heads(y)).view(R, 1, -1)  # (B, K, C) -> (R, 1, C)
        x = x + block.mlp(block.norm3(x))
    return model.lm_head(model.dec_norm(x))[:, -1]  # (R, V)


def _beam_search_seq2seq(model, src: Tensor, N: int, K: int, length_penalty: float, eos_id) -> Tensor:
    from .seq2seq import CrossAttentionCache

    c = model.config
    src_pad_mask = model._check_source(src, None)
    if N > c.max_seq_len:
        raise ValueError(f"max_new_tokens={N} exceeds the model's max_seq_len={c.max_seq_len}")
    eos_id = c.eos_id if eos_id is None else eos_id
    B = src.size(0)
    memory = model._encode(src, src_pad_mask)
    cross = CrossAttentionCache.from_memory(model.decoder, memory, src_pad_mask)  # once per source
    self_cache = KVCache.create("static", n_layers=c.n_layers, batch_size=B, n_kv_heads=c.n_kv_heads,
                                head_dim=c.head_dim, max_seq_len=N, device=memory.device, dtype=memory.dtype)
    bos = torch.full((B, 1), c.bos_id, dtype=torch.long, device=src.device)
    first = beam_step_seq2seq(model, bos, 0, self_cache, cross)  # (B, V)
    reorder_cache(self_cache, torch.arange(B, device=src.device).repeat_interleave(K))

    def step(tokens: Tensor) -> Tensor:
        return beam_step_seq2seq(model, tokens, self_cache.length, self_cache, cross)

    out, length = search(first, step, lambda rows: reorder_cache(self_cache, rows), K=K, N=N, eos_id=eos_id,
                          length_penalty=length_penalty, fill=c.pad_id)
    return out
