"""The parts of a transformer block other than attention.

Shape legend: B batch, T tokens, C d_model, F d_ff (the MLP's hidden width), D head_dim.

GPT-2 uses LayerNorm, a GELU MLP and learned position embeddings. Llama-style ("modern")
models use RMSNorm, a SwiGLU MLP and rotary position embeddings (RoPE). Both sets live here,
chosen by name, so one `Block` class serves every configuration. Built in chapter 3.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import SelfAttention

__all__ = ["RMSNorm", "make_norm", "GELUMLP", "SwiGLUMLP", "make_mlp", "rope_cos_sin", "sinusoidal_positions",
           "SinusoidalPositions", "Block"]


class RMSNorm(nn.Module):
    """Root-mean-square normalisation: x / rms(x) · weight, with no mean subtraction and no bias.

    Cheaper than LayerNorm and, in practice, as good. Computed in float32 so half-precision
    activations do not lose the small variance. Built in chapter 3.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def make_norm(kind: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    """'layernorm' (GPT-2) or 'rmsnorm' (Llama-style)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")


class GELUMLP(nn.Module):
    """GPT-2's MLP: widen to F = 4C, GELU (tanh approximation, as GPT-2 was trained), project back."""

    def __init__(self, d_model: int, d_ff: int, *, bias: bool = True, dropout: float = 0.0, approximate: str = "tanh"):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff, bias=bias)
        self.proj = nn.Linear(d_ff, d_model, bias=bias)
        self.approximate = approximate
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


class SwiGLUMLP(nn.Module):
    """The gated MLP of Llama-style models: down(silu(gate(x)) · up(x)).

    Gate and up projections are one fused matrix (one matmul instead of two). Because it has
    three matrices instead of two, F is usually about 8C/3 so the parameter count matches a
    4C GELU MLP. Built in chapter 3.
    """

    def __init__(self, d_model: int, d_ff: int, *, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=bias)
        self.proj = nn.Linear(d_ff, d_model, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (B, T, F) each
        return self.drop(self.proj(F.silu(gate) * up))


def make_mlp(kind: str, d_model: int, d_ff: int, *, bias: bool, dropout: float) -> nn.Module:
    """'gelu' (GPT-2) or 'swiglu' (Llama-style)."""
    if kind == "gelu":
        return GELUMLP(d_model, d_ff, bias=bias, dropout=dropout)
    if kind == "swiglu":
        return SwiGLUMLP(d_model, d_ff, bias=bias, dropout=dropout)
    raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {kind!r}")


def rope_cos_sin(positions: Tensor, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """Rotary embedding tables for the given positions: cos and sin, each (T, D), float32.

    Pair i of each head is rotated by angle position · base^(-2i/D): fast rotations for the
    first pairs, slow for the last. Because q·k then depends only on the *difference* of the
    two positions, nothing about RoPE needs to change when positions run past any table.
    Built in chapter 3.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D): pairs (i, i + D/2) share an angle
    return angles.cos(), angles.sin()


def sinusoidal_positions(n_positions: int, d_model: int, base: float = 10000.0) -> Tensor:
    """The fixed sine/cosine position table of the original transformer, (n_positions, C).

    Even channels hold sin(pos / base^(i/C)), odd channels the cosine. Built in chapter 8.
    """
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(base) / d_model))
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div[: d_model // 2])
    return table


class SinusoidalPositions(nn.Module):
    """The fixed table of `sinusoidal_positions` in the place of a learned position embedding.

    Called like the `nn.Embedding` it replaces, positions (T,) or (B, T) -> vectors (..., C),
    so every forward path that adds `pos_emb(positions)` works with either. The table is a
    buffer named `weight`, like the embedding's: it follows `.to(device, dtype)` but is neither
    trained nor saved. A GPT with `pos="sinusoidal"` uses it (the 2017 paper's encoding, chapter 8).
    """

    def __init__(self, n_positions: int, d_model: int, base: float = 10000.0):
        super().__init__()
        self.register_buffer("weight", sinusoidal_positions(n_positions, d_model, base), persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        return self.weight[positions]


class Block(nn.Module):
    """A pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x)).

    Normalising the input of each sublayer (rather than its output, as in the 2017 paper)
    keeps the residual stream an untouched sum, which is what makes deep stacks train
    stably. Built in chapter 3.
    """

    def __init__(
        self, d_model: int, n_heads: int, n_kv_heads: int | None, d_ff: int, *,
        norm: str = "layernorm", mlp: str = "gelu", bias: bool = True, norm_eps: float = 1e-5, dropout: float = 0.0,
        attention: nn.Module | None = None,
    ):
        super().__init__()
        self.norm1 = make_norm(norm, d_model, norm_eps, bias)
        # `attention` replaces the usual self-attention with another module called the same way
        # (chapter 11's latent attention).
        self.attn = attention if attention is not None else SelfAttention(d_model, n_heads, n_kv_heads, bias=bias,
                                                                           dropout=dropout)
        self.attn_drop = nn.Dropout(dropout)
        self.norm2 = make_norm(norm, d_model, norm_eps, bias)
        self.mlp = make_mlp(mlp, d_model, d_ff, bias=bias, dropout=dropout)

    def forward(self, x: Tensor, *, mask=None, is_causal=None, rope=None, cache=None, input_pos=None) -> Tensor:
        """x: (B, T, C) -> (B, T, C).

        A decoder block by default: causal when neither `mask` nor `is_causal` is given. An
        encoder (bidirectional) must say so with `is_causal=False` (and a padding `mask` if any).
        """
        if is_causal is None:
            is_causal = mask is None  # a decoder block: causal unless the caller says otherwise
        a = self.attn(self.norm1(x), mask=mask, is_causal=is_causal, rope=rope, cache=cache, input_pos=input_pos)
        x = x + self.attn_drop(a)
        return x + self.mlp(self.norm2(x))
