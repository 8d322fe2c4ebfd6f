"""Reading the files kvlab loads, so that a damaged one is a clear error naming the file.

Every reader here checks its file completely before returning anything, and raises
`FileNotFoundError` (no such file) or `ValueError` (the file is there but wrong) with the
path and what is wrong: a JSON file that does not parse (with line and column), a
safetensors file that is truncated or is not safetensors at all, a tensor whose shape is
not the one the model expects (expected vs actual). Callers check everything before they
modify anything (a model's weights, an optimizer's state). Built in chapter 6.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = ["read_json", "read_safetensors", "read_safetensors_metadata", "check_state_shapes"]

# A real safetensors header is a few kilobytes to a few megabytes; anything above this is
# random bytes read as a length.
_MAX_HEADER_BYTES = 100_000_000


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse the JSON file at `path`; `what` names it in errors ("tokenizer file", "config.json")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a valid {what}: not UTF-8 text (bad byte at offset {err.start}); "
                         "is it a binary file?") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        empty = " (the file is empty)" if not text.strip() else ""
        raise ValueError(f"{path} is not a valid {what}: invalid JSON at line {err.lineno}, column {err.colno}: "
                         f"{err.msg}{empty}") from None


def _check_safetensors_layout(path: Path, what: str) -> dict:
    """Check the 8-byte length, the JSON header and that every tensor's bytes are in the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a valid {what}: truncated ({size} bytes; a safetensors file starts "
                             "with an 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        first = f.read(1)
    if first != b"{" or n < 2 or n > _MAX_HEADER_BYTES:
        raise ValueError(f"{path} is not a valid {what}: not a safetensors file (its first bytes are not a "
                         "header length followed by a JSON header)")
    if 8 + n > size:
        raise ValueError(f"{path} is not a valid {what}: truncated (its header alone needs {8 + n} bytes, the file "
                         f"has {size})")
    with open(path, "rb") as f:
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path} is not a valid {what}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a valid {what}: not a safetensors file (its header is not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise ValueError(f"{path} is not a valid {what}: not a safetensors file (tensor {name!r} has no "
                             "data_offsets)") from None
    if 8 + n + end > size:
        raise ValueError(f"{path} is not a valid {what}: truncated (its tensors need {8 + n + end} bytes, the file "
                         f"has {size})")
    return header


def read_safetensors(path: str | os.PathLike, what: str = "safetensors file") -> tuple[dict[str, Tensor], dict]:
    """(tensors, metadata) of a safetensors file, checked first: truncation, a non-safetensors file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    _check_safetensors_layout(path, what)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError for anything left
        raise ValueError(f"{path} is not a valid {what}: {err}") from None
    return tensors, metadata


def read_safetensors_metadata(path: str | os.PathLike, what: str = "safetensors file") -> dict[str, str]:
    """The metadata of a safetensors file, read from its header alone (no tensor is loaded), after
    the same checks as `read_safetensors`: how a command learns a checkpoint's shape cheaply."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    metadata = _check_safetensors_layout(path, what).get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{path} is not a valid {what}: its __metadata__ is not a JSON object")
    return metadata


def check_state_shapes(path: str | os.PathLike, state: Mapping[str, Tensor], expected: Mapping[str, Tensor],
                       *, what: str = "weights", prefix: str = "") -> None:
    """Raise a ValueError naming `path` unless `state` has exactly `expected`'s keys and shapes."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{prefix}{k}: expected {tuple(expected[k].shape)}, got {tuple(state[k].shape)}"
             for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing tensors ({len(missing)}): {', '.join(prefix + k for k in missing[:8])}"
                     + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        parts.append(f"unexpected tensors ({len(unexpected)}): {', '.join(prefix + k for k in unexpected[:8])}"
                     + (" ..." if len(unexpected) > 8 else ""))
    if wrong:
        parts.append(f"tensors of the wrong shape ({len(wrong)}): {'; '.join(wrong[:8])}"
                     + (" ..." if len(wrong) > 8 else ""))
    if parts:
        raise ValueError(f"{path}: its {what} do not fit the model its config describes: " + " | ".join(parts))
