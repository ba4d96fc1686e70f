"""Throwaway A/B: a MADE output layer's masked matmul as G row-prefix blocks vs dense.

A MADE's hidden degrees are sorted and its outputs are dimension-major, so the mask of the
output layer ([128, 43 * 48] for MiniBooNE's DSF) is a staircase: column block g only reads a
prefix of the hidden units. Computing G blocks (`tf.split` the columns, slice the rows) skips
the masked zeros (about 62% of the FLOPs at G = 4). Usage: `python block_matmul.py THREADS N
ROUNDS`; ratios are block / dense, medians over ROUNDS round-robin calls.
"""

import sys
import time

import numpy as np
import tensorflow as tf

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
tf.config.threading.set_intra_op_parallelism_threads(threads)
tf.config.threading.set_inter_op_parallelism_threads(1)
N = int(sys.argv[2]) if len(sys.argv) > 2 else 512
H, D, P = 128, 43, 48
deg = np.maximum(1, np.ceil(np.arange(1, H + 1) * (D - 1) / (H + 1))).astype(int)
mask = (deg[:, None] < np.repeat(np.arange(1, D + 1), P)[None, :]).astype(np.float32)
K = tf.Variable(np.random.randn(H, D * P).astype(np.float32) * mask)
b = tf.Variable(np.zeros(D * P, np.float32))
h = tf.constant(np.random.randn(N, H).astype(np.float32))
r_col = mask.sum(0).astype(int)  # prefix length per column (monotone)


def blocks(G):
    cuts = np.linspace(0, D, G + 1).round().astype(int) * P
    return [
        (int(r_col[c1 - 1]), int(c0), int(c1)) for c0, c1 in zip(cuts[:-1], cuts[1:], strict=True)
    ]


def make(G):
    bl = blocks(G)

    def fwd(h):
        if G == 1:
            return tf.nn.bias_add(tf.matmul(h, K), b)
        pieces = tf.split(K, [c1 - c0 for _, c0, c1 in bl], axis=1)
        outs = [
            tf.matmul(h[:, :r], k[:r]) if r > 0 else tf.zeros([tf.shape(h)[0], c1 - c0])
            for (r, c0, c1), k in zip(bl, pieces, strict=True)
        ]
        return tf.nn.bias_add(tf.concat(outs, -1), b)

    def step(h):
        with tf.GradientTape() as t:
            t.watch(h)
            y = fwd(h)
            loss = tf.reduce_sum(y * y)
        return t.gradient(loss, [h, K, b])

    return fwd, step


cases = {}
for jit in (False, True):
    for G in (1, 2, 3, 4, 6, 8):
        fwd, step = make(G)
        for name, fn in (("fwd", fwd), ("fwd+bwd", step)):
            f = tf.function(fn, jit_compile=jit)
            f(h)
            cases[(jit, G, name)] = f
# check equality
ref = cases[(False, 1, "fwd+bwd")](h)
for k, f in cases.items():
    if k[2] == "fwd+bwd":
        out = f(h)
        err = max(
            float(tf.reduce_max(tf.abs((o - r) * (mask if o.shape == K.shape else 1))))
            / (1e-6 + float(tf.reduce_max(tf.abs(r))))
            for o, r in zip(out, ref, strict=True)
        )
        assert err < 1e-4, (k, err)
times = {k: [] for k in cases}
for _ in range(int(sys.argv[3]) if len(sys.argv) > 3 else 30):
    for k, f in cases.items():
        t0 = time.perf_counter()
        r = f(h)
        _ = [np.asarray(x) for x in tf.nest.flatten(r)][0]
        times[k].append(time.perf_counter() - t0)
for jit in (False, True):
    for name in ("fwd", "fwd+bwd"):
        base = np.array(times[(jit, 1, name)])
        line = [
            f"{'XLA' if jit else 'tf.function'} {name} N={N}: dense {1e3 * np.median(base):.2f} ms"
        ]
        for G in (2, 3, 4, 6, 8):
            t = np.array(times[(jit, G, name)])
            line.append(f"G={G} {np.median(t / base):.2f}")
        print(", ".join(line))
