"""Microbenchmark: one DSF / DDSF transformer layer alone, against its floor.

The transformer at fixed pseudo-parameters `theta` (`[B, D, P]`, a variable so
the backward pass has something to differentiate), B=256, D=43, K=16 (DDSF and
the shared-mixing DDSF: 2 layers), float32, in `tf.function` and with `jit_compile=True`. The
forward+backward pass runs twice: with the library's closed-form gradient of
the first sigmoidal layer (`tf.custom_gradient`) and with autodiff through the
same forward ops, so the two can be compared.

The floor: the transcendental evaluations the pass needs per unit (one
sigmoid of one dimension of one batch member, `B * D * K` units per layer),
counted in `TRANSCENDENTALS`, at the measured cost of one `tf.exp` /
`tf.math.log1p` / `tf.math.reciprocal` per element of a `[B, D, K]` tensor
(the time of a chain of 16 less a chain of 8, divided by 8), plus one bare
call. It is what the pass would cost if everything but those evaluations
were free; `pass / floor` is its distance from it.

All variants and floors are timed round-robin in one process, 30 rounds after
2 warm-ups, and the medians reported: a noisy shared machine then slows every
variant alike.

    python -m benchmarks.transformers
"""

from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf

from benchmarks.speed import round_robin_seconds
from tfp_naf import DeepDenseSigmoidalFlow, DeepSigmoidalFlow, transformers
from tfp_naf.shared_mixing import SharedDenseSigmoidalFlow

B, D, K = 256, 43, 16
ROUNDS = 30

# Transcendental evaluations per unit that one DSF layer needs at least (see
# `transformers._first_layer_parts` and `_first_layer_gradients`): forward,
# softplus of the slope (exp, log1p), softmax of the mixing logits (exp), the
# sigmoid pair from one exp(-|z|) (exp, reciprocal); backward, softplus' =
# sigmoid (exp, reciprocal). Per-row terms (log s', log(1 - s'), ...) are
# K times rarer and not counted. The layer itself evaluates two sigmoids and
# exp(m - |z|) for the pair (fewer passes over memory, which cost more here),
# so the floor is what the pass would cost with the fewest evaluations.
TRANSCENDENTALS = {
    "forward": {"exp": 3, "log1p": 1, "reciprocal": 1},
    "forward+backward": {"exp": 4, "log1p": 1, "reciprocal": 2},
}
CHAIN = 8  # Evaluations per element in one timed chain of an operation.
_OPS = {
    "exp": lambda v: tf.exp(-tf.abs(v)),
    "log1p": lambda v: tf.math.log1p(tf.abs(v)),
    "reciprocal": lambda v: tf.math.reciprocal(1.0 + tf.abs(v)),
}


def op_chain(t: tf.Tensor, op: str, n: int) -> tf.Tensor:
    """`n` evaluations of `op` per element of `t`, chained, summed over the last axis.

    Each evaluation feeds the next, so none can be skipped. The cost of one
    evaluation is the difference between chains of `2 CHAIN` and `CHAIN`
    (the same call, read and reduction around both).
    """
    v = t
    for _ in range(n):
        v = _OPS[op](v)
    return tf.reduce_sum(v, axis=-1)


def chain(t: tf.Tensor, counts: dict) -> tf.Tensor:
    """The evaluations `counts` per element of `t`, in one chain, summed over the last axis.

    The flow-level floors of `benchmarks.speed` use this (next to the
    conditioners' own pass) for each transformer layer.
    """
    v = t
    for op, n in counts.items():
        for _ in range(n):
            v = _OPS[op](v)
    return tf.reduce_sum(v, axis=-1)


def per_evaluation_ms(ms: dict, mode: str) -> dict:
    """Milliseconds per evaluation of each op on the whole `[B, D, K]` tensor."""
    return {op: max(ms[("op", op, 2 * CHAIN, mode)] - ms[("op", op, CHAIN, mode)], 0.0) / CHAIN
            for op in _OPS}


def floors_ms(ms: dict, mode: str) -> dict:
    """Floor (ms) of each pass: its counted evaluations at their measured cost.

    Plus one bare call (a chain's time less its evaluations: the call, the
    read of the input and the sum), which every pass pays too.
    """
    per_eval = per_evaluation_ms(ms, mode)
    bare = min(ms[("op", op, CHAIN, mode)] - CHAIN * per_eval[op] for op in _OPS)
    return {name: bare + sum(n * per_eval[op] for op, n in counts.items())
            for name, counts in TRANSCENDENTALS.items()}


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


def _op_functions(units: tf.Tensor) -> dict:
    fns = {}
    for jit in (False, True):
        mode = "jit_compile" if jit else "tf.function"
        for op in _OPS:
            for n in (CHAIN, 2 * CHAIN):
                fns[("op", op, n, mode)] = tf.function(
                    lambda op=op, n=n: op_chain(units, op, n), jit_compile=jit)
    return fns


def _round_robin_ms(fns: dict) -> dict:
    for fn in fns.values():
        for _ in range(2):
            fn()
    return {name: 1e3 * t for name, t in round_robin_seconds(fns, ROUNDS).items()}


def main() -> None:
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=[B, D]).astype("float32"))
    units = tf.Variable(rng.normal(size=[B, D, K]).astype("float32"))
    fns = _op_functions(units)
    models = {}
    shared_mixing = tf.Variable(0.3 * rng.normal(
        size=[SharedDenseSigmoidalFlow.num_mixing_params(K, 2)]).astype("float32"))
    for cls, p in ((DeepSigmoidalFlow, DeepSigmoidalFlow.num_params(K)),
                   (DeepDenseSigmoidalFlow, DeepDenseSigmoidalFlow.num_params(K, 2)),
                   (SharedDenseSigmoidalFlow, SharedDenseSigmoidalFlow.num_params(K, 2))):
        theta = tf.Variable(0.3 * rng.normal(size=[B, D, p]).astype("float32"))
        extra = {"mixing_logits": shared_mixing} if cls is SharedDenseSigmoidalFlow else {}
        transformer = cls(params=tf.zeros([p]), num_units=K, **extra)
        models[cls.__name__] = p
        fns.update({(cls.__name__, *key): fn
                    for key, fn in _functions(transformer, x, theta).items()})
    ms = _round_robin_ms(fns)
    modes = ("tf.function", "jit_compile")
    floors = {m: floors_ms(ms, m) for m in modes}
    print(f"Floor (B={B}, D={D}, K={K}; transcendental evaluations per unit: "
          + "; ".join(f"{n}: " + ", ".join(f"{v} {k}" for k, v in c.items())
                      for n, c in TRANSCENDENTALS.items()) + ")\n")
    print("| operation on [B, D, K] | tf.function (ms) | jit_compile (ms) |")
    print("|---|---|---|")
    per_eval = {m: per_evaluation_ms(ms, m) for m in modes}
    for op in _OPS:
        print(f"| one {op} per element | "
              + " | ".join(f"{per_eval[m][op]:.3f}" for m in modes) + " |")
    for name in TRANSCENDENTALS:
        print(f"| floor of one layer's {name} | "
              + " | ".join(f"{floors[m][name]:.2f}" for m in modes) + " |")
    print()
    print("| transformer | params/dim | pass | tf.function (ms) | jit_compile (ms) "
          "| / floor (tf.function) | / floor (jit_compile) |")
    print("|---|---|---|---|---|---|---|")
    for model, p in models.items():
        layers = 1 if model == "DeepSigmoidalFlow" else 2
        for name in ("forward", "forward+backward", "forward+backward, autodiff gradient"):
            floor = "forward" if name == "forward" else "forward+backward"
            cells = [f"{ms[(model, name, m)]:.2f}" for m in modes]
            # DDSF: against the floor of as many DSF layers (its own count is larger).
            ratios = [f"{ms[(model, name, m)] / (layers * floors[m][floor]):.1f}" for m in modes]
            print(f"| {model} | {p} | {name} | " + " | ".join(cells + ratios) + " |", flush=True)


if __name__ == "__main__":
    main()
