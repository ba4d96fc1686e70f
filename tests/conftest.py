"""Shared test helpers."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402


def randomize(naf, scale=0.3, seed=0):
    """Moves every conditioner weight randomly, keeping the MADE masks intact.

    A freshly built flow is near the identity (its output layer is scaled down); tests need
    a generic flow. Masked kernels are re-masked through their constraint. The
    conditioner's own weights count too (a `CompactAutoregressiveNetwork`'s
    shared output layer).
    """
    gen = tf.random.Generator.from_seed(seed)
    for layer in [naf.conditioner, *naf.conditioner.submodules]:
        if not isinstance(layer, tf_keras.layers.Layer):
            continue
        for w in layer._trainable_weights:
            new = w + tf.cast(scale, w.dtype) * gen.normal(w.shape, dtype=w.dtype)
            constraint = (
                getattr(layer, "kernel_constraint", None)
                if w is getattr(layer, "kernel", None)
                else None
            )
            w.assign(constraint(new) if constraint is not None else new)
    beta = getattr(naf, "base_params", None)
    if beta is not None:  # The unconditioned base parameters move too.
        beta.assign(beta + tf.cast(scale / max(naf.base_rate, 1.0), beta.dtype)
                    * gen.normal(beta.shape, dtype=beta.dtype))
    return naf


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global seeds (MADE initialisation, tf.random).

    Results then do not depend on which tests ran before, so a failure reproduces
    when its test is run alone.
    """
    tf_keras.utils.set_random_seed(0)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# Older name, kept while tests migrate.
randomize_all = randomize
