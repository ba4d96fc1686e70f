"""Speed: NAF log_prob, training step and sampling, as ratios to their references.

Setup (one run, so every ratio compares timings taken side by side): D=43,
5 layers with reversals, MADE hidden [128, 128], 16 transformer units,
float32, weights perturbed from the identity start (masks kept); log_prob of
a batch of 4,096, a training step on 512, drawing 512 samples. Each
operation runs in `tf.function` and with `jit_compile=True`; timings are
medians of 9 rounds in which every operation and reference runs once in
turn (round-robin, so load drift on a shared machine hits all alike), after
warm-up (compilation excluded). Each ratio is of the two medians; the report
also gives the quartiles of the per-round ratios (an operation and its
reference timed seconds apart, so they share the load of the moment), a
measure of how far this host's noise moves the ratio.

References: (a) the flow's own 5 conditioners: their forwards (floor of
log_prob), forward+backward (floor of a training step), and D sequential
rounds of the 5 forwards (floor of sampling); (b) TFP's affine MAF with the
same MADE sizes; (c) the floors `floor_log_prob` / `floor_train_step`: the
conditioners' pass plus, per layer, the DSF transformer's transcendental
evaluations per unit (`benchmarks.transformers.TRANSCENDENTALS`) as one chain
of `tf.exp` / `tf.math.log1p` / `tf.math.reciprocal` on a `[N, D, K]` tensor.
Also reported: Newton iterations of the inverse per dimension, round-trip
error, batch-dependent peak memory (max-RSS growth of a fresh process per
case, as `tf.config.experimental.get_memory_info` does not support CPU), and
(`--ddsf`) DDSF's training step against DSF's at D=43 and D=2, batch 256.

    python -m benchmarks.speed [--fast] [--variants naf-dsf,naf-dsf-ctx16] [--no-memory]
        [--no-ddsf]
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from benchmarks.models import build_flow, perturb
from benchmarks.train import make_train_step
from tfp_naf import root_finding

RESULTS = Path(__file__).resolve().parent / "results"
D, BATCH, HIDDEN, FLOWS, UNITS = 43, 512, [128, 128], 5, 16
LOG_PROB_BATCH = 4096  # log_prob is timed on a large batch, the training step on BATCH.
TARGETS = [  # (operation, reference, bound)
    ("log_prob", "cond_fwd", 1.3),
    ("train_step", "cond_fwd_bwd", 1.3),
    ("sample", "cond_sequential", 1.5),
    ("log_prob", "floor_log_prob", 2.0),
    ("train_step", "floor_train_step", 2.0),
    ("log_prob", "maf_log_prob", 5.0),
    ("train_step", "maf_train_step", 4.0),
    ("sample", "maf_sample", 1.5),
]
ROUND_TRIP_BOUND = 1e-4
# DDSF against DSF: training steps at batch 256, D=43 and D=2, side by side.
DDSF_BATCH, DDSF_DIMS, DDSF_BOUND = 256, (43, 2), 2.0
DDSF_MODELS = ("naf-dsf", "naf-ddsf-shared-ctx16", "naf-ddsf-shared", "naf-ddsf-ctx16")


def _operations(model: str, seed: int = 0, batch: int = BATCH,
                log_prob_batch: int = LOG_PROB_BATCH, event_size: int = D):
    """`(ops, dist, to_noise, conds, x, x_big)`: name -> (function of one tensor, its input)."""
    tf.keras.utils.set_random_seed(seed)
    dist, to_noise, conds = build_flow(model, event_size, HIDDEN, num_flows=FLOWS,
                                       num_units=UNITS)
    perturb(conds, scale=0.1, seed=seed)
    x = tf.random.normal([batch, event_size], seed=seed)
    x_big = tf.random.normal([log_prob_batch, event_size], seed=seed + 1)
    z = tf.constant(to_noise.forward(x).numpy())  # Realistic noise for this flow.
    to_data = tfp_invert(to_noise)
    step, _ = make_train_step(dist, learning_rate=1e-6)
    ops = {"log_prob": (dist.log_prob, x_big), "train_step": (step, x),
           "sample": (to_data.forward, z)}
    return ops, dist, to_noise, conds, x, x_big


def tfp_invert(bijector):
    import tensorflow_probability as tfp

    if isinstance(bijector, tfp.bijectors.Invert):
        return bijector.bijector
    return tfp.bijectors.Invert(bijector)


def _floor_units(n: int) -> tf.Variable:
    """A `[n, D, K]` tensor for the transcendental floors (a variable: nothing constant-folds)."""
    return tf.Variable(tf.random.normal([n, D, UNITS], seed=3))


def _conditioner_references(conds, x, x_big, naf_layers=None):
    from benchmarks.transformers import TRANSCENDENTALS, chain

    variables = [v for c in conds for v in c.trainable_variables]
    units, units_big = _floor_units(int(x.shape[0])), _floor_units(int(x_big.shape[0]))

    def fwd(x):
        # Each output summed: returning five `[N, D, P]` tensors would time their
        # copy back to NumPy (170 MB at 4,096 rows), not the conditioners.
        return [tf.reduce_sum(c(x)) for c in conds]

    def fwd_bwd(x):
        with tf.GradientTape() as tape:
            loss = tf.add_n([tf.reduce_mean(tf.square(c(x))) for c in conds])
        return tape.gradient(loss, variables)

    def floor_log_prob(x):  # The conditioners, plus each transformer's evaluations.
        return fwd(x), [chain(units_big, TRANSCENDENTALS["forward"]) for _ in conds]

    def floor_train_step(x):
        return fwd_bwd(x), [chain(units, TRANSCENDENTALS["forward+backward"]) for _ in conds]

    def sequential(x):  # D rounds of the 5 forwards, each fed by the last.
        def body(i, x):
            for c in conds:
                x = c(x)[..., 0]
            return i + 1, x

        return tf.while_loop(lambda i, x: i < D, body, (tf.constant(0), x))[1]

    refs = {"cond_fwd": (fwd, x_big), "cond_fwd_bwd": (fwd_bwd, x),
            "cond_sequential": (sequential, x)}
    transformer = getattr(naf_layers[0], "transformer", None) if naf_layers else None
    if transformer is not None:  # Diagnostic: the 5 transformers alone, at fixed theta.
        thetas = [tf.constant(c(x_big).numpy()) for c in conds]

        def transformers_only(x):
            return [transformer.forward_and_log_derivative(x, t) for t in thetas]

        refs["transformers_only"] = (transformers_only, x_big)
        if type(transformer).__name__ == "DeepSigmoidalFlow":  # The counts are DSF's.
            refs["floor_log_prob"] = (floor_log_prob, x_big)
            refs["floor_train_step"] = (floor_train_step, x)
    return refs


def _block(result) -> None:
    """Waits for `result` (a structure of tensors) by reading it back."""
    tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, result)


def round_robin_times(calls: dict, rounds: int) -> dict:
    """Seconds of each zero-argument call in every round, the calls timed in turn.

    On a shared machine the load drifts; interleaving makes every call see the
    same drift, so their ratios are steadier than timings taken one call after
    another. Warm the calls up first (tracing, compilation are not timed here).
    """
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            t0 = time.perf_counter()
            _block(call())
            times[name].append(time.perf_counter() - t0)
    return times


def round_robin_seconds(calls: dict, rounds: int) -> dict:
    """Median seconds of each call over `round_robin_times`'s rounds."""
    return {name: float(np.median(t)) for name, t in round_robin_times(calls, rounds).items()}


def per_round_ratios(times: dict, op: str, ref: str) -> "list[float] | None":
    """`op`'s time over `ref`'s in each round: timed seconds apart, they share the load."""
    if times.get(op) is None or times.get(ref) is None:
        return None
    return [a / b for a, b in zip(times[op], times[ref], strict=True)]


def _time_round_robin(cases: dict, jit: bool, rounds: int) -> "tuple[dict, dict]":
    """`(medians, times)`: `round_robin_times` of the cases compiled, after two warm-up calls.

    A case XLA rejects is reported, with None as its median and its times.
    """
    calls, seconds, times = {}, {}, {}
    for name, (fn, arg) in cases.items():
        call = functools.partial(tf.function(fn, jit_compile=jit), arg)
        try:
            for _ in range(2):
                _block(call())
        except Exception as err:  # Report an XLA failure rather than hide it.
            print(f"  {'jit_compile' if jit else 'tf.function'} {name}: failed "
                  f"({type(err).__name__})")
            seconds[name] = times[name] = None
            continue
        calls[name] = call
    times.update(round_robin_times(calls, rounds))
    seconds.update({name: float(np.median(times[name])) for name in calls})
    return seconds, times


def _inverse_stats(to_noise, x) -> dict:
    """Iterations per solve of the first layer's inverse, and round-trip errors."""
    z = tf.constant(to_noise.forward(x).numpy())  # A fresh tensor: no bijector cache.
    x_back = to_noise.inverse(z)
    z_back = to_noise.forward(tf.constant(x_back.numpy()))
    naf = to_noise.bijectors[-1]  # The layer that sees the data first.
    transformer = naf.transformer
    z1 = tf.constant(naf.forward(x).numpy())
    theta = naf.transformer_params(x)  # Each pass of the inverse sees theta(x) at the end.
    iterations = []
    for d in range(D):
        y, p = z1[:, d], theta[:, d]
        # As the transformer's `solve` searches: its bracket and start.
        low, high, start = transformer._bracket_and_start(y, p)
        fn = transformer._evaluator(p)
        if not transformer._bracket_is_exact():
            low, high = root_finding.expand_bracket(fn, y, low, high)
        result = root_finding.find_root_increasing(
            fn, y, low, high, transformer.tolerance, transformer.max_iterations,
            initial=start if transformer._params_are_explicit else None)
        iterations.append(int(result.num_iterations))
    return dict(
        round_trip_x=float(tf.reduce_max(tf.abs(x_back - x))),
        round_trip_z=float(tf.reduce_max(tf.abs(z_back - z))),
        iterations_mean=float(np.mean(iterations)),
        iterations_max=int(np.max(iterations)),
    )


def _memory_case(model: str, op: str, jit: bool, batch: int) -> float:
    """Max-RSS growth (MiB) of this process over the first compiled call of one case.

    The first call traces, compiles and runs; the caller subtracts the same
    case at a tiny batch, leaving the memory that grows with the batch.
    """
    ops, *_ = _operations(model, batch=batch, log_prob_batch=batch)
    fn, arg = ops[op]
    compiled = tf.function(fn, jit_compile=jit)
    before = _peak_rss_kib()
    for _ in range(2):
        _block(compiled(arg))
    return (_peak_rss_kib() - before) / 1024.0


def _peak_rss_kib() -> int:
    """This process's peak resident set (KiB): VmHWM from /proc, else ru_maxrss.

    `ru_maxrss` is not enough in a child process: Linux carries the parent's
    high-water mark across fork and exec, so a child of a large parent would
    show no growth. VmHWM belongs to the process's own address space.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _memory_at(model: str, op: str, jit: bool, batch: int) -> "float | None":
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.speed", "--memory-case",
         f"{model}:{op}:{int(jit)}:{batch}"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
    )
    for line in out.stdout.splitlines():
        if line.startswith("MEMORY_MIB "):
            return float(line.split()[1])
    print(f"  memory case {model}:{op} failed: {out.stderr[-300:]}")
    return None


def _memory(model: str, op: str, jit: bool) -> "float | None":
    """Batch-dependent peak memory: first-call max-RSS growth at the op's batch minus at 8.

    Each measurement runs in a fresh process (max RSS never goes down);
    `tf.config.experimental.get_memory_info` does not support the CPU.
    """
    batch = LOG_PROB_BATCH if op == "log_prob" else BATCH
    big, small = _memory_at(model, op, jit, batch), _memory_at(model, op, jit, 8)
    return None if big is None or small is None else big - small


def ddsf_comparison(fast: bool) -> dict:
    """Training-step medians (s) of DSF and the DDSF variants, round-robin, per D and mode."""
    repeats = 3 if fast else 9
    out = {}
    for event_size in DDSF_DIMS:
        cases = {}
        for model in DDSF_MODELS:
            ops, *_ = _operations(model, batch=DDSF_BATCH, log_prob_batch=8,
                                  event_size=event_size)
            cases[model] = ops["train_step"]
        out[event_size] = {mode: _time_round_robin(cases, jit, repeats)[0]
                           for mode, jit in (("tf.function", False), ("jit_compile", True))}
    return out


def ddsf_markdown(result: dict) -> str:
    lines = [f"DDSF against DSF: training step (ms, median) at batch {DDSF_BATCH}, {UNITS} units, "
             f"DDSF 2 layers; ratio to naf-dsf in the same mode (target for the compact "
             f"shared-mixing DDSF <= {DDSF_BOUND:g})\n",
             "| D | model | tf.function (ms) | ratio | jit_compile (ms) | ratio |",
             "|---|---|---|---|---|---|"]
    for event_size, modes in result.items():
        for model in DDSF_MODELS:
            cells = []
            for mode in ("tf.function", "jit_compile"):
                t, ref = modes[mode].get(model), modes[mode].get("naf-dsf")
                cells += (["failed", ""] if t is None or ref is None
                          else [f"{1e3 * t:.1f}", f"{t / ref:.2f}"])
            lines.append(f"| {event_size} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(variants, fast: bool, memory: bool, ddsf: bool = True) -> dict:
    repeats = 2 if fast else 9
    maf_ops, *_ = _operations("maf")
    report = {"setup": dict(D=D, batch=BATCH, log_prob_batch=LOG_PROB_BATCH, hidden=HIDDEN,
                            flows=FLOWS, units=UNITS, repeats=repeats, dtype="float32"),
              "variants": {}}
    for variant in variants:
        ops, _, to_noise, conds, x, x_big = _operations(variant)
        naf_layers = [b for b in to_noise.bijectors if hasattr(b, "transformer")]
        refs = _conditioner_references(conds, x, x_big, naf_layers)
        entry = {"inverse": _inverse_stats(to_noise, x), "modes": {}}
        for mode, jit in (("tf.function", False), ("jit_compile", True)):
            cases = {**ops, **refs, **{f"maf_{k}": v for k, v in maf_ops.items()}}
            seconds, times = _time_round_robin(cases, jit, repeats)
            checks = []
            for op, ref, bound in TARGETS:
                rounds = per_round_ratios(times, op, ref)
                if rounds is None:
                    checks.append(dict(op=op, ref=ref, bound=bound, ratio=None, ok=False))
                    continue
                ratio = seconds[op] / seconds[ref]
                q1, q3 = np.percentile(rounds, [25, 75])
                checks.append(dict(op=op, ref=ref, bound=bound, ratio=ratio, ok=ratio <= bound,
                                   round_ratio_quartiles=[float(q1), float(q3)]))
            entry["modes"][mode] = dict(seconds=seconds, checks=checks)
        if memory:
            entry["memory_mib"] = {
                f"{op}": _memory(variant, op, True) for op in ("log_prob", "train_step", "sample")
            }
            entry["memory_mib"].update({
                f"maf_{op}": _memory("maf", op, True) for op in ("log_prob", "train_step", "sample")
            } if variant == variants[0] else {})
        report["variants"][variant] = entry
        print(markdown({"setup": report["setup"], "variants": {variant: entry}}), flush=True)
    if ddsf:
        report["ddsf_vs_dsf"] = ddsf_comparison(fast)
        print(ddsf_markdown(report["ddsf_vs_dsf"]), flush=True)
    return report


def markdown(report: dict) -> str:
    lines = []
    for variant, entry in report["variants"].items():
        inv = entry["inverse"]
        lines.append(f"**{variant}** — inverse: {inv['iterations_mean']:.1f} iterations per "
                     f"solve (max {inv['iterations_max']}), round trip max|x - x'| "
                     f"{inv['round_trip_x']:.2e} "
                     f"({'PASS' if inv['round_trip_x'] <= ROUND_TRIP_BOUND else 'MISS'} "
                     f"<= {ROUND_TRIP_BOUND:g}), max|z - z'| {inv['round_trip_z']:.2e}\n")
        lines.append("Ratios of medians; in brackets the quartiles of the per-round ratios "
                     "(each round times an operation and its reference seconds apart).\n")
        lines.append("| ratio | target | tf.function | jit_compile |")
        lines.append("|---|---|---|---|")
        modes = entry["modes"]
        for k, (op, ref, bound) in enumerate(TARGETS):
            cells = []
            for mode in ("tf.function", "jit_compile"):
                c = modes[mode]["checks"][k]
                spread = c.get("round_ratio_quartiles")
                cells.append("failed" if c["ratio"] is None else
                             f"{c['ratio']:.2f} {'PASS' if c['ok'] else 'MISS'}" + (
                                 "" if spread is None else
                                 f" ({spread[0]:.2f}-{spread[1]:.2f})"))
            lines.append(f"| {op} / {ref} | <= {bound:g} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("| operation | tf.function (ms) | jit_compile (ms) |")
        lines.append("|---|---|---|")
        for name in modes["tf.function"]["seconds"]:
            cells = [modes[m]["seconds"].get(name) for m in ("tf.function", "jit_compile")]
            lines.append(f"| {name} | " + " | ".join(
                "failed" if s is None else f"{1e3 * s:.1f}" for s in cells) + " |")
        if "memory_mib" in entry:
            lines.append("")
            lines.append("Batch-dependent peak memory (max-RSS growth of the first call at the "
                         f"operation's batch ({LOG_PROB_BATCH} for log_prob, {BATCH} otherwise) "
                         "minus at batch 8, MiB, jit_compile): " + ", ".join(
                f"{k} {v:.0f}" if v is not None else f"{k} n/a"
                for k, v in entry["memory_mib"].items()))
        lines.append("")
    if "ddsf_vs_dsf" in report:
        lines.append(ddsf_markdown(report["ddsf_vs_dsf"]))
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer repeats: smoke check")
    parser.add_argument("--variants", default="naf-dsf,naf-dsf-ctx16",
                        help="NAF models (naf-dsf, naf-ddsf, naf-dsf-ctx16, ...)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--ddsf", action=argparse.BooleanOptionalAction, default=True,
                        help="also time DDSF's training step against DSF's (D=43 and D=2)")
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    tf.get_logger().setLevel("ERROR")
    if args.memory_case:
        model, op, jit, batch = args.memory_case.split(":")
        print(f"MEMORY_MIB {_memory_case(model, op, bool(int(jit)), int(batch)):.1f}")
        return {}
    report = run([v for v in args.variants.split(",") if v], args.fast, args.memory, args.ddsf)
    RESULTS.mkdir(exist_ok=True)
    stem = "speed_fast" if args.fast else "speed"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (RESULTS / f"{stem}.md").write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
