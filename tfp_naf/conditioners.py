"""Conditioners: MADE networks that give each dimension its transformer's parameters.

A conditioner maps `x` (and optionally a conditional input `c`) to
pseudo-parameters `theta` of shape `[..., D, P]` such that `theta[..., i, :]`
depends on `x` only through the dimensions before `i` in the autoregressive
order. Two are offered:

* `tfp.bijectors.AutoregressiveNetwork(params=P)` itself: a MADE whose output
  layer emits all `P` parameters of every dimension.
* `CompactAutoregressiveNetwork(context_units=C, params=P)`: a MADE that emits
  `C << P` context features per dimension, mapped to the `P` parameters by one
  dense layer shared by all dimensions (plus a per-dimension bias). The shared
  layer acts on each dimension separately, so the autoregressive structure is
  kept, and the MADE's output layer shrinks by `P / C`. This is how the
  original NAF code kept its conditioner cheap.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras
from tensorflow_probability.python.internal import prefer_static as ps

tfb = tfp.bijectors

# Scale of the conditioner's initial output weights (times a Glorot
# initialisation; the bias is N(0, scale^2)). Not zero, so the units of a
# transformer are distinct; 0.3 rather than a near-identity 1e-2 because it
# learns faster, chosen on validation data (benchmarks/README.md).
OUTPUT_INIT_SCALE = 0.3

# Scale `s` of the first hidden layer's initial biases in the MADEs a flow builds,
# `U(-s, s) / sqrt(fan_in)` (PyTorch's default bias initialisation at `s = 1`); 0 keeps
# Keras' zeros. With zero biases every ReLU of the first hidden layer has its kink on a
# hyperplane through the origin, and so, at the start, does the whole network: in 2-D the
# second dimension's conditioner is piecewise linear in `x_1` with its only kink at 0.
# Spreading the first layer's kinks learns pinwheel faster and is level elsewhere on
# validation, against a control drawing the same random numbers; spreading every hidden
# layer's loses SLCP (benchmarks/README.md, "The MADE's hidden biases, against a matched
# control"). `HIDDEN_BIAS_FRACTION` of the units, interleaved, are spread, the others keeping
# their kinks at the origin: every unit by default. Half of them won checkerboard back but
# lost MiniBooNE, both by about 2 standard errors ("Half of the first layer's units").
# Conditional MADEs keep zeros (`CONDITIONAL_HIDDEN_BIAS_SCALE`): no gain was measured on the
# conditional task. All three are read when a flow builds its conditioner.
HIDDEN_BIAS_SCALE = 1.0
HIDDEN_BIAS_FRACTION = 1.0
CONDITIONAL_HIDDEN_BIAS_SCALE = 0.0

__all__ = [
    "add_to_first_offsets",
    "call_conditioner",
    "CompactAutoregressiveNetwork",
    "IncrementalHead",
    "dimension_head",
    "incremental_head",
    "match_dtype",
    "solve_order",
    "shrink_output_layer",
    "spread_hidden_biases",
]


class CompactAutoregressiveNetwork(tf_keras.layers.Layer):
    """A MADE with a small per-dimension context and a shared output layer.

    ```none
    h = MADE(x, c)                     # [..., D, context_units]
    theta[..., i, :] = h[..., i, :] @ W + bias[i]     # W: [context_units, P]
    ```

    `W` starts at `OUTPUT_INIT_SCALE` (0.3) times a Glorot initialisation and
    `bias` at `initial_params + N(0, OUTPUT_INIT_SCALE^2)`, so `theta` starts
    near `initial_params` (0: the transformers near the identity), with
    distinct units in each transformer. (All-zero weights would tie them:
    identical units get identical gradients and never separate.)

    #### Examples

    ```python
    net = CompactAutoregressiveNetwork(
        params=48, context_units=8, event_shape=[43], hidden_units=[128, 128])
    theta = net(tf.zeros([512, 43]))   # [512, 43, 48]
    ```
    """

    def __init__(
        self,
        params: int,
        context_units: int,
        event_shape: "Sequence[int] | int | None" = None,
        hidden_units: "Sequence[int] | None" = None,
        conditional: bool = False,
        conditional_event_shape: "Sequence[int] | int | None" = None,
        conditional_input_layers: str = "all_layers",
        input_order: "str | Sequence[int]" = "left-to-right",
        hidden_degrees: str = "equal",
        activation=None,
        initial_params: "Sequence[float] | None" = None,
        **kwargs,
    ):
        """Builds the layer.

        Args:
          params: `P`, pseudo-parameters per dimension.
          context_units: `C`, context features per dimension from the MADE.
          initial_params: `P` values added to the initial per-dimension bias,
            so `theta` starts near them (for example a transformer's
            `initial_params`); None for 0.
          event_shape, hidden_units, conditional, conditional_event_shape,
            conditional_input_layers, input_order, hidden_degrees, activation:
            as for `tfp.bijectors.AutoregressiveNetwork`.
          **kwargs: passed to `tf_keras.layers.Layer` (for example `dtype`).
        """
        super().__init__(**kwargs)
        if int(context_units) < 1 or int(params) < 1:
            raise ValueError(
                f"`params` and `context_units` must be >= 1; got {params}, "
                f"{context_units}."
            )
        self._params = int(params)
        self._context_units = int(context_units)
        self._initial_params = (
            None if initial_params is None else np.asarray(initial_params, np.float64)
        )
        if self._initial_params is not None and self._initial_params.shape != (self._params,):
            raise ValueError(
                f"`initial_params` must have shape [{self._params}]; got "
                f"{self._initial_params.shape}."
            )
        self._made = tfb.AutoregressiveNetwork(
            params=self._context_units,
            event_shape=event_shape,
            hidden_units=hidden_units,
            conditional=conditional,
            conditional_event_shape=conditional_event_shape,
            conditional_input_layers=conditional_input_layers,
            input_order=input_order,
            hidden_degrees=hidden_degrees,
            activation=activation,
            dtype=self.dtype,
        )

    def build(self, input_shape):
        self._made.build(input_shape)
        match_dtype(self._made)
        event_size = int(input_shape[-1])
        self._kernel = self.add_weight(
            name="kernel",
            shape=[self._context_units, self._params],
            initializer=tf_keras.initializers.VarianceScaling(
                scale=OUTPUT_INIT_SCALE**2, mode="fan_avg", distribution="uniform"
            ),
            dtype=self.dtype,
        )
        self._bias = self.add_weight(
            name="bias",
            shape=[event_size, self._params],
            initializer=tf_keras.initializers.RandomNormal(stddev=OUTPUT_INIT_SCALE),
            dtype=self.dtype,
        )
        if self._initial_params is not None:
            offset = np.tile(self._initial_params, [event_size, 1])
            self._bias.assign_add(offset.astype(self._bias.dtype.as_numpy_dtype))
        super().build(input_shape)

    def call(self, x, conditional_input=None, offset=None):
        """`[N, D]` -> `[N, D, P]`; an `offset` (`[D, P]`: base parameters) joins the bias."""
        context = call_conditioner(self._made, x, conditional_input)
        # One [rows, C] x [C, P] matmul: faster than the equivalent einsum, whose
        # gradient XLA lowered to slower contractions (5 heads' forward+backward at
        # D = 43, batch 512: 20.5 against 25 ms under XLA, 18 against 20 without).
        flat = tf.reshape(context, [-1, self._context_units])
        out = tf.reshape(tf.matmul(flat, self._kernel),
                         ps.concat([ps.shape(context)[:-1], [self._params]], axis=0))
        return out + (self._bias if offset is None else self._bias + offset)

    @property
    def params(self) -> int:
        return self._params

    @property
    def context_units(self) -> int:
        return self._context_units

    @property
    def event_shape(self):
        return self._made.event_shape

    @property
    def made(self) -> tfb.AutoregressiveNetwork:
        """The inner MADE that emits the context features."""
        return self._made


def _degrees(conditioner) -> "np.ndarray | None":
    """The MADE's input degrees (1..D) once built, else None."""
    made = getattr(conditioner, "made", conditioner)
    degrees = getattr(made, "_input_order", None)
    return None if degrees is None else np.asarray(degrees)


def solve_order(conditioner) -> "np.ndarray | None":
    """Dimension indices in autoregressive order, or None if unknown.

    Reads the input degrees of a built `tfb.AutoregressiveNetwork` (or the MADE
    inside a `CompactAutoregressiveNetwork`). For other conditioners the order
    is unknown and the flow's inverse solves every dimension at every pass.
    """
    degrees = _degrees(conditioner)
    return None if degrees is None else np.argsort(degrees, kind="stable")


def match_dtype(made) -> None:
    """Makes every layer of a built MADE compute in the MADE's own dtype.

    `tfb.AutoregressiveNetwork` gives its `Dense` layers its dtype but not its
    `Activation` and `Add` layers, which keep the default float32 policy and
    cast their inputs to float32: a float64 MADE computes its hidden units in
    float32, and a conditional float64 MADE even returns float32. This sets
    those layers to the MADE's dtype. Does nothing to an unbuilt MADE or to
    conditioners that are not MADEs.
    """
    made = getattr(made, "made", made)
    network = getattr(made, "_network", None)
    if network is None:
        return
    for layer in network.layers:
        if layer.dtype != made.dtype:
            layer._set_dtype_policy(made.dtype)


def shrink_output_layer(
    made: tfb.AutoregressiveNetwork,
    scale: "float | None" = None,
    offset: "np.ndarray | None" = None,
) -> None:
    """Scales the output kernel of a built MADE by `scale`; bias `N(0, scale^2)` (+ `offset`).

    `scale` defaults to `OUTPUT_INIT_SCALE`, read at call time. `offset`, a
    vector of the `P` pseudo-parameters of one dimension (for example a
    transformer's `initial_params`), is added to every dimension's bias, so
    the conditioner's output starts near it.

    Used on the MADEs the flow builds itself, so that the flow starts near
    `offset` (the transformers' `initial_params`) with a controlled spread of
    pseudo-parameters. Nothing is zeroed: with an all-zero output every unit of a
    transformer starts identical, receives identical gradients and never
    separates (a DSF would stay an affine map). The bias matters most: the
    first dimension's parameters are the bias alone. Scaling keeps the
    autoregressive masks (masked entries stay zero). The output layer is every
    Dense layer after the last activation (the autoregressive one and, for a
    conditional MADE, the conditional one).
    """
    scale = OUTPUT_INIT_SCALE if scale is None else scale
    network = getattr(made, "_network", None)
    if network is None:
        raise ValueError("The MADE must be built before its output layer is scaled.")
    dense = _output_denses(network)
    for layer in dense:
        layer.kernel.assign(layer.kernel * tf.cast(scale, layer.kernel.dtype))
        if layer.bias is not None:
            layer.bias.assign(
                tf.random.normal(layer.bias.shape, stddev=scale, dtype=layer.bias.dtype)
            )
    if offset is not None:
        layer = _biased_output_layer(dense)
        offset = np.asarray(offset, layer.bias.dtype.as_numpy_dtype)
        layer.bias.assign_add(np.tile(offset, layer.bias.shape[0] // offset.shape[0]))


def spread_hidden_biases(made, scale: "float | None" = None, seed=None,
                         fraction: "float | None" = None) -> None:
    """Draws the first hidden layer's biases of a built MADE, `U(-scale, scale) / sqrt(fan_in)`.

    ```none
    h_1 = relu(x @ (M_1 * W_1) + b_1),    b_1 ~ U(-scale, scale) / sqrt(D_in)
    ```

    for a `fraction` of its units (the others keep zero), so the first layer's
    ReLU kinks `x @ (M_1 * W_1) = -b_1` do not all pass through the origin. The
    spread units are interleaved, unit `j` of `n` when `floor((j + 1) f) >
    floor(j f)` (every other one at `f = 1/2`), so every degree of the MADE's
    sorted hidden degrees gets some. `scale` and `fraction` default to
    `HIDDEN_BIAS_SCALE` and `HIDDEN_BIAS_FRACTION`, read at call time; `fan_in`
    is the layer's number of inputs (its kernel's rows, masked or not). The
    random draw is the whole layer's whatever the fraction.

    The first hidden layer is the first biased Dense layer: later hidden
    layers, the output layer (see `shrink_output_layer`) and a conditional
    MADE's bias-free conditional layers are left alone. For a
    `CompactAutoregressiveNetwork`, its inner MADE's. Keeps the autoregressive
    masks: only biases change, and a bias feeds every output its unit feeds
    already.
    """
    scale = HIDDEN_BIAS_SCALE if scale is None else float(scale)
    fraction = HIDDEN_BIAS_FRACTION if fraction is None else float(fraction)
    if not np.isfinite(scale) or scale < 0.0:
        raise ValueError(f"`scale` must be finite and >= 0; got {scale}.")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"`fraction` must be in [0, 1]; got {fraction}.")
    made = getattr(made, "made", made)
    network = getattr(made, "_network", None)
    if network is None:
        raise ValueError("The MADE must be built before its hidden biases are drawn.")
    if scale == 0.0:  # Keras' zeros, and no random draws (later ones keep their seeds).
        return
    output = {id(layer) for layer in _output_denses(network)}
    gen = tf.random.Generator.from_seed(seed) if seed is not None else None
    layer = next((d for d in network.layers
                  if isinstance(d, tf_keras.layers.Dense) and id(d) not in output
                  and d.bias is not None), None)
    if layer is None:  # No hidden layer.
        return
    dtype = layer.bias.dtype
    bound = tf.constant(scale / np.sqrt(int(layer.kernel.shape[0])), dtype)
    shape = layer.bias.shape
    unit = (gen.uniform(shape, -1.0, 1.0, dtype=dtype) if gen is not None
            else tf.random.uniform(shape, -1.0, 1.0, dtype=dtype))
    j = np.arange(int(shape[0]))
    spread = np.floor((j + 1) * fraction) > np.floor(j * fraction)
    layer.bias.assign(bound * unit * tf.constant(spread, dtype))


def _output_denses(network) -> list:
    """The MADE's output layer: every Dense after the last activation."""
    layers = list(network.layers)
    activations = [
        i for i, layer in enumerate(layers) if isinstance(layer, tf_keras.layers.Activation)
    ]
    tail = layers[activations[-1] + 1 :] if activations else layers
    dense = [layer for layer in tail if isinstance(layer, tf_keras.layers.Dense)]
    if not dense:
        raise ValueError("Could not find the output layer of the MADE.")
    return dense


def _biased_output_layer(dense):
    """The autoregressive (masked) output layer, whose bias is `[D * P]`, dimension-major."""
    layer = next((d for d in dense if d.bias is not None and d.kernel_constraint is not None),
                 None)
    if layer is None:
        raise ValueError("Could not find the biased autoregressive output layer of the MADE.")
    return layer


def add_to_first_offsets(conditioner, delta: "np.ndarray | None") -> None:
    """Adds `delta` (`[P]`) to the output offsets of the first dimension in autoregressive order.

    That dimension's conditioner sees no `x`: its parameters are these offsets
    (plus, for a conditional MADE, a function of the condition). For a built
    `tfb.AutoregressiveNetwork` or `CompactAutoregressiveNetwork`; None does
    nothing.
    """
    if delta is None:
        return
    first = int(solve_order(conditioner)[0])
    if isinstance(conditioner, CompactAutoregressiveNetwork):
        bias = conditioner._bias
        delta = np.asarray(delta, bias.dtype.as_numpy_dtype)
        bias.assign(tf.tensor_scatter_nd_add(bias, [[first]], delta[np.newaxis]))
        return
    layer = _biased_output_layer(_output_denses(conditioner._network))
    num_params = int(conditioner._params)
    full = np.zeros(layer.bias.shape[0], layer.bias.dtype.as_numpy_dtype)
    full[first * num_params:(first + 1) * num_params] = delta
    layer.bias.assign_add(full)


# Conditioner -> its head (or None). Weak and outside the conditioner, so the
# Keras sub-model is neither tracked by the conditioner nor saved with it.
_HEADS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _made_head(made: tfb.AutoregressiveNetwork):
    """`(x, d, c) -> theta[:, d, :]` of a built MADE, from a slice of its output layer.

    The MADE's output layer (a masked Dense, plus the conditional Dense when
    conditional) has `D * P` columns, dimension-major. This evaluates the
    hidden layers (a Keras sub-model sharing the MADE's layers) and only the
    `P` output columns of dimension `d`.
    """
    network = made._network
    out_layer = network.outputs[0]._keras_history.layer
    if isinstance(out_layer, tf_keras.layers.Add):
        denses = [t._keras_history.layer for t in out_layer.input]
    else:
        denses = [out_layer]
    if not all(isinstance(layer, tf_keras.layers.Dense) for layer in denses):
        return None
    features = tf_keras.Model(network.inputs, [layer.input for layer in denses])
    event_size, params = int(made._event_size), int(made._params)

    def head(x, d, conditional_input=None):
        inputs = x if conditional_input is None else [x, conditional_input]
        feats = features(inputs)
        feats = feats if isinstance(feats, (list, tuple)) else [feats]
        return sum(_dimension_outputs(f, layer, d, event_size, params)
                   for f, layer in zip(feats, denses, strict=True))

    return head


def _dimension_outputs(h, layer, d, event_size, num_params):
    """Dimension `d`'s `P` outputs of a Dense layer with `D * P` dimension-major columns."""
    # Strided slices (not gathers): their gradients are dense tensors.
    theta = tf.matmul(h, tf.reshape(layer.kernel, [-1, event_size, num_params])[:, d, :])
    if layer.use_bias:
        theta += tf.reshape(layer.bias, [event_size, num_params])[d]
    return theta


def dimension_head(conditioner) -> "Callable | None":
    """A function `(x, d, conditional_input=None) -> theta[:, d, :]`, or None.

    The flow's inverse needs one dimension's parameters per sequential pass;
    computing all `D` of them would make the output layer `D` times more
    expensive than needed. For a built `tfb.AutoregressiveNetwork` or
    `CompactAutoregressiveNetwork` this evaluates the hidden layers and only
    dimension `d`'s slice of the output layer (equal to `conditioner(x)[:, d]`
    up to rounding). `x` is `[N, D]`, `d` a scalar int tensor. Other
    conditioners give None (the flow then evaluates them whole).
    """
    def compact(net, inner):
        def head(x, d, conditional_input=None):
            return tf.matmul(inner(x, d, conditional_input), net._kernel) + net._bias[d]

        return head

    return _cached_head(_HEADS, conditioner, _made_head, compact)


def _cached_head(cache, conditioner, made_head, compact_head):
    """`made_head(made)` for a built MADE, `compact_head(net, made_head(net.made))`
    for a `CompactAutoregressiveNetwork`, else None; cached per conditioner."""
    if conditioner in cache:
        return cache[conditioner]
    head = None
    try:
        if isinstance(conditioner, CompactAutoregressiveNetwork):
            inner = made_head(conditioner.made)
            head = None if inner is None else compact_head(conditioner, inner)
        elif type(conditioner) is tfb.AutoregressiveNetwork:
            head = made_head(conditioner)
    except (AttributeError, TypeError, ValueError):  # Not built, or an unknown layout.
        head = None
    if head is not None:
        cache[conditioner] = head
    return head


class IncrementalHead(NamedTuple):
    """One dimension's parameters per pass of the inverse, the MADE's state carried between passes.

    Pass `k` of the inverse changes one input, `x_d`, from 0 to its solution,
    so the first layer's pre-activation `x @ W1 + b1` changes by
    `x_d * W1[d]`: the state carries it between passes instead of recomputing
    the `[N, D] x [D, H1]` product every time. It also carries the later
    hidden layers' activations, each unit computed once, at the pass after
    which every input it depends on is solved (from the few kernel columns of
    the units that became ready, instead of the whole `[N, H] x [H, H]`
    product at every pass), and the output layer runs only for dimension
    `d`'s `P` outputs. In a conditional MADE the conditional input's terms
    `c @ V_l` do not change between passes: the first layer's is folded into
    the carried pre-activation and the other hidden layers' are carried
    alongside, so `c` is multiplied by each hidden layer's `V_l` once per
    inverse instead of once per pass.
    """

    start: Callable
    """`(x, conditional_input=None) -> state`: the state at `x` (and `c`)."""
    params: Callable
    """`(state, d) -> theta[:, d, :]`, `[N, P]`."""
    update: Callable
    """`(state, d, x_d) -> state` after input `d` moved from 0 to `x_d`."""


_INCREMENTAL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def incremental_head(conditioner) -> "IncrementalHead | None":
    """An `IncrementalHead` for a built MADE (or compact network), else None.

    Equal to `conditioner(x, c)[:, d]` up to rounding at every pass where the
    inputs not yet solved are 0 (as in the flow's inverse). MADEs without
    hidden layers and other conditioners give None (the flow then uses
    `dimension_head`).
    """
    def compact(net, inner):
        def params(state, d):
            return tf.matmul(inner.params(state, d), net._kernel) + net._bias[d]

        return IncrementalHead(inner.start, params, inner.update)

    return _cached_head(_INCREMENTAL, conditioner, _made_incremental, compact)


def _is_linear_dense(layer) -> bool:
    return (type(layer) is tf_keras.layers.Dense
            and layer.activation is tf_keras.activations.linear)


def _made_layers(made: tfb.AutoregressiveNetwork):
    """`(blocks, activations)` of a built MADE, input to output, or None for another layout.

    `blocks[l] = (dense, conditional_dense or None)`: layer `l` is
    `dense(h) + conditional_dense(c)`; `activations[l]` follows `blocks[l]`.
    Read from the Keras graph backwards from the output, as
    `tfb.AutoregressiveNetwork` lays it out: Dense, or Add of a Dense of the
    previous layer and a bias-free Dense of the conditional input.
    """
    network = made._network
    x_input = network.inputs[0]
    c_input = network.inputs[1] if len(network.inputs) > 1 else None
    blocks, activations = [], []
    t = network.outputs[0]
    while True:
        layer = t._keras_history.layer
        c_dense = None
        if isinstance(layer, tf_keras.layers.Add):
            if len(layer.input) != 2:
                return None
            a, b = layer.input
            layer, c_dense = a._keras_history.layer, b._keras_history.layer
            if (not _is_linear_dense(c_dense) or c_dense.use_bias or c_input is None
                    or c_dense.input is not c_input):
                return None
        if not _is_linear_dense(layer):
            return None
        blocks.append((layer, c_dense))
        t = layer.input
        if t is x_input:
            break
        activation = t._keras_history.layer
        if type(activation) is not tf_keras.layers.Activation:
            return None
        activations.append(activation)
        t = activation.input
    return blocks[::-1], activations[::-1]


def _affine(h, dense, term=None, offset=None):
    """`dense(h)`, plus a conditional layer's `term = c @ V` and an `offset`, folded into the bias.

    `h @ K + (b + term)` rather than `(h @ K + b) + term`, which is what a
    conditional `tfb.AutoregressiveNetwork` computes (a Dense layer, then an
    Add layer): TensorFlow's oneDNN graph rewrite ("remapper") fails on the
    pattern `MatMul, BiasAdd, Add, Relu`, logs errors ("Op type not
    registered ''", "has an empty op name") and leaves the whole
    `tf.function` without its graph optimisations. An `offset` (`[units]`,
    shared by every row) joins the bias, so `h @ K + (b + offset)` stays one
    fused matmul and bias addition, and its gradient one reduction over rows.
    """
    out = tf.matmul(h, dense.kernel)
    bias = dense.bias if dense.use_bias else None
    if offset is not None:
        bias = offset if bias is None else bias + offset
    if term is not None:
        return out + (term if bias is None else term + bias)
    return out if bias is None else tf.nn.bias_add(out, bias)


_MADE_FORWARDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _made_forward(made) -> "Callable | None":
    """`(x [N, D], c [N, C] or None, offset [D, P] or None) -> [N, D, P]` of a built MADE, or None.

    The MADE's own arithmetic, layer by layer through `_affine`, with `offset`
    added to every row's outputs inside the output layer's bias. None for an
    unbuilt MADE or another layout. Cached per MADE.
    """
    if made in _MADE_FORWARDS:
        return _MADE_FORWARDS[made]
    if type(made) is not tfb.AutoregressiveNetwork or not made.built:
        return None
    try:
        layout = _made_layers(made)
    except (AttributeError, TypeError, ValueError):
        layout = None
    if layout is None:
        return None
    blocks, activations = layout
    shape = [-1, int(made._event_size), int(made._params)]
    last = len(blocks) - 1

    def forward(x, c=None, offset=None):
        h = x
        for i, (dense, c_dense) in enumerate(blocks):
            term = None if c_dense is None else tf.matmul(c, c_dense.kernel)
            flat = tf.reshape(offset, [-1]) if i == last and offset is not None else None
            h = _affine(h, dense, term, flat)
            if i < len(activations):
                h = activations[i](h)
        return tf.reshape(h, shape)

    _MADE_FORWARDS[made] = forward
    return forward


def call_conditioner(conditioner, x, conditional_input=None, offset=None):
    """`conditioner(x, conditional_input=c) + offset`; `x` `[N, D]`, `c` `[N, C]`, offset `[D, P]`.

    A built `tfb.AutoregressiveNetwork` is evaluated through `_made_forward`
    when it is conditional or given an offset: the same values and gradients,
    without the graph-rewrite failure described in `_affine`, and with the
    offset (the flow's base parameters) inside the output layer's bias instead
    of one more addition of the whole `[N, D, P]` output; a
    `CompactAutoregressiveNetwork` adds it to its own `[D, P]` bias. Anything
    else is called.
    """
    if isinstance(conditioner, CompactAutoregressiveNetwork) and offset is not None:
        return conditioner(x, conditional_input=conditional_input, offset=offset)
    forward = _made_forward(conditioner) if x.shape.rank == 2 else None
    if forward is not None and (conditional_input is not None or offset is not None):
        c = (None if conditional_input is None
             else tf.convert_to_tensor(conditional_input, dtype=x.dtype))
        return forward(x, c, offset)
    if conditional_input is None:
        theta = conditioner(x)
    else:
        theta = conditioner(x, conditional_input=conditional_input)
    return theta if offset is None else theta + offset


def _is_relu(activation_layer) -> bool:
    """Whether a MADE's `Activation` layer applies a plain ReLU."""
    fn = getattr(activation_layer, "activation", None)
    return fn is tf_keras.activations.relu or fn is tf.nn.relu


def _ready_passes(made, blocks) -> "list[np.ndarray] | None":
    """Per hidden layer, each unit's ready pass, or None if unknown.

    A MADE unit depends on the inputs its masks connect it to, through the
    layers before it. Unit `j` of a hidden layer is *ready* once every input
    it depends on is solved: after the input of degree `ready[j]` (0 for a
    unit that depends on no input). Read from the MADE's masks and input
    degrees; None when they are not there or do not match the layers.
    """
    masks, degrees = getattr(made, "_masks", None), _degrees(made)
    if masks is None or degrees is None or len(masks) != len(blocks):
        return None
    ready = np.asarray(degrees, np.int64)
    out = []
    for mask, (dense, _) in zip(masks[:-1], blocks[:-1], strict=True):
        mask = np.asarray(mask, bool)
        if mask.shape != tuple(dense.kernel.shape):
            return None
        ready = np.max(np.where(mask, ready[:, np.newaxis], 0), axis=0, initial=0)
        out.append(ready)
    return out


def _units_by_dimension(ready, degrees) -> np.ndarray:
    """`[D, m]`: the units that become ready once dimension `d` is solved, padded with `H`.

    Dimension `d` is solved as the `degrees[d]`-th input, so its units are
    those with `ready == degrees[d]`; `m` is the largest such set, and the
    padding `H` (the layer's width) marks an empty slot.
    """
    width = len(ready)
    sets = [np.flatnonzero(ready == degree) for degree in degrees]
    m = max(1, max(len(u) for u in sets))
    return np.stack([np.pad(u, (0, m - len(u)), constant_values=width) for u in sets])


def _made_incremental(made: tfb.AutoregressiveNetwork) -> "IncrementalHead | None":
    """The `IncrementalHead` of a MADE laid out as in `_made_layers`, with hidden layers.

    The state also carries every hidden layer's activations, each unit
    computed once, at the pass where it becomes ready (`_ready_passes`): the
    inputs a unit depends on do not change after they are solved, and the
    units not yet ready meet the next outputs only through masked (zero)
    weights. So a pass applies the activation to the few units that became
    ready and multiplies them by their kernel columns, not the whole layer by
    the whole kernel: with hidden layers `[H, H]` and `D` inputs, about `H / D`
    units instead of `H`. The first layer's pre-activation is carried whole
    (each pass adds the solved input's kernel row to it); its activations are
    carried the same way unless the activation is a ReLU, cheaper to apply to
    the whole layer than the placement of a few units (same-process A/B at
    D = 43: sampling 0.87x with the learned-softness ReLU, 1.11x with ReLU).
    """
    layout = _made_layers(made)
    if layout is None or len(layout[0]) < 2:
        return None
    blocks, activations = layout
    (first, first_c), hidden, (out, out_c) = blocks[0], blocks[1:-1], blocks[-1]
    conditional = any(c_dense is not None for _, c_dense in blocks)
    event_size, num_params = int(made._event_size), int(made._params)
    ready = _ready_passes(made, blocks)
    if ready is None:
        return None
    degrees = _degrees(made)
    # NumPy, made tensors at each call: the head is cached across graphs.
    # Per hidden layer, `slots` index its units (`H` for an empty slot), `cols` its kernel.
    slots = [_units_by_dimension(r, degrees).astype(np.int32) for r in ready]
    cols = [np.minimum(u, len(r) - 1) for u, r in zip(slots, ready, strict=True)]

    def hidden_layers(h, terms):
        """Every later hidden layer's activations from the first's activations `h`."""
        terms, hs = iter(terms), []
        for activation, (dense, c_dense) in zip(activations[1:], hidden, strict=True):
            if c_dense is None:
                z = _affine(h, dense)
            else:
                z = tf.matmul(h, dense.kernel) + next(terms)
            h = activation(z)
            hs.append(h)
        return hs

    def start(x, conditional_input=None):
        if not conditional:
            pre = first(x)
            h = activations[0](pre)
            return pre, (h, *hidden_layers(h, ()))
        if conditional_input is None:
            raise ValueError("This conditioner is conditional: give `conditional_input`.")
        c = conditional_input
        pre = _affine(x, first, None if first_c is None else tf.matmul(c, first_c.kernel))
        # Each later hidden layer's condition term, with its bias: `c V_l + b_l`.
        terms = tuple(tf.matmul(c, c_dense.kernel) + (dense.bias if dense.use_bias else 0.0)
                      for dense, c_dense in hidden if c_dense is not None)
        h = activations[0](pre)
        return pre, (h, *hidden_layers(h, terms)), terms, c

    def params(state, d):
        theta = _dimension_outputs(state[1][-1], out, d, event_size, num_params)
        if out_c is not None:
            theta += _dimension_outputs(state[3], out_c, d, event_size, num_params)
        return theta

    def with_ready(h, layer, d, z_of):
        """`h` with the units of hidden layer `layer` that become ready at `d` set."""
        slot = tf.gather(tf.constant(slots[layer]), d)
        col = tf.gather(tf.constant(cols[layer]), d)
        width = int(h.shape[-1])
        z = z_of(col)
        place = tf.one_hot(slot, width + 1, dtype=z.dtype)[:, :width]  # [m, H]
        keep = 1.0 - tf.reduce_sum(place, axis=0)
        return h * keep + tf.matmul(activations[layer](z), place)

    carry_first = not _is_relu(activations[0])

    def update(state, d, x_d):
        pre, hs = state[:2]
        terms = iter(state[2] if conditional else ())
        pre = pre + x_d[:, tf.newaxis] * first.kernel[d]
        if carry_first:
            h = with_ready(hs[0], 0, d, lambda col: tf.gather(pre, col, axis=1))
        else:
            h = activations[0](pre)
        new_hs = [h]
        for i, (dense, c_dense) in enumerate(hidden):
            term = next(terms) if c_dense is not None else None

            def z_of(col, h=h, dense=dense, term=term):
                z = tf.matmul(h, tf.gather(dense.kernel, col, axis=1))
                if term is not None:
                    return z + tf.gather(term, col, axis=1)
                return z + tf.gather(dense.bias, col) if dense.use_bias else z

            h = with_ready(hs[i + 1], i + 1, d, z_of)
            new_hs.append(h)
        new_hs = tuple(new_hs)
        return (pre, new_hs) if not conditional else (pre, new_hs, *state[2:])

    return IncrementalHead(start, params, update)
