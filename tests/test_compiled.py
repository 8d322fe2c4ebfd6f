"""The fixed-shape decode step (kvlab.compiled) and generate(..., compile=True).

The eager fixed-shape step must give the tokens the readable step gives, for every kind of
cache it supports; compiled with fullgraph=True it must give them too, and a second and a
fiftieth step must reuse the first compilation (no graph break, no recompile per position).
Compiling on a CPU takes seconds, so the compiled tests use the tests' smallest models."""

import shutil

import pytest
import torch

import kvlab
from kvlab.compiled import advance, decode_step_fixed_shape
from conftest import make_model


def fixed_shape_generate(model, idx, n, cache):
    """Greedy generation whose decode steps are the eager fixed-shape step."""
    B, T = idx.shape
    logits = kvlab.prefill(model, idx, cache)
    out = [logits.argmax(-1, keepdim=True)]
    pos = torch.tensor([T])
    with torch.inference_mode():
        for i in range(1, n):
            logits = decode_step_fixed_shape(model, out[-1], pos, cache)
            advance(cache, T + i)
            pos += 1
            out.append(logits.argmax(-1, keepdim=True))
    return torch.cat([idx, *out], dim=1)


@pytest.mark.parametrize("style, kind", [("gpt2", "static"), ("modern", "static"), ("modern", "sliding"),
                                         ("gpt2", "sliding")])
def test_fixed_shape_step_gives_the_eager_tokens(style, kind):
    model = make_model(style)
    idx = torch.randint(0, model.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(1))
    n = 40
    new = lambda: model.new_cache(3, kind="sliding", window=16) if kind == "sliding" \
        else model.new_cache(3, max_seq_len=6 + n)  # noqa: E731
    eager = kvlab.generate(model, idx, n, temperature=0, cache=new())
    cache = new()
    fixed = fixed_shape_generate(model, idx, n, cache)
    assert torch.equal(fixed, eager)
    assert cache.length == 6 + n - 1
    if kind == "sliding":  # the ring past its window: positions written where the eager cache writes them
        reference = new()
        kvlab.generate(model, idx, n, temperature=0, cache=reference)
        assert torch.equal(cache.layers[0].pos, reference.layers[0].pos)


needs_cpp = pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
                               reason="torch.compile's CPU backend needs a C++ compiler")


@needs_cpp
@pytest.mark.parametrize("kind", ["static", "sliding"])
def test_compiled_generate_gives_the_eager_tokens_and_never_recompiles(kind):
    from torch._dynamo.utils import counters

    model = make_model("modern", window=16) if kind == "sliding" else make_model("gpt2")
    idx = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    n = 52  # the 2nd and the 50th decode steps, and every one between
    cache = model.new_cache(2, kind="sliding") if kind == "sliding" else model.new_cache(2, max_seq_len=5 + n)
    eager = kvlab.generate(model, idx, n, temperature=0, cache=cache)
    torch._dynamo.reset()
    counters.clear()
    # The first step compiles. Every later one must reuse it: error_on_recompile turns a
    # recompile (a guard that failed, e.g. on a position baked in as an int) into an error.
    first = kvlab.generate(model, idx, 2, temperature=0, cache=cache, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1, f"the decode step compiled into {graphs} graphs (graph breaks?)"
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = kvlab.generate(model, idx, n, temperature=0, cache=cache, compile=True)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert torch.equal(compiled, eager) and torch.equal(first, eager[:, :7])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("kind", ["static", "sliding"])
def test_compiled_generate_with_cuda_graphs_gives_the_eager_tokens(kind):
    model = (make_model("modern", window=16) if kind == "sliding" else make_model("gpt2")).cuda()
    idx = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0)).cuda()
    new = lambda: model.new_cache(2, kind="sliding") if kind == "sliding" else model.new_cache(2, max_seq_len=45)  # noqa: E731
    eager = kvlab.generate(model, idx, 40, temperature=0, cache=new())
    for _ in range(3):  # compiles, then records the graph, then replays it; a new cache moves the buffers
        assert torch.equal(kvlab.generate(model, idx, 40, temperature=0, cache=new(), compile=True), eager)
