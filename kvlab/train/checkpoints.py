"""Checkpoints and exported models.

A checkpoint is one safetensors file (weights, optimizer moments and RNG states as tensors; the
configs, step and history as JSON metadata), written to a temporary file and renamed, so a crash
mid-write leaves the previous checkpoint intact. An exported model is the folder
`kvlab.load_shakespeare` reads. Built in chapter 6.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from ..gpt import GPT, GPTConfig
from .config import History, TrainConfig

__all__ = ["save_checkpoint", "read_checkpoint_header", "load_checkpoint", "export_model"]


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
