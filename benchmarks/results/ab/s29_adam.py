# ruff: noqa
import os, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np, tensorflow as tf, tf_keras
shapes = []
for _ in range(5):
    shapes += [(43,128),(128,),(128,128),(128,),(128,2064),(2064,)]
vs = [tf.Variable(tf.random.normal(s)) for s in shapes]
gs = [tf.random.normal(s) for s in shapes]
print(sum(np.prod(s) for s in shapes))
opts = {"new": tf_keras.optimizers.Adam(1e-6), "legacy": tf_keras.optimizers.legacy.Adam(1e-6)}
opts["new"].build(vs)
def mk(o, jit):
    @tf.function(jit_compile=jit)
    def f():
        g, _ = tf.clip_by_global_norm(gs, 5.0)
        o.apply_gradients(zip(g, vs))
        return tf.constant(0)
    return f
for jit in (False, True):
    fs = {}
    for k, o in opts.items():
        try:
            f = mk(o, jit); f(); f(); fs[k] = f
        except Exception as e:
            print(k, jit, type(e).__name__)
    ts = {k: [] for k in fs}
    for r in range(20):
        for k, f in fs.items():
            t0 = time.perf_counter(); [f().numpy() for _ in range(10)]; ts[k].append((time.perf_counter()-t0)/10)
    print(jit, {k: round(1e3*np.median(v), 2) for k, v in ts.items()})
