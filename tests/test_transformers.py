"""The monotone scalar transformers: DeepSigmoidalFlow and DeepDenseSigmoidalFlow."""

import numpy as np
import pytest
import tensorflow as tf

from tfp_naf import DeepDenseSigmoidalFlow, DeepSigmoidalFlow

# (class, constructor kwargs): DSF, DDSF with 2 and 3 layers.
KINDS = {
    "dsf": (DeepSigmoidalFlow, {}),
    "ddsf2": (DeepDenseSigmoidalFlow, {"num_layers": 2}),
    "ddsf3": (DeepDenseSigmoidalFlow, {"num_layers": 3}),
}
# Bounded range: DSF, and DDSF without its default linear tail.
BOUNDED = {
    "dsf": (DeepSigmoidalFlow, {}),
    "ddsf2-notail": (DeepDenseSigmoidalFlow, {"num_layers": 2, "tail_slope": 0.0}),
}
KINDS.update(BOUNDED)
NUM_UNITS = 6


@pytest.fixture(params=["dsf", "ddsf2", "ddsf3"])
def kind(request):
    return request.param


@pytest.fixture(params=sorted(BOUNDED))
def bounded_kind(request):
    return request.param


def make(kind, batch_shape=(), scale=1.0, dtype=np.float64, seed=0, **kwargs):
    """A transformer of `kind` with random params of shape `batch_shape + [P]`."""
    cls, options = KINDS[kind]
    p = cls.num_params(NUM_UNITS, options.get("num_layers", 1))
    params = scale * np.random.default_rng(seed).normal(size=tuple(batch_shape) + (p,))
    return cls(params=params.astype(dtype), num_units=NUM_UNITS, **options, **kwargs)


def test_num_params():
    k = NUM_UNITS
    assert DeepSigmoidalFlow.num_params(k) == 3 * k
    # Per layer n_in -> n_out: a, b (2K), w (n_out K), u (K n_in, dropped for n_in = 1).
    # 1 -> K: 2K + K^2;  K -> K: 2K + 2K^2;  K -> 1: 3K + K^2.
    assert DeepDenseSigmoidalFlow.num_params(k, 1) == 3 * k
    assert DeepDenseSigmoidalFlow.num_params(k, 2) == 5 * k + 2 * k * k
    assert DeepDenseSigmoidalFlow.num_params(k, 3) == 7 * k + 4 * k * k
    # num_units is inferred from the params' size.
    assert DeepSigmoidalFlow(params=np.zeros([3 * k], np.float32)).num_units == k
    ddsf = DeepDenseSigmoidalFlow(params=np.zeros([5 * k + 2 * k * k], np.float32), num_layers=2)
    assert ddsf.num_units == k


def test_identity_at_zero_params(kind):
    cls, options = KINDS[kind]
    layers = options.get("num_layers", 1)
    bij = cls(params=np.zeros([cls.num_params(4, layers)]), num_units=4, **options)
    x = np.linspace(-6.0, 6.0, 49)
    y, log_deriv = (t.numpy() for t in bij.forward_and_log_derivative(x))
    # The clipping moves g by about clip * exp(|x|) / 2 per layer.
    bound = layers * bij.clip * np.exp(np.abs(x)) + bij.tail_slope * 1e-3 * np.abs(x) ** 3 + 1e-12
    assert np.all(np.abs(y - x) <= bound)
    assert np.all(np.abs(log_deriv) <= 2.0 * bound)
    np.testing.assert_allclose(bij.inverse(x), x, atol=1e-3)


def test_strictly_increasing(kind):
    bij = make(kind, batch_shape=[5, 1], scale=1.5)
    x = np.linspace(-12.0, 12.0, 2001)
    y, log_deriv = (t.numpy() for t in bij.forward_and_log_derivative(x))
    assert y.shape == (5, 2001)
    assert np.all(np.diff(y, axis=-1) > 0)
    assert np.all(np.isfinite(log_deriv))
    assert np.all(np.abs(y) < bij.range_limit)


def test_log_derivative_matches_autodiff(kind):
    bij = make(kind, batch_shape=[8, 1], scale=1.0)
    # Each x feeds 8 independent transformers: one x per (transformer, point).
    xs = tf.broadcast_to(tf.constant(np.linspace(-7.0, 7.0, 57)), [8, 57])
    with tf.GradientTape() as tape:
        tape.watch(xs)
        y, log_deriv = bij.forward_and_log_derivative(xs)
    dydx = tape.gradient(y, xs).numpy()
    assert np.all(dydx > 0)
    np.testing.assert_allclose(log_deriv.numpy(), np.log(dydx), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(bij.forward_log_det_jacobian(xs), log_deriv, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_finite_far_out_with_gradients(kind, dtype):
    x = tf.constant([-1e4, -1e3, -50.0, -1.0, 0.0, 1.0, 50.0, 1e3, 1e4], dtype)
    bij = make(kind, batch_shape=[9], scale=1.0, dtype=dtype)
    params = tf.constant(bij.params)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, params])
        y, log_deriv = bij.forward_and_log_derivative(x, params)
        total = tf.reduce_sum(y) + tf.reduce_sum(log_deriv)
    for value in (y, log_deriv):
        assert np.all(np.isfinite(value.numpy())), value
    for target in (y, log_deriv):
        for source in (x, params):
            grad = tape.gradient(target, source)
            assert grad is not None
            assert np.all(np.isfinite(grad.numpy())), (target.name, grad)
    assert np.all(np.isfinite(tape.gradient(total, params).numpy()))
    assert np.all(np.abs(y.numpy()) <= bij.range_limit)


def test_bounded_range_saturates(bounded_kind):
    bij = make(bounded_kind, batch_shape=[5, 1], scale=1.5)
    y = bij.forward(np.concatenate([[-1e6], np.linspace(-60.0, 60.0, 2001), [1e6]])).numpy()
    assert np.all(np.abs(y) <= bij.range_limit)
    # Far in the tails the output sits at the edge of its range.
    low, high = (t.numpy() for t in bij.forward_limits())
    np.testing.assert_allclose(y[:, [0, -1]], np.concatenate([low, high], -1), rtol=1e-4)


def test_ddsf_tail_makes_range_unbounded():
    # A small last-layer slope squeezes the layers' range; the tail restores R.
    p = DeepDenseSigmoidalFlow.num_params(NUM_UNITS, 2)
    params = np.zeros([p])
    params[NUM_UNITS * (2 + NUM_UNITS):][:NUM_UNITS] = -6.0  # a of the last layer ~ 0.0035.
    notail = DeepDenseSigmoidalFlow(params=params, num_units=NUM_UNITS, tail_slope=0.0)
    low, high = (t.numpy() for t in notail.forward_limits())
    assert high - low < 0.5  # Most of N(0, 1) would have no preimage.
    bij = DeepDenseSigmoidalFlow(params=params, num_units=NUM_UNITS)
    assert bij.range_limit == np.inf
    low, high = (t.numpy() for t in bij.forward_limits())
    assert low == -np.inf and high == np.inf
    y = np.array([-20.0, -3.0, -0.1, 0.0, 2.0, 20.0])
    x = bij.inverse(y)
    assert np.all(np.isfinite(x.numpy()))
    np.testing.assert_allclose(bij.forward(tf.identity(x)), y, atol=1e-9)
    # The density of z = g(x) with z ~ N(0, 1) integrates to one over x.
    grid = np.linspace(-6000.0, 6000.0, 600001)
    z, log_deriv = (t.numpy() for t in bij.forward_and_log_derivative(grid))
    density = np.exp(-0.5 * z**2 + log_deriv) / np.sqrt(2 * np.pi)
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-4), (np.float64, 1e-9)])
def test_round_trip_both_ways(kind, dtype, tol):
    bij = make(kind, batch_shape=[3, 1], scale=1.0, dtype=dtype)
    x = np.linspace(-6.0, 6.0, 41).astype(dtype)
    y = bij.forward(x)
    # tf.identity defeats the bijector cache, so the inverse is really solved.
    x_back = bij.inverse(tf.identity(y)).numpy()
    assert x_back.dtype == dtype
    np.testing.assert_allclose(x_back, np.broadcast_to(x, [3, 41]), atol=tol, rtol=0)
    low, high = (t.numpy() for t in bij.forward_limits())  # [3, 1] each.
    assert np.all(low < high)
    u = np.linspace(0.02, 0.98, 41).astype(dtype)
    low, high = np.maximum(low, -30.0), np.minimum(high, 30.0)
    targets = low + (high - low) * u
    assert targets.shape == (3, 41)
    y_back = bij.forward(bij.solve(tf.identity(targets))).numpy()
    np.testing.assert_allclose(y_back, targets, atol=tol, rtol=tol)


def test_forward_limits_of_dsf_are_the_range():
    bij = make("dsf", batch_shape=[4], scale=2.0)
    low, high = bij.forward_limits()
    limit = bij.range_limit
    assert limit == pytest.approx(np.log1p(-bij.clip / 2) - np.log(bij.clip / 2))
    np.testing.assert_allclose(low, -limit, rtol=1e-9)
    np.testing.assert_allclose(high, limit, rtol=1e-9)
    # DSF states its limits in closed form; evaluating g far out agrees.
    far_low, far_high = DeepDenseSigmoidalFlow.__mro__[1].forward_limits(bij)
    np.testing.assert_allclose(far_low, low, rtol=1e-6)
    np.testing.assert_allclose(far_high, high, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dsf_bracket_contains_the_root_without_widening(dtype):
    rng = np.random.default_rng(3)
    params = (3.0 * rng.normal(size=[2000, 3 * 6])).astype(dtype)
    bij = DeepSigmoidalFlow(params=params)
    y = rng.uniform(-14.0, 14.0, size=[2000]).astype(dtype)
    low, high = bij._bracket(tf.constant(y), tf.constant(params))
    assert bij._bracket_is_exact()
    g_low = bij.forward_and_log_derivative(low)[0].numpy()
    g_high = bij.forward_and_log_derivative(high)[0].numpy()
    assert np.all(low.numpy() < high.numpy())
    assert np.all(g_low <= y) and np.all(g_high >= y)


def test_bad_params_size_names_expected_size():
    with pytest.raises(ValueError, match="takes 12 parameters.*got 13"):
        DeepSigmoidalFlow(params=np.zeros([13], np.float32), num_units=4)
    expected = DeepDenseSigmoidalFlow.num_params(4, 2)
    with pytest.raises(ValueError, match=f"takes {expected} parameters.*got {expected + 1}"):
        DeepDenseSigmoidalFlow(params=np.zeros([expected + 1]), num_units=4, num_layers=2)
    with pytest.raises(ValueError, match="No number of units gives 13 parameters"):
        DeepSigmoidalFlow(params=np.zeros([13], np.float32))
    with pytest.raises(ValueError, match="num_units"):
        DeepSigmoidalFlow(params=np.zeros([12], np.float32), num_units=0)
    with pytest.raises(ValueError, match="clip"):
        DeepSigmoidalFlow(params=np.zeros([12], np.float32), clip=1.5)


def test_inverse_outside_range(bounded_kind):
    kind = bounded_kind
    bij = make(kind, batch_shape=[2], scale=1.0, validate_args=True)
    low, high = bij.forward_limits()
    inside = 0.5 * (low + high)
    bij.inverse(inside)  # No error inside the range.
    outside = tf.stack([high[0] + 0.5, inside[1]])
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside the range"):
        bij.inverse(outside)
    lax = make(kind, batch_shape=[2], scale=1.0)
    low, high = low.numpy(), high.numpy()
    x = lax.inverse(np.array([high[0] + 0.5, low[1] - 0.5])).numpy()
    assert np.all(np.isfinite(x)) and x[0] > 0 > x[1], x


def test_solve_gradients_match_finite_differences(kind):
    bij = make(kind, batch_shape=[3], scale=1.0)
    params = tf.constant(bij.params)
    y = tf.constant([-2.0, 0.3, 4.0], tf.float64)
    rng = np.random.default_rng(7)
    direction = tf.constant(rng.normal(size=params.shape))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([y, params])
        x = bij.solve(y, params)
        total = tf.reduce_sum(x)
    dy = tape.gradient(total, y).numpy()
    dparams = tape.gradient(total, params).numpy()
    # Elementwise in y: d x_i / d y_i by central differences.
    h = 1e-5
    fd_y = (bij.solve(y + h, params) - bij.solve(y - h, params)).numpy() / (2 * h)
    np.testing.assert_allclose(dy, fd_y, rtol=1e-5)
    # dx/dy = 1 / g'(x).
    np.testing.assert_allclose(dy, np.exp(-bij.forward_and_log_derivative(x)[1]), rtol=1e-9)
    # Along a random direction in parameter space.
    fd_p = (
        tf.reduce_sum(bij.solve(y, params + h * direction))
        - tf.reduce_sum(bij.solve(y, params - h * direction))
    ).numpy() / (2 * h)
    np.testing.assert_allclose(np.sum(dparams * direction.numpy()), fd_p, rtol=1e-5)


def _first_layer_vjp(layer, values, upstream, dtype):
    """Gradients of `sum(gh * h + gl * log_dh)` of one first sigmoidal layer."""
    inputs = [tf.constant(v, dtype) for v in values]
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        h, log_dh = layer(*inputs)[:2]
        gh, gl = (tf.constant(u, dtype) for u in upstream)
        loss = tf.reduce_sum(gh * h + gl * log_dh)
    return [g.numpy().astype(np.float64) for g in tape.gradient(loss, inputs)]


def test_slopes_and_their_derivative():
    """`a = softplus(a_raw + shift) + m`: 1 at 0, above `m`, increasing, finite far out;
    `_slopes_derivative` is its autodiff derivative (the closed-form gradient uses it)."""
    from tfp_naf import transformers

    m = 1e-3
    a_raw = tf.constant(np.concatenate([np.linspace(-30.0, 30.0, 601), [1e4, 1e30]]))
    with tf.GradientTape() as tape:
        tape.watch(a_raw)
        a = transformers._slopes(a_raw, m)
    np.testing.assert_allclose(tape.gradient(a, a_raw),
                               transformers._slopes_derivative(a_raw, m), rtol=1e-12)
    a, x = a.numpy(), a_raw.numpy()
    assert np.all(np.isfinite(a)) and np.all(a >= m) and np.all(np.diff(a) >= 0)
    mid = (x > -10) & (x < 30)  # Where a - m is representable: strictly increasing.
    assert np.all(np.diff(a[mid]) > 0) and np.all(a[mid] > m)
    assert transformers._slopes(tf.constant(0.0, tf.float64), m).numpy() == pytest.approx(1.0)


@pytest.mark.parametrize("n_out", [1, 3])
@pytest.mark.parametrize("x_scale", [1.0, 30.0, 1e4])
@pytest.mark.parametrize("a_offset", [0.0, 7.0])
def test_closed_form_gradient_matches_autodiff(n_out, x_scale, a_offset):
    """The first layer's custom gradient equals autodiff through its forward.

    `x`, `a_raw`, `b` and the mixing logits, with parameters broadcast
    against `x` (b has no batch axis), with saturated units (|x| = 30, 1e4),
    and with steep slopes (`a_offset = 7`, `a` about 7):
    exact in float64, and in float32 as accurate as autodiff is (both against
    the float64 values).
    """
    from tfp_naf import transformers

    rng = np.random.default_rng(int(x_scale) + n_out)
    k = 5
    values = [rng.normal(size=[4, 6]) * x_scale, a_offset + rng.normal(size=[4, 6, k]),
              2.0 * rng.normal(size=[6, k]), rng.normal(size=[4, 6, n_out, k])]
    upstream = [rng.normal(size=[4, 6, n_out]) for _ in range(2)]

    def custom(*args):
        return transformers._first_sigmoidal_layer(*args, clip=1e-6, min_slope=1e-3)

    def autodiff(*args):
        return transformers._first_layer_parts(*args, clip=1e-6, min_slope=1e-3)

    truth = _first_layer_vjp(autodiff, values, upstream, tf.float64)
    for got, want in zip(_first_layer_vjp(custom, values, upstream, tf.float64), truth,
                         strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
    for got, want in zip(_first_layer_vjp(custom, values, upstream, tf.float32), truth,
                         strict=True):
        assert np.all(np.isfinite(got))
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_search_pieces_agree_with_the_forward(kind):
    # The inverse search's evaluator (parameter-only work done once) is the
    # forward, and DSF's start lies in its exact bracket, which holds the root.
    bij = make(kind, batch_shape=[4, 1], scale=1.5)
    params = tf.convert_to_tensor(bij.params)
    x = tf.constant(np.linspace(-8.0, 8.0, 33))
    x = tf.broadcast_to(x, [4, 33])
    want = bij.forward_and_log_derivative(x, params)
    got = bij._evaluator(params)(x)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
    y = want[0]
    low, high, start = bij._bracket_and_start(y, params)
    if start is not None:
        assert np.all(low <= start) and np.all(start <= high)
    if bij._bracket_is_exact():
        assert np.all(low <= x) and np.all(x <= high)


def test_dsf_with_a_linear_tail_inverts_every_value():
    # With a tail the bracket is not exact (it is widened), and values beyond DSF's
    # range (-L, L) have preimages too.
    params = np.random.default_rng(5).normal(size=[4, 3 * NUM_UNITS])
    bij = DeepSigmoidalFlow(params=params, tail_slope=0.1)
    assert not bij._bracket_is_exact()
    x = np.array([-40.0, -1.0, 0.5, 60.0])
    y = bij.forward(x)
    assert np.abs(y.numpy()).max() > DeepSigmoidalFlow(params=params).range_limit
    np.testing.assert_allclose(bij.inverse(tf.identity(y)), x, rtol=1e-9, atol=1e-9)
