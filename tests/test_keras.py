"""tfp_naf.keras: fitting with tf_keras, saving, SavedModel export, Keras 3 guards."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from tfp_naf import conditioners, datasets
from tfp_naf import flow as flow_module
from tfp_naf.keras import (
    NAFDensityModel,
    _nafs,
    check_keras_model,
    export_saved_model,
    flow_kwargs,
    make_flow,
)
from tfp_naf.model_io import load_model_dir, save_model_dir
from tfp_naf.shared_mixing import SharedDenseSigmoidalFlow

SMALL = dict(num_flows=2, hidden_units=[16], num_units=8)
SHARED = dict(transformer="ddsf-shared", num_flows=2, hidden_units=[8], num_units=3)


@pytest.fixture(scope="module")
def ring():
    x, c = datasets.conditional_ring(1024, seed=0)
    return x, c


def _randomize_model(model, seed=0):
    from conftest import randomize

    for naf in model.flow.bijector.bijector.bijectors[::2]:
        randomize(naf, scale=0.2, seed=seed)


def test_make_flow_is_standard_normal_at_start_and_tracks_variables(monkeypatch):
    # With the output layer scaled down to 1e-2 (not zeroed) and no initial spread,
    # every NAF starts near the identity: the flow is near N(0, I).
    monkeypatch.setattr(conditioners, "OUTPUT_INIT_SCALE", 1e-2)
    monkeypatch.setattr(flow_module, "DEFAULT_INITIAL_SPREAD", 0.0)
    monkeypatch.setattr(flow_module, "DEFAULT_FIRST_SPREAD", 0.0)
    flow = make_flow(3, **SMALL)
    x = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    expected = -0.5 * np.sum(x**2, axis=-1) - 1.5 * np.log(2 * np.pi)
    np.testing.assert_allclose(flow.log_prob(x), expected, atol=0.1)
    # Two MADEs with one hidden layer: 2 x (2 kernels + 2 biases + the softness of
    # their activation), and each NAF's base parameters.
    assert len(flow.trainable_variables) == 12
    assert sum("base_params" in v.name for v in flow.trainable_variables) == 2
    assert sum("softness" in v.name for v in flow.trainable_variables) == 2
    assert len(make_flow(3, base_rate=0.0, **SMALL).trainable_variables) == 10
    assert len(make_flow(3, activation="relu", **SMALL).trainable_variables) == 10
    # A conditional flow's offsets are conditioned on c: no base parameters by default.
    assert not any("base_params" in v.name
                   for v in make_flow(3, conditional_size=2, **SMALL).trainable_variables)
    assert NAFDensityModel(3, **SMALL).get_config()["base_rate"] == flow_module.DEFAULT_BASE_RATE
    assert NAFDensityModel(3, conditional_size=2, **SMALL).get_config()["base_rate"] == 0.0
    cflow = make_flow(3, conditional_size=2, **SMALL)
    c = np.ones([5, 2], "float32")
    assert cflow.log_prob(x, bijector_kwargs=flow_kwargs(cflow, c)).shape == (5,)
    with pytest.raises(ValueError, match="conditional"):
        cflow.log_prob(x)
    with pytest.raises(ValueError, match="num_flows"):
        make_flow(3, num_flows=0)


def test_fit_unconditional_learns_and_callbacks_work(tmp_path):
    tf_keras.utils.set_random_seed(0)
    x = datasets.make_toy("8gaussians", 2048, seed=0)
    x_val = datasets.make_toy("8gaussians", 512, seed=1)
    model = NAFDensityModel(event_size=2, **SMALL)
    model.adapt(x)
    np.testing.assert_allclose(model.x_mean.numpy(), x.mean(0), atol=1e-5)
    start_nll = -float(np.mean(model.log_prob(x_val)))
    schedule = tf_keras.optimizers.schedules.ExponentialDecay(1e-2, 10, 0.5)
    optimizer = tf_keras.optimizers.Adam(schedule, global_clipnorm=1.0)
    model.compile(optimizer=optimizer)
    ckpt = str(tmp_path / "best.weights.h5")
    history = model.fit(
        x, batch_size=256, epochs=6, verbose=0, validation_data=(x_val,),
        callbacks=[
            tf_keras.callbacks.EarlyStopping(patience=1, restore_best_weights=True),
            tf_keras.callbacks.ModelCheckpoint(ckpt, save_weights_only=True,
                                               save_best_only=True),
        ],
    )
    assert set(history.history) == {"loss", "val_loss"}
    assert history.history["loss"][-1] < history.history["loss"][0]
    # Reported validation loss is the exact mean NLL of the validation data.
    best = min(history.history["val_loss"])
    end_nll = -float(np.mean(model.log_prob(x_val)))
    assert end_nll == pytest.approx(best, abs=1e-4)
    assert end_nll < start_nll - 0.1
    # The schedule decayed the learning rate as it stepped.
    steps = int(optimizer.iterations)
    assert steps == 8 * len(history.history["loss"])
    lr = optimizer.learning_rate
    assert float(lr.numpy()) == pytest.approx(float(schedule(steps - 1)), rel=1e-4)
    # ModelCheckpoint wrote the best weights; loading them gives the same density.
    clone = NAFDensityModel(event_size=2, **SMALL)
    clone.load_weights(ckpt)
    np.testing.assert_allclose(clone.log_prob(x_val), model.log_prob(x_val), rtol=1e-5)


def _fitted(jit_compile, steps=80, strategy=None):
    tf_keras.utils.set_random_seed(0)
    x = datasets.make_toy("pinwheel", 32 * steps, seed=0)
    with (strategy or tf.distribute.get_strategy()).scope():
        model = NAFDensityModel(event_size=2, **SMALL)
        model.adapt(x)
        model.compile(optimizer=tf_keras.optimizers.Adam(1e-3, global_clipnorm=5.0),
                      jit_compile=jit_compile)
    history = model.fit(x, batch_size=32, epochs=1, verbose=0, shuffle=False)
    return model, history


def test_auto_jit_trains_as_without_it_and_keeps_one_version():
    """`jit_compile="auto"`: the first steps alternate between the two compiled
    versions, each a real step, then the faster is kept; the weights are those of
    plain training up to float rounding, and `jit_compile` reports the choice."""
    plain, plain_history = _fitted(False)
    auto, auto_history = _fitted("auto")
    choice = auto.jit_choice
    assert choice["choice"] in ("tf.function", "xla") and choice["xla_error"] is None
    assert set(choice["ms_per_call"]) == {"tf.function", "xla"}
    assert auto.jit_compile == (choice["choice"] == "xla")
    assert auto.train_function.choice == choice["choice"]
    assert int(auto.optimizer.iterations) == int(plain.optimizer.iterations) == 80
    for a, b in zip(auto.trainable_variables, plain.trainable_variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(auto_history.history["loss"], plain_history.history["loss"],
                               rtol=1e-5)
    assert plain.jit_choice is None


def test_auto_jit_under_a_strategy_is_plain_and_bad_values_are_refused():
    model, _ = _fitted("auto", steps=4, strategy=tf.distribute.OneDeviceStrategy("/cpu:0"))
    assert model.jit_choice is None and not model.jit_compile
    with pytest.raises(ValueError, match="jit_compile"):
        NAFDensityModel(event_size=2, **SMALL).compile(jit_compile="yes")


def test_fit_conditional_with_tuple_and_dict_inputs(ring):
    x, c = ring
    tf_keras.utils.set_random_seed(1)
    model = NAFDensityModel(event_size=2, conditional_size=1, **SMALL)
    model.adapt(x, c)
    np.testing.assert_allclose(model.c_scale.numpy(), c.std(0), rtol=1e-4)
    before = -float(np.mean(model((x, c))))
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-2))
    history = model.fit({"x": x, "c": c}, batch_size=128, epochs=3, verbose=0,
                        validation_data=({"x": x[:256], "c": c[:256]},))
    assert history.history["val_loss"][-1] < before - 0.2
    np.testing.assert_allclose(model({"x": x[:8], "c": c[:8]}), model.log_prob(x[:8], c[:8]))
    # The condition matters: the ring's radius follows c.
    samples = model.sample(400, c=[2.0], seed=3).numpy()
    small = model.sample(400, c=[0.7], seed=3).numpy()
    assert np.median(np.linalg.norm(samples, axis=1)) > np.median(np.linalg.norm(small, axis=1))
    assert model.sample(6, c=c[:6], seed=0).shape == (6, 2)
    with pytest.raises(ValueError, match="conditional"):
        model.log_prob(x[:4])
    with pytest.raises(ValueError, match="no targets"):
        model.fit(x, c, epochs=1, verbose=0)


@pytest.mark.parametrize("conditional", [False, True])
def test_eager_sample_is_traced_once_and_equals_the_op_by_op_draw(conditional):
    # Eagerly, `sample` and `noise_to_data` run the inverse in one traced
    # function for every `n`; the draw is the op-by-op one up to rounding.
    model = NAFDensityModel(event_size=3, conditional_size=2 if conditional else None, **SMALL)
    _randomize_model(model)

    def condition(n):
        if not conditional:
            return None
        return np.linspace(-1.0, 1.0, 2 * n, dtype=np.float32).reshape(n, 2)

    first = model.sample(5, c=condition(5), seed=5).numpy()
    for n in (5, 11, 4):
        c = condition(n)
        traced = model.sample(n, c=c, seed=n).numpy()
        op_by_op = model._sample(tf.constant(n), None if c is None else tf.constant(c), n)
        assert traced.shape == (n, 3)
        np.testing.assert_allclose(traced, op_by_op, rtol=1e-5, atol=1e-5)
        z = np.random.default_rng(n).normal(size=(n, 3)).astype(np.float32)
        np.testing.assert_allclose(model.noise_to_data(z, c), model._noise_to_data(
            tf.constant(z), None if c is None else tf.constant(c)), rtol=1e-5, atol=1e-5)
    # One trace for every size: the same call gives the same numbers whatever
    # was called before (a retrace with relaxed shapes could round differently).
    np.testing.assert_array_equal(model.sample(5, c=condition(5), seed=5).numpy(), first)
    # Any batch shape, the condition broadcast against it.
    z = np.random.default_rng(0).normal(size=(2, 4, 3)).astype(np.float32)
    c = np.float32([0.5, -1.0]) if conditional else None
    flat = model.noise_to_data(z.reshape(8, 3), None if c is None else np.tile(c, (8, 1)))
    np.testing.assert_allclose(model.noise_to_data(z, c), np.reshape(flat, (2, 4, 3)),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        model.sample(3, c=None if conditional else np.zeros([3, 2], np.float32), seed=1)
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
        model.noise_to_data(np.zeros([4, 6], np.float32), condition(4))


def test_sample_is_reproducible_by_seed_and_in_data_units(monkeypatch):
    monkeypatch.setattr(conditioners, "OUTPUT_INIT_SCALE", 1e-2)  # Starts near N(0, I).
    monkeypatch.setattr(flow_module, "DEFAULT_INITIAL_SPREAD", 0.0)
    monkeypatch.setattr(flow_module, "DEFAULT_FIRST_SPREAD", 0.0)
    model = NAFDensityModel(event_size=2, **SMALL)
    model.x_mean.assign([10.0, -5.0])
    model.x_scale.assign([2.0, 0.5])
    a, b = model.sample(2000, seed=7).numpy(), model.sample(2000, seed=7).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, model.sample(2000, seed=8).numpy())
    # This untrained flow is near N(0, I) in standardised units.
    np.testing.assert_allclose(a.mean(0), [10.0, -5.0], atol=0.15)
    np.testing.assert_allclose(a.std(0), [2.0, 0.5], rtol=0.08)
    # log_prob includes the standardisation's log-Jacobian.
    x = np.array([[10.0, -5.0], [12.0, -4.0]], "float32")
    standardised = (x - [10.0, -5.0]) / [2.0, 0.5]
    expected = model.flow.log_prob(standardised.astype("float32")) - np.log(2.0 * 0.5)
    np.testing.assert_allclose(model.log_prob(x), expected, rtol=1e-6)
    np.testing.assert_allclose(model.log_prob(x[:1]), [-np.log(2 * np.pi) - np.log(1.0)], atol=0.05)


def test_save_weights_round_trip(tmp_path):
    model = NAFDensityModel(event_size=3, conditional_size=2, context_units=4, **SMALL)
    _randomize_model(model)
    model.adapt(np.random.default_rng(0).normal(3.0, 2.0, size=(64, 3)),
                np.random.default_rng(1).normal(size=(64, 2)))
    x = np.random.default_rng(2).normal(3.0, 2.0, size=(16, 3)).astype("float32")
    c = np.random.default_rng(3).normal(size=(16, 2)).astype("float32")
    for name in ("ckpt", "w.h5", "w.weights.h5"):
        path = str(tmp_path / name)
        model.save_weights(path)
        clone = NAFDensityModel(event_size=3, conditional_size=2, context_units=4, **SMALL)
        assert not np.allclose(clone.log_prob(x, c), model.log_prob(x, c))
        clone.load_weights(path)
        np.testing.assert_array_equal(clone.log_prob(x, c), model.log_prob(x, c))
    assert NAFDensityModel.from_config(model.get_config()).get_config() == model.get_config()
    # Weights of a differently configured model are refused, not half-loaded.
    other = NAFDensityModel(event_size=3, conditional_size=2, context_units=5, **SMALL)
    with pytest.raises(ValueError, match="config"):
        other.load_weights(str(tmp_path / "w.h5"))


def _mixing(model):
    """The shared mixing-logit variables of a "ddsf-shared" model, one per NAF."""
    return [naf.transformer.mixing_logits for naf in _nafs(model.flow.bijector)]


def test_ddsf_shared_honours_num_layers_and_fit_trains_its_mixing_weights():
    for layers in (1, 3):
        flow = make_flow(2, num_layers=layers, **SHARED)
        for naf in _nafs(flow.bijector):
            assert isinstance(naf.transformer, SharedDenseSigmoidalFlow)
            assert naf.transformer.num_layers == layers
            assert naf.num_params == SharedDenseSigmoidalFlow.num_params(3, layers)
            size = SharedDenseSigmoidalFlow.num_mixing_params(3, layers)
            assert naf.transformer.mixing_logits.shape == [size]
            assert any(v is naf.transformer.mixing_logits for v in flow.trainable_variables)
    model = NAFDensityModel(event_size=2, num_layers=3, **SHARED)
    assert model.get_config()["transformer"] == "ddsf-shared"
    assert model.get_config()["num_layers"] == 3
    mixing = _mixing(model)
    assert len(mixing) == 2
    for variable in mixing:
        assert variable.trainable
        assert sum(v is variable for v in model.trainable_variables) == 1
    before = [v.numpy().copy() for v in mixing]
    x = datasets.make_toy("8gaussians", 96, seed=0)
    model.adapt(x)
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-2))
    model.fit(x, batch_size=32, epochs=1, verbose=0)  # 3 steps.
    assert int(model.optimizer.iterations) == 3
    for old, variable in zip(before, mixing, strict=True):
        assert np.abs(variable.numpy() - old).max() > 1e-4


def test_ddsf_shared_round_trips_exactly_through_every_format(tmp_path):

    kwargs = dict(event_size=3, conditional_size=1, num_layers=2, **SHARED)
    model = NAFDensityModel(**kwargs)
    _randomize_model(model)
    gen = tf.random.Generator.from_seed(4)
    for variable in _mixing(model):
        variable.assign(variable + 0.5 * gen.normal(variable.shape))
    rng = np.random.default_rng(0)
    model.adapt(rng.normal(1.0, 2.0, size=(64, 3)), rng.normal(size=(64, 1)))
    x = rng.normal(1.0, 2.0, size=(9, 3)).astype("float32")
    c = rng.normal(size=(9, 1)).astype("float32")
    expected = model.log_prob(x, c).numpy()

    def check(clone):
        for mine, theirs in zip(_mixing(model), _mixing(clone), strict=True):
            np.testing.assert_array_equal(theirs.numpy(), mine.numpy())
        np.testing.assert_array_equal(clone.log_prob(x, c).numpy(), expected)

    for name in ("ckpt", "w.h5", "w.weights.h5"):
        path = str(tmp_path / name)
        model.save_weights(path)
        tf_keras.utils.set_random_seed(1)
        clone = NAFDensityModel(**kwargs)
        assert not np.allclose(_mixing(clone)[0].numpy(), _mixing(model)[0].numpy())
        clone.load_weights(path)
        check(clone)
        # Weights of another depth (other mixing and MADE shapes) are refused.
        with pytest.raises(ValueError, match="config"):
            NAFDensityModel(**dict(kwargs, num_layers=3)).load_weights(path)
    model.save(str(tmp_path / "m.keras"))
    check(tf_keras.models.load_model(str(tmp_path / "m.keras"),
                                     custom_objects={"NAFDensityModel": NAFDensityModel}))
    save_model_dir(model, tmp_path / "folder", saved_model=True)
    folder_model, config = load_model_dir(tmp_path / "folder")
    assert config["model"]["transformer"] == "ddsf-shared"
    check(folder_model)
    # The SavedModel holds the mixing weights and computes the same density.
    exported = tf.saved_model.load(str(tmp_path / "folder" / "saved_model"))
    saved = {v.name: v.numpy() for v in exported.model_variables}
    for variable in _mixing(model):
        np.testing.assert_array_equal(saved[variable.name], variable.numpy())
    # Its weights are exact; the loaded graph's arithmetic (optimised by TensorFlow
    # at load time) can differ from the model's by float32 rounding (one ulp seen).
    np.testing.assert_allclose(
        exported.log_prob(tf.constant(x), tf.constant(c))["log_prob"].numpy(), expected,
        rtol=1e-6, atol=0)


_FRESH = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    out = {}
    for name in ("plain", "conditional"):
        sig = tf.saved_model.load(f"{sys.argv[1]}/{name}").signatures
        x = np.load(f"{sys.argv[1]}/{name}.npy")
        args, extra = {"x": tf.constant(x[:, :2])}, {}
        if x.shape[1] > 2:
            args["c"], extra["c"] = tf.constant(x[:, 2:]), tf.constant(x[:1, 2:])
        out[name] = {
            "log_prob": sig["log_prob"](**args)["log_prob"].numpy().tolist(),
            "sample": sig["sample"](n=tf.constant(5), seed=tf.constant(11), **extra)["x"]
                .numpy().tolist(),
        }
    out["tfp_naf_imported"] = "tfp_naf" in sys.modules
    print(json.dumps(out))
""")


def test_export_saved_model_runs_without_tfp_naf(tmp_path):
    models, data = {}, {}
    for name, conditional in (("plain", False), ("conditional", True)):
        model = NAFDensityModel(event_size=2, conditional_size=1 if conditional else None,
                                num_flows=1, hidden_units=[8], num_units=4)
        _randomize_model(model)
        model.x_mean.assign([1.0, -1.0])
        x = np.random.default_rng(0).normal(size=(7, 3 if conditional else 2))
        models[name], data[name] = model, x.astype("float32")
        export_saved_model(model, tmp_path / name)
        np.save(tmp_path / f"{name}.npy", data[name])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", _FRESH, str(tmp_path)], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["tfp_naf_imported"] is False
    for name, model in models.items():
        x = data[name]
        c = x[:, 2:] if model.conditional else None
        np.testing.assert_allclose(out[name]["log_prob"], model.log_prob(x[:, :2], c),
                                   rtol=1e-5)
        expected = model.sample(5, c=None if c is None else c[:1], seed=11)
        np.testing.assert_allclose(out[name]["sample"], expected, rtol=1e-5, atol=1e-5)


def test_keras3_model_holding_our_layers_is_refused():
    keras = pytest.importorskip("keras")
    if not keras.__version__.startswith("3"):
        pytest.skip("Keras 3 is not installed")
    ours = NAFDensityModel(event_size=2, num_flows=1, hidden_units=[8])
    check_keras_model(ours)  # A tf_keras model is fine.

    class Wrapper(keras.Model):
        def __init__(self):
            super().__init__()
            self.density = ours

        def call(self, x):
            return self.density(x)

    wrapper = Wrapper()
    assert wrapper.trainable_weights == []  # Why this must not pass silently.
    with pytest.raises(TypeError, match="TF_USE_LEGACY_KERAS"):
        check_keras_model(wrapper)
    # Calling our model inside a Keras 3 model's call (as fit would) is refused too.
    with pytest.raises(TypeError, match="tf_keras"):
        wrapper(np.zeros([4, 2], "float32"))
    # So is a Keras 3 symbolic input (the functional API).
    with pytest.raises(TypeError, match="Keras 3"):
        ours(keras.Input(shape=(2,)))
    # And a Keras 3 optimizer.
    with pytest.raises(TypeError, match="TF_USE_LEGACY_KERAS=1"):
        ours.compile(optimizer=keras.optimizers.Adam())
    # A Keras 3 model holding the raw flow distribution is caught by the check.
    flow = make_flow(2, num_flows=1, hidden_units=[8])

    class FlowWrapper(keras.Model):
        def __init__(self):
            super().__init__()
            self.flow = flow

    with pytest.raises(TypeError, match="cannot train"):
        check_keras_model(FlowWrapper())
    # A plain Keras 3 model is fine.
    check_keras_model(keras.Sequential([keras.layers.Dense(2)]))


def test_bad_inputs_are_refused():
    model = NAFDensityModel(event_size=2, num_flows=1, hidden_units=[8])
    with pytest.raises(ValueError, match=r"\[\.\.\., 2\]"):
        model.log_prob(np.zeros([3, 4], "float32"))
    with pytest.raises(ValueError, match="not conditional"):
        model.log_prob(np.zeros([3, 2]), np.zeros([3, 1]))
    with pytest.raises(ValueError, match="without `loss`"):
        model.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match="keys"):
        model({"x": np.zeros([3, 2]), "cond": np.zeros([3, 1])})


@pytest.mark.parametrize(
    "obj", [make_flow, NAFDensityModel, check_keras_model, export_saved_model],
    ids=lambda obj: obj.__name__,
)
def test_docstring_examples_run(obj):
    import re

    blocks = re.findall(r"#### Examples\s*```python\n(.*?)```", obj.__doc__, flags=re.S)
    assert len(blocks) == 1
    exec(compile(textwrap.dedent(blocks[0]), f"{obj.__name__} example", "exec"), {})
