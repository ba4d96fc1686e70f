"""The inverse's Newton search in trained flows: iterations per solve, and its slow tail.

`benchmarks.speed` and `benchmarks.inverse` time sampling from a flow whose
weights are perturbed from the start; there a search needs ~3 iterations.
Trained transformers are steeper and have plateaus, and the search over a
batch runs until its slowest element has converged. This trains NAF-DSF on
each 2-D shape (the quality protocol's flow: 5 layers, MADE [64, 64], 16
units, Adam 1e-3, batch 256, clip 5; `--steps`, 3,000 by default, no
validation), then draws `--samples` points and records, for every one of
the 2 x 5 solves of the inverse, the iterations the batch's loop ran and how
many elements were still unconverged after 3, 4, 6, 8 and 12 iterations.

    python -m benchmarks.search [--steps 3000] [--samples 4096] [--datasets pinwheel,...]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import tensorflow as tf

from benchmarks import quality
from benchmarks.models import build_flow
from benchmarks.speed import RESULTS
from benchmarks.train import make_train_step
from tfp_naf import root_finding

CHECKPOINTS = (3, 4, 6, 8, 12)


def _train(name: str, steps: int, seed: int):
    """`to_noise` of NAF-DSF trained on the standardised training rows of `name`."""
    data = quality.load(name, fast=False)["train"]
    data = ((data - data.mean(0)) / data.std(0)).astype(np.float32)
    tf.keras.utils.set_random_seed(seed)
    dist, to_noise, _ = build_flow("naf-dsf", 2, [64, 64])
    step = tf.function(make_train_step(dist)[0])
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        step(data[rng.integers(0, len(data), 256)])
    return to_noise


def _solves(to_noise, samples: int, seed: int) -> "tuple[list[dict], float]":
    """`(solves, round trip)`: per solve of the inverse (eager, in order) its loop
    iterations and unconverged counts; the largest abs(z - forward(inverse(z)))."""
    search = root_finding.find_root_increasing
    solves = []

    def recording(fn, y, low, high, tolerance, max_iterations, initial=None):
        result = search(fn, y, low, high, tolerance, max_iterations, initial=initial)
        left = {}
        for k in CHECKPOINTS:  # The same search, stopped after k iterations.
            capped = search(fn, y, low, high, tolerance, k, initial=initial)
            left[k] = int(tf.reduce_sum(tf.cast(~capped.converged, tf.int32)))
        solves.append({"iterations": int(result.num_iterations), "unconverged_after": left})
        return result

    z = tf.random.normal([samples, 2], seed=seed)
    root_finding.find_root_increasing = recording
    try:
        x = to_noise.inverse(z)
    finally:
        root_finding.find_root_increasing = search
    z_back = to_noise.forward(tf.constant(x.numpy()))
    return solves, float(tf.reduce_max(tf.abs(z_back - z)))


def markdown(report: dict) -> str:
    lines = [f"Trained {report['steps']} steps (seed {report['seed']}), {report['samples']} "
             "samples; per solve of the inverse (layer order of sampling, 2 dimensions each): "
             "the iterations the batch's search ran, and elements unconverged after "
             + ", ".join(map(str, CHECKPOINTS)) + " iterations", "",
             "| dataset | iterations per solve | sum | max | unconverged after k (worst solve) "
             "| round trip max abs(z - z') |", "|---|---|---|---|---|---|"]
    for name, r in report["datasets"].items():
        its = [s["iterations"] for s in r["solves"]]
        worst = max(r["solves"], key=lambda s: s["iterations"])["unconverged_after"]
        left = ", ".join(f"{k}: {v}" for k, v in worst.items())
        lines.append(f"| {name} | {' '.join(map(str, its))} | {sum(its)} | {max(its)} | {left} "
                     f"| {r['round_trip']:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datasets", default="8gaussians,checkerboard,2spirals,pinwheel")
    parser.add_argument("--tag", default="", help="suffix of the output files' names")
    args = parser.parse_args(argv)
    report = {"steps": args.steps, "samples": args.samples, "seed": args.seed, "datasets": {}}
    for name in args.datasets.split(","):
        to_noise = _train(name, args.steps, args.seed)
        solves, round_trip = _solves(to_noise, args.samples, args.seed)
        report["datasets"][name] = {"solves": solves, "round_trip": round_trip}
        print(name, [s["iterations"] for s in solves], f"round trip {round_trip:.2e}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    suffix = f"_{args.tag}" if args.tag else ""
    (RESULTS / f"search{suffix}.json").write_text(json.dumps(report, indent=1))
    (RESULTS / f"search{suffix}.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
