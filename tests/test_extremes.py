"""Extreme and invalid values: far-out inputs, out-of-range inverses, NaN and inf.

What is promised, and pinned down here:

* float32 inputs with |x| up to 1e4 give finite `z`, log-det, `log_prob` and
  gradients (inputs and variables), for one flow and for a chain of flows.
* DSF's range is `(-L, L)`: an inverse of a value outside it is clamped (a
  large finite `x`, zero gradient in `y`) without `validate_args`, and raises
  `InvalidArgumentError` with it. DDSF's default linear tail makes every finite
  value invertible.
* float64 stays float64 everywhere.
* NaN/inf inputs: with `validate_args=True` an `InvalidArgumentError` names
  the problem; without, the affected event's outputs are NaN (never a finite
  wrong number) and the other batch members are untouched.
"""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from conftest import randomize

from tfp_naf import NeuralAutoregressiveFlow

tfb, tfd = tfp.bijectors, tfp.distributions

D = 3
FAR = np.array(
    [
        [1e4, -1e4, 0.5],
        [-1e4, 1e4, -1e4],
        [3e3, -7e3, 1e4],
        [0.1, -0.2, 0.3],  # An ordinary point next to the far ones.
    ],
    np.float32,
)


def flow(transformer="dsf", dtype=tf.float32, seed=0, conditional=False, **kwargs):
    naf = NeuralAutoregressiveFlow(
        event_shape=[D],
        hidden_units=[16],
        transformer=transformer,
        num_units=4,
        conditional_event_shape=[2] if conditional else None,
        dtype=dtype,
        **kwargs,
    )
    return randomize(naf, scale=0.5, seed=seed)


def density(bijector, dtype=tf.float32):
    base = tfd.Sample(tfd.Normal(tf.zeros([], dtype), tf.ones([], dtype)), [D])
    return tfd.TransformedDistribution(base, tfb.Invert(bijector))


def assert_all_finite(*tensors):
    for t in tensors:
        assert t is not None
        assert np.all(np.isfinite(np.asarray(t))), t


def log_prob_and_grads(dist, x, variables, **kwargs):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        log_prob = dist.log_prob(x, **kwargs)
        loss = -tf.reduce_sum(log_prob)
    grad_x, *grad_vars = tape.gradient(loss, [x, *variables])
    return log_prob.numpy(), grad_x, grad_vars


# ---- Far-out inputs ------------------------------------------------------


@pytest.mark.parametrize(
    "transformer, context_units, conditional",
    [("dsf", None, False), ("ddsf", None, True), ("dsf", 3, True)],
)
def test_float32_far_inputs_are_finite_with_finite_gradients(
    transformer, context_units, conditional
):
    naf = flow(transformer, conditional=conditional, context_units=context_units)
    kwargs = {}
    if conditional:
        kwargs = {"conditional_input": np.linspace(-1, 1, 2 * len(FAR), dtype=np.float32)
                  .reshape(len(FAR), 2)}
    z, log_det = naf.forward_and_log_det(FAR, **kwargs)
    assert_all_finite(z, log_det)
    bijector_kwargs = {"bijector_kwargs": kwargs} if kwargs else {}
    log_prob, grad_x, grad_vars = log_prob_and_grads(
        density(naf), FAR, naf.trainable_variables, **bijector_kwargs
    )
    assert_all_finite(log_prob, grad_x, *grad_vars)
    # Far out the density is tiny, not a finite wrong number near the bulk's.
    assert np.all(log_prob[:3] < log_prob[3] - 10.0)
    assert max(float(tf.reduce_max(tf.abs(g))) for g in grad_vars) > 0.0


def test_float32_far_inputs_through_a_chain_of_flows():
    nafs = [flow(t, seed=s) for s, t in enumerate(["dsf", "ddsf", "dsf"])]
    chain = tfb.Chain([nafs[2], tfb.Permute([2, 1, 0]), nafs[1], tfb.Permute([2, 1, 0]), nafs[0]])
    variables = [v for naf in nafs for v in naf.trainable_variables]
    z = chain.forward(FAR)
    assert_all_finite(z, chain.forward_log_det_jacobian(FAR, event_ndims=1))
    log_prob, grad_x, grad_vars = log_prob_and_grads(density(chain), FAR, variables)
    assert_all_finite(log_prob, grad_x, *grad_vars)
    assert np.all(log_prob[:3] < log_prob[3] - 10.0)
    # Every flow of the chain gets a gradient, also from the far-out points alone.
    _, _, far_grads = log_prob_and_grads(density(chain), FAR[:3], variables)
    assert_all_finite(*far_grads)
    for naf in nafs:
        ids = {id(v) for v in naf.trainable_variables}
        grads = [g for v, g in zip(variables, far_grads, strict=True) if id(v) in ids]
        assert max(float(tf.reduce_max(tf.abs(g))) for g in grads) > 0.0


def test_float64_end_to_end_at_far_inputs():
    naf = flow("ddsf", dtype=tf.float64, conditional=True)
    x = tf.constant(FAR.astype(np.float64))
    c = tf.constant(np.ones([len(FAR), 2]))
    assert all(v.dtype == tf.float64 for v in naf.variables)
    with tf.GradientTape() as tape:
        tape.watch([x, c])
        z, log_det = naf.forward_and_log_det(x, conditional_input=c)
        log_prob = density(naf, tf.float64).log_prob(
            x, bijector_kwargs={"conditional_input": c}
        )
        loss = -tf.reduce_sum(log_prob)
    grads = tape.gradient(loss, [x, c, *naf.trainable_variables])
    for t in [z, log_det, log_prob, *grads]:
        assert t.dtype == tf.float64
    assert_all_finite(z, log_det, log_prob, *grads)
    # float64 precision survives: the inverse of the bulk point is exact to 1e-9.
    x_back = naf.inverse(tf.identity(z[3:]), conditional_input=c[3:])
    assert x_back.dtype == tf.float64
    np.testing.assert_allclose(x_back, x[3:], atol=1e-9)


# ---- Inverse outside the range ---------------------------------------------


OUTSIDE = np.array([[20.0, -20.0, 0.5], [1e4, 0.0, -1e4], [0.1, 14.6, -0.2]], np.float32)


def test_dsf_inverse_outside_its_range_is_clamped_and_finite():
    naf = flow("dsf")
    assert naf.range_limit == pytest.approx(14.5086, abs=1e-3)
    y = tf.constant(OUTSIDE)
    with tf.GradientTape() as tape:
        tape.watch(y)
        x = naf.inverse(y)
        total = tf.reduce_sum(x)
    grad_y, *grad_vars = tape.gradient(total, [y, *naf.trainable_variables])
    assert_all_finite(x, grad_y, *grad_vars)
    # Clamped to just inside the range: forward(x) sits at the range's edge, on
    # the side of y, and y's gradient is zero there.
    y_back = naf.forward(tf.identity(x)).numpy()
    outside = np.abs(OUTSIDE) > naf.range_limit
    assert np.all(np.sign(y_back[outside]) == np.sign(OUTSIDE[outside]))
    np.testing.assert_allclose(np.abs(y_back[outside]), naf.range_limit, rtol=1e-4)
    assert np.all(grad_y.numpy()[outside] == 0.0)
    # The in-range entries of the same events are still solved exactly (later
    # ones condition on the clamped, finite, earlier x).
    np.testing.assert_allclose(y_back[~outside], OUTSIDE[~outside], atol=1e-4)


def test_ddsf_without_tail_clamps_to_its_parameter_dependent_range():
    naf = flow("ddsf", tail_slope=0.0)
    assert_all_finite(naf.inverse(OUTSIDE))
    strict = flow("ddsf", tail_slope=0.0, validate_args=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside the range"):
        strict.inverse(OUTSIDE)
    # Values the forward map produced are in its range by construction.
    x = np.float32([[0.3, -1.0, 2.0], [5.0, 0.0, -3.0]])
    z = strict.forward(x)
    x_back = strict.inverse(tf.identity(z))
    # Without the tail, g' can be tiny where DDSF saturates (x is then only
    # determined to float32 noise / g'): check the round trip in z tightly.
    np.testing.assert_allclose(strict.forward(x_back), z, atol=2e-6)
    np.testing.assert_allclose(x_back, x, atol=1e-2)


def test_dsf_inverse_outside_its_range_raises_with_validate_args():
    naf = flow("dsf", validate_args=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside the range"):
        naf.inverse(OUTSIDE)
    # Also through a sampling-first distribution, whose log_prob inverts.
    base = tfd.Sample(tfd.Normal(0.0, 1.0), [D])
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside the range"):
        tfd.TransformedDistribution(base, naf).log_prob(OUTSIDE[2:])
    # In-range values pass the check.
    assert_all_finite(naf.inverse(np.clip(OUTSIDE, -14.0, 14.0)))


def test_ddsf_default_tail_inverts_far_noise_values():
    naf = flow("ddsf")
    assert naf.range_limit == np.inf
    # Beyond DSF's +-14.5 (a 20-sigma noise value is as far as sampling goes).
    y = np.float32([[20.0, -20.0, 0.5], [-15.0, 16.0, 3.0], [0.1, 14.6, -0.2]])
    x = naf.inverse(y)
    assert_all_finite(x)
    z = naf.forward(tf.identity(x)).numpy()
    # Where the conditioning inputs are in the thousands the transformer can be so
    # steep that one float32 step of x moves z by ~0.6: there the root must lie
    # within the search's tolerance of x (z changes sign across x -+ delta, one
    # column at a time: the later columns' conditioners depend on it).
    x = x.numpy()
    delta = 4 * naf.transformer.tolerance * (1 + np.abs(x))
    for d in range(D):
        shifted = []
        for sign in (-1.0, 1.0):
            xs = x.copy()
            xs[:, d] += sign * delta[:, d]
            shifted.append(naf.forward(xs).numpy()[:, d] - y[:, d])
        bracketed = shifted[0] * shifted[1] <= 0.0
        close = np.abs(z[:, d] - y[:, d]) <= 1e-3 + 1e-4 * np.abs(y[:, d])
        assert np.all(close | bracketed), (d, z[:, d], y[:, d])
        if d == 0:  # The first dimension's transformer sees no x: +-20 round-trips.
            assert np.all(close), (z[:, 0], y[:, 0])


# ---- NaN and inf -----------------------------------------------------------


BAD = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}


@pytest.mark.parametrize("bad", list(BAD))
def test_non_finite_inputs_raise_with_validate_args(bad):
    naf = flow("dsf", conditional=True, validate_args=True)
    c = np.zeros([2, 2], np.float32)
    x = np.array([[0.1, 0.2, 0.3], [0.1, BAD[bad], 0.3]], np.float32)
    dist = density(naf)
    with pytest.raises(tf.errors.InvalidArgumentError, match="`x` must be finite"):
        dist.log_prob(x, bijector_kwargs={"conditional_input": c})
    with pytest.raises(tf.errors.InvalidArgumentError, match="`y` must be finite"):
        naf.inverse(x, conditional_input=c)
    with pytest.raises(tf.errors.InvalidArgumentError, match="`conditional_input` must be finite"):
        dist.log_prob(x[:1].repeat(2, 0), bijector_kwargs={"conditional_input": c + BAD[bad]})
    # Inside tf.function too (the assertions are graph ops, not Python checks).
    log_prob = tf.function(lambda x: dist.log_prob(x, bijector_kwargs={"conditional_input": c}))
    with pytest.raises(tf.errors.InvalidArgumentError, match="`x` must be finite"):
        log_prob(tf.constant(x))


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("transformer", ["dsf", "ddsf"])
def test_non_finite_inputs_without_validate_args_give_nan_for_that_event_only(bad, transformer):
    naf = flow(transformer)
    x = np.array([[0.1, 0.2, 0.3], [0.1, BAD[bad], 0.3], [-1.0, 2.0, 0.5]], np.float32)
    good = [0, 2]
    dist = density(naf)
    log_prob = dist.log_prob(x).numpy()
    # The bad event's log-density is NaN (not finite, never a plausible number);
    # the masked MADE multiplies the bad entry by zero, so the whole event is NaN.
    assert np.isnan(log_prob[1])
    np.testing.assert_allclose(log_prob[good], dist.log_prob(x[good]).numpy(), rtol=1e-5)
    assert_all_finite(log_prob[good])
    # The inverse is sequential: the entry before the bad one does not see it.
    # NaN gives NaN from the bad entry on. An infinite value is out of DSF's
    # bounded range, so it is clamped like any other (finite x); DDSF's range is
    # the whole line, so there it gives NaN too. The other events are solved as
    # if alone.
    x_inv = naf.inverse(x).numpy()
    assert np.isfinite(x_inv[1, 0])
    if transformer == "dsf" and bad != "nan":
        assert np.isfinite(x_inv[1]).all() and x_inv[1, 1] * BAD[bad] > 0
    else:
        assert np.isnan(x_inv[1, 1:]).all()
    # Far in a tail (DDSF's slope there is ~1e-3) x is only determined to
    # float32 noise in y divided by g', so compare relatively, not to 1e-6.
    np.testing.assert_allclose(x_inv[good], naf.inverse(x[good]).numpy(), rtol=1e-4, atol=1e-5)
    # A training step on a batch with one bad event gives NaN gradients: this is
    # why such data must be rejected (validate_args) or filtered, not trained on.
    with tf.GradientTape() as tape:
        loss = -tf.reduce_mean(dist.log_prob(x))
    grads = tape.gradient(loss, naf.trainable_variables)
    assert not all(np.all(np.isfinite(g)) for g in grads)


# ---- Shapes at the edges ---------------------------------------------------


def test_event_size_one_with_two_batch_axes():
    naf = randomize(NeuralAutoregressiveFlow(event_shape=[1], hidden_units=[8], num_units=2))
    x = np.linspace(-2, 2, 6, dtype=np.float32).reshape(2, 3, 1)
    z, log_det = naf.forward_and_log_det(x)
    assert z.shape == (2, 3, 1) and log_det.shape == (2, 3)
    np.testing.assert_allclose(naf.forward(x.reshape(6, 1)).numpy().reshape(2, 3, 1), z)
    np.testing.assert_allclose(naf.inverse(tf.identity(z)), x, atol=1e-4)
