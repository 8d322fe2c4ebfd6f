"""GPT-2 conversion: kvlab equals Hugging Face on randomly initialised models of several shapes."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import kvlab

SHAPES = [
    dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=211),
    dict(n_embd=96, n_layer=3, n_head=3, n_positions=96, vocab_size=500),
    dict(n_embd=128, n_layer=4, n_head=8, n_positions=256, vocab_size=1000, layer_norm_epsilon=1e-6),
    dict(n_embd=48, n_layer=1, n_head=1, n_positions=64, vocab_size=50),
]


def hf_gpt2(seed=0, **shape):
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**shape, bos_token_id=0, eos_token_id=0)).eval()
    with torch.no_grad():  # make random logits decisive so greedy comparisons are meaningful
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    return model


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{s['n_embd']}-L{s['n_layer']}-H{s['n_head']}")
def test_logits_and_greedy_tokens_equal_hugging_face(shape):
    hf = hf_gpt2(**shape)
    model = kvlab.from_hf_gpt2(hf).eval()
    x = torch.randint(0, shape["vocab_size"], (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(x) - hf(x).logits).abs().max().item()
    assert diff <= 1e-4, diff
    n_new = min(60, shape["n_positions"] - 8)
    expected = hf.generate(x[:, :8], max_new_tokens=n_new, do_sample=False, pad_token_id=0, eos_token_id=None)
    for use_cache in (True, False):
        assert torch.equal(kvlab.generate(model, x[:, :8], n_new, temperature=0, use_cache=use_cache), expected)


def test_state_dict_path_and_prefixes():
    hf = hf_gpt2(**SHAPES[0])
    x = torch.randint(0, 211, (1, 10))
    from_model = kvlab.from_hf_gpt2(hf)
    from_sd = kvlab.from_hf_gpt2(hf.state_dict(), n_heads=4)  # "transformer." prefixed keys
    bare = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    from_bare = kvlab.from_hf_gpt2(bare, n_heads=4)  # the hub file's layout
    assert from_sd.config == from_model.config == from_bare.config
    with torch.no_grad():
        torch.testing.assert_close(from_sd(x), from_model(x))
        torch.testing.assert_close(from_bare(x), from_model(x))
    # Head count is invisible in the shapes: d_model=64 is not a GPT-2 size, so it must be given.
    with pytest.raises(ValueError, match="n_heads"):
        kvlab.from_hf_gpt2(bare)


@pytest.mark.parametrize("d_model, n_head", [(96, 8), (32, 2)])
def test_state_dict_without_n_heads_is_refused_unless_gpt2_sized(d_model, n_head):
    """d_model=96 once silently became one head (logits off), d_model=32 zero heads (a confusing error)."""
    hf = hf_gpt2(n_embd=d_model, n_layer=1, n_head=n_head, n_positions=16, vocab_size=30)
    with pytest.raises(ValueError, match=rf"d_model={d_model}.*pass n_heads="):
        kvlab.from_hf_gpt2(hf.state_dict())
    model = kvlab.from_hf_gpt2(hf.state_dict(), n_heads=n_head)
    x = torch.randint(0, 30, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=1e-4)


def test_gpt2_widths_give_gpt2_head_counts():
    hf = GPT2LMHeadModel(GPT2Config(n_embd=768, n_layer=1, n_head=12, n_positions=8, vocab_size=10)).eval()
    assert kvlab.from_hf_gpt2(hf.state_dict()).config.n_heads == 12


def test_round_trip_to_hugging_face():
    model = kvlab.GPT(kvlab.GPTConfig(vocab_size=120, max_seq_len=64, d_model=32, n_layers=2, n_heads=2)).eval()
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=120, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    hf.load_state_dict(kvlab.to_hf_gpt2_state_dict(model), strict=True)
    x = torch.randint(0, 120, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="GPT-2-style"):
        kvlab.to_hf_gpt2_state_dict(kvlab.GPT(kvlab.GPTConfig.from_preset("tiny-modern")))


def test_missing_and_misshaped_keys_are_listed():
    sd = dict(hf_gpt2(**SHAPES[0]).state_dict())
    del sd["transformer.h.1.mlp.c_fc.weight"]
    del sd["transformer.ln_f.bias"]
    sd["transformer.h.0.attn.c_proj.weight"] = torch.zeros(64, 65)
    with pytest.raises(ValueError) as err:
        kvlab.from_hf_gpt2(sd, n_heads=4)
    msg = str(err.value)
    assert "missing keys (2)" in msg and "h.1.mlp.c_fc.weight" in msg and "ln_f.bias" in msg
    assert "mis-shaped keys (1)" in msg and "h.0.attn.c_proj.weight: expected (64, 64), got (64, 65)" in msg


def test_unsupported_inputs():
    with pytest.raises(TypeError, match="state dict"):
        kvlab.from_hf_gpt2("gpt2")
    with pytest.raises(ValueError, match="missing keys needed"):
        kvlab.from_hf_gpt2({"h.0.ln_1.weight": torch.ones(4)})
    hf = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=16, vocab_size=20,
                                    activation_function="relu"))
    with pytest.raises(ValueError, match="activation_function"):
        kvlab.from_hf_gpt2(hf)
    with pytest.raises(ValueError, match="name must be one of"):
        kvlab.load_gpt2("gpt3")


def test_load_gpt2_without_the_hub_says_it_is_a_download_and_how_big(monkeypatch):
    import huggingface_hub

    def offline(*_, **__):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    for name, size in (("gpt2", "about 550 MB"), ("gpt2-xl", "about 6.4 GB")):
        with pytest.raises(FileNotFoundError, match=f"download from the Hugging Face hub \\(openai-community/{name}, "
                                                    f"{size}\\).*cannot find the requested files"):
            kvlab.load_gpt2(name)


def test_load_shakespeare_from_a_folder_names_that_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as info:
        kvlab.load_shakespeare(tmp_path)
    message = str(info.value)
    assert f"{tmp_path} is not an exported kvlab model: missing model.safetensors, tokenizer.json" in message
    assert "pass path=" not in message and "python -m kvlab.train --export" in message
    with pytest.raises(FileNotFoundError, match="no such folder"):
        kvlab.load_shakespeare(tmp_path / "absent")
