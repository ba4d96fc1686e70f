# ruff: noqa
import os, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np, tensorflow as tf
a = tf.Variable(tf.random.normal([512, 43, 16]) * 3)
N = 10
def f1(t): return tf.maximum(t, 0.) + tf.math.log1p(tf.exp(-tf.abs(t)))
def f2(t): return tf.maximum(t, 0.) + tf.math.log(1. + tf.exp(-tf.abs(t)))
def f3(t): return tf.where(t > 15., t, tf.math.log(1. + tf.exp(tf.minimum(t, 15.))))
def f4(t):  # Goldberg log1p
    e = tf.exp(-tf.abs(t)); u = 1. + e
    return tf.maximum(t, 0.) + tf.where(u == 1., e, tf.math.log(u) * e / (u - 1.))
cases = {"add_only": lambda t: t, "softplus": tf.math.softplus, "f1": f1, "f2": f2, "f3": f3, "f4": f4, "exp": tf.exp, "log": lambda t: tf.math.log(tf.abs(t)), "log1p": lambda t: tf.math.log1p(tf.abs(t))}
for jit in (False, True):
    fs = {k: tf.function(lambda v=v: tf.add_n([tf.reduce_sum(v(a + float(i))) for i in range(N)]), jit_compile=jit) for k, v in cases.items()}
    for f in fs.values(): f(); f()
    ts = {k: [] for k in fs}
    for r in range(15):
        for k, f in fs.items():
            t0 = time.perf_counter()
            for _ in range(5): f().numpy()
            ts[k].append((time.perf_counter() - t0) / 5 / N)
    base = np.median(ts["add_only"])
    print("XLA" if jit else "tf.function", {k: round(1e3*(np.median(v)-base), 3) for k, v in ts.items()})
x = tf.constant(np.linspace(-40, 40, 200001), tf.float32)
ref = np.logaddexp(0, np.linspace(-40, 40, 200001))
for k in ("softplus", "f1", "f2", "f3", "f4"):
    y = cases[k](x).numpy().astype(np.float64)
    print(k, "max abs err", np.abs(y - ref).max(), "max rel err", (np.abs(y - ref) / ref).max())
