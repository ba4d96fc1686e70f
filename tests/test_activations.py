"""The learned-softness ReLU: its math, its gradients, and its place in built flows."""

import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from conftest import randomize

from tfp_naf import NeuralAutoregressiveFlow
from tfp_naf.activations import SoftReLU
from tfp_naf.keras import NAFDensityModel
from tfp_naf.model_io import load_model_dir, save_model_dir

tfb = tfp.bijectors


def _softrelu(s0, r=0.0, dtype="float64"):
    act = SoftReLU(initial_softness=s0, dtype=dtype)
    act.log_softness_offset.assign(r)
    return act


def test_values_bounds_and_relu_limit(rng):
    h = tf.constant(rng.normal(scale=3.0, size=1000))
    for s0, r in [(0.05, 0.0), (0.3, 0.7), (2.0, -1.5)]:
        act = _softrelu(s0, r)
        s = s0 * np.exp(r)
        np.testing.assert_allclose(act.softness.numpy(), s, rtol=1e-12)
        got = act(h).numpy()
        np.testing.assert_allclose(got, s * np.logaddexp(0.0, h.numpy() / s), rtol=1e-12)
        gap = got - np.maximum(h.numpy(), 0.0)
        rounding = 1e-14 * np.abs(h.numpy())  # s * (h / s) need not round to h.
        assert np.all(gap >= -rounding) and np.all(gap <= s * np.log(2.0) * (1 + 1e-12))
    # As the softness goes to 0 it is the ReLU, with no overflow for large |h / s|.
    tiny = _softrelu(1e-6)(h).numpy()
    np.testing.assert_allclose(tiny, np.maximum(h.numpy(), 0.0), atol=1e-6 * np.log(2.0))


def test_gradients_in_the_input_and_the_softness(rng):
    h = tf.constant(rng.normal(size=200))
    act = _softrelu(0.2, 0.3)
    s = 0.2 * np.exp(0.3)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(h)
        y = act(h)
        total = tf.reduce_sum(y)
    dh = tape.gradient(y, h).numpy()
    np.testing.assert_allclose(dh, 1.0 / (1.0 + np.exp(-h.numpy() / s)), rtol=1e-12)
    # d/dr [s softplus(h / s)] with s = s0 e^r: s softplus(h / s) - h sigmoid(h / s).
    u = h.numpy() / s
    expected = np.sum(s * np.logaddexp(0.0, u) - h.numpy() / (1.0 + np.exp(-u)))
    dr = tape.gradient(total, act.log_softness_offset).numpy()
    np.testing.assert_allclose(dr, expected, rtol=1e-10)


def test_softness_stays_finite_when_its_offset_runs_away():
    act = _softrelu(0.05, 1e4, "float32")
    assert np.isfinite(act.softness.numpy())
    assert np.all(np.isfinite(act(tf.constant([-1e3, 0.0, 1e3])).numpy()))
    with pytest.raises(ValueError, match="initial_softness"):
        SoftReLU(initial_softness=0.0)


def _soft_relus(naf):
    return {id(m): m for m in naf.conditioner.submodules if isinstance(m, SoftReLU)}


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
@pytest.mark.parametrize("context_units, conditional", [(None, False), (4, False),
                                                        (None, True)])
def test_built_flow_learns_one_softness_per_made(dtype, context_units, conditional):
    options = dict(event_shape=[3], hidden_units=[8, 8], num_units=4, dtype=dtype,
                   context_units=context_units, activation="soft_relu",
                   conditional_event_shape=[2] if conditional else None)
    naf = NeuralAutoregressiveFlow(**options)
    acts = list(_soft_relus(naf).values())
    assert len(acts) == 1  # Shared by both hidden layers.
    (act,) = acts
    assert act.log_softness_offset.dtype == dtype
    assert any(v is act.log_softness_offset for v in naf.trainable_variables)
    randomize(naf, scale=0.3)
    x = tf.constant(np.random.default_rng(0).normal(size=(16, 3)), dtype)
    kw = {"conditional_input": tf.ones([16, 2], dtype)} if conditional else {}
    with tf.GradientTape() as tape:
        z = naf.forward(x, **kw)
        loss = tf.reduce_sum(z**2) - tf.reduce_sum(naf.forward_log_det_jacobian(x, 1, **kw))
    assert z.dtype == dtype
    grad = tape.gradient(loss, act.log_softness_offset)
    assert grad is not None and np.isfinite(grad.numpy()) and grad.numpy() != 0.0
    # The inverse (its incremental head applies the activation to a few units at a
    # time) still undoes the forward pass.
    tol = 1e-4 if dtype == tf.float32 else 1e-9
    np.testing.assert_allclose(naf.inverse(z, **kw).numpy(), x.numpy(), atol=tol)
    # Two flows do not share a softness.
    other = NeuralAutoregressiveFlow(**options)
    assert not set(_soft_relus(other)) & set(_soft_relus(naf))


def test_relu_is_still_available_and_the_conditional_default():
    naf = NeuralAutoregressiveFlow(event_shape=[3], hidden_units=[8], num_units=4,
                                   activation="relu")
    assert not _soft_relus(naf)
    # Conditional flows keep the ReLU by default (validation favoured it there).
    cnaf = NeuralAutoregressiveFlow(event_shape=[3], hidden_units=[8], num_units=4,
                                    conditional_event_shape=[2])
    assert not _soft_relus(cnaf)
    cnaf = NeuralAutoregressiveFlow(event_shape=[3], hidden_units=[8], num_units=4,
                                    conditional_event_shape=[2], activation="soft_relu")
    assert len(_soft_relus(cnaf)) == 1
    model = NAFDensityModel(event_size=2, conditional_size=1, num_flows=1, hidden_units=[8])
    assert model.get_config()["activation"] == "relu"


def test_model_folder_keeps_the_learned_softness(tmp_path):
    x = np.random.default_rng(2).normal(size=(32, 2)).astype("float32")
    model = NAFDensityModel(event_size=2, num_flows=2, hidden_units=[8], num_units=4)
    assert model.get_config()["activation"] == "soft_relu"
    nafs = model.flow.bijector.bijector.bijectors[::2]
    for k, naf in enumerate(nafs):
        randomize(naf, scale=0.2, seed=k)
        (act,) = _soft_relus(naf).values()
        act.log_softness_offset.assign(0.5 + k)  # Well away from the start.
    folder = save_model_dir(model, tmp_path / "model")
    loaded, _ = load_model_dir(folder)
    np.testing.assert_array_equal(loaded.log_prob(x), model.log_prob(x))
    softness = [next(iter(_soft_relus(n).values())).softness.numpy()
                for n in loaded.flow.bijector.bijector.bijectors[::2]]
    np.testing.assert_allclose(softness, 0.05 * np.exp([0.5, 1.5]), rtol=1e-6)


def test_model_folder_saved_before_the_activation_option_loads_with_relu(tmp_path):
    x = np.random.default_rng(3).normal(size=(32, 2)).astype("float32")
    model = NAFDensityModel(event_size=2, num_flows=2, hidden_units=[8], num_units=4,
                            activation="relu")
    for naf in model.flow.bijector.bijector.bijectors[::2]:
        randomize(naf, scale=0.2)
    folder = save_model_dir(model, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    assert config["model"].pop("activation") == "relu"
    (folder / "config.json").write_text(json.dumps(config))
    loaded, _ = load_model_dir(folder)
    assert loaded.get_config()["activation"] == "relu"
    np.testing.assert_array_equal(loaded.log_prob(x), model.log_prob(x))
    with pytest.raises(TypeError, match="must be a name"):
        NAFDensityModel(event_size=2, num_flows=1, hidden_units=[8], activation=tf.nn.relu)
    for build in (lambda: NAFDensityModel(event_size=2, num_flows=1, activation="sofrelu"),
                  lambda: NeuralAutoregressiveFlow(event_shape=[2], hidden_units=[8],
                                                   activation="sofrelu")):
        with pytest.raises(ValueError, match="Unknown activation 'sofrelu'"):
            build()
