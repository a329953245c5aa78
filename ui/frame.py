"""The frame every page shares: sidebar (pair, corpus), title, the loaded pair and corpus, and the one
place where a user-facing error (core.errors.LensError) becomes a message instead of a traceback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

from core.corpus import Corpus
from core.device import device_name, model_device
from core.errors import LensError
from core.pair import ModelPair
from core.retrieval import QueryError
from ui.render import escape
from ui.state import require_corpus, require_pair, sidebar

ENTRYPOINT = "app.py"
ENTERED = "entered_through_app"


def pages() -> list[st.Page]:
    return [
        st.Page("pages/retrieval.py", title="Retrieval", icon=":material/search:", default=True),
        st.Page("pages/token_attributions.py", title="Token attributions", icon=":material/format_color_text:"),
        st.Page("pages/knowledge_neurons.py", title="Knowledge neurons", icon=":material/neurology:"),
        st.Page("pages/probing_evaluation.py", title="Probing & evaluation", icon=":material/monitoring:"),
        st.Page("pages/twins.py", title="Twin analyses", icon=":material/compare_arrows:"),
    ]


def navigate() -> None:
    """The entrypoint's job: register the pages and run the one the URL names."""
    page = st.navigation(pages())
    st.session_state[ENTERED] = True
    page.run()


def _run_past_the_entrypoint() -> bool:
    """A page script run by itself, in a session that has never been through app.py. (AppTest also runs page
    scripts by themselves, but only after a first run through app.py.)"""
    context = get_script_run_ctx(suppress_warning=True)
    entrypoint = Path(context.main_script_path).name if context else ""
    return entrypoint == ENTRYPOINT and not st.session_state.get(ENTERED)


def run_page(title: str, render: Callable[[ModelPair, Corpus], None], method: str = "") -> None:
    """Draw the frame, then the page's own content; method: one line on what the page computes."""
    if _run_past_the_entrypoint():
        # Until app.py has run once, Streamlit treats pages/ as an old-style multipage folder and runs a page
        # URL's script directly, with a navigation made from file names. Registering ours replaces it, and
        # routes every later run through app.py.
        st.navigation(pages())
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
