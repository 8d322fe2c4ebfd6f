"""The bug zoo and its checks: each specimen fails exactly the checks named for its bug, kvlab's own
caches and the fixed specimens pass every check that applies, and a stub fails every check.

Which checks each specimen fails is recorded in `kvlab.course.bugzoo._BUGS[...].fails`, its own
check first. Four specimens fail exactly one check. CacheB (keys and values swapped) also fails
check_decode_positions and check_chunked_prefill_mask: every attention through it is wrong,
from the prefill on. It passes check_reset_between_prompts, which compares a reused cache
with a new cache of the same class and so blames reset() only.
"""

import inspect

import pytest
import torch

import kvlab
from kvlab.course import bugzoo
from kvlab.cache import DynamicLayerCache, SlidingWindowLayerCache, StaticLayerCache
from kvlab.course.checks import bugzoo as checks
from kvlab.course.checks._common import ExerciseNotDone, is_not_done_line

CHECKS = [checks.check_keys_values, checks.check_decode_positions, checks.check_chunked_prefill_mask,
          checks.check_reset_between_prompts, checks.check_window_eviction]
NAMES = [c.__name__ for c in CHECKS]
CORRECT = [DynamicLayerCache, StaticLayerCache, SlidingWindowLayerCache]


def applies(cache_cls, check) -> bool:
    return check is not checks.check_window_eviction or getattr(cache_cls, "kind", "dynamic") == "sliding"


# -- the fixed specimens (the notebook's solutions) ------------------------------------------

class FixedCacheA(bugzoo.CacheA):
    def reset(self):
        self.slot_pos.fill_(-1)
        self.length = 0


class FixedCacheB(bugzoo.CacheB):
    def update(self, k, v, input_pos):
        start, end = int(input_pos[0]), int(input_pos[-1]) + 1
        self.kv[:, :, :, start:end] = torch.stack([k, v])
        self.length = end
        keys, values = self.kv[:, :, :, :end]
        return keys, values


class FixedCacheC(bugzoo.CacheC):
    def update(self, k, v, input_pos):
        if k.size(2) == 1:  # the fast path, writing before counting
            self.k[:, :, self.length] = k[:, :, 0]
            self.v[:, :, self.length] = v[:, :, 0]
            self.length += 1
            return self.k[:, :, :self.length], self.v[:, :, :self.length]
        return super().update(k, v, input_pos)


class FixedCacheD(bugzoo.CacheD):
    def __init__(self, batch_size, n_kv_heads, head_dim, window, *, device=None, dtype=torch.float32):
        super().__init__(batch_size, n_kv_heads, head_dim, window + 1, device=device, dtype=dtype)
        self.window = window  # the ring now has `window` slots


class FixedCacheE(bugzoo.CacheE):
    def key_positions(self, input_pos):
        return torch.arange(self.length + input_pos.numel())


FIXED = [FixedCacheA, FixedCacheB, FixedCacheC, FixedCacheD, FixedCacheE]


# -- stubs ------------------------------------------------------------------------------------

class StubDynamic:
    def __init__(self):
        self.length = 0

    def key_positions(self, input_pos):
        raise NotImplementedError  # your code here

    def update(self, k, v, input_pos):
        raise NotImplementedError  # your code here

    def reset(self):
        raise NotImplementedError  # your code here


class StubSliding(StubDynamic):
    kind = "sliding"

    def __init__(self, batch_size, n_kv_heads, head_dim, window):
        raise NotImplementedError  # your code here


# -- the zoo itself ---------------------------------------------------------------------------

def test_every_specimen_is_documented_for_instructors():
    assert set(bugzoo.SPECIMENS) == set(bugzoo._BUGS) == {n for n in bugzoo.__all__ if n.startswith("Cache")}
    for name in bugzoo.SPECIMENS:
        cls, bug = getattr(bugzoo, name), bugzoo._BUGS[name]
        assert cls.kind == bug.kind
        assert "symptom" in cls.__doc__.lower()
        assert set(bug.fails) <= set(NAMES) and bug.fails


@pytest.mark.parametrize("name", bugzoo.SPECIMENS)
def test_specimens_fail_silently(name):
    """Each bug gives wrong tokens somewhere, never an exception, in ordinary use."""
    cls = getattr(bugzoo, name)
    model = checks._model("modern", window=4 if cls.kind == "sliding" else None)
    prompt = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    cache = checks._cache(cls, model, 2, window=4)
    for _ in range(2):  # and again, through the same cache
        out = kvlab.generate(model, prompt, 20, temperature=0, cache=cache)
        assert out.shape == (2, 29)
    with torch.no_grad():  # chunked prefill runs too
        cache.reset()
        model(prompt[:, :5], cache)
        model(prompt[:, 5:], cache)


# -- the specimen x check matrix --------------------------------------------------------------

@pytest.mark.parametrize("check", CHECKS, ids=NAMES)
@pytest.mark.parametrize("name", bugzoo.SPECIMENS)
def test_specimen_fails_exactly_its_checks(name, check):
    cls = getattr(bugzoo, name)
    if not applies(cls, check):
        with pytest.raises(ValueError, match="sliding"):
            check(cls)
        return
    if check.__name__ in bugzoo._BUGS[name].fails:
        with pytest.raises(AssertionError) as err:
            check(cls)
        assert not isinstance(err.value, ExerciseNotDone)
        assert "Hint: " in str(err.value)
    else:
        check(cls)


@pytest.mark.parametrize("name", bugzoo.SPECIMENS)
def test_check_cache_names_the_failing_checks(name):
    cls = getattr(bugzoo, name)
    with pytest.raises(checks.CacheCheckFailed) as err:
        checks.check_cache(cls)
    expected = bugzoo._BUGS[name].fails
    assert list(err.value.failed) == [n for n in NAMES if n in expected]
    message = str(err.value)
    first_line = message.splitlines()[0]  # what a one-line report (e.g. the grader's) shows
    assert first_line.startswith(f"{name} (kind {cls.kind!r}) fails {len(expected)} of")
    assert first_line.endswith(", ".join(n for n in NAMES if n in expected))
    for n in expected:
        assert f"FAIL {n}" in message


@pytest.mark.parametrize("name", bugzoo.SPECIMENS)
def test_the_answers_are_not_in_the_docstrings(name):
    doc = getattr(bugzoo, name).__doc__.lower()
    for giveaway in ("swap", "reset()", "window - 1", "w - 1", "off-by-one", "one slot", "top-left", "slot_pos"):
        assert giveaway not in doc


# -- correct caches pass -----------------------------------------------------------------------

@pytest.mark.parametrize("cache_cls", CORRECT + FIXED, ids=lambda c: c.__name__)
def test_correct_caches_pass_every_check(cache_cls, capsys):
    for check in CHECKS:
        if applies(cache_cls, check):
            check(cache_cls)
    checks.check_cache(cache_cls)
    out = capsys.readouterr().out
    assert out.count("all checks passed") == sum(applies(cache_cls, c) for c in CHECKS) + 1


@pytest.mark.parametrize("window", [2, 3, 8])
def test_sliding_checks_with_other_windows(window):
    checks.check_cache(SlidingWindowLayerCache, window=window)
    checks.check_cache(FixedCacheD, window=window)
    with pytest.raises(checks.CacheCheckFailed) as err:
        checks.check_cache(bugzoo.CacheD, window=window)
    assert list(err.value.failed) == ["check_window_eviction"]


def test_a_class_without_kind_is_a_dynamic_cache():
    class Plain:  # a learner's concat cache, as in the chapter
        def __init__(self):
            self.k = self.v = None
            self.length = 0

        def key_positions(self, input_pos):
            return torch.arange(self.length + len(input_pos))

        def update(self, k, v, input_pos):
            self.k = k if self.k is None else torch.cat([self.k, k], 2)
            self.v = v if self.v is None else torch.cat([self.v, v], 2)
            self.length += k.size(2)
            return self.k, self.v

        def reset(self):
            self.k = self.v = None
            self.length = 0

    checks.check_cache(Plain)


# -- stubs and misuse -------------------------------------------------------------------------

def assert_not_done(capsys, name):
    lines = capsys.readouterr().out.splitlines()
    assert any(is_not_done_line(line) and name in line for line in lines), lines
    assert not any(line.startswith("✓") for line in lines), lines


@pytest.mark.parametrize("check", CHECKS + [checks.check_cache], ids=NAMES + ["check_cache"])
@pytest.mark.parametrize("stub", [StubDynamic, StubSliding], ids=["methods", "constructor"])
def test_checks_report_a_stub_as_not_done(check, stub, capsys):
    if not applies(stub, check):  # a dynamic stub: the eviction check refuses it outright
        with pytest.raises(ValueError, match="sliding"):
            check(stub)
        return
    assert check(stub) is None  # a line, not an exception
    assert_not_done(capsys, stub.__name__)
    with pytest.raises(ExerciseNotDone, match="not written yet"):  # the undecorated check still raises
        check.__wrapped__(stub)


@pytest.mark.parametrize("name", bugzoo.SPECIMENS)
def test_an_empty_fix_the_bug_stub_is_not_done(name, capsys):
    """The chapter's stub `class FixedCacheX(bugzoo.CacheX): # your code here` overrides nothing."""
    stub = type(f"Fixed{name}", (getattr(bugzoo, name),), {"__doc__": "your code here"})
    assert checks.check_cache(stub) is None
    assert_not_done(capsys, f"Fixed{name}")


def test_misuse_is_a_clear_error():
    with pytest.raises(ValueError, match="sliding"):
        checks.check_window_eviction(StaticLayerCache)
    with pytest.raises(ValueError, match="window is only for sliding"):
        checks.check_cache(DynamicLayerCache, window=4)
    with pytest.raises(TypeError, match="class itself"):
        checks.check_cache(DynamicLayerCache())


def test_wrong_constructor_is_a_failure_not_a_crash():
    class NeedsWindow:
        kind = "static"

        def __init__(self, window):
            pass

    with pytest.raises(AssertionError, match="constructor arguments"):
        checks.check_keys_values(NeedsWindow)


# -- the hints point at the symptom ------------------------------------------------------------

@pytest.mark.parametrize("name, check, phrase", [
    ("CacheA", checks.check_reset_between_prompts, "still visible to the second"),
    ("CacheB", checks.check_keys_values, "holds the value fed at position"),
    ("CacheC", checks.check_decode_positions, "(?s)prefill's logits are right.*holds zeros"),
    ("CacheD", checks.check_window_eviction, r"position\(s\) \[0\] are missing"),
    ("CacheE", checks.check_chunked_prefill_mask, "chunks before it are right"),
])
def test_hints(name, check, phrase):
    with pytest.raises(AssertionError, match=phrase):
        check(getattr(bugzoo, name))


def test_checks_leave_the_global_random_stream_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    checks.check_cache(SlidingWindowLayerCache)
    with pytest.raises(AssertionError):
        checks.check_cache(bugzoo.CacheD)
    torch.testing.assert_close(torch.rand(3), expected)


def test_specimen_source_is_self_contained():
    """`inspect.getsource` shows a learner the whole class: no specimen inherits its behaviour."""
    for name in bugzoo.SPECIMENS:
        cls = getattr(bugzoo, name)
        assert cls.__bases__ == (object,)
        source = inspect.getsource(cls)
        for member in ("def key_positions", "def update", "def reset", "def __init__"):
            assert member in source
