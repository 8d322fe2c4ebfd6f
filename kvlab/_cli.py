"""What kvlab's command lines (train, generate, bench, dashboard) share.

- Argument types: each turns one command-line string into a value or raises
  `argparse.ArgumentTypeError`, which argparse reports as "argument --flag: <message>" and exits
  with status 2, before any work.
- `Parser`: argparse's parser, except that a flag it does not know is answered with the nearest
  one it does (`--max_tokens` → `--max-new-tokens`, `--top_k` → `--top-k`, typos through difflib).
- The model's shape flags (`--d-model`, `--n-layers`, ...), which `train` and `bench` both take.
- `COMMANDS`, the modules that are commands, and `refuse_non_command`: `kvlab/__init__.py` calls it
  first, so `python -m kvlab.<any other module>` lists the commands and exits with status 2
  (instead of importing the module and doing nothing).
- `command_line`: the command as a shell would take it back (`shlex.join`), for the records.
"""

from __future__ import annotations

import argparse
import difflib
import math
import shlex
import sys

# -- argument types -----------------------------------------------------------------------------


def _number(text: str, kind, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An int >= 1."""
    value = _number(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An int >= 0."""
    value = _number(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0."""
    value = _number(text, float, "a positive number")
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def positive_ints(text: str) -> list[int]:
    """Comma-separated ints >= 1, e.g. "1,8,16"."""
    values = [_number(v, int, "comma-separated integers") for v in text.split(",") if v]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


# -- a parser that suggests the flag you meant --------------------------------------------------

# Spellings other tools (and the course's seed projects) use, mapped to kvlab's flag, or to a
# sentence when kvlab has no such flag because it does that by default. A value is used only
# when the parser at hand has that flag.
FLAG_ALIASES = {
    "--max_tokens": "--max-new-tokens", "--max-tokens": "--max-new-tokens", "--num-tokens": "--max-new-tokens",
    "--n-tokens": "--max-new-tokens", "--tokens": "--max-new-tokens", "--length": "--max-new-tokens",
    "--steps": "--max-steps", "--temp": "--temperature", "--topk": "--top-k", "--topp": "--top-p",
    "--minp": "--min-p", "--checkpoint": "--model", "--ckpt": "--model", "--file": "--prompt-file",
    "--eos-token": "--eos", "--stop-at": "--stop", "--layers": "--n-layers", "--heads": "--n-heads",
    "--kvcaching": "the KV cache is on by default; --no-cache turns it off",
    "--kv-cache": "the KV cache is on by default; --no-cache turns it off",
    "--use-cache": "the KV cache is on by default; --no-cache turns it off",
}


class Parser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` that names the nearest real flag for each one it does not know.

    Unknown flags are found before argparse parses anything, so they are reported even when a
    required flag is missing too. Exit status 2, as for every other usage error.
    """

    def known_flags(self) -> list[str]:
        return [s for action in self._actions for s in action.option_strings if s.startswith("--")]

    def suggestion(self, flag: str) -> str:
        """' (did you mean --x?)', a note, or '' for an unknown `flag`."""
        known = self.known_flags()
        alias = FLAG_ALIASES.get(flag) or FLAG_ALIASES.get(flag.replace("_", "-"))
        if alias is not None and not alias.startswith("--"):
            return f" ({alias})"
        dashed = flag.replace("_", "-").lower()
        for candidate in (alias, dashed):
            if candidate in known:
                return f" (did you mean {candidate}?)"
        close = difflib.get_close_matches(dashed, known, n=1, cutoff=0.6)
        return f" (did you mean {close[0]}?)" if close else ""

    def _unknown_flags(self, args: list[str]) -> list[str]:
        known = self.known_flags()
        unknown = []
        for arg in args:
            if arg == "--":
                break
            if not arg.startswith("--"):
                continue
            name = arg.split("=", 1)[0]
            # argparse accepts any unambiguous prefix of a flag (--max for --max-new-tokens)
            if name not in known and not any(k.startswith(name) for k in known):
                unknown.append(name)
        return unknown

    def parse_args(self, args=None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        unknown = self._unknown_flags(argv)
        if unknown:
            self.error("unrecognized arguments: " + ", ".join(f"{u}{self.suggestion(u)}" for u in unknown))
        return super().parse_args(argv, namespace)


def pick_device_or_exit(parser: argparse.ArgumentParser, name: str | None):
    """`kvlab.pick_device(name)`, or a usage error naming --device when this machine lacks it."""
    from .device import pick_device

    try:
        return pick_device(name)
    except (TypeError, ValueError) as err:
        missing = {"mps": "this machine has no MPS (Apple-silicon GPU)",
                   "cuda": "this machine has no CUDA GPU (or this PyTorch was built without CUDA)"}
        reason = missing.get(str(name).split(":")[0], str(err))
        parser.error(f"--device {name}: {reason}; leave --device out to use the best one here "
                     f"({pick_device().type})")


# -- the model's shape flags (train and bench) --------------------------------------------------

SHAPE_FLAGS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "d_ff", "norm", "mlp", "pos", "window")


def add_shape_arguments(group, *, max_seq_len_help: str | None = None) -> None:
    """The flags that override a preset's shape: --d-model, --n-layers, --n-heads, --n-kv-heads,
    --max-seq-len, --d-ff, --norm, --mlp, --pos, --window."""
    group.add_argument("--d-model", type=positive_int, help="width of the residual stream")
    group.add_argument("--n-layers", type=positive_int, help="transformer blocks")
    group.add_argument("--n-heads", type=positive_int, help="attention heads (must divide --d-model)")
    group.add_argument("--n-kv-heads", type=positive_int, help="key/value heads (fewer = grouped-query attention)")
    group.add_argument("--max-seq-len", type=positive_int, help=max_seq_len_help or "context length")
    group.add_argument("--d-ff", type=positive_int,
                       help="the MLP's hidden width (default: 4 x --d-model for gelu, about 8/3 x for swiglu)")
    group.add_argument("--norm", choices=["layernorm", "rmsnorm"])
    group.add_argument("--mlp", choices=["gelu", "swiglu"])
    group.add_argument("--pos", choices=["learned", "rope", "sinusoidal"],
                       help="position encoding: a learned table (GPT-2), rotary (RoPE) or the fixed sinusoidal table")
    group.add_argument("--window", type=positive_int,
                       help="sliding attention window (with --pos rope: generates past the context)")


def shape_flags_given(args) -> list[str]:
    """The shape flags set on the command line, spelled as flags ("--d-model", ...)."""
    return ["--" + name.replace("_", "-") for name in SHAPE_FLAGS if getattr(args, name, None) is not None]


def apply_shape_flags(model_kwargs: dict, args) -> dict:
    """A preset's GPTConfig keywords with the shape flags in `args` applied.

    A flag that changes what a preset's derived field follows drops that field: a new --n-heads
    drops the preset's --n-kv-heads, a new --d-model or --mlp its MLP width. Raises a ValueError
    naming the flag when --d-model does not split into the preset's heads.
    """
    given = {name: getattr(args, name) for name in SHAPE_FLAGS if getattr(args, name, None) is not None}
    out = {**model_kwargs, **given}
    if "n_heads" in given and "n_kv_heads" not in given:
        out.pop("n_kv_heads", None)
    if ("d_model" in given or "mlp" in given) and "d_ff" not in given:
        out.pop("d_ff", None)
    heads = out.get("n_heads", 12)
    if "d_model" in given and "n_heads" not in given and given["d_model"] % heads:
        raise ValueError(f"--d-model {given['d_model']} is not divisible by the preset's {heads} heads; "
                         "give --n-heads too")
    return out


# -- the commands -------------------------------------------------------------------------------

COMMANDS = {
    "train": "train a GPT on Tiny Shakespeare (characters or BPE), with checkpoints",
    "generate": "generate text from a model; prefill time, decode time, tokens/s",
    "bench": "time generation with and without the KV cache (sweeps, speed-up table, serving)",
    "dashboard": "the KV dashboard of chapter 4 as a GIF",
    "student": "build the student edition of the notebooks, grade submissions",
}
# The module holding a command's `main`, where it is not `kvlab.<command>` itself.
CLI_MODULES = {"generate": "kvlab.generation.cli", "train": "kvlab.train.cli", "bench": "kvlab.bench.cli",
               "student": "kvlab.course.student"}
# Where people look for a command that lives elsewhere.
_HINTS = {"viz": "dashboard", "plot": "dashboard", "kv_dashboard": "dashboard", "benchmark": "bench",
          "speedup": "bench", "serving_bench": "bench", "serving": "bench", "bench_cli": "bench",
          "speedups": "bench", "cpu_kernels": "bench", "train_cli": "train", "pretrained": "generate",
          "sampling": "generate", "models": "generate", "generation": "generate"}


# What to do instead, for library modules people try to run.
_NOTES = {"seq2seq": "chapter 8 trains its toy model in the notebook: kvlab.seq2seq.train_toy(model, pairs, vocab)",
          "viz": "its plots are functions (kvlab.viz.plot_bench, ...); the KV dashboard GIF is a command"}


def commands_text() -> str:
    """The list of kvlab's commands, one per line."""
    lines = ["kvlab's commands (each takes --help):"]
    lines += [f"  python -m kvlab.{name:<10s} {what}" for name, what in COMMANDS.items()]
    return "\n".join(lines)


def nearest_command(name: str, words: list[str] = ()) -> str | None:
    """The command someone typing `python -m kvlab.<name> <words>` most likely wanted, if any."""
    for word in (name, *words):
        if word in COMMANDS:
            return word
        if word in _HINTS:
            return _HINTS[word]
    close = difflib.get_close_matches(name, COMMANDS, n=1, cutoff=0.6)
    return close[0] if close else None


def _module_run_by_dash_m() -> str | None:
    """The module `python -m NAME` is starting, while Python still imports its packages; else None.

    During that import `sys.argv[0]` is "-m" (Python sets the module's path only once it is
    found), and `sys.orig_argv` holds the command as typed.
    """
    if not sys.argv or sys.argv[0] != "-m":
        return None
    for i, arg in enumerate(getattr(sys, "orig_argv", [])[1:], start=1):
        if arg == "-m":
            return sys.orig_argv[i + 1] if i + 1 < len(sys.orig_argv) else None
        if arg.startswith("-m") and not arg.startswith("--"):
            return arg[2:]
    return None


def refuse_non_command(package: str = "kvlab") -> None:
    """Exit with status 2 and the list of commands when Python runs `-m <package>.<not a command>`.

    Called first thing by `kvlab/__init__.py`, before any submodule is imported: it costs nothing
    in any other process, and `python -m kvlab.viz` then never imports the library only to do
    nothing (with a RuntimeWarning from runpy about a module imported twice).
    """
    target = _module_run_by_dash_m()
    if target is None or not target.startswith(package + "."):
        return
    name = target[len(package) + 1:]
    if name in COMMANDS or name == "__main__" or name in (f"{c}.__main__" for c in COMMANDS):
        return
    import importlib.util

    try:
        exists = importlib.util.find_spec(target) is not None
    except (ImportError, ValueError):
        exists = False
    what = f"{target} is a library module, not a command" if exists else f"{package} has no module {name!r}"
    words = sys.orig_argv[sys.orig_argv.index(target) + 1:] if target in sys.orig_argv else []
    nearest = nearest_command(name.split(".")[-1], words)
    hint = f"; did you mean python -m {package}.{nearest}?" if nearest else ""
    note = _NOTES.get(name)
    hint += f"\n({note})" if note else ""
    print(f"python -m {target}: {what}{hint}\n{commands_text()}", file=sys.stderr)
    raise SystemExit(2)


def command_line(module: str, argv: list[str] | None = None) -> str:
    """`python -m <module> <argv>` quoted so that pasting it into a shell runs the same command."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])
