import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import diskcache
import numpy as np
import pytest

from core.cache import (
    _MISSING,
    DEFAULT_LIMIT_GB,
    LIMIT_ENV_VAR,
    CacheConfigError,
    ResultCache,
    cache_key,
    size_limit_from_env,
)


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

    def compute():
        calls.append(1)
        return np.arange(5)

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


def test_corrupt_database_is_moved_aside_not_deleted(tmp_path):
    directory = tmp_path / "c"
    directory.mkdir()
    garbage = b"garbage that is not sqlite" * 100
    (directory / "cache.db").write_bytes(garbage)
    cache = ResultCache(directory)
    assert cache.get_or_compute("x", {}, lambda: 7) == 7
    cache.close()
    (aside,) = tmp_path.glob("c.corrupt-*")
    assert (aside / "cache.db").read_bytes() == garbage


def test_openers_meeting_the_same_corruption_move_it_aside_once(monkeypatch, tmp_path):
    """Threads stand in for processes: each opener locks the directory through a descriptor of its own."""
    directory = tmp_path / "c"
    directory.mkdir()
    (directory / "cache.db").write_bytes(b"garbage that is not sqlite" * 100)
    open_cache, all_failed, first_try = diskcache.Cache, threading.Barrier(4), threading.local()

    def open_failing_slowly(*args, **kwargs):  # every opener fails before any recovers, so that they meet there
        try:
            return open_cache(*args, **kwargs)
        except sqlite3.DatabaseError:
            if getattr(first_try, "over", False):
                time.sleep(0.05)
            else:
                first_try.over = True
                all_failed.wait()
            raise

    monkeypatch.setattr(diskcache, "Cache", open_failing_slowly)
    with ThreadPoolExecutor(4) as pool:
        caches = list(pool.map(lambda _: ResultCache(directory), range(4)))
    assert len(list(tmp_path.glob("c.corrupt-*"))) == 1
    caches[0].set("x", {}, 7)
    assert all(cache.get("x", {}) == 7 for cache in caches)


def test_a_locked_database_is_not_treated_as_corruption(monkeypatch, tmp_path):
    directory = tmp_path / "c"
    ResultCache(directory).set("x", {}, 7)

    def locked(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(diskcache, "Cache", locked)
    with pytest.raises(sqlite3.OperationalError):
        ResultCache(directory)
    monkeypatch.undo()
    assert not list(tmp_path.glob("c.corrupt-*"))
    assert ResultCache(directory).get("x", {}) == 7


def test_a_busy_read_is_a_miss_that_keeps_the_entry(cache, monkeypatch):
    cache.set("x", {}, 7)

    def busy(*args, **kwargs):
        raise diskcache.Timeout

    monkeypatch.setattr(cache._store, "get", busy)
    assert cache.get("x", {}) is _MISSING
    monkeypatch.undo()
    assert cache.get("x", {}) == 7


@pytest.mark.parametrize(
    "value, gigabytes", [("", DEFAULT_LIMIT_GB), ("  ", DEFAULT_LIMIT_GB), ("0.5", 0.5), ("12", 12.0), ("1e-3", 1e-3)]
)
def test_size_limit_from_environment(monkeypatch, value, gigabytes):
    monkeypatch.setenv(LIMIT_ENV_VAR, value)
    assert size_limit_from_env() == int(gigabytes * 2**30)


@pytest.mark.parametrize("value", ["abc", "4GB", "0", "-1", "nan", "inf", "1e-12"])
def test_bad_size_limit_is_a_clear_error(monkeypatch, tmp_path, value):
    monkeypatch.setenv(LIMIT_ENV_VAR, value)
    with pytest.raises(CacheConfigError, match=f"{LIMIT_ENV_VAR} must be a positive number.*{value!r}"):
        ResultCache(tmp_path / "c")


def test_size_limit_evicts_the_oldest_entries(monkeypatch, tmp_path):
    monkeypatch.setenv(LIMIT_ENV_VAR, str(2**20 / 2**30))  # 1 MiB
    cache = ResultCache(tmp_path / "c")
    entry = np.arange(5_000, dtype=np.float64)  # 40 kB, stored in its own file
    for i in range(100):
        cache.set("x", {"i": i}, entry + i)
        assert cache._store.volume() <= 2**20
    kept = [i for i in range(100) if cache.contains("x", {"i": i})]
    assert 10 < len(kept) < 30 and kept == list(range(100 - len(kept), 100))
    assert np.array_equal(cache.get("x", {"i": 99}), entry + 99)
    assert sum(path.stat().st_size for path in cache.directory.rglob("*.val")) <= 2**20
    cache.close()


def test_a_cache_of_a_few_large_entries_keeps_the_newest(tmp_path):
    cache = ResultCache(tmp_path / "c", size_limit=2**20)
    for i in range(8):
        cache.set("x", {"i": i}, np.full(37_500, i, dtype=np.float64))  # 300 kB: three fit in 1 MiB
        assert [j for j in range(i + 1) if cache.contains("x", {"i": j})] == list(range(max(0, i - 2), i + 1))
    cache.close()


def test_large_entries_after_many_small_ones_stay_within_the_limit(tmp_path):
    cache = ResultCache(tmp_path / "c", size_limit=2**20)
    for i in range(200):
        cache.set("small", {"i": i}, np.full(500, i, dtype=np.float64))  # 4 kB, kept inside the database
    for i in range(10):
        cache.set("large", {"i": i}, np.full(25_000, i, dtype=np.float64))  # 200 kB
        assert cache._store.volume() <= 2**20
    assert np.array_equal(cache.get("large", {"i": 9}), np.full(25_000, 9, dtype=np.float64))
    cache.close()


def test_location_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DPR_LENS_CACHE", str(tmp_path / "here"))
    cache = ResultCache()
    assert cache.directory == tmp_path / "here"
    cache.close()
