"""GPTConfig and GPT: presets, shapes, causality, and every bad input rejected before work."""

import pytest
import torch

import kvlab
from conftest import STYLES, make_model


def test_gpt2_preset_has_gpt2s_parameter_count():
    with torch.device("meta"):  # shapes only, no memory
        model = kvlab.GPT(kvlab.GPTConfig.from_preset("gpt2"))
    assert model.num_params() == 124_439_808


def test_config_derives_fields_and_round_trips():
    c = kvlab.GPTConfig(d_model=96, n_heads=6, mlp="swiglu")
    assert c.head_dim == 16 and c.n_kv_heads == 6 and c.d_ff == 256
    assert kvlab.GPTConfig(**c.to_dict()) == c
    assert kvlab.GPTConfig.from_preset("tiny-modern").n_kv_heads == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=30, n_heads=4), "divisible"),
    (dict(n_heads=4, n_kv_heads=3, d_model=32), "n_kv_heads"),
    (dict(norm="batchnorm"), "norm"),
    (dict(mlp="relu"), "mlp"),
    (dict(pos="alibi"), "pos"),
    (dict(n_layers=0), "n_layers"),
    (dict(vocab_size=2.5), "vocab_size"),
    (dict(window=0), "window"),
    (dict(dropout=1.0), "dropout"),
    (dict(pos="rope", d_model=36, n_heads=4), "even head_dim"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kvlab.GPTConfig(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        kvlab.GPTConfig.from_preset("gpt5")


def test_forward_shape_and_causality(model):
    x = torch.randint(0, 97, (3, 11))
    with torch.no_grad():
        y = model(x)
        x2 = x.clone()
        x2[:, 6:] = (x2[:, 6:] + 1) % 97
        y2 = model(x2)
    assert y.shape == (3, 11, 97)
    torch.testing.assert_close(y[:, :6], y2[:, :6])
    assert not torch.allclose(y[:, 6:], y2[:, 6:])


def test_tied_and_untied_embeddings():
    tied, untied = make_model("gpt2"), make_model("modern")
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_batch_rows_are_independent(model):
    x = torch.randint(0, 97, (4, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[2:3], model(x[2:3]), atol=1e-5, rtol=1e-5)


def test_input_pos_forms_agree(model):
    x = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        a = model(x, model.new_cache(1), input_pos=torch.arange(6))
        b = model(x, model.new_cache(1), input_pos=0)
        c = model(x, model.new_cache(1))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


@pytest.mark.parametrize("make_bad, error, match", [
    (lambda: torch.rand(1, 4), TypeError, "integer token ids"),
    (lambda: [[1, 2, 3]], TypeError, "torch.Tensor"),
    (lambda: torch.tensor([1, 2, 3]), ValueError, r"shape \(B, T\)"),
    (lambda: torch.zeros(1, 0, dtype=torch.long), ValueError, "at least one token"),
    (lambda: torch.tensor([[1, 97]]), ValueError, r"\[0, 96\]"),
    (lambda: torch.tensor([[-1, 3]]), ValueError, r"\[0, 96\]"),
    (lambda: torch.zeros(1, 321, dtype=torch.long), ValueError, "max_seq_len=320"),
])
def test_bad_forward_inputs(model, make_bad, error, match):
    with pytest.raises(error, match=match):
        model(make_bad())


@pytest.mark.parametrize("input_pos, error, match", [
    (torch.tensor([0.0, 1.0]), TypeError, "integer positions"),
    (torch.tensor([0, 2]), ValueError, "consecutive"),
    (torch.tensor([0, 1, 2]), ValueError, r"shape \(2,\)"),
    (-1, ValueError, ">= 0"),
    ("0", TypeError, "input_pos"),
    (319, ValueError, "exceed the model's max_seq_len"),
])
def test_bad_input_pos(input_pos, error, match):
    model = make_model("gpt2")
    with pytest.raises(error, match=match):
        model(torch.zeros(1, 2, dtype=torch.long), input_pos=input_pos)


def test_modern_style_matches_hugging_face_llama():
    """The RMSNorm / SwiGLU / RoPE / GQA path against an independent implementation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)).eval()
    with torch.no_grad():  # sharpen the near-uniform random logits so greedy ties cannot decide the test
        for p in hf.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    model = kvlab.GPT(kvlab.GPTConfig(**{**STYLES["modern"], "d_model": 64, "d_ff": 160, "max_seq_len": 128,
                                         "norm_eps": 1e-6})).eval()
    sd = hf.state_dict()
    ours = {"tok_emb.weight": sd["model.embed_tokens.weight"], "norm_f.weight": sd["model.norm.weight"],
            "lm_head.weight": sd["lm_head.weight"]}
    for i in range(2):
        p = f"model.layers.{i}."
        ours[f"blocks.{i}.norm1.weight"] = sd[p + "input_layernorm.weight"]
        ours[f"blocks.{i}.norm2.weight"] = sd[p + "post_attention_layernorm.weight"]
        ours[f"blocks.{i}.attn.qkv.weight"] = torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        ours[f"blocks.{i}.attn.out.weight"] = sd[p + "self_attn.o_proj.weight"]
        ours[f"blocks.{i}.mlp.gate_up.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
        ours[f"blocks.{i}.mlp.proj.weight"] = sd[p + "mlp.down_proj.weight"]
    model.load_state_dict(ours, strict=True)
    x = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=1e-4)
    expected = hf.generate(x[:, :10], max_new_tokens=50, do_sample=False, pad_token_id=0)
    assert torch.equal(kvlab.generate(model, x[:, :10], 50, temperature=0), expected)
