"""The scheduler: who waits, who runs, and who gives their blocks back when the pool runs dry.

Requests wait in a queue (first come, first served) and run in a list kept in order of
admission. Every step, `schedule()` first makes room for each running request's next token
(a new block when its last one is full); when a block is needed and none is free, it preempts
the request admitted most recently, which gives all its blocks back and returns to the front
of the queue, keeping the tokens it generated (it recomputes their keys and values when it is
readmitted). Then it admits waiting requests while the batch has room and free blocks hold
their tokens. After the forward, `postprocess` appends each request's new token and retires
the finished ones. Built in chapter 9.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..sampling import SamplingConfig
from .block_manager import BlockManager

__all__ = ["Request", "Scheduler"]


@dataclass
class Request:
    """One request's settings and progress. `tokens` is prompt + generated so far; the first
    `n_cached` of them have their keys and values in the blocks of `table`."""

    id: int
    prompt_len: int
    max_new_tokens: int
    sampling: SamplingConfig  # temperature, top_k, top_p, min_p and the request's own generator
    eos_id: int | None
    tokens: list[int]
    n_cached: int = 0
    table: list[int] = field(default_factory=list)

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def finished(self) -> bool:
        return self.n_generated >= self.max_new_tokens or (self.n_generated > 0 and self.tokens[-1] == self.eos_id)


class Scheduler:
    """Waiting queue, running list and the block manager; `schedule` picks each step's batch.
    Built in chapter 9."""

    def __init__(self, blocks: BlockManager, max_batch_size: int):
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in order of admission: the last is the newest
        self.preemptions = 0  # how many times a request was sent back to the queue

    def add(self, r: Request) -> None:
        self.waiting.append(r)

    def preempt(self, victim: Request) -> None:
        """Send a running request back to the front of the queue, its blocks to the pool."""
        self.running.remove(victim)
        self.blocks.free(victim)
        self.waiting.appendleft(victim)
        self.preemptions += 1

    def schedule(self) -> list[Request]:
        """Make room for every running request's next token (preempting the newest when the pool
        is dry), admit waiting requests, and return this step's batch."""
        for r in list(self.running):  # oldest first: they keep their blocks
            while r in self.running and not self.blocks.append_slot(r):
                self.preempt(self.running[-1])  # the newest; possibly r itself
        while self.waiting and len(self.running) < self.max_batch_size and self.blocks.can_allocate(self.waiting[0]):
            r = self.waiting.popleft()
            self.blocks.allocate(r)
            self.running.append(r)
        return list(self.running)

    def postprocess(self, batch: list[Request], tokens: list[int]) -> list[Request]:
        """Each request in `batch` has its keys cached and takes its new token; the finished ones
        leave the running list and give their blocks back. Returns them."""
        done = []
        for r, token in zip(batch, tokens):
            r.n_cached = len(r.tokens)
            r.tokens.append(token)
            if r.finished:
                self.running.remove(r)
                self.blocks.free(r)
                done.append(r)
        return done
