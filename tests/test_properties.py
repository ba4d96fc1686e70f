"""Property-based tests of NeuralAutoregressiveFlow over its whole configuration space.

Hypothesis draws a flow configuration -- event size 1..6, transformer DSF or
DDSF, 1..6 units, 1..3 DDSF layers, conditional or not, plain or compact
(`context_units`) conditioner, input order, float32 or float64 -- and a batch
shape (scalar, 1-d or 2-d), and checks the properties every such flow must
have: round trips, the log-determinant equals the autodiff Jacobian's, the
Jacobian is triangular in the autoregressive order, batch elements are
independent, and gradients are finite.

Examples are derandomized, so CI is reproducible and its runtime stable. For a
wider, random search run with `TFP_NAF_HYPOTHESIS=thorough`.
"""

import functools
import os

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from conftest import randomize_all
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tfp_naf import NeuralAutoregressiveFlow

tfb, tfd = tfp.bijectors, tfp.distributions

settings.register_profile(
    "tfp_naf_ci",
    max_examples=12,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "tfp_naf_thorough",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
PROFILE = settings.get_profile(
    "tfp_naf_thorough" if os.environ.get("TFP_NAF_HYPOTHESIS") == "thorough" else "tfp_naf_ci"
)
COND_SIZE = 2


@st.composite
def configs(draw):
    """Constructor options of a small flow (hashable: a sorted tuple of items)."""
    transformer = draw(st.sampled_from(["dsf", "ddsf"]))
    return dict(
        event_size=draw(st.integers(1, 6)),
        transformer=transformer,
        num_units=draw(st.integers(1, 6)),
        num_layers=draw(st.integers(1, 3)) if transformer == "ddsf" else 1,
        conditional=draw(st.booleans()),
        context_units=draw(st.sampled_from([None, None, 1, 3])),
        input_order=draw(st.sampled_from(["left-to-right", "right-to-left", "random"])),
        hidden_units=draw(st.sampled_from([(8,), (8, 8)])),
        dtype=draw(st.sampled_from(["float32", "float64"])),
        seed=draw(st.integers(0, 3)),
    )


batch_shapes = st.sampled_from([(), (1,), (5,), (2, 3), (3, 1)])


@functools.cache
def _build(items):
    """A randomized flow for a `configs` draw; cached, flows are costly to build."""
    config = dict(items)
    naf = NeuralAutoregressiveFlow(
        event_shape=[config["event_size"]],
        hidden_units=list(config["hidden_units"]),
        transformer=config["transformer"],
        num_units=config["num_units"],
        num_layers=config["num_layers"],
        conditional_event_shape=[COND_SIZE] if config["conditional"] else None,
        context_units=config["context_units"],
        input_order=config["input_order"],
        dtype=config["dtype"],
    )
    return randomize_all(naf, scale=0.3, seed=config["seed"])


def build(config, batch_shape):
    # Known bug (see test_extremes.py::test_event_size_one_with_two_batch_axes): a
    # MADE with D = 1 fails on inputs of rank >= 3. Drop this once that test passes.
    assume(not (config["event_size"] == 1 and len(batch_shape) >= 2))
    return _build(tuple(sorted(config.items())))


def inputs(naf, batch_shape, seed, scale=2.0):
    """`(x, kwargs)`: data of shape `batch_shape + [D]`, plus the condition if any."""
    rng = np.random.default_rng(seed)
    dtype = naf.dtype.as_numpy_dtype
    x = (scale * rng.normal(size=(*batch_shape, naf.event_size))).astype(dtype)
    if not naf.conditional:
        return x, {}
    return x, {"conditional_input": rng.normal(size=(*batch_shape, COND_SIZE)).astype(dtype)}


def degrees(naf):
    """1-based autoregressive position of each dimension."""
    made = getattr(naf.conditioner, "made", naf.conditioner)
    return np.asarray(made._input_order)


def jacobian(naf, x, kwargs):
    """`(z, log_det, J)` with `J[..., i, k] = dz_i / dx_k` by reverse-mode autodiff."""
    x = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        z, log_det = naf.forward_and_log_det(x, **kwargs)
        rows = [z[..., i] for i in range(naf.event_size)]
    # Batch members are independent, so the gradient of the sum over the batch of
    # z_i is row i of each member's Jacobian.
    jac = tf.stack([tape.gradient(row, x) for row in rows], axis=-2)
    return z.numpy(), log_det.numpy(), jac.numpy()


def tolerance(naf, tol32, tol64):
    return tol32 if naf.dtype == tf.float32 else tol64


@PROFILE
@given(config=configs(), batch_shape=batch_shapes, seed=st.integers(0, 2**16))
def test_round_trip_and_batch_independence(config, batch_shape, seed):
    naf = build(config, batch_shape)
    x, kwargs = inputs(naf, batch_shape, seed)
    z, log_det = naf.forward_and_log_det(x, **kwargs)
    assert z.dtype == naf.dtype and z.shape == x.shape and log_det.shape == batch_shape
    assert np.all(np.isfinite(z)) and np.all(np.isfinite(log_det))
    # Batch members do not interact: a flattened batch gives the same numbers.
    flat_kwargs = {k: v.reshape(-1, v.shape[-1]) for k, v in kwargs.items()}
    z_flat, log_det_flat = naf.forward_and_log_det(x.reshape(-1, naf.event_size), **flat_kwargs)
    np.testing.assert_allclose(z_flat.numpy().reshape(x.shape), z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        log_det_flat.numpy().reshape(batch_shape), log_det, rtol=1e-5, atol=1e-5
    )
    # x -> z -> x. tf.identity defeats the bijector cache, so the inverse is solved.
    x_back = naf.inverse(tf.identity(z), **kwargs).numpy()
    assert x_back.dtype == x.dtype and x_back.shape == x.shape
    tol = tolerance(naf, 2e-3, 1e-8)
    np.testing.assert_allclose(x_back, x, rtol=tol, atol=tol)
    # noise -> x -> noise, with noise well inside the range of the forward map.
    noise = np.random.default_rng(seed + 1).normal(size=x.shape).astype(x.dtype)
    x_noise = naf.inverse(noise, **kwargs)
    assert np.all(np.isfinite(x_noise))
    z_back = naf.forward(tf.identity(x_noise), **kwargs).numpy()
    np.testing.assert_allclose(z_back, noise, rtol=tol, atol=tol)


@PROFILE
@given(config=configs(), batch_shape=batch_shapes, seed=st.integers(0, 2**16))
def test_log_det_is_log_abs_det_of_triangular_autodiff_jacobian(config, batch_shape, seed):
    naf = build(config, batch_shape)
    x, kwargs = inputs(naf, batch_shape, seed)
    z, log_det, jac = jacobian(naf, x, kwargs)
    # Triangular in the autoregressive order: z_i ignores x_k unless k comes first.
    deg = degrees(naf)
    later_or_same = deg[np.newaxis, :] >= deg[:, np.newaxis]
    off_diagonal = later_or_same & ~np.eye(naf.event_size, dtype=bool)
    assert np.all(jac[..., off_diagonal] == 0.0), "z_i depends on a later x_k"
    diagonal = np.diagonal(jac, axis1=-2, axis2=-1)
    assert np.all(diagonal > 0.0), "the transformer is not increasing"
    # Hence log|det J| = sum_i log J_ii, which must be what the flow reports.
    sign, expected = np.linalg.slogdet(jac.astype(np.float64))
    assert np.all(sign > 0)
    tol = tolerance(naf, 1e-3, 1e-9)
    np.testing.assert_allclose(log_det, expected, rtol=tol, atol=tol)
    ildj = naf.inverse_log_det_jacobian(tf.identity(z), **kwargs).numpy()
    np.testing.assert_allclose(ildj, -expected, rtol=10 * tol, atol=10 * tol)


@PROFILE
@given(
    config=configs(),
    batch_shape=batch_shapes,
    seed=st.integers(0, 2**16),
    which=st.integers(0, 5),
    shift=st.sampled_from([-5.0, -0.5, 0.3, 4.0]),
)
def test_moving_one_input_leaves_earlier_outputs_exactly_unchanged(
    config, batch_shape, seed, which, shift
):
    naf = build(config, batch_shape)
    x, kwargs = inputs(naf, batch_shape, seed)
    k = which % naf.event_size
    moved = x.copy()
    moved[..., k] += shift
    z = naf.forward(x, **kwargs).numpy()
    z_moved = naf.forward(moved, **kwargs).numpy()
    deg = degrees(naf)
    earlier = deg < deg[k]
    np.testing.assert_array_equal(z_moved[..., earlier], z[..., earlier])
    # Strictly increasing in its own input (finite precision aside).
    assert np.all(np.sign(z_moved[..., k] - z[..., k]) == np.sign(shift))


@PROFILE
@given(config=configs(), batch_shape=batch_shapes, seed=st.integers(0, 2**16))
def test_gradients_of_log_prob_and_sample_are_finite(config, batch_shape, seed):
    naf = build(config, batch_shape)
    x, kwargs = inputs(naf, batch_shape, seed)
    dtype = naf.dtype
    base = tfd.Sample(tfd.Normal(tf.zeros([], dtype), tf.ones([], dtype)), [naf.event_size])
    density = tfd.TransformedDistribution(base, tfb.Invert(naf))
    x = tf.constant(x)
    c = kwargs.get("conditional_input")
    c = None if c is None else tf.constant(c)
    bijector_kwargs = {} if c is None else {"bijector_kwargs": {"conditional_input": c}}
    variables = naf.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        if c is not None:
            tape.watch(c)
        log_prob = density.log_prob(x, **bijector_kwargs)
        loss = -tf.reduce_mean(log_prob)
    assert log_prob.shape == batch_shape and np.all(np.isfinite(log_prob))
    wrt = [x, *variables] + ([c] if c is not None else [])
    grads = tape.gradient(loss, wrt)
    assert all(g is not None for g in grads), "a variable gets no gradient"
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert max(float(tf.reduce_max(tf.abs(g))) for g in grads[1:]) > 0.0
    # Sampling direction: gradients through the inverse (implicit function theorem).
    noise = tf.constant(
        np.random.default_rng(seed).normal(size=(*batch_shape, naf.event_size)), dtype
    )
    with tf.GradientTape() as tape:
        tape.watch(noise)
        sample = naf.inverse(noise, **kwargs)
        total = tf.reduce_sum(sample**2)
    grads = tape.gradient(total, [noise, *variables])
    assert all(g is not None and np.all(np.isfinite(g)) for g in grads)
