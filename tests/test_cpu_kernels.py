"""kvlab.cpu_kernels: oneDNN linears, kept outside the model and chosen by measuring (once, stored), by
whoever owns the process, never inside `kvlab.generate`. Switched on or off, they must never change a value (beyond float32 rounding), a shape,
a tie, a token or a saved file, and must step aside for training."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kvlab
from kvlab import cpu_kernels
from kvlab.cpu_kernels import MIN_WEIGHT_ELEMENTS, OneDNNLinear, _swap, fast_cpu_inference, onednn_linear_available, plain_linears
from conftest import STYLES
from conftest import make_model as make_small_model

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="needs PyTorch's oneDNN linear kernel")


def make_model(style, seed=0):
    """A model whose blocks hold matrices above and below the size threshold."""
    return make_small_model(style, seed, d_model=512, n_heads=8, n_layers=1)


def test_the_model_class_uses_plain_linear():
    model = make_model("gpt2")
    kinds = {type(m) for m in model.modules() if isinstance(m, nn.Linear)}
    assert kinds == {nn.Linear} and not any(isinstance(m, OneDNNLinear) for m in model.modules())


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 48), (8, 1, 48), (3, 17, 48), (5, 48)])
def test_onednn_linear_equals_nn_linear(bias, shape):
    torch.manual_seed(0)
    plain = nn.Linear(48, 80, bias=bias)
    reference = nn.Linear(48, 80, bias=bias)
    reference.load_state_dict(plain.state_dict())
    layer = OneDNNLinear(plain)
    assert layer.weight is plain.weight and layer.bias is plain.bias  # the same parameters, untouched
    x = torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2]  # a strided input, as slices give
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)


def test_falls_back_to_f_linear_when_autograd_records():
    torch.manual_seed(0)
    layer = OneDNNLinear(nn.Linear(16, 8))
    x = torch.randn(4, 16)
    layer(x).sum().backward()  # the oneDNN kernel has no backward: F.linear must have run
    assert layer.weight.grad is not None and layer.weight.grad.shape == (8, 16)


@needs_onednn
@pytest.mark.parametrize("style", STYLES)
def test_swapping_changes_no_value_token_or_tie(style):
    model = make_model(style)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    idx = torch.randint(0, model.config.vocab_size, (3, 5))
    plain_tokens = kvlab.generate(model, idx, 30, temperature=0)
    with torch.inference_mode():
        plain_logits = model(idx)
    assert _swap(model, to_onednn=True) > 0
    big = [m for m in model.modules() if isinstance(m, OneDNNLinear)]
    small = [m for m in model.modules() if type(m) is nn.Linear]
    assert big and small and all(m.weight.numel() >= MIN_WEIGHT_ELEMENTS for m in big)
    assert all(m.weight.numel() < MIN_WEIGHT_ELEMENTS for m in small)
    with torch.inference_mode():
        torch.testing.assert_close(model(idx), plain_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(kvlab.generate(model, idx, 30, temperature=0), plain_tokens)
    assert [id(p) for p in model.parameters()] == params  # the same Parameters: optimizers stay valid
    assert list(model.state_dict()) == list(before)
    if model.config.tie_embeddings:
        assert model.lm_head.weight is model.tok_emb.weight
    plain_linears(model)
    assert all(type(m) is not OneDNNLinear for m in model.modules())
    assert all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, nn.Linear))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@needs_onednn
def test_fast_cpu_inference_keeps_only_a_measured_win(monkeypatch, tmp_path):
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(tmp_path))
    model = make_model("gpt2")
    idx = torch.randint(0, model.config.vocab_size, (2, 5))
    reference = kvlab.generate(model, idx, 20, temperature=0)
    cpu_kernels.forget_measurements()
    # A machine where oneDNN loses: the model must stay plain.
    monkeypatch.setattr(cpu_kernels, "_decode_ms", lambda m, b, s: 10.0 if any(
        isinstance(x, OneDNNLinear) for x in m.modules()) else 5.0)
    report = fast_cpu_inference(model)
    assert not report["onednn"] and not any(isinstance(m, OneDNNLinear) for m in model.modules())
    # A machine where it wins clearly: switched, and still the same tokens.
    cpu_kernels._choices_path().unlink()
    cpu_kernels.forget_measurements()
    monkeypatch.setattr(cpu_kernels, "_decode_ms", lambda m, b, s: 5.0 if any(
        isinstance(x, OneDNNLinear) for x in m.modules()) else 10.0)
    report = fast_cpu_inference(model)
    assert report["onednn"] and any(isinstance(m, OneDNNLinear) for m in model.modules())
    assert torch.equal(kvlab.generate(model, idx, 20, temperature=0), reference)
    # Measured once per process: a second call reuses the answer without timing anything.
    monkeypatch.setattr(cpu_kernels, "_decode_ms", lambda *a: pytest.fail("measured twice"))
    assert fast_cpu_inference(model)["onednn"]
    # ... and so does another process: the answer was stored.
    cpu_kernels.forget_measurements()
    assert fast_cpu_inference(model)["onednn"]
    cpu_kernels.forget_measurements()


def test_fast_cpu_inference_leaves_other_models_alone():
    model = make_model("gpt2").to(torch.bfloat16)
    assert not fast_cpu_inference(model)["onednn"]
    small = make_small_model("gpt2")  # every matrix far below the threshold
    assert not fast_cpu_inference(small)["onednn"]
    assert all(type(m) is nn.Linear for m in small.modules() if isinstance(m, nn.Linear))
    with pytest.raises(TypeError, match="kvlab.GPT"):
        fast_cpu_inference(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="batch_size"):
        fast_cpu_inference(make_small_model("gpt2"), batch_size=0)


@needs_onednn
def test_training_and_saving_after_the_swap(tmp_path):
    from kvlab.train import load_checkpoint, save_checkpoint

    model = make_model("gpt2")
    _swap(model, to_onednn=True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, model.config.vocab_size, (2, 9))
    model(idx).logsumexp(-1).mean().backward()
    opt.step()
    path = save_checkpoint(tmp_path / "ck.safetensors", model, opt, step=1)
    other = make_model("gpt2", seed=1)
    load_checkpoint(path, other)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k


def _fake_timing(monkeypatch, onednn_ms: float, plain_ms: float = 10.0):
    calls = []

    def decode_ms(model, batch_size, steps):
        calls.append(batch_size)
        return onednn_ms if any(isinstance(m, OneDNNLinear) for m in model.modules()) else plain_ms

    monkeypatch.setattr(cpu_kernels, "_decode_ms", decode_ms)
    return calls


@needs_onednn
def test_measured_linears_switches_inside_the_block_only_and_stores_the_answer(monkeypatch, tmp_path):
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(tmp_path))
    cpu_kernels.forget_measurements()
    model = make_model("gpt2")
    idx = torch.randint(0, model.config.vocab_size, (2, 5))
    reference = kvlab.generate(model, idx, 20, temperature=0)
    monkeypatch.setenv(cpu_kernels.KERNELS_ENV, "plain")
    with cpu_kernels.measured_linears(model, 2) as switched:
        assert not switched
    assert not fast_cpu_inference(model, 2)["onednn"]
    assert not (tmp_path / cpu_kernels.CHOICES_FILE).exists()  # "plain": nothing measured
    monkeypatch.setenv(cpu_kernels.KERNELS_ENV, "auto")
    calls = _fake_timing(monkeypatch, onednn_ms=5.0)
    seen = []
    original = cpu_kernels._onednn_linear
    monkeypatch.setattr(cpu_kernels, "_onednn_linear", lambda *a: seen.append(1) or original(*a))
    with cpu_kernels.measured_linears(model, 2) as switched:
        assert switched and torch.equal(kvlab.generate(model, idx, 20, temperature=0), reference)
    assert seen and calls == [2, 2, 2, 2]  # batch 2, measured both ways twice
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))  # restored
    stored = json.loads((tmp_path / cpu_kernels.CHOICES_FILE).read_text())
    assert [v["onednn"] for v in stored.values()] == [True]
    # Another process reads the stored answer: no timing at all.
    cpu_kernels.forget_measurements()
    monkeypatch.setattr(cpu_kernels, "_decode_ms", lambda *a: pytest.fail("measured again"))
    seen.clear()
    with cpu_kernels.measured_linears(model, 2):
        assert torch.equal(kvlab.generate(model, idx, 20, temperature=0), reference) and seen
    cpu_kernels.forget_measurements()


@needs_onednn
def test_generate_makes_no_kernel_choice(monkeypatch, tmp_path):
    # Chapter 4's loop runs the model as it is: the choice belongs to whoever owns the process.
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(tmp_path))
    cpu_kernels.forget_measurements()
    model = make_model("gpt2")
    monkeypatch.setattr(cpu_kernels, "_decode_ms", lambda *a: pytest.fail("generate measured"))
    monkeypatch.setattr(cpu_kernels, "_onednn_linear", lambda *a: pytest.fail("oneDNN used"))
    kvlab.generate(model, torch.randint(0, model.config.vocab_size, (1, 5)), 5, temperature=0)
    assert not (tmp_path / cpu_kernels.CHOICES_FILE).exists()


@needs_onednn
def test_stays_plain_where_onednn_loses_or_the_file_is_damaged(monkeypatch, tmp_path):
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(tmp_path))
    (tmp_path / cpu_kernels.CHOICES_FILE).write_text("{not json")
    cpu_kernels.forget_measurements()
    model = make_model("gpt2")
    calls = _fake_timing(monkeypatch, onednn_ms=9.9)  # 1.01x: within noise, not a win
    monkeypatch.setattr(cpu_kernels, "_onednn_linear", lambda *a: pytest.fail("oneDNN used"))
    with cpu_kernels.measured_linears(model, 1) as switched:
        kvlab.generate(model, torch.randint(0, model.config.vocab_size, (1, 5)), 5, temperature=0)
    assert not switched and calls  # the damaged file was measured over ...
    assert [v["onednn"] for v in json.loads((tmp_path / cpu_kernels.CHOICES_FILE).read_text()).values()] == [False]
    cpu_kernels.forget_measurements()


def test_a_bad_setting_is_refused(monkeypatch):
    monkeypatch.setenv(cpu_kernels.KERNELS_ENV, "fast")
    model = make_model("gpt2")
    with pytest.raises(ValueError, match="KVLAB_CPU_KERNELS must be 'auto' or 'plain'"):
        fast_cpu_inference(model)
    with pytest.raises(ValueError, match="KVLAB_CPU_KERNELS must be 'auto' or 'plain'"):
        with cpu_kernels.measured_linears(model, 1):
            pass
    with pytest.raises(TypeError, match="kvlab.GPT"):
        with cpu_kernels.measured_linears(nn.Linear(2, 2), 1):
            pass
