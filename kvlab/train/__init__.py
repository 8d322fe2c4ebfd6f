"""Training a GPT: configuration, the loop, the schedule, mixed precision and checkpoints.

Shape legend: B micro-batch size, T block_size (tokens per training window), V vocab_size.

The loop is the classic one: sample windows, forward, cross-entropy, backward, clip, AdamW
step, with a learning rate that warms up linearly and then follows a cosine down to `min_lr`.
Gradient accumulation makes a large batch out of several small ones; under `torchrun` the
same loop runs data-parallel (DDP), each process taking its slice of one global batch, so a
2-process run takes exactly the steps a 1-process run with twice the batch would.

Checkpoints are one safetensors file (weights, optimizer moments and RNG states as tensors; the
configs, step and history as JSON metadata), written to a temporary file and renamed, so a
crash mid-write leaves the previous checkpoint intact. Resuming restores everything the next
step depends on, so a resumed run reproduces the uninterrupted loss curve. Built in chapter 6.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import get_batch
from ..gpt import GPT, GPTConfig

__all__ = ["TrainConfig", "TRAIN_PRESETS", "PRESET_TOKENIZERS", "History", "check_tensorboard", "configure_optimizer", "lr_at", "precision_for",
           "estimate_loss", "read_checkpoint_header", "evaluate_split", "train", "save_checkpoint", "load_checkpoint", "export_model"]


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
    progress: bool = True  # a tqdm progress bar
    tensorboard: bool = False  # log to out_dir/tensorboard (needs the tensorboard package)

    def __post_init__(self) -> None:
        for name in ("batch_size", "block_size", "grad_accum", "max_steps", "eval_interval", "eval_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("warmup_steps", "checkpoint_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be 'auto', 'fp32', 'bf16' or 'fp16', got {self.precision!r}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("grad_clip and weight_decay must be >= 0")

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


# -- the pieces ------------------------------------------------------------------------------


def configure_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW with two parameter groups: matrices decay, vectors (biases, norm gains) do not.

    Decaying a norm's gain or a bias pulls it towards zero for no benefit; matrices (including
    embeddings) are where weight decay regularises. Built in chapter 6.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device_type == "cuda"  # the fused kernel exists for CUDA tensors only
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.max_steps <= cfg.warmup_steps:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def precision_for(device: torch.device, requested: str = "auto") -> str:
    """The precision to train in: what was asked for, or for "auto" the best the device truly supports.

    CUDA with bf16 (Ampere and newer) → "bf16"; older CUDA GPUs such as Colab's T4 → "fp16"
    (with a gradient scaler); MPS and CPU → "fp32", the safe default there.
    """
    if requested != "auto":
        if requested == "fp16" and device.type != "cuda":
            raise ValueError("precision='fp16' needs a CUDA device (it uses a gradient scaler)")
        return requested
    if device.type == "cuda":
        # Native bf16 starts with compute capability 8 (Ampere). torch.cuda.is_bf16_supported()
        # also counts slow emulation, which would put a T4 (7.5) on bf16.
        major, _ = torch.cuda.get_device_capability(device)
        return "bf16" if major >= 8 else "fp16"
    return "fp32"


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    logits = model(x)  # (B, T, V)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))


@torch.no_grad()
def estimate_loss(model: nn.Module, data: Tensor, cfg: TrainConfig, *, device: torch.device,
                  precision: str = "fp32", seed: int = 0) -> float:
    """Mean cross-entropy (nats per token) over `cfg.eval_batches` windows drawn with a fixed seed.

    The fixed seed makes every estimate use the same windows, so successive values differ only
    because the model changed. Built in chapter 6.
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(cfg.eval_batches):
        x, y = get_batch(data, cfg.batch_size, cfg.block_size, generator=gen, device=device)
        with _autocast(device, precision):
            total += _loss(model, x, y).item()
    model.train(was_training)
    return total / cfg.eval_batches


# -- checkpoints -----------------------------------------------------------------------------


def _model_tensors(model: GPT) -> dict[str, Tensor]:
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")  # the same tensor as tok_emb.weight; safetensors stores it once
    return {f"model.{k}": v.detach().contiguous().cpu() for k, v in state.items()}


def save_checkpoint(path: str | os.PathLike, model: GPT, optimizer: torch.optim.Optimizer | None = None, *,
                    step: int = 0, train_config: TrainConfig | None = None, history: History | None = None,
                    rng: dict[str, Tensor] | None = None, extra: dict | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> Path:
    """Write everything needed to resume to one safetensors file, atomically.

    Tensors: the weights, the optimizer's moments, RNG states. JSON metadata: the model and
    training configs, the step, the history, and anything in `extra` (e.g. the tokenizer).
    The file is written next to its destination and renamed over it. Built in chapter 6.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = _model_tensors(model)
    meta: dict = {"format": "kvlab-checkpoint-1", "step": step, "model_config": model.config.to_dict(),
                  "train_config": train_config.to_dict() if train_config else None,
                  "history": history.to_dict() if history else None, "extra": extra or {}}
    if optimizer is not None:
        opt = optimizer.state_dict()
        for idx, state in opt["state"].items():
            for key, value in state.items():
                if isinstance(value, Tensor):
                    tensors[f"optim.{idx}.{key}"] = value.detach().contiguous().cpu()
        meta["optim_param_groups"] = opt["param_groups"]
    if scaler is not None and scaler.is_enabled():
        meta["scaler"] = {k: (v.item() if isinstance(v, Tensor) else v) for k, v in scaler.state_dict().items()}
    for name, state in (rng or {}).items():
        tensors[f"rng.{name}"] = state.contiguous().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"kvlab": json.dumps(meta)})
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old file or the new one
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _checkpoint_meta(path: Path, metadata: dict) -> dict:
    """A checkpoint's JSON metadata, checked, with its configs parsed (GPTConfig, TrainConfig, History)."""
    try:
        meta = json.loads(metadata.get("kvlab", "null") or "null")
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not a kvlab checkpoint: its kvlab metadata is not JSON (line {err.lineno}, "
                         f"column {err.colno}: {err.msg})") from None
    if not isinstance(meta, dict) or meta.get("format") != "kvlab-checkpoint-1":
        raise ValueError(f"{path} is not a kvlab checkpoint (a safetensors file without kvlab's metadata)")
    try:
        meta["model_config"] = GPTConfig(**meta["model_config"])
        meta["train_config"] = TrainConfig(**meta["train_config"]) if meta.get("train_config") else None
        meta["history"] = History.from_dict(meta["history"]) if meta.get("history") else None
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a valid kvlab checkpoint: its stored configuration is damaged ({err})") from None
    if not isinstance(meta.get("extra", {}), dict):
        raise ValueError(f"{path} is not a valid kvlab checkpoint: its 'extra' is not a JSON object")
    meta.setdefault("step", 0)
    meta.setdefault("extra", {})
    return meta


def read_checkpoint_header(path: str | os.PathLike) -> dict:
    """What a checkpoint says about itself, without loading a tensor: "step", "model_config" (a
    GPTConfig), "train_config", "history" and "extra" (e.g. the tokenizer). How the command line
    checks a run folder before any work. Built in chapter 6."""
    from ..files import read_safetensors_metadata

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return _checkpoint_meta(path, read_safetensors_metadata(path, "kvlab checkpoint"))


def load_checkpoint(path: str | os.PathLike, model: GPT | None = None,
                    optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Read a checkpoint; load it into `model` (and `optimizer`) when given; return its contents.

    Returns a dict with "model_config" (a GPTConfig), "train_config", "step", "history",
    "extra", "rng" (name -> state tensor) and "model" (the model, built from the stored
    config when none was passed). A `model` whose config differs from the stored one is a
    `ValueError` that names each differing field. Built in chapter 6.
    """
    from ..files import check_state_shapes, read_safetensors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    # Everything is read and checked before the model or the optimizer is touched.
    tensors, metadata = read_safetensors(path, "kvlab checkpoint")
    meta = _checkpoint_meta(path, metadata)
    config, train_config, history = meta["model_config"], meta["train_config"], meta["history"]
    if model is not None and model.config != config:
        diffs = [f"{k}: checkpoint has {getattr(config, k)!r}, model has {getattr(model.config, k)!r}"
                 for k in config.to_dict() if getattr(config, k) != getattr(model.config, k)]
        raise ValueError(f"checkpoint {path} does not match the model's config: " + "; ".join(diffs))
    target = model if model is not None else GPT(config)
    expected = target.state_dict()
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    check_state_shapes(path, state, expected, what="weights", prefix="model.")
    if optimizer is not None:
        _check_optimizer_state(path, meta, tensors, optimizer)
    model = target
    if config.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=True)
    if optimizer is not None:
        opt_state: dict = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, key = k.split(".", 2)
                opt_state.setdefault(int(idx), {})[key] = v
        optimizer.load_state_dict({"state": opt_state, "param_groups": meta["optim_param_groups"]})
    return {
        "model": model, "model_config": config, "step": meta["step"],
        "train_config": train_config, "history": history,
        "extra": meta["extra"], "scaler": meta.get("scaler"),
        "rng": {k.removeprefix("rng."): v for k, v in tensors.items() if k.startswith("rng.")},
    }


def _check_optimizer_state(path: Path, meta: dict, tensors: dict[str, Tensor], optimizer) -> None:
    """The stored optimizer state must fit `optimizer`: same groups, one moment per parameter, same shapes."""
    if "optim_param_groups" not in meta:
        raise ValueError(f"checkpoint {path} has no optimizer state")
    groups = meta["optim_param_groups"]
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    valid = isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
    stored = [len(g["params"]) for g in groups] if valid else None
    if stored != sizes:
        raise ValueError(f"{path}: its optimizer state has parameter groups of sizes {stored}, the optimizer has "
                         f"{sizes}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        try:
            _, idx, name = key.split(".", 2)
            param = params[int(idx)]
        except (ValueError, IndexError):
            raise ValueError(f"{path}: optimizer tensor {key!r} names no parameter of the optimizer") from None
        if name in ("exp_avg", "exp_avg_sq") and tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{path}: optimizer tensor {key} has the wrong shape: expected {tuple(param.shape)}, "
                             f"got {tuple(value.shape)}")


# -- the loop --------------------------------------------------------------------------------


TENSORBOARD_INSTALL = "pip install tensorboard (or pip install 'kvlab[tensorboard]')"


def check_tensorboard() -> None:
    """Raise an ImportError saying what to install when TensorBoard logging cannot work."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs the package itself)
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as err:
        raise ImportError(f"TensorBoard logging needs the tensorboard package, which is not installed: "
                          f"{TENSORBOARD_INSTALL}") from err


def _tensorboard_writer(folder: Path):
    check_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder))


def _distributed() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless launched by torchrun with an initialised process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def train(model: GPT, train_data: Tensor, val_data: Tensor, cfg: TrainConfig, *,
          device: torch.device | str | None = None, out_dir: str | os.PathLike | None = None,
          resume_from: str | os.PathLike | None = None, extra: dict | None = None,
          stop_after: int | None = None) -> History:
    """Train `model` in place on 1-D token tensors; return the `History`.

    With `out_dir`, checkpoints go to `out_dir/checkpoint.safetensors` every
    `cfg.checkpoint_interval` steps and at the end. `resume_from` continues a checkpointed run
    exactly where it stopped (weights, optimizer, data order and dropout RNG). Under torchrun
    (an initialised process group) the model is wrapped in DistributedDataParallel and only
    rank 0 logs and writes. `stop_after` ends the run early after that many steps, with a
    checkpoint, as if it had been interrupted there (the schedule still follows
    `cfg.max_steps`): how to split a long run over several short sessions. Built in chapter 6.
    """
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a kvlab.GPT, got {type(model).__name__}")
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if cfg.block_size > model.config.max_seq_len:
        raise ValueError(f"block_size={cfg.block_size} exceeds the model's max_seq_len={model.config.max_seq_len}")
    for name, data in (("train_data", train_data), ("val_data", val_data)):
        if not isinstance(data, Tensor) or data.dim() != 1 or data.is_floating_point():
            raise TypeError(f"{name} must be a 1-D integer tensor of token ids")
        if len(data) <= cfg.block_size:
            raise ValueError(f"{name} has {len(data)} tokens; it needs more than block_size={cfg.block_size}")
        if int(data.max()) >= model.config.vocab_size or int(data.min()) < 0:
            raise ValueError(f"{name} holds ids outside [0, {model.config.vocab_size - 1}] (the model's vocabulary)")

    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
        raise ValueError(f"stop_after must be None or a positive int, got {stop_after!r}")
    if cfg.tensorboard:
        if out_dir is None:
            raise ValueError("cfg.tensorboard=True needs out_dir: the event files go to out_dir/tensorboard")
        check_tensorboard()
    rank, world = _distributed()
    device = torch.device(device) if device is not None else model.device
    precision = precision_for(device, cfg.precision)
    model.to(device).train()
    optimizer = configure_optimizer(model, cfg, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    history, start_step = History(), 0
    batch_gen = torch.Generator().manual_seed(cfg.seed)  # one global stream; each rank takes its slice
    torch.manual_seed(cfg.seed + rank)  # dropout masks differ across ranks, as they should

    if resume_from is not None:
        ckpt = load_checkpoint(resume_from, model, optimizer)
        start_step, history = ckpt["step"], ckpt["history"] or History()
        if "batches" in ckpt["rng"]:
            batch_gen.set_state(ckpt["rng"]["batches"])
        if f"torch_cpu_{rank}" in ckpt["rng"]:
            torch.set_rng_state(ckpt["rng"][f"torch_cpu_{rank}"])
        if ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])

    runner: nn.Module = model
    if cfg.compile:
        runner = torch.compile(model)
    if world > 1:
        runner = nn.parallel.DistributedDataParallel(runner, device_ids=[device.index] if device.type == "cuda" else None)

    writer = None
    if cfg.tensorboard and rank == 0:
        writer = _tensorboard_writer(Path(out_dir) / "tensorboard")
    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=start_step, desc="training", unit="step")

    def checkpoint(step: int) -> None:
        if out_dir is None or rank != 0:
            return
        rng = {"batches": batch_gen.get_state(), "torch_cpu_0": torch.get_rng_state()}
        save_checkpoint(Path(out_dir) / "checkpoint.safetensors", model, optimizer, step=step, train_config=cfg,
                        history=history, rng=rng, extra=extra, scaler=scaler)

    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * world
    t0 = time.perf_counter()
    elapsed_before = history.elapsed[-1] if history.elapsed else 0.0
    end_step = cfg.max_steps if stop_after is None else min(cfg.max_steps, stop_after)
    for step in range(start_step, end_step):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            x, y = get_batch(train_data, cfg.batch_size * world, cfg.block_size, generator=batch_gen, device=device)
            x, y = x[rank * cfg.batch_size:(rank + 1) * cfg.batch_size], y[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
            last = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if last or world == 1 else runner.no_sync():  # all-reduce once a step
                with _autocast(device, precision):
                    loss = _loss(runner, x, y) / cfg.grad_accum
                scaler.scale(loss).backward()
            step_loss += loss.item()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        history.steps.append(done)
        history.train_loss.append(step_loss)
        history.lr.append(lr)
        history.tokens.append(done * tokens_per_step)
        history.elapsed.append(elapsed_before + time.perf_counter() - t0)
        if writer is not None:
            writer.add_scalar("loss/train", step_loss, done)
            writer.add_scalar("lr", lr, done)
        if done % cfg.eval_interval == 0 or done == cfg.max_steps:
            val = estimate_loss(model, val_data, cfg, device=device, precision=precision)
            history.val_steps.append(done)
            history.val_loss.append(val)
            if writer is not None:
                writer.add_scalar("loss/val", val, done)
            if bar is not None:
                bar.set_postfix(train=f"{step_loss:.3f}", val=f"{val:.3f}")
        if bar is not None:
            bar.update(1)
        if cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0 and done != end_step:
            checkpoint(done)
    checkpoint(max(end_step, start_step))
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    model.eval()
    return history


# -- evaluation on a whole split, export; the command line is kvlab.train.cli ------------------------------------------


@torch.no_grad()
def evaluate_split(model: GPT, ids: Tensor, block_size: int, *, batch_size: int = 32,
                   device: torch.device | str | None = None) -> float:
    """Mean cross-entropy (nats per token) over *all* of `ids`, in consecutive windows.

    Unlike `estimate_loss` (a random sample, cheap, for curves), this covers every token once,
    so it is the number a model's record reports and a test can reproduce exactly. Each window
    predicts its tokens from the window's own earlier tokens. Built in chapter 6.
    """
    device = torch.device(device) if device is not None else model.device
    was_training = model.training
    model.eval()
    n_windows = (len(ids) - 1) // block_size
    if n_windows < 1:
        raise ValueError(f"ids has {len(ids)} tokens; it needs more than block_size={block_size}")
    usable = ids[: n_windows * block_size + 1].to(device)
    x_all = usable[:-1].view(n_windows, block_size)  # (N, T)
    y_all = usable[1:].view(n_windows, block_size)
    total = 0.0
    for i in range(0, n_windows, batch_size):
        logits = model(x_all[i:i + batch_size])
        total += F.cross_entropy(logits.float().flatten(0, 1), y_all[i:i + batch_size].flatten(),
                                 reduction="sum").item()
    model.train(was_training)
    return total / (n_windows * block_size)


def export_model(out_dir: str | os.PathLike, model: GPT, tokenizer, record: dict) -> Path:
    """Write a finished model the way `kvlab.load_shakespeare` reads it: weights (safetensors),
    config.json, tokenizer.json and record.json. Each file is written atomically."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k.removeprefix("model."): v for k, v in _model_tensors(model).items()}
    files = {
        "config.json": json.dumps({"model": model.config.to_dict(), "tokenizer": tokenizer.name}, indent=2) + "\n",
        "record.json": json.dumps(record, indent=2) + "\n",
    }
    tmp = out / f".model.safetensors.tmp-{os.getpid()}"
    save_file(weights, str(tmp))
    os.chmod(tmp, 0o644)  # safetensors creates files readable by their owner only
    os.replace(tmp, out / "model.safetensors")
    tokenizer_tmp = out / f".tokenizer.json.tmp-{os.getpid()}"
    tokenizer.save(tokenizer_tmp)
    os.replace(tokenizer_tmp, out / "tokenizer.json")
    for name, text in files.items():
        tmp = out / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    return out
