"""Devices, synchronisation and seeding.

The course runs on three kinds of machine: a CUDA GPU (Colab), Apple Silicon (MPS) and a plain
CPU. Everything device-specific that the other modules need lives here, so a notebook can say
`device = kvlab.pick_device()` once and forget about it. Built in chapter 2.
"""

from __future__ import annotations

import functools

import random

import torch

from .validation import check_int

__all__ = ["pick_device", "synchronize", "seed_everything", "describe_device", "cpu_model_name"]


def pick_device(prefer: str | torch.device | None = None) -> torch.device:
    """Return the best available device: CUDA, then Apple's MPS, then the CPU.

    `prefer` forces a choice ("cpu", "cuda", "cuda:1", "mps"); asking for a device this machine
    lacks is a `ValueError` rather than a silent fallback, so a benchmark never reports CPU
    numbers under a GPU label. Built in chapter 2.
    """
    if prefer is not None:
        if not isinstance(prefer, (str, torch.device)):
            raise TypeError(f"prefer must be a str, torch.device or None, got {type(prefer).__name__}")
        device = torch.device(prefer)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"prefer={str(prefer)!r} but CUDA is not available on this machine")
        if device.type == "mps" and not _mps_available():
            raise ValueError(f"prefer={str(prefer)!r} but MPS is not available on this machine")
        if device.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"prefer must name cpu, cuda or mps, got {str(prefer)!r}")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def synchronize(device: str | torch.device | None = None) -> None:
    """Block until all queued work on `device` has finished.

    GPU kernels run asynchronously: without this, a timer measures how long it took to *queue*
    the work. On the CPU it is a no-op. Built in chapter 5.
    """
    device = torch.device(device) if device is not None else pick_device()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, PyTorch (all devices) and return a CPU `torch.Generator` with that seed.

    Same seed does not mean same samples across devices, because each device has its own random
    number stream; sampling with the returned CPU generator does give identical tokens on CPU,
    CUDA and MPS. Built in chapter 2.
    """
    check_int("seed", seed)
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA and MPS too
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional for the library itself
        pass
    return torch.Generator(device="cpu").manual_seed(seed)


def describe_device(device: str | torch.device | None = None) -> str:
    """A one-line human description of a device, for benchmark records and notebook output."""
    device = torch.device(device) if device is not None else pick_device()
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return "mps: Apple Silicon GPU"
    return f"cpu: {cpu_model_name()}, {torch.get_num_threads()} threads"


@functools.cache
def cpu_model_name() -> str:
    """The processor's marketing name where the OS tells it (Linux, macOS), else its architecture."""
    import platform
    import subprocess

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.machine()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()
