"""The benchmark harness on hand-made rows: ratios, number formatting, the Markdown table, results files."""

from __future__ import annotations

import pytest

from bench import harness
from bench.harness import Row, format_number, format_ratio, format_table, merge_sections


def test_ratio_is_baseline_over_value():
    assert Row("search", 0.5, "s", baseline=2.0).ratio == pytest.approx(4.0)
    assert Row("flops", 2000.0, "GFLOP", baseline=3000.0).ratio == pytest.approx(1.5)


@pytest.mark.parametrize("value, baseline", [(1.0, None), (None, 1.0), (None, None), (0.0, 1.0)])
def test_no_ratio_without_both_numbers(value, baseline):
    assert Row("x", value, baseline=baseline).ratio is None


def test_number_formatting():
    assert [format_number(v) for v in (None, 2038.841, 48.275, 1.412, 0.252)] == ["-", "2039", "48.3", "1.41", "0.252"]
    assert format_ratio(None) == "-"
    assert format_ratio(1.6604) == "1.66x"


def test_table():
    rows = [
        Row("top-25 analysis", 48.275, "s", 80.182, "goal <= 60 s"),
        Row("peak RSS", 1536.0, "MiB", note="fresh process"),
        Row("a | b", 0.82, "s", 1.39, columns={"same scores (1e-4)": "yes"}),
    ]
    assert format_table(rows).splitlines() == [
        "| benchmark | ours | baseline | unit | ratio | same scores (1e-4) | note |",
        "|---|---|---|---|---|---|---|",
        "| top-25 analysis | 48.3 | 80.2 | s | 1.66x |  | goal <= 60 s |",
        "| peak RSS | 1536 | - | MiB | - |  | fresh process |",
        "| a \\| b | 0.820 | 1.39 | s | 1.70x | yes |  |",
    ]


def test_merge_replaces_a_section_and_keeps_the_others():
    previous = "# Old title\n\nold preamble\n\n## FLOPs\n\nflops table\n\n## Speed\n\nold speed\n"
    merged = merge_sections(previous, "Token IG", {"Speed": "new speed", "Sweep": "sweep table"})
    assert merged == "# Token IG\n\n## FLOPs\n\nflops table\n\n## Speed\n\nnew speed\n\n## Sweep\n\nsweep table\n"


def test_quick_mode_never_writes_to_bench(monkeypatch):
    monkeypatch.delenv(harness.QUICK_ENV, raising=False)
    assert harness.results_path(None) == harness.BENCH_DIR / "results.md"
    assert harness.results_path("neurons") == harness.BENCH_DIR / "results_neurons.md"
    assert harness.sized(25, 3) == 25
    monkeypatch.setenv(harness.QUICK_ENV, "1")
    assert harness.results_path(None).parent == harness.QUICK_DIR != harness.BENCH_DIR
    assert harness.sized(25, 3) == 3


def test_measure_and_side_by_side():
    calls = []
    timing = harness.measure(lambda: calls.append(1) or len(calls), repeats=3)
    assert len(timing.wall) == len(timing.cpu) == 3 and timing.value == 3
    assert timing.min <= timing.median and timing.cpu_min <= timing.cpu_median
    order = []
    both = harness.side_by_side({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=2)
    assert order == ["a", "b", "a", "b"] and len(both["a"].wall) == len(both["b"].wall) == 2
