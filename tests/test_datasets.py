"""The built-in data: simulators of higher dimension and the shared 2-D arrays."""

import numpy as np
import pytest
import tensorflow_probability as tfp

from tfp_naf import datasets

tfd = tfp.distributions


def test_funnel_log_prob_matches_its_definition():
    # The closed form against TFP's own densities of v ~ N(0, 3^2), x_i | v ~ N(0, e^v).
    points = datasets.funnel(200, seed=3, dims=4).astype(np.float64)
    x, v = points[:, :-1], points[:, -1]
    zero = np.float64(0.0)
    expected = (tfd.Normal(zero, np.float64(datasets.FUNNEL_SCALE)).log_prob(v).numpy()
                + np.sum(tfd.Normal(zero, np.exp(v / 2.0)[:, None]).log_prob(x).numpy(), axis=1))
    np.testing.assert_allclose(datasets.funnel_log_prob(points), expected, rtol=1e-10)


def test_funnel_draws_follow_the_funnel():
    points = datasets.funnel(200_000, seed=0, dims=3).astype(np.float64)
    v, x = points[:, -1], points[:, :-1]
    assert np.std(v) == pytest.approx(datasets.FUNNEL_SCALE, rel=0.02)
    # Given v, x / exp(v / 2) is standard normal.
    np.testing.assert_allclose(np.std(x / np.exp(v / 2.0)[:, None], axis=0), 1.0, rtol=0.02)


def test_slcp_observations_have_the_model_moments():
    theta = np.tile([[0.5, -1.0, 1.2, -0.8, 0.4]], (200_000, 1))
    x = datasets.slcp_simulate(theta, seed=0).astype(np.float64).reshape(-1, 4, 2)
    draws = x.reshape(-1, 2)
    s1, s2, rho = 1.2**2, 0.8**2, np.tanh(0.4)
    np.testing.assert_allclose(draws.mean(0), [0.5, -1.0], atol=0.01)
    np.testing.assert_allclose(np.cov(draws.T), [[s1**2, rho * s1 * s2], [rho * s1 * s2, s2**2]],
                               rtol=0.02, atol=0.005)
    # The four draws of one observation are independent.
    assert abs(np.corrcoef(x[:, 0, 0], x[:, 1, 0])[0, 1]) < 0.01


def test_slcp_pairs_are_deterministic_and_on_the_prior():
    theta, x = datasets.slcp(1000, seed=5)
    theta2, x2 = datasets.slcp(1000, seed=5)
    np.testing.assert_array_equal(theta, theta2)
    np.testing.assert_array_equal(x, x2)
    assert theta.shape == (1000, 5) and x.shape == (1000, 8)
    assert np.all(np.abs(theta) <= datasets.SLCP_PRIOR_BOUND)


def test_shared_toys_absent_or_read_as_float32(tmp_path, monkeypatch):
    monkeypatch.setenv("TFP_NAF_SHARED_DATA", str(tmp_path))
    (tmp_path / "toys").mkdir()
    assert datasets.load_shared_toy("pinwheel") is None  # Absent: callers generate data.
    np.save(tmp_path / "toys" / "pinwheel_train.npy", np.ones((4, 2)))
    np.save(tmp_path / "toys" / "pinwheel_test.npy", np.zeros((3, 2)))
    train, test = datasets.load_shared_toy("pinwheel")
    assert train.shape == (4, 2) and test.shape == (3, 2) and train.dtype == np.float32
    with pytest.raises(ValueError, match="Unknown dataset"):
        datasets.load_shared_toy("moons")
