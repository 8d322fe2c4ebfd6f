"""The GPT decoder: a configuration dataclass and the model.

Shape legend: B batch, T tokens fed in this call, V vocab_size, C d_model, H n_heads,
D head_dim.

One class covers GPT-2 (LayerNorm, GELU, learned positions, biases, tied embeddings) and a
Llama-style "modern" decoder (RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases),
switched by `GPTConfig` fields (and the 2017 paper's fixed sinusoidal positions, `pos="sinusoidal"`);
`attention="mla"` swaps every layer's attention for DeepSeek-V2's latent attention (`kvlab.latent`,
chapter 11), whose cache holds a latent and a small RoPE key per token instead of keys and values.
`forward(idx, cache=None, input_pos=None)` is the whole interface: without a cache it attends
causally over `idx`; with one it writes the new keys and values at `input_pos` and attends over
everything cached. Passing `targets=` also returns the training loss (nanoGPT's
`logits, loss = model(idx, targets)`). Built in chapter 3 (the cache in chapter 4).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attention_mask
from .cache import KVCache
from .latent import MultiHeadLatentAttention, latent_cache
from .layers import Block, SinusoidalPositions, make_norm, rope_cos_sin
from .quantized import int8_cache
from .validation import check_choice, check_positive_int

__all__ = ["GPTConfig", "GPT", "PRESETS"]


def check_shape_fields(config, positions: tuple[str, ...]) -> None:
    """Validate the fields a GPT and a seq2seq config share, filling in `n_kv_heads`.

    Sizes are positive ints, `d_model` splits into `n_heads` heads, `n_kv_heads` divides
    `n_heads`, and `norm`, `mlp` and `pos` (one of `positions`) name known kinds.
    """
    for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads"):
        check_positive_int(name, getattr(config, name))
    if config.d_model % config.n_heads:
        raise ValueError(f"d_model={config.d_model} must be divisible by n_heads={config.n_heads}")
    if config.n_kv_heads is None:
        config.n_kv_heads = config.n_heads
    if not 1 <= config.n_kv_heads <= config.n_heads or config.n_heads % config.n_kv_heads:
        raise ValueError(f"n_kv_heads={config.n_kv_heads} must divide n_heads={config.n_heads}")
    for name, allowed in (("norm", ("layernorm", "rmsnorm")), ("mlp", ("gelu", "swiglu")), ("pos", positions)):
        check_choice(name, getattr(config, name), allowed)


@dataclass
class GPTConfig:
    """Everything that fixes a GPT's shape. Derived fields are filled in `__post_init__`."""

    vocab_size: int = 50257  # number of token ids; GPT-2's BPE has 50,257
    max_seq_len: int = 1024  # longest sequence (learned positions have one row per position)
    d_model: int = 768  # width of the residual stream, C
    n_layers: int = 12  # number of transformer blocks
    n_heads: int = 12  # query heads per attention layer, H
    n_kv_heads: int | None = None  # key/value heads (None = n_heads; fewer = grouped-query attention)
    d_ff: int | None = None  # MLP hidden width (None = 4·C for GELU, ≈ 8C/3 rounded up to 64 for SwiGLU)
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm"
    mlp: str = "gelu"  # "gelu" (GPT-2) or "swiglu"
    pos: str = "learned"  # "learned" (GPT-2), "rope" or "sinusoidal" (the 2017 paper's fixed table)
    rope_base: float = 10000.0  # RoPE's base frequency
    bias: bool = True  # biases in linear layers and LayerNorm (GPT-2 has them)
    tie_embeddings: bool = True  # the output layer reuses the token embedding matrix
    norm_eps: float = 1e-5  # epsilon inside the norms
    dropout: float = 0.0  # dropout during training (0 for inference and for GPT-2 weights)
    window: int | None = None  # sliding-window attention: attend to the last `window` positions only
    # Attention: "mha" is multi-head attention, grouped-query or multi-query by n_kv_heads; "mla" is
    # DeepSeek-V2's latent attention (chapter 11): the cache keeps kv_latent_dim + rope_head_dim
    # numbers per token and layer, shared by all heads.
    attention: str = "mha"
    kv_latent_dim: int | None = None  # MLA only (and needed): width of the cached latent c_kv, Dc
    # MLA only: width of the decoupled RoPE part of each query and of the shared RoPE key, Dr (even).
    # None: head_dim // 2 rounded down to even with pos="rope"; 0 with learned or sinusoidal
    # positions, which are added to the residual stream and need no RoPE key.
    rope_head_dim: int | None = None
    head_dim: int = dataclasses.field(init=False)  # derived: d_model // n_heads

    def __post_init__(self) -> None:
        check_shape_fields(self, positions=("learned", "rope", "sinusoidal"))
        self.head_dim = self.d_model // self.n_heads
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got d_model/n_heads={self.head_dim}")
        if self.d_ff is None:
            if self.mlp == "gelu":
                self.d_ff = 4 * self.d_model
            else:
                self.d_ff = 64 * math.ceil(8 * self.d_model / 3 / 64)
        check_positive_int("window", self.window, allow_none=True)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        self._check_attention()

    def _check_attention(self) -> None:
        if self.attention not in ("mha", "mla"):
            raise ValueError(f"attention must be 'mha' or 'mla', got {self.attention!r}")
        if self.attention == "mha":
            for name in ("kv_latent_dim", "rope_head_dim"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is only used by attention='mla' (this config has attention='mha'); "
                                     "leave it None")
            return
        if self.n_kv_heads != self.n_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} is not used by attention='mla': every head's keys and "
                             "values come from one shared latent; leave n_kv_heads None")
        if isinstance(self.kv_latent_dim, bool) or not isinstance(self.kv_latent_dim, int) or self.kv_latent_dim < 1:
            raise ValueError(f"kv_latent_dim must be a positive int with attention='mla' (the width of the cached "
                             f"latent), got {self.kv_latent_dim!r}")
        if self.rope_head_dim is None:
            self.rope_head_dim = 2 * (self.head_dim // 4) if self.pos == "rope" else 0
        Dr = self.rope_head_dim
        if isinstance(Dr, bool) or not isinstance(Dr, int) or Dr < 0 or Dr % 2:
            raise ValueError(f"rope_head_dim must be an even int >= 0, got {Dr!r}")
        if self.pos == "rope" and Dr == 0:
            raise ValueError("rope_head_dim must be a positive even int with pos='rope': latent attention carries "
                             "positions in its decoupled RoPE key")
        if self.pos != "rope" and Dr != 0:
            raise ValueError(f"rope_head_dim must be 0 with pos={self.pos!r}: positions are added to the residual "
                             "stream, so there is no RoPE key (set pos='rope' for a decoupled RoPE key)")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        """A named configuration (see `PRESETS`), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        """The constructor arguments (derived fields left out), e.g. for a JSON file."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}


_MODERN = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False)

PRESETS: dict[str, dict] = {
    "gpt2": dict(d_model=768, n_layers=12, n_heads=12),  # 124M parameters
    "gpt2-medium": dict(d_model=1024, n_layers=24, n_heads=16),  # 350M
    "gpt2-large": dict(d_model=1280, n_layers=36, n_heads=20),  # 774M
    "gpt2-xl": dict(d_model=1600, n_layers=48, n_heads=25),  # 1.56B
    # Small shapes for tests and for the notebooks, which must run in about a minute on a CPU.
    "tiny": dict(vocab_size=256, max_seq_len=256, d_model=64, n_layers=2, n_heads=4),
    "tiny-modern": dict(vocab_size=256, max_seq_len=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, **_MODERN),
}


class GPT(nn.Module):
    """A decoder-only transformer language model: token ids (B, T) -> next-token logits (B, T, V).

    Built in chapter 3; `new_cache` and cached forwards in chapter 4.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        # Positions: a learned table, a fixed sinusoidal one (called the same way), or none (RoPE
        # rotates queries and keys inside attention instead).
        self.pos_emb = nn.Embedding(c.max_seq_len, c.d_model) if c.pos == "learned" else \
            SinusoidalPositions(c.max_seq_len, c.d_model) if c.pos == "sinusoidal" else None
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.d_model, c.n_heads, c.n_kv_heads, c.d_ff, norm=c.norm, mlp=c.mlp, bias=c.bias,
                  norm_eps=c.norm_eps, dropout=c.dropout, attention=self._latent_attention())
            for _ in range(c.n_layers)
        )
        self.norm_f = make_norm(c.norm, c.d_model, c.norm_eps, c.bias)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2's trick: shrink the layers that write into the residual stream, so its variance
        # does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.out.weight", "mlp.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layers))

    def _latent_attention(self) -> nn.Module | None:
        """A layer's attention when it is not `SelfAttention`: latent attention (chapter 11)."""
        c = self.config
        if c.attention != "mla":
            return None
        return MultiHeadLatentAttention(c.d_model, c.n_heads, c.kv_latent_dim, c.rope_head_dim, bias=c.bias,
                                        dropout=c.dropout, norm_eps=c.norm_eps)

    @property
    def rope_dim(self) -> int:
        """The width the RoPE tables are made for: head_dim, or an MLA model's rope_head_dim."""
        return self.config.rope_head_dim if self.config.attention == "mla" else self.config.head_dim

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # -- bookkeeping -------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_emb.weight.dtype

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (tied weights counted once); optionally without the embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            if isinstance(self.pos_emb, nn.Embedding):  # a sinusoidal table has no parameters
                n -= self.pos_emb.weight.numel()
        return n

    @property
    def can_slide(self) -> bool:
        """True when positions may run past max_seq_len: RoPE with a sliding attention window."""
        return self.config.pos == "rope" and self.config.window is not None

    def default_cache(self, batch_size: int, total: int) -> KVCache:
        """The cache generation uses when none is given, for sequences of up to `total` positions:
        a sliding one for a model that slides (RoPE with a window: it may run past max_seq_len),
        else a static one just large enough. Built in chapter 4."""
        if self.can_slide:
            return self.new_cache(batch_size, kind="sliding")
        return self.new_cache(batch_size, max_seq_len=total, kind="static")

    def new_cache(
        self, batch_size: int, max_seq_len: int | None = None, kind: str = "static", window: int | None = None,
        quantize: str | None = None,
    ) -> KVCache:
        """An empty KV cache for this model, on its device and in its dtype.

        kind="static" preallocates `max_seq_len` positions (default: the model's); "dynamic"
        grows by concatenation; "sliding" keeps the last `window` positions (default: the
        model's own window) — a full-attention model fed through a sliding cache behaves like
        the same model with `config.window = window`. `quantize="int8"` stores keys and values
        as int8 (static and sliding kinds; chapter 10). An MLA model's cache (any kind) holds a
        latent and a RoPE key per token instead (`kvlab.latent`, chapter 11). Built in chapter 4.
        """
        c = self.config
        if quantize is not None and quantize != "int8":
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        if quantize is not None and c.attention == "mla":
            raise ValueError("quantize='int8' stores per-head keys and values; an attention='mla' model caches a "
                             "latent and a RoPE key instead: leave quantize None")
        if kind == "static":
            max_seq_len = c.max_seq_len if max_seq_len is None else max_seq_len
        elif max_seq_len is not None:
            raise ValueError(f"max_seq_len is only used by kind='static', not kind={kind!r}")
        if kind == "sliding" and window is None:
            window = c.window
            if window is None:
                raise ValueError("kind='sliding' needs a window (the model has no config.window)")
        shape = dict(n_layers=c.n_layers, batch_size=batch_size, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim,
                     max_seq_len=max_seq_len, window=window, device=self.device, dtype=self.dtype)
        if c.attention == "mla":  # chapter 11: (latent, RoPE key) per token, behind the same KVCache
            del shape["n_kv_heads"], shape["head_dim"]
            return latent_cache(kind, kv_latent_dim=c.kv_latent_dim, rope_head_dim=c.rope_head_dim, **shape)
        if quantize is not None:  # chapter 10's int8 layer caches, behind the same KVCache
            return int8_cache(kind, **shape)
        return KVCache.create(kind, **shape)

    # -- the forward pass --------------------------------------------------------------------

    def forward(self, idx: Tensor, cache: KVCache | None = None, input_pos: Tensor | int | None = None,
                targets: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Logits (B, T, V) for token ids `idx` (B, T); with `targets`, the pair (logits, loss).

        `input_pos` gives the absolute position of each token: an int (the first position) or
        a (T,) tensor of consecutive positions. It defaults to 0 without a cache and to
        `cache.length` with one, so `model(next_token, cache)` continues where the cache left
        off. `targets` (B, T) holds the id each position should predict (-100: ignore that
        position); the loss is the mean cross-entropy in nats, computed in float32. Every
        argument is checked before any computation.
        """
        start = self.check_inputs(idx, cache, input_pos)
        if targets is not None:
            self._check_targets(targets, idx)
        logits = self.forward_unchecked(idx, cache, start)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    def _check_targets(self, targets, idx: Tensor) -> None:
        if not isinstance(targets, Tensor):
            raise TypeError(f"targets must be a torch.Tensor of token ids, got {type(targets).__name__}")
        if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
            raise TypeError(f"targets must hold integer token ids, got dtype {targets.dtype}")
        if targets.shape != idx.shape:
            raise ValueError(f"targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
        if targets.device != idx.device:
            raise ValueError(f"targets is on {targets.device} but idx is on {idx.device}")
        V = self.config.vocab_size
        bad = (targets != -100) & ((targets < 0) | (targets >= V))
        if bool(bad.any()):
            raise ValueError(f"targets must be ids in [0, {V - 1}] or -100 (ignored), got {int(targets[bad][0])}")

    def check_inputs(self, idx: Tensor, cache: KVCache | None = None, input_pos: Tensor | int | None = None) -> int:
        """Validate a forward's arguments; return the first position. Raises TypeError/ValueError."""
        if not isinstance(idx, Tensor):
            raise TypeError(f"idx must be a torch.Tensor of token ids, got {type(idx).__name__}")
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise TypeError(f"idx must hold integer token ids, got dtype {idx.dtype}")
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
        B, T = idx.shape
        if idx.device != self.device:
            raise ValueError(f"idx is on {idx.device} but the model is on {self.device}; move one of them")
        if B == 0 or T == 0:
            raise ValueError(f"idx must hold at least one token in each of at least one sequence, got shape {(B, T)}")
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size - 1}] (vocab_size="
                             f"{self.config.vocab_size}), got values in [{lo}, {hi}]")
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache from model.new_cache(), got {type(cache).__name__}")
        start = _first_position(input_pos, T, default=0 if cache is None else cache.length)
        if cache is not None:
            if len(cache) != self.config.n_layers:
                raise ValueError(f"cache has {len(cache)} layers, the model has {self.config.n_layers}")
            cache.check(start, T, B)
        end = start + T
        if end > self.config.max_seq_len and not (self.config.pos == "rope" and self._window(cache) is not None):
            raise ValueError(
                f"positions {start}..{end - 1} exceed the model's max_seq_len={self.config.max_seq_len}; "
                "only a RoPE model with a sliding window can run past it")
        return start

    def _window(self, cache: KVCache | None) -> int | None:
        if cache is not None and cache.kind == "sliding":
            return cache.window
        return self.config.window

    def forward_unchecked(self, idx: Tensor, cache: KVCache | None, start: int, last_only: bool = False) -> Tensor:
        """The forward pass on inputs already validated by `check_inputs`, from position `start`.

        `forward` checks its arguments and calls this; a generation loop checks once, then calls
        this every step (`kvlab.generation.decode_step`). `last_only=True` returns only the last
        position's logits (B, 1, V), all generation needs. Built in chapter 4.
        """
        B, T = idx.shape
        c = self.config
        device = idx.device
        input_pos = torch.arange(start, start + T)  # CPU: caches read its first element for free
        q_pos = torch.arange(start, start + T, device=device)

        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(q_pos)
        x = self.drop(x)
        rope = rope_cos_sin(q_pos, self.rope_dim, c.rope_base) if c.pos == "rope" else None
        if rope is not None:
            rope = (rope[0].to(x.dtype), rope[1].to(x.dtype))

        # The mask depends only on positions, so it is built once here for every layer. The
        # fused kernel is fastest without an explicit mask, so the two common cases avoid one.
        window = self._window(cache)
        mask, is_causal = None, False
        if window is None and (cache is None or start == 0):
            is_causal = True  # T queries over the same T keys: the kernel's own causal mask is right
        elif window is None and T == 1 and cache.kind != "sliding":
            pass  # one query at the newest position sees every cached key: no mask at all
        else:
            k_pos = cache.key_positions(input_pos) if cache is not None else q_pos
            mask = attention_mask(q_pos, k_pos.to(device), window)  # (T, S)

        for i, block in enumerate(self.blocks):
            layer_cache = cache.layers[i] if cache is not None else None
            x = block(x, mask=mask, is_causal=is_causal, rope=rope, cache=layer_cache, input_pos=input_pos)
        if last_only:
            x = x[:, -1:]  # generation needs only the last position's logits
        return self.lm_head(self.norm_f(x))  # (B, T, V)


def _first_position(input_pos, T: int, default: int) -> int:
    """Normalise `input_pos` (None, int or a (T,) tensor of consecutive positions) to its start."""
    if input_pos is None:
        return default
    if isinstance(input_pos, bool):
        raise TypeError("input_pos must be an int or a tensor of positions, got a bool")
    if isinstance(input_pos, numbers.Integral):
        start = int(input_pos)
    elif isinstance(input_pos, Tensor):
        if input_pos.dtype.is_floating_point or input_pos.dtype == torch.bool:
            raise TypeError(f"input_pos must hold integer positions, got dtype {input_pos.dtype}")
        pos = input_pos.detach().reshape(-1).cpu()
        if input_pos.dim() > 1 or pos.numel() != T:
            raise ValueError(f"input_pos must have shape ({T},) to match idx, got {tuple(input_pos.shape)}")
        start = int(pos[0])
        if not torch.equal(pos, torch.arange(start, start + T)):
            raise ValueError(f"input_pos must be consecutive positions start..start+{T - 1}, got {pos.tolist()}")
    else:
        raise TypeError(f"input_pos must be None, an int or a tensor, got {type(input_pos).__name__}")
    if start < 0:
        raise ValueError(f"input_pos must be >= 0, got {start}")
    return start
