"""The linear layer kvlab's models use: `torch.nn.Linear`, plus a faster exact kernel for CPU inference.

Shape legend: C_in input features, C_out output features; any leading dimensions (B, T, ...).

PyTorch sends a float32 matrix product on a CPU to its BLAS library (MKL on x86 builds). On
the machine the course's benchmarks were recorded on, an AMD EPYC, the oneDNN library's kernels
(the ones PyTorch already uses for bfloat16 on a CPU) compute the same products in float32
about 1.5x as fast for a decode step's matrix-vector products and
about 2x for a prefill's matrix-matrix ones. `Linear` is `nn.Linear` with a per-layer switch,
`onednn`, that `kvlab.GPT` turns on for inference on a CPU in float32. Parameters, state dicts
and results (equal to float32 rounding) are those of `nn.Linear`. Built in chapter 5.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Linear", "onednn_linear_available"]

# torch.compiler.is_compiling arrived in PyTorch 2.3; kvlab supports 2.1 (Colab may be older).
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    # oneDNN's linear kernel (PyTorch's mkldnn operators), with no activation fused ("none").
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.cache
def onednn_linear_available() -> bool:
    """True on an x86 CPU whose PyTorch build has oneDNN's linear kernel, agreeing with F.linear.

    Checked once per process on a small product, in both weight layouts, so a build without the
    kernel (or with a broken one) quietly keeps `F.linear`.
    """
    import platform

    # Measured faster only on x86 processors; elsewhere (Arm, Apple Silicon) kvlab keeps nn.Linear.
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
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


class Linear(nn.Linear):
    """`nn.Linear` that can compute with oneDNN's CPU kernel when no gradient is needed.

    `onednn` is off by default; `kvlab.GPT` switches it on for inference on a CPU in float32
    (see `GPT.set_cpu_fast_path`). It applies only where autograd is not recording (under
    `torch.no_grad` or `torch.inference_mode`, as in generation), since the kernel has no
    backward, and not inside `torch.compile`, which chooses its own kernels. Built in chapter 5.
    """

    onednn: bool = False

    def forward(self, x: Tensor) -> Tensor:
        if (self.onednn and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                and not _is_compiling()):  # torch.compile picks its own kernels
            return _onednn_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
