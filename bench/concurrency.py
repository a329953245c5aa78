"""Concurrency: 4 browser sessions asking at once vs the same 4 queries one after another, on the real app.

Each mode gets its own streamlit server with a fresh cache (so both compute everything) on the offline pair and
the full bundled corpus (its embeddings ship prebuilt, so what is timed is the pages' own model work). Before the
clock starts, the home page retrieves a warm-up query (pair and index loaded) and 4 tabs (4 sessions) are opened
on the page. Then, on the Token attributions page (and, unless --token-only, on the Knowledge neurons page),
either every tab submits its query at once, or each submits only after the previous one has finished. Wall time
runs from the first Enter to the last finished page; the CPU seconds of the server and of the browser over that
time are reported too (on a shared machine wall time also measures other people's load), and the server's peak
RSS is VmHWM of the streamlit process at the end of the mode. The pages' numbers are read back and must be the
same in both modes.

    python -m bench.concurrency               # writes bench/results_concurrency.md
    python -m bench.concurrency --repeats 2   # both modes twice, alternating which goes first; the fastest counts
    python -m bench.concurrency --quick       # 2 queries, token page only: checks that it runs
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.browser import (
    AppServer,
    browser_cpu_seconds,
    captions,
    enter_through_home,
    launch_chromium,
    metrics,
    open_sessions,
    problems,
    submit_queries,
    token_blocks,
    wait_all,
    wait_for_widget,
)
from bench.harness import Results, Row, is_quick, parse_args, sized

NAME, TITLE = "concurrency", "Concurrency benchmark (last results)"
QUERIES = ("country in Western Europe", "1968 film by Stanley Kubrick", "Japanese poetry form", "tower in Paris")
WARM_UP = "capital of Italy"  # retrieved on the home page before the clock starts (loads the pair and index)
RSS_GOAL_MIB = 3 * 1024
POLL = 0.5  # seconds between looks at the tabs (the browser shares the 2 cores; one after another pays ~POLL/2 a query)
DESCRIPTION = (
    __doc__.split("\n\n")[1].replace("\n", " ") + " Ratio = sequential / concurrent wall time: "
    "at least 1 means 4 sessions at once are not slower than one after another."
)


@dataclass(frozen=True)
class Page:
    title: str
    path: str
    ready: str  # JS: the page's results are drawn

    def numbers(self, tab) -> object:
        if self.path == "token_attributions":
            return token_blocks(tab), captions(tab, "s(x) = ", warnings=True)
        return captions(tab, "s(q, p) = "), [m for m in metrics(tab) if m[0].startswith("Strongly activated")]


TOKENS = Page("Token attributions", "token_attributions", "document.querySelectorAll('.lens-tokens').length >= 6")
NEURONS = Page(
    "Knowledge neurons", "knowledge_neurons", "document.querySelectorAll('[data-testid=\"stMetric\"]').length >= 4"
)


@dataclass
class Mode:
    concurrent: bool
    walls: dict[str, float] = field(default_factory=dict)  # page title -> first Enter to last page done
    latencies: dict[str, list[float]] = field(default_factory=dict)  # per query: first Enter to its page done
    server_cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds of the server over the timed part
    browser_cpu: dict[str, float] = field(default_factory=dict)  # of chromium and Playwright's driver
    numbers: dict[str, list] = field(default_factory=dict)
    peak_rss_mib: float = 0.0

    @property
    def name(self) -> str:
        return "at once" if self.concurrent else "one after another"


def run_mode(pages: list[Page], queries: tuple[str, ...], concurrent: bool, workdir: Path) -> Mode:
    """A fresh server and cache; the home page retrieves a warm-up query (pair and index loaded), then per page
    len(queries) sessions are opened and timed."""
    from playwright.sync_api import sync_playwright

    mode = Mode(concurrent)
    label = f"{'concurrent' if concurrent else 'sequential'}-{len(list(workdir.glob('*.log')))}"
    server = AppServer(workdir / f"{label}.log", cache_dir=workdir / f"{label}-cache")
    with server, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            enter_through_home(browser, server.url, query=WARM_UP, timeout=15 * 60_000)
            for page in pages:
                tabs = open_sessions(browser, server.url, len(queries), page=page.path)
                for tab in tabs:
                    wait_for_widget(tab, "Query", timeout=15 * 60_000)
                server_cpu, browser_cpu = server.cpu_seconds(), browser_cpu_seconds([server.pid])
                started = time.time()
                if concurrent:
                    submit_queries(tabs, queries)
                    finished = wait_all(tabs, ready=page.ready, timeout=3600, poll=POLL).finished
                else:
                    finished = []
                    for tab, query in zip(tabs, queries):
                        submit_queries([tab], [query])
                        finished += wait_all([tab], ready=page.ready, timeout=3600, poll=POLL).finished
                mode.walls[page.title] = max(finished) - started
                mode.server_cpu[page.title] = server.cpu_seconds() - server_cpu
                mode.browser_cpu[page.title] = browser_cpu_seconds([server.pid]) - browser_cpu
                mode.latencies[page.title] = [end - started for end in finished]
                for number, tab in enumerate(tabs):
                    found = problems(tab)
                    if found:
                        raise RuntimeError(
                            f"{label}, {page.title}, session {number + 1}: {found}\n{server.log()[-4000:]}"
                        )
                mode.numbers[page.title] = [page.numbers(tab) for tab in tabs]
                for tab in tabs:
                    tab.close()
            mode.peak_rss_mib = server.peak_rss_mib()
        finally:
            browser.close()
    return mode


def best(modes: list[Mode]) -> Mode:
    """The repeat with the smallest total wall time (the least disturbed by other load on the machine)."""
    return min(modes, key=lambda mode: sum(mode.walls.values()))


def run(token_only: bool = False, logs: Path | None = None, repeats: int = 1) -> list[Row]:
    """Both modes `repeats` times, alternating which goes first; logs: keep every server's log there."""
    queries = QUERIES[: sized(4, 2)]
    pages = [TOKENS] if is_quick() or token_only else [TOKENS, NEURONS]
    runs: dict[bool, list[Mode]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="dpr-lens-concurrency-") as directory:
        workdir = Path(directory)
        for repeat in range(max(1, repeats)):
            for concurrent in (True, False) if repeat % 2 == 0 else (False, True):
                runs[concurrent].append(run_mode(pages, queries, concurrent, workdir))
        if logs is not None:
            logs.mkdir(parents=True, exist_ok=True)
            for log in workdir.glob("*.log"):
                shutil.copy(log, logs / log.name)
    together, alone = best(runs[True]), best(runs[False])
    all_numbers = [mode.numbers for modes in runs.values() for mode in modes]
    rows = []
    for page in pages:
        same = all(numbers[page.title] == all_numbers[0][page.title] for numbers in all_numbers)
        rows.append(
            Row(
                f"{page.title}: {len(queries)} queries, all sessions at once (baseline: one after another)",
                together.walls[page.title],
                "s",
                baseline=alone.walls[page.title],
                columns={
                    "same numbers": "yes" if same else "NO",
                    "server CPU s": f"{together.server_cpu[page.title]:.0f} vs {alone.server_cpu[page.title]:.0f}",
                    "browser CPU s": f"{together.browser_cpu[page.title]:.0f} vs {alone.browser_cpu[page.title]:.0f}",
                },
                note="first Enter to last page done; fresh server and cache per mode",
            )
        )
        rows.append(
            Row(
                f"{page.title}: mean time until a session has its result, all asking from the first Enter",
                sum(together.latencies[page.title]) / len(queries),
                "s",
                baseline=sum(alone.latencies[page.title]) / len(queries),
                note="baseline: each request served whole, in turn (its wait for the ones before counts); "
                + f"{together.name}: "
                + ", ".join(f"{t:.0f}" for t in together.latencies[page.title])
                + f" s; {alone.name}: "
                + ", ".join(f"{t:.0f}" for t in alone.latencies[page.title])
                + " s",
            )
        )
    peak = max(mode.peak_rss_mib for mode in runs[True])
    rows.append(
        Row(
            f"Peak RSS of the server, {len(queries)} sessions at once (baseline: one after another)",
            peak,
            "MiB",
            baseline=max(mode.peak_rss_mib for mode in runs[False]),
            note=f"VmHWM of the streamlit process over the whole mode; goal <= {RSS_GOAL_MIB} MiB: "
            + ("met" if peak <= RSS_GOAL_MIB else "NOT met"),
        )
    )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--token-only", action="store_true", help="only the Token attributions page")
    parser.add_argument("--repeats", type=int, default=1, help="run both modes this many times; the fastest counts")
    parser.add_argument("--logs", type=Path, help="keep every server's log here")
    args = parse_args(parser, argv)
    results = Results(NAME, TITLE)
    results.report("Sessions at once vs one after another", run(args.token_only, args.logs, args.repeats), DESCRIPTION)


if __name__ == "__main__":
    main()
