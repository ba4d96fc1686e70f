"""DDSF with shared mixing matrices (`"ddsf-shared"`): the original NAF code's DDSF.

`SharedDenseSigmoidalFlow` is the map of `tfp_naf.transformers.DeepDenseSigmoidalFlow`,
layer by layer, but its mixing logits are one tensor shared by every batch member and
dimension (in a flow, learned variables); only per-unit offsets come from the
conditioner. So a layer's mixtures are matmuls with the shared weights, and their
gradients too (closed form, `tf.custom_gradient`); on large inputs the layers run as
one XLA cluster (`XLA_FUSED_LAYERS`).
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf
from tensorflow_probability.python.internal import (
    dtype_util,
    parameter_properties,
    tensor_util,
)
from tensorflow_probability.python.internal import prefer_static as ps

from tfp_naf.transformers import (
    DEFAULT_CLIP,
    DEFAULT_DDSF_TAIL_SLOPE,
    DEFAULT_MIN_SLOPE,
    DeepDenseSigmoidalFlow,
    _clipped,
    _held_shift,
    _layer_shapes,
    _scaled_sigmoid_derivative,
    _sigmoid_pair,
    _SigmoidalTransformer,
    _slopes,
    _slopes_derivative,
    _with_closed_form_gradient,
)

__all__ = ["SharedDenseSigmoidalFlow"]


def _shared_weights(logits: tf.Tensor) -> tf.Tensor:
    """`exp(logits - max)` over the last axis: a shared softmax's unnormalised weights."""
    return tf.exp(logits - _held_shift(tf.reduce_max(logits, axis=-1, keepdims=True)))


def _shared_mix(stacked: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """`stacked @ weights^T`: `[r, ..., n] x [m, n] -> [r, ..., m]`, one matmul for all rows.

    The `r` terms are stacked on a new leading axis, each one contiguous block:
    the stack is then a copy of whole blocks and the unstack of the result is
    free. Stacked next to the last axis (rows of `K` interleaved), the
    concatenations and slices made a shared DDSF training step 9% slower at
    D = 43 (`benchmarks/README.md`, Speed, "the shared DDSF's stacked terms on
    a leading axis").
    """
    return tf.tensordot(stacked, weights, axes=[[-1], [-1]])


def _shared_first_parts(x, a_raw, b, w_offsets, w_shared, clip, min_slope):
    """The first layer with shared mixing: `(h, log_dh, parts)`, `[...] -> [..., n_out]`.

    `w_ok = softmax_k(W_ok + c_k)` with `W` shared (`[n_out, K]`) and `c`
    conditioned, so `sum_k w_ok v_k = (sum_k E_ok e_k v_k) / (sum_k E_ok e_k)`,
    `E = exp(W - max)`, `e = exp(c - max)`: the mixtures of `sigmoid(z)`,
    `sigmoid(-z)`, the slope terms and the normaliser are one matmul. The
    sigmoids and the `exp(m)`-shifted derivative are as in `_first_layer_parts`.
    `parts` holds what the closed-form gradient (`_shared_first_gradients`) reuses.
    """
    dtype = x.dtype
    tiny = tf.constant(np.finfo(dtype.as_numpy_dtype).tiny, dtype)
    a = _slopes(a_raw, min_slope)
    z = a * x[..., tf.newaxis] + b
    sig, sig_neg, m, q = _scaled_sigmoid_derivative(z)
    ec = _shared_weights(w_offsets)
    ec = tf.broadcast_to(ec, ps.shape(sig))
    big_e = _shared_weights(w_shared)
    # Unstacked, not sliced: a slice's gradient is a zero-padded full-size tensor.
    stacked = tf.stack([ec * sig, ec * sig_neg, ec * a * q, ec], axis=0)
    mix_sig, mix_sig_neg, mix_slope, norm = tf.unstack(
        _shared_mix(stacked, big_e), axis=0)  # each [..., n_out]
    out = _shared_output(mix_sig, mix_sig_neg, mix_slope, norm, clip, tiny)
    h, log_dh = out[0], out[1] - m
    parts = dict(x=x, a_raw=a_raw, a=a, sig=sig, sig_neg=sig_neg, q=q, ec=ec, big_e=big_e,
                 stacked=stacked, out=out)
    return h, log_dh, parts


def _shared_output(mix_sig, mix_sig_neg, mix_slope, norm, clip, tiny):
    """`(h, log_dh + shift, parts)` of a shared layer's output from its four mixtures.

    `h = logit(s')`, `s' = (1 - clip) mix_sig / norm + clip / 2` (and `1 - s'`
    from `mix_sig_neg`), and `log dh/dx = log(1 - clip) - log s' - log(1 - s')
    + log(mix_slope / norm)`, less the shift the caller took out of `mix_slope`.
    """
    dtype = mix_sig.dtype
    inv_norm = tf.math.reciprocal(tf.maximum(norm, tiny))
    s, s_neg = _clipped(mix_sig, mix_sig_neg, clip, scale=inv_norm)
    log_s, log_1ms = tf.math.log(s), tf.math.log(s_neg)
    slope = mix_slope * inv_norm
    log_dh = (tf.constant(np.log1p(-clip), dtype) - log_s - log_1ms
              + tf.math.log(tf.maximum(slope, tiny)))
    parts = dict(mix_sig=mix_sig, mix_sig_neg=mix_sig_neg, mix_slope=mix_slope, norm=norm,
                 inv_norm=inv_norm, s=s, s_neg=s_neg, slope=slope)
    return log_s - log_1ms, log_dh, parts


def _mixture_gradients(grad_h, grad_log_dh, p, clip, tiny):
    """Upstream gradients of `_shared_output`'s four mixtures, stacked: `[4, ..., n_out]`.

    With `A = (1 - clip) / norm`: `d/d mix_sig = A (gh - gl) / s'`, `d/d mix_sig_neg
    = -A (gh + gl) / (1 - s')`, `d/d mix_slope = gl / mix_slope` and `d/d norm =
    -(mix_sig d_sig + mix_sig_neg d_sig_neg + gl) / norm`, each zero where its
    floor at `tiny` was active (as autodiff through the `maximum`s). `p` is
    `_shared_output`'s parts.
    """
    if grad_h is None:
        grad_h = tf.zeros_like(p["s"])
    if grad_log_dh is None:
        grad_log_dh = tf.zeros_like(p["s"])
    scale = tf.constant(1.0 - clip, p["s"].dtype) * p["inv_norm"]
    g_sig = scale * (grad_h - grad_log_dh) / p["s"]
    g_sig_neg = -scale * (grad_h + grad_log_dh) / p["s_neg"]
    slope_ok = p["slope"] >= tiny
    g_log_slope = tf.where(slope_ok, grad_log_dh, 0.0)
    g_slope = g_log_slope / tf.where(slope_ok, p["mix_slope"], 1.0)
    g_norm = tf.where(p["norm"] >= tiny, -p["inv_norm"] * (
        g_sig * p["mix_sig"] + g_sig_neg * p["mix_sig_neg"] + g_log_slope), 0.0)
    return tf.stack([g_sig, g_sig_neg, g_slope, g_norm], axis=0)


def _shared_mix_gradients(grad_mix, stacked, weights):
    """Gradients of `_shared_mix(stacked, weights)` for `stacked` and the shared logits.

    `weights = exp(logits - max)` (the shift held), so the logits' gradient is
    `weights * d/d weights`; `d/d weights` sums over every batch member in one matmul.
    """
    grad_stacked = tf.tensordot(grad_mix, weights, axes=[[-1], [0]])
    n_out, n_in = ps.shape(grad_mix)[-1], ps.shape(stacked)[-1]
    grad_weights = tf.matmul(tf.reshape(grad_mix, [-1, n_out]),
                             tf.reshape(stacked, [-1, n_in]), transpose_a=True)
    return grad_stacked, weights * grad_weights


def _output_mixing_gradients(parts, grad_h, grad_log_dh, clip):
    """`([g_sig, g_sig_neg, g_slope, g_norm], d W)`: a shared layer's output mixing, backwards.

    The gradients of its four stacked terms (`[..., K]` each) and of its shared
    output logits `W`, from the upstream gradients of `(h, log_dh)`.
    """
    dtype = parts["sig"].dtype
    tiny = tf.constant(np.finfo(dtype.as_numpy_dtype).tiny, dtype)
    grad_mix = _mixture_gradients(grad_h, grad_log_dh, parts["out"][2], clip, tiny)
    grad_stacked, grad_w_shared = _shared_mix_gradients(
        grad_mix, parts["stacked"], parts["big_e"])
    return tf.unstack(grad_stacked, axis=0), grad_w_shared


def _shared_first_gradients(parts, grad_h, grad_log_dh, clip, min_slope):
    """Closed-form vector-Jacobian product of `_shared_first_parts`.

    From the mixtures' gradients `G` (`_mixture_gradients`), one matmul with
    `E` gives the stacked terms' gradients `g_sig, g_sig_neg, g_slope, g_norm`
    (`[..., K]`); then, with `e_k` the offsets' weights and `q_k = exp(m)
    sigmoid'(z_k)` (so `dq/dz = q (1 - 2 sigmoid(z))`):

        gz = e (g_sig - g_sig_neg) sigmoid'(z) + e g_slope a q (1 - 2 sigmoid(z)),
        ga = e g_slope q + gz x,   gb = gz,   gx = sum_k gz_k a_k,
        gc = e (g_sig sigmoid(z) + g_sig_neg sigmoid(-z) + g_slope a q + g_norm).

    Returns the gradients of `(x, a_raw, b, w_offsets, w_shared)`.
    """
    p = parts
    (g_sig, g_sig_neg, g_slope, g_norm), grad_w_shared = _output_mixing_gradients(
        p, grad_h, grad_log_dh, clip)
    sig, sig_neg, a, q, ec = p["sig"], p["sig_neg"], p["a"], p["q"], p["ec"]
    eg_slope = ec * g_slope
    aq = a * q
    grad_z = ec * (g_sig - g_sig_neg) * (sig * sig_neg) + eg_slope * aq * (sig_neg - sig)
    grad_a = eg_slope * q + grad_z * p["x"][..., tf.newaxis]
    grad_a_raw = grad_a * _slopes_derivative(p["a_raw"], min_slope)
    grad_c = ec * (g_sig * sig + g_sig_neg * sig_neg + g_slope * aq + g_norm)
    grad_x = tf.reduce_sum(grad_z * a, axis=-1)
    return grad_x, grad_a_raw, grad_z, grad_c, grad_w_shared


def _shared_first_layer(x, a_raw, b, w_offsets, w_shared, clip, min_slope):
    """`_shared_first_parts`' `(h, log_dh)`, with the closed-form gradient."""
    return _with_closed_form_gradient(
        lambda *inputs: _shared_first_parts(*inputs, clip, min_slope),
        lambda parts, gh, gl: _shared_first_gradients(parts, gh, gl, clip, min_slope),
        x, a_raw, b, w_offsets, w_shared)


def _shared_later_parts(h, log_dh, a_raw, b, w_offsets, u_offsets, w_shared, u_shared, clip,
                        min_slope):
    """A later layer with shared mixing: `(h', log_dh', parts)`, `[..., n_in] -> [..., n_out]`.

    Inputs are mixed by `u_kj = softmax_j(U_kj + c_j)` and the log-derivative
    chained in linear space with one shift per row: with `l_j = c_j - max c +
    log dh_j/dx` and `M = max_j l_j`,

        log dmixed_k/dx = M + log(sum_j E_kj exp(l_j - M) / sum_j E_kj exp(c_j - max c)),

    and likewise through the output mixing with `G_k = log dmixed_k - |z_k| +
    c'_k - max c'`: `sum_k w_ok a_k sigmoid'(z_k) dmixed_k = exp(max G) sum_k
    E'_ok a_k (1 + e_k)^-2 exp(G_k - max G) / sum_k E'_ok exp(c'_k - max c')`.
    Every mixture is a matmul with the shared weights.
    """
    dtype = h.dtype
    tiny = tf.constant(np.finfo(dtype.as_numpy_dtype).tiny, dtype)
    a = _slopes(a_raw, min_slope)
    gu = u_offsets - _held_shift(tf.reduce_max(u_offsets, axis=-1, keepdims=True))
    shifted = gu + log_dh
    top = _held_shift(tf.reduce_max(shifted, axis=-1, keepdims=True))
    ecu = tf.broadcast_to(tf.exp(gu), ps.shape(shifted))
    big_eu = _shared_weights(u_shared)
    dh_terms = tf.exp(shifted - top)
    stacked_in = tf.stack([ecu * h, ecu, dh_terms], axis=0)
    mix_h, norm_u, mix_dh = tf.unstack(_shared_mix(stacked_in, big_eu), axis=0)  # [..., K]
    inv_norm_u = tf.math.reciprocal(tf.maximum(norm_u, tiny))
    mixed = mix_h * inv_norm_u
    dmixed = mix_dh * inv_norm_u
    log_dmixed = top + tf.math.log(tf.maximum(dmixed, tiny))
    z = a * mixed + b
    abs_z = tf.abs(z)
    sig, sig_neg, inv = _sigmoid_pair(z)  # inv = sigmoid(|z|) = 1 / (1 + exp(-|z|))
    gw = w_offsets - _held_shift(tf.reduce_max(w_offsets, axis=-1, keepdims=True))
    big_g = log_dmixed - abs_z + gw
    top_g = _held_shift(tf.reduce_max(big_g, axis=-1, keepdims=True))
    ec = tf.broadcast_to(tf.exp(gw), ps.shape(sig))
    big_e = _shared_weights(w_shared)
    slope_terms = a * tf.square(inv) * tf.exp(big_g - top_g)
    stacked = tf.stack([ec * sig, ec * sig_neg, slope_terms, ec], axis=0)
    mix_sig, mix_sig_neg, mix_slope, norm = tf.unstack(
        _shared_mix(stacked, big_e), axis=0)  # each [..., n_out]
    out = _shared_output(mix_sig, mix_sig_neg, mix_slope, norm, clip, tiny)
    parts = dict(h=h, a_raw=a_raw, a=a, ecu=ecu, big_eu=big_eu, dh_terms=dh_terms,
                 stacked_in=stacked_in, mix_h=mix_h, mix_dh=mix_dh, norm_u=norm_u,
                 inv_norm_u=inv_norm_u, dmixed=dmixed, mixed=mixed, sig=sig, sig_neg=sig_neg,
                 ec=ec, big_e=big_e, slope_terms=slope_terms, stacked=stacked, out=out)
    return out[0], out[1] + top_g, parts


def _shared_later_gradients(parts, grad_h, grad_log_dh, clip, min_slope):
    """Closed-form vector-Jacobian product of `_shared_later_parts`.

    The output mixing as in `_shared_first_gradients`; with `Y_k` the slope
    terms, `V = g_slope Y` is the gradient of `log Y = log a + log sigmoid'(z)
    + log dmixed + c' + const`, so

        gz = e (g_sig - g_sig_neg) sigmoid'(z) + V (1 - 2 sigmoid(z)),
        ga = V / a + gz mixed,   gc' = e (g_sig sigmoid(z) + g_sig_neg sigmoid(-z) + g_norm) + V,

    and `gz a`, `V` are the gradients of `mixed` and `log dmixed`, taken back
    through the input mixing the same way (one matmul with `E_u`): with its
    terms' gradients `t_h, t_norm, t_dh` (`[..., n_in]`) and `X_j = exp(l_j - M)`,
    `gh = e_u t_h`, `g log dh = t_dh X`, `gd = e_u (t_h h + t_norm) + t_dh X`.

    Returns the gradients of `(h, log_dh, a_raw, b, w_offsets, u_offsets, w_shared,
    u_shared)`.
    """
    p = parts
    (g_sig, g_sig_neg, g_slope, g_norm), grad_w_shared = _output_mixing_gradients(
        p, grad_h, grad_log_dh, clip)
    sig, sig_neg, a, ec = p["sig"], p["sig_neg"], p["a"], p["ec"]
    tiny = tf.constant(np.finfo(sig.dtype.as_numpy_dtype).tiny, sig.dtype)
    v = g_slope * p["slope_terms"]
    grad_z = ec * (g_sig - g_sig_neg) * (sig * sig_neg) + v * (sig_neg - sig)
    grad_a = v / a + grad_z * p["mixed"]
    grad_a_raw = grad_a * _slopes_derivative(p["a_raw"], min_slope)
    grad_c = ec * (g_sig * sig + g_sig_neg * sig_neg + g_norm) + v
    # Back through the input mixing: `mixed = mix_h / norm_u`, `log dmixed = log(mix_dh / norm_u)`.
    g_mixed = grad_z * a
    inv_norm_u = p["inv_norm_u"]
    t_mix_h = g_mixed * inv_norm_u
    dmixed_ok = p["dmixed"] >= tiny
    g_log_dmixed = tf.where(dmixed_ok, v, 0.0)
    t_mix_dh = g_log_dmixed / tf.where(dmixed_ok, p["mix_dh"], 1.0)
    t_norm_u = tf.where(p["norm_u"] >= tiny,
                        -inv_norm_u * (t_mix_h * p["mix_h"] + g_log_dmixed), 0.0)
    grad_in, grad_u_shared = _shared_mix_gradients(
        tf.stack([t_mix_h, t_norm_u, t_mix_dh], axis=0), p["stacked_in"], p["big_eu"])
    t_h, t_norm, t_dh = tf.unstack(grad_in, axis=0)
    ecu = p["ecu"]
    grad_log_dh_in = t_dh * p["dh_terms"]
    grad_h_in = ecu * t_h
    grad_d = ecu * (t_h * p["h"] + t_norm) + grad_log_dh_in
    return (grad_h_in, grad_log_dh_in, grad_a_raw, grad_z, grad_c, grad_d, grad_w_shared,
            grad_u_shared)


def _shared_later_layer(h, log_dh, a_raw, b, w_offsets, u_offsets, w_shared, u_shared, clip,
                        min_slope):
    """`_shared_later_parts`' `(h', log_dh')`, with the closed-form gradient."""
    return _with_closed_form_gradient(
        lambda *inputs: _shared_later_parts(*inputs, clip, min_slope),
        lambda parts, gh, gl: _shared_later_gradients(parts, gh, gl, clip, min_slope),
        h, log_dh, a_raw, b, w_offsets, u_offsets, w_shared, u_shared)


class SharedDenseSigmoidalFlow(DeepDenseSigmoidalFlow):
    """DDSF with shared mixing matrices: the parameterisation of the original NAF code.

    The same map as `DeepDenseSigmoidalFlow`, layer by layer,

    ```none
    h'_o = logit( (1 - clip) * sum_k w_ok sigmoid(a_k sum_j u_kj h_j + b_k) + clip / 2 ),
    w_ok = softmax_k(W_ok + c_k),   u_kj = softmax_j(U_kj + d_j),
    ```

    but the mixing logits `W` (`[n_out, K]`) and `U` (`[K, n_in]`) are
    `mixing_logits`, one tensor (typically a variable) shared by every batch
    member and dimension; only per-unit offsets are conditioned. Per layer
    `params` holds `[a_raw (K), b (K), c (K), d (n_in, omitted when n_in = 1)]`:
    `num_params(16, 2) == 112` against DDSF's 592, and no `K x K` matrix is
    formed per batch member: every mixture is one matmul with the shared
    weights, and the log-derivative is chained in linear space with one max
    shift per row. `mixing_logits` holds, per layer, `W` then `U` (when
    `n_in > 1`), flattened; `num_mixing_params` gives its size. At
    `params = 0` and `mixing_logits = 0` it is the identity (up to clipping);
    give `mixing_logits` small random values so the units of a layer differ.

    #### Examples

    ```python
    import numpy as np
    from tfp_naf.shared_mixing import SharedDenseSigmoidalFlow

    p = SharedDenseSigmoidalFlow.num_params(num_units=8, num_layers=2)
    m = SharedDenseSigmoidalFlow.num_mixing_params(num_units=8, num_layers=2)
    t = SharedDenseSigmoidalFlow(
        params=0.3 * np.random.randn(4, p).astype("float32"),
        mixing_logits=0.3 * np.random.randn(m).astype("float32"), num_layers=2)
    x = np.float32([-2., 0., 1., 5.])
    t.inverse(t.forward(x))                  # ~= x
    ```
    """

    def __init__(
        self,
        params,
        mixing_logits,
        num_units: "int | None" = None,
        num_layers: int = 2,
        clip: float = DEFAULT_CLIP,
        min_slope: float = DEFAULT_MIN_SLOPE,
        tail_slope: float = DEFAULT_DDSF_TAIL_SLOPE,
        tolerance: "float | None" = None,
        max_iterations: int = 100,
        validate_args: bool = False,
        name: str = "shared_dense_sigmoidal_flow",
    ):
        """Builds the transformer.

        Args:
          params: float `Tensor` `[..., num_params(num_units, num_layers)]` of
            conditioned offsets.
          mixing_logits: float `Tensor` (or variable)
            `[num_mixing_params(num_units, num_layers)]`, shared.
          num_units, num_layers, clip, min_slope, tail_slope, tolerance,
            max_iterations, validate_args, name: as for `DeepDenseSigmoidalFlow`.
        """
        parameters = dict(locals())
        with tf.name_scope(name):
            dtype = dtype_util.common_dtype([params, mixing_logits], dtype_hint=tf.float32)
            self._mixing_logits = tensor_util.convert_nonref_to_tensor(
                mixing_logits, dtype=dtype, name="mixing_logits")
        _SigmoidalTransformer.__init__(
            self, params, num_units, num_layers, clip, min_slope, tail_slope, tolerance,
            max_iterations, validate_args, parameters, name)
        expected = self.num_mixing_params(self._num_units, self._num_layers)
        shape = self._mixing_logits.shape
        if shape.rank is not None and (shape.rank != 1 or shape[0] not in (None, expected)):
            raise ValueError(
                f"`mixing_logits` must have shape [{expected}] for num_units="
                f"{self._num_units}, num_layers={self._num_layers}; got {shape}.")

    @classmethod
    def num_params(cls, num_units: int, num_layers: int = 2) -> int:
        """Conditioned offsets per element: `3 K + n_in` per layer (`n_in` dropped when 1)."""
        return sum(3 * num_units + (n_in if n_in > 1 else 0)
                   for n_in, _ in _layer_shapes(num_units, num_layers))

    @classmethod
    def num_mixing_params(cls, num_units: int, num_layers: int = 2) -> int:
        """Size of `mixing_logits`: `n_out K + K n_in` per layer (`U` dropped when `n_in = 1`)."""
        return sum(n_out * num_units + (num_units * n_in if n_in > 1 else 0)
                   for n_in, n_out in _layer_shapes(num_units, num_layers))

    @property
    def mixing_logits(self):
        return self._mixing_logits

    @classmethod
    def _parameter_properties(cls, dtype):
        props = super()._parameter_properties(dtype)
        props["mixing_logits"] = parameter_properties.ParameterProperties(
            event_ndims=1,
            shape_fn=parameter_properties.SHAPE_FN_NOT_IMPLEMENTED,
            default_constraining_bijector_fn=parameter_properties.BIJECTOR_NOT_IMPLEMENTED,
        )
        return props

    _params_are_explicit = False  # The shared mixing logits need gradients too.

    def _evaluator(self, params):
        """The whole forward at every evaluation (its layers are shared-weight matmuls)."""
        return lambda x: self.forward_and_log_derivative(x, params)

    def _sigmoidal_layers(self, x, params):
        mixing = tf.convert_to_tensor(self._mixing_logits, dtype=self.dtype)
        config = (self._num_units, self._num_layers, self._clip, self._min_slope)
        size = x.shape.num_elements()
        if (XLA_FUSED_LAYERS and (size is None or size >= XLA_FUSED_MIN_SIZE)
                and not _in_xla_context()):
            return _fused_shared_layers(*config)(x, params, mixing)
        return _shared_sigmoidal_layers(x, params, mixing, *config)


def _split_shared(params, mixing, k, num_layers):
    """Per layer: `(a_raw, b, w_offsets, u_offsets or None, W, U or None)`."""
    shapes = _layer_shapes(k, num_layers)
    sizes = [size for n_in, _ in shapes for size in (k, k, k, n_in if n_in > 1 else 0)]
    pieces = tf.split(params, [s for s in sizes if s], axis=-1)
    mix_sizes = [size for n_in, n_out in shapes
                 for size in (n_out * k, k * n_in if n_in > 1 else 0)]
    mix_pieces = tf.split(mixing, [s for s in mix_sizes if s], axis=-1)
    layers = []
    for n_in, n_out in shapes:
        a_raw, b, c = pieces.pop(0), pieces.pop(0), pieces.pop(0)
        d = pieces.pop(0) if n_in > 1 else None
        w = tf.reshape(mix_pieces.pop(0), [n_out, k])
        u = tf.reshape(mix_pieces.pop(0), [k, n_in]) if n_in > 1 else None
        layers.append((a_raw, b, c, d, w, u))
    return layers


def _shared_sigmoidal_layers(x, params, mixing, k, num_layers, clip, min_slope,
                             closed_form=True):
    """`(g(x), log g'(x))` of `SharedDenseSigmoidalFlow`'s layers.

    Gradients in closed form (`_shared_first_gradients`, `_shared_later_gradients`),
    or with `closed_form=False` by autodiff through the forward (the tests' reference).
    """
    if closed_form:
        first, later_layer = _shared_first_layer, _shared_later_layer
    else:
        def first(*args):
            return _shared_first_parts(*args)[:2]

        def later_layer(*args):
            return _shared_later_parts(*args)[:2]
    (a_raw, b, c, _, w, _), *later = _split_shared(params, mixing, k, num_layers)
    h, log_dh = first(x, a_raw, b, c, w, clip, min_slope)
    for a_raw, b, c, d, w, u in later:
        h, log_dh = later_layer(h, log_dh, a_raw, b, c, d, w, u, clip, min_slope)
    return h[..., 0], log_dh[..., 0]


# Run `SharedDenseSigmoidalFlow`'s layers (forward and backward) as one
# XLA cluster, `tf.function(jit_compile=True)`, inside whatever function calls
# them, for inputs of at least `XLA_FUSED_MIN_SIZE` elements (or of unknown
# size): their ~60 small elementwise ops and mixing matmuls then fuse, while
# everything around them (the conditioner's matmuls) keeps TensorFlow's own
# kernels. On 2 CPU cores (D = 43, batch 256, 2 layers of 16) a training step
# took 96 instead of 120 ms and `log_prob` of 4,096 rows 558 instead of 633 ms
# (with autodiff gradients; with the closed-form ones, 67 instead of 80 ms);
# on small inputs (D = 2, batch 256: 512 elements) the cluster's launch cost
# made a step 15% slower, hence the size threshold (the inverse's per-dimension
# passes, `[N]`, mostly stay below it). DSF's layer gained nothing from it in a
# training step (its closed-form gradient is already few ops) and lost in
# sampling, so it is not fused.
# Read when a function is traced; set it to False where XLA is unavailable.
XLA_FUSED_LAYERS = True
XLA_FUSED_MIN_SIZE = 4096


def _in_xla_context() -> bool:
    """Whether the function being traced is itself XLA-compiled (`jit_compile=True`).

    There the layers are compiled with everything else anyway, and a nested
    `jit_compile` function made XLA recompile the whole step at every call
    (20 s per DDSF training step at D = 43).
    """
    if tf.executing_eagerly():
        return False
    try:
        from tensorflow.python.framework import ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - TF internals moved: assume not.
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph()))


@functools.cache
def _fused_shared_layers(k: int, num_layers: int, clip: float, min_slope: float):
    """`_shared_sigmoidal_layers` as one XLA cluster (its gradient is compiled too)."""
    def layers(x, params, mixing):
        return _shared_sigmoidal_layers(x, params, mixing, k, num_layers, clip, min_slope)

    return tf.function(layers, jit_compile=True, autograph=False)
