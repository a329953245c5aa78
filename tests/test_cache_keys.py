"""The one cache wrapper: each analysis declares its key fields and version once."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from core.cache import Analysis


@dataclass(frozen=True)
class Result:
    value: int


SQUARE = Analysis("square", version=1, fields=("x",), result_type=Result)


def test_get_or_compute_computes_once_and_lookup_never_computes(cache):
    calls = []

    def compute():
        calls.append(1)
        return Result(9)

    assert SQUARE.lookup(cache, x=3) is None
    assert SQUARE.get_or_compute(cache, compute, x=3) == Result(9)
    assert SQUARE.get_or_compute(cache, compute, x=3) == Result(9)
    assert SQUARE.lookup(cache, x=3) == Result(9)
    assert calls == [1]


def test_a_new_version_never_serves_the_old_result(cache):
    SQUARE.get_or_compute(cache, lambda: Result(9), x=3)
    bumped = Analysis("square", version=2, fields=("x",), result_type=Result)
    assert bumped.lookup(cache, x=3) is None
    assert bumped.get_or_compute(cache, lambda: Result(10), x=3) == Result(10)
    assert SQUARE.lookup(cache, x=3) == Result(9)


def test_a_stored_value_of_another_class_is_recomputed(cache):
    cache.set("square", SQUARE.key({"x": 4}), 16)  # an old pickle of a different result class
    assert SQUARE.lookup(cache, x=4) is None
    assert SQUARE.get_or_compute(cache, lambda: Result(16), x=4) == Result(16)


def test_key_fields_must_match_the_declaration(cache):
    with pytest.raises(TypeError, match=r"missing \['x'\]"):
        SQUARE.lookup(cache, y=3)
    with pytest.raises(TypeError, match=r"unknown \['y'\]"):
        SQUARE.get_or_compute(cache, lambda: Result(1), x=1, y=3)


def test_check_rejects_a_stored_value(cache):
    SQUARE.get_or_compute(cache, lambda: Result(-1), x=5)
    assert SQUARE.lookup(cache, x=5, check=lambda result: result.value > 0) is None
    assert SQUARE.get_or_compute(cache, lambda: Result(25), check=lambda r: r.value > 0, x=5) == Result(25)


def test_without_a_cache_it_just_computes():
    assert SQUARE.get_or_compute(None, lambda: Result(1), x=1) == Result(1)
    assert SQUARE.lookup(None, x=1) is None
