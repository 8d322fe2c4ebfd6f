"""Shared fixtures: tiny seeded models in both styles, small enough that tests take seconds."""

import os
import tempfile

import pytest
import torch

import kvlab

# kvlab.cpu_kernels stores its measured CPU kernel choices in ~/.cache/kvlab; the tests keep theirs
# in a folder of their own, and every test run starts without any.
os.environ["KVLAB_CACHE_DIR"] = tempfile.mkdtemp(prefix="kvlab-test-cache-")

STYLES = {
    "gpt2": dict(vocab_size=97, max_seq_len=320, d_model=32, n_layers=2, n_heads=4),
    "modern": dict(vocab_size=97, max_seq_len=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                   norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False),
}


def make_model(style: str = "gpt2", seed: int = 0, **overrides) -> kvlab.GPT:
    torch.manual_seed(seed)
    model = kvlab.GPT(kvlab.GPTConfig(**{**STYLES[style], **overrides}))
    # Random init leaves the logits nearly flat; scale the weights up a little so greedy
    # decoding makes varied, confident choices and a mask or position bug changes the tokens.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    return model.eval()


@pytest.fixture(params=sorted(STYLES))
def style(request):
    return request.param


@pytest.fixture
def model(style):
    return make_model(style)


@pytest.fixture
def prompt():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, STYLES["gpt2"]["vocab_size"], (2, 7), generator=g)


@pytest.fixture
def assert_not_done(capsys):
    """`assert_not_done(lambda: checks.check_x(stub))`: the check printed its "✗ ... not done yet"
    line for an unattempted exercise, returned None and did not raise or report a pass."""
    from kvlab.course.checks import is_not_done_line

    def check(call):
        capsys.readouterr()
        result = call()
        out = capsys.readouterr().out
        assert result is None
        assert any(is_not_done_line(line) for line in out.splitlines()), out
        assert "all checks passed" not in out, out
        return out

    return check
