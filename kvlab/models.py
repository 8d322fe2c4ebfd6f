"""The models a command can name with `--model`: one place for `generate`, `bench` and `dashboard`.

A `--model` value is one of
    a shipped model    shakespeare (characters), shakespeare-bpe (chapter 1's BPE-1,024)
    a GPT-2 size       gpt2, gpt2-medium, gpt2-large, gpt2-xl (downloaded from the Hugging Face hub)
    an exported folder what `python -m kvlab.train --export DIR` writes
    a checkpoint       a training checkpoint (.safetensors), or the run folder that holds one
and, for `bench` only (speed does not depend on the weights' values), a shape with random weights:
    a GPTConfig preset gpt2 ... gpt2-xl, tiny, tiny-modern
    a training preset  quick, shakespeare-cpu, bpe-6x384, modern-12x768, ... (`kvlab.train.TRAIN_PRESETS`)
`model_config` reads only the configuration (no weights), so a command checks its other flags
against the model before any slow work. Errors are ValueError / FileNotFoundError naming the
value given and what to do. Built for the command lines (chapters 5 to 7).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .gpt import PRESETS, GPTConfig

__all__ = ["SHIPPED", "MODEL_HELP", "TRAINED_HELP", "SHAPE_HELP", "shape_names", "shape_config", "model_config", "load_model",
           "load_checkpoint_model"]

SHIPPED = {"shakespeare": "char", "shakespeare-bpe": "bpe"}  # name -> load_shakespeare(tokenizer=...)
CHECKPOINT = "checkpoint.safetensors"

MODEL_HELP = ("shakespeare (the shipped character model), shakespeare-bpe (the shipped BPE model), a GPT-2 size "
              "(gpt2, gpt2-medium, gpt2-large, gpt2-xl: downloaded from the Hugging Face hub), a folder written "
              "by `python -m kvlab.train --export`, or a training checkpoint (runs/NAME/checkpoint.safetensors, "
              "or its run folder runs/NAME)")
SHAPE_HELP = "a shape with random weights: a GPTConfig preset ({}) or a training preset ({})"


def _train_presets() -> dict:
    from .train import PRESET_TOKENIZERS, TRAIN_PRESETS

    return {name: (model, PRESET_TOKENIZERS.get(name, ("char", None))) for name, (model, _) in TRAIN_PRESETS.items()}


def shape_names() -> tuple[list[str], list[str]]:
    """(GPTConfig presets, training presets): the names `shape_config` takes."""
    return sorted(PRESETS), sorted(_train_presets())


def shape_config(name: str) -> dict | None:
    """The GPTConfig keywords of a shape preset (GPTConfig's, or a training preset's with the
    vocabulary of its tokenizer: 65 characters or the BPE size), or None for any other name."""
    if name in PRESETS:
        return dict(PRESETS[name])
    presets = _train_presets()
    if name in presets:
        model, (kind, bpe_vocab) = presets[name]
        return {**model, "vocab_size": bpe_vocab if kind == "bpe" else 65}
    return None


def _checkpoint_path(path: Path) -> Path | None:
    if path.is_file():
        return path
    if path.is_dir() and not (path / "model.safetensors").exists() and (path / CHECKPOINT).is_file():
        return path / CHECKPOINT
    return None


TRAINED_HELP = ("shakespeare, shakespeare-bpe (the shipped models), a folder written by `python -m kvlab.train "
                "--export`, or a training checkpoint (runs/NAME/checkpoint.safetensors, or its run folder runs/NAME)")


def _unknown(name: str, shapes: bool) -> ValueError:
    if not shapes:
        return ValueError(f"--model {name!r}: no such model or file. --model takes {MODEL_HELP}")
    gpt, train = shape_names()
    return ValueError(f"--model {name!r}: no such model or file. --model takes a trained model: {TRAINED_HELP}; or "
                      + SHAPE_HELP.format(", ".join(gpt) + "; GPT-2's names are its shapes, no download",
                                          ", ".join(train)))


def model_config(name: str, *, shapes: bool = False) -> GPTConfig:
    """The GPTConfig of a `--model` value, read without loading any weights.

    `shapes=True` also accepts the shape presets (as `bench` does). Raises ValueError or
    FileNotFoundError naming the value."""
    from .pretrained import GPT2_NAMES

    if not isinstance(name, str) or not name:
        raise ValueError(f"--model must name a model, got {name!r}")
    if shapes and (kwargs := shape_config(name)) is not None:
        return GPTConfig(**kwargs)
    if name in GPT2_NAMES:
        return GPTConfig.from_preset(name)
    if name in SHIPPED or Path(name).is_dir() and _checkpoint_path(Path(name)) is None:
        from .files import read_json
        from .pretrained import shakespeare_model_dir

        folder = shakespeare_model_dir(None if name in SHIPPED else name, tokenizer=SHIPPED.get(name, "char"))
        _check_folder(name, folder)
        config = read_json(folder / "config.json", "model config (config.json)")
        try:
            return GPTConfig(**config["model"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"--model {name}: {folder / 'config.json'} is not a kvlab model config ({err})") from None
    path = _checkpoint_path(Path(name))
    if path is not None:
        from .train import read_checkpoint_header

        try:
            return read_checkpoint_header(path)["model_config"]
        except ValueError as err:
            raise ValueError(f"--model {name}: {err}") from None
    raise _unknown(name, shapes)


def _check_folder(name: str, folder: Path) -> None:
    missing = [f for f in ("model.safetensors", "config.json", "tokenizer.json") if not (folder / f).is_file()]
    if missing and name not in SHIPPED:
        raise FileNotFoundError(
            f"--model {name}: the folder {folder} is not an exported kvlab model: missing {', '.join(missing)} "
            f"(and it holds no {CHECKPOINT}). An exported folder holds model.safetensors, config.json and tokenizer.json "
            "(`python -m kvlab.train --export DIR` writes one); a run folder holds checkpoint.safetensors")


def load_checkpoint_model(path: Path, device: torch.device):
    """(model, tokenizer) from a training checkpoint that stores its tokenizer."""
    from .tokenizers import tokenizer_from_state
    from .train import load_checkpoint

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


def _gpt2_is_cached(name: str) -> bool:
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(repo_id=f"openai-community/{name}", filename="model.safetensors", local_files_only=True)
        return True
    except Exception:  # not cached (or no huggingface_hub): load_gpt2 says what is wrong
        return False


def load_model(name: str, device: torch.device, *, announce=None):
    """(model, tokenizer) for a `--model` value with weights (not a shape preset), the model in eval
    mode on `device`. Before downloading GPT-2, `announce` (default: print to stderr) is told what
    and how much."""
    from .pretrained import GPT2_DOWNLOAD, GPT2_NAMES, load_gpt2, load_shakespeare
    from .tokenizers import GPT2Tokenizer

    if name in GPT2_NAMES:
        if not _gpt2_is_cached(name):
            say = announce or (lambda text: print(text, file=sys.stderr))
            say(f"{name} is not on this machine yet: downloading it from the Hugging Face hub "
                f"({GPT2_DOWNLOAD[name]}, once; it is cached afterwards)")
        return load_gpt2(name, device=device), GPT2Tokenizer()
    if name in SHIPPED:
        return load_shakespeare(tokenizer=SHIPPED[name], device=device)
    path = Path(name)
    checkpoint = _checkpoint_path(path)
    if checkpoint is not None:
        try:
            return load_checkpoint_model(checkpoint, device)
        except ValueError as err:
            raise ValueError(f"--model {name}: {err}") from None
    if path.is_dir():
        _check_folder(name, path)
        try:
            return load_shakespeare(path, device=device)
        except ValueError as err:
            raise ValueError(f"--model {name}: {err}") from None
    raise _unknown(name, shapes=False)
