"""Public mode (DPR_LENS_PUBLIC): uploads instead of server paths, an operator allowlist for custom models.
Pages run on the tiny random BERT of conftest over a small corpus slice."""

import json
import os
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.access import (
    ALLOWLIST_ENV,
    DEFAULT_UPLOAD_LIMIT_MB,
    MEGABYTE,
    PUBLIC_ENV,
    UPLOAD_LIMIT_ENV,
    AccessError,
    check_custom_model,
    check_upload_size,
    model_allowlist,
    public_mode,
    upload_limit_bytes,
)
from core.pair import custom_pair
from ui.render import escape
from ui.state import _load_pair

ROOT = Path(__file__).resolve().parent.parent
APP, RETRIEVAL = str(ROOT / "app.py"), str(ROOT / "pages/retrieval.py")
TIMEOUT = 120
LIMIT = 6
GOOD, BAD = json.dumps({"id": "c", "title": "Carmen", "text": "Carmen is an opera by Georges Bizet."}), "{broken"
UPLOAD = "\n".join([json.dumps({"id": "x", "title": "<b>Aida</b>", "text": "Aida is an opera."}), BAD, GOOD]).encode()


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path_factory):
    """Local mode unless a test turns public mode on; a small corpus slice, a fresh cache, no model hub."""
    for name in (PUBLIC_ENV, UPLOAD_LIMIT_ENV, ALLOWLIST_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DPR_LENS_CORPUS_LIMIT", str(LIMIT))
    monkeypatch.setenv("DPR_LENS_CACHE", str(tmp_path_factory.getbasetemp() / "public-cache"))
    monkeypatch.setattr("core.pair.hub_reachable", lambda timeout=3.0: False)


@pytest.fixture
def public(monkeypatch, tiny_bert_dir):
    monkeypatch.setenv(PUBLIC_ENV, "1")
    monkeypatch.setenv(ALLOWLIST_ENV, f"{tiny_bert_dir}, some-org/some-model")


@pytest.fixture
def corpus_reads(monkeypatch) -> list:
    """Every corpus path the app is asked to read."""
    paths = []

    def refuse(path):
        paths.append(path)
        raise AssertionError(f"read {path}")

    monkeypatch.setattr("core.corpus.load_jsonl", refuse)
    return paths


def open_page(script: str, tiny_bert_dir, **state) -> AppTest:
    at = AppTest.from_file(script, default_timeout=TIMEOUT)
    for key, value in {
        "pair_key": "custom",
        "custom_a": str(tiny_bert_dir),
        "custom_b": str(tiny_bert_dir),
        **state,
    }.items():
        at.session_state[key] = value
    return at.run()


def corpus_caption(at: AppTest) -> str:
    return next(c.value for c in at.caption if " · corpus: " in c.value)


def texts(elements) -> str:
    return "\n".join(element.value for element in elements)


def test_settings_come_from_the_environment(monkeypatch):
    assert not public_mode() and upload_limit_bytes() == DEFAULT_UPLOAD_LIMIT_MB * MEGABYTE
    assert model_allowlist() == () and check_custom_model("/any/local/dir") == "/any/local/dir"
    monkeypatch.setenv(PUBLIC_ENV, "1")
    monkeypatch.setenv(UPLOAD_LIMIT_ENV, "2")
    monkeypatch.setenv(ALLOWLIST_ENV, " models/twin , ,org/model,models/twin")
    assert public_mode() and upload_limit_bytes() == 2 * MEGABYTE
    assert model_allowlist() == ("models/twin", "org/model")
    check_upload_size(2 * MEGABYTE)
    with pytest.raises(
        AccessError,
        match=r"^The uploaded corpus is larger than this server's limit of 2 MB "
        r"\(DPR_LENS_UPLOAD_LIMIT_MB\)\.$",
    ):
        check_upload_size(2 * MEGABYTE + 1)
    for malformed in ("0", "-3", "lots"):
        monkeypatch.setenv(UPLOAD_LIMIT_ENV, malformed)
        assert upload_limit_bytes() == DEFAULT_UPLOAD_LIMIT_MB * MEGABYTE
    monkeypatch.setenv(PUBLIC_ENV, "0")
    assert not public_mode()


def test_public_mode_loads_the_operators_entry_never_the_typed_text(monkeypatch):
    monkeypatch.setenv(PUBLIC_ENV, "1")
    with pytest.raises(AccessError, match="custom pairs are off"):
        check_custom_model("org/model")
    monkeypatch.setenv(ALLOWLIST_ENV, "models/twin,org/model")
    assert check_custom_model("org/model") == "org/model"
    for spelling in ("models/twin", " ./models/twin/ ", os.path.join(os.getcwd(), "models", "twin")):
        assert check_custom_model(spelling) == "models/twin"
    for outside in ("/etc/passwd", "models/twin/../other", "org/model2", "bert-base-uncased"):
        with pytest.raises(AccessError) as refused:
            check_custom_model(outside)
        assert str(refused.value) == (
            f"This server is in public mode: model {outside!r} is not on the operator's "
            f"allowlist (DPR_LENS_MODEL_ALLOWLIST)."
        )


def test_public_sidebar_has_no_path_box_and_no_typed_path_is_read(public, tiny_bert_dir, tmp_path, corpus_reads):
    path = tmp_path / "secret.jsonl"
    path.write_text(GOOD + "\n")
    # Even a path kept from earlier state is not used in public mode.
    at = open_page(RETRIEVAL, tiny_bert_dir, corpus_path=str(path), kept_corpus_path=str(path))
    assert not at.exception
    assert {box.key for box in at.text_input} == {"custom_a", "custom_b", "custom_b_context", "query_input"}
    assert at.file_uploader(key="corpus_file")
    assert f"corpus: wikipedia-leads[:{LIMIT}] ({LIMIT} passages)" in corpus_caption(at)
    for box in at.text_input:
        box.set_value(str(path))
    at.run()
    assert not at.exception and not corpus_reads
    assert escape(f"model {str(path)!r} is not on the operator's allowlist") in texts(at.error)
    at.text_input(key="custom_a").set_value(str(tiny_bert_dir))
    at.text_input(key="custom_b").set_value(str(tiny_bert_dir))
    at.text_input(key="custom_b_context").set_value("").run()  # the query is still the path: it is only searched for
    assert not at.exception and not at.error and not corpus_reads
    assert texts(at.markdown).count('class="lens-hit"') == 2 * LIMIT and f"({LIMIT} passages)" in corpus_caption(at)


def test_upload_shows_its_passages_and_bad_lines_and_survives_page_switches(public, tiny_bert_dir, corpus_reads):
    at = open_page(APP, tiny_bert_dir)
    at.file_uploader(key="corpus_file").set_value(("<i>operas</i>.jsonl", UPLOAD, "application/jsonl")).run()
    assert not at.exception and not corpus_reads
    caption = corpus_caption(at)
    assert f"corpus: &lt;i&gt;operas&lt;/i&gt;.jsonl[:{LIMIT}] (2 passages)" in caption and "<i>" not in caption
    assert "line 2: not valid JSON" in texts(at.text)
    at.switch_page("pages/probing_evaluation.py").run()
    assert not at.exception and "(2 passages)" in corpus_caption(at)
    assert "Using your uploaded corpus &lt;i&gt;operas&lt;/i&gt;.jsonl." in texts(at.sidebar.caption)
    at.switch_page("pages/retrieval.py").run()
    assert "(2 passages)" in corpus_caption(at)
    at.button(key="forget_corpus_file").click().run()
    assert f"({LIMIT} passages)" in corpus_caption(at)
    at.file_uploader(key="corpus_file").set_value(("operas.jsonl", UPLOAD, "application/jsonl")).run()
    assert "(2 passages)" in corpus_caption(at)
    at.file_uploader(key="corpus_file").set_value(None).run()
    assert not at.exception and f"({LIMIT} passages)" in corpus_caption(at)


def test_oversize_or_unusable_upload_gets_one_clear_error(public, tiny_bert_dir, monkeypatch):
    monkeypatch.setenv(UPLOAD_LIMIT_ENV, "1")
    at = open_page(RETRIEVAL, tiny_bert_dir)
    at.file_uploader(key="corpus_file").set_value(("big.jsonl", b" " * (MEGABYTE + 1), "text/plain")).run()
    assert not at.exception
    assert [error.value for error in at.error] == [
        escape("The uploaded corpus is larger than this server's limit of 1 MB (DPR_LENS_UPLOAD_LIMIT_MB).")
    ]
    at.file_uploader(key="corpus_file").set_value(("bad.jsonl", f"{BAD}\n[1]\n".encode(), "text/plain")).run()
    assert [error.value for error in at.error] == [
        (
            "Corpus file bad.jsonl has no usable passage (line 1: not valid JSON (Expecting property name enclosed in "
            "double quotes); skipped)."
        )
    ]


def test_custom_models_follow_the_allowlist(public, tiny_bert_dir, monkeypatch):
    _load_pair.clear()  # so that the pair is built here, not served from an earlier test
    loaded = []
    monkeypatch.setattr("ui.state.custom_pair", lambda *sources: loaded.append(sources) or custom_pair(*sources))
    at = open_page(RETRIEVAL, tiny_bert_dir, custom_a="bert-base-uncased")
    assert [error.value for error in at.error] == [
        escape(
            "This server is in public mode: model 'bert-base-uncased' is not on the operator's allowlist "
            "(DPR_LENS_MODEL_ALLOWLIST)."
        )
    ]
    assert not loaded
    at.text_input(key="custom_a").set_value(f"{tiny_bert_dir}/./").run()
    assert not at.exception and not at.error and "Custom: " in corpus_caption(at)
    assert loaded == [(str(tiny_bert_dir), str(tiny_bert_dir), None)]
    assert str(tiny_bert_dir) in texts(at.sidebar.caption)


def test_without_an_allowlist_custom_pairs_are_off_and_presets_work(public, tiny_bert_dir, monkeypatch):
    monkeypatch.setenv(ALLOWLIST_ENV, "")
    at = open_page(RETRIEVAL, tiny_bert_dir)
    assert not at.exception and "custom_a" not in {box.key for box in at.text_input}
    assert [error.value for error in at.error] == [
        (
            "This server is in public mode and custom pairs are off because the operator allowed no model "
            "(DPR_LENS_MODEL_ALLOWLIST); choose a preset pair."
        )
    ]
    at.selectbox(key="pair_key").set_value("mini-paper").run()
    assert not at.exception and not at.error and "Mini paper" in corpus_caption(at)


def test_outside_public_mode_the_typed_path_is_read(tiny_bert_dir, tmp_path):
    path = tmp_path / "operas.jsonl"
    path.write_bytes(UPLOAD)
    at = open_page(RETRIEVAL, tiny_bert_dir, corpus_path=str(path))
    assert not at.exception and not at.file_uploader
    assert f"corpus: operas[:{LIMIT}] (2 passages)" in corpus_caption(at)
    assert "line 2: not valid JSON" in texts(at.text)
