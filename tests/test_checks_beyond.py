"""Chapter 10's exercise checks: they pass right answers and catch the stub and plausible mistakes."""

import pytest
import torch

from kvlab.checks.beyond import acceptance_rate_k, check_acceptance_rate, check_int8_bytes_per_token, check_reorder_cache


def stub(*args, **kwargs):
    raise NotImplementedError  # your code here


# --------------------------------------------------------------------------- reorder the cache


def reorder_solution(cache, index):
    for layer in cache.layers:
        n = layer.length
        layer.k[:, :, :n] = layer.k[:, :, :n].index_select(0, index)
        layer.v[:, :, :n] = layer.v[:, :, :n].index_select(0, index)


def reorder_whole_tensors(cache, index):  # also right: new tensors, whole buffers
    for layer in cache.layers:
        layer.k, layer.v = layer.k[index], layer.v[index]


def reorder_keys_only(cache, index):
    for layer in cache.layers:
        layer.k = layer.k[index]


def reorder_first_layer_only(cache, index):
    layer = cache.layers[0]
    layer.k, layer.v = layer.k[index], layer.v[index]


def reorder_scatter(cache, index):  # sends row i to index[i] instead of fetching it
    for layer in cache.layers:
        k, v = layer.k.clone(), layer.v.clone()
        layer.k[index], layer.v[index] = k, v


def reorder_nothing(cache, index):
    pass


def reorder_and_reset(cache, index):
    reorder_solution(cache, index)
    cache.reset()


def test_reorder_check_passes_solutions(capsys):
    check_reorder_cache(reorder_solution)
    check_reorder_cache(reorder_whole_tensors)
    assert capsys.readouterr().out.count("my_reorder_cache: all checks passed") == 2


def test_reorder_check_reports_the_stub_as_not_done(capsys):
    check_reorder_cache(stub)  # does not raise
    assert "not done yet" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, hint", [
    (reorder_keys_only, "values"),
    (reorder_first_layer_only, "every layer"),
    (reorder_scatter, "wrong way"),
    (reorder_nothing, "not reordered"),
    (reorder_and_reset, "cache.length"),
])
def test_reorder_check_fails_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check_reorder_cache(wrong)


# --------------------------------------------------------------------------- the experiment


@pytest.fixture(scope="module")
def measured():
    return acceptance_rate_k(8), acceptance_rate_k(4)


def test_acceptance_check_passes_the_measured_rate(measured, capsys):
    check_acceptance_rate(measured[0]["acceptance_rate"])
    check_acceptance_rate(round(measured[0]["acceptance_rate"], 2))
    assert capsys.readouterr().out.count("my_acceptance_rate: all checks passed") == 2


def test_acceptance_check_reports_none_as_not_done(capsys):
    check_acceptance_rate(None)
    assert "not done yet" in capsys.readouterr().out


def test_acceptance_check_fails_wrong_answers(measured):
    at_8, at_4 = measured
    if abs(at_8["acceptance_rate"] - at_4["acceptance_rate"]) > 0.02:
        with pytest.raises(AssertionError, match="k=4"):
            check_acceptance_rate(at_4["acceptance_rate"])
    with pytest.raises(AssertionError, match="percentage"):
        check_acceptance_rate(100 * at_8["acceptance_rate"])
    with pytest.raises(AssertionError, match="tokens per target forward"):
        check_acceptance_rate(at_8["tokens_per_target_forward"])
    with pytest.raises(AssertionError, match="k=8"):
        check_acceptance_rate(at_8["acceptance_rate"] + 0.1)
    with pytest.raises(AssertionError, match="number"):
        check_acceptance_rate("0.5")


# --------------------------------------------------------------------------- int8 bytes per token


def test_int8_bytes_check_passes_the_answer(capsys):
    check_int8_bytes_per_token(12 * 2 * 12 * (64 + 2 * (2 + 2)))  # two groups of 32: a float16 step and minimum each
    assert "my_int8_bytes_per_token: all checks passed" in capsys.readouterr().out


def test_int8_bytes_check_reports_none_as_not_done(capsys):
    check_int8_bytes_per_token(None)
    assert "not done yet" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, hint", [
    (12 * 12 * 72, "values"),
    (12 * 2 * 12 * 64, "steps and minimums"),
    (12 * 2 * 12 * 68, "float16 minimum"),
    (12 * 2 * 12 * 80, "2 bytes each"),
    (12 * 2 * (768 + 8), "each head"),
    (12 * 2 * 12 * 64 * 4, "float32 cache"),
    (12345, "not the int8"),
    ("19584", "number"),
])
def test_int8_bytes_check_fails_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check_int8_bytes_per_token(wrong)
