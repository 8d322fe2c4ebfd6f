"""Chapter 11's model family: one shape, four ways to attend, one training recipe.

    mha        multi-head attention, 4 heads of 32: the baseline
    gqa        grouped-query attention, 2 key/value heads
    mqa        multi-query attention, 1 key/value head
    mla        latent attention (DeepSeek-V2): a 48-wide latent plus a 16-wide RoPE key
    mha-seed2  the baseline again with another seed (weights and batch order): the seed noise

Every member is a 4-layer, width-128 character model with RoPE (and a 128-position window, so a
sliding cache can take it past its training length, as the shipped model). Parameter counts are
matched by the MLP: a member whose attention has fewer weights gets a wider MLP (`d_ff`), so
every member has the baseline's parameters to within 0.1%. Cache numbers per token and layer:
MHA 2·4·32 = 256, GQA 128, MQA 64, MLA 48 + 16 = 64 (a quarter of MHA's, MQA's size).

Every training window begins with a start token (BOS_CHAR, id 65, after the 65 characters of
Tiny Shakespeare in the shipped model's order), as real models always see a BOS first; the shipped
model's windows start anywhere in the text, and it has no attention sink. Validation loss is per
character over windows of BOS + 128 characters (`evaluate_split(..., bos=...)`), every character
predicted once, the first of each window from BOS alone.

Same data order, steps, tokens and optimizer for every member; seed 1337 for weights and batches
(1338 for mha-seed2). `scripts/train_cache_family.py` trains and records them. Built in chapter 11.
"""

from __future__ import annotations

from ..gpt import GPTConfig
from ..tokenizers import CharTokenizer
from .config import TrainConfig

__all__ = ["BOS_CHAR", "FAMILY_SHAPE", "CACHE_FAMILY", "FAMILY_RUNS", "FAMILY_TRAIN", "family_tokenizer",
           "family_config", "family_train_config"]

BOS_CHAR = "\x02"  # ASCII "start of text": never in Tiny Shakespeare, invisible if ever printed

FAMILY_SHAPE = dict(vocab_size=66, max_seq_len=128, d_model=128, n_layers=4, n_heads=4, pos="rope", window=128,
                    dropout=0.0)

# name -> what differs from FAMILY_SHAPE. d_ff 512 (4C) for the baseline; wider where attention is smaller.
CACHE_FAMILY: dict[str, dict] = {
    "mha": dict(d_ff=512),
    "gqa": dict(n_kv_heads=2, d_ff=576),
    "mqa": dict(n_kv_heads=1, d_ff=608),
    "mla": dict(attention="mla", kv_latent_dim=48, rope_head_dim=16, d_ff=528),
}

# run name -> (family member, seed)
FAMILY_RUNS: dict[str, tuple[str, int]] = {
    "mha": ("mha", 1337), "gqa": ("gqa", 1337), "mqa": ("mqa", 1337), "mla": ("mla", 1337),
    "mha-seed2": ("mha", 1338),
}

# The recipe all runs share (the seed aside): 1200 steps of 32 windows of 128 (4.9M tokens, about 4.9
# epochs of the 1.0M training characters), about nine minutes of one core a run (measured on a 2-core
# Intel Xeon, two runs at a time: 524 to 553 s a run, 960 to 977 s while other work shared the cores;
# `scripts/train_cache_family.py --estimate` measures again).
FAMILY_TRAIN = dict(batch_size=32, block_size=128, max_steps=1200, lr=2e-3, min_lr=2e-4, warmup_steps=100,
                    eval_interval=200, eval_batches=8, checkpoint_interval=200, precision="fp32", progress=False,
                    bos_id=65)


def family_tokenizer(text: str) -> CharTokenizer:
    """The characters of `text` in sorted order (the shipped model's 65 ids for Tiny Shakespeare),
    then BOS_CHAR. Built in chapter 11."""
    if BOS_CHAR in text:
        raise ValueError("the text contains BOS_CHAR (\\x02), which the family reserves as its start token")
    return CharTokenizer(sorted(set(text)) + [BOS_CHAR])


def family_config(name: str) -> GPTConfig:
    """The GPTConfig of a family member ("mha", "gqa", "mqa", "mla"). Built in chapter 11."""
    if name not in CACHE_FAMILY:
        raise ValueError(f"unknown family member {name!r}; choose from {sorted(CACHE_FAMILY)}")
    return GPTConfig(**{**FAMILY_SHAPE, **CACHE_FAMILY[name]})


def family_train_config(seed: int, **overrides) -> TrainConfig:
    """The family's TrainConfig with `seed` (and any field overridden, e.g. max_steps for a smoke
    run). Built in chapter 11."""
    return TrainConfig(**{**FAMILY_TRAIN, "seed": seed, **overrides})
