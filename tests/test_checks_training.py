"""Chapter 6's exercise checks: they pass right answers and catch the stub and plausible mistakes."""

import math
import subprocess
import sys

import pytest
import torch

from kvlab.checks.training import check_clip_grad_norm, check_cross_entropy, check_lr_at, check_param_groups


def stub(*args, **kwargs):
    raise NotImplementedError  # your code here


def test_importing_the_checks_leaves_kvlab_train_lazy():
    # `python -m kvlab.train` must not find kvlab.train already imported by the package.
    code = "import kvlab.checks.training, sys; assert 'kvlab.train' not in sys.modules"
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


# --------------------------------------------------------------------------- parameter groups


def groups_solution(model):
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]


def groups_decay_everything(model):
    return list(model.parameters()), []


def groups_embeddings_left_out(model):  # "embeddings don't decay", a common variant
    decay, no_decay = groups_solution(model)
    emb = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return [p for p in decay if id(p) not in emb], no_decay + [p for p in decay if id(p) in emb]


def groups_by_name_weight(model):  # decays every "*.weight", so the LayerNorm gains too
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    return decay, no_decay


def groups_tied_twice(model):  # walks the modules, so the tied matrix shows up twice
    decay, no_decay = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            (decay if p.dim() >= 2 else no_decay).append(p)
    return decay, no_decay


def groups_forgets_no_decay(model):
    return groups_solution(model)[0], []


def groups_names(model):
    decay, no_decay = groups_solution(model)
    return [n for n, p in model.named_parameters() if p.dim() >= 2], [n for n, p in model.named_parameters()
                                                                       if p.dim() < 2]


def test_param_groups_check_passes_a_solution(capsys):
    check_param_groups(groups_solution)
    assert "my_param_groups: all checks passed" in capsys.readouterr().out


def test_param_groups_check_fails_the_stub(assert_not_done):
    assert_not_done(lambda: check_param_groups(stub))


@pytest.mark.parametrize("wrong, hint", [
    (groups_decay_everything, "should not decay"),
    (groups_embeddings_left_out, "embedding tables included"),
    (groups_by_name_weight, "should not decay"),
    (groups_tied_twice, "more than once"),
    (groups_forgets_no_decay, "neither group"),
    (groups_names, "not one of the model's parameters"),
])
def test_param_groups_check_catches(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check_param_groups(wrong)


# --------------------------------------------------------------------------- cross-entropy


def ce_solution(logits, targets):
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    log_probs = shifted - shifted.exp().sum(dim=-1, keepdim=True).log()
    return -log_probs.gather(-1, targets[..., None]).mean()


def ce_unstable(logits, targets):  # no max subtraction: exp overflows for large logits
    log_probs = (logits.exp() / logits.exp().sum(dim=-1, keepdim=True)).log()
    return -log_probs.gather(-1, targets[..., None]).mean()


def ce_wrong_dim(logits, targets):  # normalises over the time axis instead of the vocabulary
    log_probs = logits.log_softmax(dim=1)
    return -log_probs.gather(-1, targets[..., None]).mean()


def ce_sum(logits, targets):  # sums instead of averaging
    return -logits.log_softmax(-1).gather(-1, targets[..., None]).sum()


def ce_per_position(logits, targets):  # forgets to average at all
    return -logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]


def test_cross_entropy_check_passes_a_solution(capsys):
    check_cross_entropy(ce_solution)
    assert "my_cross_entropy: all checks passed" in capsys.readouterr().out


def test_cross_entropy_check_fails_the_stub(assert_not_done):
    assert_not_done(lambda: check_cross_entropy(stub))


@pytest.mark.parametrize("wrong, hint", [
    (ce_unstable, "overflows"),
    (ce_wrong_dim, "vocabulary dimension"),
    (ce_sum, "average"),
    (ce_per_position, "wrong shape|scalar"),
])
def test_cross_entropy_check_catches(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check_cross_entropy(wrong)


# --------------------------------------------------------------------------- gradient clipping


def clip_solution(params, max_norm):
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.sqrt(sum((g ** 2).sum() for g in grads))
    factor = min(1.0, max_norm / (total.item() + 1e-6))
    for g in grads:
        g.mul_(factor)
    return total


def clip_per_tensor(params, max_norm):  # clips each tensor on its own
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in params if p.grad is not None))
    for p in params:
        if p.grad is not None:
            p.grad.mul_(min(1.0, max_norm / (p.grad.norm().item() + 1e-6)))
    return total


def clip_always_rescale(params, max_norm):  # scales small gradients up to max_norm too
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.sqrt(sum((g ** 2).sum() for g in grads))
    for g in grads:
        g.mul_(max_norm / total)
    return total


def clip_returns_after(params, max_norm):  # returns the norm after clipping
    clip_solution(params, max_norm)
    return torch.sqrt(sum((p.grad ** 2).sum() for p in params if p.grad is not None))


def clip_sum_of_norms(params, max_norm):  # adds the per-tensor norms instead of their squares
    grads = [p.grad for p in params if p.grad is not None]
    total = sum(g.norm() for g in grads)
    for g in grads:
        g.mul_(min(1.0, max_norm / (total.item() + 1e-6)))
    return total


def clip_not_in_place(params, max_norm):  # scales copies of the gradients
    grads = [p.grad.clone() for p in params if p.grad is not None]
    total = torch.sqrt(sum((g ** 2).sum() for g in grads))
    grads = [g * min(1.0, max_norm / (total.item() + 1e-6)) for g in grads]
    return total


def test_clip_check_passes_a_solution(capsys):
    check_clip_grad_norm(clip_solution)
    assert "my_clip_grad_norm: all checks passed" in capsys.readouterr().out


def test_clip_check_passes_torch_itself():
    check_clip_grad_norm(torch.nn.utils.clip_grad_norm_)


def test_clip_check_fails_the_stub(assert_not_done):
    assert_not_done(lambda: check_clip_grad_norm(stub))


@pytest.mark.parametrize("wrong, hint", [
    (clip_per_tensor, "one global norm"),
    (clip_always_rescale, "below max_norm"),
    (clip_returns_after, "before clipping"),
    (clip_sum_of_norms, "global L2 norm"),
    (clip_not_in_place, "after clipping is wrong"),
])
def test_clip_check_catches(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check_clip_grad_norm(wrong)
