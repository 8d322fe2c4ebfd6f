"""Training settings: `TrainConfig` (each field commented), its named presets, and the `History`
a run records. Built in chapter 6.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..validation import check_choice, check_non_negative_int, check_positive_int

__all__ = ["TrainConfig", "TRAIN_PRESETS", "PRESET_TOKENIZERS", "History"]


@dataclass
class TrainConfig:
    """How to train. Every field has a default; presets in `TRAIN_PRESETS` override a few."""

    batch_size: int = 32  # windows per micro-batch (per process under DDP)
    block_size: int = 128  # tokens per window, T
    grad_accum: int = 1  # micro-batches summed into one optimizer step
    max_steps: int = 2000  # optimizer steps
    lr: float = 1e-3  # peak learning rate, reached after warmup
    min_lr: float = 1e-4  # learning rate at the end of the cosine
    warmup_steps: int = 100  # linear warmup from lr/warmup_steps to lr
    weight_decay: float = 0.1  # AdamW decay, applied to matrices only (not biases, norms)
    beta1: float = 0.9
    beta2: float = 0.99  # a little below the usual 0.999: small batches make noisy gradients
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_interval: int = 100  # steps between validation estimates
    eval_batches: int = 20  # micro-batches averaged per validation estimate
    checkpoint_interval: int = 0  # steps between checkpoints (0: only at the end, if out_dir)
    precision: str = "auto"  # "auto" | "fp32" | "bf16" | "fp16" (auto: bf16/fp16 on CUDA, fp32 elsewhere)
    compile: bool = False  # torch.compile the model (faster on GPUs; slow to start)
    seed: int = 1337  # seeds the initial weights, the batches and dropout
    bos_id: int | None = None  # a start token every window begins with (chapter 11); None: windows start anywhere
    progress: bool = True  # a tqdm progress bar
    tensorboard: bool = False  # log to out_dir/tensorboard (needs the tensorboard package)

    def __post_init__(self) -> None:
        for name in ("batch_size", "block_size", "grad_accum", "max_steps", "eval_interval", "eval_batches"):
            check_positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "checkpoint_interval"):
            check_non_negative_int(name, getattr(self, name))
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        check_choice("precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("grad_clip and weight_decay must be >= 0")
        if self.bos_id is not None and (isinstance(self.bos_id, bool) or not isinstance(self.bos_id, int)
                                        or self.bos_id < 0):
            raise ValueError(f"bos_id must be None or a token id (an int >= 0), got {self.bos_id!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Named (model, training) pairs. "shakespeare-cpu" is the model we ship in data/shakespeare;
# "shakespeare-char" is a deeper, narrower character model for a GPU; "quick" is the one-minute
# CPU run in the Training chapter.
TRAIN_PRESETS: dict[str, tuple[dict, dict]] = {
    "shakespeare-char": (
        dict(vocab_size=65, max_seq_len=192, d_model=192, n_layers=6, n_heads=6, dropout=0.1),
        dict(batch_size=32, block_size=192, max_steps=4000, lr=2e-3, min_lr=2e-4, warmup_steps=200,
             eval_interval=250, eval_batches=40, checkpoint_interval=250),
    ),
    # What the shipped model (data/shakespeare) was trained with, sized for a 2-core CPU: wide and
    # shallow (small matrices run inefficiently on a CPU), RoPE with a window so it can generate
    # past its training length through a sliding-window cache.
    "shakespeare-cpu": (
        dict(vocab_size=65, max_seq_len=128, d_model=256, n_layers=4, n_heads=4, pos="rope", window=128,
             dropout=0.1),
        dict(batch_size=32, block_size=128, max_steps=5500, lr=2e-3, min_lr=2e-4, warmup_steps=200,
             eval_interval=250, eval_batches=20, checkpoint_interval=500),
    ),
    # The shipped model's shape and training recipe on chapter 1's BPE-1,024 ids instead of
    # characters (data/shakespeare_bpe): chapter 6 compares the two in nats per character. A
    # token carries about 2.5 characters, so a 128-token window sees as much text as 320
    # characters, and an epoch takes fewer steps (800 steps here are about 8 epochs).
    "shakespeare-bpe-cpu": (
        dict(vocab_size=1024, max_seq_len=128, d_model=256, n_layers=4, n_heads=4, pos="rope", window=128,
             dropout=0.1),
        dict(batch_size=32, block_size=128, max_steps=800, lr=2e-3, min_lr=2e-4, warmup_steps=100,
             eval_interval=250, eval_batches=20, checkpoint_interval=500),
    ),
    "quick": (
        dict(vocab_size=65, max_seq_len=64, d_model=64, n_layers=2, n_heads=4),
        dict(batch_size=16, block_size=64, max_steps=300, lr=3e-3, min_lr=3e-4, warmup_steps=30,
             eval_interval=50, eval_batches=8),
    ),
    # The course's starting configurations, as the project descriptions give them: 6 layers of
    # 384 with 6 heads, a 256-token context and dropout 0.2, on BPE tokens (GPU-sized: ~10M
    # parameters); and a 12 x 768 decoder with RMSNorm and SwiGLU (GPT-2 small's size, modern
    # blocks). vocab_size is set from the tokenizer (see PRESET_TOKENIZERS).
    "bpe-6x384": (
        dict(vocab_size=1024, max_seq_len=256, d_model=384, n_layers=6, n_heads=6, dropout=0.2),
        dict(batch_size=64, block_size=256, max_steps=5000, lr=1e-3, min_lr=1e-4, warmup_steps=100,
             eval_interval=250, eval_batches=20, checkpoint_interval=500),
    ),
    "modern-12x768": (
        dict(vocab_size=1024, max_seq_len=256, d_model=768, n_layers=12, n_heads=12, norm="rmsnorm", mlp="swiglu",
             dropout=0.2),
        dict(batch_size=32, block_size=256, max_steps=5000, lr=6e-4, min_lr=6e-5, warmup_steps=200,
             eval_interval=250, eval_batches=20, checkpoint_interval=500),
    ),
}

# The tokenizer each preset trains on: (kind, BPE vocabulary size). Presets not listed are
# character-level.
PRESET_TOKENIZERS: dict[str, tuple[str, int | None]] = {
    "shakespeare-bpe-cpu": ("bpe", 1024),
    "bpe-6x384": ("bpe", 1024),
    "modern-12x768": ("bpe", 1024),
}


@dataclass
class History:
    """What happened during training, for plots: one row per step, one per validation."""

    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # tokens seen after each step (all processes)
    elapsed: list[float] = field(default_factory=list)  # seconds since the run (or resume) began
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        return cls(**d)
