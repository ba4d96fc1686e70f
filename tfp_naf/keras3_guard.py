"""Keras 3 guards: refusing Keras 3 objects that cannot train tf_keras/TFP layers.

TFP (and therefore this package) uses Keras 2 through the `tf_keras` package.
Keras 3 (`import keras`, or `tf.keras` without `TF_USE_LEGACY_KERAS=1`) cannot
train these layers: a Keras 3 model does not see the variables of a `tf_keras`
layer and would silently train nothing. `NAFDensityModel` refuses Keras 3
optimizers and Keras 3 symbolic inputs (through the helpers here), and
`check_keras_model` finds our layers inside a Keras 3 model; all raise a
`TypeError` saying what to do. Nothing here imports Keras 3: it is only
looked at when the user has imported it.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import tensorflow as tf
import tf_keras

__all__ = ["KERAS3_HELP", "check_keras_model"]

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
