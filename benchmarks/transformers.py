"""Microbenchmark: one DSF / DDSF transformer layer alone, forward and forward+backward.

The transformer at fixed pseudo-parameters `theta` (`[B, D, P]`, a variable so
the backward pass has something to differentiate), B=256, D=43, K=16 (DDSF: 2
layers), float32, in `tf.function` and with `jit_compile=True`. The
forward+backward pass runs twice: with the library's closed-form gradient of
the first sigmoidal layer (`tf.custom_gradient`) and with autodiff through the
same forward ops, so the two can be compared. All variants are timed
round-robin in one process, 30 rounds after 2 warm-ups, and the medians
reported: a noisy shared machine then slows every variant alike.

    python -m benchmarks.transformers
"""

from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf

from benchmarks.speed import round_robin_seconds
from tfp_naf import DeepDenseSigmoidalFlow, DeepSigmoidalFlow, transformers

B, D, K = 256, 43, 16
ROUNDS = 30


@contextlib.contextmanager
def _autodiff_first_layer():
    """The first sigmoidal layer differentiated by autodiff instead of its closed form."""
    closed_form = transformers._first_sigmoidal_layer
    transformers._first_sigmoidal_layer = (
        lambda *args, **kwargs: transformers._first_layer_parts(*args, **kwargs)[:2]
    )
    try:
        yield
    finally:
        transformers._first_sigmoidal_layer = closed_form


def _functions(transformer, x, theta):
    """Name -> compiled function (traced here, in the right gradient mode)."""

    def forward():
        return transformer.forward_and_log_derivative(x, theta)

    def forward_backward():
        with tf.GradientTape() as tape:
            y, log_deriv = transformer.forward_and_log_derivative(x, theta)
            loss = tf.reduce_sum(y) + tf.reduce_sum(log_deriv)
        return tape.gradient(loss, theta)

    fns = {}
    for jit in (False, True):
        mode = "jit_compile" if jit else "tf.function"
        fns[("forward", mode)] = tf.function(forward, jit_compile=jit)
        fns[("forward+backward", mode)] = tf.function(forward_backward, jit_compile=jit)
        with _autodiff_first_layer():
            fn = tf.function(forward_backward, jit_compile=jit)
            fn()  # Traced now, while the first layer is differentiated by autodiff.
        fns[("forward+backward, autodiff gradient", mode)] = fn
    return fns


def _round_robin_ms(fns: dict) -> dict:
    for fn in fns.values():
        for _ in range(2):
            fn()
    return {name: 1e3 * t for name, t in round_robin_seconds(fns, ROUNDS).items()}


def main() -> None:
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=[B, D]).astype("float32"))
    print("| transformer | params/dim | pass | tf.function (ms) | jit_compile (ms) |")
    print("|---|---|---|---|---|")
    for cls, p in ((DeepSigmoidalFlow, DeepSigmoidalFlow.num_params(K)),
                   (DeepDenseSigmoidalFlow, DeepDenseSigmoidalFlow.num_params(K, 2))):
        theta = tf.Variable(0.3 * rng.normal(size=[B, D, p]).astype("float32"))
        transformer = cls(params=tf.zeros([p]), num_units=K)
        ms = _round_robin_ms(_functions(transformer, x, theta))
        for name in ("forward", "forward+backward", "forward+backward, autodiff gradient"):
            print(f"| {cls.__name__} | {p} | {name} | {ms[(name, 'tf.function')]:.1f} | "
                  f"{ms[(name, 'jit_compile')]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
