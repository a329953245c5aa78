"""Speed benchmarks: each module exposes run() -> list[dict] and prints a table as python -m bench.<name>."""
