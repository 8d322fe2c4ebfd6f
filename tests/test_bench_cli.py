"""`python -m kvlab.bench` as its users type it: every --model generate takes, the shape presets of
GPTConfig and of kvlab.train, train's shape flags, --serving on a small model, --speedup-table
--plot, and usage errors (exit 2, the flag named) before any model is built or clock started."""

import json
import os
import shlex
import subprocess
import sys

import pytest
import torch

import kvlab
from kvlab.bench.cli import main
from kvlab.bench import fit_ranges, serving_bench
from kvlab.tokenizers import tokenizer_state
from kvlab.train import save_checkpoint


def run_module(*args, cwd):
    result = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "kvlab.bench", *args],
                            capture_output=True, text=True, cwd=cwd, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """runs/quick as `python -m kvlab.train --preset quick` leaves it, with a smaller model."""
    folder = tmp_path_factory.mktemp("runs") / "quick"
    tok = kvlab.CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ")
    torch.manual_seed(0)
    model = kvlab.GPT(kvlab.GPTConfig(vocab_size=tok.vocab_size, max_seq_len=48, d_model=16, n_layers=1, n_heads=2))
    save_checkpoint(folder / "checkpoint.safetensors", model, extra={"tokenizer": tokenizer_state(tok)})
    return folder


def test_the_issues_serving_command_on_the_tiny_shape(tmp_path):
    result = run_module("--serving", "--model", "tiny", "--serving-batch-sizes", "1,2", "--serving-new-tokens", "8",
                        "--plot", "s.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["prefix"]["prefix_len"] == 224  # the tiny shape's 256 positions, less 16 + 4, in whole blocks
    assert record["prefix"]["tokens_equal"] and record["targets"]["prefix_shared_over_unshared"] == 1 / 16
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert shlex.split(record["command"])[3:] == ["--serving", "--model", "tiny", "--serving-batch-sizes", "1,2",
                                                  "--serving-new-tokens", "8", "--plot", "s.png"]


def test_serving_on_a_short_context_skips_the_prefix_and_fits_the_engine(tmp_path):
    torch.manual_seed(0)
    model = kvlab.GPT(kvlab.GPTConfig(vocab_size=50, max_seq_len=32, d_model=16, n_layers=1, n_heads=2)).eval()
    result = serving_bench(model, batch_sizes=(1,), prompt_len=4, new_tokens=2, n_requests=4, max_batch_size=2,
                           progress=lambda _: None)
    assert result["prefix"]["prefix_ratio"] is None and "skipped" in result["prefix"]["skipped"]
    assert result["targets"]["prefix_shared_over_unshared"] is None
    assert result["engine"]["prompt_range"] == [16, 16] and result["engine"]["new_range"] == [16, 16]
    assert result["engine"]["paged"]["tokens_equal"] == 1.0
    from kvlab.bench import plot_serving

    plot_serving(result).savefig(tmp_path / "s.png")
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=32"):
        serving_bench(model, prompt_len=30, new_tokens=4)


def test_fit_ranges():
    assert fit_ranges(1024) == ((16, 64), (16, 64))
    assert fit_ranges(64) == ((16, 32), (16, 32))
    assert fit_ranges(20) == ((10, 10), (10, 10))
    with pytest.raises(ValueError, match=">= 2"):
        fit_ranges(1)


def test_a_training_checkpoint_and_its_run_folder_are_models(run_folder, tmp_path):
    result = run_module("--speedup-table", "--model", str(run_folder / "checkpoint.safetensors"), "--lengths", "4,8",
                        "--prompt-lens", "4", "--repeats", "1", "--plot", "speedup.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    table = json.loads((tmp_path / "bench.json").read_text())
    assert table["model"]["d_model"] == 16 and [r["new_tokens"] for r in table["rows"]] == [4, 8]
    assert (tmp_path / "speedup.png").stat().st_size > 1000
    out = tmp_path / "folder.json"
    assert main(["--model", str(run_folder), "--new-tokens", "3", "--prompt-lens", "2", "--repeats", "1",
                 "--warmup", "0", "--cache", "on", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["model"]["max_seq_len"] == 48


@pytest.mark.parametrize("name, shape", [
    ("shakespeare", dict(d_model=256, pos="rope", vocab_size=65)),
    ("shakespeare-bpe", dict(d_model=256, vocab_size=1024)),
    ("quick", dict(d_model=64, n_layers=2, vocab_size=65)),
    ("tiny-modern", dict(norm="rmsnorm", n_kv_heads=2)),
])
def test_shipped_names_and_presets_are_models(name, shape, tmp_path):
    out = tmp_path / "t.json"
    assert main(["--speedup-table", "--model", name, "--lengths", "2", "--prompt-lens", "2", "--repeats", "1",
                 "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert {k: table["model"][k] for k in shape} == shape and table["model_name"] == name


def test_a_training_preset_with_trains_shape_flags(tmp_path):
    out = tmp_path / "t.json"
    assert main(["--model", "bpe-6x384", "--d-model", "32", "--n-heads", "2", "--n-layers", "1", "--d-ff", "40",
                 "--pos", "sinusoidal", "--max-seq-len", "16", "--new-tokens", "3", "--prompt-lens", "2",
                 "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0
    model = json.loads(out.read_text())["model"]
    assert (model["vocab_size"], model["d_model"], model["d_ff"], model["pos"], model["dropout"]) == \
        (1024, 32, 40, "sinusoidal", 0.2)


@pytest.mark.parametrize("args, message", [
    (["--speedup-table", "--model", "bpe-6x384", "--lengths", "300"],
     "--prompt-lens 32 + the longest of --lengths 300 = 332 positions exceeds the model's context of 256: lower "
     "them, or pass --max-seq-len 332"),
    (["--speedup-table", "--model", "shakespeare", "--lengths", "300"],
     "exceeds the model's context of 128: lower them (a trained model's context is fixed by its weights)"),
    (["--model", "shakespeare", "--d-model", "64"], "--d-model: --model shakespeare is a trained model"),
    (["--model", "no/such/model"], "--model 'no/such/model': no such model or file"),
    (["--model", "tiny-modern", "--hf"], "--hf compares with Hugging Face's GPT-2"),
    (["--serving", "--model", "quick"], "--prompt-lens 32 + --serving-new-tokens 64 = 96 positions exceeds"),
    (["--serving", "--hf", "--model", "tiny-modern"], "--hf compares with Hugging Face's GPT-2"),
    (["--serving", "--hf", "--model", "tiny"], "or its shared prompt (256 + 16 own tokens + 4 new) = 276 positions "
                                               "exceeds the model's context of 256"),
    (["--serving", "--hf", "--model", "tiny", "--max-seq-len", "300", "--plot", "s.png"],
     "--serving --hf writes a JSON record only"),
    (["--out", "no/such/folder/b.json"], "--out no/such/folder/b.json: the folder no/such/folder does not exist"),
    (["--plot", "b.xyz"], "--plot b.xyz: matplotlib cannot write .xyz files"),
    (["--beyond", "--model", "tiny"], "--beyond measures the shipped Shakespeare models"),
    (["--frontier", "--model", "tiny"], "--frontier measures chapter 11's model family (kvlab.load_cache_family); "
                                        "leave out --model and the shape flags"),
    (["--frontier", "--d-model", "64"], "--frontier measures chapter 11's model family"),
    (["--frontier", "--beyond"], "--frontier and --beyond are separate runs; choose one"),
    (["--frontier", "--hf", "--dtype", "bfloat16"], "--hf, --dtype bfloat16: --frontier measures float32 caches on "
                                                    "the CPU"),
    (["--frontier", "--frontier-family", "no/such/dir"], "--frontier-family no/such/dir: no exported mha, gqa, mqa, "
                                                         "mla there"),
    (["--frontier", "--frontier-windows", "1000"], "--frontier-windows 1000: 1000 windows of 128 need 128000 "
                                                   "characters; the validation split has 111540"),
    (["--frontier", "--frontier-long-windows", "0"],
     "argument --frontier-long-windows: expected a positive integer, got '0'"),
    (["--frontier", "--plot", "f.xyz"], "--plot f.xyz: matplotlib cannot write .xyz files"),
    (["--model", "tiny", "--n_layers", "3"], "--n_layers (did you mean --n-layers?)"),
])
def test_usage_errors_come_before_any_model_is_built(args, message, capsys, monkeypatch):
    def no_model(*_, **__):
        raise AssertionError("a model was built before the flags were checked")

    monkeypatch.setattr("kvlab.bench.cli._model", no_model)
    monkeypatch.setattr("kvlab.pretrained.load_cache_family", no_model)  # --frontier's models
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert message in " ".join(capsys.readouterr().err.split())


def test_usage_errors_through_the_command(tmp_path):
    result = run_module("--speedup-table", "--model", "runs/quick/checkpoint.safetensors", cwd=tmp_path)
    assert result.returncode == 2 and "--model 'runs/quick/checkpoint.safetensors': no such model" in result.stderr
    result = run_module("--model", "quick", "--lengths", "4,x", cwd=tmp_path)
    assert result.returncode == 2 and "--lengths" in result.stderr
