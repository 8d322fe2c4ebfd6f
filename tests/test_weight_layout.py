"""GPT keeps its matrices input-major in eval mode on a CPU in float32 (fast decoding) and
contiguous otherwise; the layout never changes a value, a shape, a tie or a saved file."""

import pytest
import torch
from torch import nn

import kvlab
from conftest import STYLES, make_model


def linear_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


def is_input_major(w):
    return w.stride() == (1, w.size(0))


@pytest.mark.parametrize("style", STYLES)
def test_eval_on_cpu_float32_is_input_major_and_train_is_contiguous(style):
    model = make_model(style).train()
    assert all(w.is_contiguous() for w in linear_weights(model))
    model.eval()
    assert model.decode_layout
    assert all(is_input_major(w) and not w.is_contiguous() for w in linear_weights(model))
    model.train()
    assert not model.decode_layout
    assert all(w.is_contiguous() for w in linear_weights(model))


@pytest.mark.parametrize("style", STYLES)
def test_layout_changes_no_value_and_keeps_ties(style):
    model = make_model(style)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    idx = torch.randint(0, model.config.vocab_size, (2, 9))
    model.eval()
    with torch.no_grad():
        contiguous_logits = model.train()(idx)  # dropout is 0, so train mode computes the same function
        model.eval()
        input_major_logits = model(idx)
    assert [id(p) for p in model.parameters()] == params  # same Parameter objects: optimizers stay valid
    for k, v in model.state_dict().items():
        assert v.shape == before[k].shape and torch.equal(v, before[k]), k
    if model.config.tie_embeddings:
        assert model.lm_head.weight is model.tok_emb.weight
    torch.testing.assert_close(input_major_logits, contiguous_logits, rtol=1e-5, atol=1e-5)


def test_bfloat16_and_moves_pick_the_layout_again():
    model = make_model("gpt2").eval()
    assert all(is_input_major(w) for w in linear_weights(model))
    model.to(torch.bfloat16)
    assert not model.decode_layout and all(w.is_contiguous() for w in linear_weights(model))
    model.float()
    assert model.decode_layout and all(is_input_major(w) for w in linear_weights(model))


def test_cached_generation_is_unchanged_by_the_layout():
    model = make_model("gpt2").train()
    idx = torch.randint(0, model.config.vocab_size, (2, 5))
    train_mode = kvlab.generate(model, idx, 20, temperature=0)  # contiguous (train mode, no dropout)
    eval_mode = kvlab.generate(model.eval(), idx, 20, temperature=0)  # input-major
    assert torch.equal(train_mode, eval_mode)


def test_training_after_eval_updates_and_saves(tmp_path):
    from kvlab.train import load_checkpoint, save_checkpoint

    model = make_model("gpt2").eval()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, model.config.vocab_size, (2, 9))
    loss = model(idx).logsumexp(-1).mean()
    loss.backward()
    opt.step()
    model.eval()  # saving from eval mode writes contiguous tensors all the same
    path = save_checkpoint(tmp_path / "ck.safetensors", model, opt, step=1)
    other = make_model("gpt2", seed=1)
    load_checkpoint(path, other)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
