"""tf.distribute: `NAFDensityModel.fit` under `MirroredStrategy` matches one device.

Two logical CPU devices must be configured before TensorFlow initialises its
devices, so the scenario runs in a fresh Python process. It fits the same model
(same initial weights, same data order) once on the default single device and
once under `MirroredStrategy` over both CPUs, and reports losses and weights;
then a mirrored `fit` with `BackupAndRestore` is killed halfway and resumed by a
freshly built model.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent("""
    import json

    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import tf_keras

    from tfp_naf import datasets
    from tfp_naf.keras import NAFDensityModel

    # SGD (below) moves the base parameters' part of theta 1 + base_rate^2 times
    # faster than their own learning rate: at the default rate this test's
    # aggressive SGD diverges, so it uses rate 1 (the base parameters stay in).
    SMALL = dict(num_flows=2, hidden_units=[16], num_units=4, base_rate=1.0)
    BATCH = 64  # Global batch: each of two replicas gets half.


    def data(conditional):
        if not conditional:
            x = datasets.make_toy("8gaussians", 512, seed=0).astype("float32")
            val = datasets.make_toy("8gaussians", 100, seed=1).astype("float32")
            return dict(x=x, sample_weight=None, validation_data=(val,)), val, None
        # 513 rows: the last batch holds one row, so one replica's part is empty.
        x, c = datasets.conditional_ring(513 + 101, seed=0)
        x, c = x.astype("float32"), c.astype("float32")
        w = np.random.default_rng(0).uniform(0.2, 2.0, 513).astype("float32")
        val = {"x": x[513:], "c": c[513:]}
        return (dict(x={"x": x[:513], "c": c[:513]}, sample_weight=w,
                     validation_data=(val,)), x[513:], c[513:])


    def build(strategy, conditional, inputs, seed=0, adapt=True):
        with strategy.scope():
            tf_keras.utils.set_random_seed(seed)
            model = NAFDensityModel(event_size=2, conditional_size=1 if conditional else None,
                                    **SMALL)
            if adapt and conditional:
                model.adapt(inputs["x"]["x"], inputs["x"]["c"])
            elif adapt:
                model.adapt(inputs["x"])
            model.compile(optimizer=tf_keras.optimizers.SGD(0.05, momentum=0.9))
        return model


    def report(strategy, model, history, x_val, c_val):
        mirrored = [v for v in model.variables + model.optimizer.variables
                    if type(v).__name__ == "MirroredVariable"]
        return {
            "replicas": strategy.num_replicas_in_sync,
            "epoch": history.epoch,
            "history": history.history,
            "final": [v.numpy().tolist() for v in model.trainable_variables],
            "log_prob": model.log_prob(x_val, c_val).numpy().tolist(),
            "steps": int(model.optimizer.iterations.numpy()),
            "kinds": {
                "trainable": sorted({type(v).__name__ for v in model.trainable_variables}),
                "standardization": sorted({type(v).__name__ for v in
                                           (model.x_mean, model.x_scale)}),
                "optimizer": sorted({type(v).__name__ for v in model.optimizer.variables}),
            },
            "num_trainable": len(model.trainable_variables),
            "num_mirrored": len(mirrored),
            "devices": sorted({c.device for v in mirrored for c in v.values}),
            # Every replica holds the same values after training.
            "in_sync": all(np.array_equal(c.numpy(), v.values[0].numpy())
                           for v in mirrored for c in v.values),
        }


    def fit(strategy, conditional, epochs):
        inputs, x_val, c_val = data(conditional)
        model = build(strategy, conditional, inputs)
        initial = [v.numpy().tolist() for v in model.trainable_variables]
        history = model.fit(batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
                            **inputs)
        return dict(report(strategy, model, history, x_val, c_val), initial=initial)


    class Crash(tf_keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("crash")


    def crash_and_resume(strategy, epochs):
        # fit with BackupAndRestore, killed before epoch 2, resumed by a fresh model.
        inputs, x_val, c_val = data(False)
        crashed = build(strategy, False, inputs)
        try:
            crashed.fit(batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
                        callbacks=[tf_keras.callbacks.BackupAndRestore("backup"), Crash()],
                        **inputs)
        except RuntimeError:
            pass
        else:
            raise AssertionError("the crash did not happen")
        resumed = build(strategy, False, inputs, seed=7, adapt=False)
        history = resumed.fit(batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
                              callbacks=[tf_keras.callbacks.BackupAndRestore("backup")],
                              **inputs)
        return report(strategy, resumed, history, x_val, c_val)


    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {}
    for name, conditional, epochs in (("plain", False, 4), ("weighted", True, 3)):
        out[name] = {"single": fit(tf.distribute.get_strategy(), conditional, epochs),
                     "mirrored": fit(mirrored, conditional, epochs)}
    out["resumed"] = crash_and_resume(mirrored, 4)
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            env=env, cwd=tmp_path_factory.mktemp("distribute"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["plain", "weighted"])
def test_mirrored_fit_matches_single_device(runs, name):
    single, mirrored = runs[name]["single"], runs[name]["mirrored"]
    assert single["replicas"] == 1 and mirrored["replicas"] == 2
    # Built inside strategy.scope(): the flow's MADE weights, the standardisation and
    # the optimizer's slots are all mirrored, on both devices, and stay in sync.
    # (2 flows x 2 MADE layers x kernel and bias, plus the unconditional flows' base
    # parameters and activation softness, or the conditional flows' input layers.)
    assert mirrored["num_trainable"] == single["num_trainable"] == (12 if name == "plain" else 14)
    assert mirrored["kinds"]["trainable"] == ["MirroredVariable"]
    assert mirrored["kinds"]["standardization"] == ["MirroredVariable"]
    assert mirrored["kinds"]["optimizer"] == ["MirroredVariable"]
    assert single["kinds"]["trainable"] == ["ResourceVariable"]
    assert mirrored["devices"] == ["/job:localhost/replica:0/task:0/device:CPU:0",
                                   "/job:localhost/replica:0/task:0/device:CPU:1"]
    assert mirrored["num_mirrored"] >= 2 * mirrored["num_trainable"] and mirrored["in_sync"]
    # Same start, same number of steps (the batch size is global, not per replica).
    for a, b in zip(single["initial"], mirrored["initial"], strict=True):
        np.testing.assert_array_equal(a, b)
    epochs = len(single["history"]["loss"])
    n_train = 512 if name == "plain" else 513
    assert single["steps"] == mirrored["steps"] == epochs * -(-n_train // 64)
    # It trains: the loss goes down, and is finite (an empty replica batch is no NaN).
    loss = np.array(mirrored["history"]["loss"])
    assert np.all(np.isfinite(loss)) and np.all(np.diff(loss) < 0)
    assert loss[-1] < loss[0] - 0.02
    # The same trajectory as one device: per-epoch losses, validation, weights, density.
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(mirrored["history"][key], single["history"][key],
                                   rtol=1e-4, err_msg=key)
    for a, b in zip(mirrored["final"], single["final"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mirrored["log_prob"], single["log_prob"], rtol=1e-4, atol=1e-4)


def test_mirrored_fit_resumes_with_backup_and_restore(runs):
    """Killed before epoch 2, then a fresh (unadapted, other seed) model resumes."""
    resumed, single = runs["resumed"], runs["plain"]["single"]
    assert resumed["replicas"] == 2 and resumed["kinds"]["trainable"] == ["MirroredVariable"]
    assert resumed["epoch"] == [2, 3] and resumed["steps"] == 4 * 8 and resumed["in_sync"]
    np.testing.assert_allclose(resumed["history"]["loss"], single["history"]["loss"][2:],
                               rtol=1e-4)
    for a, b in zip(resumed["final"], single["final"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(resumed["log_prob"], single["log_prob"], rtol=1e-4, atol=1e-4)
