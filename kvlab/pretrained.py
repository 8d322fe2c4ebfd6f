"""GPT-2's published weights in kvlab: conversion from (and to) Hugging Face, and hub loading.

Shape legend: C d_model, V vocab_size, P max_seq_len (n_positions), L n_layers.

Hugging Face stores GPT-2 in OpenAI's original layout: linear layers are `Conv1D` modules
whose weight is (in, out), the transpose of `nn.Linear`'s (out, in), and the query, key and
value projections are one matrix `c_attn` — the same fused layout kvlab's `qkv` uses, so only
the transposes and the names change. Built in chapter 3.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .gpt import GPT, GPTConfig
from .validation import check_choice

__all__ = ["GPT2_NAMES", "GPT2_DOWNLOAD", "from_hf_gpt2", "to_hf_gpt2_state_dict", "load_gpt2", "hf_gpt2_config", "load_shakespeare",
           "CACHE_FAMILY_DIR", "load_cache_family", "load_cache_family_record"]

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
GPT2_HEADS = {768: 12, 1024: 16, 1280: 20, 1600: 25}  # d_model -> n_heads of each published GPT-2 size
# The size of each one's model.safetensors on the hub: what the first load_gpt2(name) downloads.
GPT2_DOWNLOAD = {"gpt2": "about 550 MB", "gpt2-medium": "about 1.5 GB", "gpt2-large": "about 3.3 GB",
                 "gpt2-xl": "about 6.4 GB"}

# kvlab name pattern -> (Hugging Face name pattern, transpose?). {i} is the layer index.
_GLOBAL = {
    "tok_emb.weight": ("wte.weight", False),
    "pos_emb.weight": ("wpe.weight", False),
    "norm_f.weight": ("ln_f.weight", False),
    "norm_f.bias": ("ln_f.bias", False),
}
_PER_LAYER = {
    "blocks.{i}.norm1.weight": ("h.{i}.ln_1.weight", False),
    "blocks.{i}.norm1.bias": ("h.{i}.ln_1.bias", False),
    "blocks.{i}.attn.qkv.weight": ("h.{i}.attn.c_attn.weight", True),
    "blocks.{i}.attn.qkv.bias": ("h.{i}.attn.c_attn.bias", False),
    "blocks.{i}.attn.out.weight": ("h.{i}.attn.c_proj.weight", True),
    "blocks.{i}.attn.out.bias": ("h.{i}.attn.c_proj.bias", False),
    "blocks.{i}.norm2.weight": ("h.{i}.ln_2.weight", False),
    "blocks.{i}.norm2.bias": ("h.{i}.ln_2.bias", False),
    "blocks.{i}.mlp.fc.weight": ("h.{i}.mlp.c_fc.weight", True),
    "blocks.{i}.mlp.fc.bias": ("h.{i}.mlp.c_fc.bias", False),
    "blocks.{i}.mlp.proj.weight": ("h.{i}.mlp.c_proj.weight", True),
    "blocks.{i}.mlp.proj.bias": ("h.{i}.mlp.c_proj.bias", False),
}


def _name_map(n_layers: int) -> dict[str, tuple[str, bool]]:
    names = dict(_GLOBAL)
    for i in range(n_layers):
        for ours, (theirs, transpose) in _PER_LAYER.items():
            names[ours.format(i=i)] = (theirs.format(i=i), transpose)
    return names


def _strip_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Accept both `GPT2LMHeadModel` keys ("transformer.h.0...") and `GPT2Model` / hub-file keys."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("transformer.")
        # Older checkpoints carry the causal mask as buffers; they are not weights.
        if re.fullmatch(r"h\.\d+\.attn\.(bias|masked_bias)", key):
            continue
        out[key] = value
    return out


def hf_gpt2_config(hf_config) -> GPTConfig:
    """kvlab's `GPTConfig` for a Hugging Face `GPT2Config`, refusing options kvlab does not model."""
    unsupported = []
    if getattr(hf_config, "scale_attn_by_inverse_layer_idx", False):
        unsupported.append("scale_attn_by_inverse_layer_idx=True")
    if getattr(hf_config, "reorder_and_upcast_attn", False):
        unsupported.append("reorder_and_upcast_attn=True")
    if not getattr(hf_config, "scale_attn_weights", True):
        unsupported.append("scale_attn_weights=False")
    act = getattr(hf_config, "activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        unsupported.append(f"activation_function={act!r} (kvlab uses GPT-2's tanh GELU)")
    if hf_config.n_inner not in (None, 4 * hf_config.n_embd):
        unsupported.append(f"n_inner={hf_config.n_inner}")
    if unsupported:
        raise ValueError("this GPT-2 configuration uses options kvlab does not implement: " + ", ".join(unsupported))
    return GPTConfig(vocab_size=hf_config.vocab_size, max_seq_len=hf_config.n_positions, d_model=hf_config.n_embd,
                     n_layers=hf_config.n_layer, n_heads=hf_config.n_head, norm_eps=hf_config.layer_norm_epsilon)


def _config_from_shapes(sd: Mapping[str, Tensor], n_heads: int | None) -> GPTConfig:
    missing = [k for k in ("wte.weight", "wpe.weight") if k not in sd]
    if missing:
        raise ValueError(f"state dict is missing keys needed to infer the shape: {missing}")
    vocab_size, d_model = sd["wte.weight"].shape
    max_seq_len = sd["wpe.weight"].shape[0]
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"h\.(\d+)\.", k))}
    if not layers:
        raise ValueError("state dict has no transformer blocks (no 'h.<i>.' keys)")
    # The head count is not visible in any shape: known for GPT-2's own sizes, asked for otherwise.
    if n_heads is None:
        if d_model not in GPT2_HEADS:
            sizes = ", ".join(f"{c} ({h} heads)" for c, h in GPT2_HEADS.items())
            raise ValueError(f"cannot tell the head count of a state dict with d_model={d_model}: it is not one of "
                             f"GPT-2's sizes ({sizes}); pass n_heads= (e.g. from the model's config)")
        n_heads = GPT2_HEADS[d_model]
    return GPTConfig(vocab_size=vocab_size, max_seq_len=max_seq_len, d_model=d_model,
                     n_layers=max(layers) + 1, n_heads=n_heads)


def from_hf_gpt2(model_or_state_dict, *, n_heads: int | None = None) -> GPT:
    """A kvlab `GPT` with the weights of a Hugging Face GPT-2 model or state dict.

    Pass a `GPT2LMHeadModel` / `GPT2Model` (its config is used) or a state dict (the shape is
    read from the tensors; `n_heads` is GPT-2's own for its four widths and must be passed for any
other d_model, since no tensor's shape shows it). Every
    expected key must be present with the right shape: the error lists what is missing or
    mis-shaped, and nothing is loaded until all of it checks out. Built in chapter 3.
    """
    if isinstance(model_or_state_dict, Mapping):
        sd = _strip_prefix(model_or_state_dict)
        config = _config_from_shapes(sd, n_heads)
    elif hasattr(model_or_state_dict, "state_dict") and hasattr(model_or_state_dict, "config"):
        config = hf_gpt2_config(model_or_state_dict.config)
        sd = _strip_prefix(model_or_state_dict.state_dict())
    else:
        raise TypeError("expected a Hugging Face GPT-2 model or a state dict (a mapping of name -> tensor), "
                        f"got {type(model_or_state_dict).__name__}")

    model = GPT(config)
    ours = model.state_dict()
    converted, missing, misshaped = {}, [], []
    for name, (theirs, transpose) in _name_map(config.n_layers).items():
        if theirs not in sd:
            missing.append(theirs)
            continue
        tensor = sd[theirs].t() if transpose else sd[theirs]
        if tuple(tensor.shape) != tuple(ours[name].shape):
            want = tuple(ours[name].shape[::-1]) if transpose else tuple(ours[name].shape)
            misshaped.append(f"{theirs}: expected {want}, got {tuple(sd[theirs].shape)}")
            continue
        converted[name] = tensor
    if missing or misshaped:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if misshaped:
            parts.append(f"mis-shaped keys ({len(misshaped)}): {'; '.join(misshaped)}")
        raise ValueError("cannot load GPT-2 weights: " + " | ".join(parts))
    # lm_head is tied to the token embedding, so it is set through tok_emb.
    converted["lm_head.weight"] = converted["tok_emb.weight"]
    model.load_state_dict({k: v.detach().clone() for k, v in converted.items()}, strict=True)
    return model


def to_hf_gpt2_state_dict(model: GPT) -> dict[str, Tensor]:
    """The inverse of `from_hf_gpt2`: a `GPT2LMHeadModel` state dict for a GPT-2-shaped kvlab model."""
    c = model.config
    if (c.norm, c.mlp, c.pos, c.bias, c.tie_embeddings, c.n_kv_heads, c.attention) != (
            "layernorm", "gelu", "learned", True, True, c.n_heads, "mha"):
        raise ValueError("only a GPT-2-style configuration (layernorm, gelu, learned positions, biases, "
                         "tied embeddings, multi-head attention with n_kv_heads == n_heads) has a Hugging Face "
                         "GPT-2 equivalent")
    ours = model.state_dict()
    sd = {f"transformer.{theirs}": (ours[name].t() if transpose else ours[name]).detach().clone()
          for name, (theirs, transpose) in _name_map(c.n_layers).items()}
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def load_gpt2(name: str = "gpt2", *, device: torch.device | str | None = None) -> GPT:
    """Download GPT-2 from the Hugging Face hub and convert it: `kvlab.load_gpt2("gpt2")`.

    Reads the hub's safetensors file (no pickle); needs `huggingface_hub` (installed with
    `transformers`) and a network connection the first time, after which the hub's local cache
    is used. Sizes: gpt2 (124M parameters, a download of about 550 MB), gpt2-medium (350M, 1.5 GB),
    gpt2-large (774M, 3.3 GB), gpt2-xl (1.5B, 6.4 GB). Without a connection (and nothing cached),
    a FileNotFoundError says so. Built in chapter 3.
    """
    check_choice("name", name, GPT2_NAMES)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("load_gpt2 needs huggingface_hub: pip install transformers (or huggingface_hub)") from err
    from .files import read_safetensors

    try:
        path = hf_hub_download(repo_id=f"openai-community/{name}", filename="model.safetensors")
    except Exception as err:  # the hub's error types vary by version and cause (offline, DNS, proxy, HTTP)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(
            f"{name} is not on this machine: GPT-2's weights are a download from the Hugging Face hub "
            f"(openai-community/{name}, {GPT2_DOWNLOAD[name]}), made once and then cached, and the download "
            f"failed ({reason}). Connect to the internet once, or use the model that ships with kvlab "
            "(kvlab.load_shakespeare(), --model shakespeare)") from err
    model = from_hf_gpt2(read_safetensors(path, f"{name} weights file")[0])
    model.eval()
    return model.to(device) if device is not None else model


# -- the Shakespeare model the course trains and ships ------------------------------------------

# relative to the repository root: the character model, and the same model trained on BPE ids
SHAKESPEARE_MODEL_DIRS = {"char": "data/shakespeare", "bpe": "data/shakespeare_bpe"}
SHAKESPEARE_MODEL_DIR = SHAKESPEARE_MODEL_DIRS["char"]


def _check_tokenizer_kind(tokenizer) -> str:
    if not isinstance(tokenizer, str) or tokenizer not in SHAKESPEARE_MODEL_DIRS:
        raise ValueError(f"tokenizer must be one of {sorted(SHAKESPEARE_MODEL_DIRS)} (which shipped Shakespeare "
                         f"model), got {tokenizer!r}")
    return tokenizer


def shakespeare_model_dir(path: str | os.PathLike | None = None, *, tokenizer: str = "char") -> Path:
    """Where a shipped Shakespeare model lives: `path`, `data/shakespeare` (`tokenizer="char"`) or
    `data/shakespeare_bpe` (`tokenizer="bpe"`) in a checkout, or, for an installed kvlab (as on
    Colab), the copy inside the package (`kvlab.data.repo_file`)."""
    from .data import checkout_root, repo_file

    relative = SHAKESPEARE_MODEL_DIRS[_check_tokenizer_kind(tokenizer)]
    if path is not None:
        return Path(path)
    root = checkout_root()
    if root is not None:
        return root / relative
    for name in ("model.safetensors", "config.json", "tokenizer.json", "record.json"):
        folder = repo_file(f"{relative}/{name}").parent
    return folder


def load_shakespeare(path: str | os.PathLike | None = None, *, tokenizer: str = "char",
                     device: torch.device | str | None = None):
    """A small GPT the course trained on Tiny Shakespeare, and its tokenizer.

    `tokenizer="char"` (the default) is the character-level model every chapter samples from;
    `tokenizer="bpe"` is the same shape trained on chapter 1's BPE with 1,024 ids (chapter 6
    compares the two). Returns `(model, tokenizer)`, the model in eval mode. Reads the files
    `python -m kvlab.train --export` wrote (safetensors weights, config.json, tokenizer.json,
    record.json); the record is on `model.record`. Works offline: the files ship in the
    repository's `data/shakespeare` and `data/shakespeare_bpe`. Built in chapter 6.
    """
    from .files import check_state_shapes, read_json, read_safetensors
    from .tokenizers import load_tokenizer

    folder = shakespeare_model_dir(path, tokenizer=tokenizer)
    needed = ["model.safetensors", "config.json", "tokenizer.json"]
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing and path is not None:
        raise FileNotFoundError(
            f"{folder} is not an exported kvlab model: missing {', '.join(missing)} (a folder written by "
            "`python -m kvlab.train --export DIR` or kvlab.train.export_model holds model.safetensors, "
            "config.json and tokenizer.json)" if folder.is_dir() else f"no exported kvlab model at {folder}: "
            "no such folder")
    if missing:
        raise FileNotFoundError(
            f"the Shakespeare model is not at {folder} (missing {', '.join(missing)}); it ships in the course "
            f"repository's {SHAKESPEARE_MODEL_DIRS[tokenizer]}: install kvlab from a clone (pip install -e .) or "
            "pass path=")
    config_path = folder / "config.json"
    config = read_json(config_path, "model config (config.json)")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or "tokenizer" not in config:
        raise ValueError(f"{config_path} is not a kvlab model config: expected a JSON object with 'model' (the "
                         "GPTConfig fields) and 'tokenizer' (its kind)")
    try:
        gpt_config = GPTConfig(**config["model"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: its 'model' is not a valid GPTConfig ({err})") from None
    weights_path = folder / "model.safetensors"
    state, _ = read_safetensors(weights_path, "model weights file")
    model = GPT(gpt_config)
    expected = model.state_dict()
    if gpt_config.tie_embeddings:
        expected.pop("lm_head.weight")
    check_state_shapes(weights_path, state, expected, what="weights")
    record_path = folder / "record.json"
    record = read_json(record_path, "model record (record.json)") if record_path.is_file() else {}
    tok = load_tokenizer(config["tokenizer"], folder / "tokenizer.json")
    if tok.vocab_size != gpt_config.vocab_size:
        raise ValueError(f"{folder / 'tokenizer.json'} has {tok.vocab_size} tokens but {config_path} says "
                         f"vocab_size={gpt_config.vocab_size}")
    if gpt_config.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=True)
    model.record = record
    model.eval()
    return (model.to(device) if device is not None else model), tok


# -- chapter 11's model family, shipped beside the Shakespeare models --------------------------------

CACHE_FAMILY_DIR = "data/cache_family"  # relative to the repository root: one exported folder per member


def load_cache_family(member: str, path: str | os.PathLike | None = None, *,
                      device: torch.device | str | None = None):
    """One member of chapter 11's model family ("mha", "gqa", "mqa" or "mla", `kvlab.train.family`)
    and its tokenizer (the 65 characters and the start token, id 65), as `(model, tokenizer)`.

    The four members ship in float16 in the repository's `data/cache_family/NAME` (and inside an
    installed kvlab, as the Shakespeare models do), trained by `scripts/train_cache_family.py`; the
    model comes back in float32, in eval mode, its record on `model.record`. `path` is another folder
    holding the members the same way (e.g. a smoke run's export). Built in chapter 11.
    """
    from .data import checkout_root, repo_file
    from .train.family import CACHE_FAMILY

    if not isinstance(member, str) or member not in CACHE_FAMILY:
        raise ValueError(f"member must be one of {', '.join(CACHE_FAMILY)} (chapter 11's family), got {member!r}")
    if path is not None:
        return load_shakespeare(Path(path) / member, device=device)
    root = checkout_root()
    if root is not None:
        folder = root / CACHE_FAMILY_DIR / member
    else:
        for name in ("model.safetensors", "config.json", "tokenizer.json", "record.json"):
            folder = repo_file(f"{CACHE_FAMILY_DIR}/{member}/{name}").parent
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"chapter 11's family is not in this checkout: no {folder / 'model.safetensors'} "
                                f"({CACHE_FAMILY_DIR} is written by scripts/train_cache_family.py)")
    return load_shakespeare(folder, device=device)


def load_cache_family_record(path: str | os.PathLike | None = None) -> dict:
    """The family's record (`data/cache_family/record.json`, written by
    `scripts/train_cache_family.py`): every run's parameters, KV bytes per token and validation loss,
    the baseline's second seed and `seed_noise_val_nats_per_char`, the recipe and the commands. `path`:
    another folder holding an export. Built in chapter 11."""
    from .data import checkout_root, repo_file

    if path is not None:
        file = Path(path) / "record.json"
    else:
        root = checkout_root()
        file = root / CACHE_FAMILY_DIR / "record.json" if root is not None else repo_file(
            f"{CACHE_FAMILY_DIR}/record.json")
    if not file.is_file():
        raise FileNotFoundError(f"no family record at {file} ({CACHE_FAMILY_DIR} is written by "
                                "scripts/train_cache_family.py)")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is not the family's record (not JSON: {err}); train again to rewrite it") from err
