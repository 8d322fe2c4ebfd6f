"""kvlab.bench.serving_hf: the engine against transformers' continuous batching, kvlab's static batch
and one request at a time, on one workload and the same weights (`--serving --hf`'s usage errors are
in test_bench_cli.py)."""

import pytest
import torch

import kvlab
from kvlab.bench.cli import _hf_twin
from kvlab.bench.serving_hf import hf_generate_batch, serving_vs_hf


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = kvlab.GPTConfig(vocab_size=64, max_seq_len=96, d_model=32, n_layers=2, n_heads=2)
    return kvlab.GPT(config).eval()


def test_transformers_continuous_batching_gives_kvlabs_greedy_tokens_in_prompt_order(model):
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10], [1, 2, 3, 4]]
    got = hf_generate_batch(_hf_twin(model, "float32"), prompts, 5, max_batch_size=2)
    want = [kvlab.generate(model, torch.tensor([p]), 5, temperature=0)[0].tolist() for p in prompts]
    assert got == want


def test_every_way_gives_the_same_tokens_and_the_record_holds_the_targets(model):
    result = serving_vs_hf(model, _hf_twin(model, "float32"), n_requests=4, prompt_range=(4, 12), new_tokens=3,
                           batch_sizes=(2, 4), block_size=4, rounds=1, prefix_len=32, prefix_requests=4,
                           hf_defaults=False, progress=lambda _: None)
    assert set(result["ways"]) == {"one_at_a_time", "engine_2", "hf_generate_batch_2", "engine_4",
                                   "hf_generate_batch_4", "static_batch"}
    assert all(w["tokens_equal_one_at_a_time"] == 1.0 for w in result["ways"].values())
    targets = result["targets"]
    assert targets["all_tokens_equal"] is True
    assert set(targets) >= {"engine_2_over_hf_generate_batch_2", "engine_4_over_hf_generate_batch_4",
                            "engine_2_over_one_at_a_time", "engine_4_over_static_batch", "engine_2_reserved_over_used",
                            "prefix_shared_over_unshared_bytes", "prefix_unshared_over_shared_mean_ttft"}
    assert targets["prefix_shared_over_unshared_bytes"] == 1 / 4  # 8 prompt blocks held once instead of 4 times
    assert targets["engine_2_reserved_over_used"] >= 1.0
    assert result["prefix"]["unshared"]["mean_ttft_s"] > 0 and result["prefix"]["shared"]["mean_ttft_s"] > 0
