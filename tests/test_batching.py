"""Batched log_prob and sample of NAFDensityModel: same numbers, fixed seeds, one trace."""

import numpy as np
import pytest
from conftest import randomize

from tfp_naf import batching
from tfp_naf.keras import NAFDensityModel

SMALL = dict(num_flows=2, hidden_units=[16], num_units=8)


def _model(conditional=False, seed=0):
    model = NAFDensityModel(event_size=3, conditional_size=2 if conditional else None, **SMALL)
    for k, naf in enumerate(model.flow.bijector.bijector.bijectors[::2]):
        randomize(naf, scale=0.1, seed=seed * 10 + k)  # Away from the identity, masks kept.
    model.set_standardization([1.0, -2.0, 0.5], [2.0, 0.5, 1.0],
                              *(([0.0, 1.0], [1.0, 3.0]) if conditional else ()))
    return model


@pytest.mark.parametrize("conditional", [False, True])
def test_batched_log_prob_equals_one_call(conditional, rng):
    model = _model(conditional)
    x = rng.normal(size=(203, 3)).astype("float32")
    c = rng.normal(size=(203, 2)).astype("float32") if conditional else None
    whole = model.log_prob(x, c).numpy()
    for batch_size in (1000, 64, 7):
        batched = model.log_prob(x, c, batch_size=batch_size).numpy()
        assert batched.shape == (203,)
        np.testing.assert_allclose(batched, whole, rtol=1e-5, atol=1e-5)
    # A memory map works as well as an array (only sliced, batch by batch).
    fixed = np.concatenate(list(batching.iter_log_prob(model, x, c, batch_size=64,
                                                         fixed_batch=True)))
    np.testing.assert_allclose(fixed, whole, rtol=1e-5, atol=1e-5)


def test_each_batch_size_is_traced_once(rng):
    model = _model()
    x = rng.normal(size=(100, 3)).astype("float32")
    list(batching.iter_log_prob(model, x, batch_size=16))    # 7 batches, the last padded.
    list(batching.iter_log_prob(model, x[:40], batch_size=16))
    fn = batching._log_prob_function(model, 16)
    assert fn.experimental_get_tracing_count() == 1
    list(batching.iter_sample(model, 50, seed=1, batch_size=16))
    list(batching.iter_sample(model, 20, seed=2, batch_size=16))
    keys = sorted(k for k in model.__dict__["_tfp_naf_batched_functions"] if k[0] == "sample")
    assert keys == [("sample", 16, False)]


@pytest.mark.parametrize("conditional", [False, True])
def test_batched_samples_are_fixed_by_seed_and_batch_size(conditional, rng):
    model = _model(conditional)
    c = rng.normal(size=(70, 2)).astype("float32") if conditional else None
    first = model.sample(70, c=c, seed=5, batch_size=16).numpy()
    assert first.shape == (70, 3) and np.all(np.isfinite(first))
    np.testing.assert_array_equal(model.sample(70, c=c, seed=5, batch_size=16).numpy(), first)
    # A fresh model with the same weights: same samples (nothing hidden in state).
    other = _model(conditional, seed=1)
    for mine, theirs in zip(other._saved_variables(), model._saved_variables(), strict=True):
        mine.assign(theirs)
    np.testing.assert_array_equal(other.sample(70, c=c, seed=5, batch_size=16).numpy(), first)
    # Fewer rows, same seed and batch size: the first rows of the longer draw.
    shorter = model.sample(40, c=None if c is None else c[:40], seed=5, batch_size=16).numpy()
    np.testing.assert_allclose(shorter, first[:40], rtol=1e-5, atol=1e-5)
    # n <= batch size: the unbatched call's samples (same noise, seed [seed, 0]).
    np.testing.assert_allclose(
        model.sample(16, c=None if c is None else c[:16], seed=5).numpy(), first[:16],
        rtol=1e-5, atol=1e-5)
    # Other seeds and batch sizes give other samples; batches differ from each other.
    assert not np.allclose(model.sample(70, c=c, seed=6, batch_size=16).numpy(), first)
    assert not np.allclose(model.sample(70, c=c, seed=5, batch_size=32).numpy()[16:32],
                           first[16:32])
    assert not np.allclose(first[:16], first[16:32])
    # XLA: the same noise, the same samples up to rounding.
    np.testing.assert_allclose(
        model.sample(70, c=c, seed=5, batch_size=16, jit_compile=True).numpy(), first,
        rtol=1e-4, atol=1e-4)


def test_batched_samples_follow_the_density(rng):
    # Samples of batch k > 0 come from the model too: their mean log-prob
    # matches that of batch 0 (same distribution, different noise).
    model = _model()
    x = model.sample(4000, seed=3, batch_size=1000).numpy()
    lp = model.log_prob(x, batch_size=1000).numpy().reshape(4, 1000).mean(axis=1)
    assert np.ptp(lp) < 0.2, lp


def test_one_condition_for_all_rows_and_bad_arguments(rng):
    model = _model(conditional=True)
    one = model.sample(30, c=[0.5, -1.0], seed=1, batch_size=8).numpy()
    many = model.sample(30, c=np.tile([[0.5, -1.0]], (30, 1)), seed=1, batch_size=8).numpy()
    np.testing.assert_allclose(one, many, rtol=1e-6)
    with pytest.raises(ValueError, match="conditional"):
        model.sample(3, seed=1, batch_size=8)
    with pytest.raises(ValueError, match=r"shape \[2\] or \[30, 2\]"):
        model.sample(30, c=np.zeros([29, 2]), seed=1, batch_size=8)
    with pytest.raises(ValueError, match="positive integer"):
        model.sample(3, c=[0.0, 0.0], seed=1, batch_size=0)
    with pytest.raises(ValueError, match="3 rows but `c` has 2"):
        model.log_prob(np.zeros([3, 3]), np.zeros([2, 2]), batch_size=8)
    assert model.sample(0, c=[0.0, 0.0], seed=1, batch_size=8).shape == (0, 3)


def test_set_standardization_equals_adapt(rng):
    x = rng.normal(size=(500, 3)) * [1, 5, 0] + [0, 2, 7]
    adapted, given = NAFDensityModel(event_size=3, **SMALL), NAFDensityModel(event_size=3, **SMALL)
    adapted.adapt(x)
    given.set_standardization(x.mean(axis=0), x.std(axis=0))
    for name in ("x_mean", "x_scale"):
        np.testing.assert_allclose(getattr(given, name).numpy(), getattr(adapted, name).numpy(),
                                   rtol=1e-5)
    assert given.x_scale.numpy()[2] == 1.0  # Zero spread: scale 1.
    with pytest.raises(ValueError, match="must have 3 values"):
        given.set_standardization([0.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="finite, std >= 0"):
        given.set_standardization([0.0, 1.0, np.nan], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="exactly when the model is conditional"):
        given.set_standardization([0.0] * 3, [1.0] * 3, [0.0], [1.0])
