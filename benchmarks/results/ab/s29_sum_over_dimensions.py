# ruff: noqa
import os, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np, tensorflow as tf
from benchmarks import speed
from tfp_naf import flow
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 11
ops, dist, *_ = speed._operations("naf-dsf")
calls = {}
for jit in (False, True):
    for mode in (False, True):
        flow._SUM_BY_DOT = mode
        for op in ("train_step", "log_prob"):
            fn, arg = ops[op]
            f = tf.function(fn, jit_compile=jit)
            f(arg); f(arg)
            calls[(jit, op, mode)] = (f, arg)
lp = {k: v[0](v[1]).numpy() for k, v in calls.items() if k[1] == "log_prob"}
print("max |log_prob dot - sum| tf.function", np.abs(lp[(False, "log_prob", True)] - lp[(False, "log_prob", False)]).max(),
      "xla", np.abs(lp[(True, "log_prob", True)] - lp[(True, "log_prob", False)]).max())
ts = {k: [] for k in calls}
for r in range(rounds):
    for k, (f, a) in calls.items():
        t0 = time.perf_counter(); f(a).numpy(); ts[k].append(time.perf_counter() - t0)
for jit in (False, True):
    for op in ("train_step", "log_prob"):
        new, old = np.array(ts[(jit, op, True)]), np.array(ts[(jit, op, False)])
        r = new / old
        print(f"{'XLA' if jit else 'tf.function'} {op}: sum {1e3*np.median(old):.1f} ms, dot {1e3*np.median(new):.1f} ms, ratio {np.median(r):.3f} ({np.quantile(r,.25):.3f}-{np.quantile(r,.75):.3f})")
