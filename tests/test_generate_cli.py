"""python -m kvlab.generate: text out, timings reported, bad flags rejected by argparse."""

import subprocess
import sys

import pytest
import torch

import kvlab
from kvlab.generation.cli import main


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
    (["--model", "gpt5"], "--model 'gpt5': no such model"),
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


# -- streaming, checkpoints, sliding past the context ------------------------------------------


def test_no_stream_prints_the_same_text_and_decode_time(exported, capsys):
    folder, _, _ = exported
    flags = ["--prompt", "ROMEO:", "--model", str(folder), "--max-new-tokens", "12", "--seed", "2"]
    main(flags)
    streamed = capsys.readouterr()
    main(flags + ["--no-stream"])
    plain = capsys.readouterr()
    assert streamed.out.strip("\n") == plain.out.strip("\n")
    assert "decode" in plain.err and "for 11 tokens" in plain.err and "tokens/s" in plain.err


def test_tokens_are_streamed_one_at_a_time(exported):
    import io

    from kvlab.generation.cli import TextStream, stream_generate

    _, model, tok = exported
    idx = torch.tensor([tok.encode("ab")])
    sink = io.StringIO()
    stream = TextStream(tok, idx[0].tolist(), out=sink)
    stream.flush()
    seen = []

    def on_token(token_id):
        seen.append(sink.getvalue())  # what was printed before this token arrived
        stream.push(token_id)

    out, stats = stream_generate(model, idx, 10, on_token=on_token, temperature=0.9,
                                 generator=torch.Generator().manual_seed(5))
    expected = kvlab.generate(model, idx, 10, temperature=0.9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, expected)
    assert [len(s) for s in seen] == list(range(2, 12))  # one more character on screen per token
    assert sink.getvalue() == tok.decode(expected[0].tolist())
    assert stats["new_tokens"] == 10 and stats["prefill_s"] > 0 and stats["decode_s"] > 0


def test_a_token_ending_mid_character_is_held_back():
    import io

    from kvlab.generation.cli import TextStream

    tok = kvlab.GPT2Tokenizer()
    pieces = tok.encode("naïve café ☕")  # "☕" is three bytes, spread over two tokens
    assert tok.decode(pieces[-1:]) == "\ufffd"
    sink = io.StringIO()
    stream = TextStream(tok, [], out=sink)
    for i in pieces:
        stream.push(i)
        assert "\ufffd" not in sink.getvalue()
    stream.flush()
    assert sink.getvalue() == "naïve café ☕"


def test_a_training_checkpoint_is_a_model(tmp_path, capsys):
    from kvlab.tokenizers import tokenizer_state
    from kvlab.train import save_checkpoint

    tok = kvlab.CharTokenizer.from_text("abcdefgh ")
    torch.manual_seed(1)
    model = kvlab.GPT(kvlab.GPTConfig(vocab_size=tok.vocab_size, max_seq_len=32, d_model=16, n_layers=1,
                                      n_heads=2)).eval()
    path = save_checkpoint(tmp_path / "checkpoint.safetensors", model, extra={"tokenizer": tokenizer_state(tok)})
    expected = tok.decode(kvlab.generate(model, torch.tensor([tok.encode("abc")]), 8, temperature=0)[0].tolist())
    for where in (path, tmp_path):  # the file, or the run folder that holds it
        assert main(["--prompt", "abc", "--model", str(where), "--max-new-tokens", "8", "--temperature", "0"]) == 0
        assert capsys.readouterr().out.strip("\n") == expected
    old = save_checkpoint(tmp_path / "old.safetensors", model, extra={"tokenizer": "char"})
    with pytest.raises(SystemExit):
        main(["--prompt", "abc", "--model", str(old)])
    assert "does not store its tokenizer" in capsys.readouterr().err
    old.write_bytes(b"garbage")
    with pytest.raises(SystemExit):
        main(["--prompt", "abc", "--model", str(old)])
    assert f"{old} is not a valid kvlab checkpoint" in capsys.readouterr().err


def test_a_sliding_model_generates_past_its_context(tmp_path, capsys):
    tok = kvlab.CharTokenizer.from_text("abcdefgh ")
    torch.manual_seed(2)
    model = kvlab.GPT(kvlab.GPTConfig(vocab_size=tok.vocab_size, max_seq_len=16, d_model=16, n_layers=1,
                                      n_heads=2, pos="rope", window=8)).eval()
    kvlab.train.export_model(tmp_path, model, tok, {})
    expected = kvlab.generate(model, torch.tensor([tok.encode("abc")]), 40, temperature=0)
    for cache in ([], ["--no-cache"]):
        main(["--prompt", "abc", "--model", str(tmp_path), "--max-new-tokens", "40", "--temperature", "0"] + cache)
        captured = capsys.readouterr()
        assert captured.out.strip("\n") == tok.decode(expected[0].tolist())
        assert "40 new tokens" in captured.err and "went past the model's context of 16" in captured.err


# -- issue 26: every command as its user types it ---------------------------------------------------


def run_module(*args, stdin=None, env=None):
    import os

    result = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "kvlab.generate", *args],
                            capture_output=True, text=True, input=stdin, env={**os.environ, **(env or {})},
                            timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_the_shipped_bpe_model_has_a_name():
    result = run_module("--model", "shakespeare-bpe", "--prompt", "ROMEO:", "--max-new-tokens", "5",
                        "--temperature", "0")
    assert result.returncode == 0, result.stderr
    model, tok = kvlab.load_shakespeare(tokenizer="bpe")
    expected = kvlab.generate(model, torch.tensor([tok.encode("ROMEO:")]), 5, temperature=0)
    assert result.stdout.strip("\n") == tok.decode(expected[0].tolist()).strip("\n")


def test_seed_002s_flags_are_answered_with_kvlabs():
    result = run_module("--prompt", "ROMEO:", "--max_tokens", "100", "--top_k", "50", "--kvcaching")
    assert result.returncode == 2
    assert "--max_tokens (did you mean --max-new-tokens?)" in result.stderr
    assert "--top_k (did you mean --top-k?)" in result.stderr
    assert "--kvcaching (the KV cache is on by default; --no-cache turns it off)" in result.stderr


def test_the_prompt_from_a_file_or_stdin(exported, tmp_path, capsys):
    folder, _, _ = exported
    flags = ["--model", str(folder), "--max-new-tokens", "6", "--temperature", "0"]
    main(["--prompt", "ROMEO:\nab", *flags])
    expected = capsys.readouterr().out
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("ROMEO:\nab")
    main(["--prompt-file", str(prompt), *flags])
    assert capsys.readouterr().out == expected  # read as is, newline included
    piped = run_module("--prompt-file", "-", *flags, stdin="ROMEO:\nab")
    assert piped.returncode == 0 and piped.stdout == expected
    with pytest.raises(SystemExit):  # another tool's spelling: used as typed (here: characters the model lacks)
        main([f"--prompt=@{prompt}", *flags])
    err = capsys.readouterr().err
    assert f"to read the file: --prompt-file {prompt}" in err and "not in this CharTokenizer's vocabulary" in err


@pytest.mark.parametrize("flags, message", [
    (["--prompt-file", "no/such/prompt.txt"], "--prompt-file no/such/prompt.txt: no such file"),
    (["--prompt", "ab", "--prompt-file", "x"], "not allowed with argument --prompt"),
    (["--stop", ""], "--stop: must be a non-empty text"),
    (["--eos"], "--eos: this model's tokenizer (CharTokenizer) has no end-of-text token"),
])
def test_prompt_and_stop_flags_are_checked(exported, capsys, flags, message):
    folder, _, _ = exported
    base = ["--model", str(folder)] + ([] if "--prompt" in flags or "--prompt-file" in flags else ["--prompt", "ab"])
    with pytest.raises(SystemExit) as info:
        main(base + flags)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_an_empty_prompt_file_is_a_usage_error(exported, tmp_path):
    folder, _, _ = exported
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = run_module("--prompt-file", str(empty), "--model", str(folder))
    assert result.returncode == 2 and f"--prompt-file {empty}: the file is empty" in result.stderr


def test_stop_ends_the_text_before_the_stop_text(exported, capsys):
    folder, model, tok = exported
    flags = ["--prompt", "ab", "--model", str(folder), "--max-new-tokens", "40", "--temperature", "0"]
    main(flags)
    full = capsys.readouterr().out.strip("\n")
    generated = full[2:]
    stop = generated[10:12]  # two characters the greedy text produces
    cut = "ab" + generated[: generated.index(stop)]
    for extra in ([], ["--no-stream"]):
        main(flags + ["--stop", stop, "--stop", "@@never@@"] + extra)
        captured = capsys.readouterr()
        assert captured.out.strip("\n") == cut.strip("\n")
        assert f"(stopped at --stop {stop!r} after" in captured.err


def test_a_stop_text_split_over_tokens_is_held_back():
    import io

    from kvlab.generation.cli import TextStream

    tok = kvlab.CharTokenizer.from_text("abcdefXYZ")
    sink = io.StringIO()
    stream = TextStream(tok, tok.encode("ab"), out=sink, stops=["XYZ"])
    stream.flush(final=False)
    for ch in "cdXYe":
        assert stream.push(tok.encode(ch)[0]) is False
    assert sink.getvalue() == "abcdXYe"  # "XY" waited until "e" showed it was not "XYZ"
    stream.push(tok.encode("X")[0])
    stream.push(tok.encode("Y")[0])
    assert sink.getvalue() == "abcdXYe"
    assert stream.push(tok.encode("Z")[0]) is True and stream.stopped == "XYZ"
    stream.flush()
    assert sink.getvalue() == "abcdXYe"


def test_eos_stops_at_the_end_of_text_token(tmp_path, capsys):
    tok = kvlab.BPETokenizer.train("the quick brown fox jumps over the lazy dog " * 20, vocab_size=270,
                                   endoftext=True)
    model = kvlab.GPT(kvlab.GPTConfig(vocab_size=tok.vocab_size, max_seq_len=32, d_model=16, n_layers=1, n_heads=2,
                                      tie_embeddings=False)).eval()
    with torch.no_grad():  # the final norm outputs ones, and only the end-of-text row reads them: always eos
        model.norm_f.weight.zero_()
        model.norm_f.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.endoftext_id] = 1.0
    kvlab.train.export_model(tmp_path, model, tok, {})
    flags = ["--prompt", "the fox", "--model", str(tmp_path), "--max-new-tokens", "5", "--temperature", "0"]
    main(flags)
    assert "<|endoftext|>" in capsys.readouterr().out
    main(flags + ["--eos"])
    captured = capsys.readouterr()
    assert captured.out.strip("\n") == "the fox"
    assert "(stopped at the end-of-text token after 1 tokens)" in captured.err


def test_a_folder_without_tokenizer_json_is_named(exported, tmp_path):
    folder, _, _ = exported
    broken = tmp_path / "my-model"
    broken.mkdir()
    for name in ("model.safetensors", "config.json"):
        (broken / name).write_bytes((folder / name).read_bytes())
    result = run_module("--prompt", "ab", "--model", str(broken))
    assert result.returncode == 2
    assert f"--model {broken}: the folder {broken} is not an exported kvlab model: missing tokenizer.json" \
        in result.stderr
    assert "Shakespeare model" not in result.stderr and "path=" not in result.stderr


def test_help_names_every_kind_of_model():
    result = run_module("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for words in ("training checkpoint", "shakespeare-bpe", "--prompt-file", "--stop", "--eos"):
        assert words in text


def test_gpt2_offline_says_it_is_a_download_and_how_big(tmp_path):
    result = run_module("--prompt", "hi", "--model", "gpt2",
                        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert result.returncode == 2
    assert "download from the Hugging Face hub" in result.stderr and "about 550 MB" in result.stderr
    assert "--model shakespeare" in result.stderr
