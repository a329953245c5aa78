"""Public mode: what a server open to anyone lets a visitor make it read.

In public mode a custom corpus arrives as an upload of bounded size, never as a server path, and a
custom model must be one the operator listed; the text a visitor types is only compared with that
list, and the operator's own entry is what gets loaded.
"""

from __future__ import annotations

import os

from .errors import LensError

PUBLIC_ENV = "DPR_LENS_PUBLIC"
UPLOAD_LIMIT_ENV = "DPR_LENS_UPLOAD_LIMIT_MB"
ALLOWLIST_ENV = "DPR_LENS_MODEL_ALLOWLIST"
DEFAULT_UPLOAD_LIMIT_MB = 50
MEGABYTE = 1024 * 1024


class AccessError(LensError):
    """A request public mode refuses; the message is meant for the user."""


def public_mode() -> bool:
    return os.environ.get(PUBLIC_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def upload_limit_mb() -> int:
    value = os.environ.get(UPLOAD_LIMIT_ENV, "").strip()
    # A malformed setting falls back to the default rather than to no limit at all.
    return int(value) if value.isdigit() and int(value) > 0 else DEFAULT_UPLOAD_LIMIT_MB


def upload_limit_bytes() -> int:
    return upload_limit_mb() * MEGABYTE


def check_upload_size(size: int) -> None:
    if size > upload_limit_bytes():
        raise AccessError(
            f"The uploaded corpus is larger than this server's limit of {upload_limit_mb()} MB ({UPLOAD_LIMIT_ENV})."
        )


def model_allowlist() -> tuple[str, ...]:
    entries = (entry.strip() for entry in os.environ.get(ALLOWLIST_ENV, "").split(","))
    return tuple(dict.fromkeys(entry for entry in entries if entry))


def check_custom_pairs_enabled() -> None:
    if public_mode() and not model_allowlist():
        raise AccessError(
            f"This server is in public mode and custom pairs are off because the operator allowed no "
            f"model ({ALLOWLIST_ENV}); choose a preset pair."
        )


def _lexical_path(text: str) -> str:
    # abspath only rewrites the string; it never touches the filesystem.
    return os.path.abspath(text)


def check_custom_model(source: str) -> str:
    """The model source to load for `source` as typed; outside public mode that is `source` itself.

    In public mode it is the allowlist entry that `source` names, verbatim or as the same local path
    spelled differently (`./models/x` for `models/x`), so the loaded path is always the operator's own.
    """
    if not public_mode():
        return source
    check_custom_pairs_enabled()
    wanted = source.strip()
    for entry in model_allowlist():
        if wanted == entry or _lexical_path(wanted) == _lexical_path(entry):
            return entry
    raise AccessError(
        f"This server is in public mode: model {wanted!r} is not on the operator's allowlist ({ALLOWLIST_ENV})."
    )
