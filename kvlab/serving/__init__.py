"""Serving many requests: a small vLLM in four parts.

- `block_manager`: which pool blocks each request holds (allocate, append a slot, free, holder
  counts) and a prefix cache keyed by a hash of each full block and everything before it;
- `scheduler`: the waiting queue and running batch; admit, make room, preempt the newest;
- `model_runner`: the slot mapping, the paged write and the paged read, inside one forward
  pass through the model's own blocks, in the padded (B, T) or the packed layout;
- `engine`: `Engine` (submit / step / result / run), whose `step` calls the three in order,
  and `generate_batch` for a list of prompts of different lengths.

The storage and the paged attentions themselves are in kvlab.paged. Built in chapter 9.
"""

from .block_manager import BlockManager, block_hashes, match_prefix
from .engine import Engine, generate_batch, mixed_workload
from .model_runner import ModelRunner, PagedLayerCache, forward_packed, forward_paged
from .scheduler import Request, Scheduler

forward_rows = forward_paged  # the name chapter 9 used before the split

__all__ = ["Engine", "generate_batch", "mixed_workload", "BlockManager", "block_hashes", "match_prefix",
           "Scheduler", "Request", "ModelRunner", "PagedLayerCache", "forward_paged", "forward_packed",
           "forward_rows"]
