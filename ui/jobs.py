"""Waiting for model work in a page: the session's place in the queue, then the job's own progress.

core.runtime runs every model job on one worker; while a page waits for one, the scheduler calls the
waiter made here about four times a second. Each call redraws the status element, which is also how a
rerun or a closed tab reaches the waiting script (Streamlit raises in the script thread), so the session
stops waiting and the scheduler drops the job if nobody else wants it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

from core.runtime import JobStatus, Waiter, model_scheduler

_activity = threading.local()


@contextmanager
def activity(label: str) -> Iterator[None]:
    """Names the model work started inside the block, for the waiting message."""
    previous = getattr(_activity, "label", None)
    _activity.label = label
    try:
        yield
    finally:
        _activity.label = previous


def status_text(label: str, status: JobStatus) -> str:
    if status.state == "queued":
        jobs = "job" if status.ahead == 1 else "jobs"
        return f"{label}: waiting for the model, {status.ahead} {jobs} ahead of yours in the queue"
    if status.total:
        return f"{label}: {status.done}/{status.total}"
    return f"{label}: running"


class _StatusView:
    def __init__(self, label: str):
        self.label = label
        self.slot = None

    def show(self, status: JobStatus) -> None:
        if self.slot is None:
            self.slot = st.empty()
        fraction = status.done / status.total if status.state == "running" and status.total else 0.0
        self.slot.progress(min(max(fraction, 0.0), 1.0), text=status_text(self.label, status))

    def clear(self) -> None:
        if self.slot is not None:
            self.slot.empty()


def _session_waiter() -> Waiter | None:
    context = get_script_run_ctx(suppress_warning=True)
    if context is None:
        return None
    view = _StatusView(getattr(_activity, "label", None) or "Computing")
    return Waiter(context.session_id, view.show, view.clear)


def install() -> None:
    """Every model job a page waits for shows its queue position and progress in that page."""
    model_scheduler().waiter_provider = _session_waiter
