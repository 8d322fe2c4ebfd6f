"""Train the small draft model that chapter 10 pairs with the shipped Shakespeare model.

The draft shares the shipped model's character tokenizer (the same 65 ids) and, like it, uses
RoPE with a 128-position window, so it can follow generations longer than its training
windows. It is one layer of width 128 (about 1/15 of the target's parameters), trained for a
few minutes on a CPU with kvlab's training loop:

    KVLAB_SHAKESPEARE=/path/to/input.txt python scripts/train_draft.py --out data/shakespeare_draft

writes model.safetensors, config.json, tokenizer.json and record.json there, readable with
`kvlab.load_shakespeare(path)`.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from kvlab.data import load_shakespeare_text, train_val_split
from kvlab.device import describe_device
from kvlab.gpt import GPT, GPTConfig
from kvlab.pretrained import load_shakespeare
from kvlab.train import TrainConfig, evaluate_split, export_model, train


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/shakespeare_draft")
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _, tokenizer = load_shakespeare()  # the shipped model's tokenizer: the draft must share its ids
    train_text, val_text = train_val_split(load_shakespeare_text())
    train_ids = torch.tensor(tokenizer.encode(train_text))
    val_ids = torch.tensor(tokenizer.encode(val_text))
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, max_seq_len=128, d_model=128, n_layers=1, n_heads=2,
                       pos="rope", window=128, dropout=0.0)
    model = GPT(config)
    cfg = TrainConfig(batch_size=32, block_size=128, max_steps=args.max_steps, lr=3e-3, min_lr=3e-4,
                      warmup_steps=100, eval_interval=250, eval_batches=8, precision="fp32", seed=0, progress=False)
    start = time.perf_counter()
    history = train(model, train_ids, val_ids, cfg, device="cpu")
    wall = time.perf_counter() - start
    val_loss = evaluate_split(model, val_ids, cfg.block_size)
    record = {
        "what": "the draft model for chapter 10's speculative decoding (scripts/train_draft.py)",
        "parameters": model.num_params(), "steps": history.steps[-1], "wall_time_s": round(wall, 1),
        "hardware": f"{describe_device(torch.device('cpu'))} ({platform.processor() or platform.machine()}), "
                    f"{args.threads} thread(s), machine shared with other jobs",
        "torch": torch.__version__, "val_nats_per_char": round(val_loss, 4),
        "eval": "evaluate_split over consecutive 128-character windows of the last 10% of the text",
        "train_config": cfg.to_dict(),
    }
    export_model(args.out, model.eval(), tokenizer, record)
    print(record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
