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
    # objective_at_root is g - y at (the last iterate before) the root: small.
    assert np.all(np.abs(result.objective_at_root.numpy()) <= 1e-3 * (1 + np.abs(y)))


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
