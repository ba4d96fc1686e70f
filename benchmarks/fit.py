"""Keras `model.fit`: `NAFDensityModel` trained with and without XLA (`jit_compile`).

D=43, 5 flows, MADE [128, 128], 16 DSF units, batch 512, Adam 1e-3, 20 steps
per epoch on standard-normal data. Both models start from the same seed;
after a warm-up epoch each (tracing and compilation), the two alternate one
epoch at a time for 5 rounds (round-robin, so load drift hits both alike) and
the median milliseconds per step are reported, with both models' final
losses (the same numbers up to float rounding if XLA changes nothing but
speed).

    python -m benchmarks.fit
"""

from __future__ import annotations

import time

import numpy as np
import tf_keras

from tfp_naf import NAFDensityModel

D, BATCH, STEPS, ROUNDS = 43, 512, 20, 5


def main() -> dict:
    x = np.random.default_rng(0).normal(size=[BATCH * STEPS, D]).astype("float32")
    models = {}
    for jit in (False, True):
        tf_keras.utils.set_random_seed(0)
        model = NAFDensityModel(event_size=D, hidden_units=[128, 128])
        model.compile(optimizer=tf_keras.optimizers.Adam(1e-3), jit_compile=jit)
        model.fit(x[: 2 * BATCH], batch_size=BATCH, epochs=1, verbose=0)
        models[jit] = model
    times = {jit: [] for jit in models}
    for _ in range(ROUNDS):
        for jit, model in models.items():
            t0 = time.perf_counter()
            model.fit(x, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
            times[jit].append((time.perf_counter() - t0) / STEPS)
    result = {("jit_compile" if jit else "tf.function"): dict(
        ms_per_step=1e3 * float(np.median(t)),
        last_loss=float(models[jit].history.history["loss"][-1])) for jit, t in times.items()}
    print("| model.fit | ms per step (median) | last epoch's loss |")
    print("|---|---|---|")
    for mode, r in result.items():
        print(f"| jit_compile={mode == 'jit_compile'} | {r['ms_per_step']:.1f} | "
              f"{r['last_loss']:.5f} |")
    return result


if __name__ == "__main__":
    main()
