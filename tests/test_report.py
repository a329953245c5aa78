import io
import json
import xml.etree.ElementTree as ElementTree
import zipfile
from pathlib import Path

import altair as alt
import pandas as pd
import pytest
from PIL import Image
from streamlit.runtime.media_file_manager import MediaFileManager
from streamlit.testing.v1 import AppTest

from core.cli import main
from core.report import Bundle, build_zip, package_versions, safe_name
from tests.conftest import make_tiny_bert, quick_cloud, tiny_pair_state


def test_the_zip_holds_figures_data_settings_and_summary():
    table = pd.DataFrame({"model": ["A", "B"], "aopc": [0.25, float("nan")]})
    chart = alt.Chart(table).mark_bar().encode(x="model:N", y="aopc:Q")
    bundle = Bundle(
        "Methods: opera",
        "# Opera\n\nB is more comprehensive than A.\n",
        {"query": "opera", "k_max": 3},
        {"model A": "aa", "corpus": "cc"},
        {"AOPC / query side": chart.to_dict()},
        {"faithfulness": table},
    )
    archive = zipfile.ZipFile(io.BytesIO(build_zip(bundle)))
    names = sorted(archive.namelist())
    assert names == [
        "README.md",
        "data/faithfulness.csv",
        "data/faithfulness.json",
        "figures/AOPC-query-side.png",
        "figures/AOPC-query-side.svg",
        "figures/AOPC-query-side.vl.json",
        "manifest.json",
    ]
    assert archive.read("README.md").decode().startswith("# Opera")
    manifest = json.loads(archive.read("manifest.json"))
    assert manifest["settings"] == {"query": "opera", "k_max": 3} and manifest["fingerprints"]["corpus"] == "cc"
    assert manifest["packages"]["torch"] and manifest["files"] == [
        n for n in names if n not in ("README.md", "manifest.json")
    ]
    csv = pd.read_csv(archive.open("data/faithfulness.csv"))
    assert list(csv["model"]) == ["A", "B"] and csv["aopc"].isna().tolist() == [False, True]
    assert json.loads(archive.read("data/faithfulness.json"))[1] == {"model": "B", "aopc": None}
    assert Image.open(archive.open("figures/AOPC-query-side.png")).size[0] > 50
    svg = ElementTree.fromstring(archive.read("figures/AOPC-query-side.svg"))
    assert svg.tag.endswith("svg")
    assert json.loads(archive.read("figures/AOPC-query-side.vl.json"))["mark"]["type"] == "bar"


def test_names_and_versions():
    assert safe_name("../../etc/passwd") == "etc-passwd" and safe_name("§§") == "item"
    assert package_versions(("no-such-package-xyz",)) == {"no-such-package-xyz": None}


# ------------------------------------------------------------------------------------------------ the pages' bundles

APP = Path(__file__).resolve().parent.parent / "app.py"
TIMEOUT = 240
LIMIT = 60  # passages; 6 of them held out, with descriptions
QUERY = "city on the river Seine"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def offered(monkeypatch) -> dict:
    """The files the app's deferred download buttons offer, by file name: each a callable, as a click runs it."""
    files = {}
    add = MediaFileManager.add_deferred

    def record(manager, data_callable, mimetype, coordinates, file_name=None, **keywords):
        files[file_name] = data_callable
        return add(manager, data_callable, mimetype, coordinates, file_name, **keywords)

    monkeypatch.setattr(MediaFileManager, "add_deferred", record)
    return files


@pytest.fixture
def tiny_app(monkeypatch, tmp_path, offered):
    """Pages on tiny random models over a small slice of the bundled corpus, without a model hub."""
    monkeypatch.setenv("DPR_LENS_CORPUS_LIMIT", str(LIMIT))
    monkeypatch.setenv("DPR_LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("core.pair.hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr("ui.token_views.cloud_png", quick_cloud)
    return offered


@pytest.fixture(scope="module")
def twin_dir(tmp_path_factory, wiki_slice) -> Path:
    """A second tiny BERT of the same shape as tiny_bert_dir: a twin."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-twin"), wiki_slice, seed=1)


def open_page(page: str, state: dict) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    for key, value in state.items():
        at.session_state[key] = value
    at.switch_page(f"pages/{page}.py").run()
    assert not at.exception
    return at


def report(at: AppTest, offered: dict, key: str) -> bytes:
    """The zip behind the page's report button, as a click downloads it."""
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.download_button(key=key).label == "Report bundle of this view (zip)"
    return offered[f"dpr-lens-{key}.zip"]()


def check_zip(
    data: bytes,
    labels: tuple[str, str],
    figures: set[str],
    tables: dict[str, tuple[set[str], int | None]],
    settings: dict,
    named: tuple[str, ...] = (),
) -> zipfile.ZipFile:
    """The files listed, every one parsed: manifest, CSV and JSON tables (columns, rows), PNG, SVG, summary."""
    archive = zipfile.ZipFile(io.BytesIO(data))
    expected = {f"figures/{name}.{kind}" for name in figures for kind in ("png", "svg", "vl.json")}
    expected |= {f"data/{name}.{kind}" for name in tables for kind in ("csv", "json")}
    assert sorted(archive.namelist()) == sorted(expected | {"README.md", "manifest.json"})
    manifest = json.loads(archive.read("manifest.json"))
    assert set(manifest["fingerprints"]) == {"model A", "model B", "corpus"}
    assert all(len(value) == 64 for value in manifest["fingerprints"].values())
    assert manifest["settings"].items() >= settings.items()
    assert manifest["packages"]["torch"] and manifest["packages"]["streamlit"] and manifest["packages"]["altair"]
    assert manifest["files"] == sorted(expected)
    for name, (columns, rows) in tables.items():
        frame = pd.read_csv(archive.open(f"data/{name}.csv"))
        assert columns <= set(frame.columns), (name, list(frame.columns))
        assert rows is None or len(frame) == rows, (name, len(frame))
        assert len(json.loads(archive.read(f"data/{name}.json"))) == len(frame)
    for name in figures:
        assert archive.read(f"figures/{name}.png").startswith(PNG)
        assert ElementTree.fromstring(archive.read(f"figures/{name}.svg")).tag.endswith("svg")
        assert json.loads(archive.read(f"figures/{name}.vl.json"))["$schema"].startswith("https://vega.github.io")
    summary = archive.read("README.md").decode()
    assert summary.startswith("# ") and "## Result" in summary
    for text in (f"Model A: {labels[0]}", f"Model B: {labels[1]}", *named):
        assert text in summary, text
    return archive


def test_retrieval_page_reports_both_rankings_and_their_overlap(tiny_app, tiny_bert_dir, tiny_dpr_dirs):
    at = open_page("retrieval", tiny_pair_state(tiny_bert_dir, tiny_dpr_dirs) | {"query": QUERY})
    at.number_input(key="top_k").set_value(LIMIT).run()  # every passage: both lists share all of them
    archive = check_zip(
        report(at, tiny_app, "retrieval_report"),
        (str(tiny_bert_dir), str(tiny_dpr_dirs[0])),
        {"rank-shift"},
        {
            "ranking-A": ({"rank", "id", "title", "score", "rank in B"}, LIMIT),
            "ranking-B": ({"rank", "id", "title", "score", "rank in A"}, LIMIT),
            "agreement": ({"k", "shared", "jaccard", "rank-biased overlap (p=0.9)"}, 1),
            "shared-ranks": ({"passage", "model", "rank"}, 2 * LIMIT),
        },
        {"query": QUERY, "k": LIMIT, "corpus": f"wikipedia-leads[:{LIMIT}]"},
        (f'Query: "{QUERY}"', f"A and B share {LIMIT} of their top-{LIMIT}"),
    )
    agreement = pd.read_csv(archive.open("data/agreement.csv"))
    assert agreement.loc[0, "jaccard"] == 1.0
    assert [m.value for m in at.metric][:2] == [str(LIMIT), "1.00"]


def test_the_summary_escapes_query_html_and_table_pipes(tiny_app, tiny_bert_dir, tiny_dpr_dirs):
    hostile = "<img src=x onerror=alert(1)> river | city"
    at = open_page("retrieval", tiny_pair_state(tiny_bert_dir, tiny_dpr_dirs) | {"query": hostile})
    summary = zipfile.ZipFile(io.BytesIO(report(at, tiny_app, "retrieval_report"))).read("README.md").decode()
    assert "&lt;img src=x onerror=alert(1)&gt; river \\| city" in summary
    assert "<img" not in summary


def test_token_page_reports_its_main_view(tiny_app, tiny_bert_dir, tiny_dpr_dirs):
    at = open_page("token_attributions", tiny_pair_state(tiny_bert_dir, tiny_dpr_dirs))
    assert not at.get("download_button")
    at.number_input(key="token_ig_steps").set_value(2)
    at.slider(key="token_ig_k").set_value(3)
    at.text_input(key="query_input").set_value(QUERY).run()
    archive = check_zip(
        report(at, tiny_app, "token_ig_report"),
        (str(tiny_bert_dir), str(tiny_dpr_dirs[0])),
        {"deletion-curves"},
        {
            "tokens-A": ({"input", "rank", "passage_id", "token", "surface", "attribution", "n_steps"}, None),
            "tokens-B": ({"input", "rank", "passage_id", "token", "surface", "attribution", "n_steps"}, None),
            "words-A": ({"word", "total", "positive", "negative", "occurrences", "inputs"}, None),
            "words-B": ({"word", "total", "positive", "negative", "occurrences", "inputs"}, None),
            "completeness": ({"model", "input", "s(x)", "s(baseline)", "delta", "relative delta"}, 2 * (1 + 2 * 25)),
            "deletion": ({"model", "tokens removed", "score", "order"}, 2 * 2 * 4),
        },
        {"query": QUERY, "top_k": 25, "deletion_k": 3, "deletion_side": "query", "drop_stopwords": True},
        (f'Query: "{QUERY}"', "Chosen passage:", "Deletion (query tokens)"),
    )
    manifest = json.loads(archive.read("manifest.json"))
    assert manifest["settings"]["ig"]["n_steps"] == 2
    tokens = pd.read_csv(archive.open("data/tokens-A.csv"))
    assert set(tokens["input"]) == {"query (sum over passages)", "query", "passage"} and tokens["rank"].max() == 25
    assert "token_ig_methods_report" not in [button.key for button in at.get("download_button")]


def test_neuron_page_reports_heatmaps_counts_suppression_and_figure_1(tiny_app, tiny_bert_dir, tiny_dpr_dirs):
    at = open_page("knowledge_neurons", tiny_pair_state(tiny_bert_dir, tiny_dpr_dirs) | {"query": QUERY})
    at.select_slider(key="kn_steps").set_value(5)
    at.slider(key="kn_max_k").set_value(5)
    at.number_input(key="kn_n").set_value(2).run()
    labels = (str(tiny_bert_dir), str(tiny_dpr_dirs[0]))
    figures = {"neurons-A", "neurons-B", "layer-counts", "suppression"}
    neurons = 2 * 2 * (64 + 32)  # models x layers x (intermediate + output) neurons
    tables = {
        "neurons": ({"model", "site", "layer", "neuron", "attribution", "relative", "above_threshold"}, neurons),
        "layer-counts": ({"model", "site", "layer", "neurons"}, 2 * 2 * 2),
        "completeness": ({"model", "site", "layer", "|delta|"}, 2 * 2 * 2),
        "suppression": ({"model", "k", "rank", "score"}, None),
    }
    settings = {"query": QUERY, "tower": "query", "steps": 5, "max_k": 5, "figure1_queries": None}
    check_zip(
        report(at, tiny_app, "kn_report"), labels, figures, tables, settings, ("Strongly activated", "Suppression")
    )

    at.button(key="kn_compute").click().run()
    figures |= {"figure1-A", "figure1-B", "figure1-layer-counts"}
    tables["figure1-layer-counts"] = ({"model", "site", "layer", "neurons"}, 2 * 2 * 2)
    settings["figure1_queries"] = 2
    check_zip(report(at, tiny_app, "kn_report"), labels, figures, tables, settings, ("## Figure 1: 2 held-out",))


def test_probing_page_reports_the_section_shown(tiny_app, tiny_bert_dir, tiny_dpr_dirs, wiki_slice):
    labels = (str(tiny_bert_dir), str(tiny_dpr_dirs[0]))
    at = open_page("probing_evaluation", tiny_pair_state(tiny_bert_dir, tiny_dpr_dirs))
    at.radio(key="eval_queries").set_value("My labelled queries (JSONL)").run()
    rows = [{"query": wiki_slice.descriptions[i], "gold_ids": [wiki_slice.ids[i]]} for i in range(4)]
    at.text_area(key="eval_pasted").set_value("\n".join(json.dumps(row) for row in rows)).run()
    check_zip(
        report(at, tiny_app, "eval_report"),
        labels,
        {"metrics"},
        {
            "metrics": ({"metric", "A", "B", "B - A", "B - A 95% CI"}, None),
            "outcomes": ({"query", "gold", "rank A", "rank B", "outcome"}, 4),
        },
        {"queries": 4, "source": "pasted queries", "win_at": 1},
        ("4 labelled queries: pasted queries", "| metric | A | B | B − A |"),
    )

    at.radio(key="pe_section").set_value("Layer-wise probing").run()
    at.multiselect(key="probe_ns").set_value([2])
    at.number_input(key="probe_train").set_value(5)
    at.number_input(key="probe_test").set_value(2).run()
    at.button(key="probe_run").click().run()
    assert "eval_report" not in [button.key for button in at.get("download_button")]
    check_zip(
        report(at, tiny_app, "probe_report"),
        labels,
        {"probing-N2"},
        {
            "table-1": ({"model", "N", "kind", "L0", "L1", "L2"}, 2 * 2),
            "probing": ({"model", "n", "layer", "kind", "accuracy", "low", "high"}, None),
        },
        {"rows": ["probe", "untrained"], "chart_n": 2},
        ("N = 2 (chance 0.50)", "best layer"),
    )


def test_twin_page_reports_the_sections_it_computed(tiny_app, tiny_bert_dir, twin_dir):
    state = {"pair_key": "custom", "custom_a": str(tiny_bert_dir), "custom_b": str(twin_dir), "query": QUERY}
    at = open_page("twins", state)
    at.select_slider(key="tw_steps").set_value(5)
    for key, size in (("tw_patch_n", 3), ("tw_overlap_n", 2), ("tw_para_n", 1), ("tw_cka_n", 5)):
        at.number_input(key=key).set_value(size)
    at.text_area(key="tw_phrasings").set_value("river through Paris\nthe Seine river").run()
    labels = (str(tiny_bert_dir), str(twin_dir))
    figures = {"patching", "overlap", "paraphrases", "cka", "pca-A", "pca-B"}
    tables = {
        "patching": ({"direction", "layer", "site", "recovered", "rank of target"}, 2 * 2 * 3),
        "overlap": ({"site", "layer", "kept", "dropped", "recruited", "jaccard"}, 2 * 2),
        "paraphrases": ({"model", "site", "layer", "jaccard"}, 2 * 2 * 2),
        "cka": ({"layer", "inputs", "CKA"}, 2 * 3),
        "pca": ({"model", "kind", "x", "y", "text"}, 2 * 2 * 5),
    }
    settings = {"query": QUERY, "steps": 5, "phrasings": ["river through Paris", "the Seine river"], "cka_queries": 5}
    named = ("Activation patching of this query", "this query (1 query)", "your phrasings (1 need", "Linear CKA")
    check_zip(report(at, tiny_app, "tw_report"), labels, figures, tables, settings, named)

    for button in ("tw_patch_compute", "tw_overlap_compute", "tw_para_compute"):
        at.button(key=button).click().run()
    figures |= {"patching-aggregate", "overlap-aggregate", "paraphrases-needs"}
    tables |= {
        "patching-aggregate": ({"direction", "layer", "site", "recovered", "low", "high", "queries"}, 2 * 2 * 3),
        "overlap-aggregate": ({"site", "layer", "kept", "dropped", "recruited", "jaccard"}, 2 * 2),
        "paraphrases-needs": ({"model", "site", "layer", "jaccard"}, 2 * 2 * 2),
        "paraphrases-per-need": ({"need", "gold", "top-10 Jaccard A", "top-10 Jaccard B"}, 1),
    }
    settings |= {"patching_queries": 3, "overlap_queries": 2, "needs": 1}
    named = ("pooled over 3 queries", "held-out queries (2 queries)", "built-in needs (1 need")
    check_zip(report(at, tiny_app, "tw_report"), labels, figures, tables, settings, named)


# ------------------------------------------------------------------------------------------------ the report command


@pytest.mark.parametrize(
    "page, key, widgets, argv",
    [
        ("retrieval", "retrieval_report", {"top_k": 5}, ["--view", "retrieval", "--k", "5"]),
        (
            "token_attributions",
            "token_ig_report",
            {"token_ig_steps": 2, "token_ig_adaptive": False, "token_ig_k": 3},
            ["--view", "token", "--steps", "2", "--start-steps", "0", "--k-max", "3"],
        ),
    ],
    ids=["retrieval", "token"],
)
def test_the_report_command_writes_the_pages_zip(page, key, widgets, argv, offered, monkeypatch, tmp_path):
    """The real offline pair over the first 30 passages: the page's button and the command, same inputs."""
    limit, query = 30, "ancient city in Greece"
    monkeypatch.setenv("DPR_LENS_CORPUS_LIMIT", str(limit))
    monkeypatch.setenv("DPR_LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("ui.token_views.cloud_png", quick_cloud)
    shown = report(open_page(page, {"query": query} | widgets), offered, key)

    output = tmp_path / "report.zip"
    main(["report", "--query", query, "--limit", str(limit), "--output", str(output), *argv])
    written = zipfile.ZipFile(output)
    assert sorted(written.namelist()) == sorted(zipfile.ZipFile(io.BytesIO(shown)).namelist())
    for name in written.namelist():
        if name != "manifest.json":
            assert written.read(name) == zipfile.ZipFile(io.BytesIO(shown)).read(name), name
    manifests = [json.loads(archive.read("manifest.json")) for archive in (written, zipfile.ZipFile(io.BytesIO(shown)))]
    for manifest in manifests:
        del manifest["created"]
    assert manifests[0] == manifests[1]

    labels = ("all-MiniLM-L6-v2 (general retriever)", "MiniLM-Wiki-DPR (A after DPR training)")
    if page == "retrieval":
        shared = int(pd.read_csv(written.open("data/agreement.csv")).loc[0, "shared"])
        tables = {
            "ranking-A": ({"rank", "id", "title", "score", "rank in B"}, 5),
            "ranking-B": ({"rank", "id", "title", "score", "rank in A"}, 5),
            "agreement": ({"k", "shared", "jaccard"}, 1),
        } | ({"shared-ranks": ({"passage", "model", "rank"}, 2 * shared)} if shared else {})
        check_zip(
            output.read_bytes(),
            labels,
            {"rank-shift"} if shared else set(),
            tables,
            {"query": query, "k": 5},
            (f"A and B share {shared} of their top-5", " first"),
        )
    else:
        tables = {f"{kind}-{name}": (set(), None) for kind in ("tokens", "words") for name in ("A", "B")}
        tables |= {"completeness": ({"relative delta"}, 2 * (1 + 2 * 25)), "deletion": ({"score"}, 2 * 2 * 4)}
        check_zip(
            output.read_bytes(),
            labels,
            {"deletion-curves"},
            tables,
            {"query": query, "deletion_k": 3, "passages": manifests[0]["settings"]["passages"]},
            ("Query words", "Chosen passage:"),
        )
