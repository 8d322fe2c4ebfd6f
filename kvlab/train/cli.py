"""`python -m kvlab.train`: the command line of `kvlab.train` (a preset, flags that override it).

Every setting is checked before the corpus is read or a model is built, and a wrong one is a
usage error (exit status 2, the flag named, what to do): shapes that do not fit, a device this
machine lacks, fp16 without CUDA, a run folder that already holds a checkpoint (pass --resume or
--overwrite), --resume without a checkpoint, or with a model shape that differs from the
checkpoint's. A resumed run says on its first line from which step it continues, and reuses
the tokenizer stored in the checkpoint. Built in chapter 6.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path

import torch

from .._cli import (SHAPE_FLAGS, Parser, add_shape_arguments, apply_shape_flags, pick_device_or_exit,
                   positive_float, positive_int)
from ..gpt import GPT, GPTConfig
from . import (PRESET_TOKENIZERS, TRAIN_PRESETS, TrainConfig, evaluate_split, export_model, precision_for,
                    read_checkpoint_header, train)

__all__ = ["build_parser", "main"]

CHECKPOINT = "checkpoint.safetensors"


def build_parser() -> Parser:
    """The command line of `python -m kvlab.train`."""
    import argparse

    def dropout(text: str) -> float:
        value = float(text)
        if not 0.0 <= value < 1.0:
            raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {text!r}")
        return value

    parser = Parser(
        prog="python -m kvlab.train",
        description="Train a GPT on Tiny Shakespeare with kvlab's training loop, on characters or on BPE tokens. "
                    "A preset gives the model and the training run; every flag below overrides it. Run under "
                    "torchrun for data-parallel training.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""presets:
  shakespeare-char   6 x 192, 6 heads, context 192, characters (a deeper, narrower variant for a GPU)
  shakespeare-cpu    4 x 256, RoPE + sliding window, characters (the shipped data/shakespeare model)
  shakespeare-bpe-cpu  the same model on BPE with 1024 tokens (the shipped data/shakespeare_bpe model)
  quick              2 x 64, characters (about a minute on a CPU)
  bpe-6x384          6 x 384, 6 heads, context 256, dropout 0.2, BPE with 1024 tokens (a GPU run)
  modern-12x768      12 x 768, RMSNorm + SwiGLU, context 256, dropout 0.2, BPE with 1024 tokens (a GPU run)

checkpoints: <out>/checkpoint.safetensors. A folder that already holds one is refused unless
--resume (continue it: same model shape, its stored tokenizer) or --overwrite (start again).

examples:
  python -m kvlab.train --preset quick
  python -m kvlab.train --preset quick --stop-after 100 && python -m kvlab.train --preset quick --resume
  python -m kvlab.train --preset bpe-6x384 --device cuda --export runs/bpe-model
  python -m kvlab.train --preset quick --tokenizer bpe --vocab-size 512 --epochs 0.5
  python -m kvlab.train --preset quick --d-model 128 --n-layers 4 --n-heads 4 --norm rmsnorm --mlp swiglu --pos rope
  python -m kvlab.train --preset quick --pos sinusoidal --d-ff 512 --out runs/sinusoidal
  python -m kvlab.generate --model runs/quick/checkpoint.safetensors --prompt "ROMEO:"
""")
    parser.add_argument("--preset", choices=sorted(TRAIN_PRESETS), default="shakespeare-cpu",
                        help="model and training configuration (default: shakespeare-cpu, the shipped model's)")
    parser.add_argument("--out", default=None, help="run directory for checkpoints (default: runs/<preset>)")
    parser.add_argument("--data", default=None, help="a local Tiny Shakespeare input.txt (checksum-verified)")
    tok = parser.add_argument_group("tokens")
    tok.add_argument("--tokenizer", choices=["char", "bpe"], default=None,
                     help="characters, or a byte-level BPE trained on the training split (default: the preset's)")
    tok.add_argument("--vocab-size", type=positive_int, default=None,
                     help="BPE vocabulary size, >= 256 (default: the preset's, or 1024); --tokenizer bpe only")
    tok.add_argument("--min-frequency", type=positive_int, default=None,
                     help="BPE merges only pairs seen at least this often (default 2; 1 gives the most tokens); "
                          "--tokenizer bpe only")
    model = parser.add_argument_group("model (each overrides the preset)")
    add_shape_arguments(model, max_seq_len_help="context length; also the training window unless --block-size "
                                                "is given")
    model.add_argument("--dropout", type=dropout, help="dropout probability during training")
    run = parser.add_argument_group("training (each overrides the preset)")
    length = run.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=positive_int, help="optimizer steps")
    length.add_argument("--epochs", type=positive_float,
                        help="passes over the training tokens (may be fractional); sets the number of steps")
    run.add_argument("--batch-size", type=positive_int, help="windows per micro-batch")
    run.add_argument("--block-size", type=positive_int, help="tokens per training window (<= --max-seq-len)")
    run.add_argument("--lr", type=positive_float, help="peak learning rate")
    run.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                     help="auto: bf16 or fp16 on CUDA, fp32 elsewhere; fp16 needs CUDA")
    run.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    again = run.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.safetensors")
    again.add_argument("--overwrite", action="store_true",
                       help="start a new run even though <out>/checkpoint.safetensors exists (replacing it)")
    run.add_argument("--stop-after", type=positive_int, help="stop (with a checkpoint) after this many steps")
    run.add_argument("--export", default=None, help="write the finished model, tokenizer and record here")
    run.add_argument("--tensorboard", action="store_true",
                     help="log to <out>/tensorboard (needs: pip install tensorboard)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _settings(parser: Parser, args) -> tuple[str, int, dict, TrainConfig]:
    """(tokenizer kind, BPE vocabulary, GPTConfig keywords without vocab_size, TrainConfig), checked."""
    model_kwargs, train_kwargs = TRAIN_PRESETS[args.preset]
    kind, preset_vocab = PRESET_TOKENIZERS.get(args.preset, ("char", None))
    kind = args.tokenizer or kind
    if kind == "char" and args.vocab_size is not None:
        parser.error("--vocab-size is for --tokenizer bpe (a character vocabulary is the text's characters)")
    if kind == "char" and args.min_frequency is not None:
        parser.error("--min-frequency is for --tokenizer bpe (a character vocabulary is the text's characters)")
    bpe_vocab = args.vocab_size or preset_vocab or 1024
    if kind == "bpe" and bpe_vocab < 256:
        parser.error(f"--vocab-size must be >= 256 (the 256 byte tokens), got {bpe_vocab}")
    try:
        model_kwargs = apply_shape_flags(model_kwargs, args)
    except ValueError as err:
        parser.error(str(err))
    if args.dropout is not None:
        model_kwargs["dropout"] = args.dropout
    model_kwargs.pop("vocab_size", None)
    try:
        GPTConfig(**{**model_kwargs, "vocab_size": 256 if kind == "bpe" else 65})  # shape checks, before any work
    except (TypeError, ValueError) as err:
        parser.error(f"model configuration: {err}")
    overrides = {"max_steps": args.max_steps, "batch_size": args.batch_size, "lr": args.lr,
                 "precision": args.precision, "block_size": args.block_size}
    train_kwargs = {**train_kwargs, **{k: v for k, v in overrides.items() if v is not None}}
    if args.block_size is None:
        train_kwargs["block_size"] = min(train_kwargs["block_size"], model_kwargs["max_seq_len"])
    if train_kwargs["block_size"] > model_kwargs["max_seq_len"]:
        parser.error(f"--block-size {train_kwargs['block_size']} exceeds the context (--max-seq-len "
                     f"{model_kwargs['max_seq_len']})")
    train_kwargs.update(compile=args.compile, tensorboard=args.tensorboard, progress=not args.no_progress)
    try:
        cfg = TrainConfig(**train_kwargs)
    except ValueError as err:
        parser.error(str(err))
    return kind, bpe_vocab, model_kwargs, cfg


def _check_device(parser: Parser, args, cfg: TrainConfig) -> torch.device | None:
    """The device of a one-process run (None under torchrun, which assigns one per process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    device = pick_device_or_exit(parser, args.device)
    _check_precision(parser, cfg, device)
    return device


def _check_precision(parser: Parser, cfg: TrainConfig, device: torch.device) -> None:
    try:
        precision_for(device, cfg.precision)
    except ValueError:
        parser.error(f"--precision {cfg.precision} needs a CUDA GPU (fp16 trains with a gradient scaler); this "
                     f"run is on {device.type}: use --precision fp32 or bf16, or leave --precision out (auto)")


def _check_run_folder(parser: Parser, args, kind: str, model_kwargs: dict) -> dict | None:
    """Refuse to overwrite a checkpoint by accident; for --resume, the checkpoint's header, checked."""
    path = Path(args.out or f"runs/{args.preset}") / CHECKPOINT
    if not args.resume:
        if path.exists() and not args.overwrite:
            try:
                header = read_checkpoint_header(path)
                what = f"a checkpoint at step {header['step']}" + (
                    f" of {header['train_config'].max_steps}" if header["train_config"] else "")
            except (ValueError, FileNotFoundError):
                what = "a file"
            parser.error(f"{path} already holds {what}: pass --resume to continue it, --overwrite to start again "
                         f"and replace it, or --out DIR for a new run")
        return None
    if not path.is_file():
        parser.error(f"--resume: no checkpoint at {path} (run without --resume to start a run there, or pass the "
                     "run's folder with --out)")
    try:
        header = read_checkpoint_header(path)
    except (ValueError, FileNotFoundError) as err:
        parser.error(f"--resume: {err}")
    stored = header["model_config"].to_dict()
    here = GPTConfig(**{**model_kwargs, "vocab_size": stored["vocab_size"]}).to_dict()
    flags = (*SHAPE_FLAGS, "dropout")
    diffs = [f"{'--' + k.replace('_', '-') if k in flags else k} {stored[k]} there, {here[k]} here"
             for k in here if stored.get(k) != here[k]]
    state = header["extra"].get("tokenizer")
    stored_kind = state.get("kind") if isinstance(state, dict) else None
    if stored_kind != kind:
        diffs.append(f"--tokenizer {stored_kind} there, {kind} here")
    elif kind == "bpe" and args.vocab_size is not None and args.vocab_size != stored["vocab_size"]:
        diffs.append(f"--vocab-size {stored['vocab_size']} there, {args.vocab_size} here")
    if diffs:
        parser.error(f"--resume: {path} holds a different model ({'; '.join(diffs)}): resume with the run's own "
                     "settings (its --preset and flags), or start a new run with --out DIR or --overwrite")
    return header


def _bpe_tokenizer(text: str, vocab_size: int, min_frequency: int):
    """Train the BPE; when the text yields fewer ids than asked, say so in one line."""
    from ..tokenizers import BPETokenizer

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore")
        tokenizer = BPETokenizer.train(text, vocab_size=vocab_size, min_frequency=min_frequency)
    if tokenizer.vocab_size < vocab_size:
        lower = " (a lower --min-frequency gives more)" if min_frequency > 1 else ""
        print(f"BPE: asked for {vocab_size} tokens; the training text yields {tokenizer.vocab_size} with "
              f"--min-frequency {min_frequency}{lower}; the model uses {tokenizer.vocab_size}")
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    """`python -m kvlab.train`: train a GPT (characters or BPE) on Tiny Shakespeare."""
    import platform

    from ..data import load_shakespeare_text, train_val_split
    from ..device import describe_device
    from ..tokenizers import CharTokenizer, tokenizer_from_state, tokenizer_state
    from . import check_tensorboard

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tensorboard:
        try:
            check_tensorboard()
        except ImportError as err:
            parser.error(f"--tensorboard: {err}")

    # -- every setting checked before the text is read or a model is built --------------------
    kind, bpe_vocab, model_kwargs, cfg = _settings(parser, args)
    device = _check_device(parser, args, cfg)
    header = _check_run_folder(parser, args, kind, model_kwargs)
    out_dir = Path(args.out or f"runs/{args.preset}")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}") if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        _check_precision(parser, cfg, device)
    rank = torch.distributed.get_rank() if world > 1 else 0

    text = load_shakespeare_text(args.data)
    train_text, val_text = train_val_split(text)
    if header is not None:  # the tokenizer the run started with, not a new one
        tokenizer = tokenizer_from_state(header["extra"]["tokenizer"], f"checkpoint {out_dir / CHECKPOINT}")
    elif kind == "bpe":  # the same on every rank: deterministic
        tokenizer = _bpe_tokenizer(train_text, bpe_vocab, args.min_frequency or 2)
    else:
        tokenizer = CharTokenizer.from_text(train_text)
    train_ids = torch.tensor(tokenizer.encode(train_text))
    val_ids = torch.tensor(tokenizer.encode(val_text))
    if args.epochs is not None:
        tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * world
        cfg.max_steps = max(1, math.ceil(args.epochs * len(train_ids) / tokens_per_step))
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(**{**model_kwargs, "vocab_size": tokenizer.vocab_size}))
    if rank == 0:
        epochs = cfg.max_steps * cfg.batch_size * cfg.block_size * cfg.grad_accum * world / len(train_ids)
        start = (f"resuming {out_dir / CHECKPOINT} from step {header['step']}" if header is not None else
                 f"a new run, checkpoints to {out_dir / CHECKPOINT}" + (" (replacing the one there)"
                                                                         if args.overwrite else ""))
        print(f"{args.preset}: {model.num_params():,} parameters, {kind} tokenizer ({tokenizer.vocab_size} tokens), "
              f"{len(train_ids):,} training tokens, {cfg.max_steps} steps ({epochs:.2f} epochs), "
              f"{describe_device(device)}, precision {precision_for(device, cfg.precision)}, {world} process(es); "
              f"{start}")
    resume = out_dir / CHECKPOINT if header is not None else None
    began = time.perf_counter()
    history = train(model, train_ids, val_ids, cfg, device=device, out_dir=out_dir, resume_from=resume,
                    stop_after=args.stop_after,
                    extra={"tokenizer": tokenizer_state(tokenizer), "preset": args.preset})
    wall = time.perf_counter() - began
    if rank == 0:
        train_loss = evaluate_split(model, train_ids[: len(val_ids)], cfg.block_size, device=device)
        val_loss = evaluate_split(model, val_ids, cfg.block_size, device=device)
        if kind == "char":  # one token per character: nats per token are nats per character
            losses = {"train_nats_per_char": round(train_loss, 4), "val_nats_per_char": round(val_loss, 4)}
        else:
            train_chars = len(tokenizer.decode(train_ids[: len(val_ids)].tolist()))
            losses = {"train_nats_per_token": round(train_loss, 4), "val_nats_per_token": round(val_loss, 4),
                      # the same losses spread over the characters (comparable with a character model)
                      "train_nats_per_char_approx": round(train_loss * len(val_ids) / train_chars, 4),
                      "val_nats_per_char_approx": round(val_loss * len(val_ids) / len(val_text), 4)}
        record = {
            "preset": args.preset, "tokenizer": kind, "vocab_size": tokenizer.vocab_size,
            "parameters": model.num_params(), "steps": history.steps[-1] if history.steps else 0,
            "tokens_seen": history.tokens[-1] if history.tokens else 0,
            "wall_time_s": round(history.elapsed[-1] if history.elapsed else wall, 1),
            "hardware": f"{describe_device(device)} ({platform.processor() or platform.machine()}), {world} process(es)",
            "precision": precision_for(device, cfg.precision), "torch": torch.__version__, **losses,
            "eval": f"evaluate_split over consecutive {cfg.block_size}-token windows "
                    "(train: its first len(val) tokens; val: the last 10% of the text)",
            "model_config": model.config.to_dict(), "train_config": cfg.to_dict(),
        }
        print(json.dumps({k: v for k, v in record.items() if k not in ("train_config", "model_config")}, indent=2))
        if args.export:
            export_model(args.export, model, tokenizer, record)
            print(f"exported to {args.export}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0
