"""Knowledge-neuron attribution: batched shared-prefix passes vs the plain per-layer loop, side by side.

    python -m bench.neurons            # writes bench/results_neurons.md
    python -m bench.neurons --cpu-time # process CPU time instead of wall time (steadier on a shared CPU)
    python -m bench.neurons --quick    # m = 4, one repeat, a 2-layer BERT-base: checks that it runs (not results)

Rows: the offline pair's MiniLM models (16-token query, both sites, m = 20) and a BERT-base-sized
model (BertConfig defaults, random weights, CLS pooling, 16 tokens, m = 20). The per-layer loop is
timed alternately with ours (best of `repeats`); both are also run once under torch.profiler to count
their matmul FLOPs. The naive loop (one step at a time, weights' gradients included) is timed once, for
context. Every baseline must give the same attributions as ours.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from torch.profiler import profile
from transformers import BertConfig, BertModel

from bench.harness import Clock, Results, Row, is_quick, measure, parse_args, peak_rss_mib, side_by_side, sized
from core.neuron_attribution import SITES, attribute_neurons, attribute_neurons_per_layer, ffn_sites, site_sizes
from core.pair import TWIN_DIR, ModelSpec, Tower, load_encoder
from core.runtime import model_work

NAME, TITLE = "neurons", "Knowledge-neuron attribution benchmark"
QUERY = "which french composer wrote the opera carmen that premiered in paris in the year 1875"
TOKENS = 16
DESCRIPTION = (
    "ours = `attribute_neurons` (all (layer, site, step) rows in growing batches; a layer's rows join at its "
    "FFN as copies of the clean row, the clean row gives every alpha = 1 gradient; gradients w.r.t. activations "
    "only). per-layer loop = `attribute_neurons_per_layer` (Dai et al.: for each layer and site, the m+1 scaled "
    "copies through the whole model, gradients w.r.t. the scaled activation only), best of the repeats, timed "
    "alternately with ours. naive loop = one forward and `.backward()` per (layer, site, step) on the model as "
    "loaded (weights' gradients too), timed once, for context."
)


def ig_steps() -> int:
    """m, the integration steps per (layer, site)."""
    return sized(20, 4)


@model_work  # hooks on a shared model only inside a model job, like the core functions it is compared with
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

                handle = (
                    ffn.down.register_forward_pre_hook(lambda module, args: (scale(args[0]),))
                    if site == "intermediate"
                    else ffn.down.register_forward_hook(lambda module, args, output: scale(output))
                )
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


@model_work  # the profiler sees its own thread only: start it on the model worker, where the work runs
def _matmul_gflop(function, *args) -> float:
    with profile(with_flops=True) as profiler:
        function(*args)
    return sum(event.flops for event in profiler.key_averages()) / 1e9


def compare(
    name: str, tower: Tower, batch: dict, target: np.ndarray, repeats: int, naive: bool, clock: Clock = "wall"
) -> list[Row]:
    m = ig_steps()
    timings = side_by_side(
        {
            "ours": lambda: attribute_neurons(tower, batch, target, m),
            "loop": lambda: attribute_neurons_per_layer(tower, batch, target, m),
        },
        repeats,
    )
    ours, loop = timings["ours"].value, timings["loop"].value
    ours_s = timings["ours"].best(clock)
    delta = max(float(ours.completeness_deltas()[s].max() / np.abs(ours.expected_sums()[s]).max()) for s in SITES)
    setting = f"{batch['input_ids'].shape[1]} tokens, {len(ours.scores['output'])} layers, m={m}, both sites"
    ours_flop = _matmul_gflop(attribute_neurons, tower, batch, target, m)
    loop_flop = _matmul_gflop(attribute_neurons_per_layer, tower, batch, target, m)
    baselines = [
        (
            "per-layer loop",
            loop.scores,
            timings["loop"].best(clock),
            f"{setting}; matmul GFLOP ours {ours_flop:.0f} vs loop {loop_flop:.0f} (ratio "
            f"{loop_flop / ours_flop:.2f}); completeness: max delta / max abs(s(x) - s(0)) = {delta:.2f}",
        )
    ]
    if naive:
        timing = measure(naive_loop, tower, batch, target, m)
        baselines.append(("naive loop", timing.value, timing.best(clock), f"{setting}; naive loop timed once"))
    rows = []
    for baseline, scores, baseline_s, note in baselines:
        difference = _max_relative_difference(ours.scores, scores)
        rows.append(
            Row(
                f"{name} vs {baseline}",
                ours_s,
                "s",
                baseline_s,
                f"{note}; max abs(ours - baseline) / max abs(baseline) = {difference:.1e}; "
                f"1-min load average after the row {os.getloadavg()[0]:.2f}",
                {"same scores (1e-4)": "yes" if difference <= 1e-4 else "NO"},
            )
        )
        print(
            f"{rows[-1].name}: ours {ours_s:.2f} s, baseline {baseline_s:.2f} s, "
            f"ratio {rows[-1].ratio:.2f}x; {rows[-1].note}",
            flush=True,
        )
    return rows


def _minilm_rows(repeats: int, clock: Clock) -> list[Row]:
    specs = [ModelSpec("A", "minilm:")]
    if (TWIN_DIR / "config.json").is_file():
        specs.append(ModelSpec("B", str(TWIN_DIR)))
    rows = []
    for spec in specs:
        encoder = load_encoder(spec)
        batch = encoder.query.tokenize([QUERY], max_length=TOKENS)
        target = encoder.encode_passages(["Carmen"], ["Carmen is an opera in four acts by Georges Bizet."])[0]
        rows += compare(
            f"offline {spec.label}: MiniLM-L6 (mean pooling)",
            encoder.query,
            batch,
            target,
            repeats,
            naive=spec.label == "A",
            clock=clock,
        )
    return rows


def _bert_base_rows(repeats: int, clock: Clock) -> list[Row]:
    torch.manual_seed(0)
    model = BertModel(BertConfig(**({"num_hidden_layers": 2} if is_quick() else {}))).eval()
    tokenizer = load_encoder(ModelSpec("A", "minilm:")).query.tokenizer  # the same uncased 30522-word vocabulary
    tower = Tower(model, tokenizer, "cls", False)
    batch = tower.tokenize([QUERY], max_length=TOKENS)
    target = np.random.default_rng(0).normal(size=tower.dim).astype(np.float32)
    size = "BERT-base size" + (" (quick: 2 layers)" if is_quick() else "")
    return compare(f"{size}, random weights (CLS pooling)", tower, batch, target, repeats, naive=True, clock=clock)


def run(repeats: int = 2, clock: Clock = "wall") -> list[Row]:
    """`clock`: "wall" (perf_counter) or "cpu" (process CPU time, steadier on a shared machine when torch runs
    one thread)."""
    repeats = sized(repeats, 1)
    return _minilm_rows(repeats, clock) + _bert_base_rows(repeats, clock)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--cpu-time", action="store_true", help="time with process CPU time instead of wall time")
    args = parse_args(parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock: Clock = "cpu" if args.cpu_time else "wall"
    results = Results(NAME, TITLE)
    rows = run(args.repeats, clock)
    clock_name = "process CPU time" if clock == "cpu" else "wall time"
    results.report(
        "Speed",
        rows,
        f"{DESCRIPTION} Times are {clock_name} with {torch.get_num_threads()} torch "
        f"thread(s); peak RSS of the run {peak_rss_mib() / 1024:.1f} GB.",
    )


if __name__ == "__main__":
    main()
