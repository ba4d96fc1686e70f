"""SharedDenseSigmoidalFlow ("ddsf-shared"): DDSF with shared, learned mixing matrices."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from tfp_naf import NeuralAutoregressiveFlow
from tfp_naf.shared_mixing import SharedDenseSigmoidalFlow
from tfp_naf.transformers import DeepDenseSigmoidalFlow

tfb, tfd = tfp.bijectors, tfp.distributions
K = 5


def _shared(batch, layers=2, scale=1.0, dtype=np.float64, seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    p = SharedDenseSigmoidalFlow.num_params(K, layers)
    m = SharedDenseSigmoidalFlow.num_mixing_params(K, layers)
    params = (scale * rng.normal(size=[batch, p])).astype(dtype)
    mixing = (scale * rng.normal(size=[m])).astype(dtype)
    return SharedDenseSigmoidalFlow(params=params, mixing_logits=mixing, num_units=K,
                                    num_layers=layers, **kwargs), params, mixing


def _equivalent_ddsf(params, mixing, layers):
    """The DDSF whose per-element logits are the shared logits plus the offsets."""
    batch, k = params.shape[0], K
    widths = [1] + [k] * (layers - 1) + [1]
    full, ci, mi = [], 0, 0
    for n_in, n_out in zip(widths[:-1], widths[1:], strict=True):
        a, b, c = (params[:, ci + j * k: ci + (j + 1) * k] for j in range(3))
        ci += 3 * k
        w = mixing[mi: mi + n_out * k].reshape(n_out, k)
        mi += n_out * k
        pieces = [a, b, (w[None] + c[:, None, :]).reshape(batch, -1)]
        if n_in > 1:
            d = params[:, ci: ci + n_in]
            ci += n_in
            u = mixing[mi: mi + k * n_in].reshape(k, n_in)
            mi += k * n_in
            pieces.append((u[None] + d[:, None, :]).reshape(batch, -1))
        full.append(np.concatenate(pieces, axis=-1))
    return DeepDenseSigmoidalFlow(params=np.concatenate(full, axis=-1), num_units=K,
                                  num_layers=layers)


def test_sizes():
    assert SharedDenseSigmoidalFlow.num_params(16, 2) == 112
    assert SharedDenseSigmoidalFlow.num_mixing_params(16, 2) == 16 * 16 + 16 + 16 * 16
    assert SharedDenseSigmoidalFlow.num_params(K, 3) == 9 * K + 2 * K
    assert NeuralAutoregressiveFlow.conditioner_params("ddsf-shared", 16, 2) == 112
    with pytest.raises(ValueError, match="mixing_logits"):
        SharedDenseSigmoidalFlow(params=np.zeros([7, 3 * K + 3 * K + K]),
                                 mixing_logits=np.zeros([3]), num_units=K)


@pytest.mark.parametrize("layers", [2, 3])
def test_equals_ddsf_with_the_summed_logits(layers):
    """The same map and log-derivative as DDSF at logits W + c, U + d (float64), even far out."""
    shared, params, mixing = _shared(9, layers, seed=layers)
    full = _equivalent_ddsf(params, mixing, layers)
    x = np.array([-1e4, -50.0, -3.0, -0.5, 0.0, 0.7, 4.0, 60.0, 1e4])
    y, log_deriv = shared.forward_and_log_derivative(x)
    y_full, log_deriv_full = full.forward_and_log_derivative(x)
    np.testing.assert_allclose(y, y_full, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(log_deriv, log_deriv_full, rtol=1e-10, atol=1e-10)


def test_log_derivative_matches_autodiff():
    shared, _, _ = _shared(57, scale=1.5, seed=3)
    x = tf.constant(np.linspace(-8.0, 8.0, 57))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y, log_deriv = shared.forward_and_log_derivative(x)
    dydx = tape.gradient(y, x).numpy()
    assert np.all(dydx > 0)
    np.testing.assert_allclose(log_deriv, np.log(dydx), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-4), (np.float64, 1e-9)])
def test_round_trip(dtype, tol):
    shared, _, _ = _shared(41, dtype=dtype, seed=4)
    x = np.linspace(-6.0, 6.0, 41).astype(dtype)
    x_back = shared.inverse(tf.constant(shared.forward(x).numpy())).numpy()
    assert np.abs(x_back - x).max() <= tol


def test_finite_far_out_with_gradients_float32():
    shared, params, mixing = _shared(9, dtype=np.float32, seed=5)
    x = tf.constant([-1e4, -1e3, -50.0, -1.0, 0.0, 1.0, 50.0, 1e3, 1e4], tf.float32)
    params, mixing = tf.constant(params), tf.Variable(mixing)
    bij = SharedDenseSigmoidalFlow(params=params, mixing_logits=mixing, num_units=K)
    with tf.GradientTape() as tape:
        tape.watch([x, params])
        y, log_deriv = bij.forward_and_log_derivative(x)
        total = tf.reduce_sum(y) + tf.reduce_sum(log_deriv)
    assert np.all(np.isfinite(y.numpy())) and np.all(np.isfinite(log_deriv.numpy()))
    for grad in tape.gradient(total, [x, params, mixing]):
        assert grad is not None and np.all(np.isfinite(grad.numpy()))


def test_identity_at_zero():
    p = SharedDenseSigmoidalFlow.num_params(K, 2)
    m = SharedDenseSigmoidalFlow.num_mixing_params(K, 2)
    bij = SharedDenseSigmoidalFlow(params=np.zeros([p]), mixing_logits=np.zeros([m]),
                                   num_units=K)
    x = np.linspace(-6.0, 6.0, 49)
    bound = 2 * bij.clip * np.exp(np.abs(x)) + bij.tail_slope * 1e-3 * np.abs(x) ** 3 + 1e-12
    assert np.all(np.abs(bij.forward(x).numpy() - x) <= bound)


@pytest.mark.parametrize("context_units", [None, 3])
def test_flow_learns_the_shared_logits_and_inverts(context_units):
    tf_keras.utils.set_random_seed(0)
    naf = NeuralAutoregressiveFlow(event_shape=[3], hidden_units=[16], transformer="ddsf-shared",
                                   num_units=4, context_units=context_units, dtype=tf.float64)
    flow = tfd.TransformedDistribution(tfd.Sample(tfd.Normal(tf.constant(0.0, tf.float64), 1.0),
                                                  [3]), tfb.Invert(naf))
    x = np.random.default_rng(0).normal(size=[6, 3])
    mixing = naf.transformer.mixing_logits
    assert any(v is mixing for v in flow.trainable_variables)
    with tf.GradientTape() as tape:
        loss = -tf.reduce_mean(flow.log_prob(x))
    grad = tape.gradient(loss, mixing)
    assert grad is not None and np.abs(grad.numpy()).max() > 0
    # The flow's inverse (one dimension per pass) undoes its forward.
    z = naf.forward(x).numpy()
    np.testing.assert_allclose(naf.inverse(tf.constant(z)), x, atol=1e-8)
    # log_prob of a batch equals the rows' log_probs one at a time.
    whole = flow.log_prob(x).numpy()
    single = np.array([flow.log_prob(x[i:i + 1]).numpy()[0] for i in range(len(x))])
    np.testing.assert_allclose(whole, single, rtol=1e-10)


def _gradients(bij, x, sources):
    with tf.GradientTape() as tape:
        tape.watch([x, *sources])
        y, log_deriv = bij.forward_and_log_derivative(x)
        total = tf.reduce_sum(y) + tf.reduce_sum(tf.sin(log_deriv))
    return [g.numpy() for g in tape.gradient(total, [x, *sources])]


class _AutodiffShared:
    """`SharedDenseSigmoidalFlow`'s layers with autodiff gradients (no tail)."""

    def __init__(self, params, mixing, layers):
        self.params, self.mixing, self.layers = params, mixing, layers

    def forward_and_log_derivative(self, x):
        from tfp_naf import shared_mixing, transformers

        return shared_mixing._shared_sigmoidal_layers(
            x, self.params, self.mixing, K, self.layers, transformers.DEFAULT_CLIP,
            transformers.DEFAULT_MIN_SLOPE, closed_form=False)


@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize("x_scale", [1.0, 30.0])
@pytest.mark.parametrize("outputs", ["both", "values", "log_derivative"])
def test_closed_form_gradients_match_autodiff(layers, x_scale, outputs):
    """The shared layers' closed-form gradients (input, offsets, shared mixing) equal
    autodiff through their forward (float64), near 0 and far out, with the parameters
    broadcast against the input and with either output alone feeding the loss."""
    from tfp_naf import shared_mixing

    p = SharedDenseSigmoidalFlow.num_params(K, layers)
    m = SharedDenseSigmoidalFlow.num_mixing_params(K, layers)
    rng = np.random.default_rng(layers)
    x = tf.constant(x_scale * rng.normal(size=[4, 6]))
    params = tf.constant(1.5 * rng.normal(size=[6, p]))  # Broadcast over x's first axis.
    mixing = tf.constant(1.5 * rng.normal(size=[m]))
    grads = []
    for closed_form in (True, False):
        with tf.GradientTape() as tape:
            tape.watch([x, params, mixing])
            y, log_deriv = shared_mixing._shared_sigmoidal_layers(
                x, params, mixing, K, layers, 1e-6, 1e-3, closed_form=closed_form)
            total = 0.0
            if outputs != "log_derivative":
                total += tf.reduce_sum(tf.sin(y))
            if outputs != "values":
                total += tf.reduce_sum(tf.cos(log_deriv))
        grads.append(tape.gradient(total, [x, params, mixing]))
    for closed, auto in zip(*grads, strict=True):
        assert np.all(np.isfinite(closed.numpy()))
        np.testing.assert_allclose(closed, auto, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["ddsf-shared", "ddsf"])
def test_held_shifts_leave_the_gradients_unchanged(kind, monkeypatch):
    """The stabilising shifts held constant (`_held_shift`) cancel: the same gradients as
    autodiff through them, for the input, the parameters and the shared mixing (float64)."""
    from tfp_naf import shared_mixing, transformers

    _, params, mixing = _shared(11, layers=3, scale=2.0, seed=6)
    x = tf.constant(np.linspace(-9.0, 9.0, 11))
    params, mixing = tf.constant(params), tf.constant(mixing)
    if kind == "ddsf":
        full = _equivalent_ddsf(params.numpy(), mixing.numpy(), 3)
        params = tf.constant(full.params.numpy())

        def build():
            return DeepDenseSigmoidalFlow(params=params, num_units=K, num_layers=3)
        sources = [params]
    else:
        def build():
            return SharedDenseSigmoidalFlow(params=params, mixing_logits=mixing, num_units=K,
                                            num_layers=3)
        sources = [params, mixing]
    if kind == "ddsf-shared":  # Autodiff through the forward (closed_form=False).
        def build():
            return _AutodiffShared(params, mixing, 3)
    held = _gradients(build(), x, sources)
    for module in (transformers, shared_mixing):
        monkeypatch.setattr(module, "_held_shift", lambda t: t)
    free = _gradients(build(), x, sources)
    for g_held, g_free in zip(held, free, strict=True):
        assert np.all(np.isfinite(g_held))
        np.testing.assert_allclose(g_held, g_free, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("x_scale", [1.0, 30.0])
def test_gradients_match_finite_differences(x_scale):
    """Directional derivatives of a loss of `(y, log g')` along random directions of the
    input, the parameters and the shared mixing logits (float64, held shifts included), near
    0 and far out."""
    _, params, mixing = _shared(13, layers=3, scale=1.5, seed=7)
    x = x_scale * np.random.default_rng(8).normal(size=13)
    rng = np.random.default_rng(9)
    directions = [rng.normal(size=v.shape) for v in (x, params, mixing)]

    def loss(x, params, mixing):
        bij = SharedDenseSigmoidalFlow(params=params, mixing_logits=mixing, num_units=K,
                                       num_layers=3)
        y, log_deriv = bij.forward_and_log_derivative(x)
        return tf.reduce_sum(tf.sin(y)) + tf.reduce_sum(tf.sin(log_deriv))

    inputs = [tf.constant(v) for v in (x, params, mixing)]
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        total = loss(*inputs)
    grads = tape.gradient(total, inputs)
    h = 1e-6
    for i, (grad, direction) in enumerate(zip(grads, directions, strict=True)):
        plus = [v + (h * direction if j == i else 0.0) for j, v in enumerate((x, params, mixing))]
        minus = [v - (h * direction if j == i else 0.0) for j, v in enumerate((x, params, mixing))]
        numeric = (loss(*plus) - loss(*minus)).numpy() / (2 * h)
        np.testing.assert_allclose(np.sum(grad.numpy() * direction), numeric, rtol=1e-6)
