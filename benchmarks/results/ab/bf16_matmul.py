"""Throwaway: one MADE output layer's matmuls (forward and backward), float32 vs bfloat16."""

import time

import numpy as np
import tensorflow as tf

tf.config.threading.set_intra_op_parallelism_threads(2)
a = tf.Variable(tf.random.normal([512, 128]))
w = tf.Variable(tf.random.normal([128, 2064]))
g = tf.Variable(tf.random.normal([512, 2064]))


def step(dtype):
    @tf.function(jit_compile=False)
    def f():
        aa, ww, gg = tf.cast(a, dtype), tf.cast(w, dtype), tf.cast(g, dtype)
        out = tf.matmul(aa, ww)
        grad_a = tf.matmul(gg, ww, transpose_b=True)
        grad_w = tf.matmul(aa, gg, transpose_a=True)
        return sum(tf.reduce_sum(tf.cast(t, tf.float32)) for t in (out, grad_a, grad_w))

    return f


fs = {"fp32": step(tf.float32), "bf16": step(tf.bfloat16)}
for f in fs.values():
    f()
times = {k: [] for k in fs}
for _ in range(30):
    for k, f in fs.items():
        start = time.perf_counter()
        f().numpy()
        times[k].append(time.perf_counter() - start)
for k, v in times.items():
    print(k, 1e3 * np.median(v), "ms")
