"""Keras `model.fit`: `NAFDensityModel` trained with and without XLA (`jit_compile`).

D=43, 5 flows, MADE [128, 128], 16 DSF units, batch 512, Adam 1e-3, 20 steps
per epoch on standard-normal data. Three models start from the same seed:
`jit_compile=False`, `True` and `"auto"` (both compiled, timed on the first 74
steps, the faster kept: `tfp_naf.jit_choice`). After four warm-up epochs each
(tracing, compilation and auto's timing), they take turns one epoch at a time
for 5 rounds (round-robin, so load drift hits all alike) and the median
milliseconds per step are reported, with each model's final loss (the same
numbers up to float rounding if XLA changes nothing but speed) and auto's
choice with its measured time ratio.

    python -m benchmarks.fit
"""

from __future__ import annotations

import time

import numpy as np
import tf_keras

from tfp_naf import NAFDensityModel

D, BATCH, STEPS, ROUNDS, WARMUP_EPOCHS = 43, 512, 20, 5, 4
MODES = (False, True, "auto")


def main() -> dict:
    x = np.random.default_rng(0).normal(size=[BATCH * STEPS, D]).astype("float32")
    models = {}
    for jit in MODES:
        tf_keras.utils.set_random_seed(0)
        model = NAFDensityModel(event_size=D, hidden_units=[128, 128])
        model.compile(optimizer=tf_keras.optimizers.Adam(1e-3), jit_compile=jit)
        model.fit(x, batch_size=BATCH, epochs=WARMUP_EPOCHS, verbose=0, shuffle=False)
        models[jit] = model
    times = {jit: [] for jit in models}
    for _ in range(ROUNDS):
        for jit, model in models.items():
            t0 = time.perf_counter()
            model.fit(x, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
            times[jit].append((time.perf_counter() - t0) / STEPS)
    result = {f"jit_compile={jit!r}": dict(
        ms_per_step=1e3 * float(np.median(t)),
        last_loss=float(models[jit].history.history["loss"][-1]),
        choice=models[jit].jit_choice) for jit, t in times.items()}
    print("| model.fit | ms per step (median) | last epoch's loss | auto's choice |")
    print("|---|---|---|---|")
    for mode, r in result.items():
        c = r["choice"]
        note = "" if c is None else f"{c['choice']} (XLA / tf.function {c['xla_over_tf_function']})"
        print(f"| {mode} | {r['ms_per_step']:.1f} | {r['last_loss']:.5f} | {note} |")
    return result


if __name__ == "__main__":
    main()
