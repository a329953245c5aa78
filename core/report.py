"""Report bundles: one zip of a view, built from plain data (Vega-Lite specs, tables, settings) so that the app and
the CLI write the same thing.

Layout: README.md (the summary), manifest.json (title, settings, model and corpus fingerprints, package versions,
file list), figures/<name>.png, .svg and .vl.json, data/<name>.csv and data/<name>.json.
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata

import numpy as np
import pandas as pd
import vl_convert

PACKAGES = (
    "torch",
    "transformers",
    "captum",
    "streamlit",
    "altair",
    "vl-convert-python",
    "numpy",
    "pandas",
    "scipy",
    "faiss-cpu",
)


@dataclass(frozen=True)
class Bundle:
    """title: one line; summary: Markdown that alone tells what was compared and what came out; figures: name ->
    Vega-Lite spec (dict); tables: name -> rows; fingerprints: e.g. model A/B and corpus fingerprints."""

    title: str
    summary: str
    settings: dict
    fingerprints: dict[str, str]
    figures: dict[str, dict] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _plain(value):
    """JSON-ready: arrays and tuples as lists, NaN and infinities as null."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value.item() if isinstance(value, np.generic) else value


def safe_name(name: str) -> str:
    """A file name from any label: letters, digits, '-' and '_' only."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "item"


def build_zip(bundle: Bundle) -> bytes:
    files: dict[str, bytes] = {}
    for name, spec in bundle.figures.items():
        stem = f"figures/{safe_name(name)}"
        text = json.dumps(spec)
        files[f"{stem}.vl.json"] = text.encode()
        files[f"{stem}.svg"] = vl_convert.vegalite_to_svg(text).encode()
        files[f"{stem}.png"] = vl_convert.vegalite_to_png(text, scale=2)
    for name, table in bundle.tables.items():
        stem = f"data/{safe_name(name)}"
        files[f"{stem}.csv"] = table.to_csv(index=False).encode()
        files[f"{stem}.json"] = json.dumps(_plain(table.to_dict("records")), indent=1).encode()
    manifest = {
        "title": bundle.title,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": _plain(bundle.settings),
        "fingerprints": bundle.fingerprints,
        "packages": package_versions(),
        "files": sorted(files),
    }
    files["manifest.json"] = json.dumps(manifest, indent=1).encode()
    files["README.md"] = bundle.summary.encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(files):
            archive.writestr(path, files[path])
    return buffer.getvalue()
