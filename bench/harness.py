"""The one benchmark harness: timer, row, Markdown table, results files, peak RSS, quick mode.

    timing = measure(function, *args, repeats=3)        # wall and CPU time of every repeat
    timing.min, timing.median, timing.cpu_min, timing.value
    both = side_by_side({"ours": f, "baseline": g}, repeats=3)   # interleaved, one run
    Row("search 100 queries", both["ours"].min, "s", baseline=both["baseline"].min, note="...").ratio
    print(format_table(rows))
    results = Results("foundation", "Foundation benchmark")   # at the start: load average, date
    results.report("Speed", rows)          # prints; writes the section to bench/results_foundation.md

Ratio = baseline / value: above 1 means ours is faster (or smaller). Quick mode (`--quick` or
DPR_LENS_BENCH_QUICK=1) shrinks every module's sizes to check that it runs; its numbers are not results and go to
a temporary directory, never to bench/.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
QUICK_ENV = "DPR_LENS_BENCH_QUICK"
QUICK_DIR = Path(tempfile.gettempdir()) / "dpr-lens-bench-quick"
Clock = Literal["wall", "cpu"]


# --------------------------------------------------------------------------- quick mode


def is_quick() -> bool:
    return os.environ.get(QUICK_ENV, "") not in ("", "0")


def sized(full, quick):
    """`full` normally, `quick` in quick mode (sizes, repeats, step counts)."""
    return quick if is_quick() else full


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Adds --quick to a module's parser, parses, and turns quick mode on for every module of this process."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"shrink every size to check that the benchmark runs (also {QUICK_ENV}=1); "
        f"numbers are not results and go to {QUICK_DIR}",
    )
    args = parser.parse_args(argv)
    if args.quick:
        os.environ[QUICK_ENV] = "1"
    return args


# --------------------------------------------------------------------------- timer


@dataclass(frozen=True)
class Timing:
    """Wall (perf_counter) and process CPU (process_time) seconds of each repeat; `value`: the last result."""

    wall: tuple[float, ...]
    cpu: tuple[float, ...]
    value: Any = None

    @property
    def min(self) -> float:
        return min(self.wall)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_min(self) -> float:
        return min(self.cpu)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    def best(self, clock: Clock = "wall") -> float:
        return self.min if clock == "wall" else self.cpu_min

    def __add__(self, other: Timing) -> Timing:
        return Timing(self.wall + other.wall, self.cpu + other.cpu, other.value)


def measure(function: Callable, *args, repeats: int = 1, **kwargs) -> Timing:
    """Calls function(*args, **kwargs) `repeats` times and times every call."""
    wall, cpu, value = [], [], None
    for _ in range(max(1, repeats)):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        value = function(*args, **kwargs)
        cpu.append(time.process_time() - cpu_start)
        wall.append(time.perf_counter() - wall_start)
    return Timing(tuple(wall), tuple(cpu), value)


def side_by_side(functions: dict[str, Callable[[], Any]], repeats: int = 1) -> dict[str, Timing]:
    """Times the functions alternately (a, b, a, b, ...) in one run, so a load change hits both alike."""
    timings: dict[str, Timing] = {}
    for _ in range(max(1, repeats)):
        for name, function in functions.items():
            timing = measure(function)
            timings[name] = timings[name] + timing if name in timings else timing
    return timings


# --------------------------------------------------------------------------- memory


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_peak_rss_mib(code: str, env: dict[str, str] | None = None) -> float:
    """Peak RSS of a fresh Python process (run from the repository root) that executes `code`."""
    script = f"{code}\nimport resource\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    output = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return int(output.stdout.strip().splitlines()[-1]) / 1024


# --------------------------------------------------------------------------- rows and table


@dataclass
class Row:
    """One measurement: ours (`value`, in `unit`) and, where one exists, the baseline's in the same unit.

    `columns`: extra module-specific columns (already formatted), shown between ratio and note.
    """

    name: str
    value: float | None
    unit: str = "s"
    baseline: float | None = None
    note: str = ""
    columns: dict[str, str] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """baseline / value: how many times faster (or smaller) ours is; None without both numbers."""
        if self.value is None or self.baseline is None or self.value <= 0:
            return None
        return self.baseline / self.value


def format_number(value: float | None) -> str:
    if value is None:
        return "-"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def format_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_table(rows: Sequence[Row]) -> str:
    """Markdown: benchmark | ours | baseline | unit | ratio | <extra columns, first-seen order> | note."""
    extra: list[str] = []
    for row in rows:
        extra += [key for key in row.columns if key not in extra]
    header = ["benchmark", "ours", "baseline", "unit", "ratio", *extra, "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row.name,
            format_number(row.value),
            format_number(row.baseline),
            row.unit,
            format_ratio(row.ratio),
            *(row.columns.get(key, "") for key in extra),
            row.note,
        ]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- results files


def _load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def _training_job() -> bool | None:
    """Whether a `python -m core train`/`pretrain` job runs on this machine (None: pgrep missing)."""
    try:
        found = subprocess.run(["pgrep", "-f", "core.*train"], capture_output=True, text=True).stdout.split()
    except OSError:
        return None
    return any(pid != str(os.getpid()) for pid in found)


def results_path(name: str | None) -> Path:
    """bench/results_<name>.md (bench/results.md for None); under QUICK_DIR in quick mode."""
    filename = "results.md" if name is None else f"results_{name}.md"
    return (QUICK_DIR if is_quick() else BENCH_DIR) / filename


def merge_sections(previous: str, title: str, sections: dict[str, str]) -> str:
    """`# title`, then the previous file's `## ` sections, each replaced by the new one of the same heading; new
    headings are appended. Text before the previous file's first section is dropped (the title is rewritten)."""
    kept: dict[str, str] = {}
    for part in ("\n" + previous).split("\n## ")[1:]:
        heading, _, body = part.partition("\n")
        kept[heading.strip()] = body.strip()
    kept.update({heading: body.strip() for heading, body in sections.items()})
    return f"# {title}\n\n" + "\n\n".join(f"## {heading}\n\n{body}" for heading, body in kept.items()) + "\n"


class Results:
    """The results of one module in one run. The machine header (date, platform, cores, torch, load average at
    start and at the end, training job) is taken when the object is made and completed when a section is added."""

    def __init__(self, name: str | None, title: str, command: str | None = None):
        self.name, self.title = name, title
        self.command = command or " ".join(["python -m bench" + ("" if name is None else f".{name}"), *sys.argv[1:]])
        self.started = datetime.now(UTC)
        self.load_at_start = _load_average()
        self.training_at_start = _training_job()
        self.sections: dict[str, str] = {}

    def machine_header(self) -> str:
        import torch

        quick = "**Quick mode (shrunk sizes): these numbers are not results.** " if is_quick() else ""
        return (
            f"{quick}`{self.command}`, {self.started:%Y-%m-%d %H:%M} UTC; {platform.platform()}, "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); load average (1 / 5 / 15 min) at start {self.load_at_start}, "
            f"at the end {_load_average()}; training job running at start: "
            f"{ {True: 'yes', False: 'no', None: 'unknown'}[self.training_at_start] }."
        )

    def add(self, heading: str, rows: Sequence[Row], description: str = "") -> str:
        body = "\n\n".join(part for part in (self.machine_header(), description.strip(), format_table(rows)) if part)
        self.sections[heading] = body
        return f"## {heading}\n\n{body}"

    def write(self, merge: bool = True) -> Path:
        """Writes the sections to results_path(name); with merge, the file's other sections are kept."""
        path = results_path(self.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        previous = path.read_text() if merge and path.is_file() else ""
        path.write_text(merge_sections(previous, self.title, self.sections))
        return path

    def report(self, heading: str, rows: Sequence[Row], description: str = "") -> Path:
        """Prints the section and writes it (the usual end of a module's main)."""
        print(self.add(heading, rows, description), flush=True)
        path = self.write()
        print(f"wrote {path}", flush=True)
        return path
