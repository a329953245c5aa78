import sqlite3

import numpy as np

from core.cache import ResultCache, cache_key


def test_key_depends_on_every_parameter():
    base = {"model": "abc", "corpus": "def", "steps": 20, "queries": ["x"]}
    keys = {cache_key("ig", base)}
    for change in ({"model": "abd"}, {"corpus": "deg"}, {"steps": 21}, {"queries": ["y"]}):
        keys.add(cache_key("ig", {**base, **change}))
    keys.add(cache_key("neurons", base))
    assert len(keys) == 6
    assert cache_key("ig", dict(reversed(list(base.items())))) == cache_key("ig", base)


def test_get_or_compute_runs_once(cache):
    calls = []
    compute = lambda: calls.append(1) or np.arange(5)
    first = cache.get_or_compute("x", {"a": 1}, compute)
    second = cache.get_or_compute("x", {"a": 1}, compute)
    assert calls == [1] and np.array_equal(first, second)


def test_corrupt_entry_is_recomputed(cache):
    big = np.ones(100_000)  # large enough that diskcache keeps it in a file
    cache.get_or_compute("x", {"a": 1}, lambda: big)
    files = [p for p in cache.directory.rglob("*.val")]
    assert files
    for path in files:
        path.write_bytes(b"not a pickle")
    value = cache.get_or_compute("x", {"a": 1}, lambda: np.zeros(3))
    assert np.array_equal(value, np.zeros(3))


def test_invalid_value_is_recomputed(cache):
    cache.set("x", {"a": 1}, "wrong type")
    value = cache.get_or_compute("x", {"a": 1}, lambda: 42, is_valid=lambda v: isinstance(v, int))
    assert value == 42


def test_corrupt_database_is_replaced(tmp_path):
    directory = tmp_path / "c"
    directory.mkdir()
    (directory / "cache.db").write_bytes(b"garbage that is not sqlite" * 100)
    cache = ResultCache(directory)
    assert cache.get_or_compute("x", {}, lambda: 7) == 7
    cache.close()


def test_location_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DPR_LENS_CACHE", str(tmp_path / "here"))
    cache = ResultCache()
    assert cache.directory == tmp_path / "here"
    cache.close()
