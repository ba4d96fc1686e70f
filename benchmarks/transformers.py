"""Microbenchmark: one DSF / DDSF transformer layer alone, forward and forward+backward.

The transformer at fixed pseudo-parameters `theta` (`[B, D, P]`, a variable so
the backward pass has something to differentiate), B=256, D=43, K=16 (DDSF: 2
layers), float32; medians of 10 calls after 2 warm-ups, in `tf.function` and
with `jit_compile=True`.

    python -m benchmarks.transformers
"""

from __future__ import annotations

import time

import numpy as np
import tensorflow as tf

from tfp_naf import DeepDenseSigmoidalFlow, DeepSigmoidalFlow

B, D, K = 256, 43, 16


def _median_ms(fn, repeats: int = 10) -> float:
    for _ in range(2):
        tf.nest.map_structure(lambda t: t.numpy(), fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy(), fn())
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main() -> None:
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=[B, D]).astype("float32"))
    print("| transformer | params/dim | pass | tf.function (ms) | jit_compile (ms) |")
    print("|---|---|---|---|---|")
    for cls, p in ((DeepSigmoidalFlow, DeepSigmoidalFlow.num_params(K)),
                   (DeepDenseSigmoidalFlow, DeepDenseSigmoidalFlow.num_params(K, 2))):
        theta = tf.Variable(0.3 * rng.normal(size=[B, D, p]).astype("float32"))
        transformer = cls(params=tf.zeros([p]), num_units=K)

        def forward(transformer=transformer, theta=theta):
            return transformer.forward_and_log_derivative(x, theta)

        def forward_backward(transformer=transformer, theta=theta):
            with tf.GradientTape() as tape:
                y, log_deriv = transformer.forward_and_log_derivative(x, theta)
                loss = tf.reduce_sum(y) + tf.reduce_sum(log_deriv)
            return tape.gradient(loss, theta)

        for name, fn in (("forward", forward), ("forward+backward", forward_backward)):
            ms = [_median_ms(tf.function(fn, jit_compile=jit)) for jit in (False, True)]
            print(f"| {cls.__name__} | {p} | {name} | {ms[0]:.1f} | {ms[1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
