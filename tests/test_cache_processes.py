"""ResultCache shared by processes: a writer killed with SIGKILL, and two processes writing at once."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from core.cache import _MISSING, LIMIT_ENV_VAR, ResultCache

ROOT = Path(__file__).resolve().parents[1]


def value(key: int) -> np.ndarray:
    """What every process stores under `key`: 2 MiB for even keys (a file of its own), 8 kB for odd ones
    (kept inside the database)."""
    return np.random.default_rng(key).standard_normal(1_000 if key % 2 else 2**18)


def start(script: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, LIMIT_ENV_VAR: "1"}
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


WRITER = """
import sys
from core.cache import ResultCache
from tests.test_cache_processes import value

cache = ResultCache(sys.argv[1])
for key in range(int(sys.argv[2]), 10**6):
    cache.set("kill", {"key": key}, value(key))
    print(key, flush=True)
"""


def test_a_writer_killed_mid_write_leaves_the_cache_readable(tmp_path):
    directory, first, stored, rng = tmp_path / "cache", 0, 0, random.Random(0)
    for _ in range(2):
        writer = start(WRITER, str(directory), str(first))
        written = [int(writer.stdout.readline()) for _ in range(4)]
        time.sleep(rng.uniform(0, 0.05))  # lands somewhere inside a later write
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        last = max(written + [int(line) for line in writer.stdout.read().split()])

        cache = ResultCache(directory)
        for key in range(first, last + 1):  # printed once committed: must all be there
            assert np.array_equal(cache.get("kill", {"key": key}), value(key)), key
        following = cache.get("kill", {"key": last + 1})  # the write the kill may have cut short
        assert following is _MISSING or np.array_equal(following, value(last + 1))
        stored += last + 1 - first + (following is not _MISSING)
        assert len(cache._store) == stored
        cache.close()
        first = last + 2

    limit = 5 * value(0).nbytes
    cache = ResultCache(directory, size_limit=limit)
    cache.set("after", {}, value(0))
    assert np.array_equal(cache.get("after", {}), value(0))
    assert len(cache._store) < stored and cache._store.volume() <= limit
    assert cache.get("kill", {"key": 0}) is _MISSING


IN_TRANSACTION = """
import sys, time
from core.cache import ResultCache
from tests.test_cache_processes import value

cache = ResultCache(sys.argv[1])
cache.set("txn", {"key": 0}, value(0))
with cache._store.transact():
    cache.set("txn", {"key": 2}, value(2))
    print("inside", flush=True)
    time.sleep(60)
"""


def test_a_writer_killed_inside_a_transaction_releases_the_cache(tmp_path):
    writer = start(IN_TRANSACTION, str(tmp_path / "cache"))
    assert writer.stdout.readline().strip() == "inside", writer.stderr.read()
    writer.send_signal(signal.SIGKILL)
    writer.wait()

    cache = ResultCache(tmp_path / "cache")
    assert np.array_equal(cache.get("txn", {"key": 0}), value(0))
    assert cache.get("txn", {"key": 2}) is _MISSING  # never committed
    cache.set("txn", {"key": 4}, value(4))  # the dead writer's lock is gone
    assert np.array_equal(cache.get("txn", {"key": 4}), value(4))
    assert len(cache._store) == 2


SHARER = """
import logging, sys, time
from pathlib import Path
import numpy as np
from core.cache import _MISSING, ResultCache
from tests.test_cache_processes import value

logging.basicConfig(level=logging.WARNING)
directory, me = Path(sys.argv[1]), int(sys.argv[2])
print("ready", flush=True)
while not (directory.parent / "go").exists():
    time.sleep(0.002)
cache = ResultCache(directory)
for i in range(16):
    mine, shared, theirs = 1000 * (1 + me) + i, i, 1000 * (2 - me) + i
    for key in (mine, shared, theirs):
        expected = value(key)
        seen = cache.get("k", {"key": key})
        assert seen is _MISSING or np.array_equal(seen, expected), key
        if key != theirs:
            cache.set("k", {"key": key}, expected)
            stored = cache.get("k", {"key": key})  # a shared key the other is rewriting right now may miss
            assert np.array_equal(stored, expected) or (key == shared and stored is _MISSING), key
print("done", flush=True)
"""


def test_two_processes_share_one_cache(tmp_path):
    directory = tmp_path / "cache"
    sharers = [start(SHARER, str(directory), str(me)) for me in (0, 1)]
    for sharer in sharers:
        assert sharer.stdout.readline().strip() == "ready", sharer.stderr.read()
    (tmp_path / "go").touch()
    for sharer in sharers:
        out, err = sharer.communicate(timeout=60)
        assert (sharer.returncode, out.strip(), err) == (0, "done", "")

    cache = ResultCache(directory)
    keys = [owner + i for owner in (0, 1000, 2000) for i in range(16)]
    for key in keys:
        assert np.array_equal(cache.get("k", {"key": key}), value(key)), key
    assert len(cache._store) == len(keys)
