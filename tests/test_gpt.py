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


# -- sinusoidal positions (seed 001's PositionalEncoding) -------------------------------------------


def test_sinusoidal_positions_are_a_fixed_table_neither_trained_nor_saved():
    model = make_model("gpt2", pos="sinusoidal")
    table = kvlab.layers.sinusoidal_positions(320, 32)
    torch.testing.assert_close(model.pos_emb.weight, table)
    assert not any("pos_emb" in name for name, _ in model.named_parameters())
    assert "pos_emb.weight" not in model.state_dict()
    learned = make_model("gpt2")
    assert model.num_params() == learned.num_params() - learned.pos_emb.weight.numel()
    assert model.num_params(exclude_embeddings=True) == model.num_params() - model.tok_emb.weight.numel()
    idx = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    x = model.tok_emb(idx) + table[:6]  # tokens plus the table's rows, then the blocks as usual
    for block in model.blocks:
        x = block(x)
    torch.testing.assert_close(model(idx), model.lm_head(model.norm_f(x)))
    with pytest.raises(ValueError, match="max_seq_len=320"):  # the table ends where the context does
        model(torch.zeros(1, 321, dtype=torch.long))


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_sinusoidal_cached_generation_equals_uncached(kind):
    model = make_model("gpt2", pos="sinusoidal")
    idx = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    naive = kvlab.generate(model, idx, 40, temperature=0, use_cache=False)
    cache = model.new_cache(2, kind=kind) if kind == "dynamic" else None
    cached = kvlab.generate(model, idx, 40, temperature=0, cache=cache)
    assert torch.equal(naive, cached)
    assert len(set(cached[0, 7:].tolist())) > 3  # varied tokens: a position bug would change them
    # the same logits whichever way positions arrive: all at once, or one token at a time through a cache
    with torch.inference_mode():
        full = model(naive)
        step_cache = model.new_cache(2)
        steps = torch.cat([model(naive[:, t:t + 1], step_cache) for t in range(naive.size(1))], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=1e-4)


def test_sinusoidal_model_round_trips_through_a_checkpoint(tmp_path):
    from kvlab.train import load_checkpoint, save_checkpoint

    model = make_model("gpt2", pos="sinusoidal")
    path = save_checkpoint(tmp_path / "c.safetensors", model)
    again = load_checkpoint(path)["model"].eval()
    idx = torch.tensor([[1, 2, 3]])
    assert again.config.pos == "sinusoidal" and torch.equal(again(idx), model(idx))


# -- the training loss from forward (nanoGPT's `logits, loss = model(idx, targets)`) -------------------


def test_forward_with_targets_returns_logits_and_the_mean_cross_entropy(model):
    g = torch.Generator().manual_seed(2)
    idx, targets = torch.randint(0, 97, (3, 9), generator=g), torch.randint(0, 97, (3, 9), generator=g)
    logits, loss = model(idx, targets=targets)
    assert torch.equal(logits, model(idx))  # without targets: the logits alone, as before
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, expected)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    ignored = targets.clone()
    ignored[:, :4] = -100  # positions not to learn from
    _, partial = model(idx, targets=ignored)
    torch.testing.assert_close(partial, torch.nn.functional.cross_entropy(logits[:, 4:].flatten(0, 1),
                                                                          targets[:, 4:].flatten()))


def test_targets_keep_the_cache_api(model):
    idx = torch.tensor([[5, 6, 7, 8]])
    cache = model.new_cache(1)
    logits, loss = model(idx, cache, targets=torch.tensor([[6, 7, 8, 9]]))
    assert cache.length == 4 and loss.item() > 0
    step = model(torch.tensor([[9]]), cache)  # a decode step still returns the logits only
    assert isinstance(step, torch.Tensor) and step.shape == (1, 1, 97)


@pytest.mark.parametrize("targets, error, match", [
    ([[1, 2, 3]], TypeError, "targets must be a torch.Tensor"),
    (torch.tensor([[1.0, 2.0, 3.0]]), TypeError, "integer token ids"),
    (torch.tensor([[1, 2]]), ValueError, r"idx's shape \(1, 3\)"),
    (torch.tensor([[1, 2, 97]]), ValueError, r"\[0, 96\] or -100"),
    (torch.tensor([[1, -1, 2]]), ValueError, "or -100"),
])
def test_bad_targets(model, targets, error, match):
    with pytest.raises(error, match=match):
        model(torch.tensor([[1, 2, 3]]), targets=targets)


def test_sinusoidal_positions_work_in_every_forward_path():
    """Ragged batches call `pos_emb(positions)` with per-row (B, T) positions: the table serves them too."""
    model = make_model("gpt2", pos="sinusoidal")
    prompts = [torch.tensor([3, 4, 5, 6, 7]), torch.tensor([8, 9])]
    batch = kvlab.generate_batch(model, prompts, 6, temperature=0)
    for p, out in zip(prompts, batch):
        assert torch.equal(out, kvlab.generate(model, p[None], 6, temperature=0)[0])
