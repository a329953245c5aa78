"""Driving the real app in a real browser: a `streamlit run` server and Debian chromium through Playwright.

Shared by the browser tests (tests/test_browser*.py) and the concurrency benchmark (bench/concurrency.py):

    with AppServer(log_path, cache_dir=..., corpus_limit=300) as server, sync_playwright() as p:
        browser = launch_chromium(p)
        pages = open_sessions(browser, server.url, 4, page="token_attributions")   # 4 sessions
        for page in pages: wait_for_widget(page, "Query")
        submit_queries(pages, ["q1", "q2", "q3", "q4"])
        seen = wait_all(pages, ready=TOKENS_READY)          # also records every progress text each page showed
        server.job_starts()                                 # parsed "model job N started: key=... owner=..." lines
        server.peak_rss_mib()                               # VmHWM of the streamlit process

No Streamlit import: the server is a subprocess, and everything is read from the page (DOM) or the server's log.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
CORPUS_LIMIT_ENV = "DPR_LENS_CORPUS_LIMIT"
CACHE_ENV = "DPR_LENS_CACHE"
MINUTE = 60_000  # Playwright timeouts are in milliseconds

# JavaScript expressions evaluated in the page.
SCRIPT_DONE = (
    "(() => { const app = document.querySelector('[data-testid=\"stApp\"]');"
    " return !!app && app.dataset.testScriptState === 'notRunning'"
    " && document.querySelector('[data-stale=\"true\"]') === null; })()"
)
HAS_PROBLEM = 'document.querySelector(\'[data-testid="stException"], [data-testid="stAlertContentError"]\') !== null'
STATUS_TEXTS = (
    'Array.from(document.querySelectorAll(\'[data-testid="stProgress"], [data-testid="stSpinner"]\'))'
    ".map(e => e.innerText.trim()).filter(t => t)"
)
QUEUE_TEXT = re.compile(r"waiting for the model, (\d+) jobs? ahead of yours in the queue")
JOB_START = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) core\.runtime model job (?P<number>\d+) "
    r"started: key=(?P<key>\S+) owner=(?P<owner>\S+)\s*$",
    re.MULTILINE,
)
JOB_END = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) core\.runtime model job (?P<number>\d+) "
    r"(?P<how>finished|cancelled) in (?P<seconds>[\d.]+) s\s*$",
    re.MULTILINE,
)


def chromium_available() -> bool:
    return Path(CHROMIUM).exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f")


@dataclass(frozen=True)
class JobStart:
    number: int
    key: str
    owner: str
    time: datetime


@dataclass(frozen=True)
class JobEnd:
    number: int
    cancelled: bool
    seconds: float
    time: datetime


def parse_job_starts(log: str) -> list[JobStart]:
    return [JobStart(int(m["number"]), m["key"], m["owner"], _log_time(m["time"])) for m in JOB_START.finditer(log)]


def parse_job_ends(log: str) -> dict[int, JobEnd]:
    return {
        int(m["number"]): JobEnd(int(m["number"]), m["how"] == "cancelled", float(m["seconds"]), _log_time(m["time"]))
        for m in JOB_END.finditer(log)
    }


class AppServer:
    """`streamlit run app.py` on a free port, with its stdout and stderr (the INFO log) in log_path.

    env: extra variables; cache_dir and corpus_limit set DPR_LENS_CACHE and DPR_LENS_CORPUS_LIMIT (a corpus limit
    inherited from the caller's environment is dropped unless given here).
    """

    def __init__(
        self,
        log_path: Path,
        cache_dir: Path | None = None,
        corpus_limit: int | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
        nice: int = 0,
    ):
        self.log_path = Path(log_path)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if k != CORPUS_LIMIT_ENV}
        if cache_dir is not None:
            self.env[CACHE_ENV] = str(cache_dir)
        if corpus_limit is not None:
            self.env[CORPUS_LIMIT_ENV] = str(corpus_limit)
        self.env.update(env or {})
        self.nice = nice
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "the server is not running"
        return self.process.pid

    def start(self, timeout: float = 180) -> AppServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "app.py",
            "--server.port",
            str(self.port),
            "--server.address",
            "127.0.0.1",
            "--server.headless",
            "true",
            "--browser.gatherUsageStats",
            "false",
        ]
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=(lambda: os.nice(self.nice)) if self.nice else None,
            )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"streamlit exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                if urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2).status == 200:
                    return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"streamlit did not become healthy in {timeout:.0f} s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)

    def __enter__(self) -> AppServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def job_starts(self) -> list[JobStart]:
        return parse_job_starts(self.log())

    def job_ends(self) -> dict[int, JobEnd]:
        return parse_job_ends(self.log())

    def _status_kib(self, field_name: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"{field_name} missing from /proc/{self.pid}/status")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the streamlit process so far (all its threads)."""
        return process_cpu_seconds(self.pid)

    def peak_rss_mib(self) -> float:
        """VmHWM (peak resident set size) of the streamlit process so far."""
        return self._status_kib("VmHWM") / 1024

    def rss_mib(self) -> float:
        return self._status_kib("VmRSS") / 1024


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (0 if it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """Every live process below pid (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def browser_cpu_seconds(exclude: Sequence[int] = ()) -> float:
    """CPU seconds of this process's live descendants (Playwright's driver, chromium and its renderers), without
    the processes in `exclude` (e.g. the server's pid)."""
    return sum(process_cpu_seconds(pid) for pid in descendants(os.getpid()) if pid not in exclude)


# --------------------------------------------------------------------------- browser and sessions


def launch_chromium(playwright, **options):
    """Debian chromium (not Playwright's download), headless."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True, **options)


def open_sessions(browser, url: str, count: int, page: str = "", viewport: dict | None = None, context=None) -> list:
    """count tabs on url/page: every tab is its own Streamlit session (its own websocket)."""
    owner = context or browser
    tabs = [owner.new_page(viewport=viewport or {"width": 1400, "height": 1000}) for _ in range(count)]
    for tab in tabs:
        goto(tab, url, page)
    return tabs


def enter_through_home(browser, url: str, query: str | None = None, timeout: float = 10 * MINUTE) -> None:
    """Opens the home page once (and, with `query`, retrieves it), then closes that tab.

    Do this on a fresh server before timing other sessions: the first run of app.py configures the server's
    logging (which the job-log checks read), and with `query` the pair and the index are loaded too, so a timed
    run after this does not pay for them.
    """
    tab = browser.new_page()
    goto(tab, url)
    if query is None:
        wait_for_widget(tab, "Query", timeout=timeout)
    else:
        submit_queries([tab], [query])
        wait_done(tab, ready="document.querySelectorAll('.lens-hit').length > 0", timeout=timeout)
    tab.close()


def goto(tab, url: str, page: str = "") -> None:
    tab.goto(f"{url}/{page}".rstrip("/") if page else url, wait_until="domcontentloaded")


def wait_for_widget(tab, label: str, timeout: float = 5 * MINUTE):
    """The input labelled `label`, once the page's script has drawn it (the models may still be loading)."""
    box = tab.get_by_label(label, exact=True)
    box.wait_for(timeout=timeout)
    return box


def wait_done(tab, ready: str | None = None, timeout: float = 10 * MINUTE) -> None:
    """Until the script is not running (nothing stale on the page) and `ready` (a JS expression) holds, or an
    exception or error box is shown."""
    condition = SCRIPT_DONE if ready is None else f"(({ready}) && {SCRIPT_DONE})"
    tab.wait_for_function(f"{condition} || {HAS_PROBLEM}", timeout=timeout, polling=250)


RUNS_STARTED = """(() => {
    const app = document.querySelector('[data-testid="stApp"]');
    if (!window.__lensRuns) {
        window.__lensRuns = {count: 0};
        new MutationObserver(records => records.forEach((record, i) => {
            const now = i + 1 < records.length ? records[i + 1].oldValue : app.dataset.testScriptState;
            if (now === 'running' && record.oldValue !== 'running') window.__lensRuns.count += 1;
        })).observe(app, {attributes: true, attributeOldValue: true, attributeFilter: ['data-test-script-state']});
    }
    return window.__lensRuns.count;
})()"""


def runs_started(tab) -> int:
    """How many script runs this tab has started since it was first asked (counting starts at the first call)."""
    return tab.evaluate(RUNS_STARTED)


def act_and_wait(
    tab, action: Callable[[], None], ready: str | None = None, timeout: float = 600, settle: float = 1.5
) -> None:
    """Does `action` (a click, a key press) and waits for the rerun it causes to finish (and `ready` to hold), so a
    page that looked done before the action is not taken for done after it.

    A rerun of a few milliseconds may never show in the DOM (React batches the state changes), so a page that has
    been done, with `ready` holding, for `settle` seconds after the action counts as done too.
    """
    before = runs_started(tab)
    action()
    condition = SCRIPT_DONE if ready is None else f"(({ready}) && {SCRIPT_DONE})"
    probe = f"(() => ({{runs: window.__lensRuns.count, done: {condition}, problem: {HAS_PROBLEM}}}))()"
    deadline, settled_since = time.time() + timeout, None
    while True:
        state = tab.evaluate(probe)
        now = time.time()
        if state["problem"] or (state["done"] and state["runs"] > before):
            return
        settled_since = (settled_since or now) if state["done"] else None
        if settled_since is not None and now - settled_since >= settle:
            return
        if now > deadline:
            raise TimeoutError(f"no finished rerun {timeout:.0f} s after the action (ready: {ready})")
        time.sleep(0.2)


def submit_queries(tabs: Sequence, queries: Sequence[str], label: str = "Query") -> list[float]:
    """Types each tab's query, then presses Enter in every tab in quick succession; returns when each was pressed
    (time.time()), so a test can tell that sessions asked at the same time."""
    boxes = [wait_for_widget(tab, label) for tab in tabs]
    for box, query in zip(boxes, queries):
        box.fill(query)
    pressed = []
    for box in boxes:
        box.press("Enter")
        pressed.append(time.time())
    return pressed


@dataclass
class Watch:
    """What wait_all saw: every distinct progress/spinner text per tab, and when each tab finished."""

    statuses: list[list[str]] = field(default_factory=list)
    finished: list[float | None] = field(default_factory=list)
    # (time, texts of every tab) whenever some tab showed a status: to tell that two tabs waited at once
    snapshots: list[tuple[float, list[list[str]]]] = field(default_factory=list)

    def queue_positions(self) -> list[list[int]]:
        """Per tab, every 'N job(s) ahead of yours in the queue' it showed."""
        return [[int(m.group(1)) for text in texts for m in QUEUE_TEXT.finditer(text)] for texts in self.statuses]


def wait_all(
    tabs: Sequence,
    ready: str | None = None,
    timeout: float = 600,
    poll: float = 0.3,
    on_poll: Callable[[float], None] | None = None,
) -> Watch:
    """Polls every tab until each one's script is done and `ready` holds there (or it shows an exception or
    error box), recording the progress texts each tab shows meanwhile. Raises TimeoutError with the tabs' last
    status after `timeout` seconds."""
    condition = SCRIPT_DONE if ready is None else f"(({ready}) && {SCRIPT_DONE})"
    probe = f"(() => ({{done: ({condition}) || {HAS_PROBLEM}, statuses: {STATUS_TEXTS}}}))()"
    watch = Watch([[] for _ in tabs], [None] * len(tabs))
    deadline = time.time() + timeout
    last: list[list[str]] = [[] for _ in tabs]
    while True:
        now = time.time()
        for number, tab in enumerate(tabs):
            if watch.finished[number] is not None:
                last[number] = []
                continue
            state = tab.evaluate(probe)
            last[number] = state["statuses"]
            for text in state["statuses"]:
                if text not in watch.statuses[number]:
                    watch.statuses[number].append(text)
            if state["done"]:
                watch.finished[number] = time.time()
        if any(last):
            watch.snapshots.append((now, [list(texts) for texts in last]))
        if on_poll:
            on_poll(now)
        if all(done is not None for done in watch.finished):
            return watch
        if now > deadline:
            raise TimeoutError(f"tabs still running after {timeout:.0f} s; last statuses: {last}")
        time.sleep(poll)


# --------------------------------------------------------------------------- reading the page


def problems(tab) -> list[str]:
    """Texts of every exception and error box on the page (both should be absent)."""
    return tab.evaluate(
        'Array.from(document.querySelectorAll(\'[data-testid="stException"], '
        '[data-testid="stAlertContentError"]\')).map(e => e.innerText.trim())'
    )


def hits(tab) -> list[dict]:
    """Every `.lens-hit` card in page order (model A's column, then model B's): rank, title, score (float)."""
    rows = tab.evaluate("""Array.from(document.querySelectorAll('.lens-hit-head')).map(head => {
        const copy = head.cloneNode(true);
        const score = copy.querySelector('.lens-score').textContent;
        const rank = copy.querySelector('b').textContent;
        copy.querySelectorAll('.lens-score, .lens-shared, b').forEach(e => e.remove());
        return {rank: rank, title: copy.textContent.trim(), score: score};
    })""")
    return [{"rank": int(row["rank"].rstrip(".")), "title": row["title"], "score": float(row["score"])} for row in rows]


def hit_columns(tab) -> dict[str, list[dict]]:
    """The retrieval page's two columns of hits: {"A": [...], "B": [...]} (a new column starts at rank 1)."""
    columns: list[list[dict]] = []
    for hit in hits(tab):
        if hit["rank"] == 1 or not columns:
            columns.append([])
        columns[-1].append(hit)
    return dict(zip("AB", columns))


def token_blocks(tab) -> list[list[tuple[str, float]]]:
    """Every `.lens-tokens` block in page order as (token, attribution) from each span's `token: +0.1234` title."""
    blocks = tab.evaluate("""Array.from(document.querySelectorAll('.lens-tokens')).map(block =>
        Array.from(block.querySelectorAll('span.lens-tok')).map(span => span.getAttribute('title')))""")
    parsed = []
    for titles in blocks:
        tokens = []
        for title in titles:
            token, _, value = title.rpartition(": ")
            tokens.append((html.unescape(token), float(value)))
        parsed.append(tokens)
    return parsed


def captions(tab, containing: str = "", warnings: bool = False) -> list[str]:
    """Texts of st.caption elements (and, with warnings, st.warning boxes) in page order that contain `containing`."""
    selector = '[data-testid="stCaptionContainer"]' + (', [data-testid="stAlertContentWarning"]' if warnings else "")
    texts = tab.evaluate(f"Array.from(document.querySelectorAll('{selector}')).map(e => e.innerText.trim())")
    return [text for text in texts if containing in text]


def metrics(tab) -> list[tuple[str, str]]:
    """Every st.metric in page order as (label, value text)."""
    return [
        tuple(pair)
        for pair in tab.evaluate("""Array.from(document.querySelectorAll('[data-testid="stMetric"]'))
        .map(m => [m.querySelector('[data-testid="stMetricLabel"]').innerText.trim(),
                   m.querySelector('[data-testid="stMetricValue"]').innerText.trim()])""")
    ]


def dataframes(tab) -> list[list[dict[str, str]]]:
    """Every st.dataframe in page order as rows of {column: cell text}, read from the grid's accessible table
    (cells hold the full-precision value; only the rows the grid has drawn, so keep tables short)."""
    tables = tab.evaluate("""Array.from(document.querySelectorAll('[data-testid="stDataFrame"]')).map(frame => {
        const table = frame.querySelector('table');
        if (!table) return [];
        return Array.from(table.querySelectorAll('tr')).map(row =>
            Array.from(row.querySelectorAll('th, td')).map(cell => cell.textContent));
    })""")
    frames = []
    for rows in tables:
        if not rows:
            frames.append([])
            continue
        header, *body = rows
        frames.append([dict(zip(header, row)) for row in body])
    return frames


NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?"


def numbers_after(text: str, *names: str) -> dict[str, float]:
    """`name = <number>` values from a caption, e.g. numbers_after(caption, "s(x)", "Σ attributions")."""
    found = {}
    for name in names:
        match = re.search(re.escape(name) + r"\s*=\s*(" + NUMBER + ")", text)
        if match:
            found[name] = float(match.group(1))
    return found


def seen_together(watch: Watch, tabs: Iterable[int], pattern: str) -> bool:
    """Whether at one poll every tab in `tabs` showed a status matching `pattern` (they waited at the same time)."""
    regex = re.compile(pattern)
    tabs = list(tabs)
    return any(all(any(regex.search(text) for text in texts[t]) for t in tabs) for _, texts in watch.snapshots)
