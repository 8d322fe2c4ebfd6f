"""Benchmarks: the timed loop generates what generate() does, and the results are well formed."""

import json

import pytest
import torch

import kvlab
from kvlab.bench import sweep, time_generation, time_hf_generation
from kvlab.bench.cli import main
from conftest import make_model


@pytest.mark.parametrize("use_cache", [True, False])
def test_timed_loop_generates_the_same_tokens(use_cache):
    model = make_model("gpt2")
    idx = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    timing, tokens = time_generation(model, idx, 20, use_cache=use_cache)
    assert torch.equal(tokens, kvlab.generate(model, idx, 20, temperature=0))
    assert len(timing.step_times) == 19 and timing.ttft > 0 and timing.total >= timing.ttft + sum(timing.step_times)
    assert timing.throughput == pytest.approx(2 * 20 / timing.total)
    assert timing.peak_memory_bytes == (kvlab.kv_cache_bytes(2, 4, 8, 25, 2) if use_cache else 0)


def hf_twin(model):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=320, n_embd=32, n_layer=2, n_head=4,
                                    bos_token_id=0, eos_token_id=0)).eval()
    hf.load_state_dict(kvlab.to_hf_gpt2_state_dict(model), strict=False)
    return hf


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_hf_timing_matches_tokens_and_counts_steps(cache_implementation):
    model = make_model("gpt2")
    hf = hf_twin(model)
    idx = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    timing, tokens = time_hf_generation(hf, idx, 12, cache_implementation=cache_implementation)
    assert len(timing.step_times) == 11
    assert timing.backend == ("hf" if cache_implementation is None else "hf-static")
    assert torch.equal(tokens, kvlab.generate(model, idx, 12, temperature=0))


def test_sweep_runs_both_hf_caches_and_checks_their_tokens():
    model = make_model("gpt2")
    result = sweep(model, batch_sizes=(2,), prompt_lens=(4,), new_tokens=(6,), use_cache=(True, False), repeats=1,
                   warmup=0, hf_model=hf_twin(model), progress=lambda *_: None)
    rows = [(r["backend"], r["use_cache"]) for r in result["results"]]
    assert rows == [("kvlab", True), ("hf", True), ("hf-static", True), ("kvlab", False), ("hf", False)]
    assert all(r["tokens_equal_to_kvlab"] == 1.0 for r in result["results"] if r["backend"] != "kvlab")
    assert result["gpu"] is None and result["device"].startswith("cpu")


def test_bandwidth_and_decode_bytes():
    model = make_model("gpt2")  # tied embeddings: the output layer is the token table, counted once
    c = model.config
    per_block = sum(p.numel() for p in model.blocks[0].parameters())
    expected = (c.n_layers * per_block + 2 * c.d_model + c.vocab_size * c.d_model) * 4
    assert kvlab.bench.decode_weight_bytes(model) == expected
    assert kvlab.bench.read_bandwidth(mib=8, repeats=2) > 1e8  # any machine reads 100 MB/s


def test_sweep_and_summary_shapes():
    model = make_model("modern")
    result = sweep(model, batch_sizes=(1, 2), prompt_lens=(4,), new_tokens=(6,), repeats=2, warmup=0,
                   progress=lambda *_: None)
    assert len(result["results"]) == 4  # 2 batch sizes x cached/uncached
    r = result["results"][0]
    assert len(r["step_trace_s"]) == 5 and r["repeats"] == 2
    assert r["ttft_s"]["min"] <= r["ttft_s"]["median"] <= r["ttft_s"]["max"]
    assert result["model"]["n_kv_heads"] == 2 and json.dumps(result)


def test_bad_arguments():
    model = make_model("gpt2")
    with pytest.raises(ValueError, match="new_tokens"):
        time_generation(model, torch.zeros(1, 3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="max_seq_len"):
        time_generation(model, torch.zeros(1, 300, dtype=torch.long), 30)
    with pytest.raises(SystemExit):
        main(["--batch-sizes", "0"])
    with pytest.raises(SystemExit):
        main(["--model", "gpt5"])


def test_cli_writes_json_and_plot(tmp_path):
    out, plot = tmp_path / "b.json", tmp_path / "b.png"
    assert main(["--model", "tiny", "--new-tokens", "4", "--prompt-lens", "3", "--repeats", "1", "--warmup", "0",
                 "--out", str(out), "--plot", str(plot)]) == 0
    data = json.loads(out.read_text())
    assert {r["use_cache"] for r in data["results"]} == {True, False}
    assert data["read_bandwidth_bytes_s"] > 0 and data["decode_weight_bytes"] > 0 and "gpu" in data
    assert plot.stat().st_size > 1000


@pytest.mark.parametrize("kind, extra_per_layer", [("static", 0), ("dynamic", 0), ("sliding", 8 * 16)])
def test_cache_memory_measures_what_the_formula_says(kind, extra_per_layer):
    model = make_model("modern")  # grouped-query: 2 key/value heads for 4 query heads
    c = model.config
    window = 16 if kind == "sliding" else None
    measured = kvlab.bench.cache_memory(model, 3, 40, kind=kind, window=window)
    cached = window or 40  # a ring allocates all its slots; its int64 position per slot comes on top
    assert measured == kvlab.kv_cache_bytes(c.n_layers, c.n_kv_heads, c.head_dim, cached, 3) + c.n_layers * extra_per_layer


def test_precision_cost_is_zero_against_itself_and_small_in_bfloat16():
    model = make_model("gpt2")
    idx = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(0))
    same = kvlab.bench.precision_cost(model, idx, torch.float32)
    assert same["loss_increase"] == 0 and abs(same["kl_nats"]) < 1e-6 and same["top1_agreement"] == 1.0
    assert same["greedy_tokens_identical"] == [same["greedy_tokens_generated"]] * 4
    low = kvlab.bench.precision_cost(model, idx, torch.bfloat16)
    assert 0 < low["kl_nats"] < 0.05 and low["top1_agreement"] > 0.8
    with pytest.raises(ValueError, match="at least 9"):
        kvlab.bench.precision_cost(model, idx[:, :5])
