import io
import json
import xml.etree.ElementTree as ElementTree
import zipfile

import altair as alt
import pandas as pd
from PIL import Image

from core.report import Bundle, build_zip, package_versions, safe_name


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
