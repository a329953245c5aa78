"""Streamlit glue shared by every page: the chosen pair, corpus, cache, indexes and the current query."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

import streamlit as st

from core.access import (
    AccessError,
    check_custom_model,
    check_custom_pairs_enabled,
    check_upload_size,
    model_allowlist,
    public_mode,
    upload_limit_mb,
)
from core.cache import ResultCache
from core.cloze import ClozeModel, has_mlm_head, load_cloze_model
from core.corpus import Corpus, CorpusError, load_corpus, load_jsonl_bytes
from core.device import model_device
from core.index import DenseIndex, load_index
from core.pair import DEFAULT_PRESET, PRESETS, Encoder, ModelLoadError, ModelPair, custom_pair, load_pair
from core.retrieval import MAX_K
from core.runtime import report_progress
from core.token_attribution import METHODS
from ui import jobs
from ui.jobs import activity
from ui.render import escape

log = logging.getLogger("dpr_lens")
CORPUS_LIMIT_ENV = "DPR_LENS_CORPUS_LIMIT"
CUSTOM = "custom"
jobs.install()
CUSTOM_LABELS = {
    "custom_a": "Model A (id or path)",
    "custom_b": "Model B (id or path; query encoder for DPR)",
    "custom_b_context": "Model B context encoder (optional)",
}
UPLOAD_KEY = "corpus_file"
KEPT_UPLOAD = f"kept_{UPLOAD_KEY}"


@dataclass(frozen=True)
class Selection:
    pair_key: str
    custom_a: str = ""
    custom_b: str = ""
    custom_b_context: str = ""
    corpus_path: str = ""
    corpus_digest: str = ""  # sha256 of an uploaded corpus file; the parsed corpus is kept under KEPT_UPLOAD


@dataclass(frozen=True)
class UploadedCorpus:
    """An uploaded corpus file, parsed once per content, or why it cannot be used."""

    digest: str
    name: str
    corpus: Corpus | None = None
    problem: str = ""


@st.cache_resource(show_spinner="Loading models…")
def _load_pair(selection: Selection, device: str) -> ModelPair:
    """Once per selection and device (core.device places the models)."""
    if selection.pair_key == CUSTOM:
        pair = load_pair(custom_pair(selection.custom_a, selection.custom_b, selection.custom_b_context or None))
    else:
        pair = load_pair(selection.pair_key)
    log.info("DPR Lens loaded pair %s", pair.spec.key)
    return pair


@st.cache_resource(show_spinner="Loading corpus…")
def _load_corpus(path: str, limit: int | None, version: tuple[int, int] | None) -> Corpus:
    """`version` (size, mtime) is part of the key, so a changed file is loaded (and rescanned) again."""
    return load_corpus(path or None, limit)


def _file_version(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


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
    restore_permalink()
    write_permalink()
    st.sidebar.header("Model pair")
    options = list(PRESETS) + [CUSTOM]
    _keep("pair_key", DEFAULT_PRESET)
    pair_key = st.sidebar.selectbox(
        "Pair",
        options,
        key="pair_key",
        format_func=lambda key: PRESETS[key].title if key in PRESETS else "Custom: hub ids or local paths",
    )
    _remember("pair_key")
    custom = dict.fromkeys(CUSTOM_LABELS, "")
    if pair_key != CUSTOM:
        st.sidebar.caption(PRESETS[pair_key].description)
    elif not public_mode() or model_allowlist():  # else require_pair says that custom pairs are off
        for key, label in CUSTOM_LABELS.items():
            _keep(key, "")
            custom[key] = st.sidebar.text_input(label, key=key).strip()
        _remember(*CUSTOM_LABELS)
        if public_mode():
            st.sidebar.caption(f"This server allows: {escape(', '.join(model_allowlist()))}.")
    st.sidebar.header("Corpus")
    if public_mode():
        corpus_path, corpus_digest = "", _corpus_upload()
    else:
        _keep("corpus_path", "")
        corpus_path = st.sidebar.text_input(
            "Custom corpus (path: .jsonl with id, title, text per line, or DPR's .tsv, or .parquet; "
            "empty = bundled Wikipedia)",
            key="corpus_path",
        ).strip()
        _remember("corpus_path")
        corpus_digest = ""
    selection = Selection(pair_key, **custom, corpus_path=corpus_path, corpus_digest=corpus_digest)
    st.session_state["selection"] = selection
    return selection


def _forget_upload() -> None:
    st.session_state.pop(KEPT_UPLOAD, None)


def _corpus_upload() -> str:
    """Public mode's corpus picker: the digest of the uploaded corpus in use, or "" for the bundled Wikipedia.

    The uploader forgets its file on a page switch, so the parsed corpus is kept in the session until the
    visitor clears or replaces the file (on_change) or asks for Wikipedia back."""
    uploaded = st.sidebar.file_uploader(
        "Custom corpus (JSONL: id, title, text per line; none = bundled Wikipedia)",
        type=["jsonl", "json", "txt"],
        key=UPLOAD_KEY,
        max_upload_size=upload_limit_mb(),
        on_change=_forget_upload,
    )
    if uploaded is not None:
        return _accept_upload(uploaded.name, uploaded.getvalue())
    kept = st.session_state.get(KEPT_UPLOAD)
    if kept is None:
        return ""
    st.sidebar.caption(f"Using your uploaded corpus {escape(kept.name)}.")
    st.sidebar.button("Use the bundled Wikipedia instead", key="forget_corpus_file", on_click=_forget_upload)
    return kept.digest


def _accept_upload(name: str, data: bytes) -> str:
    """Parse an uploaded corpus file unless the session already holds these bytes; return their digest."""
    digest = hashlib.sha256(data).hexdigest()
    kept = st.session_state.get(KEPT_UPLOAD)
    if kept is None or (kept.digest, kept.name) != (digest, name):
        try:
            check_upload_size(len(data))
            kept = UploadedCorpus(digest, name, corpus=load_jsonl_bytes(data, name))
        except (AccessError, CorpusError) as error:
            kept = UploadedCorpus(digest, name, problem=str(error))
        st.session_state[KEPT_UPLOAD] = kept
    return digest


def current_selection() -> Selection:
    return st.session_state.get("selection") or Selection(DEFAULT_PRESET)


def require_pair() -> ModelPair:
    """The selected pair, or a clear error and the page stops."""
    selection = current_selection()
    if selection.pair_key == CUSTOM:
        selection = _allowed_custom_pair(selection)
    try:
        return _load_pair(selection, str(model_device()))
    except ModelLoadError as error:
        st.error(f"{escape(str(error))} Choose another pair in the sidebar; the offline pair always works.")
        st.stop()


def _allowed_custom_pair(selection: Selection) -> Selection:
    """The custom pair with each model as public mode lets the server load it, or a message and the page stops."""
    try:
        check_custom_pairs_enabled()
        if not (selection.custom_a and selection.custom_b):
            st.info("Enter model A and model B in the sidebar to compare a custom pair.")
            st.stop()
        return replace(
            selection,
            **{key: check_custom_model(getattr(selection, key)) for key in CUSTOM_LABELS if getattr(selection, key)},
        )
    except AccessError as error:
        st.error(escape(str(error)))
        st.stop()


def _uploaded_corpus() -> Corpus:
    kept = st.session_state[KEPT_UPLOAD]
    if kept.problem:
        raise CorpusError(kept.problem)
    limit = corpus_limit()
    return kept.corpus.head(limit) if limit else kept.corpus


def require_corpus() -> Corpus:
    selection = current_selection()
    try:
        corpus = (
            _uploaded_corpus()
            if selection.corpus_digest
            else _load_corpus(selection.corpus_path, corpus_limit(), _file_version(selection.corpus_path))
        )
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
            index = registry.get(key)
        if index is None:
            # Not under the lock: sessions asking for the same index share one encoding job and each
            # sees its progress.
            with activity(f"Indexing {len(corpus):,} passages for model {name}"):
                index = load_index(encoder, corpus, result_cache(), progress=report_progress)
            with lock:
                index = registry.setdefault(key, index)
        indexes[name] = index
    return indexes


def query_box(label: str = "Query", key: str = "query_input") -> str:
    """A query box whose text is shared by every page."""
    st.session_state.setdefault("query", "")
    text = st.text_input(label, value=st.session_state["query"], key=key, placeholder="e.g. country in Western Europe")
    st.session_state["query"] = text
    return text


def selected_passage(corpus: Corpus) -> int | None:
    """The passage chosen on the retrieval page, if it belongs to the current corpus."""
    linked = st.session_state.pop(LINKED_PASSAGE, None)
    position = None if linked is None else corpus.position(linked)
    if position is not None:
        select_passage(corpus, position)
    chosen = st.session_state.get("selected_passage")
    if chosen and chosen[0] == corpus.fingerprint and 0 <= chosen[1] < len(corpus):
        return chosen[1]
    return None


def select_passage(corpus: Corpus, index: int) -> None:
    st.session_state["selected_passage"] = (corpus.fingerprint, int(index))
    st.session_state[PASSAGE_ID] = corpus.ids[int(index)]
    write_permalink()  # the passage is chosen late in a run; the URL should not wait for the next one


# ---- permalinks: the view in the URL (st.query_params), read once per session, written on every run ----------------


def _integer(low: int, high: int) -> Callable[[str], int | None]:
    return lambda text: int(text) if text.isdigit() and low <= int(text) <= high else None


def _choice(*options: str) -> Callable[[str], str | None]:
    return lambda text: text if text in options else None


def _flag(text: str) -> bool | None:
    return {"1": True, "0": False}.get(text)


# URL parameter -> (widget key, parser of the URL text; None refuses it). The corpus is never in the URL: a link
# opens the bundled corpus, so no visitor-typed text ever becomes a server path.
PERMALINK_SETTINGS: dict[str, tuple[str, Callable[[str], object]]] = {
    "k": ("top_k", _integer(1, MAX_K)),
    "steps": ("token_ig_steps", _integer(2, 256)),
    "method": ("token_ig_method", _choice(*METHODS)),
    "deletion_k": ("token_ig_k", _integer(1, 30)),
    "stopwords": ("token_ig_stopwords", _flag),
    "adaptive": ("token_ig_adaptive", _flag),
    "start_steps": ("token_ig_start_steps", _integer(1, 256)),
    "sinh": ("token_ig_substitution", _flag),
    "side": ("token_ig_side", _choice("query", "passage")),
    "methods": ("methods_show", _flag),
    "methods_side": ("methods_side", _choice("query", "passage")),
    "pairs": ("token_pairs_show", _flag),
    "pair_words": ("token_pairs_words", _flag),
    "pair_columns": ("token_pairs_limit", _integer(10, 80)),
}
PERMALINK_READ = "permalink_read"
LINKED_PASSAGE = "permalink_passage"
PASSAGE_ID = "selected_passage_id"
QUERY_LIMIT = 500


def restore_permalink() -> None:
    """At session start: the URL's pair (presets only), query, passage and settings become the session's state."""
    if st.session_state.get(PERMALINK_READ):
        return
    st.session_state[PERMALINK_READ] = True
    params = st.query_params
    if params.get("pair") in PRESETS:
        st.session_state["kept_pair_key"] = params["pair"]
    if params.get("q"):
        st.session_state["query"] = params["q"][:QUERY_LIMIT]
    if params.get("passage"):
        st.session_state[LINKED_PASSAGE] = params["passage"]
    for name, (key, parse) in PERMALINK_SETTINGS.items():
        value = parse(params[name]) if name in params else None
        if value is not None:
            st.session_state[key] = value


def permalink_params() -> dict[str, str]:
    """The current view as URL parameters (the page itself is the URL's path)."""
    state = st.session_state
    params = {}
    if state.get("pair_key", state.get("kept_pair_key")) in PRESETS:
        params["pair"] = state.get("pair_key", state.get("kept_pair_key"))
    query = state.get("query_input", state.get("query", ""))
    if query:
        params["q"] = query[:QUERY_LIMIT]
    if state.get(PASSAGE_ID):
        params["passage"] = state[PASSAGE_ID]
    for name, (key, _) in PERMALINK_SETTINGS.items():
        if key in state:
            value = state[key]
            params[name] = str(int(value)) if isinstance(value, (bool, int)) else str(value)
    return params


def write_permalink() -> None:
    params = permalink_params()
    if params != st.query_params.to_dict():
        st.query_params.from_dict(params)
