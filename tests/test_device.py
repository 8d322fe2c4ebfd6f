"""Device selection, synchronisation and seeding."""

import random

import pytest
import torch

import kvlab


def test_pick_device_order(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(kvlab.device, "_mps_available", lambda: False)
    assert kvlab.pick_device() == torch.device("cpu")
    monkeypatch.setattr(kvlab.device, "_mps_available", lambda: True)
    assert kvlab.pick_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert kvlab.pick_device() == torch.device("cuda")  # CUDA first, then MPS, then CPU


def test_asking_for_a_missing_device_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(kvlab.device, "_mps_available", lambda: False)
    assert kvlab.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        kvlab.pick_device("cuda")
    with pytest.raises(ValueError, match="MPS is not available"):
        kvlab.pick_device("mps")
    with pytest.raises(ValueError, match="cpu, cuda or mps"):
        kvlab.pick_device("meta")
    with pytest.raises(TypeError, match="prefer"):
        kvlab.pick_device(0)


def test_synchronize_calls_the_right_backend(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("cuda"))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("mps"))
    kvlab.synchronize("cpu")
    kvlab.synchronize("cuda")
    kvlab.synchronize("mps")
    assert calls == ["cuda", "mps"]


def test_seed_everything_is_reproducible():
    g = kvlab.seed_everything(5)
    a = (random.random(), torch.rand(3), torch.randint(0, 100, (3,), generator=g))
    g = kvlab.seed_everything(5)
    b = (random.random(), torch.rand(3), torch.randint(0, 100, (3,), generator=g))
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert g.device.type == "cpu"
    with pytest.raises(TypeError, match="seed"):
        kvlab.seed_everything(1.5)


def test_describe_device():
    assert kvlab.describe_device("cpu").startswith("cpu:")
