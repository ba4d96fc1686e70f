"""SavedModel export: a `NAFDensityModel` as a TensorFlow SavedModel.

The SavedModel needs only TensorFlow to load and run (no tfp_naf, no TFP).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import tensorflow as tf

if TYPE_CHECKING:
    from tfp_naf.keras import NAFDensityModel

__all__ = ["export_saved_model"]


class _Exported(tf.Module):
    """The tf.Module written by `export_saved_model` (holds the model's variables)."""

    def __init__(self, model: "NAFDensityModel"):
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


def export_saved_model(model: "NAFDensityModel", path: "str | os.PathLike") -> None:
    """Writes `model` as a TensorFlow SavedModel that needs no tfp_naf to run.

    The SavedModel has two signatures (also callable as attributes of the
    loaded object):

    * `log_prob(x[, c])` -> `{"log_prob": [N]}`, with `x: [N, D]`,
      `c: [N, C]` for a conditional model;
    * `sample(n, seed[, c])` -> `{"x": [n, D]}`, with int32 scalars `n` and
      `seed` (the same seed gives the same samples as
      `model.sample(n, c, seed=seed)`), and `c: [1, C]` or `[n, C]`.

    A model's bounded support (`support=`) is part of both: `log_prob` is
    `-inf` outside it and every sample lies inside it, as with the model.
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
    from tfp_naf.keras import NAFDensityModel  # Here: tfp_naf.keras imports this module.

    if not isinstance(model, NAFDensityModel):
        raise TypeError(f"`model` must be a NAFDensityModel; got {type(model).__name__}.")
    module = _Exported(model)
    tf.saved_model.save(
        module,
        os.fspath(path),
        signatures={"log_prob": module.log_prob, "sample": module.sample},
    )
