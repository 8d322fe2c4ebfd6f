"""python -m kvlab.generate: text out, timings reported, bad flags rejected by argparse."""

import subprocess
import sys

import pytest
import torch

import kvlab
from kvlab.generate.__main__ import main


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tok = kvlab.CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ:.,\n")
    torch.manual_seed(0)
    model = kvlab.GPT(kvlab.GPTConfig(vocab_size=tok.vocab_size, max_seq_len=64, d_model=32, n_layers=2, n_heads=4))
    kvlab.train.export_model(folder, model, tok, {"note": "random weights, for tests"})
    return folder, model, tok


def test_prints_the_text_and_the_timings(exported, capsys):
    folder, model, tok = exported
    assert main(["--prompt", "ROMEO:", "--model", str(folder), "--max-new-tokens", "20", "--seed", "4",
                 "--temperature", "0.8", "--top-k", "10"]) == 0
    captured = capsys.readouterr()
    expected = kvlab.generate(model, torch.tensor([tok.encode("ROMEO:")]), 20, temperature=0.8, top_k=10,
                              generator=torch.Generator().manual_seed(4))
    assert captured.out.strip("\n") == tok.decode(expected[0].tolist()).strip("\n")
    assert "prefill" in captured.err and "tokens/s" in captured.err and "20 new tokens" in captured.err


def test_no_cache_gives_the_same_text(exported, capsys):
    folder, _, _ = exported
    main(["--prompt", "ab", "--model", str(folder), "--max-new-tokens", "15", "--temperature", "0"])
    cached = capsys.readouterr().out
    main(["--prompt", "ab", "--model", str(folder), "--max-new-tokens", "15", "--temperature", "0", "--no-cache"])
    assert capsys.readouterr().out == cached


def test_stops_at_the_context(exported, capsys):
    folder, _, _ = exported
    main(["--prompt", "abc", "--model", str(folder), "--max-new-tokens", "500", "--temperature", "0"])
    assert "stopped at the model's context of 64" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "temperature"),
    (["--temperature", "nan"], "temperature"),
    (["--top-p", "0"], "top-p"),
    (["--top-p", "1.5"], "top-p"),
    (["--min-p", "2"], "min-p"),
    (["--top-k", "-2"], "top-k"),
    (["--max-new-tokens", "0"], "max-new-tokens"),
    (["--model", "gpt5"], "--model must be"),
])
def test_bad_flags_get_argparse_errors(exported, capsys, flags, message):
    folder, _, _ = exported
    base = ["--prompt", "ab", "--model", str(folder)]
    with pytest.raises(SystemExit) as exit_info:
        main(base + flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_runs_as_a_module_without_warnings(exported):
    folder, _, _ = exported
    result = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "kvlab.generate", "--prompt", "ab",
                             "--model", str(folder), "--max-new-tokens", "5"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ab")
