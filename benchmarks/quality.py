"""Density quality: test NLL (nats) of NAF-DSF, NAF-DDSF, affine MAF and RQ-spline flows.

Protocol (identical for every model):

* standardise by the training set's mean and std; report the NLL of the
  data in its own units (the standardisation's log-det is added back);
* 5 autoregressive layers with reversals in between, MADE hidden units
  [64, 64] (2-D) or [128, 128] (MiniBooNE), 16 transformer units;
* Adam 1e-3, batch 256, gradient-norm clip 5, jit-compiled step where XLA
  accepts it;
* 2-D toys (8gaussians, checkerboard, 2spirals, pinwheel): 20,000 train /
  5,000 test points from different seeds, 3,000 steps, test at the end;
* MiniBooNE: train on val.npy minus its last 10% (validation), validate every
  250 steps up to 5,000, stop after 8 checks without improvement, test on
  test.npy with the best check's weights.

    python -m benchmarks.quality [--fast] [--datasets a,b] [--models m,n]

Writes benchmarks/results/quality.json and quality.md (or quality_fast.*).

`--evaluate-on validation` is for choosing defaults without looking at any
test set: the 2-D toys are scored on a fresh 5,000-point draw (seed 2, neither
train nor test) and MiniBooNE on its held-out 10% of val.npy at the best
check; results go to select*.json / select*.md instead.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from benchmarks.models import MODELS, build_flow
from benchmarks.train import compile_step, make_train_step, nll_stats
from tfp_naf import conditioners, datasets, transformers

RESULTS = Path(__file__).resolve().parent / "results"
TOYS = ("8gaussians", "checkerboard", "2spirals", "pinwheel")
DATASETS = TOYS + ("miniboone",)
# Test NLL of other libraries' NAF / spline flows under this protocol.
BARS = {"8gaussians": 2.880, "checkerboard": 3.604, "2spirals": 3.255, "pinwheel": 2.379,
        "miniboone": 16.90}
# Compact-conditioner variants run by default on these datasets only.
CONTEXT_MODELS = {"checkerboard": ("naf-dsf-ctx16", "naf-ddsf-ctx16"),
                  "2spirals": ("naf-dsf-ctx16", "naf-ddsf-ctx16"),
                  "miniboone": ("naf-dsf-ctx16",)}


def load(name: str, fast: bool, evaluate_on: str = "test"):
    """`(train, valid or None, scored)` float32 arrays, or None if unavailable.

    `scored` is the test set, or with `evaluate_on="validation"` a set that is
    not the test set: a fresh toy draw, or MiniBooNE's validation part.
    """
    if name in TOYS:
        n_train, n_test = (2000, 500) if fast else (20000, 5000)
        scored_seed = 1 if evaluate_on == "test" else 2
        return (datasets.make_toy(name, n_train, seed=0), None,
                datasets.make_toy(name, n_test, seed=scored_seed))
    try:
        val, test = datasets.load_miniboone()
    except FileNotFoundError as err:
        print(f"[miniboone] skipped: {err}")
        return None
    n_valid = int(round(0.1 * len(val)))
    if evaluate_on != "test":
        test = val[-n_valid:]
    return val[:-n_valid], val[-n_valid:], test


def run_one(model: str, name: str, data, fast: bool, seed: int = 0,
            max_minutes: "float | None" = None) -> dict:
    train, valid, test = data
    tf.keras.utils.set_random_seed(seed)
    mean, std = train.mean(0), train.std(0)
    log_scale = float(np.sum(np.log(std.astype(np.float64))))  # NLL offset to data units.

    def standardise(a):
        return ((a - mean) / std).astype(np.float32)

    train_s, test_s = standardise(train), standardise(test)
    valid_s = None if valid is None else standardise(valid)
    d = train.shape[1]
    hidden = [64, 64] if d == 2 else [128, 128]
    dist, _, _ = build_flow(model, d, hidden)
    variables = dist.trainable_variables
    batch = 256
    rng = np.random.default_rng(seed)

    step_fn, _ = make_train_step(dist)
    t0 = time.perf_counter()
    step, jit = compile_step(step_fn, train_s[rng.integers(0, len(train_s), batch)])
    log_prob, _ = compile_step(dist.log_prob, test_s[:1024], jit=jit)
    compile_s = time.perf_counter() - t0

    def evaluate(a):
        mean_nll, se = nll_stats(log_prob, a)
        return mean_nll + log_scale, se

    if valid_s is None:
        max_steps, check_every, patience = (100 if fast else 3000), None, None
    else:
        max_steps, check_every, patience = (100 if fast else 5000), (50 if fast else 250), 8
    best, best_step, best_weights, bad_checks, history = np.inf, 0, None, 0, []
    t0 = time.perf_counter()
    steps_done = 1  # compile_step took one step.
    losses, stopped = [], "step budget"
    while steps_done < max_steps:
        if max_minutes is not None and time.perf_counter() - t0 > 60.0 * max_minutes:
            stopped = f"time budget ({max_minutes:g} min)"
            break
        losses.append(float(step(train_s[rng.integers(0, len(train_s), batch)])))
        steps_done += 1
        if check_every and steps_done % check_every == 0:
            v, _ = evaluate(valid_s)
            history.append((steps_done, v))
            if v < best:
                best, best_step, bad_checks = v, steps_done, 0
                best_weights = [w.numpy() for w in variables]
            else:
                bad_checks += 1
                if bad_checks >= patience:
                    stopped = "early stopping"
                    break
    train_s_time = time.perf_counter() - t0
    if best_weights is not None:
        for w, value in zip(variables, best_weights, strict=True):
            w.assign(value)
    nll, se = evaluate(test_s)
    result = dict(
        model=model, dataset=name, test_nll=nll, test_se=se, steps=steps_done,
        best_step=best_step if check_every else steps_done, stopped=stopped, jit=jit,
        train_seconds=round(train_s_time, 1), compile_seconds=round(compile_s, 1),
        final_train_loss=float(np.mean(losses[-50:])) + log_scale if losses else None,
        valid_history=history, num_params=int(sum(np.prod(w.shape) for w in variables)),
    )
    print(f"[{name}] {model}: test NLL {nll:.3f} +- {se:.3f} "
          f"({steps_done} steps, {stopped}, {train_s_time:.0f}s, jit={jit})", flush=True)
    return result


def _scale_pseudo_parameters(scale: float) -> None:
    """Diagnostic: every DSF/DDSF transformer reads `scale * params` from now on."""
    split = transformers._SigmoidalTransformer._split_params

    def scaled_split(self, params):
        return split(self, params * tf.constant(scale, params.dtype))

    transformers._SigmoidalTransformer._split_params = scaled_split


def markdown(results: "list[dict]") -> str:
    models = list(dict.fromkeys(r["model"] for r in results))
    names = [n for n in DATASETS if any(r["dataset"] == n for r in results)]
    table = {(r["model"], r["dataset"]): r for r in results}
    lines = ["| model | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for m in models:
        cells = []
        for n in names:
            r = table.get((m, n))
            cells.append("" if r is None else f"{r['test_nll']:.3f} ± {r['test_se']:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("| bar (other libraries) | " + " | ".join(f"{BARS[n]:.3f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> "list[dict]":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="100 steps, small data: smoke check")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma list; naf-dsf-ctx16 style names use context_units")
    parser.add_argument("--tag", default="", help="suffix of the output files' names")
    parser.add_argument("--context", action=argparse.BooleanOptionalAction, default=True,
                        help=f"also run the compact-conditioner variants {CONTEXT_MODELS}")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="wall-clock cap on each training run (the result records it)")
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed (initialisation and batches; the data are fixed)")
    parser.add_argument("--evaluate-on", choices=("test", "validation"), default="test",
                        help="score on the test sets, or (to choose defaults) on sets "
                             "that are not the test sets")
    parser.add_argument("--output-init-scale", type=float, default=None,
                        help="diagnostic: scale of the NAF MADEs' initial output layer "
                             f"(library default {conditioners.OUTPUT_INIT_SCALE:g})")
    parser.add_argument("--param-scale", type=float, default=None,
                        help="diagnostic: multiply the NAF's pseudo-parameters by this before "
                             "the transformer (under Adam, a learning-rate multiplier on them)")
    args = parser.parse_args(argv)
    tf.get_logger().setLevel("ERROR")
    if args.output_init_scale is not None:
        conditioners.OUTPUT_INIT_SCALE = args.output_init_scale
    if args.param_scale is not None:
        _scale_pseudo_parameters(args.param_scale)
    names = [n for n in args.datasets.split(",") if n]
    unknown = sorted(set(names) - set(DATASETS))
    if unknown:
        parser.error(f"unknown datasets {unknown}; expected some of {DATASETS}")
    models = [m for m in args.models.split(",") if m]
    RESULTS.mkdir(exist_ok=True)
    stem = "quality" if args.evaluate_on == "test" else "select"
    stem += ("_fast" if args.fast else "") + (f"_{args.tag}" if args.tag else "")
    results = []
    for name in names:
        data = load(name, args.fast, args.evaluate_on)
        if data is None:
            continue
        run_models = list(models)
        if args.context:
            run_models += [m for m in CONTEXT_MODELS.get(name, ()) if m not in run_models]
        for model in run_models:
            results.append(run_one(model, name, data, args.fast, seed=args.seed,
                                   max_minutes=args.max_minutes))
            results[-1]["scored_on"] = args.evaluate_on  # "test_nll" is on this set.
            (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1))
            (RESULTS / f"{stem}.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
