"""Density quality: test NLL (nats) of NAF-DSF, NAF-DDSF, affine MAF and RQ-spline flows.

Protocol (identical for every model; the 2-D part is the one of
`../shared/data/toys/README.md`, under which other libraries were measured):

* the last 10% of the training rows are the validation set, checked every 250
  steps; the best check's weights are restored before testing;
* standardise by the training rows' mean and std; report the NLL of the
  data in its own units (the standardisation's log-det is added back);
* 5 autoregressive layers with reversals in between, MADE hidden units
  [64, 64] (2-D) or [128, 128] (the others), 16 transformer units;
* Adam 1e-3, batch 256, gradient-norm clip 5, jit-compiled step where XLA
  accepts it;
* 2-D toys (8gaussians, checkerboard, 2spirals, pinwheel): the fixed arrays of
  `../shared/data/toys` (20,000 train / 5,000 test rows; generated with
  `tfp_naf.datasets.make_toy` when absent), 3,000 steps;
* simulators of higher dimension (`tfp_naf.datasets`): `funnel` (Neal's funnel,
  6-D, true density known) and `slcp` (SLCP observations, 8-D), 20,000 train
  rows (seed 0) / 5,000 test rows (seed 1); and the conditional task
  `slcp-posterior` (SLCP parameters, 5-D, given observations, 8-D), which also
  reports the fraction of posterior draws outside the prior's box;
* MiniBooNE: train on val.npy, test on test.npy;
* all but the 2-D sets: up to 5,000 steps, stop after 8 checks without
  improvement.

    python -m benchmarks.quality [--fast] [--datasets a,b] [--models m,n] [--seeds 0,1,2]

Writes benchmarks/results/quality.json and quality.md (or quality_fast.*).

`--evaluate-on validation` is for choosing defaults without looking at any
test set: every task is scored on its validation rows at the best check;
results go to select*.json / select*.md instead. `--output-init-scale`,
`--initial-spread`, `--param-scale`, `--slopes`, `--group-scales`, `--min-slope`,
`--base-rate`, `--activation` and `--hidden-bias-scale` are the knobs studied so.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from benchmarks.models import MODELS, NAF_KWARGS, build_flow, conditional_kwargs
from benchmarks.train import compile_step, make_train_step, nll_stats
from tfp_naf import conditioners, datasets, transformers
from tfp_naf.flow import DEFAULT_BASE_RATE, DEFAULT_FIRST_SPREAD, DEFAULT_INITIAL_SPREAD
from tfp_naf.support import BoxSupport

RESULTS = Path(__file__).resolve().parent / "results"
TOYS = ("8gaussians", "checkerboard", "2spirals", "pinwheel")
SIMULATED = ("funnel", "slcp")
CONDITIONAL = ("slcp-posterior",)
DATASETS = TOYS + SIMULATED + ("miniboone",) + CONDITIONAL
# Best test NLL of other libraries under this protocol (2-D: ../shared/data/toys/README.md;
# MiniBooNE: tfp_naf's own best so far).
BARS = {"8gaussians": 2.880, "checkerboard": 3.604, "2spirals": 2.733, "pinwheel": 2.379,
        "miniboone": 16.81}
# Compact-conditioner variants run by default on these datasets only.
CONTEXT_MODELS = {"checkerboard": ("naf-dsf-ctx16", "naf-ddsf-ctx16"),
                  "2spirals": ("naf-dsf-ctx16", "naf-ddsf-ctx16"),
                  "miniboone": ("naf-dsf-ctx16",)}
# Posterior draws per test observation, and observations, for the support check.
SUPPORT_DRAWS, SUPPORT_OBSERVATIONS = 200, 50


def load(name: str, fast: bool, evaluate_on: str = "test") -> "dict | None":
    """The data of one task, or None if unavailable.

    A dict of float32 arrays `train`, `valid`, `scored` (and `train_c`,
    `valid_c`, `scored_c` for a conditional task) plus `source`. `valid` is
    the last 10% of the training rows; `scored` is the test set, or with
    `evaluate_on="validation"` the validation rows themselves (scored with the
    best validation check's weights), so defaults are chosen without any test
    set.
    """
    c_train = c_test = None
    if name in TOYS:
        shared = None if fast else datasets.load_shared_toy(name)
        if shared is not None:
            train, test = shared
            source = "../shared/data/toys"
        else:
            n_train, n_test = (2000, 500) if fast else (20000, 5000)
            train, test = (datasets.make_toy(name, n_train, seed=0),
                           datasets.make_toy(name, n_test, seed=1))
            source = "tfp_naf.datasets.make_toy (seeds 0 / 1)"
    elif name in SIMULATED or name in CONDITIONAL:
        n_train, n_test = (2000, 500) if fast else (20000, 5000)
        if name == "funnel":
            train, test = datasets.funnel(n_train, seed=0), datasets.funnel(n_test, seed=1)
        else:
            (theta, x), (theta_t, x_t) = datasets.slcp(n_train, 0), datasets.slcp(n_test, 1)
            if name == "slcp":
                train, test = x, x_t
            else:
                train, test, c_train, c_test = theta, theta_t, x, x_t
        source = f"tfp_naf.datasets ({name}, seeds 0 / 1)"
    else:
        try:
            val, test = datasets.load_miniboone()
        except FileNotFoundError as err:
            print(f"[miniboone] skipped: {err}")
            return None
        train, source = val, "../shared/data/miniboone (train on val.npy, test on test.npy)"
    n_valid = int(round(0.1 * len(train)))
    data = dict(train=train[:-n_valid], valid=train[-n_valid:], scored=test, source=source)
    if c_train is not None:
        data.update(train_c=c_train[:-n_valid], valid_c=c_train[-n_valid:], scored_c=c_test)
    if evaluate_on != "test":
        data["scored"] = data["valid"]
        if c_train is not None:
            data["scored_c"] = data["valid_c"]
    return data


def _schedule(name: str, fast: bool) -> "tuple[int, int, int | None]":
    """`(max_steps, check_every, patience)`: 2-D sets run all 3,000 steps (best check
    restored); the others stop early after 8 checks without improvement."""
    if fast:
        return 100, 50, None
    if name in TOYS:
        return 3000, 250, None
    return 5000, 250, 8


def with_support(data: dict, support) -> dict:
    """`data` with the parameters mapped by `tfp_naf.support.BoxSupport(support)`.

    The flow then models `u = T(theta)` (logit of the box); `log_det` holds
    each scored and validation row's `log |dT/dtheta|`, subtracted from its
    log-density so NLLs stay in the parameters' own units, and `box` maps
    draws back into the box.
    """
    box = BoxSupport(support, data["train"].shape[1])
    out = dict(data, box=box)
    for part in ("train", "valid", "scored"):
        u, log_det, outside = box.unconstrain(data[part])
        if np.any(outside.numpy()):
            raise ValueError(f"{part} rows outside the support {support}")
        out[part] = u.numpy().astype(np.float32)
        out[part + "_log_det"] = log_det.numpy().astype(np.float64)
    out["source"] = data["source"] + f", support {support}"
    return out


def run_one(model: str, name: str, data: dict, fast: bool, seed: int = 0,
            max_minutes: "float | None" = None) -> dict:
    tf.keras.utils.set_random_seed(seed)
    train = data["train"]
    mean, std = train.mean(0), train.std(0)
    log_scale = float(np.sum(np.log(std.astype(np.float64))))  # NLL offset to data units.
    conditional = "train_c" in data
    if conditional:
        c_mean, c_std = data["train_c"].mean(0), data["train_c"].std(0)

    def prepare(part):
        """Standardised rows; for a conditional task `[x | c]` side by side."""
        x = ((data[part] - mean) / std).astype(np.float32)
        if not conditional:
            return x
        c = ((data[part + "_c"] - c_mean) / c_std).astype(np.float32)
        return np.concatenate([x, c], axis=1)

    train_s, valid_s, scored_s = prepare("train"), prepare("valid"), prepare("scored")
    d = train.shape[1]
    hidden = [64, 64] if d == 2 and not conditional else [128, 128]
    num_flows = 5
    dist, _, _ = build_flow(model, d, hidden, num_flows=num_flows,
                            conditional_size=data["train_c"].shape[1] if conditional else None)

    if conditional:
        def log_prob_fn(xc):
            return dist.log_prob(xc[:, :d], bijector_kwargs=conditional_kwargs(
                num_flows, xc[:, d:]))
    else:
        log_prob_fn = dist.log_prob
    batch = 256
    rng = np.random.default_rng(seed)

    step_fn, _ = make_train_step(dist, log_prob_fn=log_prob_fn)
    variables = dist.trainable_variables
    t0 = time.perf_counter()
    step, jit = compile_step(step_fn, train_s[rng.integers(0, len(train_s), batch)])
    log_prob, _ = compile_step(log_prob_fn, scored_s[:1024], jit=jit)
    compile_s = time.perf_counter() - t0

    def evaluate(a, part):
        offset = -data[part + "_log_det"] if "box" in data else None
        mean_nll, se = nll_stats(log_prob, a, offset=offset)
        return mean_nll + log_scale, se

    max_steps, check_every, patience = _schedule(name, fast)
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
        if steps_done % check_every == 0 or steps_done == max_steps:
            v, _ = evaluate(valid_s, "valid")
            history.append((steps_done, v))
            if v < best:
                best, best_step, bad_checks = v, steps_done, 0
                best_weights = [w.numpy() for w in variables]
            else:
                bad_checks += 1
                if patience is not None and bad_checks >= patience:
                    stopped = "early stopping"
                    break
    train_s_time = time.perf_counter() - t0
    if best_weights is not None:
        for w, value in zip(variables, best_weights, strict=True):
            w.assign(value)
    nll, se = evaluate(scored_s, "scored")
    result = dict(
        model=model, dataset=name, seed=seed, test_nll=nll, test_se=se, steps=steps_done,
        best_step=best_step, stopped=stopped, jit=jit, source=data["source"],
        train_seconds=round(train_s_time, 1), compile_seconds=round(compile_s, 1),
        ms_per_step=round(1000 * train_s_time / max(steps_done - 1, 1), 2),
        final_train_loss=float(np.mean(losses[-50:])) + log_scale if losses else None,
        valid_history=history, num_params=int(sum(np.prod(w.shape) for w in variables)),
    )
    if name == "funnel":
        result["true_nll"] = float(-np.mean(datasets.funnel_log_prob(data["scored"])))
    if conditional:
        result["outside_support"] = _outside_support(dist, data, num_flows, c_mean, c_std,
                                                     mean, std, seed)
    extra = (f", {100 * result['outside_support']:.1f}% of posterior draws outside the prior"
             if conditional else "")
    print(f"[{name}] {model}: NLL {nll:.3f} +- {se:.3f} "
          f"({steps_done} steps, best {best_step}, {stopped}, {train_s_time:.0f}s, "
          f"jit={jit}{extra})", flush=True)
    return result


def _outside_support(dist, data, num_flows, c_mean, c_std, mean, std, seed) -> float:
    """Fraction of posterior draws outside the prior's box `[-3, 3]^5` (SLCP).

    `SUPPORT_DRAWS` draws for each of the first `SUPPORT_OBSERVATIONS` scored
    observations, in the parameters' own units.
    """
    c = data["scored_c"][:SUPPORT_OBSERVATIONS]
    c = np.repeat(((c - c_mean) / c_std).astype(np.float32), SUPPORT_DRAWS, axis=0)

    @tf.function
    def draw(c):
        return dist.sample(tf.shape(c)[0], seed=seed,
                           bijector_kwargs=conditional_kwargs(num_flows, c))

    theta = draw(c).numpy() * std + mean
    if "box" in data:
        theta = data["box"].constrain(theta.astype(np.float32)).numpy()
    return float(np.mean(np.any(np.abs(theta) > datasets.SLCP_PRIOR_BOUND, axis=1)))


def _scale_pseudo_parameters(scale: float) -> None:
    """Diagnostic: every DSF/DDSF transformer reads `scale * params` from now on."""
    split = transformers._SigmoidalTransformer._split_params

    def scaled_split(self, params):
        return split(self, params * tf.constant(scale, params.dtype))

    transformers._SigmoidalTransformer._split_params = scaled_split


def _exp_slopes(knee: float = 7.0) -> None:
    """Diagnostic: slopes `a = min_slope + (1 - min_slope) exp(a_raw)` (`a = 1` at 0).

    Multiplicative learning of the slopes; beyond `a_raw = knee` the
    exponential continues along its tangent, so `a` never overflows.
    """
    def parts(a_raw, min_slope):
        dtype = a_raw.dtype
        c = tf.constant(knee, dtype)
        scale = tf.constant(1.0 - min_slope, dtype) * tf.exp(tf.minimum(a_raw, c))
        beyond = tf.where(a_raw > c, a_raw - c, tf.zeros_like(a_raw))
        return tf.constant(min_slope, dtype) + scale * (1.0 + beyond), scale

    transformers._slopes = lambda a_raw, min_slope: parts(a_raw, min_slope)[0]
    transformers._slopes_derivative = lambda a_raw, min_slope: parts(a_raw, min_slope)[1]


def _plain_softplus_slopes() -> None:
    """Diagnostic: `a = softplus(a_raw) + min_slope` (no shift to `a = 1` at 0), as pyro's DSF."""
    transformers._slope_shift = lambda min_slope, dtype: tf.constant(0.0, dtype)


def _group_scales(spec: str) -> None:
    """Diagnostic: per-group factors on the first layer's pseudo-parameters, `a=3,b=2,w=1`.

    Each group `p` is read as `p0 + S (p - p0)` with `p0` its value in
    `initial_params` (so the start's centres are kept): under Adam a
    learning-rate multiplier of `S` on that group (its random start grows by `S` too).
    """
    scales = {k: float(v) for k, v in (item.split("=") for item in spec.split(","))}
    split = transformers._SigmoidalTransformer._split_params

    def scaled_split(self, params):
        layers = split(self, params)
        a_raw, b, w, u = layers[0]
        k = self.num_units
        spread = NAF_KWARGS.get("initial_spread", DEFAULT_INITIAL_SPREAD)
        b0 = tf.constant(transformers.DeepSigmoidalFlow.initial_params(k, 1, spread)[k:2 * k],
                         b.dtype)
        a_raw = a_raw * scales.get("a", 1.0)
        b = b0 + (b - b0) * scales.get("b", 1.0)
        w = w * scales.get("w", 1.0)
        return [(a_raw, b, w, u)] + layers[1:]

    transformers._SigmoidalTransformer._split_params = scaled_split


def cell(runs: "list[dict]") -> str:
    """One seed: `nll ± SE over test points`; several: `mean ± SE over seeds (n)`."""
    values = np.array([r["test_nll"] for r in runs], np.float64)
    if len(values) == 1:
        return f"{values[0]:.3f} ± {runs[0]['test_se']:.3f}"
    if not np.all(np.isfinite(values)):
        return f"{np.mean(values):.3f} ({len(values)} seeds, some non-finite)"
    se = values.std(ddof=1) / np.sqrt(len(values))
    return f"{values.mean():.3f} ± {se:.3f} ({len(values)})"


def markdown(results: "list[dict]") -> str:
    models = list(dict.fromkeys(r["model"] for r in results))
    names = [n for n in DATASETS if any(r["dataset"] == n for r in results)]
    lines = ["| model | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for m in models:
        cells = []
        for n in names:
            runs = [r for r in results if r["model"] == m and r["dataset"] == n]
            cells.append(cell(runs) if runs else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("| bar | " + " | ".join(
        f"{BARS[n]:.3f}" if n in BARS else "" for n in names) + " |")
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
    parser.add_argument("--seeds", default="0",
                        help="comma list of training seeds (initialisation and batches; the "
                             "data are fixed); tables give mean ± SE over seeds")
    parser.add_argument("--evaluate-on", choices=("test", "validation"), default="test",
                        help="score on the test sets, or (to choose defaults) on sets "
                             "that are not the test sets")
    parser.add_argument("--output-init-scale", type=float, default=None,
                        help="diagnostic: scale of the NAF MADEs' initial output layer "
                             f"(library default {conditioners.OUTPUT_INIT_SCALE:g})")
    parser.add_argument("--param-scale", type=float, default=None,
                        help="diagnostic: multiply the NAF's pseudo-parameters by this before "
                             "the transformer (under Adam, a learning-rate multiplier on them)")
    parser.add_argument("--slopes", choices=("softplus", "exp", "plain-softplus"),
                        default="softplus",
                        help="diagnostic: the slopes' map; softplus shifted to a = 1 at "
                             "a_raw = 0 (the library's), a = min_slope + (1 - min_slope) "
                             "exp(a_raw), or pyro's unshifted softplus")
    parser.add_argument("--min-slope", type=float, default=None,
                        help="diagnostic: the NAFs' min_slope "
                             f"(library default {transformers.DEFAULT_MIN_SLOPE:g})")
    parser.add_argument("--initial-spread", type=float, default=None,
                        help="diagnostic: the NAFs' initial_spread (library default "
                             f"{DEFAULT_INITIAL_SPREAD:g})")
    parser.add_argument("--first-spread", type=float, default=None,
                        help="diagnostic: the NAFs' first_spread, the first dimension's "
                             f"initial spread (library default {DEFAULT_FIRST_SPREAD:g})")
    parser.add_argument("--activation", default=None,
                        help="diagnostic: the NAF MADEs' hidden activation (library default relu)")
    parser.add_argument("--group-scales", default=None,
                        help="diagnostic: factors on the first layer's pseudo-parameter "
                             "groups, e.g. a=3,b=1,w=1 (a learning-rate multiplier per group)")
    parser.add_argument("--base-rate", type=float, default=None,
                        help="diagnostic: the NAFs' base_rate, the learning-rate factor of "
                             "their unconditioned base parameters (library default "
                             f"{DEFAULT_BASE_RATE:g}; 0: none)")
    parser.add_argument("--hidden-bias-scale", type=float, default=None,
                        help="diagnostic: scale of the flow-built MADEs' initial first-layer "
                             "biases, U(-s, s) / sqrt(fan_in), conditional flows' too (library "
                             f"default {conditioners.HIDDEN_BIAS_SCALE:g}, conditional "
                             f"{conditioners.CONDITIONAL_HIDDEN_BIAS_SCALE:g})")
    parser.add_argument("--hidden-bias-fraction", type=float, default=None,
                        help="diagnostic: fraction of the first layer's units whose biases "
                             "are spread, interleaved (library default "
                             f"{conditioners.HIDDEN_BIAS_FRACTION:g})")
    parser.add_argument("--threads", type=int, default=None,
                        help="TensorFlow intra- and inter-op threads (the independent "
                             "harness used 1)")
    parser.add_argument("--slope-knee", type=float, default=7.0,
                        help="diagnostic, with --slopes exp: a_raw beyond which the slopes "
                             "grow linearly")
    parser.add_argument("--support", action="store_true",
                        help="conditional tasks: model the parameters through the prior box's "
                             "logit (tfp_naf.support, as NAFDensityModel(support=...))")
    args = parser.parse_args(argv)
    tf.get_logger().setLevel("ERROR")
    if args.threads is not None:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    if args.group_scales is not None:
        _group_scales(args.group_scales)
    if args.base_rate is not None:
        NAF_KWARGS["base_rate"] = args.base_rate
    if args.activation is not None:
        NAF_KWARGS["activation"] = args.activation
    if args.initial_spread is not None:
        NAF_KWARGS["initial_spread"] = args.initial_spread
    if args.first_spread is not None:
        NAF_KWARGS["first_spread"] = args.first_spread
    if args.slopes == "exp":
        _exp_slopes(args.slope_knee)
    elif args.slopes == "plain-softplus":
        _plain_softplus_slopes()
    if args.min_slope is not None:
        NAF_KWARGS["min_slope"] = args.min_slope
    if args.output_init_scale is not None:
        conditioners.OUTPUT_INIT_SCALE = args.output_init_scale
    if args.hidden_bias_scale is not None:
        conditioners.HIDDEN_BIAS_SCALE = args.hidden_bias_scale
        conditioners.CONDITIONAL_HIDDEN_BIAS_SCALE = args.hidden_bias_scale
    if args.hidden_bias_fraction is not None:
        conditioners.HIDDEN_BIAS_FRACTION = args.hidden_bias_fraction
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
        if args.support and name in CONDITIONAL:
            bound = datasets.SLCP_PRIOR_BOUND
            data = with_support(data, (-bound, bound))
        run_models = list(models)
        if args.context:
            run_models += [m for m in CONTEXT_MODELS.get(name, ()) if m not in run_models]
        if name in CONDITIONAL:
            run_models = [m for m in run_models if m.startswith("naf")]
        for seed in [int(v) for v in args.seeds.split(",") if v.strip()]:
            for model in run_models:
                results.append(run_one(model, name, data, args.fast, seed=seed,
                                       max_minutes=args.max_minutes))
                results[-1]["scored_on"] = args.evaluate_on  # "test_nll" is on this set.
                (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1))
                (RESULTS / f"{stem}.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
