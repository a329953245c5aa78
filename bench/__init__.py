"""Speed and memory benchmarks: each module exposes run() -> list[harness.Row] and, as python -m bench.<name>,
prints a table and writes bench/results_<name>.md through bench/harness.py (timer, rows, table, results files)."""
