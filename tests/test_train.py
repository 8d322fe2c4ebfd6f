"""Training: schedule, optimizer groups, checkpoints (atomic, validated), exact resume, DDP."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kvlab
from kvlab.train import (TrainConfig, configure_optimizer, estimate_loss, load_checkpoint, lr_at, precision_for,
                         save_checkpoint, train)

TINY = dict(vocab_size=20, max_seq_len=16, d_model=16, n_layers=2, n_heads=2, dropout=0.1)


def tiny_run_config(**overrides):
    base = dict(batch_size=4, block_size=16, max_steps=12, lr=1e-2, min_lr=1e-3, warmup_steps=3, eval_interval=4,
                eval_batches=2, progress=False, seed=3)
    return TrainConfig(**{**base, **overrides})


def toy_data(n=600, seed=0):
    # A learnable sequence: mostly counting mod 20 with some noise.
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(n) % 20
    noise = torch.rand(n, generator=g) < 0.1
    ids[noise] = torch.randint(0, 20, (int(noise.sum()),), generator=g)
    return ids[: n * 9 // 10], ids[n * 9 // 10:]


def fresh_model(seed=0):
    torch.manual_seed(seed)
    return kvlab.GPT(kvlab.GPTConfig(**TINY))


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = tiny_run_config(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, cfg) == pytest.approx(0.1) and lr_at(55, cfg) == pytest.approx(0.55)


def test_optimizer_decays_matrices_only():
    opt = configure_optimizer(fresh_model(), tiny_run_config(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])


def test_precision_choice():
    assert precision_for(torch.device("cpu")) == "fp32"
    assert precision_for(torch.device("cpu"), "bf16") == "bf16"
    with pytest.raises(ValueError, match="fp16"):
        precision_for(torch.device("cpu"), "fp16")


def test_training_reduces_the_loss():
    tr, va = toy_data()
    model = fresh_model()
    cfg = tiny_run_config(max_steps=60, eval_interval=20)
    before = estimate_loss(model, va, cfg, device=torch.device("cpu"))
    history = train(model, tr, va, cfg)
    assert history.steps == list(range(1, 61)) and history.val_steps == [20, 40, 60]
    assert history.val_loss[-1] < before - 1.0
    assert history.tokens[-1] == 60 * 4 * 16


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    tr, va = toy_data()
    full = train(fresh_model(), tr, va, tiny_run_config())
    # Interrupted after 6 steps (a checkpoint), then resumed in a fresh model and optimizer.
    train(fresh_model(), tr, va, tiny_run_config(), out_dir=tmp_path, stop_after=6)
    resumed = train(fresh_model(seed=99), tr, va, tiny_run_config(), resume_from=tmp_path / "checkpoint.safetensors")
    assert resumed.steps == full.steps
    assert resumed.train_loss == pytest.approx(full.train_loss, abs=1e-6)
    assert resumed.val_loss == pytest.approx(full.val_loss, abs=1e-6)


def test_resume_needs_the_rng_state(tmp_path):
    # Guard against a resume test that would pass anyway: without restoring the batch
    # generator the resumed curve differs.
    tr, va = toy_data()
    full = train(fresh_model(), tr, va, tiny_run_config())
    train(fresh_model(), tr, va, tiny_run_config(), out_dir=tmp_path, stop_after=6)
    ckpt = tmp_path / "checkpoint.safetensors"
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    with safe_open(str(ckpt), framework="pt") as f:
        meta = f.metadata()
    tensors = {k: v for k, v in load_file(str(ckpt)).items() if k != "rng.batches"}
    save_file(tensors, str(ckpt), metadata=meta)
    resumed = train(fresh_model(), tr, va, tiny_run_config(), resume_from=ckpt)
    assert resumed.train_loss[6:] != pytest.approx(full.train_loss[6:], abs=1e-6)


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    model = fresh_model()
    opt = configure_optimizer(model, tiny_run_config())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path / "c.safetensors", model, opt, step=7, extra={"tokenizer": "char"})
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and loaded["extra"] == {"tokenizer": "char"}
    for (k, a), b in zip(model.state_dict().items(), loaded["model"].state_dict().values()):
        assert torch.equal(a, b), k
    opt2 = configure_optimizer(loaded["model"], tiny_run_config())
    load_checkpoint(path, loaded["model"], opt2)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    other = kvlab.GPT(kvlab.GPTConfig(**{**TINY, "d_model": 32, "n_heads": 4}))
    with pytest.raises(ValueError, match=r"d_model: checkpoint has 16, model has 32.*n_heads"):
        load_checkpoint(path, other)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "temporary file left behind"


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = fresh_model()
    path = save_checkpoint(tmp_path / "c.safetensors", model, step=1)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, step=2)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_bad_training_arguments():
    tr, va = toy_data()
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(ValueError, match="block_size=32 exceeds"):
        train(fresh_model(), tr, va, tiny_run_config(block_size=32))
    with pytest.raises(ValueError, match="outside"):
        train(fresh_model(), tr + 5, va, tiny_run_config())
    with pytest.raises(FileNotFoundError):
        load_checkpoint("/nonexistent/checkpoint.safetensors")


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    import test_train as t
    from kvlab.train import train
    t.TINY["dropout"] = 0.0
    dist.init_process_group("gloo")
    tr, va = t.toy_data()
    model = t.fresh_model()
    train(model, tr, va, t.tiny_run_config(batch_size=2, max_steps=8))
    if dist.get_rank() == 0:
        torch.save({{k: v.clone() for k, v in model.state_dict().items()}}, {out!r})
    dist.destroy_process_group()
""")


def test_ddp_with_two_processes_equals_one_process_with_twice_the_batch(tmp_path, monkeypatch):
    # Two processes with 2 windows each take the same global batch as one process with 4, and
    # DDP averages their gradients: without dropout the weights must end up the same.
    monkeypatch.setitem(TINY, "dropout", 0.0)
    out = tmp_path / "ddp.pt"
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=os.path.dirname(__file__), out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29533", str(script)], capture_output=True, text=True, env=env,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp_state = torch.load(out, weights_only=True)
    tr, va = toy_data()
    single = fresh_model()
    train(single, tr, va, tiny_run_config(batch_size=4, max_steps=8))
    # The key bias gets an exactly-zero gradient (softmax ignores a constant shift of the
    # scores), so its updates are Adam amplifying rounding noise: leave it out.
    d = TINY["d_model"]
    for k, v in single.state_dict().items():
        a = ddp_state[k]
        if k.endswith("attn.qkv.bias"):
            a, v = torch.cat([a[:d], a[2 * d:]]), torch.cat([v[:d], v[2 * d:]])
        torch.testing.assert_close(a, v, atol=2e-5, rtol=1e-4, msg=k)


def test_evaluate_split_covers_every_window_once():
    model = fresh_model().eval()
    ids = torch.arange(16 * 5 + 1) % 20
    loss = kvlab.train.evaluate_split(model, ids, 16, batch_size=2)
    x, y = ids[:-1].view(5, 16), ids[1:].view(5, 16)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    assert loss == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="block_size"):
        kvlab.train.evaluate_split(model, ids[:10], 16)


def test_export_and_load_round_trip(tmp_path):
    from kvlab.pretrained import load_shakespeare

    model = fresh_model().eval()
    tok = kvlab.CharTokenizer.from_text("abcdefghijklmnopqrst")
    kvlab.train.export_model(tmp_path, model, tok, {"val_nats_per_char": 1.5})
    loaded, tok2 = load_shakespeare(tmp_path)
    assert loaded.record == {"val_nats_per_char": 1.5} and tok2.encode("abc") == tok.encode("abc")
    x = torch.randint(0, 20, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "record.json",
                                                          "tokenizer.json"]
    with pytest.raises(FileNotFoundError, match="nowhere: no such folder"):
        load_shakespeare(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty is not an exported kvlab model: missing model.safetensors"):
        load_shakespeare(tmp_path / "empty")


@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_on_cuda_follows_native_bf16(monkeypatch, capability, expected):
    # A T4 (7.5) emulates bf16 slowly: it must get fp16 with a gradient scaler.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert precision_for(torch.device("cuda")) == expected


def test_evaluate_split_with_a_start_token_predicts_every_token_from_bos_and_the_window():
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = kvlab.GPT(kvlab.GPTConfig(vocab_size=12, max_seq_len=8, d_model=16, n_layers=1, n_heads=2)).eval()
    ids = torch.randint(0, 11, (21,))
    got = kvlab.train.evaluate_split(model, ids, 4, batch_size=2, bos=11)
    windows = ids[:20].view(5, 4)  # 5 windows of 4 tokens; the 21st token is left over
    x = torch.cat([torch.full((5, 1), 11), windows[:, :-1]], dim=1)
    with torch.no_grad():
        want = F.cross_entropy(model(x).flatten(0, 1), windows.flatten()).item()
    assert got == pytest.approx(want, rel=1e-5)
