"""The CPU inference fast path: in eval mode on a CPU in float32, GPT keeps its matrices
input-major and multiplies them with oneDNN. It must never change a value (beyond float32
rounding), a shape, a tie, a token or a saved file, and must step aside for training."""

import platform

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kvlab
from kvlab.gpt import FAST_PATH_MIN_WEIGHT_ELEMENTS
from kvlab.linear import Linear, onednn_linear_available
from conftest import STYLES
from conftest import make_model as make_small_model


needs_fast_path = pytest.mark.skipif(not onednn_linear_available(), reason="the fast path needs oneDNN on an x86 CPU")


def make_model(style, seed=0):
    """A model whose blocks hold matrices above and below the fast path's size threshold."""
    return make_small_model(style, seed, d_model=512, n_heads=8, n_layers=1)


def big(module):
    return module.weight.numel() >= FAST_PATH_MIN_WEIGHT_ELEMENTS


def linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def is_input_major(w):
    return w.stride() == (1, w.size(0))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN's kernel is checked on x86 here")
def test_onednn_kernel_is_available_on_x86():
    assert onednn_linear_available()


@needs_fast_path
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 48), (8, 1, 48), (3, 17, 48), (5, 48)])
@pytest.mark.parametrize("input_major", [False, True])
def test_onednn_linear_equals_f_linear(bias, shape, input_major):
    torch.manual_seed(0)
    layer = Linear(48, 80, bias=bias)
    if input_major:
        layer.weight.data = layer.weight.data.t().contiguous().t()
    x = torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2]  # a strided input, as slices give
    layer.onednn = onednn_linear_available()
    with torch.inference_mode():
        got = layer(x)
    torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_linear_falls_back_when_autograd_records():
    torch.manual_seed(0)
    layer = Linear(16, 8)
    layer.onednn = True
    x = torch.randn(4, 16)
    layer(x).sum().backward()  # the oneDNN kernel has no backward: F.linear must have run
    assert layer.weight.grad is not None and layer.weight.grad.shape == (8, 16)


@needs_fast_path
@pytest.mark.parametrize("style", STYLES)
def test_eval_on_cpu_float32_is_the_fast_path_and_train_is_not(style):
    model = make_model(style).train()
    assert not model.cpu_fast_path
    assert all(m.weight.is_contiguous() and not getattr(m, "onednn", False) for m in linears(model))
    model.eval()
    assert model.cpu_fast_path
    assert any(big(m) for m in linears(model)) and not all(big(m) for m in linears(model))
    for m in linears(model):  # large matrices go input-major and to oneDNN; small ones stay as they were
        assert is_input_major(m.weight) == big(m) and m.weight.is_contiguous() != big(m)
        assert m.onednn == big(m)
    model.train()
    assert all(m.weight.is_contiguous() and not m.onednn for m in linears(model))


@needs_fast_path
@pytest.mark.parametrize("style", STYLES)
def test_fast_path_changes_no_value_and_keeps_ties(style):
    model = make_model(style)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    idx = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.inference_mode():
        fast = model.eval()(idx)
        plain = model.set_cpu_fast_path(False)(idx)
    assert not model.cpu_fast_path and all(m.weight.is_contiguous() for m in linears(model))
    model.set_cpu_fast_path(True)
    assert [id(p) for p in model.parameters()] == params  # the same Parameters: optimizers stay valid
    for k, v in model.state_dict().items():
        assert v.shape == before[k].shape and torch.equal(v, before[k]), k
    if model.config.tie_embeddings:
        assert model.lm_head.weight is model.tok_emb.weight
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


@needs_fast_path
def test_bfloat16_and_moves_decide_again():
    model = make_model("gpt2").eval()
    assert model.cpu_fast_path and any(is_input_major(m.weight) for m in linears(model))
    model.to(torch.bfloat16)
    assert not model.cpu_fast_path
    assert all(m.weight.is_contiguous() and not m.onednn for m in linears(model))
    model.float()
    assert model.cpu_fast_path and all(is_input_major(m.weight) == big(m) for m in linears(model))


@needs_fast_path
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_cached_generation_gives_the_same_tokens_either_way(style, kind):
    model = make_model(style)
    idx = torch.randint(0, model.config.vocab_size, (3, 5))
    fast = kvlab.generate(model, idx, 40, temperature=0, cache=model.new_cache(3, kind=kind))
    plain = kvlab.generate(model.set_cpu_fast_path(False), idx, 40, temperature=0,
                           cache=model.new_cache(3, kind=kind))
    naive = kvlab.generate_naive(model.set_cpu_fast_path(True), idx, 40, temperature=0)
    assert torch.equal(fast, plain) and torch.equal(fast, naive)


@needs_fast_path
def test_small_models_are_left_alone():
    model = make_small_model("gpt2").eval()  # d_model 32: every matrix is far below the threshold
    assert model.cpu_fast_path
    assert all(m.weight.is_contiguous() and not m.onednn for m in linears(model))


def test_bad_switch():
    with pytest.raises(TypeError, match="enabled"):
        make_model("gpt2").set_cpu_fast_path("yes")


@needs_fast_path
def test_training_after_eval_updates_and_saves(tmp_path):
    from kvlab.train import load_checkpoint, save_checkpoint

    model = make_model("gpt2").eval()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, model.config.vocab_size, (2, 9))
    model(idx).logsumexp(-1).mean().backward()
    opt.step()
    model.eval()  # saving from eval mode writes contiguous tensors all the same
    path = save_checkpoint(tmp_path / "ck.safetensors", model, opt, step=1)
    other = make_model("gpt2", seed=1)
    load_checkpoint(path, other)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k


@needs_fast_path
def test_torch_compile_of_an_eval_model_uses_its_own_kernels():
    model = make_model("gpt2").eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        eager = model(idx)
        compiled = torch.compile(model)(idx)  # oneDNN's op is skipped while compiling
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
