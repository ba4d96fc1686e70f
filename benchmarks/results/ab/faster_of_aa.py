"""A/A check of `tfp_naf.jit_choice.FasterOf`: both "versions" the same `tf.function` step.

A fair timing gives block ratios near 1 (inside the 0.95 margin, so `tf.function` is kept).
Then one real `jit_compile="auto"` fit, for its choice. Run from a snapshot:
`PYTHONPATH=SNAP python benchmarks/results/ab/faster_of_aa.py`.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

from tfp_naf import datasets, jit_choice  # noqa: E402
from tfp_naf.keras import NAFDensityModel  # noqa: E402


class SameStepTwice(NAFDensityModel):
    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        a = tf_keras.Model.make_train_function(self, force=True)
        b = tf_keras.Model.make_train_function(self, force=True)
        self.step = jit_choice.FasterOf(a, b)
        self.train_function = self.step
        return self.step


def main() -> None:
    x = datasets.make_toy("pinwheel", 20000, seed=0).astype("float32")
    data = (tf.data.Dataset.from_tensor_slices(x).shuffle(20000, seed=0).repeat()
            .batch(256, drop_remainder=True).prefetch(2))
    for _ in range(3):
        model = SameStepTwice(event_size=2)
        model.adapt(x)
        model.compile(optimizer=tf_keras.optimizers.Adam(1e-3))
        model.fit(data, epochs=1, steps_per_epoch=90, verbose=0)
        medians = {k: round(1e3 * v, 2) for k, v in model.step.seconds.items()}
        print(f"A/A: block ratio {model.step.ratio:.3f}, medians (ms) {medians}, "
              f"kept {model.step.choice}")
    model = NAFDensityModel(event_size=2)
    model.adapt(x)
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-3), jit_compile="auto")
    model.fit(data, epochs=1, steps_per_epoch=90, verbose=0)
    print("auto:", model.jit_choice, np.bool_(model.jit_compile))


if __name__ == "__main__":
    main()
