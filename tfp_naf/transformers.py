"""The monotone scalar transformers of a neural autoregressive flow.

A transformer is a strictly increasing map `g(x; theta)` of one real number,
parameterised by a vector of unconstrained pseudo-parameters `theta` (in a
flow, one such vector per dimension, produced by the conditioner). Both are
TFP scalar bijectors (`forward_min_event_ndims=0`) whose `params` hold the
pseudo-parameters on their last axis; all other axes broadcast against `x`.

Deep sigmoidal flow (DSF), with `K = num_units`:

    g(x) = logit( sum_k w_k sigmoid(a_k x + b_k) ),
    a = softplus(.) + min_slope > 0,   w = softmax(.).

Deep dense sigmoidal flow (DDSF) stacks `num_layers` such layers, each of
width `K`, with softmax-normalised mixing of its inputs `u` and outputs `w`:

    h_0 = x,   h_{l+1} = logit( w_l . sigmoid(a_l * (u_l . h_l) + b_l) ).

Two details keep them well behaved in floating point:

* The sigmoid mixture `s` is squeezed into `[clip / 2, 1 - clip / 2]` before
  the logit, `s' = (1 - clip) s + clip / 2`, as in the original NAF code. The
  range of `g` is therefore the open interval `(-L, L)`,
  `L = logit(1 - clip / 2)` (about 14.5 for `clip = 1e-6`).
* Everything is computed in log space: `log s`, `log(1 - s)` and the
  log-derivative are log-sum-exps of `log w + log sigmoid(+-z)` terms, and the
  layer Jacobians are chained as log-space matrix products. So `g`, `log g'`
  and their gradients stay finite for any finite input (|x| = 1e4 in float32).

The first sigmoidal layer (all of DSF) has a closed-form gradient
(`tf.custom_gradient`) that reuses the forward pass's intermediates; one DSF
layer's forward+backward pass takes 20-30% less time than with autodiff through
the stabilised forward (`python -m benchmarks.transformers`). So do the layers
of `tfp_naf.shared_mixing.SharedDenseSigmoidalFlow` (DDSF with shared mixing
matrices), whose mixtures' gradients are matmuls with the shared weights too.

At `params = 0` every `a` is 1, every `b` is 0 and every mixture is uniform, so
`g` is the identity up to the clipping, which moves it by about
`clip * exp(|x|) / 2` per layer (2e-4 at |x| = 6 for `clip = 1e-6`).

The inverse has no closed form: it is found by safeguarded Newton iterations
inside a bracket (`tfp_naf.root_finding`), with gradients from the implicit
function theorem. DDSF adds a small linear tail by default (`tail_slope`), so
its range is the whole real line; see `DeepDenseSigmoidalFlow`. Without a tail,
`y` outside the range `(g(-inf), g(+inf))` (within `(-L, L)`) has no preimage:
it is clamped to just inside the range, so the inverse returns a large finite
`x` at the edge of the range, never NaN; with `validate_args=True` it raises
instead.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.internal import (
    assert_util,
    dtype_util,
    parameter_properties,
    tensor_util,
)
from tensorflow_probability.python.internal import prefer_static as ps

from tfp_naf import root_finding

tfb = tfp.bijectors

__all__ = [
    "DeepSigmoidalFlow",
    "DeepDenseSigmoidalFlow",
]

DEFAULT_CLIP = 1e-6
DEFAULT_MIN_SLOPE = 1e-3
DEFAULT_DDSF_TAIL_SLOPE = 1e-3
# An input far enough out that every sigmoid saturates: g(+-this) = g(+-inf).
_SATURATING_INPUT = 1e18


def _logaddexp(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """log(exp(a) + exp(b)) for finite `b`."""
    m = tf.maximum(a, b)
    return m + tf.math.log1p(tf.exp(-tf.abs(a - b)))


def _held_shift(t: tf.Tensor) -> tf.Tensor:
    """A stabilising shift (a max or min subtracted before an `exp`), held constant.

    Every shift here cancels from the values it feeds: `log sum exp(v - m) + m`
    and `sum E exp(v - m) / sum E exp(c - m)` do not depend on `m`. So its
    gradient is exactly zero, and autodiff need not build it: a `reduce_max`'s
    gradient is four full-size ops (an equality mask, its count, a division
    and a product), most of what the shifts cost in a DDSF backward pass.
    """
    return tf.stop_gradient(t)


def _sigmoid_pair(z: tf.Tensor) -> "tuple[tf.Tensor, tf.Tensor, tf.Tensor]":
    """`(sigmoid(z), sigmoid(-z), sigmoid(|z|))`.

    TensorFlow's (and XLA's) sigmoid kernel is accurate to a relative 1e-7
    down to the float range's bottom (`z ~ -87` in float32), so `sigmoid(-z)`
    is no cancellation-prone `1 - sigmoid(z)`; the mixtures add `clip / 2`
    (5e-7), far above where either would flush to zero. Three fused
    elementwise kernels, against six for the same pair from a shared
    `exp(-|z|)` (its reciprocal, product and two selects): fewer passes over
    `[..., K]` tensors, which is what these layers' time is spent on.
    `-z` is a product with -1, not a negation: Grappler fuses `Neg` and
    `Sigmoid` into one `_UnaryOpsComposition`, whose scalar loop took twice as
    long as both kernels on the inverse's `[N, K]` tensors.
    """
    sig, sig_neg = tf.sigmoid(z), tf.sigmoid(z * tf.constant(-1.0, z.dtype))
    return sig, sig_neg, tf.maximum(sig, sig_neg)


def _scaled_sigmoid_derivative(z: tf.Tensor):
    """`(sig, sig_neg, m, q)`: the sigmoid pair, `m = min_k |z_k|` (held) and
    `q_k = sigmoid'(z_k) exp(m) = exp(m - |z_k|) sigmoid(|z_k|)^2`.

    `q` is at least `1 / 4` for the unit nearest its centre, so a mixture of
    slope terms `a_k q_k` stays in range where `sigmoid'` itself would
    underflow (`|z| > 87` for every unit), and `log dh/dx` takes `m` back out.
    """
    sig, sig_neg, sig_abs = _sigmoid_pair(z)
    abs_z = tf.abs(z)
    m = _held_shift(tf.reduce_min(abs_z, axis=-1, keepdims=True))
    return sig, sig_neg, m, tf.exp(m - abs_z) * tf.square(sig_abs)


def _layer_shapes(num_units: int, num_layers: int) -> "list[tuple[int, int]]":
    """(inputs, outputs) of each dense sigmoidal layer: 1 -> K -> ... -> K -> 1."""
    widths = [1] + [num_units] * (num_layers - 1) + [1]
    return list(zip(widths[:-1], widths[1:], strict=True))


def _mix(weights: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
    """`weights @ v` over the last axis: `[..., m, n] x [..., n] -> [..., m]`.

    A broadcast multiply and sum: the matrices are tiny (one per batch member
    and dimension), where batched matmul kernels are slow.
    """
    return tf.reduce_sum(weights * v[..., tf.newaxis, :], axis=-1)


def _slope_shift(min_slope, dtype) -> tf.Tensor:
    """The shift in `_slopes` that makes `a = 1` at `a_raw = 0`."""
    return tf.constant(np.log(np.expm1(1.0 - min_slope)), dtype)


def _slopes(a_raw, min_slope):
    """`a = softplus(a_raw + shift) + min_slope`, with `a = 1` at `a_raw = 0`.

    Chosen on validation data over an exponential map, `a = min_slope + (1 -
    min_slope) exp(a_raw)`, which learned the 2-D shapes faster but overfit
    MiniBooNE (`benchmarks/README.md`, "The slopes' map").
    """
    dtype = a_raw.dtype
    return tf.math.softplus(a_raw + _slope_shift(min_slope, dtype)) + tf.constant(min_slope, dtype)


def _slopes_derivative(a_raw, min_slope):
    """`da/da_raw = sigmoid(a_raw + shift)` of `_slopes` (an exp and a reciprocal)."""
    return tf.sigmoid(a_raw + _slope_shift(min_slope, a_raw.dtype))


def _softmax_parts(logits):
    """`(e, 1 / sum e)`, `e = exp(logits - max)`: `softmax = e / sum e` over the last axis.

    Mixtures `softmax . v` are computed as `(e . v) / sum e`, so the
    normalised weights (a division per weight) are never formed.
    """
    e = tf.exp(logits - tf.reduce_max(logits, axis=-1, keepdims=True))
    return e, tf.math.reciprocal(tf.reduce_sum(e, axis=-1))


def _squash(w, sig, sig_neg, clip, scale=None):
    """`s'` and `1 - s'` of the clipped mixture `s' = (1-clip) w.sig + clip/2`.

    `s` and `1 - s` are sums of positive terms, `w . sigmoid(z)` and
    `w . sigmoid(-z)`, so both are accurate in linear space (no cancellation),
    and `clip / 2` dominates wherever they would underflow. With `scale`
    (`[..., m]`), the weights are `w * scale`: unnormalised softmax weights
    and their normaliser (`_softmax_parts`).
    """
    return _clipped(_mix(w, sig), _mix(w, sig_neg), clip, scale)


def _clipped(mix_sig, mix_sig_neg, clip, scale=None):
    """`(s', 1 - s')` from the mixtures `w . sigmoid(z)` and `w . sigmoid(-z)` (see `_squash`)."""
    dtype = mix_sig.dtype
    keep, half_clip = tf.constant(1.0 - clip, dtype), tf.constant(clip / 2.0, dtype)
    if scale is not None:
        keep = keep * scale
    return keep * mix_sig + half_clip, keep * mix_sig_neg + half_clip


def _log_mix(weights: tf.Tensor, log_v: tf.Tensor) -> tf.Tensor:
    """`log(weights @ exp(log_v))`, `[..., m, n] x [..., n] -> [..., m]`, for `log_v` of any size.

    Shifted by `M = max_j log_v_j`: `M + log(sum_j weights_ij exp(log_v_j - M))`,
    where the sum is at least the weight on the largest term. A multiply and a
    sum, like `_mix`, instead of a log-sum-exp over the `[..., m, n]` matrix
    (which dominated DDSF's cost). Only a weight below the float range's
    bottom (softmax logits 87 apart in float32) is floored at its smallest
    normal number.
    """
    m = _held_shift(tf.reduce_max(log_v, axis=-1, keepdims=True))
    tiny = tf.constant(np.finfo(log_v.dtype.as_numpy_dtype).tiny, log_v.dtype)
    return m + tf.math.log(tf.maximum(_mix(weights, tf.exp(log_v - m)), tiny))


def _sum_to_shape(grad: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
    """`grad` summed over the axes along which `target` was broadcast."""
    if grad.shape.is_fully_defined() and grad.shape == target.shape:
        return grad
    shape = ps.shape(target)
    _, axes = tf.raw_ops.BroadcastGradientArgs(s0=ps.shape(grad), s1=shape)
    return tf.reshape(tf.reduce_sum(grad, axis=axes), shape)


def _first_layer_parts(x, a_raw, b, w_logits, clip, min_slope):
    """The first layer's outputs `(h, log_dh)` and the intermediates its gradient reuses.

    With `m = min_k |z_k|`, the derivative is taken in the `exp(m)`-scaled form

        ds/dx = sum_k w_k a_k sigmoid'(z_k)
              = exp(-m) sum_k w_k a_k exp(m - |z_k|) sigmoid(|z_k|)^2,

    where the last sum is at least `w_k* a_k* / 4` (`k*` the unit nearest its
    centre), so `log ds/dx` stays finite for any finite `x`. The sigmoid pair
    is TF's own kernel (`_sigmoid_pair`). Per unit the layer needs five
    transcendental evaluations at least (`exp` and `log1p` for the slope's
    softplus, `exp` for the softmax, one `exp` and one reciprocal for the
    sigmoids); it does seven (two sigmoids and `exp(m - |z|)`), because on
    these `[..., K]` tensors each pass over memory costs more than an
    evaluation: the two sigmoid kernels replaced six passes (a shared
    `exp(-|z|)`, its reciprocal and product, and two selects) and made a
    layer's forward+backward ~10% faster in a same-process comparison. The
    three mixtures are separate multiply-sums and the softplus is TF's own
    kernel: both were faster than one stacked reduction and a softplus built
    from a shared `exp(-|r|)`.
    """
    a, ew, inv_norm = _first_layer_prep(a_raw, w_logits, min_slope)
    return _first_layer_at(x, a, b, ew, inv_norm, clip)


def _first_layer_prep(a_raw, w_logits, min_slope):
    """`(a, ew, inv_norm)`: the first layer's work that depends on its parameters alone.

    The slopes' softplus and the softmax: three of the five transcendental
    evaluations per unit. The inverse search evaluates the layer several times
    at the same parameters and does this once (`_SigmoidalTransformer._evaluator`).
    """
    ew, inv_norm = _softmax_parts(w_logits)  # softmax(w_logits) = ew * inv_norm
    return _slopes(a_raw, min_slope), ew, inv_norm


def _first_layer_at(x, a, b, ew, inv_norm, clip):
    """`_first_layer_parts` given the slopes `a` and the softmax parts `(ew, inv_norm)`."""
    dtype = x.dtype
    z = a * x[..., tf.newaxis] + b
    sig, sig_neg, m, q = _scaled_sigmoid_derivative(z)
    t = a * q
    # s' and 1 - s' (as `_squash`), keeping the raw mixtures for the gradient.
    mix_sig, mix_sig_neg = _mix(ew, sig), _mix(ew, sig_neg)
    s, s_neg = _clipped(mix_sig, mix_sig_neg, clip, scale=inv_norm)
    slope_sum = _mix(ew, t) * inv_norm
    log_s, log_1ms = tf.math.log(s), tf.math.log(s_neg)
    tiny = tf.constant(np.finfo(dtype.as_numpy_dtype).tiny, dtype)
    log_dh = (
        tf.constant(np.log1p(-clip), dtype)
        - log_s
        - log_1ms
        - m
        + tf.math.log(tf.maximum(slope_sum, tiny))
    )
    parts = dict(a=a, sig=sig, sig_neg=sig_neg, ew=ew, inv_norm=inv_norm, s=s, s_neg=s_neg,
                 mix_sig=mix_sig, mix_sig_neg=mix_sig_neg, q=q, t=t, slope_sum=slope_sum)
    return log_s - log_1ms, log_dh, parts


def _first_layer_gradients(x, a_raw, clip, min_slope, parts, grad_h, grad_log_dh):
    """Closed-form vector-Jacobian product of `_first_layer_parts`' outputs.

    With `S_o = sum_k w_ok sigmoid(z_k)`, `s'_o = (1 - clip) S_o + clip / 2`,
    `D_o = sum_k w_ok a_k sigmoid'(z_k)` and upstream gradients `gh`, `gl` of
    `h_o = logit(s'_o)` and `log dh_o/dx = log(1 - clip) + log D_o - log s'_o
    - log(1 - s'_o)`:

        gS_o = (1 - clip) (gh_o (1/s'_o + 1/(1 - s'_o)) + gl_o (1/(1 - s'_o) - 1/s'_o)),
        gz_k = sigmoid'(z_k) sum_o gS_o w_ok
               + sum_o gl_o r_ok (1 - 2 sigmoid(z_k)),   r_ok = w_ok a_k sigmoid'(z_k) / D_o,
        gb = gz,   ga_k = sum_o gl_o r_ok / a_k + gz_k x,   gx = sum_k gz_k a_k,
        gw_ok = (1 - clip) ((gh_o - gl_o) sigmoid(z_k) / s'_o
                            - (gh_o + gl_o) sigmoid(-z_k) / (1 - s'_o))
                + gl_o a_k sigmoid'(z_k) / D_o,

    then through the slopes' softplus and the softmax, whose gradient needs
    `sum_k w_ok gw_ok = (1 - clip) ((gh_o - gl_o) S_o / s'_o - (gh_o + gl_o)
    (1 - S_o) / (1 - s'_o)) + gl_o`, per output from the forward's own mixtures.
    `r / a` and `a sigmoid' / D` use the `exp(m)`-scaled terms `q` and `t`, so
    nothing overflows where `D` underflows. Per unit the only transcendental
    evaluations are softplus' (`sigmoid`); everything else is products and sums.
    """
    p = parts
    ew, inv_norm = p["ew"], p["inv_norm"]
    dtype = x.dtype
    keep = tf.constant(1.0 - clip, dtype)
    tiny = tf.constant(np.finfo(dtype.as_numpy_dtype).tiny, dtype)
    if grad_h is None:
        grad_h = tf.zeros_like(p["s"])
    if grad_log_dh is None:
        grad_log_dh = tf.zeros_like(p["s"])
    # Through s' and through 1 - s' (kept apart: their sum cancels in the
    # softmax gradient where one of them is tiny).
    grad_pos = keep * (grad_h - grad_log_dh) / p["s"]
    grad_neg = keep * (grad_h + grad_log_dh) / p["s_neg"]
    grad_s = grad_pos + grad_neg
    # Where the slope sum was floored at `tiny`, log dh/dx does not depend on it.
    slope_sum = p["slope_sum"]
    grad_log_slope = tf.where(slope_sum >= tiny, grad_log_dh / tf.maximum(slope_sum, tiny), 0.0)
    # The mixing weights w = ew * inv_norm, folded into the per-output factors.
    u = _sum_over_outputs(ew * (grad_s * inv_norm)[..., tf.newaxis])  # [..., K]
    v = _sum_over_outputs(ew * (grad_log_slope * inv_norm)[..., tf.newaxis])
    sig, sig_neg, t = p["sig"], p["sig_neg"], p["t"]
    grad_z = u * (sig * sig_neg) + v * t * (sig_neg - sig)
    grad_a = v * p["q"] + grad_z * x[..., tf.newaxis]
    grad_a_raw = grad_a * _slopes_derivative(a_raw, min_slope)
    grad_x = tf.reduce_sum(grad_z * p["a"], axis=-1)
    grad_w = (grad_pos[..., tf.newaxis] * sig[..., tf.newaxis, :]
              - grad_neg[..., tf.newaxis] * sig_neg[..., tf.newaxis, :]
              + grad_log_slope[..., tf.newaxis] * t[..., tf.newaxis, :])
    # sum_k w_ok grad_w_ok, from the forward's own mixtures (no second reduction).
    mean = ((grad_pos * p["mix_sig"] - grad_neg * p["mix_sig_neg"]) * inv_norm
            + grad_log_slope * slope_sum)
    w = ew * inv_norm[..., tf.newaxis]
    grad_w_logits = w * (grad_w - mean[..., tf.newaxis])
    return grad_x, grad_a_raw, grad_z, grad_w_logits


def _sum_over_outputs(t: tf.Tensor) -> tf.Tensor:
    """`t` (`[..., n_out, K]`) summed over its outputs: a reshape when there is one (DSF)."""
    if t.shape[-2] == 1:
        return tf.squeeze(t, axis=-2)
    return tf.reduce_sum(t, axis=-2)


def _with_closed_form_gradient(parts_fn, gradients_fn, *inputs):
    """`(h, log_dh)` of `parts_fn(*inputs)`, differentiated by `gradients_fn` (custom gradient).

    `parts_fn` returns `(h, log_dh, parts)`; `gradients_fn(parts, grad_h,
    grad_log_dh)` returns one gradient per input, which is then summed over
    the axes along which that input was broadcast.
    """

    @tf.custom_gradient
    def layer(*inputs):
        h, log_dh, parts = parts_fn(*inputs)

        def grad(grad_h, grad_log_dh):
            grads = gradients_fn(parts, grad_h, grad_log_dh)
            return [_sum_to_shape(g, t) for g, t in zip(grads, inputs, strict=True)]

        return (h, log_dh), grad

    return layer(*inputs)


def _first_sigmoidal_layer(x, a_raw, b, w_logits, clip, min_slope):
    """The first layer, fed by `x` itself: `[...] -> [..., n_out]`.

    Values from `_first_layer_parts`; gradients from the closed form in
    `_first_layer_gradients` (a `tf.custom_gradient`), which reuses the
    forward's intermediates and skips the stabilising ops' own gradients.
    """
    return _with_closed_form_gradient(
        lambda x, a_raw, b, w_logits: _first_layer_parts(x, a_raw, b, w_logits, clip, min_slope),
        lambda parts, gh, gl: _first_layer_gradients(x, a_raw, clip, min_slope, parts, gh, gl),
        x, a_raw, b, w_logits)


def _dense_sigmoidal_layer(h, log_dh, a_raw, b, w_logits, u_logits, clip, min_slope):
    """A later layer: `[..., n_in] -> [..., n_out]`, chaining the log-derivative.

    The derivative of the input, `log dh/dx`, can be far below the float
    range's bottom, so the chain rule runs in log space (see `_log_mix`):

        log dh'_o/dx = log(1 - clip) - log s'_o - log(1 - s'_o)
            + log sum_k w_ok exp( log a_k + log sigmoid(z_k) + log sigmoid(-z_k)
                                  + log sum_j u_kj exp(log dh_j/dx) ).
    """
    dtype = h.dtype
    a = _slopes(a_raw, min_slope)
    if u_logits is None:  # One input (K = 1): nothing to mix.
        mixed, log_dmixed = h, log_dh
    else:
        u = tf.nn.softmax(u_logits, axis=-1)
        mixed, log_dmixed = _mix(u, h), _log_mix(u, log_dh)
    z = a * mixed + b
    neg_log_sig = tf.math.softplus(-z)  # -log sigmoid(z)
    log_sig_neg = -neg_log_sig - z  # log sigmoid(-z)
    w = tf.nn.softmax(w_logits, axis=-1)
    s, s_neg = _squash(w, tf.exp(-neg_log_sig), tf.exp(log_sig_neg), clip)
    log_s, log_1ms = tf.math.log(s), tf.math.log(s_neg)
    log_dz = tf.math.log(a) + log_sig_neg - neg_log_sig + log_dmixed
    log_dh_out = tf.constant(np.log1p(-clip), dtype) - log_s - log_1ms + _log_mix(w, log_dz)
    return log_s - log_1ms, log_dh_out


class _SigmoidalTransformer(tfb.Bijector):
    """Shared machinery of DSF and DDSF: parameters, forward, inverse."""

    def __init__(
        self,
        params,
        num_units,
        num_layers,
        clip,
        min_slope,
        tail_slope,
        tolerance,
        max_iterations,
        validate_args,
        parameters,
        name,
    ):
        with tf.name_scope(name) as name:
            dtype = dtype_util.common_dtype([params], dtype_hint=tf.float32)
            self._params = tensor_util.convert_nonref_to_tensor(
                params, dtype=dtype, name="params"
            )
            size = tf.compat.dimension_value(self._params.shape[-1])
            if num_units is None:
                if size is None:
                    raise ValueError(
                        "`num_units` must be given when the last axis of "
                        "`params` is not statically known."
                    )
                num_units = self._infer_num_units(size, num_layers)
            num_units, num_layers = int(num_units), int(num_layers)
            if num_units < 1 or num_layers < 1:
                raise ValueError(
                    f"`num_units` and `num_layers` must be >= 1; got {num_units}, "
                    f"{num_layers}."
                )
            expected = self.num_params(num_units, num_layers)
            if size is not None and size != expected:
                raise ValueError(
                    f"{type(self).__name__} with num_units={num_units}, "
                    f"num_layers={num_layers} takes {expected} parameters on the "
                    f"last axis of `params`; got {size}."
                )
            if not 0.0 < clip < 1.0:
                raise ValueError(f"`clip` must be in (0, 1); got {clip}.")
            if not 0.0 <= min_slope < 1.0:
                raise ValueError(f"`min_slope` must be in [0, 1); got {min_slope}.")
            if not 0.0 <= tail_slope < 1.0:
                raise ValueError(f"`tail_slope` must be in [0, 1); got {tail_slope}.")
            self._num_units = num_units
            self._num_layers = num_layers
            self._clip = float(clip)
            self._min_slope = float(min_slope)
            self._tail_slope = float(tail_slope)
            np_dtype = dtype_util.as_numpy_dtype(dtype)
            if tolerance is None:
                tolerance = 1e-6 if np_dtype == np.float32 else 1e-12
            self._tolerance = float(tolerance)
            self._max_iterations = int(max_iterations)
            super().__init__(
                dtype=dtype,
                forward_min_event_ndims=0,
                validate_args=validate_args,
                parameters=parameters,
                name=name,
            )

    # ---- Parameters ------------------------------------------------------

    @classmethod
    def num_params(cls, num_units: int, num_layers: int = 1) -> int:
        """Size of the last axis of `params` for this transformer."""
        return sum(
            2 * num_units + n_out * num_units + (num_units * n_in if n_in > 1 else 0)
            for n_in, n_out in _layer_shapes(num_units, num_layers)
        )

    @classmethod
    def initial_params(cls, num_units: int, num_layers: int = 1, spread: float = 0.0) -> np.ndarray:
        """Pseudo-parameters whose first-layer sigmoid centres span `[-spread, spread]`.

        `a_raw = 0` (every `a = 1`), `b_k = -c_k` with centres
        `c = linspace(-spread, spread, K)`, all mixing logits 0; later DDSF
        layers 0. A conditioner whose output starts near this vector starts
        with distinct, spread-out units instead of `K` units stacked at 0
        (which must first separate before the transformer can bend). At
        `spread = 0` this is all zeros, where `g` is the identity.
        """
        k = int(num_units)
        params = np.zeros(cls.num_params(k, num_layers))
        params[k : 2 * k] = -np.linspace(-spread, spread, k)
        return params

    @classmethod
    def _infer_num_units(cls, size: int, num_layers: int) -> int:
        for k in range(1, size + 1):
            if cls.num_params(k, num_layers) == size:
                return k
        raise ValueError(
            f"No number of units gives {size} parameters for {cls.__name__} with "
            f"num_layers={num_layers}; pass `num_units` explicitly."
        )

    @classmethod
    def _parameter_properties(cls, dtype):
        return dict(
            params=parameter_properties.ParameterProperties(
                event_ndims=1,
                shape_fn=parameter_properties.SHAPE_FN_NOT_IMPLEMENTED,
                default_constraining_bijector_fn=parameter_properties.BIJECTOR_NOT_IMPLEMENTED,
            )
        )

    @property
    def params(self) -> tf.Tensor:
        """Unconstrained pseudo-parameters, `[..., num_params]`."""
        return self._params

    @property
    def num_units(self) -> int:
        return self._num_units

    @property
    def num_layers(self) -> int:
        return self._num_layers

    @property
    def clip(self) -> float:
        return self._clip

    @property
    def min_slope(self) -> float:
        return self._min_slope

    @property
    def tail_slope(self) -> float:
        """`eps` of the linear tail `g = (1 - eps) g_sigmoidal + eps x` (0: none)."""
        return self._tail_slope

    @property
    def tolerance(self) -> float:
        return self._tolerance

    @property
    def max_iterations(self) -> int:
        return self._max_iterations

    @property
    def range_limit(self) -> float:
        """`L`: the range of the forward map lies in `(-L, L)`; inf with a linear tail."""
        if self._tail_slope > 0.0:
            return float("inf")
        return float(np.log1p(-self._clip / 2.0) - np.log(self._clip / 2.0))

    @classmethod
    def _is_increasing(cls):
        return True

    def _split_params(self, params):
        """Per layer: `(a_raw, b, w_logits, u_logits or None)`.

        One `tf.split` (its gradient is one concatenation) rather than a strided
        slice per piece, whose gradients would each be a zero-padded tensor of
        the full size (they took half of DSF's backward pass).
        """
        k = self._num_units
        batch = ps.shape(params)[:-1]
        shapes = _layer_shapes(k, self._num_layers)
        sizes = [size for n_in, n_out in shapes
                 for size in (k, k, n_out * k, k * n_in if n_in > 1 else 0)]
        pieces = tf.split(params, [s for s in sizes if s], axis=-1)
        layers = []
        for n_in, n_out in shapes:
            a_raw, b, w = pieces.pop(0), pieces.pop(0), pieces.pop(0)
            w = tf.reshape(w, ps.concat([batch, [n_out, k]], axis=0))
            u = None
            if n_in > 1:
                u = tf.reshape(pieces.pop(0), ps.concat([batch, [k, n_in]], axis=0))
            layers.append((a_raw, b, w, u))
        return layers

    # ---- Forward ---------------------------------------------------------

    def forward_and_log_derivative(
        self, x: tf.Tensor, params: "tf.Tensor | None" = None
    ) -> "tuple[tf.Tensor, tf.Tensor]":
        """`(g(x), log g'(x))` in one pass, elementwise.

        `params` defaults to `self.params`; passing another tensor of the same
        last-axis size evaluates the same transformer at other parameters.
        """
        params = self._params if params is None else params
        params = tf.convert_to_tensor(params, dtype=self.dtype)
        x = tf.convert_to_tensor(x, dtype=self.dtype)
        return self._with_tail(x, *self._sigmoidal_layers(x, params))

    def _with_tail(self, x, y, log_deriv):
        """`(g, log g')` with the linear tail `g = (1 - eps) g_layers + eps x` (if any)."""
        if self._tail_slope > 0.0:
            eps = self._tail_slope
            y = tf.constant(1.0 - eps, self.dtype) * y + tf.constant(eps, self.dtype) * x
            log_deriv = _logaddexp(
                tf.constant(np.log1p(-eps), self.dtype) + log_deriv,
                tf.constant(np.log(eps), self.dtype),
            )
        return y, log_deriv

    def _sigmoidal_layers(self, x, params):
        """`(g(x), log g'(x))` of the stacked sigmoidal layers, before any linear tail."""
        (a_raw, b, w, _), *later = self._split_params(params)
        h, log_dh = _first_sigmoidal_layer(x, a_raw, b, w, self._clip, self._min_slope)
        return self._later_layers(h, log_dh, later)

    def _later_layers(self, h, log_dh, later):
        for a_raw, b, w, u in later:
            h, log_dh = _dense_sigmoidal_layer(
                h, log_dh, a_raw, b, w, u, self._clip, self._min_slope
            )
        return h[..., 0], log_dh[..., 0]

    def _evaluator(self, params):
        """`x -> (g(x), log g'(x))` at fixed `params`, for repeated evaluation.

        The inverse search evaluates `g` several times at the same parameters.
        The first layer's slopes and softmax depend on the parameters alone
        (three of DSF's five transcendental evaluations per unit), so they are
        computed once here instead of at every evaluation. Values only: use it
        with stopped parameters (the search's gradients are implicit).
        """
        (a_raw, b, w, _), *later = self._split_params(params)
        a, ew, inv_norm = _first_layer_prep(a_raw, w, self._min_slope)

        def evaluate(x):
            h, log_dh, _ = _first_layer_at(x, a, b, ew, inv_norm, self._clip)
            return self._with_tail(x, *self._later_layers(h, log_dh, later))

        return evaluate

    def _forward(self, x):
        y, log_deriv = self.forward_and_log_derivative(x)
        self._cache.forward_attributes(x)["ildj"] = -log_deriv
        return y

    def _forward_log_det_jacobian(self, x):
        return self.forward_and_log_derivative(x)[1]

    # ---- Inverse ---------------------------------------------------------

    def forward_limits(
        self, params: "tf.Tensor | None" = None
    ) -> "tuple[tf.Tensor, tf.Tensor]":
        """`(g(-inf), g(+inf))`: the open range of the forward map, per element.

        Without a linear tail both lie within `[-L, L]`: for DSF they are
        exactly `-L` and `L`, for DDSF they depend on the parameters. With a
        linear tail (`tail_slope > 0`) they are `-inf` and `inf`.
        """
        params = self._params if params is None else params
        params = tf.convert_to_tensor(params, dtype=self.dtype)
        batch = ps.shape(params)[:-1]
        if self._tail_slope > 0.0:
            inf = tf.fill(batch, tf.constant(np.inf, self.dtype))
            return -inf, inf
        big = tf.fill(batch, tf.constant(_SATURATING_INPUT, self.dtype))
        return (
            self.forward_and_log_derivative(-big, params)[0],
            self.forward_and_log_derivative(big, params)[0],
        )

    def _bracket(self, y, params):
        """A starting interval `[low, high]`, widened later if it misses the root."""
        return y - 1.0, y + 1.0

    def _bracket_is_exact(self) -> bool:
        """Whether `_bracket` always contains the root (no widening needed)."""
        return False

    def solve(self, y: tf.Tensor, params: "tf.Tensor | None" = None) -> tf.Tensor:
        """`g^{-1}(y)` by bracketed Newton search, with implicit gradients.

        `y` outside the open range `(g(-inf), g(+inf))` has no preimage: it is
        clamped to just inside the range and the result is a large finite `x`
        (its gradient with respect to `y` is zero). With `validate_args=True`
        such `y` (or a non-finite one) raises `InvalidArgumentError` instead.
        With a linear tail every finite `y` has a preimage.

        The search evaluates `g` with the parameters' own work done once
        (`_evaluator`); DSF starts it at the weighted mean of its units' roots.
        Where `g` depends on `params` alone (DSF, DDSF), `g` is evaluated at the
        root only when a gradient is asked for
        (`root_finding.solve_increasing_with_params`).
        """
        params = self._params if params is None else params
        params = tf.convert_to_tensor(params, dtype=self.dtype)
        y = tf.convert_to_tensor(y, dtype=self.dtype)
        y = tf.broadcast_to(y, ps.broadcast_shape(ps.shape(y), ps.shape(params)[:-1]))
        stopped_params = tf.stop_gradient(params)
        low_limit, high_limit = self.forward_limits(stopped_params)
        assertions = []
        if self.validate_args:
            assertions.append(
                assert_util.assert_equal(
                    tf.reduce_all((y > low_limit) & (y < high_limit)),
                    True,
                    message=(
                        f"Inverse of {type(self).__name__}: a value lies outside the "
                        "range of the forward map (at most "
                        f"(-{self.range_limit:.4g}, {self.range_limit:.4g})) or is "
                        "not finite."
                    ),
                )
            )
        with tf.control_dependencies(assertions):
            y = tf.identity(y)
            if self._tail_slope == 0.0:
                eps = np.finfo(dtype_util.as_numpy_dtype(self.dtype)).eps
                low_limit += 16.0 * eps * (1.0 + tf.abs(low_limit))
                high_limit -= 16.0 * eps * (1.0 + tf.abs(high_limit))
                y = tf.clip_by_value(y, low_limit, high_limit)

        def fn(x):
            return self.forward_and_log_derivative(x, params)

        stopped_fn = self._evaluator(stopped_params)
        low, high, start = self._bracket_and_start(y, stopped_params)
        if not self._bracket_is_exact():
            low, high = root_finding.expand_bracket(stopped_fn, y, low, high)
        if self._params_are_explicit:
            # g at the root is evaluated only if a gradient is asked for.
            return root_finding.solve_increasing_with_params(
                self.forward_and_log_derivative, y, params, low, high, self._tolerance,
                self._max_iterations, search_fn=stopped_fn, initial=start)
        return root_finding.solve_increasing(
            fn, y, low, high, self._tolerance, self._max_iterations, search_fn=stopped_fn
        )

    # `forward_and_log_derivative(x, params)` depends on nothing but `x`,
    # `params` and constants, so the inverse's gradients can be a custom
    # gradient in `(y, params)` (False where other tensors, such as shared
    # mixing logits, need gradients too).
    _params_are_explicit = True

    def _bracket_and_start(self, y, params):
        """`(low, high, start)`: the search's bracket and starting point (None: its own)."""
        low, high = self._bracket(y, params)
        return low, high, None

    def _inverse(self, y):
        return self.solve(y)

    def _inverse_log_det_jacobian(self, y):
        return -self.forward_and_log_derivative(self.inverse(y))[1]


class DeepSigmoidalFlow(_SigmoidalTransformer):
    """Deep sigmoidal flow (DSF) transformer of Huang et al. (2018).

    A strictly increasing scalar bijector with `K = num_units` sigmoids:

    ```none
    g(x) = logit( (1 - clip) * s(x) + clip / 2 ),
    s(x) = sum_k w_k sigmoid(a_k x + b_k),
    a = softplus(a_raw) + min_slope,  w = softmax(w_logits),
    log g'(x) = log(1 - clip) - log s' - log(1 - s')
                + logsumexp_k( log w_k + log a_k + log sigmoid(z_k)
                               + log sigmoid(-z_k) ),   z_k = a_k x + b_k.
    ```

    `params[..., :]` is `[a_raw (K), b (K), w_logits (K)]`, so
    `num_params(K) == 3 K`. At `params = 0`, `g` is the identity (up to the
    clipping). The inverse is bracketed exactly: since `s` is a convex mixture,
    the root lies between `min_k` and `max_k` of `(t - b_k) / a_k`, where
    `t = logit((sigmoid(y) - clip/2) / (1 - clip))`.

    #### Examples

    ```python
    import numpy as np
    from tfp_naf import DeepSigmoidalFlow

    dsf = DeepSigmoidalFlow(params=np.random.randn(5, 3 * 8).astype("float32"))
    x = np.linspace(-3., 3., 5).astype("float32")
    y = dsf.forward(x)                      # shape [5]
    dsf.forward_log_det_jacobian(x)         # log g'(x), shape [5]
    dsf.inverse(y)                          # ~= x
    ```
    """

    def __init__(
        self,
        params,
        num_units: "int | None" = None,
        clip: float = DEFAULT_CLIP,
        min_slope: float = DEFAULT_MIN_SLOPE,
        tail_slope: float = 0.0,
        tolerance: "float | None" = None,
        max_iterations: int = 100,
        validate_args: bool = False,
        name: str = "deep_sigmoidal_flow",
    ):
        """Builds a DSF transformer.

        Args:
          params: float `Tensor` `[..., 3 * num_units]` of unconstrained
            pseudo-parameters; leading axes broadcast against `x`.
          num_units: `K`; inferred from `params` when None.
          clip: squeeze of the sigmoid mixture before the logit, in (0, 1). It
            bounds the range to `(-L, L)`, `L = logit(1 - clip / 2)`.
          min_slope: lower bound added to each `a_k`.
          tail_slope: `eps` in [0, 1): when positive, `g` becomes
            `(1 - eps) g + eps x`, whose range is the whole real line. DSF's
            range `(-L, L)` does not depend on `params`, so the default is 0.
          tolerance: relative step tolerance of the inverse search; defaults to
            1e-6 (float32) or 1e-12 (float64).
          max_iterations: cap on the inverse search's iterations.
          validate_args: check inverse inputs lie in the range.
          name: name scope.
        """
        parameters = dict(locals())
        super().__init__(
            params,
            num_units,
            1,
            clip,
            min_slope,
            tail_slope,
            tolerance,
            max_iterations,
            validate_args,
            parameters,
            name,
        )

    def forward_limits(self, params=None):
        """`(-L, L)` exactly without a tail: the clipped mixture spans `(clip/2, 1 - clip/2)`."""
        if self._tail_slope > 0.0:
            return super().forward_limits(params)
        params = self._params if params is None else params
        batch = ps.shape(tf.convert_to_tensor(params, dtype=self.dtype))[:-1]
        limit = tf.fill(batch, tf.constant(self.range_limit, self.dtype))
        return -limit, limit

    def _bracket_is_exact(self) -> bool:
        return self._tail_slope == 0.0

    def _bracket(self, y, params):
        return self._bracket_and_start(y, params)[:2]

    def _bracket_and_start(self, y, params):
        """The exact bracket, and the softmax-weighted mean of its candidates as the start.

        The candidates `(t - b_k) / a_k` are the roots of each unit alone; the
        root of the mixture lies between them, and their weighted mean starts
        the search as close as the false-position point does (4 iterations per
        solve for random parameters, both ways) without evaluating `g` at
        the bracket's ends.
        """
        if self._tail_slope > 0.0:  # Not exact: the generic start, widened by `solve`.
            return (*super()._bracket(y, params), None)
        (a_raw, b, w_logits, _), = self._split_params(params)
        dtype = self.dtype
        a = _slopes(a_raw, self._min_slope)
        half_clip = tf.constant(self._clip / 2.0, dtype)
        # logit of the unclipped mixture value that maps to y.
        log_sig_pos, log_sig_neg = tf.math.log_sigmoid(y), tf.math.log_sigmoid(-y)
        t = (log_sig_pos + tf.math.log1p(-half_clip * tf.exp(-log_sig_pos))) - (
            log_sig_neg + tf.math.log1p(-half_clip * tf.exp(-log_sig_neg))
        )
        candidates = (t[..., tf.newaxis] - b) / a
        low, high = tf.reduce_min(candidates, axis=-1), tf.reduce_max(candidates, axis=-1)
        # Exact in real arithmetic; a relative margin covers the rounding.
        margin = tf.constant(64.0 * np.finfo(dtype.as_numpy_dtype).eps, dtype) * (
            1.0 + tf.abs(low) + tf.abs(high)
        )
        weights = tf.nn.softmax(w_logits[..., 0, :], axis=-1)  # [..., n_out = 1, K] -> [..., K]
        start = tf.reduce_sum(weights * candidates, axis=-1)
        return low - margin, high + margin, tf.clip_by_value(start, low, high)


class DeepDenseSigmoidalFlow(_SigmoidalTransformer):
    """Deep dense sigmoidal flow (DDSF) transformer of Huang et al. (2018).

    `num_layers` dense sigmoidal layers of width `K = num_units`, from the
    scalar input to the scalar output (`1 -> K -> ... -> K -> 1`). Layer `l`
    maps `h` (width `n_in`) to `h'` (width `n_out`):

    ```none
    h'_o = logit( (1 - clip) * sum_k w_ok sigmoid(a_k sum_j u_kj h_j + b_k)
                  + clip / 2 ),
    a = softplus(a_raw) + min_slope,  w = softmax_k(w_logits),
    u = softmax_j(u_logits).
    ```

    All weights `a`, `w`, `u` are positive, so each layer is increasing in each
    input and the whole map is strictly increasing. The log-derivative is
    chained through the layers as log-space matrix products:

    ```none
    log dh'_o/dx = log(1 - clip) - log s'_o - log(1 - s'_o)
        + logsumexp_k( log w_ok + log a_k + log sigmoid(z_k) + log sigmoid(-z_k)
                       + logsumexp_j( log u_kj + log dh_j/dx ) ).
    ```

    Per layer `params` holds `[a_raw (K), b (K), w_logits (n_out * K),
    u_logits (K * n_in, omitted when n_in = 1)]`, concatenated over layers;
    `num_params(K, L)` gives the total. With `num_layers=1` and no tail it is
    exactly DSF. At `params = 0` it is the identity (up to the clipping).

    Unlike DSF, the range of the stacked layers depends on the parameters and
    can be much narrower than `(-L, L)` (a small slope `a` in the last layer
    squeezes it), so noise values outside it would have no preimage and a
    density built on `Invert` would lose mass. DDSF therefore adds a small
    linear tail by default, `g = (1 - eps) g_layers + eps x` with
    `eps = tail_slope = 1e-3`: the range is the whole real line, the density is
    exactly normalised, and every finite value has an inverse. Pass
    `tail_slope=0` for the paper's exact form.

    #### Examples

    ```python
    import numpy as np
    from tfp_naf import DeepDenseSigmoidalFlow

    p = DeepDenseSigmoidalFlow.num_params(num_units=8, num_layers=2)
    ddsf = DeepDenseSigmoidalFlow(
        params=0.3 * np.random.randn(4, p).astype("float32"), num_layers=2)
    x = np.float32([-2., 0., 1., 5.])
    y = ddsf.forward(x)
    ddsf.inverse(y)                          # ~= x
    ```
    """

    def __init__(
        self,
        params,
        num_units: "int | None" = None,
        num_layers: int = 2,
        clip: float = DEFAULT_CLIP,
        min_slope: float = DEFAULT_MIN_SLOPE,
        tail_slope: float = DEFAULT_DDSF_TAIL_SLOPE,
        tolerance: "float | None" = None,
        max_iterations: int = 100,
        validate_args: bool = False,
        name: str = "deep_dense_sigmoidal_flow",
    ):
        """Builds a DDSF transformer.

        Args:
          params: float `Tensor` `[..., num_params(num_units, num_layers)]`.
          num_units: `K`, the width of each layer; inferred when None.
          num_layers: number of dense sigmoidal layers (>= 1).
          tail_slope: `eps` of the linear tail (see above); 0 for none.
          clip, min_slope, tolerance, max_iterations, validate_args, name: as
            for `DeepSigmoidalFlow`.
        """
        parameters = dict(locals())
        super().__init__(
            params,
            num_units,
            num_layers,
            clip,
            min_slope,
            tail_slope,
            tolerance,
            max_iterations,
            validate_args,
            parameters,
            name,
        )
