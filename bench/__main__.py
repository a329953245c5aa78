"""python -m bench: every benchmark in one run, one table; the last results go to bench/results.md."""
import importlib
import os
import platform
import time
from pathlib import Path

from bench.foundation import format_table

MODULES = ("foundation", "token_ig", "neurons", "full_analysis")


def main() -> None:
    rows = []
    for name in MODULES:
        started = time.perf_counter()
        module_rows = importlib.import_module(f"bench.{name}").run()
        rows += [dict(row, name=f"[{name}] {row['name']}") for row in module_rows]
        print(f"{name}: {len(module_rows)} rows in {time.perf_counter() - started:.0f} s", flush=True)
    table = format_table(rows)
    print(table)
    header = (f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, "
              f"{os.cpu_count()} cores, by `make bench`.\n\n")
    Path(__file__).with_name("results.md").write_text("# Benchmarks (last run)\n\n" + header + table + "\n")


main()
