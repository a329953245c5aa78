"""Disk cache of model runs, keyed by model/corpus fingerprints and every run parameter.

One cache directory may be shared by several processes (app workers, a CLI run): diskcache keeps its index
in SQLite, so reads and writes are process-safe, and a process killed mid-write leaves at most an unreferenced
value file behind (values are written to a fresh file before the row that points at them is committed).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import diskcache

from .errors import LensError
from .runtime import model_scheduler

log = logging.getLogger(__name__)
T = TypeVar("T")
_MISSING = object()

CACHE_ENV_VAR = "DPR_LENS_CACHE"
LIMIT_ENV_VAR = "DPR_LENS_CACHE_LIMIT_GB"
DEFAULT_LIMIT_GB = 4.0
_CORRUPTION_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}


class CacheConfigError(LensError):
    """A cache setting that cannot be used; the message is meant for the user."""


def default_cache_dir() -> Path:
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dpr-lens"


def size_limit_from_env() -> int:
    """Bytes the cache may hold: $DPR_LENS_CACHE_LIMIT_GB gibibytes, 4 when unset or empty."""
    raw = os.environ.get(LIMIT_ENV_VAR, "").strip()
    if not raw:
        return int(DEFAULT_LIMIT_GB * 2**30)
    try:
        gigabytes = float(raw)
    except ValueError:
        gigabytes = math.nan
    limit = int(gigabytes * 2**30) if math.isfinite(gigabytes) else 0
    if limit <= 0:
        raise CacheConfigError(
            f"{LIMIT_ENV_VAR} must be a positive number of gigabytes (such as 4 or 0.5), not {raw!r}."
        )
    return limit


def _is_corruption(error: sqlite3.Error) -> bool:
    """A damaged database file, as opposed to a busy one ('database is locked') or any other failure."""
    code = getattr(error, "sqlite_errorcode", None)
    return code is not None and (code & 0xFF) in _CORRUPTION_CODES


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cache key parameter of type {type(value).__name__} is not serialisable")


def cache_key(namespace: str, params: dict[str, Any]) -> str:
    """A stable key: the namespace plus a hash of every parameter (sorted, JSON-encoded)."""
    canonical = json.dumps(params, sort_keys=True, default=_jsonable, ensure_ascii=False)
    return f"{namespace}:{hashlib.sha256(canonical.encode()).hexdigest()}"


class ResultCache:
    """diskcache wrapper that treats any unreadable entry as a miss and recomputes it."""

    def __init__(self, directory: str | Path | None = None, size_limit: int | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.directory.mkdir(parents=True, exist_ok=True)
        # Evict in the order entries were stored, not used: diskcache's least-recently-used policy turns every
        # read into a write transaction that holds the cache-wide SQLite lock while the value file is read and
        # unpickled, queueing all sessions' and processes' reads; an old entry still in use is just stored anew.
        # cull_limit 0: _evict_to_limit, not diskcache's ten-per-write culling, does the evicting.
        self._settings = {
            "size_limit": size_limit_from_env() if size_limit is None else size_limit,
            "eviction_policy": "least-recently-stored",
            "cull_limit": 0,
        }
        try:
            self._store = self._open()
        except sqlite3.DatabaseError as error:
            if not _is_corruption(error):
                raise
            self._store = self._replace_corrupt(error)

    def _open(self) -> diskcache.Cache:
        return diskcache.Cache(str(self.directory), **self._settings)

    def _replace_corrupt(self, error: sqlite3.DatabaseError) -> diskcache.Cache:
        """Moves a corrupt cache directory aside (never deletes it) and opens a fresh one.

        Other processes may find the same corruption at the same moment: each retries under an exclusive lock
        on the directory, so a process that comes second opens the fresh cache instead of moving it away too.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.directory, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            try:
                return self._open()
            except sqlite3.DatabaseError as again:
                if not _is_corruption(again):
                    raise
            aside = self.directory.with_name(
                f"{self.directory.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
            )
            self.directory.rename(aside)
            log.warning(
                "cache at %s is corrupt (%s); moved it to %s and started an empty one", self.directory, error, aside
            )
            self.directory.mkdir(parents=True, exist_ok=True)
            return self._open()
        finally:
            os.close(descriptor)

    def get(self, namespace: str, params: dict[str, Any]) -> Any:
        key = cache_key(namespace, params)
        try:
            return self._store.get(key, default=_MISSING)
        except (sqlite3.Error, diskcache.Timeout) as error:  # the database is busy, not the entry bad: keep it
            log.warning("cache database busy or failing at %s (%s); recomputing", key, error)
            return _MISSING
        except Exception as error:
            log.warning("cache entry %s unreadable (%s); recomputing", key, error)
            self._discard(key)
            return _MISSING

    def set(self, namespace: str, params: dict[str, Any], value: Any) -> None:
        key = cache_key(namespace, params)
        try:
            self._store.set(key, value)
        except Exception as error:
            log.warning("could not write cache entry %s (%s)", key, error)
            return
        self._evict_to_limit(keep=key)

    def _evict_to_limit(self, keep: str) -> None:
        """Evicts the oldest entries until the cache is within its limit again, never the one just written.

        diskcache's own culling evicts ten entries per write whatever their size: it empties a cache of a few
        large entries, the new one included, and lets large writes after many small ones outgrow the limit.
        """
        try:
            for key in self._store:  # in the order first stored
                if self._store.volume() <= self._store.size_limit:
                    return
                if key != keep:
                    self._store.delete(key)
        except (sqlite3.Error, diskcache.Timeout) as error:
            log.warning("could not evict old cache entries (%s)", error)

    def get_or_compute(
        self,
        namespace: str,
        params: dict[str, Any],
        compute: Callable[[], T],
        is_valid: Callable[[Any], bool] | None = None,
    ) -> T:
        """The cached value, else compute() on the model worker and store it.

        Requests for the same key while it is being computed (other sessions) share that computation.
        """

        def lookup() -> Any:
            value = self.get(namespace, params)
            if value is not _MISSING and (is_valid is None or _safe_check(is_valid, value)):
                return value
            return _MISSING

        value = lookup()
        if value is not _MISSING:
            return value

        def compute_and_store() -> T:
            stored = lookup()  # a job that finished while this one was queued may have stored it
            if stored is not _MISSING:
                return stored
            computed = compute()
            self.set(namespace, params, computed)
            return computed

        job_key = f"{self.directory}|{cache_key(namespace, params)}"
        return model_scheduler().run(compute_and_store, key=job_key)

    def contains(self, namespace: str, params: dict[str, Any]) -> bool:
        return self.get(namespace, params) is not _MISSING

    def _discard(self, key: str) -> None:
        try:
            self._store.delete(key)
        except Exception as error:
            log.warning("could not delete cache entry %s (%s)", key, error)

    def clear(self) -> None:
        self._store.clear()

    def close(self) -> None:
        self._store.close()


def _safe_check(is_valid: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(is_valid(value))
    except Exception:
        return False


@dataclass(frozen=True)
class Analysis(Generic[T]):
    """One cached analysis, declared once: its namespace, format version, key fields and result type.

    Every key holds the version, so bumping it when the result class or the computation changes means no
    old pickle is ever served; a call whose key fields differ from the declared ones is a programming error.
    """

    namespace: str
    version: int
    fields: tuple[str, ...]
    result_type: type | tuple[type, ...] = object

    def key(self, values: dict[str, Any]) -> dict[str, Any]:
        missing, unknown = set(self.fields) - set(values), set(values) - set(self.fields)
        if missing or unknown:
            raise TypeError(f"cache key of {self.namespace!r}: missing {sorted(missing)}, unknown {sorted(unknown)}")
        return {**values, "format": self.version}

    def _valid(self, value: Any, check: Callable[[Any], bool] | None) -> bool:
        return isinstance(value, self.result_type) and (check is None or _safe_check(check, value))

    def lookup(self, cache: ResultCache | None, check: Callable[[Any], bool] | None = None, **values) -> T | None:
        """The stored result, or None; never computes."""
        if cache is None:
            return None
        value = cache.get(self.namespace, self.key(values))
        return value if value is not _MISSING and self._valid(value, check) else None

    def get_or_compute(
        self, cache: ResultCache | None, compute: Callable[[], T], check: Callable[[Any], bool] | None = None, **values
    ) -> T:
        """The stored result, else compute() (on the model worker, shared by identical requests) and store it.

        check: an extra validity test of a stored value (e.g. its shape); a value failing it is recomputed.
        """
        if cache is None:
            return compute()
        return cache.get_or_compute(
            self.namespace, self.key(values), compute, is_valid=lambda value: self._valid(value, check)
        )
