"""Throwaway A/B: DSF's first layer with the units' axis last (the library's layout) or first.

At `log_prob`'s size (`[4096, 43]` inputs, 16 units): the library's forward (`lib`), the same
math written here with the units last (`kmin`), with the units first on parameters already
stored that way (`kmaj`, as if the MADE emitted `[P, N, D]`), and with the transpose inside
(`kmaj_t`). Forward only; prints the summed outputs, then medians (ms) of 11 round-robin
calls. Run from the repository root: `PYTHONPATH=. python benchmarks/results/ab/units_axis.py`.
"""

import functools

import numpy as np
import tensorflow as tf

from benchmarks.speed import round_robin_times
from tfp_naf.transformers import DeepSigmoidalFlow

N, D, K = 4096, 43, 16
rng = np.random.default_rng(0)
x = tf.Variable(rng.normal(size=[N, D]).astype("float32"))
theta = tf.Variable(0.5 * rng.normal(size=[N, D, 3 * K]).astype("float32"))
theta_first = tf.Variable(tf.transpose(tf.reshape(theta, [N, D, 3, K]), [2, 3, 0, 1]))


def lib(x, theta):
    y, log_deriv = DeepSigmoidalFlow(theta, num_units=K).forward_and_log_derivative(x)
    return tf.reduce_sum(y) + tf.reduce_sum(log_deriv)


def layer(x, a_raw, b, w, axis):
    """DSF's first layer (the library's arithmetic), reducing over the units' `axis`."""
    a = tf.math.softplus(a_raw + 0.5413) + 1e-3
    ew = tf.exp(w - tf.reduce_max(w, axis=axis, keepdims=True))
    inv = 1.0 / tf.reduce_sum(ew, axis=axis, keepdims=True)
    z = a * x + b
    sig, sig_neg = tf.sigmoid(z), tf.sigmoid(-z)
    abs_z = tf.abs(z)
    m = tf.reduce_min(abs_z, axis=axis, keepdims=True)
    q = tf.exp(m - abs_z) * tf.square(tf.maximum(sig, sig_neg))

    def mix(v):
        return tf.reduce_sum(ew * v, axis=axis, keepdims=True) * inv

    s, s_neg = (1 - 1e-6) * mix(sig) + 5e-7, (1 - 1e-6) * mix(sig_neg) + 5e-7
    log_s, log_s_neg = tf.math.log(s), tf.math.log(s_neg)
    log_deriv = -log_s - log_s_neg - m + tf.math.log(tf.maximum(mix(a * q), 1e-37))
    return tf.reduce_sum(log_s - log_s_neg) + tf.reduce_sum(log_deriv)


def units_first(x, theta_first):
    return layer(x[None], theta_first[0], theta_first[1], theta_first[2], 0)


def units_last(x, theta):
    t = tf.reshape(theta, [N, D, 3, K])
    return layer(x[..., None], t[:, :, 0], t[:, :, 1], t[:, :, 2], -1)


def units_first_transposed(x, theta):
    t = tf.transpose(tf.reshape(theta, [N, D, 3, K]), [2, 3, 0, 1])
    return layer(x[None], t[0], t[1], t[2], 0)


variants = (("lib", lib, theta), ("kmin", units_last, theta),
            ("kmaj", units_first, theta_first), ("kmaj_t", units_first_transposed, theta))
cases = {}
for jit in (False, True):
    for name, fn, arg in variants:
        compiled = tf.function(fn, jit_compile=jit)
        cases[f"{name}_{'xla' if jit else 'tf'}"] = functools.partial(compiled, x, arg)
print({name: float(call()) for name, call in cases.items()})
for call in cases.values():
    call()
times = round_robin_times(cases, 11)
print({name: f"{1e3 * np.median(t):.2f}" for name, t in times.items()})
