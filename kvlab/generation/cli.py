"""`python -m kvlab.generate`: generate text from the command line and report how fast it was.

    python -m kvlab.generate --prompt "ROMEO:" --model shakespeare --temperature 0.8 --seed 1
    python -m kvlab.generate --prompt "ROMEO:" --model shakespeare-bpe --stop "\n\n"
    python -m kvlab.generate --prompt "The KV cache" --model gpt2 --top-p 0.9 --eos   # downloads GPT-2
    python -m kvlab.generate --prompt-file scene.txt --model runs/quick/checkpoint.safetensors
    echo "ROMEO:" | python -m kvlab.generate --prompt-file -

--model is "shakespeare" or "shakespeare-bpe" (the course's small models, shipped in
data/shakespeare and data/shakespeare_bpe), a GPT-2 size (gpt2, gpt2-medium, gpt2-large,
gpt2-xl; a download from the Hugging Face hub, about 550 MB for gpt2), the path of a folder
written by `python -m kvlab.train --export`, or a training checkpoint (a .safetensors file, or
the run folder holding checkpoint.safetensors). Tokens are printed as they are generated
(--no-stream prints the text at the end); prefill time, decode time and decode speed go to
stderr. --stop TEXT ends the text before TEXT; --eos ends it at the tokenizer's end-of-text
token. A model that can slide (RoPE with a sliding window, like the shipped Shakespeare
model) generates past its context; any other stops there. Built in chapter 7.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .._cli import Parser, non_negative_int, pick_device_or_exit, positive_int
from ..cpu_kernels import fast_cpu_inference
from ..models import MODEL_HELP, load_checkpoint_model, load_model
from ..sampling import SamplingConfig, resolve_sampling

__all__ = ["build_parser", "load", "load_checkpoint_model", "TextStream", "stream_generate", "read_prompt", "main"]


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


def _stop_text(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must be a non-empty text")
    return text


def build_parser() -> Parser:
    parser = Parser(prog="python -m kvlab.generate", description=__doc__.split("\n\n")[0],
                    epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text to continue")
    prompt.add_argument("--prompt-file", metavar="PATH",
                        help="read the text to continue from this file (UTF-8, as is), or from stdin with -")
    parser.add_argument("--model", default="shakespeare", help=MODEL_HELP + " (default: shakespeare)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=200, help="tokens to generate (default 200)")
    parser.add_argument("--temperature", type=_temperature, default=1.0, help="0 = greedy (default 1.0)")
    parser.add_argument("--top-k", type=non_negative_int, default=None, help="keep the k most likely (0 = off)")
    parser.add_argument("--top-p", type=_fraction(True), default=None, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--min-p", type=_fraction(False), default=None, help="min-p threshold (0 = off)")
    parser.add_argument("--stop", type=_stop_text, action="append", default=[], metavar="TEXT",
                        help="end the text before TEXT once the generated text contains it (may be repeated)")
    parser.add_argument("--eos", action="store_true",
                        help="end the text at the tokenizer's end-of-text token (GPT-2's <|endoftext|>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the CPU sampling generator (default 0)")
    parser.add_argument("--no-cache", action="store_true", help="recompute everything each step (slow)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    parser.add_argument("--no-stream", action="store_true", help="print the text once at the end, not token by token")
    return parser


def load(name: str, device: torch.device):
    """(model, tokenizer) for a --model value (see `kvlab.models.load_model`)."""
    return load_model(name, device)


class TextStream:
    """Prints generated text as tokens arrive, holding back what is not final yet.

    A byte-level BPE token can carry half of a multi-byte character; decoding it alone shows
    U+FFFD, so the printed text only advances once the decoded suffix is whole. With `stops`,
    the generated text ends before the first of them to appear, and the end of the text that
    could still become one is held back. `push` returns True once a stop text has appeared.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], out=None, stops=()):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids)
        self.out = out if out is not None else sys.stdout
        self.printed = 0
        self.prompt_chars = len(tokenizer.decode(self.ids)) if self.ids else 0
        self.stops = [s for s in stops if s]
        self.stopped: str | None = None  # the stop text that ended the text

    def push(self, token_id: int) -> bool:
        self.ids.append(token_id)
        return self.flush(final=False)

    def _held_back(self, generated: str) -> int:
        """Characters at the end of `generated` that could be the start of a stop text."""
        return max((k for s in self.stops for k in range(1, len(s)) if generated.endswith(s[:k])), default=0)

    def flush(self, final: bool = True) -> bool:
        if self.stopped is not None:
            return True
        text = self.tokenizer.decode(self.ids)
        if not final and text.endswith("\ufffd"):
            return False
        end = len(text)
        generated = text[self.prompt_chars:]
        hits = [(generated.find(s), s) for s in self.stops if s in generated]
        if hits:
            at, self.stopped = min(hits)
            end = self.prompt_chars + at
        elif not final:
            end -= self._held_back(generated)
        if end > self.printed:
            self.out.write(text[self.printed:end])
            self.out.flush()
            self.printed = end
        return self.stopped is not None


@torch.inference_mode()
def stream_generate(model, idx: torch.Tensor, max_new_tokens: int, *, use_cache: bool = True,
                    on_token=None, sampling: SamplingConfig | None = None,
                    **keywords) -> tuple[torch.Tensor, dict]:
    """`kvlab.generate`'s loop (same tokens for the same generator), calling `on_token(id)` per token.

    The sampling settings come as `sampling=SamplingConfig(...)` or as its keywords
    (temperature, top_k, top_p, min_p, generator). When `on_token` returns True generation ends
    there (a stop text, an end-of-text token).
    It is `kvlab.generation.decode_loop` with a hook that calls `on_token`. Returns the tokens
    (1, T + N) and timings: prefill_s (the prompt's forward pass and the first token), decode_s
    (every step after it, without the time spent in `on_token`), total_s, new_tokens. Built in
    chapter 7.
    """
    from ..device import synchronize
    from . import check_generate_args, decode_loop

    sampling = resolve_sampling(sampling, **keywords)
    check_generate_args(model, idx, max_new_tokens, use_cache, None, None)
    import time

    T = idx.size(1)
    device = idx.device
    cache = model.default_cache(1, T + max_new_tokens) if use_cache else None
    stamps: list[float] = []
    outside = 0.0  # time spent in on_token (printing), left out of the decode time

    def watch(n: int, token: torch.Tensor) -> bool:
        nonlocal outside
        synchronize(device)
        t0 = time.perf_counter()
        if n == 1:
            stamps.append(t0)  # the prompt's forward pass and the first token: done
        stop = on_token is not None and on_token(int(token))
        outside += time.perf_counter() - t0
        return stop

    synchronize(device)
    start = time.perf_counter()
    out = decode_loop(model, idx, max_new_tokens, cache, sampling=sampling, on_token=watch)
    synchronize(device)
    end = time.perf_counter()
    prefilled = stamps[0] if stamps else end
    return out, {"prefill_s": prefilled - start, "decode_s": end - prefilled - outside,
                 "total_s": end - start - outside, "new_tokens": out.size(1) - T}


def read_prompt(parser: Parser, args) -> str:
    """The text of --prompt, or of --prompt-file (a path, or - for stdin), checked."""
    if args.prompt_file is None:
        if args.prompt.startswith("@") and Path(args.prompt[1:]).is_file():
            print(f"(--prompt is used as typed, {args.prompt!r} included; to read the file: --prompt-file "
                  f"{args.prompt[1:]})", file=sys.stderr)
        return args.prompt
    if args.prompt_file == "-":
        text = sys.stdin.read()
    else:
        path = Path(args.prompt_file)
        if not path.is_file():
            parser.error(f"--prompt-file {args.prompt_file}: no such file" + (" (it is a folder)" if path.is_dir()
                                                                                else ""))
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            parser.error(f"--prompt-file {args.prompt_file}: not UTF-8 text (bad byte at offset {err.start})")
    if not text:
        parser.error(f"--prompt-file {args.prompt_file}: {'stdin' if args.prompt_file == '-' else 'the file'} "
                     "is empty")
    return text


def _eos_id(parser: Parser, tokenizer) -> int:
    eos = getattr(tokenizer, "endoftext_id", None)
    if eos is None:
        parser.error(f"--eos: this model's tokenizer ({type(tokenizer).__name__}) has no end-of-text token; "
                     "end the text with --stop TEXT instead (e.g. --stop $'\\n\\n')")
    return eos


def main(argv: list[str] | None = None) -> int:
    from ..device import describe_device

    parser = build_parser()
    args = parser.parse_args(argv)
    prompt = read_prompt(parser, args)
    device = pick_device_or_exit(parser, args.device)
    try:
        model, tokenizer = load(args.model, device)
        ids = tokenizer.encode(prompt)
    except (ValueError, OSError) as err:  # OSError: a missing file, a failed download
        parser.error(str(err))
    fast_cpu_inference(model)  # this process's CPU linear-kernel choice, made once (chapter 5)
    eos_id = _eos_id(parser, tokenizer) if args.eos else None
    source = "--prompt-file" if args.prompt_file is not None else "--prompt"
    if not ids:
        parser.error(f"{source} encodes to no tokens")
    room = model.config.max_seq_len - len(ids)
    if room < 1 and not model.can_slide:
        parser.error(f"{source} is {len(ids)} tokens; the model's context is {model.config.max_seq_len}")
    if len(ids) > model.config.max_seq_len and args.no_cache:
        parser.error(f"{source} is {len(ids)} tokens, more than the model's context of {model.config.max_seq_len}")
    # A model that slides (RoPE + a sliding window) attends to its last `window` positions only,
    # so it can go on past max_seq_len; any other model stops at its context.
    n = args.max_new_tokens if model.can_slide else min(args.max_new_tokens, room)
    buffer = None
    if args.no_stream:
        import io

        buffer = io.StringIO()
    stream = TextStream(tokenizer, ids, out=buffer, stops=args.stop)
    stream.flush(final=False)  # the prompt, at once
    ended_by_eos = False

    def on_token(token_id: int) -> bool:
        nonlocal ended_by_eos
        if token_id == eos_id:
            ended_by_eos = True
            return True
        return stream.push(token_id)

    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              generator=torch.Generator().manual_seed(args.seed))
    out, stats = stream_generate(model, torch.tensor([ids], device=device), n, use_cache=not args.no_cache,
                                 on_token=on_token, sampling=sampling)
    stream.flush()
    print(buffer.getvalue() if buffer is not None else "")
    print()
    steps = stats["new_tokens"] - 1
    decode_rate = steps / stats["decode_s"] if stats["decode_s"] > 0 and steps > 0 else float("nan")
    print(f"[{describe_device(device)}, {'no cache' if args.no_cache else 'KV cache'}] "
          f"prefill {stats['prefill_s'] * 1e3:.1f} ms for {len(ids)} prompt tokens, "
          f"decode {stats['decode_s']:.2f} s for {steps} tokens ({decode_rate:.1f} tokens/s), "
          f"total {stats['total_s']:.2f} s for {stats['new_tokens']} new tokens", file=sys.stderr)
    if stream.stopped is not None:
        print(f"(stopped at --stop {stream.stopped!r} after {stats['new_tokens']} tokens)", file=sys.stderr)
    elif ended_by_eos:
        print(f"(stopped at the end-of-text token after {stats['new_tokens']} tokens)", file=sys.stderr)
    elif n < args.max_new_tokens:
        print(f"(stopped at the model's context of {model.config.max_seq_len} tokens)", file=sys.stderr)
    elif len(ids) + n > model.config.max_seq_len:
        print(f"(went past the model's context of {model.config.max_seq_len} tokens with its sliding window of "
              f"{model.config.window})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
