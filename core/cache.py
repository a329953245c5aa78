"""Disk cache of model runs, keyed by model/corpus fingerprints and every run parameter."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, TypeVar

import diskcache

log = logging.getLogger(__name__)
T = TypeVar("T")
_MISSING = object()

CACHE_ENV_VAR = "DPR_LENS_CACHE"


def default_cache_dir() -> Path:
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dpr-lens"


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

    def __init__(self, directory: str | Path | None = None, size_limit: int = 4 * 2**30):
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self._store = diskcache.Cache(str(self.directory), size_limit=size_limit)
        except Exception as error:  # a corrupt sqlite file: start afresh rather than fail
            log.warning("cache at %s unreadable (%s); recreating it", self.directory, error)
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory.mkdir(parents=True, exist_ok=True)
            self._store = diskcache.Cache(str(self.directory), size_limit=size_limit)

    def get(self, namespace: str, params: dict[str, Any]) -> Any:
        key = cache_key(namespace, params)
        try:
            return self._store.get(key, default=_MISSING)
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

    def get_or_compute(
        self,
        namespace: str,
        params: dict[str, Any],
        compute: Callable[[], T],
        is_valid: Callable[[Any], bool] | None = None,
    ) -> T:
        value = self.get(namespace, params)
        if value is not _MISSING and (is_valid is None or _safe_check(is_valid, value)):
            return value
        value = compute()
        self.set(namespace, params, value)
        return value

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
