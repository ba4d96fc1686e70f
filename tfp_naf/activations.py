"""The MADE's hidden activation: a ReLU whose softness is learned.

`SoftReLU` computes `s softplus(h / s)`, with the softness `s > 0` a learned
scalar. As `s -> 0` it is the ReLU; larger `s` rounds the kink at 0 over a
width of about `s`. The flows a `NeuralAutoregressiveFlow` builds use one per
MADE (`activation="soft_relu"`, the default of unconditional flows), shared by
its hidden layers, so each flow learns how smooth its conditioner is. Fixed
smooth activations (GELU, SiLU) learned the round 2-D shapes faster and the
sharp-edged ones slower; a learned softness starting at `DEFAULT_SOFTNESS` kept
the sharp-edged shapes and gained most on MiniBooNE. On the conditional task it
lost, so conditional flows keep the ReLU (benchmarks/README.md, "ReLU with a
learned softness").
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras

__all__ = ["DEFAULT_SOFTNESS", "SoftReLU", "check_name", "default_activation", "resolve"]

# The softness a `SoftReLU` starts at, in the MADE's pre-activation units (its
# inputs are standardised data). Chosen on validation data over 0.02, 0.05, 0.1 and
# 0.2 (benchmarks/README.md).
DEFAULT_SOFTNESS = 0.05

# The learned log-softness offset `r` is clipped to this range, so `s` stays in
# `[s0 e^-30, s0 e^10]`: finite however long training pushes `r`.
_LOG_RANGE = (-30.0, 10.0)


class SoftReLU(tf_keras.layers.Layer):
    """ReLU with a learned softness: `f(h) = s softplus(h / s) = s log(1 + e^(h / s))`.

    The softness is `s = s0 exp(r)`, with `s0 = initial_softness` and the
    scalar `r` learned, starting at 0 (so under Adam-like optimisers `log s`
    moves about one learning rate per step, whatever `s0`). `f` is smooth,
    increasing and convex, `0 < f(h) - relu(h) <= s log 2`, and
    `f'(h) = sigmoid(h / s)`; as `s -> 0` it is `relu(h)`. Elementwise with one
    `s` for all units, so applying it to a few units at a time (the
    incremental inverse of `conditioners.incremental_head`) gives the same
    values as applying it to all.

    Pass one instance as a MADE's `activation`: every hidden layer then shares
    its softness.

    #### Examples

    ```python
    import tensorflow as tf
    import tensorflow_probability as tfp
    from tfp_naf.activations import SoftReLU

    act = SoftReLU(initial_softness=0.05)
    made = tfp.bijectors.AutoregressiveNetwork(
        params=2, event_shape=[3], hidden_units=[16, 16], activation=act)
    made(tf.zeros([1, 3]))
    act.softness          # 0.05, learned with the MADE's weights
    ```
    """

    def __init__(self, initial_softness: float = DEFAULT_SOFTNESS, **kwargs):
        """Args:
          initial_softness: `s0 > 0`, the softness at the start.
          **kwargs: passed to `tf_keras.layers.Layer` (`name`, `dtype`, ...).

        Raises:
          ValueError: unless `initial_softness` is finite and > 0.
        """
        super().__init__(**kwargs)
        s0 = float(initial_softness)
        if not (np.isfinite(s0) and s0 > 0.0):
            raise ValueError(f"`initial_softness` must be finite and > 0; got {initial_softness}.")
        self._initial_softness = s0
        self.log_softness_offset = self.add_weight(
            name="log_softness_offset", shape=[], initializer="zeros", trainable=True)

    @property
    def initial_softness(self) -> float:
        return self._initial_softness

    @property
    def softness(self) -> tf.Tensor:
        """`s = s0 exp(r)`, with `r` clipped to keep it finite."""
        r = tf.clip_by_value(self.log_softness_offset, *_LOG_RANGE)
        return tf.constant(self._initial_softness, r.dtype) * tf.exp(r)

    def call(self, inputs):
        s = tf.cast(self.softness, inputs.dtype)
        return s * tf.nn.softplus(inputs / s)

    def get_config(self) -> dict:
        return dict(super().get_config(), initial_softness=self._initial_softness)


def check_name(name: str) -> str:
    """`name` if it names an activation (`"soft_relu"` or a Keras one), else a `ValueError`."""
    if name != "soft_relu":
        try:
            tf_keras.activations.get(name)
        except (ValueError, TypeError):
            raise ValueError(
                f"Unknown activation {name!r}: use \"soft_relu\" or a Keras activation name "
                "such as \"relu\".") from None
    return name


def default_activation(conditional: bool) -> str:
    """The built MADEs' default: `"soft_relu"`, or `"relu"` for a conditional
    flow (each chosen on validation data, benchmarks/README.md)."""
    return "relu" if conditional else "soft_relu"


def resolve(activation, dtype, conditional: bool = False):
    """The activation a built MADE gets: None means `default_activation`; a new
    `SoftReLU` (in `dtype`) for `"soft_relu"`; anything else as given (Keras
    names, callables)."""
    if activation is None:
        activation = default_activation(conditional)
    if isinstance(activation, str) and check_name(activation) == "soft_relu":
        return SoftReLU(dtype=tf.as_dtype(dtype).name, name="soft_relu")
    return activation
