"""The layer caches' own operations, on every kind (dynamic, static, sliding, int8 static, int8 sliding):
`reorder(index)` (beam search) and `crop(length, saved)` (speculative decoding's rollback), each
against a reference: a fresh cache fed what the operated one should now hold."""

import pytest
import torch

from kvlab.cache import DynamicLayerCache, SlidingWindowLayerCache, StaticLayerCache
from kvlab.quantized import Int8SlidingWindowLayerCache, Int8StaticLayerCache
from conftest import make_model

WINDOW = 8
KINDS = {  # name: new_cache arguments for a batch of B
    "dynamic": dict(kind="dynamic"),
    "static": dict(kind="static"),
    "sliding": dict(kind="sliding", window=WINDOW),
    "int8-static": dict(kind="static", quantize="int8"),
    "int8-sliding": dict(kind="sliding", window=WINDOW, quantize="int8"),
}
LAYER_TYPES = {"dynamic": DynamicLayerCache, "static": StaticLayerCache, "sliding": SlidingWindowLayerCache,
               "int8-static": Int8StaticLayerCache, "int8-sliding": Int8SlidingWindowLayerCache}


def new(model, B, name):
    cache = model.new_cache(B, **KINDS[name])
    assert type(cache.layers[0]) is LAYER_TYPES[name]
    return cache


@pytest.fixture(scope="module")
def model():
    return make_model("gpt2")


@torch.inference_mode()
@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("index", [[2, 0, 0], [1, 1, 0, 2, 2, 1]], ids=["same batch", "fan out"])
def test_reorder_equals_a_cache_fed_the_reordered_rows(model, name, index):
    torch.manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (3, 13))  # more than WINDOW: the ring has wrapped
    index = torch.tensor(index)
    cache = new(model, 3, name)
    model(x[:, :12], cache)
    cache.reorder(index)
    assert cache.batch_size == len(index) and all(layer.length == 12 for layer in cache.layers)
    got = model(x[index, 12:], cache)

    reference = new(model, len(index), name)
    model(x[index, :12], reference)
    torch.testing.assert_close(got, model(x[index, 12:], reference))


@torch.inference_mode()
@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("kept, fed", [(6, 5), (10, 4), (9, 0), (11, 8)])
def test_crop_forgets_what_was_fed_after_length(model, name, kept, fed):
    # Feed `kept` tokens, then `fed` more (guesses), crop back to `kept` and go on with the true
    # text: the logits must be those of a cache that never saw the guesses.
    torch.manual_seed(1)
    V = model.config.vocab_size
    text = torch.randint(0, V, (2, kept + 3))
    guesses = torch.randint(0, V, (2, fed))
    cache = new(model, 2, name)
    model(text[:, :kept], cache)
    saved = cache.save(kept, fed)
    assert (saved is not None) == ("sliding" in name)  # only the ring overwrites what it keeps
    if fed:
        model(guesses, cache)
    cache.crop(kept, saved)
    assert cache.length == kept
    got = model(text[:, kept:], cache)

    reference = new(model, 2, name)
    model(text[:, :kept], reference)
    torch.testing.assert_close(got, model(text[:, kept:], reference))


@pytest.mark.parametrize("name", KINDS)
def test_crop_refuses_what_it_cannot_undo(model, name):
    cache = new(model, 1, name)
    model(torch.zeros(1, 5, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="length"):
        cache.crop(6)
    with pytest.raises(ValueError, match="length"):
        cache.crop(-1)
    if "sliding" in name:
        with pytest.raises(ValueError, match="save"):
            cache.crop(3)  # the ring needs the slots saved before the write
        with pytest.raises(ValueError, match="feed at most"):
            cache.save(5, WINDOW + 1)
    else:
        cache.crop(3)
        assert cache.length == 3
    with pytest.raises(TypeError, match="index"):
        cache.reorder([0])


@torch.inference_mode()
def test_a_static_reorder_keeps_the_buffers_in_place(model):
    # A CUDA graph may hold the buffers' addresses: the same batch size reorders in place.
    cache = new(model, 3, "static")
    model(torch.zeros(3, 4, dtype=torch.long), cache)
    before = [layer.k.data_ptr() for layer in cache.layers]
    cache.reorder(torch.tensor([2, 1, 0]))
    assert [layer.k.data_ptr() for layer in cache.layers] == before
