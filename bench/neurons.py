"""Knowledge-neuron attribution: batched shared-prefix passes vs the plain per-layer loop, side by side.

    python -m bench.neurons            # writes bench/results_neurons.md

Rows: the offline pair's MiniLM models (16-token query, both sites, m = 20) and a BERT-base-sized
model (BertConfig defaults, random weights, CLS pooling, 16 tokens, m = 20). The per-layer loop is
timed alternately with ours (best of `repeats`); both are also run once under torch.profiler to count
their matmul FLOPs. The naive loop (one step at a time, weights' gradients included) is timed once, for
context. Every baseline must give the same attributions as ours.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.profiler import profile
from transformers import BertConfig, BertModel

from core.neuron_attribution import (SITES, attribute_neurons, attribute_neurons_per_layer, ffn_sites,
                                     site_sizes)
from core.pair import TWIN_DIR, ModelSpec, Tower, load_encoder

RESULTS = Path(__file__).with_name("results_neurons.md")
QUERY = "which french composer wrote the opera carmen that premiered in paris in the year 1875"
TOKENS = 16
STEPS = 20


def naive_loop(tower: Tower, batch: dict, target: np.ndarray, steps: int) -> dict[str, np.ndarray]:
    """The plainest loop, for context only: one forward and `.backward()` per (layer, site, step), on the
    model as loaded (weights' gradients computed too, backward down to the embeddings)."""
    sites = ffn_sites(tower)
    target_tensor = torch.as_tensor(target)
    scores = {site: np.zeros((len(sites), size)) for site, size in site_sizes(tower).items()}
    for layer, ffn in enumerate(sites):
        for site in SITES:
            gradient_sum, clean = 0.0, None
            for step in range(1, steps + 1):
                kept = {}

                def scale(tensor: torch.Tensor) -> torch.Tensor:
                    kept["clean"] = tensor.detach()
                    kept["scaled"] = tensor * (step / steps)
                    kept["scaled"].retain_grad()
                    return kept["scaled"]

                handle = (ffn.down.register_forward_pre_hook(lambda module, args: (scale(args[0]),))
                          if site == "intermediate" else
                          ffn.down.register_forward_hook(lambda module, args, output: scale(output)))
                try:
                    tower.model.zero_grad(set_to_none=True)
                    (tower.forward(batch)[0] @ target_tensor).backward()
                finally:
                    handle.remove()
                gradient_sum = gradient_sum + kept["scaled"].grad[0]
                clean = kept["clean"][0]
            scores[site][layer] = (clean * gradient_sum / steps).sum(0).double().numpy()
    tower.model.zero_grad(set_to_none=True)
    return scores


def _max_relative_difference(ours: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(ours[s] - reference[s]).max() / np.abs(reference[s]).max()) for s in SITES)


def _matmul_gflop(function, *args) -> float:
    with profile(with_flops=True) as profiler:
        function(*args)
    return sum(event.flops for event in profiler.key_averages()) / 1e9


def _timed(clock, function, *args):
    started = clock()
    result = function(*args)
    return result, clock() - started


def compare(name: str, tower: Tower, batch: dict, target: np.ndarray, repeats: int, naive: bool,
            clock=time.perf_counter) -> list[dict]:
    ours_times, loop_times = [], []
    for _ in range(repeats):
        ours, seconds = _timed(clock, attribute_neurons, tower, batch, target, STEPS)
        ours_times.append(seconds)
        loop, seconds = _timed(clock, attribute_neurons_per_layer, tower, batch, target, STEPS)
        loop_times.append(seconds)
    ours_s = min(ours_times)
    delta = max(float(ours.completeness_deltas()[s].max() / np.abs(ours.expected_sums()[s]).max()) for s in SITES)
    setting = f"{batch['input_ids'].shape[1]} tokens, {len(ours.scores['output'])} layers, m={STEPS}, both sites"
    ours_flop = _matmul_gflop(attribute_neurons, tower, batch, target, STEPS)
    loop_flop = _matmul_gflop(attribute_neurons_per_layer, tower, batch, target, STEPS)
    baselines = [("per-layer loop", loop.scores, min(loop_times),
                  f"{setting}; matmul GFLOP ours {ours_flop:.0f} vs loop {loop_flop:.0f} (ratio "
                  f"{loop_flop / ours_flop:.2f}); completeness: max delta / max abs(s(x) - s(0)) = {delta:.2f}")]
    if naive:
        naive_scores, seconds = _timed(clock, naive_loop, tower, batch, target, STEPS)
        baselines.append(("naive loop", naive_scores, seconds, f"{setting}; naive loop timed once"))
    rows = []
    for baseline, scores, baseline_s, note in baselines:
        difference = _max_relative_difference(ours.scores, scores)
        rows.append({"name": f"{name} vs {baseline}", "ours_s": ours_s, "baseline_s": baseline_s,
                     "ratio": baseline_s / ours_s, "equal": difference <= 1e-4,
                     "note": f"{note}; max abs(ours - baseline) / max abs(baseline) = {difference:.1e}; "
                             f"1-min load average after the row {os.getloadavg()[0]:.2f}"})
        print(f"{rows[-1]['name']}: ours {ours_s:.2f} s, baseline {baseline_s:.2f} s, "
              f"ratio {rows[-1]['ratio']:.2f}x; {rows[-1]['note']}", flush=True)
    return rows


def _minilm_rows(repeats: int, clock) -> list[dict]:
    specs = [ModelSpec("A", "minilm:")]
    if (TWIN_DIR / "config.json").is_file():
        specs.append(ModelSpec("B", str(TWIN_DIR)))
    rows = []
    for spec in specs:
        encoder = load_encoder(spec)
        batch = encoder.query.tokenize([QUERY], max_length=TOKENS)
        target = encoder.encode_passages(["Carmen"], ["Carmen is an opera in four acts by Georges Bizet."])[0]
        rows += compare(f"offline {spec.label}: MiniLM-L6 (mean pooling)", encoder.query, batch, target, repeats,
                        naive=spec.label == "A", clock=clock)
    return rows


def _bert_base_rows(repeats: int, clock) -> list[dict]:
    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval()
    tokenizer = load_encoder(ModelSpec("A", "minilm:")).query.tokenizer  # the same uncased 30522-word vocabulary
    tower = Tower(model, tokenizer, "cls", False)
    batch = tower.tokenize([QUERY], max_length=TOKENS)
    target = np.random.default_rng(0).normal(size=tower.dim).astype(np.float32)
    return compare("BERT-base size, random weights (CLS pooling)", tower, batch, target, repeats, naive=True,
                   clock=clock)


def _load() -> str:
    training = subprocess.run(["pgrep", "-f", "core.*train"], capture_output=True, text=True).stdout.split()
    return (f"load average {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores, torch threads "
            f"{torch.get_num_threads()}, training job {'running' if training else 'not running'}")


def run(repeats: int = 2, clock=time.perf_counter) -> list[dict]:
    """`clock`: time.perf_counter (wall time) or time.process_time (CPU time, steadier on a shared machine
    when torch runs one thread)."""
    return _minilm_rows(repeats, clock) + _bert_base_rows(repeats, clock)


def write_results(rows: list[dict], before: str, after: str, clock_name: str) -> None:
    lines = [
        "# Knowledge-neuron attribution benchmark",
        "",
        f"`python -m bench.neurons`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}; times are {clock_name} with {torch.get_num_threads()} torch thread(s).",
        f"Load before: {before}. After: {after}. Peak RSS of the run: "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GB.",
        "",
        "ours = `attribute_neurons` (all (layer, site, step) rows in growing batches; a layer's rows join at its "
        "FFN as copies of the clean row, the clean row gives every alpha = 1 gradient; gradients w.r.t. activations "
        "only). per-layer loop = `attribute_neurons_per_layer` (Dai et al.: for each layer and site, the m+1 scaled "
        "copies through the whole model, gradients w.r.t. the scaled activation only), best of the repeats, timed "
        "alternately with ours. naive loop = one forward and `.backward()` per (layer, site, step) on the model as "
        "loaded (weights' gradients too), timed once, for context.",
        "",
        "| case | ours (s) | baseline (s) | ratio | same scores (1e-4) | note |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['name']} | {r['ours_s']:.2f} | {r['baseline_s']:.2f} | {r['ratio']:.2f}x | "
              f"{'yes' if r['equal'] else 'NO'} | {r['note']} |" for r in rows]
    RESULTS.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--cpu-time", action="store_true", help="time with process CPU time instead of wall time")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock, clock_name = ((time.process_time, "process CPU time") if args.cpu_time else (time.perf_counter, "wall time"))
    before = _load()
    rows = run(args.repeats, clock)
    after = _load()
    print(f"\n{'case':<70}{'ours (s)':>10}{'baseline (s)':>14}{'ratio':>8}")
    for row in rows:
        print(f"{row['name']:<70}{row['ours_s']:>10.2f}{row['baseline_s']:>14.2f}{row['ratio']:>7.2f}x")
    write_results(rows, before, after, clock_name)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
