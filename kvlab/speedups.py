"""An optional CPU speedup, kept outside the model and chosen by measuring: oneDNN input-major linears.

Shape legend: B batch, C_in input features, C_out output features.

A decode step multiplies one row of activations per sequence by every weight matrix, so its
speed is how fast the weights stream from memory. PyTorch sends a float32 product on a CPU to
its BLAS library, with `nn.Linear`'s (C_out, C_in) layout. On some processors oneDNN's linear
kernel (which PyTorch ships for bfloat16) streams an input-major (C_in, C_out) copy faster; on
others it is slower. So `kvlab.GPT` always uses plain `nn.Linear`, and `fast_cpu_inference(model)`
measures a decode step of *this* model on *this* machine both ways and keeps oneDNN only where
it won. The answer is cached for the process, per model shape, batch size, dtype and thread
count. Values, parameter objects and the state dict stay those of `nn.Linear`; `plain_linears`
undoes it. Built in chapter 5.
"""

from __future__ import annotations

import functools
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["onednn_linear_available", "OneDNNLinear", "fast_cpu_inference", "plain_linears"]

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
    """Stands in for an `nn.Linear`, holding the same parameters, its weight stored input-major.

    Without autograd recording (generation) it multiplies with oneDNN's kernel; otherwise, and
    inside `torch.compile`, with `F.linear`. Same values, shapes and state dict keys.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameter objects (ties kept)
        with torch.no_grad():
            self.weight.data = self.weight.data.t().contiguous().t()  # (C_out, C_in) view of (C_in, C_out)

    def forward(self, x: Tensor) -> Tensor:
        recording = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if recording or _is_compiling():
            return F.linear(x, self.weight, self.bias)
        return _onednn_linear(x, self.weight, self.bias)

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta")
        with torch.no_grad():
            self.weight.data = self.weight.data.contiguous()
        linear.weight, linear.bias = self.weight, self.bias
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
    """Undo `fast_cpu_inference`: every layer back to `nn.Linear` with a contiguous weight."""
    _swap(model, to_onednn=False)
    return model


@torch.inference_mode()
def _decode_ms(model, batch_size: int, steps: int) -> float:
    """Median time of one cached decode step, in ms, after a short prompt."""
    from .generate import decode_step, prefill

    prompt = torch.randint(0, model.config.vocab_size, (batch_size, 8), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(batch_size, max_seq_len=8 + steps + 1)
    token = prefill(model, prompt, cache).argmax(-1, keepdim=True)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        decode_step(model, token, cache)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


class _Unkeyed:
    """Carries the model into the cached measurement without being part of the cache key."""

    def __init__(self, *value):
        self.value = value

    def __hash__(self) -> int:
        return 0

    def __eq__(self, other) -> bool:
        return isinstance(other, _Unkeyed)


@functools.lru_cache(maxsize=None)
def _measured_choice(key: tuple, carried: _Unkeyed) -> tuple[bool, float, float]:
    model, batch_size, steps, rounds = carried.value
    plain, fast = [], []
    for _ in range(rounds):  # alternate, so a machine that slows down slows both alike
        plain.append(_decode_ms(model, batch_size, steps))
        _swap(model, to_onednn=True)
        fast.append(_decode_ms(model, batch_size, steps))
        _swap(model, to_onednn=False)
    plain_ms, fast_ms = statistics.median(plain), statistics.median(fast)
    return plain_ms / fast_ms >= MIN_GAIN, plain_ms, fast_ms


def fast_cpu_inference(model, batch_size: int = 1, *, steps: int = 8, rounds: int = 3) -> dict:
    """Use oneDNN input-major linears in `model` if, measured here, they make a decode step faster.

    Only for a model in eval mode on the CPU in float32 with oneDNN available; otherwise nothing
    changes. Times `steps` decode steps of `batch_size` sequences `rounds` times each way,
    alternating, and switches only if the median step is at least `MIN_GAIN` times faster
    (so it cannot make generation slower than plain `nn.Linear`, up to the measurement's
    noise). The decision is cached per model shape, batch size, dtype and thread count for the
    process. Returns what was measured and chosen. Built in chapter 5.
    """
    from .gpt import GPT

    if not isinstance(model, GPT):
        raise TypeError(f"model must be a kvlab.GPT, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    plain_linears(model)
    report = {"onednn": False, "plain_step_ms": None, "onednn_step_ms": None, "reason": ""}
    if model.device.type != "cpu" or model.dtype != torch.float32 or model.training:
        report["reason"] = "only for a model in eval mode on the CPU in float32"
        return report
    if not onednn_linear_available():
        report["reason"] = "this PyTorch build has no usable oneDNN linear kernel"
        return report
    if not any(type(m) is nn.Linear and m.weight.numel() >= MIN_WEIGHT_ELEMENTS for m in model.modules()):
        report["reason"] = f"no weight matrix has {MIN_WEIGHT_ELEMENTS:,} numbers or more"
        return report
    key = (tuple(sorted(model.config.to_dict().items(), key=str)), batch_size, str(model.dtype),
           torch.get_num_threads(), steps, rounds)
    chosen, plain_ms, fast_ms = _measured_choice(key, _Unkeyed(model, batch_size, steps, rounds))
    if chosen:
        _swap(model, to_onednn=True)
    report.update(onednn=chosen, plain_step_ms=plain_ms, onednn_step_ms=fast_ms,
                  reason=f"measured {plain_ms / fast_ms:.2f}x (needs {MIN_GAIN}x)")
    return report
