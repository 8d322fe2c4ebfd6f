"""Every file kvlab reads fails loudly when damaged: a ValueError naming the file and what is wrong,
raised before anything (a model's weights, an optimizer) has been modified."""

import json
import os
import pathlib

import pytest
import torch
from safetensors.torch import load_file, save_file

import kvlab
from kvlab.files import read_json, read_safetensors
from kvlab.pretrained import load_shakespeare
from kvlab.tokenizers import BPETokenizer, CharTokenizer, load_tokenizer, tokenizer_from_state, tokenizer_state
from kvlab.train import TrainConfig, configure_optimizer, export_model, load_checkpoint, save_checkpoint
from conftest import make_model

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 4


def tiny_model(vocab_size=97):
    return make_model("gpt2", vocab_size=vocab_size)


@pytest.fixture
def checkpoint(tmp_path):
    model = tiny_model()
    opt = configure_optimizer(model, TrainConfig())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    return save_checkpoint(tmp_path / "ckpt.safetensors", model, opt, step=3, extra={"note": "x"})


@pytest.fixture
def export_dir(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    return export_model(tmp_path / "export", tiny_model(tok.vocab_size), tok, {"note": "test"})


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} was modified by a failed load"


def rewrite_tensor(path, key, change):
    """Rewrite a safetensors file with one tensor changed, keeping its metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[key] = change(tensors[key]).contiguous()
    save_file(tensors, str(path), metadata=metadata)


# -- checkpoints -------------------------------------------------------------------------------


def test_checkpoint_round_trip_still_works(checkpoint):
    assert load_checkpoint(checkpoint)["step"] == 3


@pytest.mark.parametrize("keep", [0, 5, 100, -1000])
def test_truncated_checkpoint(checkpoint, keep):
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match="truncated") as err:
        load_checkpoint(checkpoint, model)
    assert str(checkpoint) in str(err.value)
    assert_unchanged(model, before)


def test_random_bytes_checkpoint(checkpoint):
    checkpoint.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="not a safetensors file") as err:
        load_checkpoint(checkpoint)
    assert str(checkpoint) in str(err.value)


def test_text_file_as_checkpoint(checkpoint):
    checkpoint.write_text("this is not a checkpoint\n" * 10)
    with pytest.raises(ValueError, match=f"{checkpoint}.*not a safetensors file"):
        load_checkpoint(checkpoint)


def test_safetensors_without_kvlab_metadata(checkpoint):
    save_file({"w": torch.zeros(2)}, str(checkpoint))
    with pytest.raises(ValueError, match=f"{checkpoint} is not a kvlab checkpoint"):
        load_checkpoint(checkpoint)


def test_tensor_cut_by_one_row(checkpoint):
    rewrite_tensor(checkpoint, "model.blocks.0.attn.qkv.weight", lambda t: t[:-1])
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        load_checkpoint(checkpoint, model)
    msg = str(err.value)
    assert str(checkpoint) in msg
    assert "model.blocks.0.attn.qkv.weight: expected (96, 32), got (95, 32)" in msg
    assert_unchanged(model, before)


def test_missing_tensor(checkpoint):
    tensors = load_file(str(checkpoint))
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as f:
        metadata = f.metadata()
    del tensors["model.norm_f.bias"]
    save_file(tensors, str(checkpoint), metadata=metadata)
    with pytest.raises(ValueError, match=r"missing tensors \(1\): model\.norm_f\.bias"):
        load_checkpoint(checkpoint)


def test_damaged_metadata(checkpoint):
    tensors = load_file(str(checkpoint))
    save_file(tensors, str(checkpoint), metadata={"kvlab": '{"format": "kvlab-checkpoint-1", "step": '})
    with pytest.raises(ValueError, match=f"{checkpoint}.*metadata is not JSON.*line 1, column"):
        load_checkpoint(checkpoint)
    save_file(tensors, str(checkpoint), metadata={"kvlab": json.dumps(
        {"format": "kvlab-checkpoint-1", "step": 1, "model_config": {"d_model": -3}})})
    with pytest.raises(ValueError, match=f"{checkpoint}.*configuration is damaged"):
        load_checkpoint(checkpoint)


def test_optimizer_moment_of_the_wrong_shape_is_caught_before_loading(checkpoint):
    rewrite_tensor(checkpoint, "optim.0.exp_avg", lambda t: t[:-1])
    model = tiny_model()
    opt = configure_optimizer(model, TrainConfig())
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"{checkpoint}: optimizer tensor optim.0.exp_avg has the wrong shape"):
        load_checkpoint(checkpoint, model, opt)
    assert_unchanged(model, before)
    assert not opt.state  # the optimizer was not touched either


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nothing.safetensors")


# -- exported model folders (config.json, model.safetensors, tokenizer.json, record.json) ----------


def test_export_round_trip_still_works(export_dir):
    model, tok = load_shakespeare(export_dir)
    assert tok.decode(tok.encode("To be")) == "To be" and model.record == {"note": "test"}


def test_corrupt_model_safetensors(export_dir):
    path = export_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match=f"{path} is not a valid model weights file: truncated"):
        load_shakespeare(export_dir)
    path.write_bytes(os.urandom(len(data)))
    with pytest.raises(ValueError, match=f"{path} is not a valid model weights file: not a safetensors file"):
        load_shakespeare(export_dir)


def test_exported_tensor_of_the_wrong_shape(export_dir):
    path = export_dir / "model.safetensors"
    state = load_file(str(path))
    state["tok_emb.weight"] = state["tok_emb.weight"][:-1].contiguous()
    save_file(state, str(path))
    with pytest.raises(ValueError, match=rf"{path}.*tok_emb\.weight: expected \(\d+, 32\), got"):
        load_shakespeare(export_dir)


def test_config_json_not_json(export_dir):
    path = export_dir / "config.json"
    path.write_text('{"model": {"d_model": 32,\n  "n_heads": }')
    with pytest.raises(ValueError, match=f"{path} is not a valid model config.*invalid JSON at line 2, column 14"):
        load_shakespeare(export_dir)


def test_config_json_not_a_kvlab_config(export_dir):
    path = export_dir / "config.json"
    path.write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match=f"{path} is not a kvlab model config"):
        load_shakespeare(export_dir)
    path.write_text('{"model": {"d_model": 32, "n_heads": 5}, "tokenizer": "char"}')
    with pytest.raises(ValueError, match=f"{path}: its 'model' is not a valid GPTConfig"):
        load_shakespeare(export_dir)


def test_record_json_not_json(export_dir):
    path = export_dir / "record.json"
    path.write_bytes(b"\x00\xff\xfe binary")
    with pytest.raises(ValueError, match=f"{path} is not a valid model record.*not UTF-8"):
        load_shakespeare(export_dir)


def test_exported_tokenizer_not_json(export_dir):
    path = export_dir / "tokenizer.json"
    path.write_text("chars: abc")
    with pytest.raises(ValueError, match=f"{path} is not a valid CharTokenizer file: invalid JSON at line 1, column 1"):
        load_shakespeare(export_dir)


def test_exported_folder_missing_a_file(export_dir):
    (export_dir / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing tokenizer.json"):
        load_shakespeare(export_dir)


# -- tokenizer files ---------------------------------------------------------------------------


def test_bpe_tokenizer_not_json(tmp_path):
    path = tmp_path / "bpe.json"
    BPETokenizer.train(TEXT, vocab_size=270).save(path)
    path.write_text(path.read_text()[:200])  # cut off mid-file
    with pytest.raises(ValueError, match=f"{path} is not a valid tokenizer file: invalid JSON at line"):
        load_tokenizer("bpe", path)


def test_bpe_tokenizer_valid_json_but_not_a_tokenizer(tmp_path):
    path = tmp_path / "bpe.json"
    path.write_text('{"model": {"type": "NoSuchModel"}}')
    with pytest.raises(ValueError, match=f"{path} is not a valid tokenizers file"):
        BPETokenizer.load(path)


def test_char_tokenizer_damaged(tmp_path):
    path = tmp_path / "char.json"
    path.write_text('{"kind": "char", "chars": ["a", "bb"]}')
    with pytest.raises(ValueError, match=f"{path} is not a valid CharTokenizer file.*single-character"):
        CharTokenizer.load(path)
    path.write_text("")
    with pytest.raises(ValueError, match=f"{path} is not a valid CharTokenizer file.*the file is empty"):
        CharTokenizer.load(path)


@pytest.mark.parametrize("make", [lambda: CharTokenizer.from_text(TEXT),
                                  lambda: BPETokenizer.train(TEXT, vocab_size=270)], ids=["char", "bpe"])
def test_tokenizer_state_round_trip_and_damage(make):
    tok = make()
    again = tokenizer_from_state(json.loads(json.dumps(tokenizer_state(tok))), "ckpt")
    assert again.encode(TEXT) == tok.encode(TEXT) and again.vocab_size == tok.vocab_size
    state = tokenizer_state(tok)
    state["json"] = state["json"][:50]
    with pytest.raises(ValueError, match="ckpt: its .* tokenizer is not valid JSON"):
        tokenizer_from_state(state, "ckpt")
    with pytest.raises(ValueError, match="ckpt holds no valid tokenizer"):
        tokenizer_from_state("char", "ckpt")


# -- the readers themselves ----------------------------------------------------------------------


def test_readers_name_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no config file at {tmp_path / 'x.json'}"):
        read_json(tmp_path / "x.json", "config file")
    with pytest.raises(FileNotFoundError, match="no weights at"):
        read_safetensors(tmp_path / "x.safetensors", "weights")


def test_benchmark_record_not_json(tmp_path, monkeypatch):
    import kvlab.bench
    import kvlab.data

    bad = tmp_path / "data" / "bench" / "broken.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"results": [}')
    monkeypatch.setattr(kvlab.data, "repo_file", lambda rel, **_: tmp_path / rel)
    with pytest.raises(ValueError, match=f"{bad} is not a valid benchmark record.*line 1, column 14"):
        kvlab.bench.load_recorded("broken")


def test_shipped_files_still_load():
    root = pathlib.Path(kvlab.__file__).resolve().parent.parent
    if not (root / "data" / "shakespeare" / "model.safetensors").is_file():
        pytest.skip("no checkout data")
    model, tok = load_shakespeare()
    assert model.config.vocab_size == tok.vocab_size
