"""Chapter 6's exercise checks: they pass right answers and catch the stub and plausible mistakes."""

import math
import subprocess
import sys

import pytest
import torch

from kvlab.course.checks import training
from kvlab.course.checks.training import check_accum_weights, check_dropout_gap, check_init_loss_per_char, check_lr_at


def stub(*args, **kwargs):
    raise NotImplementedError  # your code here


def test_importing_the_checks_leaves_kvlab_train_lazy():
    # `python -m kvlab.train` must not find kvlab.train already imported by the package.
    code = "import kvlab.course.checks.training, sys; assert 'kvlab.train' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- lr schedule


def lr_solution(step, warmup, max_steps, lr, min_lr):
    if step < warmup:
        return lr * (step + 1) / warmup
    if max_steps <= warmup:
        return lr
    progress = min(1.0, (step - warmup) / (max_steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def lr_warmup_from_zero(step, warmup, max_steps, lr, min_lr):  # the first step gets lr = 0
    if step < warmup:
        return lr * step / warmup
    return lr_solution(step, warmup, max_steps, lr, min_lr)


def lr_cosine_to_zero(step, warmup, max_steps, lr, min_lr):  # forgets min_lr
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (max_steps - warmup))
    return 0.5 * lr * (1 + math.cos(math.pi * progress))


def lr_no_warmup(step, warmup, max_steps, lr, min_lr):
    progress = min(1.0, step / max_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def lr_no_clamp(step, warmup, max_steps, lr, min_lr):  # the cosine climbs back up after max_steps
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / (max_steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def lr_tensor(step, warmup, max_steps, lr, min_lr):  # returns a list, not a number
    return [lr_solution(step, warmup, max_steps, lr, min_lr)]


def test_lr_check_passes_a_solution(capsys):
    check_lr_at(lr_solution)
    assert "my_lr_at: all checks passed" in capsys.readouterr().out


def test_lr_check_fails_the_stub(assert_not_done):
    assert_not_done(lambda: check_lr_at(stub))


@pytest.mark.parametrize("wrong, hint", [
    (lr_warmup_from_zero, "rate of 0 at step 0"),
    (lr_cosine_to_zero, "half a cosine"),
    (lr_no_warmup, "During warmup"),
    (lr_no_clamp, "stay at min_lr"),
    (lr_tensor, "Python float"),
])
def test_lr_check_catches(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check_lr_at(wrong)


# --------------------------------------------------------------------------- unequal micro-batches


def accum_solution(sizes):
    return [n / sum(sizes) for n in sizes]


def accum_one_over_k(sizes):  # right only when the micro-batches are equal
    return [1 / len(sizes)] * len(sizes)


def accum_no_division(sizes):
    return [1.0] * len(sizes)


def accum_sizes(sizes):  # weights by size but forgets to normalise
    return [float(n) for n in sizes]


def accum_inverse(sizes):  # normalised, but the short micro-batch gets the big weight
    inv = [1 / n for n in sizes]
    return [w / sum(inv) for w in inv]


def test_accum_check_passes_a_solution(capsys):
    check_accum_weights(accum_solution)
    assert "my_accum_weights: all checks passed" in capsys.readouterr().out


def test_accum_check_fails_the_stub(assert_not_done):
    assert_not_done(lambda: check_accum_weights(stub))


@pytest.mark.parametrize("wrong, hint", [
    (accum_one_over_k, "equal weights of 1/k"),
    (accum_no_division, "add up to"),
    (accum_sizes, "add up to"),
    (accum_inverse, "not shared out right"),
    (lambda sizes: "1/k", "list of numbers"),
])
def test_accum_check_catches(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check_accum_weights(wrong)


def test_accum_weights_give_the_big_batch_gradient():
    """The rule the check wants really reproduces the big batch's gradient (and 1/k does not)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, y = torch.randn(12, 5), torch.randint(3, (12,))
    sizes = [5, 5, 2]

    def grads(weights):
        model.zero_grad()
        for w, xm, ym in zip(weights, x.split(sizes), y.split(sizes)):
            (torch.nn.functional.cross_entropy(model(xm), ym) * w).backward()
        return model.weight.grad.clone()

    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    big = model.weight.grad.clone()
    torch.testing.assert_close(grads(accum_solution(sizes)), big)
    assert not torch.allclose(grads(accum_one_over_k(sizes)), big, atol=1e-4)


# --------------------------------------------------------------------------- a fresh BPE model


@pytest.fixture(scope="module")
def bpe_ref():
    return training._bpe_init_loss()


def test_init_loss_check_passes_the_answer(capsys, bpe_ref):
    check_init_loss_per_char(bpe_ref["ln_v"] / bpe_ref["chars_per_token"])
    assert "my_init_loss_per_char: all checks passed" in capsys.readouterr().out


def test_init_loss_answer_is_below_the_character_model(bpe_ref):
    # The point of the exercise: per character, a fresh BPE model already scores under ln 65.
    assert bpe_ref["ln_v"] / bpe_ref["chars_per_token"] < math.log(65)
    assert 2.0 < bpe_ref["chars_per_token"] < 2.6


def test_init_loss_check_not_done(assert_not_done):
    assert_not_done(lambda: check_init_loss_per_char(None))


@pytest.mark.parametrize("wrong, hint", [
    (lambda r: r["ln_v"], "per \\*token\\*"),
    (lambda r: r["ln_v"] * r["chars_per_token"], "must be smaller than per token"),
    (lambda r: math.log(65), "ln 65"),
    (lambda r: 1.0, "not it"),
    (lambda r: "3.1", "should be a number"),
])
def test_init_loss_check_catches(wrong, hint, bpe_ref, monkeypatch):
    monkeypatch.setattr(training, "_bpe_init_loss", lambda: bpe_ref)  # train the BPE once for all cases
    with pytest.raises(AssertionError, match=hint):
        check_init_loss_per_char(wrong(bpe_ref))


# --------------------------------------------------------------------------- dropout experiment


def dropout_solution():
    """The experiment as the chapter's solution runs it, written out independently of the check."""
    from kvlab import CharTokenizer, GPT, GPTConfig
    from kvlab.data import load_shakespeare_text, train_val_split
    from kvlab.train import TrainConfig, evaluate_split, train

    train_text, val_text = train_val_split(load_shakespeare_text())
    tok = CharTokenizer.from_text(train_text)
    train_part = torch.tensor(tok.encode(train_text))[:3000]
    val_part = torch.tensor(tok.encode(val_text))[:10_000]
    cfg = TrainConfig(batch_size=16, block_size=32, max_steps=200, warmup_steps=10, lr=3e-3, min_lr=3e-4,
                      eval_interval=200, eval_batches=1, progress=False, seed=0)
    runs = {}
    for p in (0.0, 0.3):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, max_seq_len=32, d_model=64, n_layers=2, n_heads=4,
                              dropout=p))
        train(model, train_part, val_part, cfg, device="cpu")
        runs[p] = (evaluate_split(model, train_part, 32), evaluate_split(model, val_part, 32))
    return runs


def test_dropout_check_passes_the_experiment_run_independently(capsys):
    runs = dropout_solution()
    gap = {p: val - tr for p, (tr, val) in runs.items()}
    lower = min(runs, key=lambda p: runs[p][1])
    check_dropout_gap(gap[0.0] - gap[0.3], lower)
    assert "all checks passed" in capsys.readouterr().out
    assert gap[0.3] < gap[0.0]  # what the exercise is about: dropout narrows the gap


def test_dropout_check_not_done(assert_not_done):
    assert_not_done(lambda: check_dropout_gap(None, None))
    assert_not_done(lambda: check_dropout_gap(0.1, None))


FAKE_RUNS = {0.0: (2.05, 2.86), 0.3: (2.29, 2.94)}  # gaps 0.81 and 0.65; dropout 0 has the lower val loss


@pytest.mark.parametrize("shrink, choice, hint", [
    (-0.16, 0.0, "wrong sign"),
    (0.81, 0.0, "one run's gap"),
    (-0.08, 0.0, "validation losses only"),
    (0.5, 0.0, "does not match"),
    (0.16, 0.3, "compare the two runs' \\*validation\\* losses"),
    (0.16, 0.5, "should be 0.0 or 0.3"),
])
def test_dropout_check_catches(shrink, choice, hint, monkeypatch):
    monkeypatch.setattr(training, "_dropout_runs", lambda: FAKE_RUNS)
    with pytest.raises(AssertionError, match=hint):
        check_dropout_gap(shrink, choice)


def test_dropout_check_accepts_either_choice_on_a_tie(monkeypatch, capsys):
    monkeypatch.setattr(training, "_dropout_runs", lambda: {0.0: (2.0, 2.9), 0.3: (2.2, 2.905)})
    check_dropout_gap(0.195, 0.3)
    check_dropout_gap(0.195, 0.0)
    assert capsys.readouterr().out.count("all checks passed") == 2
