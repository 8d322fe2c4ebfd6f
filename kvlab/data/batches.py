"""Cutting a token sequence into a train/validation split and into training batches.

Shape legend: B = batch size, T = block size (context length in tokens).

The split keeps order (the last tenth of one long text is validation); a batch is B random
windows of T + 1 tokens, read as inputs and the same windows shifted by one as targets.
Built in chapter 1, used for training in chapter 6.
"""

from __future__ import annotations

from typing import TypeVar

import torch

from ..validation import check_number, check_positive_int

__all__ = ["train_val_split", "get_batch"]

_Seq = TypeVar("_Seq", str, list, tuple, torch.Tensor)


def train_val_split(data: _Seq, val_fraction: float = 0.1) -> tuple[_Seq, _Seq]:
    """Split a str, list, tuple or 1-D tensor into ``(train, val)`` without shuffling: the
    last ``val_fraction`` is validation, as is customary for a single long text (shuffled
    windows would leak neighbouring text into validation). Deterministic. Built in
    chapter 1; used in chapter 6."""
    check_number("val_fraction", val_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
    if isinstance(data, torch.Tensor):
        if data.dim() != 1:
            raise ValueError(f"data must be 1-D when it is a tensor, got shape {tuple(data.shape)}")
    elif not isinstance(data, (str, list, tuple)):
        raise TypeError(
            f"data must be a str, list, tuple or 1-D torch.Tensor, got {type(data).__name__}"
        )
    n = len(data)
    n_train = int(n * (1.0 - val_fraction))
    if n_train == 0 or n_train == n:
        raise ValueError(
            f"data of length {n} is too short to split with val_fraction={val_fraction}: "
            "one side would be empty"
        )
    return data[:n_train], data[n_train:]


def get_batch(
    data: torch.Tensor,
    batch_size: int,
    block_size: int,
    *,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
    bos: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``batch_size`` random windows of ``block_size`` tokens from the 1-D token
    tensor ``data``: inputs ``x`` (B, T) and targets ``y`` (B, T), where ``y`` is ``x``
    shifted one token left (each position predicts the next token). Offsets come from a
    CPU ``generator``, so a seed gives the same batches on CPU, CUDA or MPS. Both are int64
    on ``device``. With a start token ``bos``, every window begins with it: ``x`` is bos
    followed by T - 1 tokens of text and ``y`` the T tokens of text after bos, as a model that
    always sees a BOS first is trained (chapter 11). Built in chapter 1; used for training in
    chapter 6."""
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"data must be a 1-D torch.Tensor of token ids, got {type(data).__name__}")
    if data.dim() != 1:
        raise ValueError(f"data must be 1-D, got shape {tuple(data.shape)}")
    if data.is_floating_point() or data.is_complex() or data.dtype == torch.bool:
        raise TypeError(f"data must hold integer token ids, got dtype {data.dtype}")
    check_positive_int("batch_size", batch_size)
    check_positive_int("block_size", block_size)
    if len(data) <= block_size:
        raise ValueError(
            f"data must be longer than block_size: len(data)={len(data)}, "
            f"block_size={block_size} (a window needs block_size + 1 tokens)"
        )
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU torch.Generator (for batches that match across "
            f"devices), got one on {generator.device}"
        )

    if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int) or bos < 0):
        raise ValueError(f"bos must be None or a token id (an int >= 0), got {bos!r}")
    n_windows = len(data) - block_size  # start offsets whose window + 1 target fit
    starts = torch.randint(n_windows, (batch_size,), generator=generator)  # (B,)
    if bos is not None:  # windows of T text tokens: bos + the first T - 1 in, all T out
        windows = data.unfold(0, block_size, 1)[starts.to(data.device)].to(device=device, dtype=torch.long)
        x = torch.cat([torch.full_like(windows[:, :1], bos), windows[:, :-1]], dim=1)  # (B, T)
        return x, windows.contiguous()
    # unfold views every (T+1)-long window without copying; indexing gathers B of them
    windows = data.unfold(0, block_size + 1, 1)[starts.to(data.device)]  # (B, T+1)
    windows = windows.to(device=device, dtype=torch.long)
    # contiguous so callers can .view(-1) the targets for cross-entropy
    x = windows[:, :-1].contiguous()  # (B, T)
    y = windows[:, 1:].contiguous()  # (B, T)
    return x, y
