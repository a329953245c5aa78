"""The frame every page shares: sidebar (pair, corpus), title, the loaded pair and corpus, and the one
place where a user-facing error (core.errors.LensError) becomes a message instead of a traceback."""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

from core.corpus import Corpus
from core.device import device_name, model_device
from core.errors import LensError
from core.pair import ModelPair
from core.retrieval import QueryError
from ui.render import escape
from ui.state import require_corpus, require_pair, sidebar


def run_page(title: str, render: Callable[[ModelPair, Corpus], None], method: str = "") -> None:
    """Draw the frame, then the page's own content; method: one line on what the page computes."""
    sidebar()
    st.title(title)
    pair = require_pair()
    corpus = require_corpus()
    st.caption(
        f"**{escape(pair.spec.title)}** · corpus: {escape(corpus.name)} ({len(corpus):,} passages)"
        f" · device: {escape(device_name(model_device()))}" + (f" · {method}" if method else "")
    )
    try:
        render(pair, corpus)
    except QueryError as error:  # an empty or unusable query is a prompt to type one, not a failure
        st.info(escape(str(error)))
    except LensError as error:
        st.error(escape(str(error)))
