"""Why `log_prob` of a large batch gains little from XLA: its parts, and row blocks.

Setup as `benchmarks.speed` (D=43, 5 layers with reversals, MADE [128, 128],
16 units, weights perturbed from the start; `log_prob` of 4,096 rows). In
`tf.function` and with `jit_compile=True`, round-robin medians of:

* `log_prob`: the whole batch at once (as `benchmarks.speed` times it);
* `log_prob, rows R`: the same rows in blocks of `R` inside the compiled
  function (`tf.map_fn`, one block after the other), so each block's
  intermediates (`[R, D, K]` units, `[R, D, 3K]` parameters) stay small;
* `conditioners`: the 5 MADEs' forwards alone, each output summed
  (`benchmarks.speed`'s `cond_fwd`);
* `transformers`: the 5 DSF transformers alone, at fixed parameters
  (`benchmarks.speed`'s `transformers_only`);

for NAF-DSF, and `log_prob` (whole and in blocks) for TFP's MAF with the same
MADE sizes.

    python -m benchmarks.xla_log_prob [--rounds 9] [--rows 512,1024]
"""

from __future__ import annotations

import argparse
import functools
import json

import tensorflow as tf

from benchmarks.models import build_flow, perturb
from benchmarks.speed import (
    FLOWS,
    HIDDEN,
    LOG_PROB_BATCH,
    RESULTS,
    UNITS,
    D,
    _conditioner_references,
    round_robin_seconds,
)


def in_blocks(fn, rows: int):
    """`fn` of `[N, D]` -> `[N]`, evaluated `rows` rows at a time (`N` a multiple of `rows`)."""
    def blocked(x):
        blocks = tf.reshape(x, [-1, rows, x.shape[-1]])
        return tf.reshape(tf.map_fn(fn, blocks, parallel_iterations=1), [-1])

    return blocked


def _cases(model: str, x, block_rows) -> dict:
    tf.keras.utils.set_random_seed(0)
    dist, to_noise, conds = build_flow(model, D, HIDDEN, num_flows=FLOWS, num_units=UNITS)
    perturb(conds, scale=0.1, seed=0)
    cases = {"log_prob": dist.log_prob}
    cases.update({f"log_prob, rows {r}": in_blocks(dist.log_prob, r) for r in block_rows})
    naf_layers = [b for b in getattr(to_noise, "bijectors", []) if hasattr(b, "transformer")]
    if naf_layers:  # benchmarks.speed's own references, at this batch.
        refs = _conditioner_references(conds, x, x, naf_layers)
        cases.update(conditioners=refs["cond_fwd"][0], transformers=refs["transformers_only"][0])
    return cases


def run(rounds: int, block_rows) -> dict:
    x = tf.random.normal([LOG_PROB_BATCH, D], seed=1)
    report = {"rows": LOG_PROB_BATCH, "rounds": rounds, "modes": {}}
    cases = {f"{m} {name}": fn for m in ("naf-dsf", "maf")
             for name, fn in _cases(m, x, block_rows).items()}
    for mode, jit in (("tf.function", False), ("jit_compile", True)):
        calls = {name: functools.partial(tf.function(fn, jit_compile=jit), x)
                 for name, fn in cases.items()}
        for call in calls.values():
            call()
        report["modes"][mode] = {k: 1e3 * v for k, v in round_robin_seconds(calls, rounds).items()}
        print(mode, report["modes"][mode], flush=True)
    return report


def markdown(report: dict) -> str:
    modes = report["modes"]
    lines = [f"`log_prob` of {report['rows']} rows and its parts (ms, median of "
             f"{report['rounds']} round-robin rounds)", "",
             "| case | tf.function | jit_compile |", "|---|---|---|"]
    for name in modes["tf.function"]:
        lines.append(f"| {name} | {modes['tf.function'][name]:.1f} | "
                     f"{modes['jit_compile'][name]:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--rows", default="512,1024", help="block sizes, comma-separated")
    args = parser.parse_args(argv)
    tf.get_logger().setLevel("ERROR")
    report = run(args.rounds, [int(r) for r in args.rows.split(",") if r])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "xla_log_prob.json").write_text(json.dumps(report, indent=1))
    (RESULTS / "xla_log_prob.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
