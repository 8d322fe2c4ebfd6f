"""The encoder-decoder ("seq2seq") transformer and its two caches.

Shape legend: B batch, S source length, T target tokens fed in this call, V vocab_size,
C d_model, H n_heads, Hkv n_kv_heads, D head_dim.

The encoder reads the whole source at once with bidirectional self-attention; its output,
the "memory" (B, S, C), is read by every decoder layer through cross-attention. The decoder is
GPT's block with a cross-attention sublayer between self-attention and the MLP. Generating a
target therefore has two kinds of keys and values:

    self-attention   grow by one position per step      -> a `kvlab.cache.KVCache`, as in GPT
    cross-attention  depend only on the source, fixed   -> `CrossAttentionCache`, filled once

`EncoderDecoderCache` holds one of each. Padding masks are boolean, True = a real token, shape
(B, S); the model reshapes them to (B, 1, 1, S) so one mask serves every head and query.
Built in chapter 8.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import CrossAttention, SelfAttention, attention_mask
from .cache import KVCache
from .data import Seq2SeqVocab, seq2seq_batch
from .gpt import check_shape_fields
from .layers import Block, make_mlp, make_norm, sinusoidal_positions
from .validation import check_int, check_non_negative_int, check_positive_int

__all__ = [
    "Seq2SeqConfig",
    "DecoderBlock",
    "CrossAttentionCache",
    "EncoderDecoderCache",
    "Seq2SeqTransformer",
    "greedy_decode",
    "toy_accuracy",
    "train_toy",
]


@dataclass
class Seq2SeqConfig:
    """Everything that fixes a seq2seq transformer's shape; derived fields are filled in
    `__post_init__`. Built in chapter 8."""

    vocab_size: int = 13  # token ids, shared by source and target (the digit task has 13)
    max_seq_len: int = 64  # longest source and longest target (rows of the position table)
    d_model: int = 64  # width of the residual stream, C
    n_layers: int = 2  # blocks in the encoder, and again in the decoder
    n_heads: int = 4  # query heads per attention layer, H
    n_kv_heads: int | None = None  # key/value heads (None = n_heads; fewer = grouped-query attention)
    d_ff: int | None = None  # MLP hidden width (None = 4·C)
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    mlp: str = "gelu"  # "gelu" or "swiglu"
    pos: str = "learned"  # "learned" (a trained table, as GPT-2) or "sinusoidal" (the 2017 paper's fixed one)
    bias: bool = True  # biases in linear layers and LayerNorm
    tie_embeddings: bool = True  # the output layer reuses the (shared) token embedding matrix
    norm_eps: float = 1e-5  # epsilon inside the norms
    dropout: float = 0.0  # dropout during training
    pad_id: int = 0  # padding: masked out of attention and of the loss
    bos_id: int = 1  # the decoder's first input token
    eos_id: int = 2  # ends a target; greedy decoding pads a row after it
    head_dim: int = dataclasses.field(init=False)  # derived: d_model // n_heads

    def __post_init__(self) -> None:
        check_shape_fields(self, positions=("sinusoidal", "learned"))
        if self.pos == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"sinusoidal positions need an even d_model, got {self.d_model}")
        ids = {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id}
        for name, value in ids.items():
            check_int(name, value, low=0, high=self.vocab_size - 1)
        if len(set(ids.values())) != 3:
            raise ValueError(f"pad_id, bos_id and eos_id must differ, got {ids}")
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        self.head_dim = self.d_model // self.n_heads


class DecoderBlock(nn.Module):
    """A pre-norm decoder block: causal self-attention, cross-attention to the memory, MLP.

    Each sublayer reads a normalised copy of the residual stream and adds its output back.
    Cross-attention gets its keys and values ready-made (`memory_kv`), so the caller decides
    whether they are projected afresh or read from a cache. Built in chapter 8.
    """

    def __init__(self, c: Seq2SeqConfig):
        super().__init__()
        self.norm1 = make_norm(c.norm, c.d_model, c.norm_eps, c.bias)
        self.self_attn = SelfAttention(c.d_model, c.n_heads, c.n_kv_heads, bias=c.bias, dropout=c.dropout)
        self.norm2 = make_norm(c.norm, c.d_model, c.norm_eps, c.bias)
        self.cross_attn = CrossAttention(c.d_model, c.n_heads, c.n_kv_heads, bias=c.bias, dropout=c.dropout)
        self.norm3 = make_norm(c.norm, c.d_model, c.norm_eps, c.bias)
        self.mlp = make_mlp(c.mlp, c.d_model, c.d_ff, bias=c.bias, dropout=c.dropout)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: Tensor, memory_kv: tuple[Tensor, Tensor], *, mask=None, is_causal=False,
                cross_mask=None, cache=None, input_pos=None, return_weights=False):
        """x: (B, T, C) -> (B, T, C); with return_weights, also the cross-attention weights (B, H, T, S)."""
        a = self.self_attn(self.norm1(x), mask=mask, is_causal=is_causal, cache=cache, input_pos=input_pos)
        x = x + self.drop(a)
        a = self.cross_attn(self.norm2(x), memory_kv, mask=cross_mask, return_weights=return_weights)
        a, weights = a if return_weights else (a, None)
        x = x + self.drop(a)
        x = x + self.mlp(self.norm3(x))
        return (x, weights) if return_weights else x


class CrossAttentionCache:
    """Per decoder layer, the cross-attention keys and values of one batch of sources.

    They are `CrossAttention.project_memory(memory)`, each (B, Hkv, S, D), computed once when
    the cache is made and only read afterwards. It also keeps the padding mask, (B, 1, 1, S),
    because the keys and the mask describe the same source. Built in chapter 8.
    """

    def __init__(self, kv: list[tuple[Tensor, Tensor]], mask: Tensor | None):
        self.kv = kv
        self.mask = mask  # None when no source has padding

    @classmethod
    def from_memory(cls, layers, memory: Tensor, src_pad_mask: Tensor) -> "CrossAttentionCache":
        """Project `memory` (B, S, C) through each layer's cross-attention: one call per layer."""
        kv = [layer.cross_attn.project_memory(memory) for layer in layers]
        return cls(kv, _cross_mask(src_pad_mask))

    @property
    def batch_size(self) -> int:
        return self.kv[0][0].size(0)

    @property
    def src_len(self) -> int:
        return self.kv[0][0].size(2)

    @property
    def nbytes(self) -> int:
        return sum(2 * k.numel() * k.element_size() for k, _ in self.kv)


class EncoderDecoderCache:
    """The decoder's two caches: `self_attn` (a `KVCache`, grows each step) and `cross` (fixed).

    Make one per batch of sources with `Seq2SeqTransformer.new_cache`. `reset()` forgets the
    generated tokens but keeps the source's cross keys, so the same source can be decoded again
    without projecting its memory again. Built in chapter 8.
    """

    def __init__(self, self_attn: KVCache, cross: CrossAttentionCache):
        self.self_attn = self_attn
        self.cross = cross

    @property
    def length(self) -> int:
        """Target positions written so far: the position the next token goes to."""
        return self.self_attn.length

    @property
    def nbytes(self) -> int:
        return self.self_attn.nbytes + self.cross.nbytes

    def reset(self) -> None:
        self.self_attn.reset()

    def __repr__(self) -> str:
        return (f"EncoderDecoderCache(self_attn={self.self_attn.kind!r}, length={self.length}, "
                f"src_len={self.cross.src_len}, nbytes={self.nbytes:,})")


def _cross_mask(src_pad_mask: Tensor) -> Tensor | None:
    """(B, S) padding mask -> (B, 1, 1, S) attention mask, or None when nothing is padding."""
    if bool(src_pad_mask.all()):
        return None  # the fused kernel is fastest without a mask
    return src_pad_mask[:, None, None, :]


class Seq2SeqTransformer(nn.Module):
    """An encoder-decoder transformer: source ids (B, S) and target ids (B, T) -> logits (B, T, V).

    One embedding table serves source, target and (tied) output layer. `encode` runs once per
    source; `decode` runs the decoder over target tokens, either from the memory (projecting
    the cross keys in every call) or from an `EncoderDecoderCache`. Built in chapter 8.
    """

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        if not isinstance(config, Seq2SeqConfig):
            raise TypeError(f"config must be a Seq2SeqConfig, got {type(config).__name__}")
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        if c.pos == "learned":
            self.pos_emb = nn.Embedding(c.max_seq_len, c.d_model)
        else:  # a fixed table; a buffer, so it follows .to(device) but is not trained or saved
            self.register_buffer("pos_table", sinusoidal_positions(c.max_seq_len, c.d_model), persistent=False)
        self.drop = nn.Dropout(c.dropout)
        self.encoder = nn.ModuleList(
            Block(c.d_model, c.n_heads, c.n_kv_heads, c.d_ff, norm=c.norm, mlp=c.mlp, bias=c.bias,
                  norm_eps=c.norm_eps, dropout=c.dropout) for _ in range(c.n_layers))
        self.enc_norm = make_norm(c.norm, c.d_model, c.norm_eps, c.bias)
        self.decoder = nn.ModuleList(DecoderBlock(c) for _ in range(c.n_layers))
        self.dec_norm = make_norm(c.norm, c.d_model, c.norm_eps, c.bias)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        # The sinusoidal table's entries are of size ~1, embeddings start at std 0.02: as in the
        # 2017 paper, embeddings are multiplied by √C so that positions do not drown out tokens.
        self.emb_scale = math.sqrt(c.d_model) if c.pos == "sinusoidal" else 1.0

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _embed(self, ids: Tensor, start: int) -> Tensor:
        pos = torch.arange(start, start + ids.size(1), device=ids.device)
        table = self.pos_emb(pos) if self.config.pos == "learned" else self.pos_table[pos]
        return self.drop(self.tok_emb(ids) * self.emb_scale + table)  # (B, T, C)

    # -- checks ------------------------------------------------------------------------------

    def _check_ids(self, ids, name: str) -> None:
        if not isinstance(ids, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
        if ids.dim() != 2 or ids.size(0) == 0 or ids.size(1) == 0:
            raise ValueError(f"{name} must have shape (B, length) with B, length >= 1, got {tuple(ids.shape)}")
        lo, hi, V = int(ids.min()), int(ids.max()), self.config.vocab_size
        if lo < 0 or hi >= V:
            raise ValueError(f"{name} ids must be in [0, {V - 1}] (vocab_size={V}), got values in [{lo}, {hi}]")

    def _check_source(self, src, src_pad_mask) -> Tensor:
        """Validate src (B, S) and its mask; return the mask (derived from pad_id if None)."""
        self._check_ids(src, "src")
        if src.size(1) > self.config.max_seq_len:
            raise ValueError(f"src has {src.size(1)} positions, more than max_seq_len={self.config.max_seq_len}")
        if src_pad_mask is None:
            src_pad_mask = src != self.config.pad_id
        _check_pad_mask(src_pad_mask, tuple(src.shape), "src")
        return src_pad_mask

    # -- the two halves ----------------------------------------------------------------------

    def encode(self, src: Tensor, src_pad_mask: Tensor | None = None) -> Tensor:
        """The memory (B, S, C) for source ids `src` (B, S).

        `src_pad_mask` (B, S) is True on real tokens; by default it is `src != pad_id`. Keys
        at padding are hidden from every query, so a source's memory does not depend on how
        much padding its batch carries. Rows of the memory at padding are computed but
        meaningless; cross-attention never reads them.
        """
        return self._encode(src, self._check_source(src, src_pad_mask))

    def _encode(self, src: Tensor, src_pad_mask: Tensor) -> Tensor:
        mask = _cross_mask(src_pad_mask)  # (B, 1, 1, S): hide padded keys, for every query
        x = self._embed(src, 0)
        for block in self.encoder:
            x = block(x, mask=mask, is_causal=False)  # bidirectional: every token sees every real token
        return self.enc_norm(x)

    def new_cache(self, memory: Tensor, src_pad_mask: Tensor, *, max_seq_len: int | None = None,
                  kind: str = "static") -> EncoderDecoderCache:
        """A cache for decoding targets of these sources: projects `memory` once per layer.

        The self-attention part is a `KVCache` of `kind` "static" (preallocated for
        `max_seq_len` target positions, default the model's) or "dynamic".
        """
        c = self.config
        B = self._check_memory(memory, src_pad_mask)
        if kind not in ("static", "dynamic"):
            raise ValueError(f"kind must be 'static' or 'dynamic', got {kind!r}")
        if kind == "static":
            max_seq_len = c.max_seq_len if max_seq_len is None else max_seq_len
        elif max_seq_len is not None:
            raise ValueError("max_seq_len is only used by kind='static'")
        self_attn = KVCache.create(kind, n_layers=c.n_layers, batch_size=B, n_kv_heads=c.n_kv_heads,
                                   head_dim=c.head_dim, max_seq_len=max_seq_len, device=memory.device,
                                   dtype=memory.dtype)
        return EncoderDecoderCache(self_attn, CrossAttentionCache.from_memory(self.decoder, memory, src_pad_mask))

    def _check_memory(self, memory, src_pad_mask) -> int:
        if not isinstance(memory, Tensor) or not memory.is_floating_point():
            raise TypeError(f"memory must be a float tensor from encode(), got {type(memory).__name__}")
        if memory.dim() != 3 or memory.size(-1) != self.config.d_model:
            raise ValueError(f"memory must have shape (B, S, {self.config.d_model}), got {tuple(memory.shape)}")
        _check_pad_mask(src_pad_mask, tuple(memory.shape[:2]), "memory")
        return memory.size(0)

    def decode(self, tgt: Tensor, memory: Tensor | None = None, src_pad_mask: Tensor | None = None, *,
               cache: EncoderDecoderCache | None = None, input_pos: int | None = None,
               return_cross_weights: bool = False):
        """Logits (B, T, V) for target ids `tgt` (B, T) at positions input_pos..input_pos+T-1.

        Give either `memory` (B, S, C) with its `src_pad_mask` (B, S), and the cross keys are
        projected in this call, or a `cache` from `new_cache`, whose cross keys were projected
        once and which stores this call's self-attention keys. `input_pos` defaults to 0, or to
        `cache.length`. With `return_cross_weights`, also returns each layer's cross-attention
        weights (B, H, T, S) (slower: the explicit attention path).
        """
        c = self.config
        self._check_ids(tgt, "tgt")
        B, T = tgt.shape
        if cache is None:
            if memory is None or src_pad_mask is None:
                raise ValueError("decode needs memory and src_pad_mask, or a cache from new_cache()")
            if self._check_memory(memory, src_pad_mask) != B:
                raise ValueError(f"memory has batch size {memory.size(0)}, tgt has {B}")
        else:
            if not isinstance(cache, EncoderDecoderCache):
                raise TypeError(f"cache must be an EncoderDecoderCache from new_cache(), got {type(cache).__name__}")
            if memory is not None or src_pad_mask is not None:
                raise ValueError("the cache already holds the source's projected memory: "
                                 "pass memory or cache, not both")
        start = (0 if cache is None else cache.length) if input_pos is None else input_pos
        start = check_non_negative_int("input_pos", start)
        if start + T > c.max_seq_len:
            raise ValueError(f"target positions {start}..{start + T - 1} exceed max_seq_len={c.max_seq_len}")
        if cache is not None:
            cache.self_attn.check(start, T, B)  # also checks the batch size
        return self._decode(tgt, start, cache, memory, src_pad_mask, return_cross_weights)

    def _decode(self, tgt, start, cache, memory, src_pad_mask, return_weights=False):
        """The decoder on validated inputs (the decoding loop calls this directly)."""
        B, T = tgt.shape
        input_pos = torch.arange(start, start + T)  # CPU: caches read its first element for free
        # The self-attention mask depends only on positions, so it is built once for all layers;
        # the two common cases need none (see GPT.forward_unchecked).
        mask, is_causal = None, False
        if start == 0:
            is_causal = True  # T queries over the same T keys
        elif T > 1:  # a chunk after earlier tokens: explicit lower-right-aligned mask
            k_pos = cache.self_attn.key_positions(input_pos)
            mask = attention_mask(input_pos.to(tgt.device), k_pos.to(tgt.device))  # (T, S)
        # else: one query at the newest position sees every cached key

        if cache is None:
            cross_mask = _cross_mask(src_pad_mask)
        else:
            cross_mask = cache.cross.mask
        x = self._embed(tgt, start)
        all_weights = []
        for i, block in enumerate(self.decoder):
            if cache is None:
                memory_kv, layer_cache = block.cross_attn.project_memory(memory), None
            else:
                memory_kv, layer_cache = cache.cross.kv[i], cache.self_attn.layers[i]
            x = block(x, memory_kv, mask=mask, is_causal=is_causal, cross_mask=cross_mask, cache=layer_cache,
                      input_pos=input_pos, return_weights=return_weights)
            if return_weights:
                x, w = x
                all_weights.append(w)
        logits = self.lm_head(self.dec_norm(x))  # (B, T, V)
        return (logits, all_weights) if return_weights else logits

    def forward(self, src: Tensor, tgt: Tensor, src_pad_mask: Tensor | None = None) -> Tensor:
        """Teacher forcing: logits (B, T, V) for every target position at once (training)."""
        src_pad_mask = self._check_source(src, src_pad_mask)
        self._check_ids(tgt, "tgt")
        if tgt.size(0) != src.size(0):
            raise ValueError(f"src has batch size {src.size(0)}, tgt has {tgt.size(0)}")
        if tgt.size(1) > self.config.max_seq_len:
            raise ValueError(f"tgt has {tgt.size(1)} positions, more than max_seq_len={self.config.max_seq_len}")
        return self._decode(tgt, 0, None, self._encode(src, src_pad_mask), src_pad_mask)


def _check_pad_mask(mask, shape: tuple, what: str) -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"src_pad_mask must be a bool tensor (True = real token), got "
                        f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"src_pad_mask must have the shape of {what}, {shape}, got {tuple(mask.shape)}")
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"src rows {empty} are empty (all padding): every source needs at least one token")


# -- decoding ------------------------------------------------------------------------------------


@torch.inference_mode()
def greedy_decode(
    model: Seq2SeqTransformer,
    src: Tensor,
    max_new_tokens: int,
    *,
    src_pad_mask: Tensor | None = None,
    use_cache: bool = True,
    cache_kind: str = "static",
    return_logits: bool = False,
):
    """Greedy targets (B, N) for sources `src` (B, S), N <= max_new_tokens; BOS is not included.

    The encoder runs once. With `use_cache`, the cross keys are projected once per layer and
    each step feeds only the newest token; without, every step re-runs the decoder over the
    whole target so far (and re-projects the memory): the reference. A row that emits EOS is
    padded with PAD afterwards; decoding stops when every row has finished. With
    `return_logits`, also returns the logits of every step, (B, N, V). Built in chapter 8.
    """
    if not isinstance(model, Seq2SeqTransformer):
        raise TypeError(f"model must be a Seq2SeqTransformer, got {type(model).__name__}")
    c = model.config
    src_pad_mask = model._check_source(src, src_pad_mask)
    max_new_tokens = check_non_negative_int("max_new_tokens", max_new_tokens)
    if max_new_tokens > c.max_seq_len:
        raise ValueError(f"max_new_tokens={max_new_tokens} exceeds the model's max_seq_len={c.max_seq_len}")
    if cache_kind not in ("static", "dynamic"):
        raise ValueError(f"cache_kind must be 'static' or 'dynamic', got {cache_kind!r}")
    B, device = src.size(0), src.device
    out = torch.full((B, max_new_tokens), c.pad_id, dtype=torch.long, device=device)
    steps: list[Tensor] = []
    memory = model._encode(src, src_pad_mask)
    if use_cache:  # N target positions: BOS at 0 and the first N - 1 outputs fed back
        size = dict(max_seq_len=max(max_new_tokens, 1)) if cache_kind == "static" else {}
        cache = model.new_cache(memory, src_pad_mask, kind=cache_kind, **size)
    bos = torch.full((B, 1), c.bos_id, dtype=torch.long, device=device)
    token = bos
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    n = 0
    for n in range(1, max_new_tokens + 1):
        if use_cache:
            logits = model._decode(token, n - 1, cache, None, None)[:, -1]  # (B, V)
        else:
            tgt = torch.cat([bos, out[:, : n - 1]], dim=1)  # (B, n): the whole target so far
            logits = model._decode(tgt, 0, None, memory, src_pad_mask)[:, -1]
        steps.append(logits)
        nxt = torch.where(finished, c.pad_id, logits.argmax(dim=-1))  # (B,)
        out[:, n - 1] = nxt
        finished |= nxt == c.eos_id
        if bool(finished.all()):
            break
        token = nxt[:, None]
    out = out[:, :n]
    if return_logits:
        logits = torch.stack(steps, dim=1) if steps else torch.empty(B, 0, c.vocab_size, device=device)
        return out, logits
    return out


# -- the toy task --------------------------------------------------------------------------------


def _check_vocab(model, vocab) -> None:
    if not isinstance(vocab, Seq2SeqVocab):
        raise TypeError(f"vocab must be a Seq2SeqVocab, got {type(vocab).__name__}")
    c = model.config
    if (vocab.pad_id, vocab.bos_id, vocab.eos_id) != (c.pad_id, c.bos_id, c.eos_id) or len(vocab) > c.vocab_size:
        raise ValueError(f"vocab {vocab} does not fit the model: its PAD/BOS/EOS ids must equal the config's "
                         f"pad_id/bos_id/eos_id and its size must be at most vocab_size={c.vocab_size}")


@torch.no_grad()
def toy_accuracy(model: Seq2SeqTransformer, pairs: list[tuple[str, str]], vocab: Seq2SeqVocab,
                 *, batch_size: int = 500, decode=None) -> float:
    """Exact-match accuracy of greedy decoding on (source, target) string pairs. Built in chapter 8.

    `decode(model, src, max_len)` replaces `greedy_decode` (chapter 10 passes beam search)."""
    decode = greedy_decode if decode is None else decode
    _check_vocab(model, vocab)
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i: i + batch_size]
        src, _, tgt_out = seq2seq_batch(chunk, vocab, device=model.device)
        pred = decode(model, src, tgt_out.size(1))  # room for the longest target + EOS
        correct += sum(vocab.decode(row) == tgt for row, (_, tgt) in zip(pred.cpu(), chunk))
    model.train(was_training)
    return correct / len(pairs)


def train_toy(
    model: Seq2SeqTransformer,
    pairs: list[tuple[str, str]],
    vocab: Seq2SeqVocab,
    *,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 5e-3,
    warmup: int = 50,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Train `model` with teacher forcing on random batches of `pairs`; return the history.

    AdamW, linear warmup then cosine decay to 10% of `lr`, gradients clipped at norm 1, loss
    averaged over real (non-PAD) target tokens. Batches are drawn with a CPU generator seeded
    by `seed`, so a run is repeatable. The history holds per-step "loss", "lr" and elapsed
    "time_s". The model is left in eval mode. Built in chapter 8.
    """
    if not isinstance(model, Seq2SeqTransformer):
        raise TypeError(f"model must be a Seq2SeqTransformer, got {type(model).__name__}")
    _check_vocab(model, vocab)
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    if not pairs:
        raise ValueError("pairs must hold at least one (source, target) pair")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    history: dict[str, list[float]] = {"loss": [], "lr": [], "time_s": []}
    pad = model.config.pad_id
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        if step < warmup:
            scale = (step + 1) / warmup
        else:  # cosine from 1 at the end of the warmup down to 0.1 at the last step
            frac = (step - warmup) / max(1, steps - warmup - 1)
            scale = 0.1 + 0.45 * (1 + math.cos(math.pi * frac))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        idx = torch.randint(len(pairs), (batch_size,), generator=g).tolist()
        src, tgt_in, tgt_out = seq2seq_batch([pairs[i] for i in idx], vocab, device=model.device)
        logits = model(src, tgt_in)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=pad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history["loss"].append(loss.item())
        history["lr"].append(lr * scale)
        history["time_s"].append(time.perf_counter() - t0)
    model.eval()
    return history
