"""`python -m kvlab.bench --frontier` end to end, on tiny random models shaped like chapter 11's family
(one layer, width 64, each member's way of attending), exported the way scripts/train_cache_family.py
exports the real ones and passed with --frontier-family: the record's fields, its numbers against the
measurement functions called directly, and the plot file."""

import json
import math
import shlex
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import kvlab
from kvlab.bench.cli import main, uniform_sink_share
from kvlab.bench.frontier import FRONTIER_METHODS, family_windows, long_context, sink_share
from kvlab.data import load_shakespeare_text, train_val_split
from kvlab.train import export_model
from kvlab.train.family import CACHE_FAMILY, family_config, family_tokenizer

WINDOWS, LONG_WINDOWS = 2, 1


def tiny_member(name: str) -> kvlab.GPT:
    torch.manual_seed(0)
    model = kvlab.GPT(replace(family_config(name), n_layers=1, d_model=64, d_ff=64)).eval()
    with torch.no_grad():  # sharper than the flat random init, so that cutting the cache changes the argmax
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def val_ids():
    text = load_shakespeare_text()
    return torch.tensor(family_tokenizer(text).encode(train_val_split(text)[1])), family_tokenizer(text)


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory, val_ids):
    folder = tmp_path_factory.mktemp("family")
    for name in CACHE_FAMILY:
        export_model(folder / name, tiny_member(name), val_ids[1], {"run": name, "steps": 3, "smoke": True})
    return folder


@pytest.fixture(scope="module")
def record(family_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    argv = ["--frontier", "--frontier-family", str(family_dir), "--frontier-windows", str(WINDOWS),
            "--frontier-long-windows", str(LONG_WINDOWS), "--threads", "1", "--out", str(out / "f.json"),
            "--plot", str(out / "f.png")]
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # --threads 1 must take it down (and the record say so)
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(before)
    return json.loads((out / "f.json").read_text()), out, argv


def test_the_record_has_every_method_and_its_bytes(record):
    rec, _, argv = record
    assert [p["label"] for p in rec["points"]] == list(FRONTIER_METHODS)
    by = {p["label"]: p for p in rec["points"]}
    per_layer = 4 * 64  # float32 bytes of one token's keys (or values) at width 64, one layer
    assert by["MHA"]["bytes_per_token"] == 2 * per_layer
    assert by["GQA (2 KV heads)"]["bytes_per_token"] == per_layer
    assert by["MQA (1 KV head)"]["bytes_per_token"] == per_layer / 2
    assert by["MLA (latent 48 + RoPE 16)"]["bytes_per_token"] == 4 * (48 + 16)
    assert by["window 32"]["bytes_per_token"] == 2 * per_layer / 4  # 32 of 128 tokens kept
    for p in rec["points"]:
        assert math.isfinite(p["nats_per_char"]) and 0 <= p["top1_agreement"] <= 1, p
        assert p["member"] == FRONTIER_METHODS[p["label"]][0] and p["kind"] == FRONTIER_METHODS[p["label"]][1]
    assert by["MHA"]["top1_agreement"] == 1.0 and by["window 16"]["top1_agreement"] < 1.0
    assert rec["windows"] == {"n_windows": WINDOWS, "length": 128, "split": "val", "bos": 65, "characters": 256}
    assert sorted(rec["family"]) == sorted(CACHE_FAMILY) and rec["family"]["mqa"]["steps"] == 3
    assert rec["family"]["mqa"]["parameters"] == sum(p.numel() for p in tiny_member("mqa").parameters())
    assert rec["device"].startswith("cpu") and rec["torch"] == torch.__version__ and rec["threads"] == 1
    assert rec["wall_s"] > 0 and rec["family_dir"] == argv[2]
    assert shlex.split(rec["command"])[3:] == argv


def test_the_windows_are_the_validation_split_after_bos(record, val_ids):
    # A dense cache fed one token at a time gives the full forward's loss: the windows it measured
    # are BOS + the validation split's first characters.
    rec, _, _ = record
    x, y = family_windows(val_ids[0], 65, n_windows=WINDOWS)
    model = tiny_member("mha")
    with torch.no_grad():
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    assert rec["points"][0]["nats_per_char"] == pytest.approx(loss, abs=1e-4)


def test_long_context_and_sink_shares(record, val_ids):
    rec, _, _ = record
    long = rec["long_context"]
    assert [long[k] for k in ("member", "n_windows", "length", "budget", "past")] == ["mha", LONG_WINDOWS, 512, 64, 128]
    assert list(long["nats_per_char"]) == ["sliding window 128", "window 64", "sinks 4 + window 64", "H2O 64",
                                           "SnapKV vote 64"]
    expected = long_context(tiny_member("mha"), val_ids[0], 65, n_windows=LONG_WINDOWS)
    assert long["nats_per_char"] == pytest.approx(expected, abs=1e-4)
    assert list(long["by_member"]) == ["mha", "gqa", "mqa"]  # every member an evicting cache can hold
    assert long["by_member"]["mha"] == long["nats_per_char"]
    assert long["by_member"]["mqa"] == pytest.approx(long_context(tiny_member("mqa"), val_ids[0], 65,
                                                                  n_windows=LONG_WINDOWS), abs=1e-4)
    sinks = rec["sink_share"]
    assert (sinks["n_windows"], sinks["length"], sinks["from_pos"]) == (32, 128, 32)
    assert sinks["uniform"] == pytest.approx(sum(1 / (p + 1) for p in range(32, 128)) / 96, abs=1e-4)
    assert uniform_sink_share() == pytest.approx(0.01431, abs=1e-5)
    xs, _ = family_windows(val_ids[0], 65, n_windows=32)
    for name in CACHE_FAMILY:
        member = sinks["members"][name]
        expected = sink_share(tiny_member(name), xs, from_pos=32)
        assert torch.tensor(member["share"]).shape == (1, 4)
        torch.testing.assert_close(torch.tensor(member["share"]), expected, atol=1e-4, rtol=0)
        assert member["max"] == max(max(row) for row in member["share"])


def test_the_plot_is_written(record):
    _, out, _ = record
    assert (out / "f.png").stat().st_size > 10_000
