"""The Shakespeare models shipped in data/shakespeare (characters) and data/shakespeare_bpe (the
same shape on BPE-1,024 ids): they load, write text, and their records are reproducible."""

import os

import pytest
import torch

import kvlab
from kvlab.pretrained import load_shakespeare, shakespeare_model_dir
from kvlab.train import evaluate_split

KINDS = ["char", "bpe"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_files_are_there_and_small(kind):
    folder = shakespeare_model_dir(tokenizer=kind)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["config.json", "model.safetensors", "record.json", "tokenizer.json"]
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert total <= 15 * 2**20, f"the shipped {kind} model takes {total / 2**20:.1f} MB; the budget is 15 MB"


@pytest.mark.parametrize("kind", KINDS)
def test_it_loads_with_its_record_and_writes_text(kind):
    model, tok = load_shakespeare(tokenizer=kind)
    record = model.record
    loss_keys = ("train_nats_per_char", "val_nats_per_char") if kind == "char" else \
        ("train_nats_per_token", "val_nats_per_token", "train_nats_per_char_approx", "val_nats_per_char_approx")
    for key in ("parameters", "tokens_seen", "wall_time_s", "hardware", *loss_keys):
        assert key in record, key
    assert record["parameters"] == model.num_params()
    assert tok.vocab_size == model.config.vocab_size == (65 if kind == "char" else 1024)
    prompt = tok.encode("ROMEO:\n")
    new = 300 if kind == "char" else 160  # about 300 characters, past max_seq_len: RoPE + a sliding window
    assert new > model.config.max_seq_len
    out = kvlab.generate(model, torch.tensor([prompt]), new, temperature=0.8,
                         generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, len(prompt) + new)
    text = tok.decode(out[0].tolist())
    assert text.startswith("ROMEO:\n")
    words = text.split()
    assert sum(w.strip(".,;:!?'").lower() in {"the", "and", "i", "to", "of", "my", "you", "a"} for w in words) >= 5


def test_the_two_models_have_the_same_shape_but_the_vocabulary():
    char, _ = load_shakespeare()
    bpe, _ = load_shakespeare(tokenizer="bpe")
    differ = {k for k, v in char.config.to_dict().items() if bpe.config.to_dict()[k] != v}
    assert differ == {"vocab_size"}


@pytest.mark.parametrize("bad", ["BPE", "gpt2", None, 1])
def test_an_unknown_tokenizer_is_refused_before_any_work(bad):
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        load_shakespeare(tokenizer=bad)


@pytest.mark.skipif(not os.environ.get("KVLAB_SHAKESPEARE"),
                    reason="set KVLAB_SHAKESPEARE to a local Tiny Shakespeare (CI does) to recompute the loss")
@pytest.mark.parametrize("kind", KINDS)
def test_the_recorded_val_loss_is_reproduced(kind):
    model, tok = load_shakespeare(tokenizer=kind)
    text = kvlab.data.load_shakespeare_text()
    _, val_text = kvlab.data.train_val_split(text)
    val = torch.tensor(tok.encode(val_text))
    block = model.record["train_config"]["block_size"]
    loss = evaluate_split(model, val, block)
    if kind == "char":
        assert abs(loss - model.record["val_nats_per_char"]) <= 0.02, (loss, model.record["val_nats_per_char"])
    else:
        assert abs(loss - model.record["val_nats_per_token"]) <= 0.02, (loss, model.record["val_nats_per_token"])
        per_char = loss * len(val) / len(val_text)
        assert abs(per_char - model.record["val_nats_per_char_approx"]) <= 0.01
