"""`python -m kvlab.train`: tokenizers, config overrides, epochs, the seeds' presets, TensorBoard."""

import sys

import pytest
import torch

import kvlab
import kvlab.data
from kvlab.gpt import GPTConfig
from kvlab.train import PRESET_TOKENIZERS, TRAIN_PRESETS, TrainConfig, load_checkpoint, train
from kvlab.train.cli import main
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


# -- issue 26: run folders, resuming, usage errors before the corpus is read --------------------------


def run_module(*args, cwd):
    """`python -m kvlab.train` in a subprocess whose corpus cannot be read: any error must come first."""
    import os
    import subprocess

    env = {**os.environ, "KVLAB_SHAKESPEARE": str(cwd / "no-corpus-here.txt")}
    result = subprocess.run([sys.executable, "-m", "kvlab.train", *args], capture_output=True, text=True, env=env,
                            cwd=cwd, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    assert "no-corpus-here" not in result.stderr  # refused before the corpus was looked for
    return result


@pytest.fixture
def run_folder(tmp_path):
    """A run folder holding the checkpoint of a 2-step SMALL run."""
    out = tmp_path / "run"
    assert main(SMALL + ["--max-steps", "4", "--stop-after", "2", "--out", str(out)]) == 0
    return out


def test_a_second_run_does_not_overwrite_a_checkpoint(run_folder, tmp_path):
    result = run_module(*SMALL, "--out", str(run_folder), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{run_folder}/checkpoint.safetensors already holds a checkpoint at step 2 of 4" in result.stderr
    assert "--resume" in result.stderr and "--overwrite" in result.stderr
    assert load_checkpoint(run_folder / "checkpoint.safetensors")["step"] == 2


def test_resume_says_from_which_step_and_overwrite_starts_again(run_folder, capsys):
    capsys.readouterr()
    assert main(SMALL + ["--max-steps", "4", "--out", str(run_folder), "--resume"]) == 0
    assert f"resuming {run_folder}/checkpoint.safetensors from step 2" in capsys.readouterr().out
    assert load_checkpoint(run_folder / "checkpoint.safetensors")["step"] == 4
    assert main(SMALL + ["--max-steps", "1", "--out", str(run_folder), "--overwrite"]) == 0
    assert "(replacing the one there)" in capsys.readouterr().out
    assert load_checkpoint(run_folder / "checkpoint.safetensors")["step"] == 1


def test_resume_keeps_the_runs_tokenizer(tmp_path, capsys):
    out = tmp_path / "bpe"
    bpe = SMALL + ["--tokenizer", "bpe", "--vocab-size", "280", "--max-steps", "2", "--out", str(out)]
    assert main(bpe + ["--stop-after", "1"]) == 0
    stored = tokenizer_from_state(load_checkpoint(out / "checkpoint.safetensors")["extra"]["tokenizer"])

    def no_training(*_, **__):
        raise AssertionError("a resumed run trained a new tokenizer")

    import kvlab.tokenizers

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(kvlab.tokenizers.BPETokenizer, "train", no_training)
    try:
        assert main(bpe + ["--resume"]) == 0
    finally:
        monkeypatch.undo()
    again = tokenizer_from_state(load_checkpoint(out / "checkpoint.safetensors")["extra"]["tokenizer"])
    assert again.tokenizer.to_str() == stored.tokenizer.to_str()


@pytest.mark.parametrize("extra, message", [
    (["--resume", "--out", "nowhere"], "--resume: no checkpoint at nowhere/checkpoint.safetensors"),
    (["--resume", "--d-model", "64", "--n-heads", "4"], "--d-model 32 there, 64 here"),
    (["--resume", "--tokenizer", "bpe"], "--tokenizer char there, bpe here"),
    (["--resume", "--overwrite"], "not allowed with argument"),
])
def test_resume_problems_are_usage_errors_before_the_corpus(run_folder, tmp_path, extra, message):
    args = list(SMALL) + (["--out", str(run_folder)] if "--out" not in extra else []) + extra
    result = run_module(*args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr


def test_devices_and_precisions_this_machine_lacks_are_usage_errors(tmp_path):
    if not torch.backends.mps.is_available():
        result = run_module(*SMALL, "--device", "mps", "--out", str(tmp_path / "a"), cwd=tmp_path)
        assert result.returncode == 2 and "--device mps: this machine has no MPS" in result.stderr
    if not torch.cuda.is_available():
        result = run_module(*SMALL, "--precision", "fp16", "--out", str(tmp_path / "b"), cwd=tmp_path)
        assert result.returncode == 2 and "--precision fp16 needs a CUDA GPU" in result.stderr
        assert "use --precision fp32 or bf16" in result.stderr


def test_d_ff_and_sinusoidal_positions_reach_the_model(tmp_path):
    out = tmp_path / "run"
    assert main(SMALL + ["--d-ff", "48", "--pos", "sinusoidal", "--max-steps", "2", "--out", str(out)]) == 0
    c = load_checkpoint(out / "checkpoint.safetensors")["model_config"]
    assert (c.d_ff, c.pos, c.mlp) == (48, "sinusoidal", "gelu")
    assert main(SMALL + ["--mlp", "swiglu", "--d-ff", "40", "--max-steps", "1", "--out", str(out), "--overwrite"]) == 0
    assert load_checkpoint(out / "checkpoint.safetensors")["model"].blocks[0].mlp.proj.in_features == 40


def test_min_frequency_and_more_vocabulary_than_the_text_yields(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(SMALL + ["--tokenizer", "bpe", "--vocab-size", "5000", "--min-frequency", "1", "--max-steps", "1",
                         "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("BPE:")]
    vocab = load_checkpoint(out / "checkpoint.safetensors")["model_config"].vocab_size
    assert lines == [f"BPE: asked for 5000 tokens; the training text yields {vocab} with --min-frequency 1; "
                     f"the model uses {vocab}"]
    assert main(SMALL + ["--tokenizer", "bpe", "--vocab-size", "5000", "--max-steps", "1", "--out", str(out),
                         "--overwrite"]) == 0
    fewer = load_checkpoint(out / "checkpoint.safetensors")["model_config"].vocab_size
    assert fewer <= vocab and "(a lower --min-frequency gives more)" in capsys.readouterr().out


def test_min_frequency_is_for_bpe(capsys, monkeypatch):
    monkeypatch.setattr(kvlab.data, "load_shakespeare_text", lambda *_, **__: pytest.fail("read the text"))
    with pytest.raises(SystemExit):
        main(SMALL + ["--min-frequency", "3"])
    assert "--min-frequency is for --tokenizer bpe" in capsys.readouterr().err
