"""`python -m kvlab.generate`: generate text from the command line and report how fast it was.

    python -m kvlab.generate --prompt "ROMEO:" --model shakespeare --temperature 0.8 --seed 1
    python -m kvlab.generate --prompt "The KV cache" --model gpt2 --top-p 0.9   # downloads GPT-2
    python -m kvlab.generate --prompt "ROMEO:" --model runs/quick/checkpoint.safetensors

--model is "shakespeare" (the course's small model, shipped in data/shakespeare), a GPT-2 size
(gpt2, gpt2-medium, gpt2-large, gpt2-xl; from the Hugging Face hub), the path of a folder
written by `python -m kvlab.train --export`, or a training checkpoint (a .safetensors file, or
the run folder holding checkpoint.safetensors). Tokens are printed as they are generated
(--no-stream prints the text at the end); prefill time, decode time and decode speed go to
stderr. A model that can slide (RoPE with a sliding window, like the shipped Shakespeare
model) generates past its context; any other stops there. Built in chapter 7.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .._cli import non_negative_int, positive_int


def _fraction(low_open: bool):
    def parse(text: str) -> float:
        value = float(text)
        ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be in {'(0, 1]' if low_open else '[0, 1]'}, got {text}")
        return value
    return parse


def _temperature(text: str) -> float:
    value = float(text)
    if not value >= 0.0 or value == float("inf"):  # rejects NaN too
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0 = greedy), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kvlab.generate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--model", default="shakespeare",
                        help="shakespeare, gpt2, gpt2-medium, gpt2-large, gpt2-xl, or an exported model folder")
    parser.add_argument("--max-new-tokens", type=positive_int, default=200, help="tokens to generate (default 200)")
    parser.add_argument("--temperature", type=_temperature, default=1.0, help="0 = greedy (default 1.0)")
    parser.add_argument("--top-k", type=non_negative_int, default=None, help="keep the k most likely (0 = off)")
    parser.add_argument("--top-p", type=_fraction(True), default=None, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--min-p", type=_fraction(False), default=None, help="min-p threshold (0 = off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the CPU sampling generator (default 0)")
    parser.add_argument("--no-cache", action="store_true", help="recompute everything each step (slow)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    parser.add_argument("--no-stream", action="store_true", help="print the text once at the end, not token by token")
    return parser


def load_checkpoint_model(path: Path, device: torch.device):
    """(model, tokenizer) from a training checkpoint that stores its tokenizer."""
    from ..tokenizers import tokenizer_from_state
    from ..train import load_checkpoint

    ckpt = load_checkpoint(path)
    state = ckpt["extra"].get("tokenizer")
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} does not store its tokenizer (it was written by an older kvlab): "
                         "export the model with `python -m kvlab.train --export DIR` and pass DIR, or retrain")
    tokenizer = tokenizer_from_state(state, f"checkpoint {path}")
    model = ckpt["model"].eval().to(device)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"checkpoint {path}: its tokenizer has {tokenizer.vocab_size} tokens, the model "
                         f"{model.config.vocab_size}")
    return model, tokenizer


def load(name: str, device: torch.device):
    """(model, tokenizer) for a --model value."""
    from ..pretrained import GPT2_NAMES, load_gpt2, load_shakespeare
    from ..tokenizers import GPT2Tokenizer

    if name in GPT2_NAMES:
        return load_gpt2(name, device=device), GPT2Tokenizer()
    if name == "shakespeare":
        return load_shakespeare(device=device)
    path = Path(name)
    if path.is_dir() and not (path / "model.safetensors").exists() and (path / "checkpoint.safetensors").is_file():
        return load_checkpoint_model(path / "checkpoint.safetensors", device)
    if path.is_dir():
        return load_shakespeare(name, device=device)
    if path.is_file():
        return load_checkpoint_model(path, device)
    raise ValueError(f"--model must be shakespeare, one of {', '.join(GPT2_NAMES)}, an exported model folder or a "
                     f"training checkpoint; got {name!r}")


class TextStream:
    """Prints generated text as tokens arrive, holding back a token that ends mid-character.

    A byte-level BPE token can carry half of a multi-byte character; decoding it alone shows
    U+FFFD, so the printed text only advances once the decoded suffix is whole.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], out=None):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids)
        self.out = out if out is not None else sys.stdout
        self.printed = 0

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        self.flush(final=False)

    def flush(self, final: bool = True) -> None:
        text = self.tokenizer.decode(self.ids)
        if not final and text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)


@torch.inference_mode()
def stream_generate(model, idx: torch.Tensor, max_new_tokens: int, *, use_cache: bool = True,
                    on_token=None, generator: torch.Generator | None = None, **sampling) -> tuple[torch.Tensor, dict]:
    """`kvlab.generate`'s loop (same tokens for the same generator), calling `on_token(id)` per token.

    Returns the tokens (1, T + N) and timings: prefill_s (the prompt's forward pass), decode_s
    (every step after it, without the time spent in `on_token`), total_s, new_tokens. Built in
    chapter 7.
    """
    from ..device import synchronize
    from . import _check_generate_args, decode_step, next_token, prefill

    _check_generate_args(model, idx, max_new_tokens, use_cache, sampling.get("temperature", 1.0),
                         sampling.get("top_k"), sampling.get("top_p"), sampling.get("min_p"), generator, None, None)
    import time

    T = idx.size(1)
    out = torch.empty(1, T + max_new_tokens, dtype=torch.long, device=idx.device)
    out[:, :T] = idx
    choose = dict(sampling, generator=generator)
    device = idx.device
    synchronize(device)
    start = time.perf_counter()
    cache = None
    if use_cache:
        cache = model.new_cache(1, kind="sliding") if model.can_slide else \
            model.new_cache(1, max_seq_len=T + max_new_tokens)
        logits = prefill(model, idx, cache)
    else:
        logits = model._forward(idx, None, 0, last_only=True)[:, -1]
    synchronize(device)
    prefilled = time.perf_counter()
    outside = 0.0  # time spent printing, left out of the decode time
    for n in range(1, max_new_tokens + 1):
        token = next_token(logits, **choose)  # (1, 1)
        out[:, T + n - 1] = token[:, 0]
        if on_token is not None:
            synchronize(device)
            t0 = time.perf_counter()
            on_token(int(token))
            outside += time.perf_counter() - t0
        if n == max_new_tokens:
            break
        if use_cache:
            logits = decode_step(model, token, cache)
        else:
            logits = model._forward(out[:, : T + n], None, 0, last_only=True)[:, -1]
    synchronize(device)
    end = time.perf_counter()
    return out, {"prefill_s": prefilled - start, "decode_s": end - prefilled - outside,
                 "total_s": end - start - outside, "new_tokens": max_new_tokens}


def main(argv: list[str] | None = None) -> int:
    from ..device import describe_device, pick_device

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = pick_device(args.device)
        model, tokenizer = load(args.model, device)
        ids = tokenizer.encode(args.prompt)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if not ids:
        parser.error("--prompt encodes to no tokens")
    room = model.config.max_seq_len - len(ids)
    if room < 1 and not model.can_slide:
        parser.error(f"--prompt is {len(ids)} tokens; the model's context is {model.config.max_seq_len}")
    if len(ids) > model.config.max_seq_len and args.no_cache:
        parser.error(f"--prompt is {len(ids)} tokens, more than the model's context of {model.config.max_seq_len}")
    # A model that slides (RoPE + a sliding window) attends to its last `window` positions only,
    # so it can go on past max_seq_len; any other model stops at its context.
    n = args.max_new_tokens if model.can_slide else min(args.max_new_tokens, room)
    stream = None if args.no_stream else TextStream(tokenizer, ids)
    if stream is not None:
        stream.flush()  # the prompt, at once
    out, stats = stream_generate(model, torch.tensor([ids], device=device), n, use_cache=not args.no_cache,
                                 on_token=stream.push if stream is not None else None,
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                 min_p=args.min_p, generator=torch.Generator().manual_seed(args.seed))
    if stream is not None:
        stream.flush()
        print()
    else:
        print(tokenizer.decode(out[0].tolist()))
    print()
    steps = stats["new_tokens"] - 1
    decode_rate = steps / stats["decode_s"] if stats["decode_s"] > 0 and steps > 0 else float("nan")
    print(f"[{describe_device(device)}, {'no cache' if args.no_cache else 'KV cache'}] "
          f"prefill {stats['prefill_s'] * 1e3:.1f} ms for {len(ids)} prompt tokens, "
          f"decode {stats['decode_s']:.2f} s for {steps} tokens ({decode_rate:.1f} tokens/s), "
          f"total {stats['total_s']:.2f} s for {stats['new_tokens']} new tokens", file=sys.stderr)
    if n < args.max_new_tokens:
        print(f"(stopped at the model's context of {model.config.max_seq_len} tokens)", file=sys.stderr)
    elif len(ids) + n > model.config.max_seq_len:
        print(f"(went past the model's context of {model.config.max_seq_len} tokens with its sliding window of "
              f"{model.config.window})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
