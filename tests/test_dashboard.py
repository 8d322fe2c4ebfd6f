"""python -m kvlab.dashboard: the KV dashboard GIF for a chosen model, prompt, layer, head and cache."""

import subprocess
import sys

import pytest
import torch
from PIL import Image

import kvlab
from kvlab.dashboard import main
from kvlab.viz import kv_dashboard_frames


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tok = kvlab.CharTokenizer.from_text("abcdefgh ")
    torch.manual_seed(0)
    model = kvlab.GPT(kvlab.GPTConfig(vocab_size=tok.vocab_size, max_seq_len=24, d_model=16, n_layers=2, n_heads=2,
                                      pos="rope"))
    kvlab.train.export_model(folder, model, tok, {})
    return folder, model.eval(), tok


@pytest.mark.parametrize("kind, extra, rows", [("static", [], 10), ("dynamic", [], 10),
                                               ("sliding", ["--window", "4"], 4)])
def test_writes_one_frame_per_step(exported, tmp_path, capsys, kind, extra, rows):
    folder, model, tok = exported
    out = tmp_path / "kv.gif"
    assert main(["--model", str(folder), "--prompt", "abc", "--layer", "1", "--head", "1", "--kind", kind,
                 "--steps", "7", "--out", str(out)] + extra) == 0
    assert Image.open(out).n_frames == 7
    expected = kvlab.generate(model, torch.tensor([tok.encode("abc")]), 7, temperature=0)
    assert capsys.readouterr().out.strip("\n") == tok.decode(expected[0].tolist())
    frames = kv_dashboard_frames(model, torch.tensor([tok.encode("abc")]), 7, layer=1, head=1, kind=kind,
                                 window=4 if kind == "sliding" else None, cache_len=10 if kind == "static" else None)
    assert frames[-1]["k"].shape[0] == rows  # a static cache sized to prompt + steps, not to the whole context


def test_a_sliding_cache_goes_past_the_context(exported, tmp_path):
    folder, _, _ = exported
    out = tmp_path / "kv.gif"
    assert main(["--model", str(folder), "--prompt", "abc", "--kind", "sliding", "--window", "6", "--steps", "30",
                 "--out", str(out)]) == 0
    assert Image.open(out).n_frames == 30


@pytest.mark.parametrize("flags, message", [
    (["--layer", "2"], "--layer must be in [0, 1]"),
    (["--head", "5"], "--head in [0, 1]"),
    (["--kind", "sliding"], "needs --window"),
    (["--window", "4"], "--window is for --kind sliding"),
    (["--steps", "30"], "context is 24"),
    (["--out", "kv.png"], ".gif"),
    (["--model", "nowhere"], "--model 'nowhere': no such model"),
])
def test_bad_flags(exported, tmp_path, capsys, flags, message):
    folder, _, _ = exported
    with pytest.raises(SystemExit):
        main(["--model", str(folder), "--prompt", "abc", "--out", str(tmp_path / "kv.gif")] + flags)
    assert message in capsys.readouterr().err


def test_cache_len_is_checked(exported):
    _, model, _ = exported
    with pytest.raises(ValueError, match="cache_len must be"):
        kv_dashboard_frames(model, torch.zeros(1, 3, dtype=torch.long), 5, cache_len=6)
    with pytest.raises(ValueError, match="kind='static' only"):
        kv_dashboard_frames(model, torch.zeros(1, 3, dtype=torch.long), 5, kind="dynamic", cache_len=10)


def test_runs_as_a_module(exported, tmp_path):
    folder, _, _ = exported
    out = tmp_path / "kv.gif"
    result = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "kvlab.dashboard", "--model",
                             str(folder), "--prompt", "ab", "--steps", "2", "--out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 1000
