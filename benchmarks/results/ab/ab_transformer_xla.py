"""Throwaway A/B: the transformer XLA-compiled inside a plain tf.function step and log_prob."""

import sys
import time

import numpy as np
import tensorflow as tf

from benchmarks import speed
from tfp_naf import transformers

tf.config.threading.set_intra_op_parallelism_threads(2)
tf.config.threading.set_inter_op_parallelism_threads(1)
Transformer = transformers._SigmoidalTransformer
plain = Transformer.forward_and_log_derivative


def inner_xla(self, x, params=None):
    params = self._params if params is None else params
    fn = self.__dict__.get("_jit_fn")
    if fn is None:
        def layers(x, p):
            return self._with_tail(x, *self._sigmoidal_layers(x, p))

        fn = self.__dict__["_jit_fn"] = tf.function(layers, jit_compile=True)
    return fn(tf.convert_to_tensor(x, self.dtype), tf.convert_to_tensor(params, self.dtype))


model = sys.argv[1] if len(sys.argv) > 1 else "naf-dsf"
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 15
cases, values = {}, {}
for variant in ("plain", "inner_xla"):
    Transformer.forward_and_log_derivative = plain if variant == "plain" else inner_xla
    ops, _, _, _, _, x_big = speed._operations(model)
    for op in ("train_step", "log_prob"):
        fn, arg = ops[op]
        f = tf.function(lambda a, fn=fn: fn(a))
        f(arg)
        cases[(variant, op)] = (f, arg)
    values[variant] = cases[(variant, "log_prob")][0](x_big).numpy()
Transformer.forward_and_log_derivative = plain
diff = float(np.max(np.abs(values["plain"] - values["inner_xla"])))
print("log_prob max |diff| (same seed models, after 1 step each)", diff)
times = {k: [] for k in cases}
for _ in range(rounds):
    for k, (f, a) in cases.items():
        start = time.perf_counter()
        np.asarray(f(a))
        times[k].append(time.perf_counter() - start)
for op in ("train_step", "log_prob"):
    a, b = np.array(times[("plain", op)]), np.array(times[("inner_xla", op)])
    r = b / a
    print(f"{model} {op}: plain {1e3 * np.median(a):.1f} ms, "
          f"inner XLA {1e3 * np.median(b):.1f} ms, ratio {np.median(r):.3f} "
          f"({np.quantile(r, .25):.3f}-{np.quantile(r, .75):.3f})")
