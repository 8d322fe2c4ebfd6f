"""Checks for chapter 6's exercises: the learning-rate schedule, weighting unequal
micro-batches, the loss of a fresh BPE model in nats per character, and the dropout experiment.

The schedule is compared with `kvlab.train.lr_at` at every step of several schedules. The two
value answers are computed live on the reader's machine: the BPE is trained on the training
split, and the dropout experiment is run again with the recipe the exercise states. Models are
built and trained inside `torch.random.fork_rng`, so a check never moves the notebook's random
state. Built in chapter 6.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ...gpt import GPT, GPTConfig
from ._common import call_learner, learner_check, passed, require_answer

# kvlab.train is imported inside each check, not here: kvlab/__init__ imports the checks, and a
# module-level import would load kvlab.train with the package, which makes `python -m kvlab.train`
# run a module that is already imported (see _LAZY in kvlab/__init__.py).

__all__ = ["check_lr_at", "check_accum_weights", "check_init_loss_per_char", "check_dropout_gap"]


# --------------------------------------------------------------------------- the schedule

# (warmup, max_steps, lr, min_lr): typical, short warmup, no warmup, min_lr = 0, lr = min_lr.
_SCHEDULES = [(10, 100, 1e-3, 1e-4), (1, 20, 3e-3, 3e-4), (0, 50, 1.0, 0.1), (30, 300, 6e-4, 0.0),
              (5, 40, 2e-3, 2e-3)]


@learner_check
def check_lr_at(fn: Callable) -> None:
    """`fn(step, warmup, max_steps, lr, min_lr) -> float`: the rate for 0-based optimizer step
    `step`, equal to `kvlab.train.lr_at` for every step from 0 to past max_steps."""
    from ...train import TrainConfig, lr_at

    for warmup, max_steps, lr, min_lr in _SCHEDULES:
        cfg = TrainConfig(warmup_steps=warmup, max_steps=max_steps, lr=lr, min_lr=min_lr)
        args = f"warmup={warmup}, max_steps={max_steps}, lr={lr}, min_lr={min_lr}"
        for step in range(max_steps + 5):
            got = call_learner(fn, step, warmup, max_steps, lr, min_lr, name="my_lr_at",
                               without=("learning-rate schedule", [lr_at]))
            if isinstance(got, torch.Tensor) and got.numel() == 1:
                got = got.item()
            if isinstance(got, bool) or not isinstance(got, (int, float)):
                raise AssertionError(f"my_lr_at(step={step}, {args}) returned {type(got).__name__}; "
                                     "return a Python float.")
            expected = lr_at(step, cfg)
            if math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-12):
                continue
            where = f"my_lr_at(step={step}, {args}) = {got:.6g}, expected {expected:.6g}"
            if step < warmup:
                if step == 0 and got == 0:
                    raise AssertionError(f"{where}. A rate of 0 at step 0 wastes a step: the warmup "
                                         "should reach lr at its last step (step warmup - 1), with the "
                                         "first step already a fraction of lr.")
                raise AssertionError(f"{where}. During warmup (steps 0..warmup-1) the rate grows linearly "
                                     "from lr/warmup to lr: check your formula and its off-by-one.")
            if step >= max_steps:
                raise AssertionError(f"{where}. After the schedule ends the rate should stay at min_lr: "
                                     "how far along the cosine are you at step max_steps?")
            raise AssertionError(f"{where}. After warmup the rate follows half a cosine, from lr at step "
                                 "`warmup` down to min_lr at step max_steps: check where the cosine "
                                 "starts, its period and what it ends at.")
    passed("my_lr_at")


# --------------------------------------------------------------------------- unequal micro-batches

# Window counts of the micro-batches; the unequal ones are where a rule of 1/k goes wrong.
_ACCUM_CASES = [[16, 16, 16, 8], [8, 8], [1, 31], [5, 5, 5], [32], [3, 7, 2, 9, 1]]


def _as_floats(got, what: str) -> list[float]:
    if isinstance(got, torch.Tensor):
        got = got.tolist()
    if not isinstance(got, (list, tuple)) or not all(
            isinstance(g, (int, float)) and not isinstance(g, bool) for g in got):
        raise AssertionError(f"{what} returned {got!r}; return a list of numbers, one weight per micro-batch.")
    return [float(g) for g in got]


@learner_check
def check_accum_weights(fn: Callable) -> None:
    """`fn(sizes) -> list of floats`: the factor each micro-batch's mean loss is multiplied by
    before `backward()`, so that the accumulated gradient equals the gradient of the mean loss
    over all the windows together (micro-batch i holds sizes[i] windows of equal length)."""
    for sizes in _ACCUM_CASES:
        call = f"my_accum_weights({sizes})"
        got = _as_floats(call_learner(fn, list(sizes), name="my_accum_weights"), call)
        if len(got) != len(sizes):
            raise AssertionError(f"{call} returned {len(got)} weights for {len(sizes)} micro-batches.")
        total = sum(sizes)
        expected = [n / total for n in sizes]
        if all(math.isclose(g, e, rel_tol=1e-6, abs_tol=1e-9) for g, e in zip(got, expected)):
            continue
        k = len(sizes)
        if all(math.isclose(g, 1 / k, rel_tol=1e-6) for g in got):
            raise AssertionError(f"{call} = {got}: equal weights of 1/k are right only when every micro-batch "
                                 "holds the same number of windows. Here a window in a short micro-batch would "
                                 "count for more than a window in a full one.")
        if not math.isclose(sum(got), 1.0, rel_tol=1e-6):
            raise AssertionError(f"{call}: your weights add up to {sum(got):.4g}. The big batch's loss is one mean "
                                 "over all its windows, and the gradient of a mean is a mean: how much of that "
                                 "mean does each micro-batch's own mean make up?")
        raise AssertionError(f"{call} = {got}: the weights add up to 1 but are not shared out right. Each "
                             "micro-batch's mean loss covers sizes[i] windows of the whole batch.")
    passed("my_accum_weights")


# --------------------------------------------------------------------------- a fresh BPE model


def _bpe_init_loss() -> dict[str, float]:
    """ln V for chapter 1's BPE-1,024 and the validation text's characters per token, measured."""
    from ...data import load_shakespeare_text, train_val_split
    from ...tokenizers import BPETokenizer

    train_text, val_text = train_val_split(load_shakespeare_text())
    bpe = BPETokenizer.train(train_text, vocab_size=1024)
    chars_per_token = len(val_text) / len(bpe.encode(val_text))
    return dict(ln_v=math.log(bpe.vocab_size), chars_per_token=chars_per_token)


@learner_check
def check_init_loss_per_char(answer) -> None:
    """`answer`: the loss, in nats per character of the validation text, of a freshly initialised
    GPT (near-uniform predictions) over chapter 1's BPE-1,024 ids. Computed live: the BPE is
    trained on the training split and the validation text encoded with it."""
    value = require_answer(answer, "my_init_loss_per_char")
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AssertionError(f"my_init_loss_per_char should be a number (nats per character), got "
                             f"{type(value).__name__}.")
    ref = _bpe_init_loss()
    expected = ref["ln_v"] / ref["chars_per_token"]
    if math.isclose(value, expected, rel_tol=0.01):
        passed("my_init_loss_per_char")
        return
    if math.isclose(value, ref["ln_v"], rel_tol=0.01):
        raise AssertionError(f"{value:.3f} is the loss per *token*. A BPE token covers more than one character, "
                             "and the question asks per character: the same total loss, shared over how many "
                             "characters?")
    if math.isclose(value, ref["ln_v"] * ref["chars_per_token"], rel_tol=0.01):
        raise AssertionError(f"{value:.3f} is larger than the loss per token, but each token carries several "
                             "characters: per character the loss must be smaller than per token.")
    if math.isclose(value, math.log(65), rel_tol=0.01):
        raise AssertionError(f"{value:.3f} is ln 65, the fresh *character* model. A fresh model guesses uniformly "
                             "over its own vocabulary: which one is it here?")
    raise AssertionError(f"{value:.3f} is not it. Start from what a fresh model scores per token over a "
                         "vocabulary of V ids, then convert with the characters per token of the validation "
                         "text under this BPE (measure it).")


# --------------------------------------------------------------------------- dropout experiment

# The experiment the exercise states: a small model on the first 3,000 training characters,
# trained 200 steps with and without dropout, evaluated on those characters and on the first
# 10,000 validation characters. One place for the numbers, so the check and the page agree.
_DROPOUT_RECIPE = dict(
    train_chars=3000, val_chars=10_000, dropouts=(0.0, 0.3), seed=0,
    model=dict(max_seq_len=32, d_model=64, n_layers=2, n_heads=4),
    train=dict(batch_size=16, block_size=32, max_steps=200, warmup_steps=10, lr=3e-3, min_lr=3e-4,
               eval_interval=200, eval_batches=1, progress=False, seed=0),
)


def _dropout_runs() -> dict[float, tuple[float, float]]:
    """Run the recipe on the CPU: {dropout: (train loss, val loss)} in nats per character."""
    from ...data import load_shakespeare_text, train_val_split
    from ...tokenizers import CharTokenizer
    from ...train import TrainConfig, evaluate_split, train

    train_text, val_text = train_val_split(load_shakespeare_text())
    tok = CharTokenizer.from_text(train_text)
    r = _DROPOUT_RECIPE
    train_part = torch.tensor(tok.encode(train_text))[: r["train_chars"]]
    val_part = torch.tensor(tok.encode(val_text))[: r["val_chars"]]
    cfg = TrainConfig(**r["train"])
    out = {}
    with torch.random.fork_rng(devices=[]):
        for p in r["dropouts"]:
            torch.manual_seed(r["seed"])
            model = GPT(GPTConfig(vocab_size=tok.vocab_size, dropout=p, **r["model"]))
            train(model, train_part, val_part, cfg, device="cpu")
            out[p] = (evaluate_split(model, train_part, cfg.block_size),
                      evaluate_split(model, val_part, cfg.block_size))
    return out


@learner_check
def check_dropout_gap(gap_shrink, lower_val_dropout) -> None:
    """`gap_shrink`: how much smaller the gap (val loss - train loss) is with dropout 0.3 than
    with dropout 0, in nats per character; `lower_val_dropout`: 0.0 or 0.3, the run with the
    lower validation loss. Both checked against the experiment run again live (tolerance 0.03
    nats; a validation difference under 0.01 accepts either choice)."""
    shrink = require_answer(gap_shrink, "my_gap_shrink")
    choice = require_answer(lower_val_dropout, "my_lower_val_dropout")
    if isinstance(shrink, bool) or not isinstance(shrink, (int, float)):
        raise AssertionError(f"my_gap_shrink should be a number of nats per character, got {type(shrink).__name__}.")
    low, high = _DROPOUT_RECIPE["dropouts"]
    if choice not in (low, high):
        raise AssertionError(f"my_lower_val_dropout should be {low} or {high}, got {choice!r}.")
    runs = _dropout_runs()
    gap = {p: val - tr for p, (tr, val) in runs.items()}
    expected = gap[low] - gap[high]
    tol = 0.03
    if abs(shrink - expected) > tol:
        if abs(shrink + expected) <= tol:
            raise AssertionError(f"my_gap_shrink = {shrink:.3f} has the wrong sign: the question is how much "
                                 f"*smaller* the gap is with dropout {high} (gap at {low} minus gap at {high}).")
        if any(abs(shrink - g) <= tol for g in gap.values()):
            raise AssertionError(f"my_gap_shrink = {shrink:.3f} is one run's gap, not the change in the gap "
                                 "between the two runs.")
        val_change = runs[low][1] - runs[high][1]
        if abs(shrink - val_change) <= tol or abs(shrink + val_change) <= tol:
            raise AssertionError(f"my_gap_shrink = {shrink:.3f} compares the validation losses only; the gap is "
                                 "val minus train within each run.")
        raise AssertionError(f"my_gap_shrink = {shrink:.3f} does not match the experiment run again here. Follow "
                             "the recipe exactly (seeds, slices, evaluate_split on both parts).")
    val_low, val_high = runs[low][1], runs[high][1]
    if abs(val_low - val_high) >= 0.01:
        right = low if val_low < val_high else high
        if choice != right:
            raise AssertionError(f"my_lower_val_dropout = {choice}: compare the two runs' *validation* losses, "
                                 "not their gaps. A smaller gap can come from a higher training loss.")
    passed("my_gap_shrink and my_lower_val_dropout")
