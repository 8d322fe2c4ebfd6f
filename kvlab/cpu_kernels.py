"""The CPU kernel choice, kept outside the model and made by measuring: oneDNN's linear kernel or plain.

Shape legend: B batch, C_in input features, C_out output features.

A decode step multiplies one row of activations per sequence by every weight matrix, so its
speed is how fast the weights stream from memory. PyTorch sends a float32 product on a CPU to
its BLAS library. On some processors oneDNN's linear kernel (which PyTorch ships for its
mkldnn operators) streams the same weights faster; on others it is slower. So `kvlab.GPT`
always uses plain `nn.Linear`, and the choice is made here, by timing a few decode steps of
*this* model on *this* machine both ways:

- `fast_cpu_inference(model, batch_size)` switches the large linears to oneDNN for good (every
  forward call), only where oneDNN measured at least `MIN_GAIN` times faster; `plain_linears`
  undoes it. The choice is made once per model by whoever owns the process: the reader
  (chapter 5), the command lines (`python -m kvlab.generate`, `python -m kvlab.bench`), the
  serving engine's constructor. `kvlab.generate` itself never makes it: it runs the model as it is.
- `measured_linears(model, B)` makes the same switch for the duration of a `with` block only
  (the benchmarks' sweeps, one block per batch size).
The answer is measured once per CPU, PyTorch version, thread count, batch size and weight
shapes, and kept in `~/.cache/kvlab/cpu_kernels.json` (or `$KVLAB_CACHE_DIR`), so later runs do
not measure again. `KVLAB_CPU_KERNELS=plain` turns both off.

The switch changes no parameter, value or state dict: `OneDNNLinear` holds the very same
weight and bias, and multiplies with oneDNN only when autograd is not recording. Built in
chapter 5.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .validation import check_positive_int

__all__ = ["onednn_linear_available", "OneDNNLinear", "fast_cpu_inference", "plain_linears", "measured_linears",
           "CHOICES_FILE", "KERNELS_ENV"]

# oneDNN costs about 15 us more per call than the default kernel; only matrices this large
# (512 x 1024) have enough bytes to earn it back, so smaller ones are never switched.
MIN_WEIGHT_ELEMENTS = 2**19
# The switch must win by this much in the measurement, so noise alone never picks it.
MIN_GAIN = 1.05

_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    # oneDNN's linear kernel (PyTorch's mkldnn operators), with no activation fused ("none").
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.cache
def onednn_linear_available() -> bool:
    """True when this PyTorch build has oneDNN's linear kernel and it agrees with `F.linear`."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:
        with torch.inference_mode(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            x, w, b = torch.randn(3, 5, 24), torch.randn(40, 24), torch.randn(40)
            for weight in (w, w.t().contiguous().t()):
                if not torch.allclose(_onednn_linear(x, weight, b), F.linear(x, w, b), atol=1e-4, rtol=1e-4):
                    return False
    except Exception:  # any failure (an older build, another signature) means: keep F.linear
        return False
    return True


class OneDNNLinear(nn.Module):
    """Stands in for an `nn.Linear`, holding the same parameters (the same objects, unchanged).

    Without autograd recording (generation) it multiplies with oneDNN's kernel; otherwise, and
    inside `torch.compile`, with `F.linear`. Same values, shapes and state dict keys.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameter objects (ties kept)
        self._original = (linear,)  # in a tuple, so not registered as a submodule: swapping back is free

    def forward(self, x: Tensor) -> Tensor:
        recording = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if recording or _is_compiling():
            return F.linear(x, self.weight, self.bias)
        return _onednn_linear(x, self.weight, self.bias)

    def to_linear(self) -> nn.Linear:
        linear = self._original[0]
        linear.weight, linear.bias = self.weight, self.bias  # whatever this layer holds now
        return linear


def _swap(model: nn.Module, to_onednn: bool) -> int:
    """Replace large nn.Linear children by OneDNNLinear (or back); returns how many were swapped."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if to_onednn and type(child) is nn.Linear and child.weight.numel() >= MIN_WEIGHT_ELEMENTS:
                setattr(parent, name, OneDNNLinear(child))
                swapped += 1
            elif not to_onednn and isinstance(child, OneDNNLinear):
                setattr(parent, name, child.to_linear())
                swapped += 1
    return swapped


def plain_linears(model: nn.Module) -> nn.Module:
    """Undo `fast_cpu_inference`: every layer back to `nn.Linear`, holding the same weights."""
    _swap(model, to_onednn=False)
    return model


@torch.inference_mode()
def _decode_ms(model, batch_size: int, steps: int) -> float:
    """Median time of one cached decode step, in ms, after a short prompt."""
    from .generation import decode_step, prefill

    prompt = torch.randint(0, model.config.vocab_size, (batch_size, 8), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(batch_size, max_seq_len=8 + steps + 1)
    token = prefill(model, prompt, cache).argmax(-1, keepdim=True)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        decode_step(model, token, cache)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


CHOICES_FILE = "cpu_kernels.json"  # in ~/.cache/kvlab, or $KVLAB_CACHE_DIR
KERNELS_ENV = "KVLAB_CPU_KERNELS"  # "auto" (measure once, keep the faster) or "plain" (never switch)
_MEASURED: dict[str, tuple[bool, float | None, float | None]] = {}  # this process's answers


def _choices_path() -> Path:
    base = os.environ.get("KVLAB_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "kvlab") / CHOICES_FILE


def _read_choices() -> dict:
    try:
        stored = json.loads(_choices_path().read_text())
    except (OSError, ValueError):  # none yet, or damaged: measure again (and rewrite it)
        return {}
    return stored if isinstance(stored, dict) else {}


def _remember(key: str, answer: tuple[bool, float, float]) -> None:
    path = _choices_path()
    choices = _read_choices()
    choices[key] = {"onednn": answer[0], "plain_step_ms": round(answer[1], 3), "onednn_step_ms": round(answer[2], 3)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(choices, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
    except OSError:  # a read-only home: the answer still holds for this process
        pass


def _key(model, batch_size: int) -> str:
    from .device import cpu_model_name

    shapes = sorted({tuple(m.weight.shape) for m in model.modules()
                     if isinstance(m, (nn.Linear, OneDNNLinear)) and m.weight.numel() >= MIN_WEIGHT_ELEMENTS})
    layers = sum(isinstance(m, (nn.Linear, OneDNNLinear)) for m in model.modules())
    return (f"{cpu_model_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
            f"batch {batch_size} | {str(model.dtype).removeprefix('torch.')} | {layers} linears, large: {shapes}")


def _measured_choice(model, batch_size: int, steps: int, rounds: int) -> tuple[bool, float | None, float | None]:
    """(use oneDNN?, plain ms per step, oneDNN ms per step): remembered, stored, or measured now."""
    key = _key(model, batch_size)
    if key in _MEASURED:
        return _MEASURED[key]
    stored = _read_choices().get(key)
    if isinstance(stored, dict) and isinstance(stored.get("onednn"), bool):
        answer = (stored["onednn"], stored.get("plain_step_ms"), stored.get("onednn_step_ms"))
    else:
        plain, fast = [], []
        for _ in range(rounds):  # alternate, so a machine that slows down slows both alike
            plain.append(_decode_ms(model, batch_size, steps))
            _swap(model, to_onednn=True)
            fast.append(_decode_ms(model, batch_size, steps))
            _swap(model, to_onednn=False)
        plain_ms, fast_ms = statistics.median(plain), statistics.median(fast)
        answer = (plain_ms / fast_ms >= MIN_GAIN, plain_ms, fast_ms)
        _remember(key, answer)
    _MEASURED[key] = answer
    return answer


def forget_measurements() -> None:
    """Drop this process's remembered answers (the file stays); the next call reads or measures again."""
    _MEASURED.clear()


def _why_not(model) -> str:
    """Why the oneDNN switch cannot apply to `model` here ("" when it can)."""
    if model.device.type != "cpu" or model.dtype != torch.float32 or model.training:
        return "only for a model in eval mode on the CPU in float32"
    if not onednn_linear_available():
        return "this PyTorch build has no usable oneDNN linear kernel"
    if not any(type(m) is nn.Linear and m.weight.numel() >= MIN_WEIGHT_ELEMENTS for m in model.modules()):
        return f"no weight matrix has {MIN_WEIGHT_ELEMENTS:,} numbers or more"
    return ""


def _kernels_setting() -> str:
    value = os.environ.get(KERNELS_ENV, "auto")
    if value not in ("auto", "plain"):
        raise ValueError(f"${KERNELS_ENV} must be 'auto' or 'plain', got {value!r}")
    return value


@contextlib.contextmanager
def measured_linears(model, batch_size: int, *, steps: int = 6, rounds: int = 2):
    """Inside the block, `model`'s large linears use oneDNN if it measured faster on this machine.

    Does nothing for a model that is not eligible (see `fast_cpu_inference`), that already holds
    `OneDNNLinear` layers, or when ${KERNELS_ENV}=plain. The first use for a new machine, thread
    count, batch size and model shape times `rounds` x `steps` decode steps each way; the answer
    is stored (see the module's docstring). On leaving, the model is exactly as before. Used by
    `kvlab.bench.sweep`; built in chapter 5.
    """
    from .gpt import GPT

    if not isinstance(model, GPT):
        raise TypeError(f"model must be a kvlab.GPT, got {type(model).__name__}")
    switched = False
    if (_kernels_setting() == "auto" and not _why_not(model)
            and not any(isinstance(m, OneDNNLinear) for m in model.modules())):
        switched = _measured_choice(model, batch_size, steps, rounds)[0]
    if switched:
        _swap(model, to_onednn=True)
    try:
        yield switched
    finally:
        if switched:
            _swap(model, to_onednn=False)


def fast_cpu_inference(model, batch_size: int = 1, *, steps: int = 8, rounds: int = 3) -> dict:
    """Use oneDNN linears in `model` from now on if, measured here, they make a decode step faster.

    Only for a model in eval mode on the CPU in float32 with oneDNN available; otherwise nothing
    changes. Times `steps` decode steps of `batch_size` sequences `rounds` times each way,
    alternating, and switches only if the median step is at least `MIN_GAIN` times faster
    (so it cannot make generation slower than plain `nn.Linear`, up to the measurement's
    noise). The answer is kept like `measured_linears`'s (an answer already stored for this
    machine and shape is used without timing anything). Returns what was measured and chosen.
    Built in chapter 5.
    """
    from .gpt import GPT

    if not isinstance(model, GPT):
        raise TypeError(f"model must be a kvlab.GPT, got {type(model).__name__}")
    check_positive_int("batch_size", batch_size)
    plain_linears(model)
    setting = _kernels_setting()
    reason = f"${KERNELS_ENV}=plain" if setting == "plain" else _why_not(model)
    report = {"onednn": False, "plain_step_ms": None, "onednn_step_ms": None, "reason": reason}
    if report["reason"]:
        return report
    chosen, plain_ms, fast_ms = _measured_choice(model, batch_size, steps, rounds)
    if chosen:
        _swap(model, to_onednn=True)
    report.update(onednn=chosen, plain_step_ms=plain_ms, onednn_step_ms=fast_ms,
                  reason=f"measured {plain_ms / fast_ms:.2f}x (needs {MIN_GAIN}x)" if plain_ms and fast_ms else "stored")
    return report
