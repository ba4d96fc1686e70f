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
layers inside a Keras 3 model; all raise a `TypeError` saying what to do.
"""

from __future__ import annotations

import json
import os
import sys
import types
from collections.abc import Sequence
from typing import Any

import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from tfp_naf.flow import NeuralAutoregressiveFlow

tfb, tfd = tfp.bijectors, tfp.distributions

__all__ = [
    "NAFDensityModel",
    "check_keras_model",
    "export_saved_model",
    "flow_kwargs",
    "make_flow",
]

KERAS3_HELP = (
    "tfp_naf models are tf_keras (Keras 2) models, as TensorFlow Probability requires. "
    "Keras 3 cannot train them: a Keras 3 model does not see the weights of a tf_keras "
    "layer and would train nothing. Use `import tf_keras` (tf_keras.Model, "
    "tf_keras.optimizers.Adam, tf_keras.callbacks...) instead of `import keras`, or set "
    "the environment variable TF_USE_LEGACY_KERAS=1 before importing TensorFlow so that "
    "`tf.keras` is tf_keras."
)


# ---- Keras 3 guards -------------------------------------------------------


def _keras3():
    """The Keras 3 module if it has been imported, else None (never imports it)."""
    keras = sys.modules.get("keras")
    version = getattr(keras, "__version__", "")
    return keras if version.startswith("3") else None


def _is_keras3_object(obj) -> bool:
    keras = _keras3()
    if keras is None:
        return False
    kinds = (keras.Layer, keras.optimizers.Optimizer, keras.KerasTensor, keras.Variable)
    return isinstance(obj, kinds)


def _in_keras3_call() -> bool:
    """Whether a Keras 3 layer's `__call__` is running (we are inside its `call`)."""
    if _keras3() is None:
        return False
    try:
        from keras.src.backend.common import global_state
    except ImportError:  # A Keras 3 layout we do not know: skip this check.
        return False
    return global_state.get_global_attribute("current_call_ctx") is not None


def _tf_keras_objects(root, limit: int = 10000) -> "list[Any]":
    """`tf_keras` layers and `tf.Module`s reachable from `root`'s attributes."""
    found, seen, stack = [], set(), [root]
    while stack and len(seen) < limit:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if obj is not root and isinstance(obj, (tf_keras.layers.Layer, tf.Module)):
            found.append(obj)
            continue
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (type, types.ModuleType)):
            stack.extend(vars(obj).values())
    return found


def check_keras_model(model) -> None:
    """Raises a clear `TypeError` if a Keras 3 model holds tf_keras/TFP layers.

    A Keras 3 model (`keras.Model`, or `tf.keras.Model` without
    `TF_USE_LEGACY_KERAS=1`) holding a `NAFDensityModel`, a flow or a MADE does
    not see their variables: it reports no trainable weights and `fit` trains
    nothing without a word. Call this on any model you build around tfp_naf
    objects; `NAFDensityModel` runs the same checks on its own inputs and
    optimizer.

    Args:
      model: any Keras model (or other object).

    Raises:
      TypeError: for a Keras 3 model holding tf_keras layers or TFP modules
        with variables (the message says to use tf_keras instead).

    #### Examples

    ```python
    import tf_keras
    from tfp_naf.keras import NAFDensityModel, check_keras_model

    model = NAFDensityModel(event_size=2, num_flows=1, hidden_units=[8])
    check_keras_model(model)                      # A tf_keras model: fine.
    ```
    """
    if not _is_keras3_object(model):
        return
    keras = _keras3()
    held = [
        obj for obj in _tf_keras_objects(model)
        if not isinstance(obj, (keras.Layer, keras.Variable)) and obj.trainable_variables
    ]
    if held:
        names = ", ".join(sorted({type(obj).__name__ for obj in held}))
        raise TypeError(
            f"The Keras 3 model {type(model).__name__!r} holds tf_keras/TFP objects "
            f"({names}) whose variables it cannot train. {KERAS3_HELP}"
        )


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
) -> tfd.TransformedDistribution:
    """A normalizing-flow density: `num_flows` NAFs with reversals in between.

    ```none
    z = (NAF_K o R o ... o R o NAF_1)(x),   R = reverse the dimensions,
    p(x | c) = N(z; 0, I) |det dz/dx|.
    ```

    Returned as `tfd.TransformedDistribution(tfd.Sample(Normal, [D]),
    tfb.Invert(chain))`, so `log_prob` is one parallel pass per NAF and
    `sample` inverts each NAF (`D` sequential passes). Each NAF starts at the
    identity, so the untrained flow is a standard normal. The NAFs are named
    `f"{name}_naf_{k}"`; pass a condition with
    `bijector_kwargs=flow_kwargs(flow, c)`.

    Args:
      event_size: `D`, the number of dimensions of `x`.
      transformer: "dsf" or "ddsf".
      num_units: sigmoid units per transformer layer.
      num_layers: transformer layers (DDSF only).
      num_flows: how many NAFs to chain.
      hidden_units: hidden layer widths of each MADE conditioner.
      conditional_size: size of the condition `c` for `p(x | c)`, or None.
      context_units: use the compact conditioner with this many context
        features per dimension (see `tfp_naf.CompactAutoregressiveNetwork`).
      dtype: float32 or float64.
      name: name prefix.

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
                dtype=dtype,
                name=f"{name}_naf_{k}",
            )
        )
    base = tfd.Sample(tfd.Normal(tf.zeros([], dtype), tf.ones([], dtype)), [event_size])
    chain = tfb.Chain(list(reversed(bijectors)), name=name)
    return tfd.TransformedDistribution(base, tfb.Invert(chain), name=name)


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
        **kwargs,
    ):
        """Builds the model and all its weights.

        Args:
          event_size, transformer, num_units, num_layers, num_flows,
            hidden_units, conditional_size, context_units: as for `make_flow`.
          dtype: float32 or float64, for the weights and the computation.
          name: model name.
          **kwargs: passed to `tf_keras.Model`.
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
        )
        self.flow = make_flow(**self._flow_config, dtype=self.dtype, name="flow")
        size, csize = self.event_size, self.conditional_size
        self.x_mean = self._fixed_weight("x_mean", [size], "zeros")
        self.x_scale = self._fixed_weight("x_scale", [size], "ones")
        self.c_mean = self._fixed_weight("c_mean", [csize or 0], "zeros")
        self.c_scale = self._fixed_weight("c_scale", [csize or 0], "ones")
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

    def get_config(self) -> "dict[str, Any]":
        """The constructor arguments (JSON-serialisable)."""
        return dict(self._flow_config, dtype=self.dtype, name=self.name)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config)

    # ---- Standardisation -------------------------------------------------

    def adapt(self, x, c=None) -> None:
        """Sets the fixed standardisation to the mean and std of `x` (and `c`).

        A column with zero spread keeps scale 1 (it is only shifted).
        """
        x, c = self._check_inputs(x, c)
        for data, mean_var, scale_var in ((x, self.x_mean, self.x_scale),
                                          (c, self.c_mean, self.c_scale)):
            if data is None:
                continue
            mean, var = tf.nn.moments(data, axes=[0])
            std = tf.sqrt(var)
            mean_var.assign(mean)
            scale_var.assign(tf.where(std > 0, std, tf.ones_like(std)))

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

    def log_prob(self, x, c=None) -> tf.Tensor:
        """`log p(x | c)` in the data's units, shape `x.shape[:-1]`."""
        x, c = self._check_inputs(x, c)
        z = (x - self.x_mean) / self.x_scale
        log_det = -tf.reduce_sum(tf.math.log(self.x_scale))
        return self.flow.log_prob(z, **self._flow_kwargs(c)) + log_det

    def sample(self, n, c=None, seed=None) -> tf.Tensor:
        """`n` samples `[n, D]`, in data units.

        Args:
          n: how many samples.
          c: for a conditional model, the condition: `[C]` (the same for all
            samples) or `[n, C]` (one per sample).
          seed: an int (reproducible: the same seed gives the same samples in
            any process, also through `export_saved_model`) or None.
        """
        n = tf.convert_to_tensor(n, tf.int32)
        if c is not None:
            c = tf.broadcast_to(tf.cast(c, self.dtype), tf.stack([n, self.conditional_size]))
        _, c = self._check_inputs(tf.zeros([0, self.event_size], self.dtype), c)
        if seed is not None:
            seed = tf.stack([tf.cast(seed, tf.int32), tf.constant(0, tf.int32)])
        z = self.flow.sample(n, seed=seed, **self._flow_kwargs(c))
        return z * self.x_scale + self.x_mean

    # ---- Keras hooks -----------------------------------------------------

    def call(self, inputs, training=None):
        """`log p(x | c)` for inputs `x`, `(x, c)` or `{"x": x, "c": c}`."""
        return self.log_prob(*_split_inputs(inputs))

    def compile(self, optimizer="adam", loss=None, **kwargs):
        """As `tf_keras.Model.compile`; the loss is the mean NLL, so give no `loss`.

        Raises:
          TypeError: for a Keras 3 optimizer.
          ValueError: when a `loss` is given.
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
        super().compile(optimizer=optimizer, **kwargs)

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
        for i, variable in enumerate(variables):
            variable.assign(store[str(i)])

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
            if saved != mine or len(f.keys()) != len(variables):
                raise ValueError(
                    f"{path} holds the weights of a model with config {saved}; this "
                    f"model's config is {mine}."
                )
            for i, variable in enumerate(variables):
                variable.assign(f[str(i)][()])

    def _check_tf_checkpoint(self, path: str) -> None:
        """Refuses a TF-format checkpoint whose flow holds another number of variables.

        TensorFlow restores what matches and ignores the rest, so a checkpoint
        of a model with *more* flows would load silently. Checked before
        anything is restored; an unreadable path is left to Keras' own error.
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


# ---- SavedModel export --------------------------------------------------


class _Exported(tf.Module):
    """The tf.Module written by `export_saved_model` (holds the model's variables)."""

    def __init__(self, model: NAFDensityModel):
        super().__init__(name="tfp_naf_export")
        # Track the variables, not the Keras model (whose own SavedModel
        # serialisation wants a traced `call` and adds nothing here).
        self.model_variables = list(model.variables)
        dtype = tf.as_dtype(model.dtype)
        x_spec = tf.TensorSpec([None, model.event_size], dtype, name="x")
        n_spec = tf.TensorSpec([], tf.int32, name="n")
        seed_spec = tf.TensorSpec([], tf.int32, name="seed")
        if model.conditional:
            c_spec = tf.TensorSpec([None, model.conditional_size], dtype, name="c")

            def log_prob(x, c):
                return {"log_prob": model.log_prob(x, c)}

            def sample(n, seed, c):
                return {"x": model.sample(n, c=c, seed=seed)}

            signatures = ([x_spec, c_spec], [n_spec, seed_spec, c_spec])
        else:

            def log_prob(x):
                return {"log_prob": model.log_prob(x)}

            def sample(n, seed):
                return {"x": model.sample(n, seed=seed)}

            signatures = ([x_spec], [n_spec, seed_spec])
        # No AutoGraph: the flow's loops are explicit tf.while_loops already.
        self.log_prob = tf.function(log_prob, input_signature=signatures[0], autograph=False)
        self.sample = tf.function(sample, input_signature=signatures[1], autograph=False)


def export_saved_model(model: NAFDensityModel, path: "str | os.PathLike") -> None:
    """Writes `model` as a TensorFlow SavedModel that needs no tfp_naf to run.

    The SavedModel has two signatures (also callable as attributes of the
    loaded object):

    * `log_prob(x[, c])` -> `{"log_prob": [N]}`, with `x: [N, D]`,
      `c: [N, C]` for a conditional model;
    * `sample(n, seed[, c])` -> `{"x": [n, D]}`, with int32 scalars `n` and
      `seed` (the same seed gives the same samples as
      `model.sample(n, c, seed=seed)`), and `c: [1, C]` or `[n, C]`.

    Only TensorFlow is needed to load it: `tf.saved_model.load(path)`.

    #### Examples

    ```python
    import tempfile
    import tensorflow as tf
    from tfp_naf.keras import NAFDensityModel, export_saved_model

    model = NAFDensityModel(event_size=2, num_flows=1, hidden_units=[8])
    path = tempfile.mkdtemp() + "/naf"
    export_saved_model(model, path)
    loaded = tf.saved_model.load(path)
    loaded.log_prob(tf.zeros([3, 2]))["log_prob"].shape        # [3]
    loaded.signatures["sample"](n=tf.constant(4), seed=tf.constant(0))["x"].shape   # [4, 2]
    ```
    """
    if not isinstance(model, NAFDensityModel):
        raise TypeError(f"`model` must be a NAFDensityModel; got {type(model).__name__}.")
    module = _Exported(model)
    tf.saved_model.save(
        module,
        os.fspath(path),
        signatures={"log_prob": module.log_prob, "sample": module.sample},
    )
