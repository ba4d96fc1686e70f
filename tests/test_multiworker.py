"""Several machines: `fit` under `MultiWorkerMirroredStrategy` matches one process.

Two worker processes on this machine form a cluster over loopback gRPC (free
ports, one `TF_CONFIG` each, one CPU device each) and train through
`tfp_naf.distribute.strategy_from_environment()`. A third process runs the same
fits with no `TF_CONFIG` (one device, the default strategy). Both use the same
initial weights, the same data order (`shuffle=False`) and the same global batch.

Why the numbers agree: Keras feeds NumPy inputs as a `tf.data` pipeline with
`AutoShardPolicy.DATA`, and so do our explicit `tf.data` pipelines. Each global
batch is split into per-replica batches and worker `i` takes the `i`-th of
them, so the two workers together see exactly the single run's batch at every
step; `NAFDensityModel.compute_loss` divides by the global batch's weight
total, and the summed gradients are the single run's. (With `OFF` every worker
would read the whole pipeline, and the global batches would hold other,
repeated examples: see `test_sharding_off_differs`.)

Then the two workers start a `BackupAndRestore` fit and are killed
(`os._exit` at the start of epoch 2); two fresh workers (new ports, a freshly
built model with another seed) restart with the same backup folder, and the
resumed run ends where the uninterrupted one-process run does. Every group of
processes has a timeout, so a hang fails the test instead of stalling CI.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

TIMEOUT = 300  # Seconds per group of processes: a hang fails; a group takes 15-70 s on 2 cores.

SCRIPT = textwrap.dedent("""
    import json
    import os
    import sys

    import numpy as np
    import tensorflow as tf

    # One thread pool each: two workers and a reference share two cores.
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)

    from tfp_naf.distribute import is_chief, strategy_from_environment

    strategy = strategy_from_environment()  # Before any other TensorFlow operation.

    import tf_keras

    from tfp_naf import datasets
    from tfp_naf.keras import NAFDensityModel

    # SGD (below) moves the base parameters' part of theta 1 + base_rate^2 times
    # faster than their own learning rate: at the default rate this test's
    # aggressive SGD diverges, so it has none (test_distribute.py keeps them).
    SMALL = dict(num_flows=2, hidden_units=[16], num_units=4, base_rate=0.0)
    BATCH = 64  # The global batch.
    PHASE = sys.argv[1]


    def data(case):
        if case != "weighted":
            x = datasets.make_toy("8gaussians", 512, seed=0).astype("float32")
            val = datasets.make_toy("8gaussians", 100, seed=1).astype("float32")
            return x, None, None, val, None
        # 513 rows: the last global batch holds one row, so worker 1's part is empty.
        x, c = datasets.conditional_ring(513 + 101, seed=0)
        x, c = x.astype("float32"), c.astype("float32")
        w = np.random.default_rng(0).uniform(0.2, 2.0, 513).astype("float32")
        return x[:513], c[:513], w, x[513:], c[513:]


    def build(case, x, c, seed=0, adapt=True):
        with strategy.scope():
            tf_keras.utils.set_random_seed(seed)
            model = NAFDensityModel(event_size=2, conditional_size=1 if c is not None else None,
                                    **SMALL)
            if adapt:
                model.adapt(x, c)
            model.compile(optimizer=tf_keras.optimizers.SGD(0.05, momentum=0.9))
        return model


    def pipeline(x, policy):
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = getattr(
            tf.data.experimental.AutoShardPolicy, policy)
        return tf.data.Dataset.from_tensor_slices(x).batch(BATCH).with_options(options)


    def fit(case, epochs, callbacks=(), seed=0, adapt=True):
        x, c, w, x_val, c_val = data(case)
        model = build(case, x, c, seed=seed, adapt=adapt)
        local_count = LocalCount()
        callbacks = [*callbacks, local_count]
        initial = [v.numpy().tolist() for v in model.trainable_variables]
        if case == "weighted":  # NumPy inputs: Keras shards them by DATA.
            inputs = x if c is None else {"x": x, "c": c}
            val = (x_val,) if c is None else ({"x": x_val, "c": c_val},)
            history = model.fit(inputs, sample_weight=w, validation_data=val,
                                batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
                                callbacks=callbacks)
        else:  # An explicit tf.data pipeline, sharded by `case` ("DATA" or "OFF").
            history = model.fit(pipeline(x, case), validation_data=pipeline(x_val, case),
                                epochs=epochs, verbose=0, callbacks=callbacks)
        return {
            "replicas": strategy.num_replicas_in_sync,
            "chief": is_chief(),
            "epoch": history.epoch,
            "history": history.history,
            "initial": initial,
            "final": [v.numpy().tolist() for v in model.trainable_variables],
            "log_prob": model.log_prob(x_val, c_val).numpy().tolist(),
            "steps": int(model.optimizer.iterations.numpy()),
            # The last epoch's examples that this worker trained on.
            "local_count": local_count.value,
            "kinds": sorted({type(v).__name__ for v in model.trainable_variables}),
        }


    class LocalCount(tf_keras.callbacks.Callback):
        # This worker's own part of the loss metric's weight total, after each training step.
        def on_train_batch_end(self, batch, logs=None):
            count = self.model.loss_tracker.count
            self.value = float(getattr(count, "values", [count])[0].numpy())


    class Crash(tf_keras.callbacks.Callback):
        # A hard kill at the start of epoch 2: no cleanup, no exception handling.
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                sys.stdout.flush()
                os._exit(3)


    out = {}
    if PHASE == "train":  # Also run (one process, no TF_CONFIG) as the reference.
        for case, epochs in (("DATA", 3), ("weighted", 2)):
            out[case] = fit(case, epochs)
        if strategy.num_replicas_in_sync > 1:
            out["OFF"] = fit("OFF", 1)
            print(json.dumps(out))
            # Then the crash: a BackupAndRestore fit killed at the start of epoch 2.
            fit("DATA", 3, [tf_keras.callbacks.BackupAndRestore("backup"), Crash()])
            raise AssertionError("the crash did not happen")
    elif PHASE == "resume":  # A fresh model: other seed, no adapt; the backup restores all.
        out["resumed"] = fit("DATA", 3, [tf_keras.callbacks.BackupAndRestore("backup")],
                             seed=7, adapt=False)
    print(json.dumps(out))
""")


def free_ports(n):
    """`n` distinct free TCP ports on 127.0.0.1 (held open together while chosen)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_configs(n):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(n)]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
            for i in range(n)]


def run_group(commands, cwd, timeout=TIMEOUT):
    """Runs `(argv, TF_CONFIG or None)` processes together; their (returncode, stdout, stderr).

    Output goes to files, not pipes: a worker blocked on a full pipe would stall the
    other one inside a collective. All are killed when the group runs past `timeout`
    seconds, and the test fails.
    """
    procs, files = [], []
    for i, (argv, tf_config) in enumerate(commands):
        env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
        env["TF_CPP_MIN_LOG_LEVEL"] = "2"
        if tf_config is not None:
            env["TF_CONFIG"] = tf_config
        out, err = (open(cwd / f"process-{i}.{kind}", "w+") for kind in ("out", "err"))
        files.append((out, err))
        procs.append(subprocess.Popen(argv, cwd=cwd, env=env, text=True, stdout=out, stderr=err))
    deadline, start = time.monotonic() + timeout, time.monotonic()
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
            proc.wait()
    results = []
    for proc, (out, err) in zip(procs, files, strict=True):
        out.seek(0), err.seek(0)
        results.append((proc.returncode, out.read(), err.read()))
        out.close(), err.close()
    if time.monotonic() >= deadline:
        tails = "\n".join(f"process {i}: ...{err[-1500:]}" for i, (_, _, err) in enumerate(results))
        pytest.fail(f"multi-worker processes still running after {timeout} s (a hang?)\n{tails}")
    print(f"group of {len(procs)}: {time.monotonic() - start:.1f} s", file=sys.stderr)
    return results


def _json(result):
    code, out, err = result
    assert code == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two workers (fits, then a crash) and the one-process reference; the resume."""
    cwd = tmp_path_factory.mktemp("multiworker")
    script = [sys.executable, "-c", SCRIPT]
    configs = tf_configs(2)
    *workers, single = run_group(
        [(script + ["train"], configs[0]), (script + ["train"], configs[1]),
         (script + ["train"], None)], cwd)
    # The workers print their results, then die in the crash (exit status 3).
    out = {"crashed": [(code, err) for code, _, err in workers],
           "workers": [_json((0, *w[1:])) for w in workers], "single": _json(single)}
    out["backup_after_crash"] = sorted(os.listdir(cwd / "backup"))

    configs = tf_configs(2)  # Restarted on new ports, as after a real failure.
    out["resumed"] = [_json(w)["resumed"]
                      for w in run_group([(script + ["resume"], c) for c in configs], cwd)]
    return out


def _assert_same_run(a, b, rtol=1e-4):
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(a["history"][key], b["history"][key], rtol=rtol,
                                   err_msg=key)
    for va, vb in zip(a["final"], b["final"], strict=True):
        np.testing.assert_allclose(va, vb, rtol=rtol, atol=1e-5)
    np.testing.assert_allclose(a["log_prob"], b["log_prob"], rtol=rtol, atol=1e-4)


@pytest.mark.parametrize("case", ["DATA", "weighted"])
def test_two_workers_match_one_process(runs, case):
    single = runs["single"][case]
    chief, other = (w[case] for w in runs["workers"])
    assert single["replicas"] == 1 and chief["replicas"] == other["replicas"] == 2
    assert chief["chief"] and not other["chief"] and single["chief"]
    assert chief["kinds"] == ["MirroredVariable"] and single["kinds"] == ["ResourceVariable"]
    for a, b in zip(single["initial"], chief["initial"], strict=True):
        np.testing.assert_array_equal(a, b)
    # The batch size is global: as many steps as one process takes.
    epochs = len(single["history"]["loss"])
    n_train = 513 if case == "weighted" else 512
    assert single["steps"] == chief["steps"] == other["steps"] == epochs * -(-n_train // 64)
    # Each worker saw its half of every global batch (the last 1-row batch: worker 0).
    # (The loss metric counts sample weights: rows, when unweighted.)
    if case == "weighted":
        assert 0 < other["local_count"] < chief["local_count"] < single["local_count"]
        np.testing.assert_allclose(chief["local_count"] + other["local_count"],
                                   single["local_count"], rtol=1e-6)
    else:
        assert single["local_count"] == n_train
        assert chief["local_count"] == other["local_count"] == n_train // 2
    # The workers stay identical, and follow the one-process run.
    assert chief["final"] == other["final"] and chief["history"] == other["history"]
    loss = np.array(chief["history"]["loss"])
    assert np.all(np.isfinite(loss)) and np.all(np.diff(loss) < 0)
    _assert_same_run(chief, single)


def test_sharding_off_differs(runs):
    """The control: `AutoShardPolicy.OFF` without manual sharding trains on other batches."""
    chief, single = runs["workers"][0]["OFF"], runs["single"]["DATA"]
    assert chief["steps"] == 8 and single["steps"] == 3 * 8
    assert not np.allclose(chief["history"]["loss"][0], single["history"]["loss"][0], rtol=1e-3)


def test_backup_and_restore_resumes_on_both_workers(runs):
    # Both workers died at epoch 2 (exit status 3, before the end of the script).
    for code, err in runs["crashed"]:
        assert code == 3, err[-3000:]
    # The chief's backup is in the folder; worker 1 wrote (and removed) its own temp copy.
    assert "chief" in runs["backup_after_crash"]
    single = runs["single"]["DATA"]
    for resumed in runs["resumed"]:
        assert resumed["replicas"] == 2 and resumed["epoch"] == [2]
        assert resumed["steps"] == 3 * 8
        np.testing.assert_allclose(resumed["history"]["loss"], single["history"]["loss"][2:],
                                   rtol=1e-4)
        for a, b in zip(resumed["final"], single["final"], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(resumed["log_prob"], single["log_prob"], rtol=1e-4,
                                   atol=1e-4)
    assert runs["resumed"][0]["final"] == runs["resumed"][1]["final"]


def test_command_line_fit_on_two_workers(tmp_path):
    """`python -m tfp_naf fit` on two workers: the chief's model folder equals one process's."""
    from tfp_naf import datasets
    from tfp_naf.model_io import load_model_dir

    x = datasets.make_toy("8gaussians", 600, seed=0)
    np.savetxt(tmp_path / "data.csv", x, delimiter=",", header="a,b", comments="", fmt="%.6f")
    fit = [sys.executable, "-m", "tfp_naf", "fit", "data.csv", "--epochs", "2",
           "--batch-size", "64", "--flows", "1", "--hidden", "8", "--units", "4", "--quiet"]
    configs = tf_configs(2)
    # Worker 1's temporary copy of the model folder goes under its own TMPDIR.
    worker_tmp = tmp_path / "worker-1-tmp"
    worker_tmp.mkdir()
    chief, other, single = run_group(
        [(fit + ["--out", "model"], configs[0]),
         (["env", f"TMPDIR={worker_tmp}", *fit, "--out", "model"], configs[1]),
         (fit + ["--out", "single"], None)], tmp_path)
    for code, _, err in (chief, other, single):
        assert code == 0, err[-3000:]
    assert "model folder: model" in chief[1] and "the chief writes model" in other[1]
    # Only the chief wrote a model folder; worker 1's copy was deleted.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "model", "single", "worker-1-tmp"]
    assert list(worker_tmp.iterdir()) == []
    model, config = load_model_dir(tmp_path / "model")
    reference, _ = load_model_dir(tmp_path / "single")
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    single_metrics = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert metrics["replicas"] == 2 and single_metrics["replicas"] == 1
    # Same seed, same shuffled order, same global batch: the one-process run's numbers.
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(metrics["history"][key], single_metrics["history"][key],
                                   rtol=1e-4, err_msg=key)
    for a, b in zip(model.variables, reference.variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
    x32 = x[:50].astype("float32")
    np.testing.assert_allclose(model.log_prob(x32), reference.log_prob(x32), rtol=1e-4,
                               atol=1e-4)
    assert config["columns"]["header"] == ["a", "b"]
