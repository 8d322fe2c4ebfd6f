"""Train chapter 11's model family (kvlab.train.family) on Tiny Shakespeare characters and record it.

    KVLAB_SHAKESPEARE=/path/to/input.txt python scripts/train_cache_family.py

trains the runs mha, gqa, mqa, mla and mha-seed2 one after another with kvlab's training loop
(same data order, steps, tokens and optimizer; one thread by default), then

- exports the four members (not mha-seed2: its loss is the seed noise, its weights stay in RUNS) in
  float16 to OUT/NAME, each loadable with `kvlab.load_shakespeare("OUT/NAME")`;
- writes OUT/record.json: per run the parameters, KV bytes per token, validation (and train) loss
  per character, steps, tokens, wall time; the shared settings; the command lines that made it.

Resumable: each run checkpoints to RUNS/NAME/checkpoint.safetensors every 200 steps and keeps its
result in RUNS/NAME/result.json; run the same command again and finished runs are skipped, an
interrupted one continues from its checkpoint. Nothing is overwritten silently: a checkpoint,
result, exported model or record made with other settings is an error naming it (move it away).
Every file is written to a temporary name and renamed.

    --estimate     time 20 steps of each member and print the estimated total; writes nothing
    --steps N      a smoke run of N steps per run (needs --out and --runs outside data/)
    --only a,b     only these runs (the record keeps the others' finished results)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from kvlab.data import load_shakespeare_text, train_val_split
from kvlab.device import describe_device
from kvlab.gpt import GPT
from kvlab.latent import kv_bytes_per_token
from kvlab.train import evaluate_split, export_model, read_checkpoint_header, train
from kvlab.train.family import (BOS_CHAR, CACHE_FAMILY, FAMILY_RUNS, FAMILY_SHAPE, family_config, family_tokenizer,
                                family_train_config)

SHIPPED = ("mha", "gqa", "mqa", "mla")  # exported as float16; mha-seed2 is recorded only
DEFAULT_OUT, DEFAULT_RUNS = "data/cache_family", "runs/cache_family"
EVAL = ("evaluate_split(bos=65) over consecutive windows of BOS + 128 characters: the last 10% of the text "
        "(val) and its first len(val) characters (train); every character predicted once, the first of a "
        "window from BOS alone. val_nats_per_char: the float16 weights as shipped; _fp32: before rounding")


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def settings_of(name: str, steps: int | None, text_sha: str) -> dict:
    """Everything a run's numbers depend on: refuse to mix files made with other settings."""
    member, seed = FAMILY_RUNS[name]
    overrides = {"max_steps": steps} if steps is not None else {}
    return {"member": member, "seed": seed, "model_config": family_config(member).to_dict(),
            "train_config": family_train_config(seed, **overrides).to_dict(), "bos_char": BOS_CHAR,
            "text_sha256": text_sha}


def check_same(path: Path, stored: dict, expected: dict) -> None:
    if stored != expected:
        differ = sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))
        raise SystemExit(f"{path} was made with other settings (differing: {', '.join(differ)}); move it away "
                         "to train again, or run with the settings that made it")


def run_one(name: str, settings: dict, data: dict, runs: Path) -> dict:
    """Train (or resume, or skip) one run; return its result (also in RUNS/NAME/result.json)."""
    folder = runs / name
    result_path = folder / "result.json"
    result = read_json(result_path)
    if result is not None:
        check_same(result_path, result["settings"], settings)
        print(f"{name}: finished earlier ({result_path}), val {result['val_nats_per_char']:.4f} nats/char")
        return result
    config = family_config(settings["member"])
    cfg = family_train_config(settings["seed"], max_steps=settings["train_config"]["max_steps"])
    ckpt = folder / "checkpoint.safetensors"
    resume = None
    if ckpt.is_file():
        header = read_checkpoint_header(ckpt)
        stored = {"model_config": header["model_config"].to_dict(), "train_config": header["train_config"].to_dict(),
                  "extra": header["extra"].get("settings")}
        check_same(ckpt, stored, {"model_config": config.to_dict(), "train_config": cfg.to_dict(), "extra": settings})
        resume = ckpt
        print(f"{name}: resuming from step {header['step']} ({ckpt})")
    torch.manual_seed(cfg.seed)  # the initial weights (train() seeds batches and dropout itself)
    model = GPT(config)
    params = model.num_params()
    print(f"{name}: {params:,} parameters, {kv_bytes_per_token(config)} bytes/token of KV cache (float32), "
          f"{cfg.max_steps} steps")
    history = train(model, data["train"], data["val"], cfg, device="cpu", out_dir=folder, resume_from=resume,
                    extra={"settings": settings, "tokenizer": "char+bos"})
    bos = cfg.bos_id
    val32 = evaluate_split(model, data["val"], cfg.block_size, bos=bos)
    model.half().float()  # the weights as float16 storage gives them back
    result = {
        "settings": settings, "parameters": params,
        "kv_bytes_per_token": {"float32": kv_bytes_per_token(config), "float16": kv_bytes_per_token(config, torch.float16)},
        "val_nats_per_char": round(evaluate_split(model, data["val"], cfg.block_size, bos=bos), 4),
        "val_nats_per_char_fp32": round(val32, 4),
        "train_nats_per_char": round(evaluate_split(model, data["train"][:len(data["val"])], cfg.block_size, bos=bos), 4),
        "steps": history.steps[-1], "tokens_seen": history.tokens[-1], "wall_time_s": round(history.elapsed[-1], 1),
        "val_curve": {"steps": history.val_steps, "loss": [round(v, 4) for v in history.val_loss]},
    }
    write_json(result_path, result)
    print(f"{name}: val {result['val_nats_per_char']:.4f} nats/char (float16 weights), {result['wall_time_s']} s")
    return result


def export(name: str, result: dict, data: dict, out: Path, shared: dict) -> None:
    """Write OUT/NAME in float16 from the run's final checkpoint, unless it is there already."""
    from kvlab.train import load_checkpoint

    folder = out / name
    record = {**shared, "run": name, **{k: v for k, v in result.items() if k != "settings"},
              "settings": result["settings"]}
    existing = read_json(folder / "record.json")
    if existing is not None:
        check_same(folder / "record.json", existing.get("settings", {}), result["settings"])
    model = load_checkpoint(Path(shared["runs_dir"]) / name / "checkpoint.safetensors")["model"].eval()
    export_model(folder, model.half(), data["tokenizer"], record)


def estimate(data: dict, steps: int) -> None:
    """Time 20 training steps of each member (after 3 to warm up) and print the estimated total.

    Times are this process's CPU seconds (`time.process_time`), which on one thread is the time the
    run takes on a core of its own, however busy the machine is now; wall seconds are printed too."""
    from kvlab.data import get_batch
    from kvlab.train import configure_optimizer

    total = 0.0
    for name, (member, seed) in FAMILY_RUNS.items():
        cfg = family_train_config(seed)
        torch.manual_seed(seed)
        model = GPT(family_config(member)).train()
        optimizer = configure_optimizer(model, cfg)
        gen = torch.Generator().manual_seed(seed)
        clocks = []
        for i in range(23):
            if i == 3:
                clocks.append((time.process_time(), time.perf_counter()))
            x, y = get_batch(data["train"], cfg.batch_size, cfg.block_size, generator=gen, bos=cfg.bos_id)
            _, loss = model(x, targets=y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        clocks.append((time.process_time(), time.perf_counter()))
        per_step, wall_step = ((b - a) / 20 for a, b in zip(*clocks))
        model.eval()
        c0 = time.process_time()
        evaluate_split(model, data["val"][: 32 * 128], 128, bos=cfg.bos_id)  # one batch of 32 windows
        per_eval_batch = time.process_time() - c0
        # the steps, estimate_loss every eval_interval steps (eval_batches each), and the three
        # evaluate_split passes over ~28 batches each (val in float32 and float16, train)
        evals = cfg.eval_batches * steps / cfg.eval_interval + 3 * 28
        run = per_step * steps + per_eval_batch * evals
        total += run
        print(f"{name}: {per_step * 1000:.0f} ms/step CPU ({wall_step * 1000:.0f} wall), {per_eval_batch * 1000:.0f} ms "
              f"per eval batch -> {run / 60:.1f} min for {steps} steps")
    print(f"estimated total: {total / 60:.1f} min of one core ({torch.get_num_threads()} thread(s))")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", default=DEFAULT_OUT, help="where the exported models and record.json go")
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="checkpoints and per-run results")
    parser.add_argument("--steps", type=int, default=None, help="a smoke run of this many steps per run")
    parser.add_argument("--only", default=None, help=f"comma-separated runs (of {', '.join(FAMILY_RUNS)})")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--estimate", action="store_true", help="time 20 steps per member; write nothing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = list(FAMILY_RUNS) if args.only is None else args.only.split(",")
    unknown = [n for n in names if n not in FAMILY_RUNS]
    if unknown:
        parser.error(f"--only: unknown runs {unknown}; choose from {list(FAMILY_RUNS)}")
    if args.steps is not None:
        if args.steps < 1:
            parser.error("--steps must be >= 1")
        if Path(args.out).resolve() == Path(DEFAULT_OUT).resolve() or Path(args.runs).resolve() == Path(
                DEFAULT_RUNS).resolve():
            parser.error("a smoke run (--steps) must not write where the real family goes: pass --out and --runs")

    text = load_shakespeare_text()
    text_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    tokenizer = family_tokenizer(text)
    assert tokenizer.stoi[BOS_CHAR] == FAMILY_SHAPE["vocab_size"] - 1 == family_train_config(0).bos_id
    train_text, val_text = train_val_split(text)
    data = {"train": torch.tensor(tokenizer.encode(train_text)), "val": torch.tensor(tokenizer.encode(val_text)),
            "tokenizer": tokenizer}
    steps = args.steps or family_train_config(0).max_steps
    if args.estimate:
        estimate(data, steps)
        return 0

    out, runs = Path(args.out), Path(args.runs)
    command = shlex.join(["python", *sys.argv])
    record_path = out / "record.json"
    old = read_json(record_path) or {}
    if old and (old.get("shape"), old.get("members"), old.get("smoke")) != (FAMILY_SHAPE, CACHE_FAMILY,
                                                                             args.steps is not None):
        raise SystemExit(f"{record_path} describes another family or kind of run; move it away")
    results = {}
    for name in FAMILY_RUNS:  # finished results of runs not asked for this time stay in the record
        settings = settings_of(name, args.steps, text_sha)
        if name in names:
            results[name] = run_one(name, settings, data, runs)
        elif (found := read_json(runs / name / "result.json")) is not None:
            check_same(runs / name / "result.json", found["settings"], settings)
            results[name] = found
    shared = {
        "what": "chapter 11's model family (kvlab.train.family): one shape, four attention kinds, one recipe",
        "shape": FAMILY_SHAPE, "members": CACHE_FAMILY, "bos": {"char": BOS_CHAR, "id": tokenizer.stoi[BOS_CHAR]},
        "eval": EVAL, "smoke": args.steps is not None, "runs_dir": str(runs),
        "hardware": f"{describe_device(torch.device('cpu'))} ({platform.processor() or platform.machine()}), "
                    f"{args.threads} thread(s)",
        "torch": torch.__version__,
    }
    for name in SHIPPED:
        if name in results:
            export(name, results[name], data, out, shared)
    record = {**shared, "runs": {n: {k: v for k, v in r.items() if k != "settings"} | {"seed": r["settings"]["seed"]}
                                 for n, r in results.items()},
              "train_config": family_train_config(0, **({"max_steps": args.steps} if args.steps else {})).to_dict()
              | {"seed": "1337 (1338 for mha-seed2)"},
              # read again: another process (--only other runs) may have written the record meanwhile
              "commands": list(dict.fromkeys((read_json(record_path) or old).get("commands", [])
                                             + [f"KVLAB_SHAKESPEARE=... {command}"]))}
    if "mha" in results and "mha-seed2" in results:
        record["seed_noise_val_nats_per_char"] = round(abs(results["mha"]["val_nats_per_char"]
                                                           - results["mha-seed2"]["val_nats_per_char"]), 4)
    write_json(record_path, record)
    print(f"wrote {record_path}")
    for name, r in results.items():
        print(f"  {name:10s} {r['parameters']:>9,} params  {r['kv_bytes_per_token']['float16']:>5} B/token (fp16)  "
              f"val {r['val_nats_per_char']:.4f} nats/char")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
