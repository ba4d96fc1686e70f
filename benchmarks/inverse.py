"""Sampling (the flow's inverse) with each of its savings turned off, side by side.

The inverse of a NAF is `D` sequential passes; each pass evaluates the
conditioner for one dimension and solves that dimension's transformer by a
bracketed Newton search. Five things make it cheaper; this times 512 samples
(D=43, the setup of `benchmarks.speed`) with all of them, and with each
switched off in turn, in one process, round-robin, in `tf.function` and under
XLA, next to TFP's MAF:

* `evaluator`: the search evaluates the transformer with the parameters' own
  work (first-layer slopes and softmax) done once per solve
  (`_SigmoidalTransformer._evaluator`); off: the whole forward each time.
* `start`: DSF starts at the weighted mean of its units' roots, so the
  bracket's ends are not evaluated; off: the false-position start.
* `lazy_root`: `g` at the root is evaluated only for gradients
  (`root_finding.solve_increasing_with_params`); off: always, as
  `solve_increasing` does.
* `predicted_stop`: the search stops after a Newton step whose remaining
  error, predicted from the last three steps, is below `x`'s float resolution
  (`root_finding.PREDICTED_STOP`); off: one more evaluation confirms it.
* `incremental`: the MADE's first-layer pre-activation and its later hidden
  layers' activations are carried between passes, each later hidden unit
  computed once, when its inputs are solved (`conditioners.IncrementalHead`);
  in a conditional flow the hidden layers' terms in the condition `c` are
  computed once per inverse; off: `dimension_head`, which recomputes them at
  every pass.

With `--conditional C` the flow is conditional, `p(x | c)` with `c` of size
`C` (one condition per sample, as when drawing from an amortised posterior
for many observations); MAF stays the unconditional reference.

Each variant is traced with the switch patched and the patch undone after
tracing, so all variants share one flow and one input.

    python -m benchmarks.inverse [--rounds 9] [--threads 2] [--conditional C]
"""

from __future__ import annotations

import argparse
import contextlib
import json

import numpy as np
import tensorflow as tf

from benchmarks import speed
from tfp_naf import conditioners, root_finding, transformers

RESULTS = speed.RESULTS
SWITCHES = ("evaluator", "start", "lazy_root", "predicted_stop", "incremental")


@contextlib.contextmanager
def _switched_off(name: "str | None"):
    """Patches one saving out of the library while a function is traced."""
    cls, dsf = transformers._SigmoidalTransformer, transformers.DeepSigmoidalFlow
    saved = dict(evaluator=cls._evaluator, start=dsf._bracket_and_start,
                 lazy_root=dsf._params_are_explicit, incremental=conditioners.incremental_head,
                 predicted_stop=root_finding.PREDICTED_STOP)
    if name == "evaluator":
        cls._evaluator = lambda self, params: (
            lambda x: self.forward_and_log_derivative(x, params))
    elif name == "start":
        dsf._bracket_and_start = lambda self, y, params: (*saved["start"](self, y, params)[:2],
                                                          None)
    elif name == "lazy_root":
        dsf._params_are_explicit = False
    elif name == "predicted_stop":
        root_finding.PREDICTED_STOP = False
    elif name == "incremental":
        conditioners.incremental_head = lambda conditioner: None
    try:
        yield
    finally:
        cls._evaluator, dsf._bracket_and_start = saved["evaluator"], saved["start"]
        dsf._params_are_explicit = saved["lazy_root"]
        conditioners.incremental_head = saved["incremental"]
        root_finding.PREDICTED_STOP = saved["predicted_stop"]


def _conditional_sample(conditional_size: int, seed: int = 0):
    """`(sample, z)`: 512 draws of a conditional naf-dsf (the setup of `benchmarks.speed`)."""
    from benchmarks.models import build_flow, conditional_kwargs, perturb

    tf.keras.utils.set_random_seed(seed)
    _, to_noise, conds = build_flow("naf-dsf", speed.D, speed.HIDDEN, num_flows=speed.FLOWS,
                                    num_units=speed.UNITS, conditional_size=conditional_size)
    x = tf.random.normal([speed.BATCH, speed.D], seed=seed)
    c = tf.random.normal([speed.BATCH, conditional_size], seed=seed + 1)
    kwargs = conditional_kwargs(speed.FLOWS, c)
    to_noise.forward(x, **kwargs)  # Builds the conditioners.
    perturb(conds, scale=0.1, seed=seed)
    z = tf.constant(to_noise.forward(x, **kwargs).numpy())
    to_data = speed.tfp_invert(to_noise)
    return (lambda z: to_data.forward(z, **kwargs)), z


def run(rounds: int, conditional_size: "int | None" = None) -> dict:
    if conditional_size:
        sample, z = _conditional_sample(conditional_size)
    else:
        sample, z = speed._operations("naf-dsf")[0]["sample"]
    maf_sample, maf_z = speed._operations("maf")[0]["sample"]
    report = {}
    for mode, jit in (("tf.function", False), ("jit_compile", True)):
        calls = {}
        reference = None
        for name in (None,) + SWITCHES:
            fn = tf.function(sample, jit_compile=jit)
            with _switched_off(name):
                x = fn(z).numpy()  # Traced (and compiled) with the switch off.
            fn(z)
            if reference is None:
                reference = x
            key = "all" if name is None else f"without {name}"
            # Every variant solves the same inverse: equal to rounding.
            report.setdefault("max_abs_difference", {})[key] = float(
                np.max(np.abs(x - reference)))
            calls[key] = lambda fn=fn: fn(z)
        maf = tf.function(maf_sample, jit_compile=jit)
        maf(maf_z), maf(maf_z)
        calls["maf"] = lambda maf=maf: maf(maf_z)
        seconds = speed.round_robin_seconds(calls, rounds)
        report[mode] = {name: 1e3 * s for name, s in seconds.items()}
    return report


def markdown(report: dict) -> str:
    modes = ("tf.function", "jit_compile")
    size = report.get("conditional_size")
    flow = f"a conditional flow, c of size {size}" if size else "an unconditional flow"
    lines = [f"512 samples, D = 43, {flow} (ms, median; ratio to TFP MAF's 512 samples in the "
             "same mode)",
             "",
             "| variant | " + " | ".join(f"{m} (ms) | / MAF" for m in modes) + " |",
             "|---|" + "---|---|" * len(modes)]
    for name in ["all"] + [f"without {s}" for s in SWITCHES] + ["maf"]:
        cells = []
        for mode in modes:
            ms, maf = report[mode][name], report[mode]["maf"]
            cells += [f"{ms:.1f}", f"{ms / maf:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    diff = max(report["max_abs_difference"].values())
    lines += ["", f"Largest difference between the variants' samples: {diff:.2e}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None,
                        help="intra- and inter-op threads (default: TensorFlow's)")
    parser.add_argument("--tag", default="", help="suffix of the output files' names")
    parser.add_argument("--conditional", type=int, default=None, metavar="C",
                        help="time a conditional flow, p(x | c) with c of size C")
    args = parser.parse_args(argv)
    if args.conditional is not None and args.conditional < 1:
        parser.error("--conditional must be a positive size")
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    report = run(args.rounds, args.conditional)
    if args.conditional:
        report["conditional_size"] = args.conditional
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"inverse{'_' + args.tag if args.tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    stem.with_suffix(".md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
