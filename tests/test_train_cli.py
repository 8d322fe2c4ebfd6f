"""`python -m kvlab.train`: tokenizers, config overrides, epochs, the seeds' presets, TensorBoard."""

import sys

import pytest
import torch

import kvlab
import kvlab.data
from kvlab.gpt import GPTConfig
from kvlab.train import PRESET_TOKENIZERS, TRAIN_PRESETS, TrainConfig, load_checkpoint, main, train
from kvlab.tokenizers import BPETokenizer, CharTokenizer, tokenizer_from_state

LINES = ["ROMEO: But soft, what light through yonder window breaks?",
         "JULIET: O Romeo, Romeo, wherefore art thou Romeo?",
         "HAMLET: To be, or not to be, that is the question.",
         "MACBETH: Tomorrow, and tomorrow, and tomorrow, creeps in this petty pace."]
TEXT = "\n".join(LINES[i % 4] for i in range(400)) + "\n"  # about 23,000 characters

SMALL = ["--preset", "quick", "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--max-seq-len", "32",
         "--batch-size", "4", "--no-progress"]


@pytest.fixture(autouse=True)
def small_corpus(monkeypatch):
    monkeypatch.setattr(kvlab.data, "load_shakespeare_text", lambda path=None, **_: TEXT)


def test_char_run_with_overrides_and_epochs(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(SMALL + ["--norm", "rmsnorm", "--mlp", "swiglu", "--pos", "rope", "--dropout", "0.0",
                         "--epochs", "0.05", "--out", str(out)]) == 0
    ckpt = load_checkpoint(out / "checkpoint.safetensors")
    c = ckpt["model_config"]
    assert (c.d_model, c.n_layers, c.n_heads, c.max_seq_len, c.norm, c.mlp, c.pos, c.dropout) == \
        (32, 1, 2, 32, "rmsnorm", "swiglu", "rope", 0.0)
    train_tokens = len(kvlab.data.train_val_split(TEXT)[0])
    expected_steps = -(-int(0.05 * train_tokens) // (4 * 32))  # ceil(epochs * tokens / tokens per step)
    assert ckpt["step"] == ckpt["train_config"].max_steps == expected_steps
    assert ckpt["train_config"].block_size == 32  # the window follows --max-seq-len
    tok = tokenizer_from_state(ckpt["extra"]["tokenizer"])
    assert isinstance(tok, CharTokenizer) and tok.vocab_size == c.vocab_size
    assert "0.05 epochs" in capsys.readouterr().out


def test_bpe_run_exports_a_model_that_loads(tmp_path):
    out, export = tmp_path / "run", tmp_path / "export"
    assert main(SMALL + ["--tokenizer", "bpe", "--vocab-size", "300", "--max-steps", "3", "--out", str(out),
                         "--export", str(export)]) == 0
    model, tok = kvlab.load_shakespeare(export)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == model.config.vocab_size <= 300
    assert model.record["tokenizer"] == "bpe" and "val_nats_per_token" in model.record
    ckpt = load_checkpoint(out / "checkpoint.safetensors")
    again = tokenizer_from_state(ckpt["extra"]["tokenizer"])
    assert again.encode(LINES[0]) == tok.encode(LINES[0])


@pytest.mark.parametrize("preset, shape", [
    ("bpe-6x384", dict(d_model=384, n_heads=6, n_layers=6, max_seq_len=256, dropout=0.2)),
    ("modern-12x768", dict(d_model=768, n_heads=12, n_layers=12, norm="rmsnorm", mlp="swiglu")),
])
def test_the_seeds_presets(preset, shape):
    model_kwargs, train_kwargs = TRAIN_PRESETS[preset]
    config = GPTConfig(**model_kwargs)
    assert {k: getattr(config, k) for k in shape} == shape
    assert PRESET_TOKENIZERS[preset][0] == "bpe"
    assert TrainConfig(**train_kwargs).block_size <= config.max_seq_len


@pytest.mark.parametrize("extra, message", [
    (["--vocab-size", "500"], "--tokenizer bpe"),
    (["--tokenizer", "bpe", "--vocab-size", "100"], ">= 256"),
    (["--epochs", "1", "--max-steps", "3"], "not allowed with"),
    (["--d-model", "30", "--n-heads", "4"], "model configuration"),
    (["--block-size", "64"], "exceeds the context"),
    (["--epochs", "0"], "positive"),
])
def test_bad_settings_are_refused_before_any_work(extra, message, capsys, monkeypatch):
    def no_text(*_, **__):
        raise AssertionError("the text was read before the settings were checked")

    monkeypatch.setattr(kvlab.data, "load_shakespeare_text", no_text)
    with pytest.raises(SystemExit):
        main(SMALL + extra)
    assert message in capsys.readouterr().err


def test_tensorboard_without_the_package_says_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    with pytest.raises(SystemExit):
        main(SMALL + ["--max-steps", "1", "--tensorboard", "--out", str(tmp_path)])
    assert "pip install tensorboard" in capsys.readouterr().err
    model = kvlab.GPT(GPTConfig(vocab_size=20, max_seq_len=16, d_model=16, n_layers=1, n_heads=2))
    ids = torch.arange(200) % 20
    with pytest.raises(ImportError, match="pip install tensorboard"):
        train(model, ids, ids, TrainConfig(max_steps=1, batch_size=2, block_size=8, progress=False,
                                           tensorboard=True), out_dir=tmp_path)


def test_tensorboard_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard", reason="CI installs tensorboard (requirements-dev.txt)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = kvlab.GPT(GPTConfig(vocab_size=20, max_seq_len=16, d_model=16, n_layers=1, n_heads=2))
    ids = torch.arange(400) % 20
    train(model, ids, ids, TrainConfig(max_steps=4, batch_size=2, block_size=8, eval_interval=2, eval_batches=1,
                                       warmup_steps=1, progress=False, tensorboard=True), out_dir=tmp_path)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss/train")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("loss/val")] == [2, 4]
    with pytest.raises(ValueError, match="needs out_dir"):
        train(model, ids, ids, TrainConfig(max_steps=1, batch_size=2, block_size=8, progress=False, tensorboard=True))
