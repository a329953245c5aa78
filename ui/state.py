"""Streamlit glue shared by every page: the chosen pair, corpus, cache, indexes and the current query."""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import streamlit as st

from core.cache import ResultCache
from core.cloze import ClozeModel, has_mlm_head, load_cloze_model
from core.corpus import Corpus, CorpusError, load_jsonl, load_wiki
from core.index import DenseIndex, load_index
from core.pair import DEFAULT_PRESET, PRESETS, Encoder, ModelLoadError, ModelPair, custom_pair, load_pair
from ui.render import escape

log = logging.getLogger("dpr_lens")
CORPUS_LIMIT_ENV = "DPR_LENS_CORPUS_LIMIT"
CUSTOM = "custom"


@dataclass(frozen=True)
class Selection:
    pair_key: str
    custom_a: str = ""
    custom_b: str = ""
    custom_b_context: str = ""
    corpus_path: str = ""


@st.cache_resource(show_spinner="Loading models…")
def _load_pair(selection: Selection) -> ModelPair:
    if selection.pair_key == CUSTOM:
        pair = load_pair(custom_pair(selection.custom_a, selection.custom_b, selection.custom_b_context or None))
    else:
        pair = load_pair(selection.pair_key)
    log.info("DPR Lens loaded pair %s", pair.spec.key)
    return pair


@st.cache_resource(show_spinner="Loading corpus…")
def _load_corpus(path: str, limit: int | None) -> Corpus:
    corpus = load_jsonl(path) if path else load_wiki()
    return corpus.head(limit) if limit else corpus


@st.cache_resource
def result_cache() -> ResultCache:
    return ResultCache()


@st.cache_resource(show_spinner="Loading the masked-LM head…")
def _cloze_model(fingerprint: str, _encoder: Encoder) -> ClozeModel | None:
    return load_cloze_model(_encoder) if has_mlm_head(_encoder) else None


def cloze_model(encoder: Encoder) -> ClozeModel | None:
    """The encoder's masked-LM model, or None when it was saved without an MLM head (checked once per model)."""
    return _cloze_model(encoder.fingerprint, encoder)


@st.cache_resource
def _index_registry() -> tuple[dict, threading.Lock]:
    return {}, threading.Lock()


def corpus_limit() -> int | None:
    value = os.environ.get(CORPUS_LIMIT_ENV, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def _keep(key: str, default) -> None:
    """Streamlit drops a widget's state on a page switch; restore it from a plain session key."""
    if key not in st.session_state:
        st.session_state[key] = st.session_state.get(f"kept_{key}", default)


def _remember(*keys: str) -> None:
    for key in keys:
        st.session_state[f"kept_{key}"] = st.session_state[key]


def sidebar() -> Selection:
    """Pair and corpus pickers. Every page calls this first, so the pickers exist whichever script
    Streamlit runs (AppTest re-runs only the page script when a pages/ folder exists)."""
    st.sidebar.header("Model pair")
    options = list(PRESETS) + [CUSTOM]
    _keep("pair_key", DEFAULT_PRESET)
    pair_key = st.sidebar.selectbox(
        "Pair", options, key="pair_key",
        format_func=lambda key: PRESETS[key].title if key in PRESETS else "Custom: hub ids or local paths",
    )
    custom = ["", "", ""]
    if pair_key == CUSTOM:
        labels = {"custom_a": "Model A (id or path)",
                  "custom_b": "Model B (id or path; query encoder for DPR)",
                  "custom_b_context": "Model B context encoder (optional)"}
        for position, (key, label) in enumerate(labels.items()):
            _keep(key, "")
            custom[position] = st.sidebar.text_input(label, key=key).strip()
        _remember(*labels)
    else:
        st.sidebar.caption(PRESETS[pair_key].description)
    st.sidebar.header("Corpus")
    _keep("corpus_path", "")
    corpus_path = st.sidebar.text_input(
        "Custom corpus (JSONL path: id, title, text per line; empty = bundled Wikipedia)", key="corpus_path"
    ).strip()
    _remember("pair_key", "corpus_path")
    selection = Selection(pair_key, *custom, corpus_path)
    st.session_state["selection"] = selection
    return selection


def current_selection() -> Selection:
    return st.session_state.get("selection") or Selection(DEFAULT_PRESET)


def require_pair() -> ModelPair:
    """The selected pair, or a clear error and the page stops."""
    selection = current_selection()
    if selection.pair_key == CUSTOM and not (selection.custom_a and selection.custom_b):
        st.info("Enter model A and model B in the sidebar to compare a custom pair.")
        st.stop()
    try:
        return _load_pair(selection)
    except ModelLoadError as error:
        st.error(f"{escape(str(error))} Choose another pair in the sidebar; the offline pair always works.")
        st.stop()


def require_corpus() -> Corpus:
    selection = current_selection()
    try:
        corpus = _load_corpus(selection.corpus_path, corpus_limit())
    except CorpusError as error:
        st.error(escape(str(error)))
        st.stop()
    if corpus.warnings:
        with st.expander(f"{len(corpus.warnings)} corpus line(s) skipped"):
            st.text("\n".join(corpus.warnings[:200]))
    return corpus


def require_indexes(pair: ModelPair, corpus: Corpus) -> dict[str, DenseIndex]:
    """Both models' indexes; built once per (model, corpus) for all sessions, with a progress bar."""
    registry, lock = _index_registry()
    indexes = {}
    for name, encoder in pair.models.items():
        key = (encoder.fingerprint, corpus.fingerprint)
        with lock:
            if key not in registry:
                bar = st.progress(0.0, text=f"Indexing {len(corpus)} passages for model {name}…")

                def update(done: int, total: int, bar=bar, name=name) -> None:
                    bar.progress(done / total, text=f"Indexing passages for model {name}: {done}/{total}")

                registry[key] = load_index(encoder, corpus, result_cache(), progress=update)
                bar.empty()
        indexes[name] = registry[key]
    return indexes


def query_box(label: str = "Query", key: str = "query_input") -> str:
    """A query box whose text is shared by every page."""
    st.session_state.setdefault("query", "")
    text = st.text_input(label, value=st.session_state["query"], key=key,
                         placeholder="e.g. country in Western Europe")
    st.session_state["query"] = text
    return text


def selected_passage(corpus: Corpus) -> int | None:
    """The passage chosen on the retrieval page, if it belongs to the current corpus."""
    chosen = st.session_state.get("selected_passage")
    if chosen and chosen[0] == corpus.fingerprint and 0 <= chosen[1] < len(corpus):
        return chosen[1]
    return None


def select_passage(corpus: Corpus, index: int) -> None:
    st.session_state["selected_passage"] = (corpus.fingerprint, int(index))
