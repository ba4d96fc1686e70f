"""Fitting neural autoregressive flows with `tf_keras` (`model.fit`).

A density model is trained by maximum likelihood: the loss is the mean
negative log-likelihood of the data,

```none
loss(x_1..x_B) = -1/B sum_b log p(x_b | c_b),
log p(x | c) = log N(z; 0, I) + log |det dz/dx|,   z = (NAF_K o ... o NAF_1)(x),
```

where `NAF_k` are `tfp_naf.NeuralAutoregressiveFlow`s (data -> noise) with the
order of the dimensions reversed between them. `NAFDensityModel` wraps such a
flow in a `tf_keras.Model`, so everything Keras offers works as usual:
`validation_data`, callbacks (`EarlyStopping`, `ModelCheckpoint`,
`TerminateOnNaN`), the progress bar, learning-rate schedules and
`global_clipnorm` on the optimizer.

TFP (and therefore this package) uses Keras 2 through the `tf_keras` package.
Keras 3 (`import keras`, or `tf.keras` without `TF_USE_LEGACY_KERAS=1`) cannot
train these layers: a Keras 3 model does not see the variables of a `tf_keras`
layer and would silently train nothing. `NAFDensityModel` refuses Keras 3
optimizers and Keras 3 symbolic inputs, and `check_keras_model` finds our
layers inside a Keras 3 model; all raise a `TypeError` saying what to do
(`tfp_naf.keras3_guard`).

Also here: batched `log_prob` and `sample` (`batch_size=`, compiled once per
batch size, `tfp_naf.batching`). The SavedModel export lives in
`tfp_naf.export`; `export_saved_model` and `check_keras_model` are importable
from this module as well.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from tfp_naf import activations, jit_choice
from tfp_naf.flow import NeuralAutoregressiveFlow
from tfp_naf.keras3_guard import (
    KERAS3_HELP,
    _in_keras3_call,
    _is_keras3_object,
    check_keras_model,
)
from tfp_naf.support import BoxSupport

tfb, tfd = tfp.bijectors, tfp.distributions

__all__ = [
    "NAFDensityModel",
    "check_keras_model",
    "export_saved_model",
    "flow_kwargs",
    "make_flow",
]

# ---- The flow -----------------------------------------------------------


def make_flow(
    event_size: int,
    transformer: str = "dsf",
    num_units: int = 16,
    num_layers: int = 2,
    num_flows: int = 5,
    hidden_units: Sequence[int] = (64, 64),
    conditional_size: "int | None" = None,
    context_units: "int | None" = None,
    dtype=tf.float32,
    name: str = "naf_flow",
    base_rate: "float | None" = None,
    activation: "str | None" = None,
) -> tfd.TransformedDistribution:
    """A normalizing-flow density: `num_flows` NAFs with reversals in between.

    ```none
    z = (NAF_K o R o ... o R o NAF_1)(x),   R = reverse the dimensions,
    p(x | c) = N(z; 0, I) |det dz/dx|.
    ```

    Returned as `tfd.TransformedDistribution(tfd.Sample(Normal, [D]),
    tfb.Invert(chain))`, so `log_prob` is one parallel pass per NAF and
    `sample` inverts each NAF (`D` sequential passes). Each NAF starts near
    its transformer's `initial_params` (spread-out sigmoid units, see
    `NeuralAutoregressiveFlow`'s `initial_spread`). The NAFs are named
    `f"{name}_naf_{k}"`; pass a condition with
    `bijector_kwargs=flow_kwargs(flow, c)`.

    Args:
      event_size: `D`, the number of dimensions of `x`.
      transformer: "dsf", "ddsf" or "ddsf-shared" (DDSF whose mixing
        matrices are learned variables of each NAF, shared by all dimensions;
        they are among the flow's `trainable_variables`).
      num_units: sigmoid units per transformer layer.
      num_layers: transformer layers ("ddsf" and "ddsf-shared" only).
      num_flows: how many NAFs to chain.
      hidden_units: hidden layer widths of each MADE conditioner.
      conditional_size: size of the condition `c` for `p(x | c)`, or None.
      context_units: use the compact conditioner with this many context
        features per dimension (see `tfp_naf.CompactAutoregressiveNetwork`).
      dtype: float32 or float64.
      name: name prefix.
      base_rate: learning-rate factor of each NAF's unconditioned base
        parameters (see `NeuralAutoregressiveFlow`); None for its default.
      activation: the MADEs' hidden activation, a name: `"soft_relu"` (a
        ReLU with a learned softness, one per NAF; see
        `NeuralAutoregressiveFlow`) or a Keras activation such as `"relu"`;
        None for the default (`"soft_relu"`, `"relu"` for a conditional flow).

    Returns:
      The flow distribution; its `trainable_variables` are all the NAFs'.

    #### Examples

    ```python
    import numpy as np
    from tfp_naf.keras import flow_kwargs, make_flow

    flow = make_flow(2, num_flows=2, hidden_units=[16])
    x = np.random.randn(8, 2).astype("float32")
    flow.log_prob(x).shape          # [8]

    cflow = make_flow(2, num_flows=2, hidden_units=[16], conditional_size=1)
    c = np.ones([8, 1], "float32")
    cflow.log_prob(x, bijector_kwargs=flow_kwargs(cflow, c)).shape    # [8]
    ```
    """
    event_size, num_flows = int(event_size), int(num_flows)
    if event_size < 1:
        raise ValueError(f"`event_size` must be >= 1; got {event_size}.")
    if num_flows < 1:
        raise ValueError(f"`num_flows` must be >= 1; got {num_flows}.")
    if conditional_size is not None and int(conditional_size) < 1:
        raise ValueError(f"`conditional_size` must be >= 1 or None; got {conditional_size}.")
    dtype = tf.as_dtype(dtype)
    reverse = list(reversed(range(event_size)))
    bijectors = []  # Applied in order x -> z; tfb.Chain takes them reversed.
    for k in range(num_flows):
        if k:
            bijectors.append(tfb.Permute(reverse, name=f"{name}_reverse_{k}"))
        bijectors.append(
            NeuralAutoregressiveFlow(
                event_shape=[event_size],
                hidden_units=list(hidden_units),
                transformer=transformer,
                num_units=num_units,
                num_layers=num_layers,
                conditional_event_shape=(
                    None if conditional_size is None else [int(conditional_size)]
                ),
                context_units=context_units,
                base_rate=base_rate,
                activation=activation,
                dtype=dtype,
                name=f"{name}_naf_{k}",
            )
        )
    base = tfd.Sample(tfd.Normal(tf.zeros([], dtype), tf.ones([], dtype)), [event_size])
    chain = tfb.Chain(list(reversed(bijectors)), name=name)
    return tfd.TransformedDistribution(base, tfb.Invert(chain), name=name)


# Config keys added after the first release, with the value that reproduces
# what a config saved without them was trained with.
_ADDED_CONFIG_KEYS = {"support": None, "base_rate": 0.0, "activation": "relu"}


def _activation_name(activation, conditional: bool) -> str:
    """`activation` (None: the default) if it is a name a saved config can hold,
    else a `TypeError`."""
    if activation is None:
        return activations.default_activation(conditional)
    if not isinstance(activation, str):
        raise TypeError(
            "`activation` must be a name (\"soft_relu\", \"relu\", ...), so the model's "
            f"config can be saved; got {activation!r}.")
    return activations.check_name(activation)


def with_config_defaults(config: "dict[str, Any]") -> "dict[str, Any]":
    """`config` (a `NAFDensityModel.get_config()`, perhaps from an older
    tfp_naf) with every key added since filled in as the older model had it."""
    return {**_ADDED_CONFIG_KEYS, **config}


def _nafs(bijector) -> "list[NeuralAutoregressiveFlow]":
    """The NAFs inside `bijector` (through Invert and Chain), in chain order."""
    if isinstance(bijector, NeuralAutoregressiveFlow):
        return [bijector]
    # Not isinstance(tfb.Chain / tfb.Invert): TFP builds private twins of them.
    if hasattr(bijector, "bijectors"):
        return [naf for part in bijector.bijectors for naf in _nafs(part)]
    if hasattr(bijector, "bijector"):
        return _nafs(bijector.bijector)
    return []


def flow_kwargs(flow: tfd.TransformedDistribution, c) -> "dict[str, dict]":
    """`bijector_kwargs` passing the condition `c` to every NAF of `flow`.

    For a flow from `make_flow`: `flow.log_prob(x, bijector_kwargs=
    flow_kwargs(flow, c))`, and likewise for `flow.sample(n, ...)`.
    """
    nafs = _nafs(flow.bijector)
    if not nafs:
        raise ValueError("`flow` holds no NeuralAutoregressiveFlow.")
    return {naf.name: {"conditional_input": c} for naf in nafs}


# ---- The Keras model ------------------------------------------------------


def _split_inputs(inputs):
    """`x` and `c` (or None) from `x`, `(x, c)`, `[x, c]` or `{"x": x, "c": c}`."""
    if isinstance(inputs, dict):
        unknown = set(inputs) - {"x", "c"}
        if "x" not in inputs or unknown:
            raise ValueError(
                f"Dict inputs must have the keys 'x' and optionally 'c'; got {sorted(inputs)}."
            )
        return inputs["x"], inputs.get("c")
    if isinstance(inputs, (tuple, list)):
        if len(inputs) == 1:
            return inputs[0], None
        if len(inputs) == 2:
            return inputs[0], inputs[1]
        raise ValueError(
            f"Inputs must be x, (x, c) or {{'x': x, 'c': c}}; got a sequence of {len(inputs)}."
        )
    return inputs, None


class NAFDensityModel(tf_keras.Model):
    """A `tf_keras.Model` for density estimation with a neural autoregressive flow.

    Holds a flow from `make_flow` (so Keras tracks, saves and trains its
    variables). `model(x)` / `model((x, c))` / `model({"x": x, "c": c})`
    returns `log p(x | c)`, and the training loss is its negative mean (plus
    any regularisation losses), so `compile` needs no `loss`:

    ```none
    loss = -mean_b log p(x_b | c_b)
    ```

    An optional fixed standardisation (`adapt`) maps the data as
    `x' = (x - mean) / scale` (and `c` likewise) before the flow;
    `log_prob` includes its log-Jacobian `-sum(log scale)`, so losses and
    `log_prob` are in the data's own units, and `sample` returns data units.
    These statistics are non-trainable weights: they are saved with
    `save_weights` and exported with `export_saved_model`.

    A bounded support (`support=(low, high)`, per dimension of `x`; see
    `tfp_naf.support`) puts all of the density's mass inside the open box
    `prod_j (low_j, high_j)`: the data are first mapped onto R^D by
    `u = T(x)` (logit for two bounds, `log(x - low)` or `-log(high - x)`
    for one, the identity for none), then standardised, then the flow:

    ```none
    log p(x | c) = log p_flow((T(x) - mean) / scale | c) - sum_j log scale_j
                   + sum_j log T_j'(x_j)          for x inside the box,
    log p(x | c) = -inf                           outside it (or on a bound).
    ```

    `sample` and `noise_to_data` map back with `T^{-1}` and clamp to the
    open box's nearest representable values, so every sample lies strictly
    inside it (in float32 too). With a support, the standardisation
    statistics are those of `T(x)` (`adapt` computes them so;
    `support_bijector.inverse(x)` is `T(x)`). The condition `c` is never
    transformed. The bounds are in `get_config` and, as the non-trainable
    weights `support_low` / `support_high`, in every weights file:
    `load_weights` refuses weights saved with another support (or without one).

    Keras 3 optimizers and Keras 3 symbolic inputs are refused with a
    `TypeError` (see `check_keras_model`): use `tf_keras`.

    #### Examples

    ```python
    import numpy as np
    import tf_keras
    from tfp_naf.keras import NAFDensityModel

    x = np.random.default_rng(0).normal(size=(512, 2)).astype("float32")
    model = NAFDensityModel(event_size=2, num_flows=2, hidden_units=[16])
    model.adapt(x)                  # Standardise by the data's mean and scale.
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-3, global_clipnorm=1.0))
    history = model.fit(x, batch_size=128, epochs=2, validation_split=0.25, verbose=0)
    model.log_prob(x[:4]).shape     # [4]
    model.sample(3, seed=1).shape   # [3, 2]

    # Conditional p(x | c): feed (x, c) pairs as a tuple or a dict.
    c = x[:, :1] ** 2
    cmodel = NAFDensityModel(event_size=2, conditional_size=1, num_flows=1,
                             hidden_units=[16])
    cmodel.compile(optimizer=tf_keras.optimizers.Adam(1e-3))
    cmodel.fit({"x": x, "c": c}, batch_size=128, epochs=1, verbose=0,
               validation_data=({"x": x[:64], "c": c[:64]},))
    cmodel.sample(5, c=[0.5], seed=2).shape   # [5, 2]: one condition for all.

    # A posterior p(theta | x) on a prior's box: no mass outside [-3, 3]^2,
    # the second parameter only bounded below by 0.
    theta = np.random.default_rng(1).uniform(0.01, 2.9, size=(512, 2)).astype("float32")
    bmodel = NAFDensityModel(event_size=2, conditional_size=1, num_flows=1,
                             hidden_units=[16], support=([-3.0, 0.0], [3.0, np.inf]))
    bmodel.adapt(theta, theta[:, :1] ** 2)  # Statistics of the transformed theta.
    draws = bmodel.sample(100, c=[1.0], seed=3).numpy()
    bool(np.all((draws > [-3, 0]) & (draws < [3, np.inf])))  # True
    bmodel.log_prob([[3.5, 1.0]], [[1.0]]).numpy()            # [-inf]: outside.
    ```
    """

    def __init__(
        self,
        event_size: int,
        transformer: str = "dsf",
        num_units: int = 16,
        num_layers: int = 2,
        num_flows: int = 5,
        hidden_units: Sequence[int] = (64, 64),
        conditional_size: "int | None" = None,
        context_units: "int | None" = None,
        dtype="float32",
        name: str = "naf_density_model",
        support: "tuple[Any, Any] | None" = None,
        base_rate: "float | None" = None,
        activation: "str | None" = None,
        **kwargs,
    ):
        """Builds the model and all its weights.

        Args:
          event_size, transformer, num_units, num_layers, num_flows,
            hidden_units, conditional_size, context_units, base_rate: as for
            `make_flow` (`base_rate=None`: `tfp_naf.flow.DEFAULT_BASE_RATE`,
            or 0 for a conditional model, as `NeuralAutoregressiveFlow` does;
            kept as a number in `get_config`; configs saved before it existed
            load with 0, as they were trained).
          activation: the MADEs' hidden activation, as for `make_flow`
            (None: the default for the model, kept as its name in
            `get_config`; configs saved before it existed load with
            `"relu"`, as they were trained).
          dtype: float32 or float64, for the weights and the computation.
          name: model name.
          support: None (the density lives on all of R^D), or a pair
            `(low, high)` bounding each dimension of `x`: each side one
            value for all dimensions or `event_size` values; `-inf` / `inf`
            (or None) leaves a side unbounded. The bounds are rounded to
            `dtype`. See the class docstring and `tfp_naf.support.BoxSupport`.
          **kwargs: passed to `tf_keras.Model`.

        Raises:
          ValueError: for an invalid `support` (see `BoxSupport`).
        """
        super().__init__(name=name, dtype=dtype, **kwargs)
        self._flow_config = dict(
            event_size=int(event_size),
            transformer=str(transformer),
            num_units=int(num_units),
            num_layers=int(num_layers),
            num_flows=int(num_flows),
            hidden_units=[int(h) for h in hidden_units],
            conditional_size=None if conditional_size is None else int(conditional_size),
            context_units=None if context_units is None else int(context_units),
            base_rate=None if base_rate is None else float(base_rate),
            activation=_activation_name(activation, conditional_size is not None),
        )
        self.flow = make_flow(**self._flow_config, dtype=self.dtype, name="flow")
        # The rate the flows resolved `None` to, so `get_config` rebuilds the same model.
        self._flow_config["base_rate"] = _nafs(self.flow.bijector)[0].base_rate
        self._support = None if support is None else BoxSupport(support, event_size, self.dtype)
        size, csize = self.event_size, self.conditional_size
        self.x_mean = self._fixed_weight("x_mean", [size], "zeros")
        self.x_scale = self._fixed_weight("x_scale", [size], "ones")
        self.c_mean = self._fixed_weight("c_mean", [csize or 0], "zeros")
        self.c_scale = self._fixed_weight("c_scale", [csize or 0], "ones")
        if self._support is not None:
            # Copies of the bounds, only so that every weights file carries
            # them: loading weights saved with another support is refused.
            # The computation uses the config's bounds (`self._support`).
            self.support_low = self._fixed_weight(
                "support_low", [size], tf.constant_initializer(self._support.low))
            self.support_high = self._fixed_weight(
                "support_high", [size], tf.constant_initializer(self._support.high))
        self.loss_tracker = tf_keras.metrics.Mean(name="loss")
        self.built = True  # Every weight exists now: save/load need no call first.

    def _fixed_weight(self, name, shape, initializer):
        return self.add_weight(
            name=name, shape=shape, initializer=initializer, trainable=False, dtype=self.dtype
        )

    # ---- Configuration ---------------------------------------------------

    @property
    def event_size(self) -> int:
        return self._flow_config["event_size"]

    @property
    def conditional_size(self) -> "int | None":
        return self._flow_config["conditional_size"]

    @property
    def conditional(self) -> bool:
        return self.conditional_size is not None

    @property
    def support(self) -> "BoxSupport | None":
        """The bounded support of `x` (`BoxSupport`: `low`, `high`, `kinds`), or None."""
        return self._support

    @property
    def support_bijector(self) -> tfb.Bijector:
        """The constraining bijector `T^{-1}`: R^D -> the support (`forward`), in
        the model's dtype; `tfb.Identity()` without a support. `inverse(x)` is
        the `T(x)` the standardisation and the flow see."""
        if self._support is None:
            return tfb.Identity()
        return self._support.bijector(self.dtype)

    def get_config(self) -> "dict[str, Any]":
        """The constructor arguments (JSON-serialisable; `support` as
        `[[low_1, ...], [high_1, ...]]` with None for an unbounded side)."""
        support = None if self._support is None else self._support.config()
        return dict(self._flow_config, dtype=self.dtype, name=self.name, support=support)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**with_config_defaults(config))

    # ---- Standardisation -------------------------------------------------

    def adapt(self, x, c=None) -> None:
        """Sets the fixed standardisation to the mean and std of `x` (and `c`).

        With a support, of `T(x)` (`support_bijector.inverse(x)`), the values
        the flow is standardised in. A column with zero spread keeps scale 1
        (it is only shifted). For data that does not fit in memory, compute
        the statistics in one pass (`tfp_naf.tables.ColumnMoments`, over
        chunks of `T(x)` with a support) and call `set_standardization`.

        Raises:
          ValueError: with a support, when a row of `x` lies outside it.
        """
        x, c = self._check_inputs(x, c)
        if self._support is not None:
            x, _, outside = self._support.unconstrain(x)
            if bool(tf.reduce_any(outside)):
                row = int(tf.where(outside)[0][0])
                raise ValueError(
                    f"`x` row {row} lies outside the support {self._support.config()} (open "
                    "box): its log-density is -inf, so the model cannot be fitted to it."
                )
        for data, mean_var, scale_var in ((x, self.x_mean, self.x_scale),
                                          (c, self.c_mean, self.c_scale)):
            if data is None:
                continue
            mean, var = tf.nn.moments(data, axes=[0])
            std = tf.sqrt(var)
            mean_var.assign(mean)
            scale_var.assign(tf.where(std > 0, std, tf.ones_like(std)))

    def set_standardization(self, x_mean, x_std, c_mean=None, c_std=None) -> None:
        """Sets the fixed standardisation `x' = (x - x_mean) / x_std` (and `c`'s).

        As `adapt` with the statistics given: a zero `std` becomes scale 1.
        With a support, `x_mean` and `x_std` are those of `T(x)`
        (`support_bijector.inverse(x)`), not of `x`.

        Raises:
          ValueError: for statistics of the wrong length, non-finite values or
            a negative `std`, or a condition's statistics missing (or given to
            an unconditional model).
        """
        if self.conditional != (c_mean is not None and c_std is not None):
            raise ValueError("Give `c_mean` and `c_std` exactly when the model is conditional.")
        pairs = [(x_mean, x_std, self.x_mean, self.x_scale, "x")]
        if self.conditional:
            pairs.append((c_mean, c_std, self.c_mean, self.c_scale, "c"))
        checked = []
        for mean, std, mean_var, scale_var, what in pairs:
            mean = np.asarray(mean, np.float64).reshape(-1)
            std = np.asarray(std, np.float64).reshape(-1)
            size = mean_var.shape[0]
            if mean.shape != (size,) or std.shape != (size,):
                raise ValueError(f"`{what}_mean` and `{what}_std` must have {size} values; "
                                 f"got {mean.size} and {std.size}.")
            if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std >= 0)):
                raise ValueError(f"`{what}_mean`/`{what}_std` must be finite, std >= 0.")
            checked.append((mean_var, mean, scale_var, np.where(std > 0, std, 1.0)))
        for mean_var, mean, scale_var, scale in checked:
            mean_var.assign(mean.astype(self.dtype))
            scale_var.assign(scale.astype(self.dtype))

    # ---- Densities and samples -------------------------------------------

    def _check_inputs(self, x, c):
        if _is_keras3_object(x) or _is_keras3_object(c):
            raise TypeError(f"Keras 3 symbolic inputs were given to {self.name!r}. {KERAS3_HELP}")
        if _in_keras3_call():
            raise TypeError(f"{self.name!r} was called inside a Keras 3 layer. {KERAS3_HELP}")
        x = tf.cast(x, self.dtype)
        if x.shape.rank is not None and (
            x.shape.rank < 1 or x.shape[-1] not in (None, self.event_size)
        ):
            raise ValueError(
                f"`x` must have shape [..., {self.event_size}]; got {x.shape}."
            )
        if self.conditional != (c is not None):
            raise ValueError(
                "This model is conditional: give the condition, as model((x, c)), "
                "model.log_prob(x, c) or fit({'x': x, 'c': c})."
                if self.conditional
                else "This model is not conditional, but a condition `c` was given."
            )
        if c is not None:
            c = tf.cast(c, self.dtype)
            if c.shape.rank is not None and (
                c.shape.rank < 1 or c.shape[-1] not in (None, self.conditional_size)
            ):
                raise ValueError(
                    f"`c` must have shape [..., {self.conditional_size}]; got {c.shape}."
                )
        return x, c

    def _flow_kwargs(self, c):
        if c is None:
            return {}
        return {"bijector_kwargs": flow_kwargs(self.flow, (c - self.c_mean) / self.c_scale)}

    def log_prob(self, x, c=None, batch_size: "int | None" = None) -> tf.Tensor:
        """`log p(x | c)` in the data's units, shape `x.shape[:-1]`; `-inf` for
        rows outside the support (if the model has one).

        Args:
          x: `[..., D]`.
          c: for a conditional model, `[..., C]`; else None.
          batch_size: None: one call. An int: `x` (and `c`) must be `[n, D]`
            (`[n, C]`) array-likes that slice (NumPy arrays, memory maps);
            they are evaluated `batch_size` rows at a time by a function
            compiled once per batch size (`tfp_naf.batching.iter_log_prob`),
            so memory stays bounded. The values equal one call's up to float
            rounding.
        """
        if batch_size is not None:
            from tfp_naf import batching

            parts = list(batching.iter_log_prob(self, x, c, batch_size=batch_size))
            return tf.constant(np.concatenate(parts) if parts else np.zeros([0], self.dtype))
        x, c = self._check_inputs(x, c)
        log_det = -tf.reduce_sum(tf.math.log(self.x_scale))
        if self._support is None:
            return self.flow.log_prob((x - self.x_mean) / self.x_scale,
                                      **self._flow_kwargs(c)) + log_det
        u, support_log_det, outside = self._support.unconstrain(x)
        z = (u - self.x_mean) / self.x_scale
        log_prob = self.flow.log_prob(z, **self._flow_kwargs(c)) + log_det + support_log_det
        return tf.where(outside, tf.constant(-np.inf, log_prob.dtype), log_prob)

    def _to_data(self, standardized) -> tf.Tensor:
        """Flow output (standardised units) -> data units, inside the support."""
        u = standardized * self.x_scale + self.x_mean
        return u if self._support is None else self._support.constrain(u)

    def sample(
        self, n, c=None, seed=None, batch_size: "int | None" = None, jit_compile: bool = False
    ) -> tf.Tensor:
        """`n` samples `[n, D]`, in data units (strictly inside the support, if any).

        Args:
          n: how many samples.
          c: for a conditional model, the condition: `[C]` (the same for all
            samples) or `[n, C]` (one per sample).
          seed: an int (reproducible: the same seed gives the same samples in
            any process, also through `export_saved_model`) or None.
          batch_size: None: one call. An int: `batch_size` rows at a time,
            compiled once (`tfp_naf.batching.iter_sample`); batch `k` draws
            its noise with the stateless seed `[seed, k]`, so the samples are
            determined by `seed` and `batch_size`, and `n <= batch_size`
            samples equal the unbatched call's up to float rounding.
          jit_compile: with `batch_size`: XLA-compile the inverse (faster on
            a CPU; the noise is the same, the samples differ by rounding).
        """
        if batch_size is not None:
            from tfp_naf import batching

            parts = list(batching.iter_sample(self, n, c, seed=seed, batch_size=batch_size,
                                              jit_compile=jit_compile))
            return tf.constant(np.concatenate(parts) if parts
                               else np.zeros([0, self.event_size], self.dtype))
        n = tf.convert_to_tensor(n, tf.int32)
        if c is not None:
            c = tf.broadcast_to(tf.cast(c, self.dtype), tf.stack([n, self.conditional_size]))
        _, c = self._check_inputs(tf.zeros([0, self.event_size], self.dtype), c)
        if not tf.executing_eagerly():
            return self._sample(n, c, seed)
        seed = None if seed is None else tf.cast(seed, tf.int32)
        return self._traced("sample", self._sample, [
            tf.TensorSpec([], tf.int32), self._rows_spec(self.conditional_size, c),
            None if seed is None else tf.TensorSpec([], tf.int32)])(n, c, seed)

    def _sample(self, n, c, seed) -> tf.Tensor:
        """`sample`'s draw: `c` broadcast to `[n, C]` and checked, or None."""
        if seed is not None:
            seed = tf.stack([tf.cast(seed, tf.int32), tf.constant(0, tf.int32)])
        return self._to_data(self.flow.sample(n, seed=seed, **self._flow_kwargs(c)))

    def noise_to_data(self, z, c=None) -> tf.Tensor:
        """Maps base-distribution noise `z` (`[..., D]`) to data units: what
        `sample` does after drawing `z ~ N(0, I)` (the support's map and clamp
        included).
        """
        z = tf.cast(z, self.dtype)
        _, c = self._check_inputs(tf.zeros([0, self.event_size], self.dtype), c)
        if not tf.executing_eagerly():
            return self._noise_to_data(z, c)
        if z.shape.rank == 0 or z.shape[-1] != self.event_size:
            raise ValueError(f"`z` must have shape [..., {self.event_size}]; got {z.shape}.")
        batch = tf.shape(z)[:-1]
        if c is not None:
            c = tf.reshape(tf.broadcast_to(c, tf.concat([batch, [self.conditional_size]], 0)),
                           [-1, self.conditional_size])
        fn = self._traced("noise_to_data", self._noise_to_data, [
            self._rows_spec(self.event_size, z), self._rows_spec(self.conditional_size, c)])
        x = fn(tf.reshape(z, [-1, self.event_size]), c)
        return tf.reshape(x, tf.concat([batch, [self.event_size]], 0))

    def _noise_to_data(self, z, c) -> tf.Tensor:
        x = self.flow.bijector.forward(z, **self._flow_kwargs(c).get("bijector_kwargs", {}))
        return self._to_data(x)

    def _rows_spec(self, size, value) -> "tf.TensorSpec | None":
        """`[rows, size]` of the model's dtype, or None where `value` is None."""
        return None if value is None else tf.TensorSpec([None, size], self.dtype)

    def _traced(self, name, fn, signature):
        """`fn` traced once for every number of rows, cached per model, `name` and
        which arguments are None (`signature`'s None entries).

        Eagerly, the inverse's `D` sequential passes would run op by op
        (60-150x slower). One trace, with the rows' number unknown, whatever
        was called before: the same inputs always give the same numbers.
        """
        from tfp_naf import batching

        key = (name, *(spec is None for spec in signature))
        specs = [spec for spec in signature if spec is not None]

        def build():
            def call(*args):
                args = iter(args)
                return fn(*[None if spec is None else next(args) for spec in signature])

            traced = tf.function(call, input_signature=specs, autograph=False)
            return lambda *values: traced(*[v for v in values if v is not None])

        return batching.cached_function(self, key, build)

    # ---- Keras hooks -----------------------------------------------------

    def call(self, inputs, training=None):
        """`log p(x | c)` for inputs `x`, `(x, c)` or `{"x": x, "c": c}`."""
        return self.log_prob(*_split_inputs(inputs))

    def compile(self, optimizer="adam", loss=None, jit_compile=None, **kwargs):
        """As `tf_keras.Model.compile`; the loss is the mean NLL, so give no `loss`.

        `jit_compile=True` XLA-compiles the training step: the same training up
        to float rounding, faster on some CPUs (62 against 73 ms per step on an
        AMD Zen 5 with AVX-512, `benchmarks/results/fit.md`) and slower on
        others (AVX2); each new batch shape compiles once. `jit_compile="auto"`
        compiles the step both ways, runs the first 74 steps (`2 * WARMUP_CALLS +
        4 * TIMED_BLOCKS` of `tfp_naf.jit_choice`)
        alternately through the two (each a real step of the same training),
        and keeps the faster (`tfp_naf.jit_choice.FasterOf`); afterwards
        `jit_compile` is the choice and `jit_choice` has the timings. Under a
        `tf.distribute` strategy "auto" means False: every worker must run the
        same compiled step. Off (None, False) by default, as in Keras.

        Raises:
          TypeError: for a Keras 3 optimizer.
          ValueError: when a `loss` is given, or `jit_compile` is not a bool,
            None or "auto".
        """
        if _is_keras3_object(optimizer):
            raise TypeError(
                f"Got a Keras 3 optimizer ({type(optimizer).__module__}."
                f"{type(optimizer).__name__}). {KERAS3_HELP}"
            )
        if loss is not None:
            raise ValueError(
                "NAFDensityModel's loss is the negative log-likelihood; compile it "
                "without `loss`."
            )
        if not (jit_compile is None or isinstance(jit_compile, bool) or jit_compile == "auto"):
            raise ValueError(f"`jit_compile` must be True, False, None or 'auto'; got "
                             f"{jit_compile!r}.")
        self._auto_jit = jit_compile == "auto"
        object.__setattr__(self, "_jit_step", None)  # Plain attribute: not tracked.
        super().compile(optimizer=optimizer,
                        jit_compile=False if self._auto_jit else jit_compile, **kwargs)

    @property
    def jit_choice(self) -> "dict | None":
        """With `compile(jit_compile="auto")`, once training has begun: `{"choice":
        "tf.function", "xla", or None while still timing (both versions run), "xla_over_
        tf_function": the median time ratio, "ms_per_call": medians of each, "xla_error":
        why XLA was ruled out, or None}`; None otherwise."""
        step = getattr(self, "_jit_step", None)
        if step is None:
            return None
        ratio = step.ratio
        return {"choice": step.choice,
                "xla_over_tf_function": None if ratio is None else round(ratio, 4),
                "ms_per_call": {k: round(1e3 * v, 3) for k, v in step.seconds.items()},
                "xla_error": step.xla_error}

    def make_train_function(self, force=False):
        """Keras' training function; with `compile(jit_compile="auto")`, both compiled
        versions of it behind a `FasterOf` (see `compile`)."""
        if (not getattr(self, "_auto_jit", False) or self.run_eagerly
                or self._distribution_strategy is not None
                or getattr(self, "_cluster_coordinator", None) is not None
                or (self.train_function is not None and not force)):
            return super().make_train_function(force=force)
        # Keras reads `jit_compile` when the function traces (its first call, and
        # any retrace for a new batch shape), so each version sets it for its
        # calls, and between calls it says what was chosen (False until then).
        # Set directly: the setter would reset the cached functions. Written only
        # when it changes: once chosen, a step pays no attribute writes.
        def flagged(fn, value):
            def call(*args, **kwargs):
                if self._jit_compile is not value:
                    self._jit_compile = value
                try:
                    return fn(*args, **kwargs)
                finally:
                    chosen = step.choice == jit_choice.XLA
                    if self._jit_compile is not chosen:
                        self._jit_compile = chosen
            return call

        plain = flagged(super().make_train_function(force=True), False)
        xla = flagged(super().make_train_function(force=True), True)
        self._jit_compile = False

        step = jit_choice.FasterOf(plain, xla)
        object.__setattr__(self, "_jit_step", step)
        self.train_function = step
        return step

    def _saved_variables(self) -> "list[tf.Variable]":
        return list(self._trainable_weights + self._non_trainable_weights) + list(
            self.flow.variables
        )

    def save_own_variables(self, store):
        """Keras-format (`.weights.h5`, `.keras`) saving: every weight, the flow's too.

        Keras' own walk does not reach the MADEs inside the TFP flow, so this
        model saves all of their variables itself.
        """
        for i, variable in enumerate(self._saved_variables()):
            store[str(i)] = variable.numpy()

    def load_own_variables(self, store):
        variables = self._saved_variables()
        if len(store.keys()) != len(variables):
            raise ValueError(
                f"{self.name!r} has {len(variables)} variables, but the saved weights "
                f"hold {len(store.keys())}: the model was saved with another config."
            )
        for i, variable in enumerate(variables):  # Checked before anything is assigned.
            saved_shape = tuple(np.shape(store[str(i)]))
            if saved_shape != tuple(variable.shape.as_list()):
                raise ValueError(
                    f"{self.name!r}: saved weight {i} has shape {saved_shape}, "
                    f"{variable.name} has {tuple(variable.shape.as_list())}: the model was "
                    "saved with another config (num_units, num_layers, transformer, ...); "
                    "nothing was loaded."
                )
        if self._support is not None:  # Checked before anything is assigned.
            index = {id(v): str(i) for i, v in enumerate(variables)}
            problem = self._support_mismatch(*(np.asarray(store[index[id(v)]])
                                               for v in (self.support_low, self.support_high)))
            if problem:
                raise ValueError(problem)
        for i, variable in enumerate(variables):
            variable.assign(store[str(i)])

    def _support_mismatch(self, saved_low, saved_high) -> str:
        """An empty string when saved support bounds (None: saved without a
        support) are this model's, else a sentence saying how they differ."""
        mine = self._support
        if mine is None and saved_low is None:
            return ""
        if (mine is not None and saved_low is not None
                and np.array_equal(saved_low, mine.low) and np.array_equal(saved_high, mine.high)):
            return ""
        saved = ("no support" if saved_low is None
                 else f"support low {np.asarray(saved_low).tolist()}, high "
                 f"{np.asarray(saved_high).tolist()}")
        has = ("no support" if mine is None
               else f"support low {mine.low.tolist()}, high {mine.high.tolist()}")
        return (f"the weights were saved from a model with {saved}; {self.name!r} has {has}. "
                "Build the model with the support it was trained with; nothing was loaded.")

    @staticmethod
    def _is_legacy_h5(filepath, save_format) -> bool:
        path = os.fspath(filepath)
        if save_format is not None:
            return str(save_format).lower() in ("h5", "hdf5")
        return path.endswith((".h5", ".hdf5")) and not path.endswith(".weights.h5")

    def save_weights(self, filepath, overwrite=True, save_format=None, options=None):
        """As `tf_keras.Model.save_weights`, with every weight in every format.

        The legacy HDF5 format (`.h5` / `.hdf5`, not `.weights.h5`) stores a
        model's weights layer by layer and would miss the MADEs inside the TFP
        flow (they are `tf.Module` children, not Keras layers); this model
        writes all of its variables itself there, in a fixed order.
        """
        if not self._is_legacy_h5(filepath, save_format):
            return super().save_weights(
                filepath, overwrite=overwrite, save_format=save_format, options=options
            )
        import h5py

        path = os.fspath(filepath)
        if not overwrite and os.path.exists(path):
            raise FileExistsError(f"{path} exists and overwrite=False.")
        with h5py.File(path, "w") as f:
            f.attrs["tfp_naf_config"] = json.dumps(self.get_config(), sort_keys=True)
            for i, variable in enumerate(self._saved_variables()):
                f.create_dataset(str(i), data=variable.numpy())

    def load_weights(self, filepath, skip_mismatch=False, by_name=False, options=None):
        """As `tf_keras.Model.load_weights`; legacy HDF5 files as `save_weights` wrote them.

        Raises:
          ValueError: when the file was saved from a model with another config.
        """
        path = os.fspath(filepath)
        if not (self._is_legacy_h5(path, None) and os.path.isfile(path)):
            if not path.endswith((".h5", ".hdf5", ".keras")):
                self._check_tf_checkpoint(path)
            return super().load_weights(
                filepath, skip_mismatch=skip_mismatch, by_name=by_name, options=options
            )
        import h5py

        variables = self._saved_variables()
        with h5py.File(path, "r") as f:
            if "tfp_naf_config" not in f.attrs:
                raise ValueError(f"{path} was not written by NAFDensityModel.save_weights.")
            saved = json.loads(f.attrs["tfp_naf_config"])
            mine = json.loads(json.dumps(self.get_config(), sort_keys=True))
            saved.pop("name", None), mine.pop("name", None)
            saved = with_config_defaults(saved)
            if saved != mine or len(f.keys()) != len(variables):
                raise ValueError(
                    f"{path} holds the weights of a model with config {saved}; this "
                    f"model's config is {mine}."
                )
            for i, variable in enumerate(variables):
                variable.assign(f[str(i)][()])

    def _check_tf_checkpoint(self, path: str) -> None:
        """Refuses a TF-format checkpoint whose flow holds another number of
        variables, or that was saved with another support (or with one, or
        without one, where this model differs).

        TensorFlow restores what matches and ignores the rest, so a checkpoint
        of a model with *more* flows (or with support bounds) would load
        silently. Checked before anything is restored; an unreadable path is
        left to Keras' own error.
        """
        try:
            listed = tf.train.list_variables(path)
        except (tf.errors.OpError, ValueError):
            return
        saved = sorted(
            tuple(shape) for name, shape in listed
            if name.startswith("flow/") and name.endswith("/.ATTRIBUTES/VARIABLE_VALUE")
        )
        mine = sorted(tuple(v.shape.as_list()) for v in self.flow.variables)
        if saved != mine:
            raise ValueError(
                f"{path}: the weights hold {len(saved)} flow variables, {self.name!r} has "
                f"{len(mine)}{'' if len(saved) != len(mine) else ' of other shapes'}: they "
                "were saved from a model with another config (num_flows, hidden_units, "
                "num_units, ...); nothing was loaded."
            )
        names = {name for name, _ in listed}

        def read(name):
            key = f"{name}/.ATTRIBUTES/VARIABLE_VALUE"
            return tf.train.load_variable(path, key) if key in names else None

        problem = self._support_mismatch(read("support_low"), read("support_high"))
        if problem:
            raise ValueError(f"{path}: {problem}")

    @staticmethod
    def _refuse_targets(data):
        if tf_keras.utils.unpack_x_y_sample_weight(data)[1] is not None:
            raise ValueError(
                "NAFDensityModel is trained on data alone: give no targets (y). For a "
                "conditional model pass x as {'x': x, 'c': c} (or a tuple (x, c))."
            )

    def train_step(self, data):
        self._refuse_targets(data)
        return super().train_step(data)

    def test_step(self, data):
        self._refuse_targets(data)
        return super().test_step(data)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None):
        """Mean negative log-likelihood `-mean(y_pred)` (weighted), plus `self.losses`.

        Under a `tf.distribute` strategy (`MirroredStrategy`,
        `MultiWorkerMirroredStrategy`) each replica gets part of the global
        batch and the optimizer sums the replicas' gradients, so each replica
        returns its share of the global batch's loss: its weighted NLL sum over
        the global weight total, plus `self.losses` over the number of
        replicas. Training then follows the single-device run, also when a
        replica's part of the last batch is empty.
        """
        nll = -y_pred
        if sample_weight is None:
            weight = tf.ones_like(nll)
        else:
            weight = tf.cast(tf.reshape(sample_weight, tf.shape(nll)), nll.dtype)
        total = tf.reduce_sum(weight)
        nll_sum = tf.reduce_sum(nll * weight)
        regularization = (
            tf.cast(tf.add_n(self.losses), nll.dtype) if self.losses else tf.zeros([], nll.dtype)
        )
        context = tf.distribute.get_replica_context()  # None in a cross-replica context.
        replicas = context.num_replicas_in_sync if context is not None else 1
        global_total = (
            context.all_reduce(tf.distribute.ReduceOp.SUM, total) if replicas > 1 else total
        )
        # Weighted by batch size, so an epoch's "loss" is the mean over examples
        # (the metric sums its replicas' totals and counts).
        self.loss_tracker.update_state(
            tf.math.divide_no_nan(nll_sum, total) + regularization, sample_weight=total
        )
        return tf.math.divide_no_nan(nll_sum, global_total) + regularization / replicas


# Public here too (they were defined in this module before it was split).
from tfp_naf.export import export_saved_model  # noqa: E402
