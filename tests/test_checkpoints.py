"""Checkpoints: resuming training exactly, and clear errors for wrong or missing ones.

A `tf.train.Checkpoint` of model + optimizer saved halfway through training and
restored into freshly built objects must continue exactly where the straight run
would have been: the same losses step by step and the same final weights.
"""

import functools
import gc
import json
import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras
from conftest import randomize

import tfp_naf
from tfp_naf import datasets
from tfp_naf.keras import NAFDensityModel
from tfp_naf.model_io import ModelDirError, load_model_dir, save_model_dir

tfb, tfd = tfp.bijectors, tfp.distributions

SMALL = dict(num_flows=2, hidden_units=[16], num_units=4)
STEPS = 8  # Straight run; the resumed run saves after STEPS // 2.


@pytest.fixture(autouse=True)
def _collect_partial_restores():
    """Drops half-used checkpoint objects while logging still works.

    TensorFlow warns about unused checkpoint values when such an object is deleted;
    left to interpreter exit, that warning meets pytest's closed log stream.
    """
    yield
    gc.collect()


@pytest.fixture(scope="module")
def batches():
    """A fixed order of fixed batches: the only randomness is the initial weights."""
    x = datasets.make_toy("8gaussians", 256, seed=0).astype("float32")
    return [x[i:i + 64] for i in range(0, 256, 64)]


def _model(seed, **overrides):
    tf_keras.utils.set_random_seed(seed)
    return NAFDensityModel(**{"event_size": 2, **SMALL, **overrides})


def _adam():
    # A schedule and clipping: resuming must restore the step count, not only the moments.
    schedule = tf_keras.optimizers.schedules.CosineDecay(3e-2, STEPS, alpha=0.1)
    return tf_keras.optimizers.Adam(schedule, global_clipnorm=1.0)


def _train(loss_fn, variables, optimizer, batches):
    """One `tf.function` step per batch; returns the losses."""

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = loss_fn(x)
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        return loss

    return [float(step(x)) for x in batches]


def _schedule(batches):
    return [batches[i % len(batches)] for i in range(STEPS)]


def _assert_same_weights(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(u.numpy(), v.numpy(), rtol=1e-6, atol=1e-7, err_msg=u.name)


def _density_nll(model):
    return lambda x: -tf.reduce_mean(model.log_prob(x))


@pytest.mark.parametrize("transformer", ["dsf", "ddsf-shared"])
def test_custom_loop_resumes_exactly_from_a_checkpoint(tmp_path, batches, transformer):
    data = _schedule(batches)
    half = STEPS // 2
    build = functools.partial(_model, transformer=transformer)

    straight, straight_opt = build(0), _adam()
    straight.adapt(np.concatenate(batches))
    straight_losses = _train(_density_nll(straight), straight.trainable_variables,
                             straight_opt, data)
    assert straight_losses[-1] < straight_losses[0] - 0.05  # It trains.

    first, first_opt = build(0), _adam()
    first.adapt(np.concatenate(batches))
    first_losses = _train(_density_nll(first), first.trainable_variables, first_opt, data[:half])
    path = tf.train.Checkpoint(model=first, optimizer=first_opt).save(str(tmp_path / "ckpt"))
    assert tf.train.latest_checkpoint(str(tmp_path)) == path

    # A fresh model (other initial weights, no standardisation) and a fresh optimizer.
    resumed, resumed_opt = build(7), _adam()
    x = batches[0]
    assert not np.allclose(resumed.log_prob(x), first.log_prob(x))
    status = tf.train.Checkpoint(model=resumed, optimizer=resumed_opt).restore(path)
    status.assert_existing_objects_matched()
    np.testing.assert_array_equal(resumed.log_prob(x), first.log_prob(x))
    np.testing.assert_array_equal(resumed.x_scale.numpy(), first.x_scale.numpy())
    assert int(resumed_opt.iterations) == half
    second_losses = _train(_density_nll(resumed), resumed.trainable_variables, resumed_opt,
                           data[half:])
    status.assert_consumed()  # Adam's moments were created and restored on the first step.

    np.testing.assert_allclose(first_losses + second_losses, straight_losses, rtol=1e-6)
    _assert_same_weights(resumed.variables, straight.variables)
    assert int(resumed_opt.iterations) == int(straight_opt.iterations) == STEPS

    # The check can fail: restoring the model without its optimizer state (fresh
    # moments, step 0 of the schedule) takes another path.
    no_opt, no_opt_opt = build(7), _adam()
    tf.train.Checkpoint(model=no_opt).restore(path).expect_partial()
    _train(_density_nll(no_opt), no_opt.trainable_variables, no_opt_opt, data[half:])
    assert not np.allclose(no_opt.log_prob(x), straight.log_prob(x), rtol=1e-4, atol=1e-4)


def _compiled(seed, **overrides):
    model = _model(seed, **overrides)
    model.compile(optimizer=_adam())
    return model


def test_fit_resumes_exactly_from_a_checkpoint(tmp_path):
    x, c = datasets.conditional_ring(256, seed=0)
    inputs = {"x": x.astype("float32"), "c": c.astype("float32")}
    epochs = 4  # 4 steps each.

    def fit(model, **kwargs):
        return model.fit(inputs, batch_size=64, shuffle=False, verbose=0, **kwargs)

    straight = _compiled(0, conditional_size=1)
    straight.adapt(x, c)
    straight_losses = fit(straight, epochs=epochs).history["loss"]
    assert straight_losses[-1] < straight_losses[0]

    first = _compiled(0, conditional_size=1)
    first.adapt(x, c)
    first_losses = fit(first, epochs=epochs // 2).history["loss"]
    np.testing.assert_allclose(first_losses, straight_losses[:epochs // 2], rtol=1e-6)
    path = tf.train.Checkpoint(model=first, optimizer=first.optimizer).save(
        str(tmp_path / "ckpt"))

    # Not adapted: the standardisation must come from the checkpoint.
    resumed = _compiled(7, conditional_size=1)
    status = tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).restore(path)
    status.assert_existing_objects_matched()
    np.testing.assert_array_equal(resumed.c_mean.numpy(), first.c_mean.numpy())
    second_losses = fit(resumed, epochs=epochs, initial_epoch=epochs // 2).history["loss"]
    status.assert_consumed()

    np.testing.assert_allclose(first_losses + second_losses, straight_losses, rtol=1e-6)
    _assert_same_weights(resumed.variables, straight.variables)
    assert int(resumed.optimizer.iterations) == int(straight.optimizer.iterations) == 16


class _Crash(tf_keras.callbacks.Callback):
    """Kills `fit` as epoch `epoch` begins (after the previous epoch's backup)."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError(f"crash before epoch {epoch}")


def test_fit_with_backup_and_restore_resumes_after_a_crash(tmp_path, batches):
    x = np.concatenate(batches)
    epochs = 4

    def fit(model, callbacks):
        return model.fit(x, batch_size=64, epochs=epochs, shuffle=False, verbose=0,
                         callbacks=callbacks)

    straight = _compiled(0)
    straight.adapt(x)
    straight_losses = fit(straight, []).history["loss"]

    backup_dir = tmp_path / "backup"
    crashed = _compiled(0)
    crashed.adapt(x)
    with pytest.raises(RuntimeError, match="crash before epoch 2"):
        fit(crashed, [tf_keras.callbacks.BackupAndRestore(str(backup_dir)), _Crash(2)])
    assert any(backup_dir.rglob("*.index"))  # The backup of epochs 0-1 is on disk.

    # A new process would build a fresh, unadapted model; the backup brings it all back.
    resumed = _compiled(7)
    history = fit(resumed, [tf_keras.callbacks.BackupAndRestore(str(backup_dir))])
    assert history.epoch == [2, 3]
    np.testing.assert_allclose(history.history["loss"], straight_losses[2:], rtol=1e-6)
    _assert_same_weights(resumed.variables, straight.variables)
    assert not any(backup_dir.rglob("*.index"))  # Removed once training finished.


def _chain(seed):
    """A bare NAF chain (DDSF), no Keras model around it."""
    tf_keras.utils.set_random_seed(seed)
    kwargs = dict(event_shape=[2], hidden_units=[16], transformer="ddsf", num_units=4,
                  num_layers=2)
    return tfb.Chain([
        tfp_naf.NeuralAutoregressiveFlow(name="naf_1", **kwargs),
        tfb.Permute([1, 0]),
        tfp_naf.NeuralAutoregressiveFlow(name="naf_0", **kwargs),
    ])


def _chain_nll(chain):
    flow = tfd.TransformedDistribution(tfd.Sample(tfd.Normal(0.0, 1.0), [2]), tfb.Invert(chain))
    return lambda x: -tf.reduce_mean(flow.log_prob(x))


def test_bare_flow_chain_resumes_exactly_from_a_checkpoint(tmp_path, batches):
    data = _schedule(batches)
    half = STEPS // 2

    straight, straight_opt = _chain(0), _adam()
    # Both MADEs (4 variables and a softness each) and both base parameters are seen
    # through the Chain.
    assert len(straight.trainable_variables) == 12
    straight_losses = _train(_chain_nll(straight), straight.trainable_variables, straight_opt,
                             data)
    # Training moved every variable, so resuming exactly is a real check. (At this learning
    # rate 8 steps of this DDSF chain are far from monotone: whether the last loss is below
    # the first depends on the start, so the loss is not what is checked.)
    for moved, start in zip(straight.trainable_variables, _chain(0).trainable_variables,
                            strict=True):
        assert np.max(np.abs(moved.numpy() - start.numpy())) > 1e-3, moved.name

    first, first_opt = _chain(0), _adam()
    first_losses = _train(_chain_nll(first), first.trainable_variables, first_opt, data[:half])
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(flow=first, optimizer=first_opt), str(tmp_path), max_to_keep=2)
    manager.save()

    resumed, resumed_opt = _chain(7), _adam()
    checkpoint = tf.train.Checkpoint(flow=resumed, optimizer=resumed_opt)
    status = checkpoint.restore(tf.train.CheckpointManager(checkpoint, str(tmp_path), 2)
                                .latest_checkpoint)
    status.assert_existing_objects_matched()
    second_losses = _train(_chain_nll(resumed), resumed.trainable_variables, resumed_opt,
                           data[half:])
    status.assert_consumed()

    np.testing.assert_allclose(first_losses + second_losses, straight_losses, rtol=1e-6)
    _assert_same_weights(resumed.trainable_variables, straight.trainable_variables)


# ---- Wrong or missing checkpoints -------------------------------------------


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory, batches):
    """A model + optimizer checkpoint (2 flows, hidden [16], 2-D), optimizer slots included."""
    model, optimizer = _model(0), _adam()
    _train(_density_nll(model), model.trainable_variables, optimizer, batches[:2])
    folder = tmp_path_factory.mktemp("trained")
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(str(folder / "ckpt"))
    return path, model


def _restore(path, **overrides):
    model, optimizer = _model(3, **overrides), _adam()
    optimizer.build(model.trainable_variables)  # Slots exist now: assert_consumed can pass.
    return tf.train.Checkpoint(model=model, optimizer=optimizer).restore(path), model


def test_matching_checkpoint_is_fully_consumed(trained_checkpoint, batches):
    path, source = trained_checkpoint
    status, model = _restore(path)
    status.assert_consumed()
    np.testing.assert_array_equal(model.log_prob(batches[0]), source.log_prob(batches[0]))


@pytest.mark.parametrize("overrides", [dict(hidden_units=[32]), dict(event_size=3),
                                       dict(num_units=8), dict(transformer="ddsf-shared")])
def test_checkpoint_of_other_shapes_is_refused(trained_checkpoint, overrides):
    path, _ = trained_checkpoint
    with pytest.raises(ValueError, match=r"incompatible tensor with shape \(.*\) when "
                                         r"attempting to restore variable with shape"):
        _restore(path, **overrides)


def test_checkpoint_of_more_or_fewer_flows_is_refused(trained_checkpoint):
    path, _ = trained_checkpoint
    # More flows than saved: some of the model's variables get no value.
    status, _ = _restore(path, num_flows=3)
    with pytest.raises(AssertionError, match="not bound to checkpointed values"):
        status.assert_existing_objects_matched()
    # Fewer flows than saved: every variable of the model finds a value, so only
    # assert_consumed sees the saved flow that has no place to go.
    status, _ = _restore(path, num_flows=1)
    status.assert_existing_objects_matched()
    with pytest.raises(AssertionError, match=r"Unresolved object in checkpoint "
                                             r"\(root\)\.(model\.flow|optimizer\._variables)"):
        status.assert_consumed()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    model = _model(0)
    missing = str(tmp_path / "nothing-here-1")
    with pytest.raises(tf.errors.NotFoundError,
                       match=re.escape(f"Failed to find any matching files for {missing}")):
        tf.train.Checkpoint(model=model).restore(missing)
    # An empty folder has no latest checkpoint; restoring None restores nothing, which
    # the status assertions report instead of training on from scratch unnoticed.
    assert tf.train.latest_checkpoint(str(tmp_path)) is None
    status = tf.train.Checkpoint(model=model).restore(tf.train.latest_checkpoint(str(tmp_path)))
    with pytest.raises(AssertionError, match="No checkpoint specified"):
        status.assert_existing_objects_matched()


def test_load_weights_missing_or_mismatched_is_a_clear_error(tmp_path):
    model = _model(0)
    missing = tmp_path / "missing"
    with pytest.raises(tf.errors.NotFoundError, match=re.escape(f"matching files for {missing}")):
        model.load_weights(str(missing))
    for name in ("missing.weights.h5", "missing.h5"):
        with pytest.raises(OSError, match=re.escape(str(tmp_path / name))):
            model.load_weights(str(tmp_path / name))
    model.save_weights(str(tmp_path / "w"))
    # Refused before anything is restored: the model keeps its own weights.
    # Each flow: a MADE's 4 variables, its activation's softness and its base parameters.
    for overrides, match in [(dict(hidden_units=[32]), "hold 12 flow variables, .* has 12 of "
                                                        "other shapes"),
                             (dict(num_flows=1), "hold 12 flow variables, .* has 6"),
                             (dict(num_flows=3), "hold 12 flow variables, .* has 18"),
                             (dict(base_rate=0.0), "hold 12 flow variables, .* has 10"),
                             (dict(activation="relu"), "hold 12 flow variables, .* has 10")]:
        other = _model(1, **overrides)
        before = [v.numpy() for v in other.variables]
        with pytest.raises(ValueError, match=match + ".*another config.*nothing was loaded"):
            other.load_weights(str(tmp_path / "w"))
        for v, value in zip(other.variables, before, strict=True):
            np.testing.assert_array_equal(v.numpy(), value)


def test_model_folder_saved_before_base_rate_existed_loads_as_trained(tmp_path, batches):
    # A config written by an older tfp_naf has no `base_rate`: its flows had no base
    # parameters, and it must load so, with the same density.
    model = _model(0, base_rate=0.0)
    for naf in model.flow.bijector.bijector.bijectors[::2]:
        randomize(naf, scale=0.2)
    folder = save_model_dir(model, tmp_path / "model")
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    assert config["model"].pop("base_rate") == 0.0
    config_file.write_text(json.dumps(config))
    loaded, _ = load_model_dir(folder)
    assert loaded.get_config()["base_rate"] == 0.0
    np.testing.assert_array_equal(loaded.log_prob(batches[1]), model.log_prob(batches[1]))
    # A model with base parameters does not load into one without them.
    with_base = _model(0)
    with_base.save_weights(str(tmp_path / "w.weights.h5"))
    with pytest.raises(ValueError, match="another config"):
        _model(0, base_rate=0.0).load_weights(str(tmp_path / "w.weights.h5"))


def test_model_folder_with_weights_of_another_config_is_refused(tmp_path, batches):
    model = _model(0)
    model.compile(optimizer=_adam())
    model.fit(batches[0], epochs=1, verbose=0)  # The weights hold optimizer state too.
    folder = save_model_dir(model, tmp_path / "model")
    loaded, _ = load_model_dir(folder)  # The optimizer state is not needed, not an error.
    np.testing.assert_array_equal(loaded.log_prob(batches[1]), model.log_prob(batches[1]))
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    for change, match in [({"num_flows": 1}, "hold 12 flow variables, 'naf_density_model' has 6"),
                          ({"num_flows": 3}, "do not fit the config"),
                          ({"hidden_units": [8]}, "do not fit the config")]:
        edited = dict(config, model=dict(config["model"], **change))
        config_file.write_text(json.dumps(edited))
        with pytest.raises(ModelDirError, match="do not fit the config") as error:
            load_model_dir(folder)
        assert error.match(match)
