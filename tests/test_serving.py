"""kvlab.serving and kvlab.paged: ragged batches, the continuous-batching engine, paged KV memory
and shared prefixes, each checked against requests run alone with `kvlab.generate` (float32)."""

import math

import pytest
import torch

import kvlab
from kvlab.course.checks._common import small_model
from kvlab.paged import BlockPool, gather_kv, slot_mapping
from kvlab.serving import Engine, generate_batch, mixed_workload

STYLES = ("gpt2", "modern")


@pytest.fixture(scope="module", params=STYLES)
def model(request):
    return small_model(request.param, seed=3)


def prompts_of(lengths, seed=0, vocab=61):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def alone(model, prompt, n, *, seed=None, **sampling):
    """The reference: one request by itself through kvlab.generate."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    prompt = torch.as_tensor(prompt)
    return kvlab.generate(model, prompt[None], n, generator=generator, **sampling)[0]


# -- the paged primitives -----------------------------------------------------------------------

def test_slot_mapping_and_gather_follow_the_block_table():
    bs, Hkv, D = 4, 2, 3
    pool = torch.randn(6, bs, Hkv, D)
    table = torch.tensor([4, 1, 5])
    length = 10
    expected = torch.stack([pool[table[p // bs], p % bs] for p in range(length)], dim=1)  # (Hkv, length, D)
    torch.testing.assert_close(gather_kv(pool, table, length), expected, rtol=0, atol=0)
    positions = torch.tensor([[0, 3, 4, 9]])
    assert slot_mapping(table[None], positions, bs).tolist() == [[16, 19, 4, 21]]


def test_block_pool_counts_holders_and_frees_the_last():
    pool = BlockPool(n_layers=1, n_kv_heads=1, head_dim=2, num_blocks=2, block_size=2)
    a, b = pool.allocate(), pool.allocate()
    assert (a, b) == (0, 1) and pool.allocate() is None
    pool.hold(a)
    assert not pool.release(a) and pool.num_free == 0
    assert pool.release(a) and pool.num_free == 1
    with pytest.raises(RuntimeError):
        pool.release(a)


# -- ragged batches -----------------------------------------------------------------------------

def test_generate_batch_equals_each_prompt_alone(model):
    prompts = prompts_of([5, 1, 23, 12, 7])
    results = generate_batch(model, prompts, 16, temperature=0)
    for prompt, result in zip(prompts, results):
        assert torch.equal(result, alone(model, prompt, 16, temperature=0))


def test_generate_batch_stops_each_row_at_its_eos(model):
    prompts = prompts_of([4, 9, 15], seed=1)
    free = generate_batch(model, prompts, 12, temperature=0)
    eos = int(free[1][9 + 3])  # the 4th new token of row 1
    results = generate_batch(model, [p.tolist() for p in prompts], 12, temperature=0, eos_id=eos)
    for prompt, result in zip(prompts, results):
        assert torch.equal(result, alone(model, prompt, 12, temperature=0, eos_id=eos))
    assert len(results[1]) <= 9 + 4 and int(results[1][-1]) == eos


def test_generate_batch_is_exported():
    assert kvlab.generate_batch is generate_batch and kvlab.serving.Engine is Engine


def test_generate_batch_zero_new_tokens_returns_the_prompts(model):
    prompts = prompts_of([3, 6])
    assert all(torch.equal(r, p) for r, p in zip(generate_batch(model, prompts, 0), prompts))


# -- the engine ---------------------------------------------------------------------------------

SETTINGS = [
    dict(temperature=0),
    dict(temperature=0.8, seed=11),
    dict(temperature=1.0, top_k=5, seed=12),
    dict(temperature=0.9, top_p=0.8, seed=13),
    dict(temperature=1.2, min_p=0.1, seed=14),
]


@pytest.mark.parametrize("kv,block_size", [("paged", 4), ("paged", 1), ("static", 16)])
def test_engine_with_random_arrivals_equals_each_request_alone(model, kv, block_size):
    g = torch.Generator().manual_seed(5)
    prompts = prompts_of(torch.randint(1, 30, (9,), generator=g).tolist(), seed=2)
    news = torch.randint(0, 20, (9,), generator=g).tolist()
    eos = int(alone(model, prompts[0], 6, temperature=0)[-1])  # a token greedy decoding does emit
    engine = Engine(model, max_batch_size=3, kv=kv, block_size=block_size, max_seq_len=64)
    submitted, finished_in_steps = {}, []
    for i, (prompt, n) in enumerate(zip(prompts, news)):
        sampling = dict(SETTINGS[i % len(SETTINGS)], eos_id=eos if i % 3 == 0 else None)
        submitted[engine.submit(prompt, n, **sampling)] = (prompt, n, sampling)
        for _ in range(int(torch.randint(0, 4, (1,), generator=g))):  # interleave steps with arrivals
            finished_in_steps += engine.step()
    results = engine.run()
    assert sorted(results) == sorted(submitted)  # also those that finished inside step()
    assert set(finished_in_steps) <= set(results)
    for rid, (prompt, n, sampling) in submitted.items():
        assert torch.equal(results[rid], alone(model, prompt, n, **sampling)), (rid, sampling)
        assert torch.equal(engine.result(rid), results[rid])


def test_seeded_request_same_text_whatever_else_is_in_the_batch(model):
    target = prompts_of([8], seed=9)[0]
    texts = []
    for others in (0, 2, 5):
        engine = Engine(model, max_batch_size=6, block_size=4, max_seq_len=64)
        for prompt in prompts_of([3 + k for k in range(others)], seed=others):
            engine.submit(prompt, 10, temperature=1.0, seed=others)
        rid = engine.submit(target, 15, temperature=1.0, top_k=20, seed=123)
        texts.append(engine.run()[rid])
    assert all(torch.equal(t, texts[0]) for t in texts)
    assert torch.equal(texts[0], alone(model, target, 15, temperature=1.0, top_k=20, seed=123))


def test_paged_equals_static(model):
    prompts = prompts_of([6, 19, 2, 11], seed=4)
    out = {}
    for kv in ("paged", "static"):
        engine = Engine(model, max_batch_size=2, kv=kv, block_size=4, max_seq_len=48) if kv == "paged" else \
            Engine(model, max_batch_size=2, kv=kv, max_seq_len=48)
        ids = [engine.submit(p, 14, temperature=0) for p in prompts]
        res = engine.run()
        out[kv] = [res[i] for i in ids]
    assert all(torch.equal(a, b) for a, b in zip(out["paged"], out["static"]))


def test_out_of_blocks_preempts_and_recomputes_without_dropping(model):
    prompts = prompts_of([9, 14, 5, 12], seed=6)
    engine = Engine(model, max_batch_size=4, block_size=4, num_blocks=9, max_seq_len=64)
    ids = [engine.submit(p, 20, temperature=0) for p in prompts]
    results = engine.run()
    assert engine.preemptions > 0  # 4 requests of ~30 tokens cannot all fit in 36 slots
    for rid, prompt in zip(ids, prompts):
        assert torch.equal(results[rid], alone(model, prompt, 20, temperature=0))
    assert engine.pool.num_free == 9  # every block came back


def test_admission_waits_for_blocks(model):
    engine = Engine(model, max_batch_size=4, block_size=4, num_blocks=6, max_seq_len=64)
    first = engine.submit(prompts_of([20])[0], 3, temperature=0)  # 5 blocks
    second = engine.submit(prompts_of([8], seed=1)[0], 3, temperature=0)  # 2 more: must wait
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1
    results = engine.run()
    assert set(results) == {first, second}


def test_kv_bytes_reserved_and_used():
    model = small_model("modern")
    per_token = kvlab.kv_cache_bytes(2, 2, 8, 1)  # 2 layers, 2 kv heads of 8
    engine = Engine(model, max_batch_size=2, block_size=4, max_seq_len=32)
    assert engine.kv_bytes_reserved() == engine.kv_bytes_used() == 0
    engine.submit(list(range(5)), 10, temperature=0)
    engine.step()  # 5 prompt positions cached, in 2 blocks
    assert engine.kv_bytes_used() == 5 * per_token
    assert engine.kv_bytes_reserved() == 8 * per_token
    static = Engine(model, max_batch_size=2, kv="static", max_seq_len=32)
    static.submit(list(range(5)), 10, temperature=0)
    static.step()
    assert static.kv_bytes_used() == 5 * per_token and static.kv_bytes_reserved() == 32 * per_token
    engine.run()
    assert engine.kv_bytes_reserved() == 0


# -- prefix sharing -----------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [0, 3])
def test_prefix_sharing_equals_unshared_and_stores_the_prefix_once(model, suffix):
    prefix = prompts_of([12], seed=7)[0].tolist()  # 3 full blocks of 4
    prompts = [prefix + prompts_of([suffix], seed=20 + i)[0].tolist() for i in range(4)]
    out, prefix_blocks = {}, {}
    for sharing in (False, True):
        engine = Engine(model, max_batch_size=4, block_size=4, prefix_sharing=sharing, max_seq_len=48)
        ids = [engine.submit(p, 10, temperature=0) for p in prompts]
        while engine.num_waiting:
            engine.step()
        prefix_blocks[sharing] = {b for t in engine.block_tables().values() for b in t[:3]}
        res = engine.run()
        out[sharing] = [res[i] for i in ids]
        if sharing and suffix == 0:
            # A prompt made only of shared blocks recomputes its last token, which writes into
            # the last shared block: that block is copied first, once per later request.
            assert engine.copies == 3
    assert all(torch.equal(a, b) for a, b in zip(out[True], out[False]))
    assert all(torch.equal(a, alone(model, p, 10, temperature=0)) for a, p in zip(out[True], prompts))
    assert len(prefix_blocks[False]) == 12
    assert len(prefix_blocks[True]) == (3 if suffix else 3 + 3)  # with copies: 3 shared + 3 private last blocks


def test_a_request_waits_one_step_for_a_prefix_being_computed(model):
    prefix = list(range(8))
    engine = Engine(model, max_batch_size=3, block_size=4, prefix_sharing=True, max_seq_len=32)
    for tail in ([1, 2], [3]):
        engine.submit(prefix + tail, 4, temperature=0)
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1
    engine.step()
    tables = list(engine.block_tables().values())
    assert tables[0][:2] == tables[1][:2]


# -- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("args,kwargs,error,match", [
    ((torch.tensor([], dtype=torch.long), 3), {}, ValueError, "prompt"),
    (([1, 2, 61], 3), {}, ValueError, "prompt"),
    ((torch.tensor([1.0, 2.0]), 3), {}, TypeError, "prompt"),
    ((torch.tensor([[1, 2]]), 3), {}, ValueError, "prompt"),
    (("abc", 3), {}, TypeError, "prompt"),
    (([1, 2], -1), {}, ValueError, "max_new_tokens"),
    (([1, 2], 2.0), {}, TypeError, "max_new_tokens"),
    (([1, 2], 40), {}, ValueError, "max_seq_len"),
    (([1, 2], 3), dict(temperature=-1), ValueError, "temperature"),
    (([1, 2], 3), dict(top_p=1.5), ValueError, "top_p"),
    (([1, 2], 3), dict(top_k=-2), ValueError, "top_k"),
    (([1, 2], 3), dict(min_p=2), ValueError, "min_p"),
    (([1, 2], 3), dict(seed=1.5), TypeError, "seed"),
    (([1, 2], 3), dict(eos_id=99), ValueError, "eos_id"),
])
def test_bad_submit_raises_and_disturbs_nothing(args, kwargs, error, match):
    model = small_model("gpt2")
    engine = Engine(model, max_batch_size=2, block_size=4, max_seq_len=32)
    good = engine.submit([5, 6, 7], 8, temperature=0)
    engine.step()
    with pytest.raises(error, match=match):
        engine.submit(*args, **kwargs)
    assert torch.equal(engine.run()[good], alone(model, [5, 6, 7], 8, temperature=0))
    assert sorted(engine.run()) == [good]


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_batch_size=0), "max_batch_size"),
    (dict(max_batch_size=2, block_size=0), "block_size"),
    (dict(max_batch_size=2, kv="ring"), "kv"),
    (dict(max_batch_size=2, num_blocks=0), "num_blocks"),
    (dict(max_batch_size=2, kv="static", prefix_sharing=True), "prefix_sharing"),
    (dict(max_batch_size=2, max_seq_len=1000), "max_seq_len"),
])
def test_bad_engine_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Engine(small_model("gpt2"), **kwargs)


def test_pool_too_small_for_a_request_is_refused_at_submit():
    engine = Engine(small_model("gpt2"), max_batch_size=2, block_size=4, num_blocks=2, max_seq_len=32)
    with pytest.raises(ValueError, match="num_blocks"):
        engine.submit([1, 2, 3], 7)


@pytest.mark.parametrize("prompts,n,match", [
    ([], 3, "prompts"),
    ([[1, 2], []], 3, r"prompts\[1\]"),
    ([[1, 2], [70]], 3, r"prompts\[1\]"),
    ([[1, 2]], -1, "max_new_tokens"),
    ([[1] * 120], 10, "max_seq_len"),
])
def test_generate_batch_bad_input(prompts, n, match):
    with pytest.raises(ValueError, match=match):
        generate_batch(small_model("gpt2"), prompts, n)
    with pytest.raises(TypeError, match="prompts"):
        generate_batch(small_model("gpt2"), torch.tensor([[1, 2]]), 3)


def test_sliding_window_models_are_refused():
    model = small_model("modern", window=8)
    with pytest.raises(ValueError, match="sliding window"):
        Engine(model, max_batch_size=2)
    with pytest.raises(ValueError, match="sliding window"):
        generate_batch(model, [[1, 2]], 3)


def test_result_of_unknown_or_unfinished_request():
    engine = Engine(small_model("gpt2"), max_batch_size=1, max_seq_len=32)
    rid = engine.submit([1, 2], 5)
    with pytest.raises(ValueError, match="not finished"):
        engine.result(rid)
    with pytest.raises(ValueError, match="never returned"):
        engine.result(rid + 1)


def test_mixed_workload_is_seeded():
    a, b = mixed_workload(5, seed=3), mixed_workload(5, seed=3)
    assert a == b and all(16 <= len(p) <= 128 and 16 <= n <= 128 for p, n in a)
    assert a != mixed_workload(5, seed=4)


# -- the measurements ---------------------------------------------------------------------------

def test_serving_bench_cli_writes_a_record(tmp_path):
    from kvlab.bench.cli import main

    out = tmp_path / "s.json"
    assert main(["--serving", "--model", "tiny", "--max-seq-len", "512", "--serving-batch-sizes", "1,2",
                 "--serving-new-tokens", "3", "--prompt-lens", "4", "--threads", "1", "--out", str(out)]) == 0
    import json

    record = json.loads(out.read_text())
    t = record["targets"]
    assert record["engine"]["paged"]["tokens_equal"] == 1.0 and record["prefix"]["tokens_equal"]
    assert t["prefix_shared_over_unshared"] == 1 / 16
    assert 1.0 <= t["paged_reserved_over_used"] < t["static_reserved_over_used"]
    assert {r["batch_size"] for r in record["batch_sweep"]} == {1, 2}


# -- the parts: paged attention, the block manager's prefix cache, the engine's step ------------

@pytest.mark.parametrize("H,Hkv,BS", [(4, 4, 4), (4, 2, 8), (2, 1, 1)])
def test_blockwise_paged_attention_equals_the_gather_and_dense_attention(H, Hkv, BS):
    from kvlab.paged import paged_attention_blockwise, paged_attention_gather

    g = torch.Generator().manual_seed(H * 10 + BS)
    D, lengths = 8, torch.tensor([1, 13, 7, 29, BS])
    nb = math.ceil(int(lengths.max()) / BS)
    NB = len(lengths) * nb + 2
    k_pool, v_pool = torch.randn(NB, BS, Hkv, D, generator=g), torch.randn(NB, BS, Hkv, D, generator=g)
    tables = torch.randperm(NB, generator=g)[: len(lengths) * nb].view(len(lengths), nb)  # scattered blocks
    q = torch.randn(len(lengths), H, D, generator=g) * 3
    blockwise = paged_attention_blockwise(q, k_pool, v_pool, tables, lengths)
    gathered = paged_attention_gather(q, k_pool, v_pool, tables, lengths)
    torch.testing.assert_close(blockwise, gathered)
    for b, n in enumerate(lengths.tolist()):  # dense attention over each row's keys, read slot by slot
        k = torch.stack([k_pool[tables[b, p // BS], p % BS] for p in range(n)], dim=1)  # (Hkv, n, D)
        v = torch.stack([v_pool[tables[b, p // BS], p % BS] for p in range(n)], dim=1)
        k, v = k.repeat_interleave(H // Hkv, 0), v.repeat_interleave(H // Hkv, 0)
        dense = torch.softmax(q[b, :, None] @ k.transpose(1, 2) / math.sqrt(D), -1) @ v  # (H, 1, D)
        torch.testing.assert_close(blockwise[b], dense[:, 0])


def test_the_paged_forward_runs_the_models_own_blocks(model):
    from kvlab.serving import forward_paged

    calls = []
    hooks = [block.register_forward_hook(lambda *a: calls.append(1)) for block in model.blocks]
    try:
        generate_batch(model, prompts_of([3, 5]), 2, temperature=0)
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == 2 * model.config.n_layers  # the prefill and one decode step, every block
    assert kvlab.serving.forward_rows is forward_paged


def test_engine_step_is_short():
    import inspect

    assert len(inspect.getsource(Engine.step).splitlines()) <= 15


def test_prefix_cache_outlives_requests_and_gives_the_same_tokens(model):
    system = prompts_of([12], seed=8)[0].tolist()  # 3 full blocks of 4
    engine = Engine(model, max_batch_size=2, block_size=4, num_blocks=12, prefix_sharing=True, max_seq_len=40)
    first = engine.submit(system + [1, 2], 5, temperature=0)
    engine.run()
    assert engine.num_running == 0 and engine.kv_bytes_reserved() == 0  # nothing held...
    for prompt, hits in ((system + [3, 4, 5], 3), (system, 3), (system[:4] + [9] * 6, 1)):  # ...yet still cached
        before = engine.blocks.hits
        rid = engine.submit(prompt, 5, temperature=0)
        assert torch.equal(engine.run()[rid], alone(model, prompt, 5, temperature=0))
        assert engine.blocks.hits - before == hits
    assert torch.equal(engine.result(first), alone(model, system + [1, 2], 5, temperature=0))
    assert engine.pool.num_free == 12


def test_prefix_cache_evicts_the_least_recently_freed_block_first(model):
    engine = Engine(model, max_batch_size=1, block_size=4, num_blocks=6, prefix_sharing=True, max_seq_len=24)
    a, b = prompts_of([8], seed=1)[0].tolist(), prompts_of([8], seed=2)[0].tolist()
    for prompt in (a, b):  # each caches 2 blocks and frees 3 (the third held its new tokens)
        engine.submit(prompt, 3, temperature=0)
        engine.run()
    assert len(engine.blocks.cached) == 4
    engine.submit(prompts_of([8], seed=3)[0].tolist(), 3, temperature=0)  # needs 3 fresh blocks
    engine.run()
    before = engine.blocks.hits
    engine.submit(b, 3, temperature=0)  # b was freed after a: its blocks survived
    rid = engine.submit(a, 3, temperature=0)
    results = engine.run()
    assert engine.blocks.hits - before == 2
    assert torch.equal(results[rid], alone(model, a, 3, temperature=0))


def test_shakespeare_model_is_served():
    model, tok = kvlab.load_shakespeare()
    prompt = tok.encode("ROMEO:\n")
    engine = Engine(model, max_batch_size=2, block_size=16, cpu_kernels=False)
    rid = engine.submit(prompt, 20, temperature=0)
    assert torch.equal(engine.run()[rid], alone(model, prompt, 20, temperature=0))


def test_a_prefix_cache_hit_gives_the_logits_of_a_miss(model):
    system = prompts_of([12], seed=4)[0].tolist()
    logits = {}
    for cached in (False, True):
        engine = Engine(model, max_batch_size=1, block_size=4, prefix_sharing=cached, max_seq_len=40)
        engine.submit(system + [5], 3, temperature=0)
        engine.run()  # finished: with the cache, its full blocks stay cached
        seen = []
        run = engine.runner.run
        engine.runner.run = lambda batch: seen.append(run(batch)) or seen[-1]
        for prompt in (system + [7, 8], system):  # a partial hit, then a whole-prompt hit
            engine.submit(prompt, 1, temperature=0)
            engine.run()
        logits[cached] = seen
        assert engine.blocks.hits == (6 if cached else 0)
    for miss, hit in zip(logits[False], logits[True]):
        torch.testing.assert_close(hit, miss)


def test_prefix_cache_under_a_tight_pool_with_preemption_equals_each_request_alone(model):
    g = torch.Generator().manual_seed(11)
    system = prompts_of([8], seed=12)[0].tolist()  # two full blocks of 4
    engine = Engine(model, max_batch_size=4, block_size=4, num_blocks=10, prefix_sharing=True, max_seq_len=40)
    jobs = {}
    for i in range(10):
        own = prompts_of([int(torch.randint(0, 6, (1,), generator=g))], seed=30 + i)[0].tolist()
        prompt = (system if i % 3 else system[:4]) + own
        n = int(torch.randint(4, 16, (1,), generator=g))
        jobs[engine.submit(prompt, n, temperature=0)] = (prompt, n)
        for _ in range(int(torch.randint(0, 3, (1,), generator=g))):
            engine.step()
    results = engine.run()
    assert engine.preemptions > 0 and engine.blocks.hits > 0
    for rid, (prompt, n) in jobs.items():
        assert torch.equal(results[rid], alone(model, prompt, n, temperature=0)), rid
    assert engine.pool.num_free == 10 and engine.kv_bytes_reserved() == 0


def test_the_packed_pass_gives_the_padded_pass_logits_and_packs_within_its_budget(model):
    from kvlab.serving import forward_packed, forward_paged
    from kvlab.serving.model_runner import ModelRunner
    from kvlab.serving.scheduler import Request

    c = model.config
    BS = 4
    prompts = [p.tolist() for p in prompts_of([7, 3, 10], seed=5)]
    cached = [0, 2, 5]  # request 1 has 2 tokens cached, request 2 has 5: each feeds the rest
    pool = kvlab.paged.BlockPool(n_layers=c.n_layers, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim, num_blocks=12,
                                 block_size=BS)
    tables = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    for b, (p, n) in enumerate(zip(prompts, cached)):  # the cached part, written by a padded pass of its own
        if n:
            forward_paged(model, torch.tensor([p[:n]]), torch.arange(n)[None], torch.ones(1, n, dtype=torch.bool),
                          pool, tables[b: b + 1], n)
    idx = torch.tensor([t for p, n in zip(prompts, cached) for t in p[n:]])
    positions = torch.cat([torch.arange(n, len(p)) for p, n in zip(prompts, cached)])
    seq = torch.cat([torch.full((len(p) - n,), b) for b, (p, n) in enumerate(zip(prompts, cached))])
    with torch.inference_mode():
        packed = forward_packed(model, idx, positions, seq, pool, tables, torch.tensor([len(p) for p in prompts]))
        alone = torch.cat([model(torch.tensor([p]))[:, -1] for p in prompts])  # (3, V): each request on its own
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)

    rows = [Request(id=i, prompt_len=len(p), max_new_tokens=1, sampling=kvlab.SamplingConfig(), eos_id=None, tokens=p)
            for i, p in enumerate(prompts)]
    runner = ModelRunner(model, pool, pack_budget=(7 + 3) * (7 + 3))
    assert runner._packs(rows) == [[0, 1], [2]]  # a third request would pass tokens x keys = 10 x 10
    assert ModelRunner(model, pool, pack_budget=1)._packs(rows) == [[0], [1], [2]]  # a row alone always goes
