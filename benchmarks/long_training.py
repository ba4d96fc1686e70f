"""Long, aggressive training: does NAF-DSF stay finite for 20,000 Adam steps?

Trains `tfp_naf.keras.make_flow(2)` -- the library defaults: 5 NAF-DSF flows
with reversals between them, MADE hidden units [64, 64], 16 sigmoid units --
on the checkerboard by maximum likelihood, with a deliberately *high* learning
rate and none of the usual stabilisers:

* Adam with learning rate 1e-2 (default). 1e-3 is the customary rate for
  flows; 1e-2 is ten times that, and is what a user who wants results quickly
  tries first. No gradient clipping, no learning-rate decay, no weight decay.
* Raw data (the checkerboard spans [-4, 4]^2): no standardisation.
* A fresh batch of 256 points every step (infinite data, so a rising test NLL
  means instability, not overfitting).

Every step checks the loss and every gradient for NaN/inf (inside the compiled
step, at no extra pass). Gradients are applied as computed, as a plain training
loop would; the run stops early only once the *variables* are non-finite
(after which nothing can recover). The report gives the first step with a
non-finite loss or gradient (None if none), the largest gradient norm seen, the
training loss over time, and the final NLL on 50,000 held-out points (the true
density has NLL log(32) = 3.466).

    python -m benchmarks.long_training                 # 20,000 steps
    python -m benchmarks.long_training --steps 500     # a quick look

Writes `benchmarks/results/long_training.json` and `.md` (rewritten at every
log line, so a run that is still going or was killed leaves its progress).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras

import tfp_naf
from tfp_naf import datasets
from tfp_naf.keras import make_flow

RESULTS = Path(__file__).resolve().parent / "results"
TRUE_NLL = math.log(32.0)  # Uniform on 8 squares of area 4.


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--test-size", type=int, default=50000)
    parser.add_argument("--log-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "long_training")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.log_every < 1:
        parser.error("--steps, --batch-size and --log-every must be >= 1")
    return args


def make_step(flow, optimizer):
    """A compiled step returning (loss, all gradients finite, global gradient norm)."""
    variables = flow.trainable_variables

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(flow.log_prob(x))
        grads = tape.gradient(loss, variables)
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
        norm = tf.linalg.global_norm(grads)
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        return loss, finite, norm

    return step


def dump_state(path: Path, flow, x: np.ndarray) -> None:
    """Saves the batch and the variables (after the update) for a post-mortem."""
    arrays = {f"var_{i}": v.numpy() for i, v in enumerate(flow.trainable_variables)}
    np.savez(path, batch=x, **arrays)


def test_nll(flow, data: np.ndarray, batch: int = 5000) -> "tuple[float, float, int]":
    """Mean and standard error of -log p over the finite values, and the non-finite count."""
    log_prob = tf.function(flow.log_prob)
    values = np.concatenate(
        [log_prob(data[i : i + batch]).numpy() for i in range(0, len(data), batch)]
    ).astype(np.float64)
    finite = np.isfinite(values)
    nll = -values[finite]
    if not len(nll):
        return float("nan"), float("nan"), int((~finite).sum())
    return float(nll.mean()), float(nll.std(ddof=1) / np.sqrt(len(nll))), int((~finite).sum())


def write_report(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    cfg = result["config"]
    lines = [
        "# Long training: NAF-DSF, library defaults, high learning rate",
        "",
        f"Status: **{result['status']}** after {result['steps_done']} of {cfg['steps']} steps "
        f"({result['wall_seconds']:.0f} s, {result['steps_per_second']:.1f} steps/s).",
        "",
        f"- Model: `make_flow(2)` = {cfg['num_flows']} NAF-DSF flows with reversals, "
        f"hidden {cfg['hidden_units']}, {cfg['num_units']} units "
        f"({cfg['num_variables']} weights).",
        f"- Training: checkerboard, fresh batch of {cfg['batch_size']} per step, "
        f"Adam(learning_rate={cfg['learning_rate']:g}), no clipping, no standardisation.",
        f"- First step with a non-finite loss: {result['first_nonfinite_loss_step']}",
        f"- First step with a non-finite gradient: {result['first_nonfinite_grad_step']}",
        f"- Largest global gradient norm: {result['max_grad_norm']:.4g} "
        f"(at step {result['max_grad_norm_step']})",
        f"- Final test NLL ({cfg['test_size']} points): "
        + (
            f"{result['test_nll']:.4f} +- {result['test_nll_stderr']:.4f}"
            if result.get("test_nll") is not None
            else "not measured yet"
        )
        + f" (true density: {TRUE_NLL:.4f}); non-finite test log-probs: "
        f"{result.get('test_nonfinite', 'n/a')}",
        "",
        "| step | mean train loss | max grad norm | all finite |",
        "|---:|---:|---:|:---:|",
    ]
    for row in result["log"]:
        lines.append(
            f"| {row['step']} | {row['mean_loss']:.4f} | {row['max_grad_norm']:.4g} | "
            f"{'yes' if row['finite'] else 'NO'} |"
        )
    lines += ["", f"Command: `{result['command']}`", f"Machine: {result['machine']}", ""]
    path.with_suffix(".md").write_text("\n".join(lines))


def main(argv=None) -> dict:
    args = parse_args(argv)
    tf.random.set_seed(args.seed)
    flow = make_flow(2)
    optimizer = tf_keras.optimizers.Adam(args.learning_rate)
    optimizer.build(flow.trainable_variables)
    step = make_step(flow, optimizer)
    cfg = dict(
        steps=args.steps, learning_rate=args.learning_rate, batch_size=args.batch_size,
        test_size=args.test_size, seed=args.seed, num_flows=5, hidden_units=[64, 64],
        num_units=16, transformer="dsf",
        num_variables=int(sum(np.prod(v.shape) for v in flow.trainable_variables)),
    )
    result = dict(
        config=cfg, status="running", steps_done=0, wall_seconds=0.0, steps_per_second=0.0,
        first_nonfinite_loss_step=None, first_nonfinite_grad_step=None,
        first_nonfinite_variable_step=None, max_grad_norm=0.0, max_grad_norm_step=None,
        test_nll=None, test_nll_stderr=None, log=[],
        command="python -m benchmarks.long_training " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        machine=f"{platform.platform()}, {platform.processor() or 'cpu'}, "
        f"TF {tf.__version__}, tfp_naf {tfp_naf.__version__}",
    )
    rng = np.random.default_rng(args.seed)
    chunk = 200  # Batches generated at a time.
    window_losses, window_norm, window_finite = [], 0.0, True
    start = time.perf_counter()
    for i in range(args.steps):
        if i % chunk == 0:
            pool = datasets.make_toy(
                "checkerboard", chunk * args.batch_size, seed=int(rng.integers(2**31))
            ).reshape(chunk, args.batch_size, 2)
        loss, finite, norm = step(pool[i % chunk])
        loss, finite, norm = float(loss), bool(finite), float(norm)
        if not math.isfinite(loss) and result["first_nonfinite_loss_step"] is None:
            result["first_nonfinite_loss_step"] = i
        if not finite and result["first_nonfinite_grad_step"] is None:
            result["first_nonfinite_grad_step"] = i
            dump_state(args.out.with_name(args.out.name + "_nonfinite.npz"), flow, pool[i % chunk])
        if math.isfinite(norm) and norm > result["max_grad_norm"]:
            result["max_grad_norm"], result["max_grad_norm_step"] = norm, i
        window_losses.append(loss)
        window_norm = max(window_norm, norm) if math.isfinite(norm) else float("inf")
        window_finite &= finite and math.isfinite(loss)
        variables_finite = finite or all(
            np.isfinite(v.numpy()).all() for v in flow.trainable_variables
        )
        done = i + 1 == args.steps or not variables_finite
        if (i + 1) % args.log_every == 0 or done:
            elapsed = time.perf_counter() - start
            result["log"].append(dict(
                step=i + 1, mean_loss=float(np.mean(window_losses)),
                max_grad_norm=window_norm, finite=window_finite, seconds=round(elapsed, 1),
            ))
            result.update(steps_done=i + 1, wall_seconds=elapsed,
                          steps_per_second=(i + 1) / elapsed)
            print(f"step {i + 1:6d}  loss {np.mean(window_losses):8.4f}  "
                  f"max|g| {window_norm:9.4g}  finite {window_finite}  {elapsed:7.0f}s",
                  flush=True)
            window_losses, window_norm, window_finite = [], 0.0, True
            write_report(args.out, result)
        if not variables_finite:
            result["first_nonfinite_variable_step"] = i
            result["status"] = "diverged (non-finite variables)"
            break
    else:
        result["status"] = (
            "finite throughout"
            if result["first_nonfinite_loss_step"] is None
            and result["first_nonfinite_grad_step"] is None
            else "non-finite values seen, variables stayed finite"
        )
    test = datasets.make_toy("checkerboard", args.test_size, seed=10**6 + args.seed)
    nll, stderr, nonfinite = test_nll(flow, test)
    result.update(test_nll=nll, test_nll_stderr=stderr, test_nonfinite=nonfinite)
    write_report(args.out, result)
    print(f"{result['status']}; test NLL {nll:.4f} +- {stderr:.4f} "
          f"(true {TRUE_NLL:.4f}); written to {args.out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
