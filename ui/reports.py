"""The report button under each page's main view."""

from __future__ import annotations

import streamlit as st

from core.report import Bundle, build_zip, safe_name


def report_button(bundle: Bundle, key: str) -> None:
    """The view as a zip (figures PNG/SVG, data CSV/JSON, settings, fingerprints, versions, summary), built on click."""
    st.download_button(
        "Report bundle of this view (zip)",
        lambda: build_zip(bundle),
        f"dpr-lens-{safe_name(key)}.zip",
        "application/zip",
        key=key,
    )
