# ruff: noqa
import os, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np, tensorflow as tf
if sys.argv[1] != "default":
    tf.config.threading.set_inter_op_parallelism_threads(int(sys.argv[1]))
tf.config.threading.set_intra_op_parallelism_threads(2)
from benchmarks import speed
calls = {}
for model in ("naf-dsf", "maf"):
    ops, *_ = speed._operations(model)
    for jit in (False, True):
        for op in ("train_step", "log_prob"):
            fn, arg = ops[op]
            f = tf.function(fn, jit_compile=jit); f(arg); f(arg)
            calls[(model, jit, op)] = (f, arg)
ts = {k: [] for k in calls}
for r in range(11):
    for k, (f, a) in calls.items():
        t0 = time.perf_counter(); f(a).numpy(); ts[k].append(time.perf_counter() - t0)
for jit in (False, True):
    for op in ("train_step", "log_prob"):
        n, m = np.array(ts[("naf-dsf", jit, op)]), np.array(ts[("maf", jit, op)])
        print(f"inter_op={sys.argv[1]} {'XLA' if jit else 'tf.function'} {op}: naf {1e3*np.median(n):.1f} maf {1e3*np.median(m):.1f} ratio {np.median(n)/np.median(m):.2f} (per-round q {np.quantile(n/m,.25):.2f}-{np.quantile(n/m,.75):.2f})")
