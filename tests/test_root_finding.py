"""Safeguarded Newton root finding for increasing scalar functions."""

import numpy as np
import pytest
import tensorflow as tf

from tfp_naf import root_finding


def sinh(x):
    return tf.sinh(x), tf.math.log(tf.cosh(x))


def cubic(x):
    return x**3 + x, tf.math.log(3.0 * x**2 + 1.0)


def cubic_root(y):
    """The real root of x^3 + x - y (Cardano)."""
    s = np.sqrt(y**2 / 4.0 + 1.0 / 27.0)
    return np.cbrt(y / 2.0 + s) + np.cbrt(y / 2.0 - s)


@pytest.mark.parametrize(
    "fn, inverse",
    [(sinh, np.arcsinh), (cubic, cubic_root)],
    ids=["sinh", "cubic"],
)
@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
def test_find_root_increasing_converges(fn, inverse, dtype, tol):
    y = np.array([-1e3, -20.0, -1.0, -1e-3, 0.0, 0.5, 3.0, 50.0, 1e3], dtype)
    low = np.full_like(y, -10.0)
    high = np.full_like(y, 12.0)
    cap = 100
    result = root_finding.find_root_increasing(fn, y, low, high, tol, cap)
    expected = inverse(y.astype(np.float64))
    np.testing.assert_allclose(result.root, expected, rtol=10 * tol, atol=10 * tol)
    assert result.root.dtype == dtype
    assert np.all(result.converged.numpy())
    assert 0 < int(result.num_iterations) < cap
    # objective_at_root is g - y at the last iterate evaluated, from which the
    # root is one Newton step away (or which is the root itself).
    objective = result.objective_at_root.numpy().astype(np.float64)
    last = inverse(y.astype(np.float64) + objective)
    _, log_derivative = fn(tf.constant(last))
    newton = last - objective / np.exp(log_derivative.numpy())
    bound = 10 * tol * (1 + np.abs(expected))
    root = result.root.numpy().astype(np.float64)
    assert np.all((np.abs(root - newton) <= bound) | (np.abs(root - last) <= bound))


def test_find_root_increasing_newton_is_fast():
    # Newton converges quadratically: a smooth root in a wide bracket needs far
    # fewer iterations than bisection's ~log2(width / tol) = 45.
    y = tf.constant([2.0, -7.0, 0.25], tf.float64)
    result = root_finding.find_root_increasing(
        cubic, y, -100.0 * tf.ones_like(y), 100.0 * tf.ones_like(y), 1e-12, 200
    )
    np.testing.assert_allclose(result.root, cubic_root(y.numpy()), rtol=1e-12)
    assert int(result.num_iterations) < 35


def test_find_root_increasing_stops_at_cap():
    y = tf.constant([0.3], tf.float64)
    result = root_finding.find_root_increasing(sinh, y, y - 5.0, y + 50.0, 1e-12, 3)
    assert int(result.num_iterations) == 3
    assert not result.converged.numpy()[0]
    assert np.isfinite(result.root.numpy()[0])


@pytest.mark.parametrize("fn, inverse", [(sinh, np.arcsinh), (cubic, cubic_root)])
def test_expand_bracket_from_bad_start(fn, inverse):
    y = tf.constant([-500.0, -3.0, 0.0, 40.0, 1e4], tf.float64)
    # A unit interval far from every root.
    low = tf.fill([5], tf.constant(20.0, tf.float64))
    high = low + 1.0
    new_low, new_high = root_finding.expand_bracket(fn, y, low, high)
    root = inverse(y.numpy())
    assert np.all(new_low.numpy() <= root) and np.all(root <= new_high.numpy())
    assert np.all(fn(new_low)[0].numpy() <= y.numpy())
    assert np.all(fn(new_high)[0].numpy() >= y.numpy())
    # Only the failing side moves.
    high_was_fine = fn(high)[0].numpy() >= y.numpy()
    np.testing.assert_array_equal(new_high.numpy()[high_was_fine], high.numpy()[high_was_fine])
    # A bracket that already holds the root is left alone.
    good_low, good_high = root - 1.0, root + 1.0
    same_low, same_high = root_finding.expand_bracket(fn, y, good_low, good_high)
    np.testing.assert_array_equal(same_low, good_low)
    np.testing.assert_array_equal(same_high, good_high)


def test_solve_increasing_implicit_gradients():
    theta = tf.constant([0.5, 2.0, 3.0], tf.float64)
    y = tf.constant([1.0, -4.0, 30.0], tf.float64)

    def fn(x):  # g(x) = theta * x^3 + x, increasing for theta > 0.
        return theta * x**3 + x, tf.math.log(3.0 * theta * x**2 + 1.0)

    with tf.GradientTape(persistent=True) as tape:
        tape.watch([theta, y])
        x = root_finding.solve_increasing(fn, y, -10.0 * tf.ones_like(y), 10.0 * tf.ones_like(y),
                                          1e-13, 100)
    xs = x.numpy()
    np.testing.assert_allclose(theta * xs**3 + xs, y, rtol=1e-12)
    slope = 3.0 * theta.numpy() * xs**2 + 1.0
    np.testing.assert_allclose(tape.gradient(x, y), 1.0 / slope, rtol=1e-10)
    np.testing.assert_allclose(tape.gradient(x, theta), -(xs**3) / slope, rtol=1e-10)


def test_find_root_increasing_from_a_given_start():
    # From a start, the ends are never evaluated: only bisection can stand in for
    # false position until an iterate replaces one, and it still converges, also
    # from a start at the bracket's edge with a poor Newton step there.
    y = tf.constant([-1e3, -1.0, 0.0, 3.0, 1e3], tf.float64)
    low = tf.fill([5], tf.constant(-10.0, tf.float64))
    high = tf.fill([5], tf.constant(12.0, tf.float64))
    calls = []

    def counted(x):
        calls.append(x)
        return sinh(x)

    for start in (tf.zeros_like(y), low + 1e-9, high - 1e-9):
        calls.clear()
        result = root_finding.find_root_increasing(counted, y, low, high, 1e-12, 200, initial=start)
        np.testing.assert_allclose(result.root, np.arcsinh(y.numpy()), rtol=1e-11, atol=1e-12)
        assert np.all(result.converged.numpy())
        # Eager: one evaluation per iteration, none at the ends.
        assert len(calls) == int(result.num_iterations)


def test_solve_increasing_with_params_matches_solve_increasing():
    theta = tf.constant([[0.5], [2.0], [3.0]], tf.float64)  # Broadcast against y.
    y = tf.constant([[1.0, -4.0], [30.0, 0.2], [-2.0, 7.0]], tf.float64)
    low, high = -10.0 * tf.ones_like(y), 10.0 * tf.ones_like(y)

    def g(x, theta):  # theta * x^3 + x
        return theta * x**3 + x, tf.math.log(3.0 * theta * x**2 + 1.0)

    calls = []

    def fn(x, theta):
        calls.append(x)
        return g(x, theta)

    with tf.GradientTape(persistent=True) as tape:
        tape.watch([theta, y])
        expected = root_finding.solve_increasing(lambda x: g(x, theta), y, low, high, 1e-13, 100)
    expected_grads = [tape.gradient(expected, t) for t in (y, theta)]

    def search(x):
        return g(x, tf.stop_gradient(theta))

    with tf.GradientTape(persistent=True) as tape:
        tape.watch([theta, y])
        x = root_finding.solve_increasing_with_params(fn, y, theta, low, high, 1e-13, 100,
                                                      search_fn=search)
    np.testing.assert_allclose(x, expected, rtol=1e-13)
    assert calls == []  # The forward solve does not evaluate g at the root...
    grads = [tape.gradient(x, t) for t in (y, theta)]
    assert len(calls) == 2  # ... each gradient does, once.
    for got, want in zip(grads, expected_grads, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-10)
    # The default search evaluates `fn` at stopped parameters: the same root.
    same = root_finding.solve_increasing_with_params(fn, y, theta, low, high, 1e-13, 100)
    np.testing.assert_allclose(same, x, rtol=1e-13)


def test_solve_increasing_with_params_gives_nan_where_g_is_not_finite():
    # A NaN parameter or an infinite target has no meaningful root: NaN, as
    # `solve_increasing` gives, never the finite end point of a bisection.
    theta = tf.constant([1.0, np.nan, 1.0, 2.0], tf.float64)
    y = tf.constant([0.5, 0.5, np.inf, -3.0], tf.float64)
    low, high = y - 1.0, y + 1.0

    def fn(x, theta):
        return x + theta * tf.tanh(x), tf.math.log1p(theta / tf.cosh(x) ** 2)

    x = root_finding.solve_increasing_with_params(fn, y, theta, low, high, 1e-12, 100)
    old = root_finding.solve_increasing(lambda t: fn(t, theta), y, low, high, 1e-12, 100)
    np.testing.assert_array_equal(np.isnan(x), [False, True, True, False])
    np.testing.assert_allclose(x.numpy()[[0, 3]], old.numpy()[[0, 3]], rtol=1e-12)
    np.testing.assert_array_equal(np.isnan(old), np.isnan(x))


def test_predicted_stop_saves_the_confirming_evaluation(monkeypatch):
    # A DSF transformer's inverse, as the flow searches it: with the error of
    # the last Newton step predicted from the last three, the search stops
    # earlier and finds the same roots, also for steep units far from the
    # quadratic regime (scale 3), where a prediction from two steps alone was
    # off by up to ~2,000 eps. `num_iterations` is the slowest element's count,
    # so one case may tie (the slowest element then converges without the
    # prediction's help); it is never slower, and saves iterations in all.
    from tfp_naf.transformers import DeepSigmoidalFlow

    counts = {False: 0, True: 0}
    for scale, seed in [(1.0, 0), (3.0, 1), (3.0, 2)]:
        rng = np.random.default_rng(seed)
        k, n = 8, 2048
        params = DeepSigmoidalFlow.initial_params(k, spread=2.0) + rng.normal(
            0.0, scale, [n, 3 * k])
        t = DeepSigmoidalFlow(params=params.astype(np.float32))
        x_true = rng.normal(0.0, 2.0, [n]).astype(np.float32)
        y = t.forward(x_true)
        p = tf.convert_to_tensor(t.params)
        low, high, start = t._bracket_and_start(y, p)
        runs = {}
        for predicted_stop in (False, True):
            monkeypatch.setattr(root_finding, "PREDICTED_STOP", predicted_stop)
            runs[predicted_stop] = root_finding.find_root_increasing(
                t._evaluator(p), y, low, high, t.tolerance, t.max_iterations, initial=start)
            counts[predicted_stop] += int(runs[predicted_stop].num_iterations)
        off, on = runs[False], runs[True]
        assert np.all(on.converged.numpy()) and np.all(off.converged.numpy())
        assert int(on.num_iterations) <= int(off.num_iterations)
        eps = np.finfo(np.float32).eps
        # As precise as with the confirming evaluation: g(root) is y to rounding.
        residual = np.abs(t.forward(on.root).numpy() - y.numpy())
        assert np.all(residual <= 8 * eps * (1 + np.abs(y.numpy())))
        assert np.all(np.abs(on.root - off.root) <= 8 * eps * (1 + np.abs(off.root)))
    assert counts[True] < counts[False]
