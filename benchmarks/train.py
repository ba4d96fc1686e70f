"""Training and evaluation shared by the benchmarks: compiled steps, NLL."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras

__all__ = ["compile_step", "make_train_step", "nll_stats"]


def make_train_step(dist, learning_rate: float = 1e-3, clip_norm: float = 5.0,
                    log_prob_fn=None):
    """`(step, optimizer)`: `step(x)` does loss, gradients, clipping, Adam update.

    The loss is `-mean(log_prob_fn(x))`, by default `dist.log_prob`.
    """
    optimizer = tf_keras.optimizers.Adam(learning_rate)
    variables = dist.trainable_variables
    optimizer.build(variables)  # Slots exist before any (XLA) tracing.
    log_prob_fn = dist.log_prob if log_prob_fn is None else log_prob_fn

    def step(x):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(log_prob_fn(x))
        grads = tape.gradient(loss, variables)
        grads, _ = tf.clip_by_global_norm(grads, clip_norm)
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        return loss

    return step, optimizer


def compile_step(fn, example, jit: bool = True):
    """`(compiled_fn, used_jit)`: jit-compiled if XLA accepts it, else tf.function.

    `fn` is traced and run once on `example` to check it compiles; a function
    with side effects (a training step) therefore takes one step here.
    """
    if jit:
        try:
            compiled = tf.function(fn, jit_compile=True)
            compiled(example)
            return compiled, True
        except Exception as err:  # XLA rejected an op: fall back.
            print(f"  jit_compile failed ({type(err).__name__}: {str(err)[:200]}); "
                  "using tf.function")
    compiled = tf.function(fn)
    compiled(example)
    return compiled, False


def nll_stats(log_prob_fn, data: np.ndarray, batch: int = 1024,
              offset: "np.ndarray | None" = None) -> "tuple[float, float]":
    """Mean and standard error of `-log_prob` over `data` (plus a per-row `offset`)."""
    values = []
    for start in range(0, len(data), batch):
        chunk = data[start : start + batch]
        if len(chunk) < batch:  # Pad so the compiled function sees one shape.
            pad = np.repeat(chunk[-1:], batch - len(chunk), axis=0)
            values.append(-log_prob_fn(np.concatenate([chunk, pad]))[: len(chunk)].numpy())
        else:
            values.append(-log_prob_fn(chunk).numpy())
    nll = np.concatenate(values).astype(np.float64)
    if offset is not None:
        nll = nll + offset
    return float(nll.mean()), float(nll.std(ddof=1) / np.sqrt(len(nll)))
