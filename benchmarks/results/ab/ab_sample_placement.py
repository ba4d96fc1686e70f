"""Throwaway A/B: sampling with the one-hot vs the transposed scatter placement (same process).

Needs `transposed_head.diff` applied to the snapshot it runs from.
"""

import sys
import time

import numpy as np
import tensorflow as tf

from benchmarks import speed
from tfp_naf import conditioners

tf.config.threading.set_intra_op_parallelism_threads(2)
tf.config.threading.set_inter_op_parallelism_threads(1)
models = sys.argv[1].split(",")
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 15
cases = {}
for model in models:
    ops = speed._operations(model)[0]
    fn, z = ops["sample"]
    for variant in ("onehot", "scatter"):
        for jit in (False, True):
            conditioners._TRANSPOSED = variant == "scatter"
            conditioners._INCREMENTAL.clear()
            f = tf.function(lambda z, fn=fn: fn(z), jit_compile=jit)
            cases[(model, variant, jit)] = (f, z, f(z).numpy())
    for jit in (False, True):
        a, b = cases[(model, "onehot", jit)][2], cases[(model, "scatter", jit)][2]
        mode = "jit" if jit else "tf.function"
        print(model, mode, "max |diff|", float(np.max(np.abs(a - b))), flush=True)
times = {k: [] for k in cases}
for _ in range(rounds):
    for k, (f, z, _) in cases.items():
        start = time.perf_counter()
        f(z).numpy()
        times[k].append(time.perf_counter() - start)
for model in models:
    for jit in (False, True):
        a = np.array(times[(model, "onehot", jit)])
        b = np.array(times[(model, "scatter", jit)])
        r = b / a
        print(f"{model} {'XLA' if jit else 'tf.function'}: onehot {1e3 * np.median(a):.1f} ms, "
              f"scatter {1e3 * np.median(b):.1f} ms, ratio median {np.median(r):.3f} "
              f"(quartiles {np.quantile(r, .25):.3f}-{np.quantile(r, .75):.3f})", flush=True)
