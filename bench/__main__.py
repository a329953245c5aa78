"""python -m bench: every benchmark in one run, one table -> bench/results.md (and each module's
bench/results_<name>.md). `python -m bench --quick` shrinks every size to check that the modules run; its numbers
are not results and go to a temporary directory."""

import argparse
import dataclasses
import importlib

from bench.harness import Results, measure, parse_args

MODULES = ("foundation", "token_ig", "neurons", "full_analysis")


def main() -> None:
    parse_args(argparse.ArgumentParser(description=__doc__))
    combined = Results(None, "Benchmarks (last run)")
    rows = []
    for name in MODULES:
        module = importlib.import_module(f"bench.{name}")
        results = Results(name, module.TITLE, command="python -m bench")
        timing = measure(module.run)
        results.add("Speed", timing.value, getattr(module, "DESCRIPTION", ""))
        path = results.write()
        rows += [dataclasses.replace(row, name=f"[{name}] {row.name}") for row in timing.value]
        print(f"{name}: {len(timing.value)} rows in {timing.min:.0f} s -> {path}", flush=True)
    combined.report(
        "All modules, one run",
        rows,
        "Each row measures ours and its baseline side by side in this run; ratio = baseline / ours.",
    )


if __name__ == "__main__":
    main()
