"""Checks for chapter 6's exercises: the learning-rate schedule, AdamW's parameter groups,
cross-entropy by hand and global gradient clipping.

Each check compares the learner's function with kvlab's or PyTorch's own (`kvlab.train.lr_at`,
`kvlab.train.configure_optimizer`, `F.cross_entropy`, `torch.nn.utils.clip_grad_norm_`) on
several sizes and edge cases. Inputs come from private `torch.Generator`s and models are built
inside `torch.random.fork_rng`, so a check never moves the notebook's random state. Built in
chapter 6.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..gpt import GPT, GPTConfig
from ._common import call_learner, close, passed, learner_check

# kvlab.train is imported inside each check, not here: kvlab/__init__ imports the checks, and a
# module-level import would load kvlab.train with the package, which makes `python -m kvlab.train`
# run a module that is already imported (see _LAZY in kvlab/__init__.py).

__all__ = ["check_lr_at", "check_param_groups", "check_cross_entropy", "check_clip_grad_norm"]


# --------------------------------------------------------------------------- the schedule

# (warmup, max_steps, lr, min_lr): typical, short warmup, no warmup, min_lr = 0, lr = min_lr.
_SCHEDULES = [(10, 100, 1e-3, 1e-4), (1, 20, 3e-3, 3e-4), (0, 50, 1.0, 0.1), (30, 300, 6e-4, 0.0),
              (5, 40, 2e-3, 2e-3)]


@learner_check
def check_lr_at(fn: Callable) -> None:
    """`fn(step, warmup, max_steps, lr, min_lr) -> float`: the rate for 0-based optimizer step
    `step`, equal to `kvlab.train.lr_at` for every step from 0 to past max_steps."""
    from ..train import TrainConfig, lr_at

    for warmup, max_steps, lr, min_lr in _SCHEDULES:
        cfg = TrainConfig(warmup_steps=warmup, max_steps=max_steps, lr=lr, min_lr=min_lr)
        args = f"warmup={warmup}, max_steps={max_steps}, lr={lr}, min_lr={min_lr}"
        for step in range(max_steps + 5):
            got = call_learner(fn, step, warmup, max_steps, lr, min_lr, name="my_lr_at")
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


# --------------------------------------------------------------------------- parameter groups


def _group_models() -> list[tuple[str, GPT]]:
    configs = [
        ("GPT-2 style, tied embeddings", dict(vocab_size=40, max_seq_len=16, d_model=16, n_layers=2, n_heads=2)),
        ("modern (RMSNorm, SwiGLU, RoPE, no biases, untied)",
         dict(vocab_size=40, max_seq_len=16, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, norm="rmsnorm",
              mlp="swiglu", pos="rope", bias=False, tie_embeddings=False)),
        ("one layer, untied, with biases", dict(vocab_size=30, max_seq_len=8, d_model=8, n_layers=1, n_heads=2,
                                                tie_embeddings=False)),
    ]
    models = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(6)
        for label, kwargs in configs:
            models.append((label, GPT(GPTConfig(**kwargs))))
    return models


@learner_check
def check_param_groups(fn: Callable) -> None:
    """`fn(model) -> (decay, no_decay)`: two lists of the model's parameter tensors, the same
    tensors (by identity) as `kvlab.train.configure_optimizer` puts in its two groups."""
    from ..train import TrainConfig, configure_optimizer

    for label, model in _group_models():
        names = {id(p): n for n, p in model.named_parameters()}
        got = call_learner(fn, model, name="my_param_groups")
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise AssertionError(f"[{label}] return a pair (decay, no_decay) of lists of parameters.")
        decay, no_decay = (list(g) for g in got)
        opt = configure_optimizer(model, TrainConfig())
        want_decay = {id(p) for p in opt.param_groups[0]["params"]}
        want_no_decay = {id(p) for p in opt.param_groups[1]["params"]}
        for group, what in ((decay, "decay"), (no_decay, "no_decay")):
            foreign = [p for p in group if id(p) not in names]
            if foreign:
                raise AssertionError(f"[{label}] {what} holds something that is not one of the model's parameters "
                                     f"(a {type(foreign[0]).__name__}); list the tensors themselves, e.g. from "
                                     "model.named_parameters().")
        all_ids = [id(p) for p in decay] + [id(p) for p in no_decay]
        if len(all_ids) != len(set(all_ids)):
            dup = next(names[i] for i in all_ids if all_ids.count(i) > 1)
            raise AssertionError(f"[{label}] {dup} appears more than once: AdamW would update it twice per "
                                 "step. (Tied weights are one tensor; named_parameters() lists it once.)")
        missing = sorted(names[i] for i in (want_decay | want_no_decay) - set(all_ids))
        if missing:
            raise AssertionError(f"[{label}] these parameters are in neither group, so they would never be "
                                 f"trained: {missing[:4]}")
        wrongly_decayed = sorted(names[id(p)] for p in decay if id(p) in want_no_decay)
        if wrongly_decayed:
            raise AssertionError(f"[{label}] these should not decay: {wrongly_decayed[:4]}. Weight decay pulls "
                                 "values towards 0; what would that do to a norm's gain or a bias?")
        not_decayed = sorted(names[id(p)] for p in no_decay if id(p) in want_decay)
        if not_decayed:
            raise AssertionError(f"[{label}] these should decay: {not_decayed[:4]}. Every matrix is regularised "
                                 "by decay, embedding tables included: look at each tensor's number of dimensions.")
    passed("my_param_groups")


# --------------------------------------------------------------------------- cross-entropy


@learner_check
def check_cross_entropy(fn: Callable) -> None:
    """`fn(logits (B, T, V), targets (B, T)) -> scalar`: the mean next-token cross-entropy in
    nats over all B·T positions, equal to `F.cross_entropy` on the flattened tensors."""
    g = torch.Generator().manual_seed(6)
    cases = [((1, 1, 5), 1.0), ((2, 3, 7), 1.0), ((4, 6, 11), 3.0), ((3, 5, 65), 1.0), ((2, 4, 9), 200.0),
             ((5, 2, 3), 1000.0)]
    for (B, T, V), scale in cases:
        logits = torch.randn(B, T, V, generator=g) * scale
        targets = torch.randint(V, (B, T), generator=g)
        got = call_learner(fn, logits.clone(), targets.clone(), name="my_cross_entropy")
        expected = F.cross_entropy(logits.view(-1, V), targets.view(-1))
        where = f"logits {(B, T, V)} scaled by {scale:g}"
        if isinstance(got, torch.Tensor) and got.numel() == 1 and got.dim() > 0:
            raise AssertionError(f"[{where}] return a scalar (0-d) tensor, shape (); got shape {tuple(got.shape)}.")
        if isinstance(got, torch.Tensor) and got.dim() == 0 and not torch.isfinite(got):
            raise AssertionError(f"[{where}] your loss is {got.item()}: exp of a large logit overflows float32. "
                                 "Subtract something from the logits that leaves the softmax unchanged.")
        close(got, expected, f"[{where}] take -log softmax(logits)[target] at every (b, t) and average over "
                             "all B·T positions; normalise over the vocabulary dimension.", atol=1e-4, rtol=1e-5)
    passed("my_cross_entropy")


# --------------------------------------------------------------------------- gradient clipping


def _clip_case(g: torch.Generator, shapes, scale: float, with_none: bool = False):
    params = []
    for i, shape in enumerate(shapes):
        p = torch.nn.Parameter(torch.randn(*shape, generator=g))
        if not (with_none and i == 1):
            p.grad = torch.randn(*shape, generator=g) * scale
        params.append(p)
    return params


@learner_check
def check_clip_grad_norm(fn: Callable) -> None:
    """`fn(params, max_norm) -> total_norm`: scale every gradient in place by one common factor
    so that the global norm is at most max_norm; return the norm before clipping. Compared with
    `torch.nn.utils.clip_grad_norm_`."""
    g = torch.Generator().manual_seed(6)
    # (shapes, grad scale, max_norm, a parameter without a gradient)
    cases = [([(4,)], 1.0, 0.5, False), ([(3, 4), (4,), (2, 3, 2)], 1.0, 1.0, False),
             ([(8, 8), (8,)], 0.01, 1.0, False), ([(5, 3), (3,), (6,)], 2.0, 0.7, True),
             ([(16, 4), (1,), (4, 4)], 5.0, 2.0, False)]
    for shapes, scale, max_norm, with_none in cases:
        state = g.get_state()
        mine = _clip_case(g, shapes, scale, with_none)
        g.set_state(state)
        ref = _clip_case(g, shapes, scale, with_none)
        where = f"{len(shapes)} tensor(s) of shapes {shapes}, max_norm={max_norm}" + (
            ", one without a gradient" if with_none else "")
        total = call_learner(fn, mine, max_norm, name="my_clip_grad_norm")
        expected_total = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        if total is None:
            raise AssertionError(f"[{where}] return the total norm measured before clipping (like torch does).")
        total_t = torch.as_tensor(total, dtype=torch.float32).reshape(())
        close(total_t, expected_total, f"[{where}] the returned norm should be the global L2 norm of all "
                                       "gradients together, before clipping.", atol=1e-5, rtol=1e-5)
        for i, (a, b) in enumerate(zip(mine, ref)):
            if b.grad is None:
                if a.grad is not None:
                    raise AssertionError(f"[{where}] a parameter without a gradient must stay without one.")
                continue
            if a.grad is None:
                raise AssertionError(f"[{where}] parameter {i} lost its gradient; scale gradients in place.")
            close(a.grad, b.grad, f"[{where}] gradient {i} after clipping is wrong. Clip by one global norm: "
                                  "every tensor is scaled by the same factor, and nothing changes when the "
                                  "norm is already below max_norm.", atol=1e-5, rtol=1e-4)
    passed("my_clip_grad_norm")
