"""kvlab.validation: every check names the argument, says what is allowed and shows what it got."""

import math

import pytest

from kvlab.validation import (ArgumentTypeError, check_bool, check_choice, check_int, check_non_negative_int,
                              check_number, check_positive_int, check_probability)


def test_passing_values_come_back_as_plain_python():
    np = pytest.importorskip("numpy")
    assert check_positive_int("n", np.int64(3)) == 3 and type(check_positive_int("n", np.int64(3))) is int
    assert check_non_negative_int("n", 0) == 0
    assert check_int("x", -5) == -5 and check_int("x", None, allow_none=True) is None
    assert check_number("t", np.float32(0.5)) == 0.5 and type(check_number("t", 1)) is float
    assert check_probability("p", 1.0) == 1.0 and check_probability("p", None, allow_none=True) is None
    assert check_bool("flag", False) is False
    assert check_choice("kind", "static", ("static", "dynamic")) == "static"


@pytest.mark.parametrize("call, error, message", [
    (lambda: check_positive_int("batch_size", 0), ValueError, "batch_size must be a positive int, got 0"),
    (lambda: check_positive_int("batch_size", 2.0), TypeError, "batch_size must be a positive int, got 2.0"),
    (lambda: check_positive_int("batch_size", True), TypeError, "batch_size must be a positive int, got True"),
    (lambda: check_positive_int("window", "8", allow_none=True), TypeError,
     "window must be None or a positive int, got '8'"),
    (lambda: check_non_negative_int("top_k", -1, note="0 disables it"), ValueError,
     "top_k must be an int >= 0 (0 disables it), got -1"),
    (lambda: check_int("eos_id", 97, low=0, high=96), ValueError, "eos_id must be an int in [0, 96], got 97"),
    (lambda: check_int("seed", [1]), TypeError, "seed must be an int, got a list"),
    (lambda: check_number("temperature", -1, low=0), ValueError, "temperature must be a finite number >= 0, got -1"),
    (lambda: check_number("temperature", math.nan, low=0), ValueError, "temperature must be a finite number >= 0"),
    (lambda: check_number("length_penalty", math.inf), ValueError, "length_penalty must be a finite number, got inf"),
    (lambda: check_number("lr", None), TypeError, "lr must be a finite number, got None"),
    (lambda: check_probability("top_p", 0.0), ValueError, "top_p must be a number in (0, 1], got 0.0"),
    (lambda: check_probability("top_p", 1.5, allow_none=True), ValueError,
     "top_p must be None or a number in (0, 1], got 1.5"),
    (lambda: check_number("val_fraction", 1.0, low=0, high=1, low_open=True, high_open=True), ValueError,
     "val_fraction must be a number in (0, 1), got 1.0"),
    (lambda: check_bool("compile", "yes"), TypeError, "compile must be True or False, got 'yes'"),
    (lambda: check_bool("compile", 1), TypeError, "compile must be True or False, got 1"),
    (lambda: check_choice("kind", "paged", ("static", "dynamic")), ValueError,
     "kind must be one of ('static', 'dynamic'), got 'paged'"),
    (lambda: check_choice("kind", ["static"], ("static",)), ValueError, "kind must be one of ('static',)"),
])
def test_messages_name_the_argument_and_what_is_allowed(call, error, message):
    with pytest.raises(error) as info:
        call()
    assert str(info.value).startswith(message), str(info.value)


def test_a_wrong_type_is_both_a_type_error_and_a_value_error():
    # Before there was one module of checks, some raised TypeError for a wrong type and some
    # ValueError: callers catching either still catch it.
    for catch in (TypeError, ValueError, ArgumentTypeError):
        with pytest.raises(catch):
            check_positive_int("n", 1.5)
    with pytest.raises(ValueError) as info:  # a value out of range is a ValueError only
        check_positive_int("n", 0)
    assert not isinstance(info.value, TypeError)
