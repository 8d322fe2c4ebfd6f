"""Training a GPT: configuration, the loop, the schedule, mixed precision and checkpoints.

Shape legend: B micro-batch size, T block_size (tokens per training window), V vocab_size.

The loop is the classic one: sample windows, forward, cross-entropy, backward, clip, AdamW
step, with a learning rate that warms up linearly and then follows a cosine down to `min_lr`.
Gradient accumulation makes a large batch out of several small ones; under `torchrun` the
same loop runs data-parallel (DDP), each process taking its slice of one global batch, so a
2-process run takes exactly the steps a 1-process run with twice the batch would.

Checkpoints (`kvlab.train.checkpoints`) are one safetensors file, written to a temporary file and
renamed; resuming restores everything the next step depends on, so a resumed run reproduces the
uninterrupted loss curve. The settings are `kvlab.train.config`; the command line
`kvlab.train.cli`. Built in chapter 6.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import get_batch
from ..gpt import GPT
from ..validation import check_positive_int
from .checkpoints import export_model, load_checkpoint, read_checkpoint_header, save_checkpoint
from .config import PRESET_TOKENIZERS, TRAIN_PRESETS, History, TrainConfig

__all__ = ["TrainConfig", "TRAIN_PRESETS", "PRESET_TOKENIZERS", "History", "check_tensorboard", "configure_optimizer", "lr_at", "precision_for",
           "estimate_loss", "read_checkpoint_header", "evaluate_split", "train", "save_checkpoint", "load_checkpoint", "export_model"]


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
        x, y = get_batch(data, cfg.batch_size, cfg.block_size, generator=gen, device=device, bos=cfg.bos_id)
        with _autocast(device, precision):
            total += _loss(model, x, y).item()
    model.train(was_training)
    return total / cfg.eval_batches


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
    if cfg.bos_id is not None and cfg.bos_id >= model.config.vocab_size:
        raise ValueError(f"bos_id={cfg.bos_id} is outside the model's vocabulary [0, {model.config.vocab_size - 1}]")

    check_positive_int("stop_after", stop_after, allow_none=True)
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
            x, y = get_batch(train_data, cfg.batch_size * world, cfg.block_size, generator=batch_gen, device=device,
                             bos=cfg.bos_id)
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


# -- evaluation on a whole split ------------------------------------------


@torch.no_grad()
def evaluate_split(model: GPT, ids: Tensor, block_size: int, *, batch_size: int = 32,
                   device: torch.device | str | None = None, bos: int | None = None) -> float:
    """Mean cross-entropy (nats per token) over *all* of `ids`, in consecutive windows.

    Unlike `estimate_loss` (a random sample, cheap, for curves), this covers every token once,
    so it is the number a model's record reports and a test can reproduce exactly. Each window
    predicts its tokens from the window's own earlier tokens. With a start token `bos` (a model
    trained with `TrainConfig.bos_id`), each window is bos + block_size text tokens, all of
    which are predicted, the first from bos alone. Built in chapter 6 (`bos` in chapter 11).
    """
    device = torch.device(device) if device is not None else model.device
    was_training = model.training
    model.eval()
    if bos is None:  # windows of block_size + 1 tokens, overlapping by one: each predicts its last block_size
        n_windows = (len(ids) - 1) // block_size
        if n_windows < 1:
            raise ValueError(f"ids has {len(ids)} tokens; it needs more than block_size={block_size}")
        usable = ids[: n_windows * block_size + 1].to(device)
        x_all = usable[:-1].view(n_windows, block_size)  # (N, T)
        y_all = usable[1:].view(n_windows, block_size)
    else:  # bos, then block_size - 1 tokens in; all block_size tokens predicted
        n_windows = len(ids) // block_size
        if n_windows < 1:
            raise ValueError(f"ids has {len(ids)} tokens; it needs at least block_size={block_size}")
        y_all = ids[: n_windows * block_size].to(device).view(n_windows, block_size)  # (N, T)
        x_all = torch.cat([torch.full_like(y_all[:, :1], bos), y_all[:, :-1]], dim=1)  # (N, T)
    total = 0.0
    for i in range(0, n_windows, batch_size):
        logits = model(x_all[i:i + batch_size])
        total += F.cross_entropy(logits.float().flatten(0, 1), y_all[i:i + batch_size].flatten(),
                                 reduction="sum").item()
    model.train(was_training)
    return total / (n_windows * block_size)
