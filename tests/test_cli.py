"""The tfp-naf command line: demo, fit -> sample -> log-prob, and bad input."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tfp_naf import datasets
from tfp_naf.cli import main

TINY = ["--flows", "1", "--hidden", "8", "--units", "4"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def fails(capsys, *argv, match):
    code, _, err = run(capsys, *argv)
    assert code == 1, err
    lines = [line for line in err.strip().splitlines() if line.startswith("tfp-naf: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]


def test_demo_writes_png_metrics_and_model(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, _ = run(capsys, "demo", "--out", out, "--steps", "20", "--train-size", "512",
                          "--batch-size", "64", "--no-saved-model", *TINY)
    assert code == 0
    png = (out / "demo.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 20 and metrics["dataset"] == "pinwheel"
    # An untrained flow on standardised pinwheel scores about 3.6 nats (the
    # log-Jacobian of the standardisation included); 20 steps barely move it.
    assert 2.0 < metrics["test_nll"] < 6.0 and 2.0 < metrics["train_nll"] < 6.0
    assert (out / "model" / "config.json").is_file()
    assert "test NLL" in stdout
    # stdout is not a terminal here: one line per epoch, not Keras' redrawn bar.
    assert "[=" not in stdout and "ETA" not in stdout, stdout
    assert any(line.startswith("20/20 - ") for line in stdout.splitlines()), stdout


@pytest.fixture(scope="module")
def table():
    x, c = datasets.conditional_ring(600, seed=0)
    return np.concatenate([x[:, :1], c, x[:, 1:]], axis=1) * [1.0, 1.0, 100.0] + [0, 0, 50]


def test_fit_sample_log_prob_round_trip_csv(tmp_path, capsys, table):
    data = tmp_path / "data.csv"
    np.savetxt(data, table, delimiter=",", header="a,c,b", comments="", fmt="%.6f")
    model = tmp_path / "model"
    code, stdout, err = run(capsys, "fit", data, "--out", model, "--epochs", "2",
                            "--conditional-columns", "1", "--quiet", *TINY)
    assert code == 0, err
    config = json.loads((model / "config.json").read_text())
    assert config["columns"] == {"total": 3, "x": [0, 2], "c": [1], "header": ["a", "c", "b"]}
    std = json.loads((model / "standardization.json").read_text())
    np.testing.assert_allclose(std["x_mean"][1], 50.0, atol=15.0)
    metrics = json.loads((model / "metrics.json").read_text())
    # NLL in data units: the third column is scaled by 100, which adds log(100) nats.
    assert metrics["train_nll"] > np.log(100.0)
    assert metrics["n_train"] == 540 and metrics["n_validation"] == 60
    # Sampling with one condition value for all rows; the output keeps the layout.
    samples = tmp_path / "samples.csv"
    assert run(capsys, "sample", model, "-n", "50", "--out", samples, "--seed", "3",
               "--condition", "1.5")[0] == 0
    drawn = np.loadtxt(samples, delimiter=",", skiprows=1)
    assert drawn.shape == (50, 3) and np.all(drawn[:, 1] == 1.5)
    assert samples.read_text().startswith("a,c,b")
    # One condition per row, from a file.
    conditions = np.linspace(0.5, 2.5, 50)[:, None]
    np.save(tmp_path / "c.npy", conditions)
    per_row = tmp_path / "per_row.npy"
    assert run(capsys, "sample", model, "-n", "50", "--out", per_row,
               "--condition", tmp_path / "c.npy")[0] == 0
    np.testing.assert_array_equal(np.load(per_row)[:, 1:2], conditions)
    fails(capsys, "sample", model, "-n", "50", "--out", tmp_path / "x.npy",
          match="give --condition")
    fails(capsys, "sample", model, "-n", "50", "--out", tmp_path / "x.npy", "--condition",
          "1,2", match="2 values per row; the model's condition has 1")
    # log-prob of the training data matches the reported NLL (same model, same rows).
    log_prob = tmp_path / "lp.csv"
    assert run(capsys, "log-prob", model, data, "--out", log_prob)[0] == 0
    values = np.loadtxt(log_prob, delimiter=",", skiprows=1)
    assert values.shape == (600,)
    n_train = metrics["n_train"]
    mean_nll = (metrics["train_nll"] * n_train + metrics["validation_nll"] * 60) / 600
    assert -values.mean() == pytest.approx(mean_nll, rel=1e-4)
    # Same seed, same samples; existing --out needs --force.
    fails(capsys, "sample", model, "-n", "50", "--out", samples, "--condition", "1.5",
          match="already exists")
    again = tmp_path / "again.csv"
    run(capsys, "sample", model, "-n", "50", "--out", again, "--seed", "3", "--condition", "1.5")
    np.testing.assert_array_equal(np.loadtxt(again, delimiter=",", skiprows=1), drawn)


def test_fit_sample_log_prob_round_trip_npy(tmp_path, capsys):
    data = tmp_path / "data.npy"
    np.save(data, datasets.make_toy("2spirals", 300, seed=0))
    model = tmp_path / "model"
    assert run(capsys, "fit", data, "--out", model, "--epochs", "1", "--quiet",
               "--validation-split", "0", *TINY)[0] == 0
    samples = tmp_path / "s.npy"
    assert run(capsys, "sample", model, "-n", "20", "--out", samples)[0] == 0
    assert np.load(samples).shape == (20, 2)
    # Outputs get the usual permissions (temp files and folders are private at first).
    umask = os.umask(0)
    os.umask(umask)
    assert model.stat().st_mode & 0o777 == 0o777 & ~umask
    assert samples.stat().st_mode & 0o777 == 0o666 & ~umask
    lp = tmp_path / "lp.npy"
    assert run(capsys, "log-prob", model, samples, "--out", lp)[0] == 0
    assert np.load(lp).shape == (20,) and np.all(np.isfinite(np.load(lp)))
    # An existing model folder is kept unless --force, then replaced whole.
    before = (model / "weights.index").read_bytes()
    fails(capsys, "fit", data, "--out", model, "--epochs", "1", *TINY, match="--force")
    assert (model / "weights.index").read_bytes() == before
    assert run(capsys, "fit", data, "--out", model, "--epochs", "1", "--quiet", "--force",
               "--seed", "5", *TINY)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npy", "lp.npy", "model", "s.npy"]


def test_fit_ddsf_shared_then_sample_and_log_prob(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "ddsf-shared" in capsys.readouterr().out
    data = tmp_path / "data.npy"
    np.save(data, datasets.make_toy("2spirals", 128, seed=0))
    model = tmp_path / "model"
    assert run(capsys, "fit", data, "--out", model, "--epochs", "1", "--batch-size", "32",
               "--validation-split", "0", "--quiet", "--transformer", "ddsf-shared",
               "--layers", "3", "--base-rate", "2.5", *TINY)[0] == 0  # 4 steps.
    config = json.loads((model / "config.json").read_text())["model"]
    assert config["transformer"] == "ddsf-shared" and config["num_layers"] == 3
    assert config["base_rate"] == 2.5
    samples = tmp_path / "s.npy"
    assert run(capsys, "sample", model, "-n", "20", "--out", samples, "--seed", "2")[0] == 0
    drawn = np.load(samples)
    assert drawn.shape == (20, 2) and np.all(np.isfinite(drawn))
    lp = tmp_path / "lp.npy"
    assert run(capsys, "log-prob", model, samples, "--out", lp)[0] == 0
    values = np.load(lp)
    assert values.shape == (20,) and np.all(np.isfinite(values))
    # The folder's weights (the shared mixing ones included) give the same density.
    from tfp_naf.model_io import load_model_dir

    loaded, _ = load_model_dir(model)
    np.testing.assert_allclose(values, loaded.log_prob(drawn).numpy(), rtol=1e-5)


def test_bad_input(tmp_path, capsys):
    def write(name, text):
        path = tmp_path / name
        path.write_text(text)
        return path

    good = write("good.csv", "1,2\n3,4\n5,7\n")
    fails(capsys, "fit", tmp_path / "missing.csv", "--out", tmp_path / "m", match="no such file")
    fails(capsys, "fit", write("words.csv", "1,2\n3,x\n"), "--out", tmp_path / "m",
          match="line 2, column 2: 'x' is not a number")
    fails(capsys, "fit", write("ragged.csv", "1,2\n3\n"), "--out", tmp_path / "m",
          match="line 2: 1 columns, expected 2")
    fails(capsys, "fit", write("nan.csv", "1,2\nnan,4\n1,inf\n"), "--out", tmp_path / "m",
          match="2 row(s) contain NaN or inf (first: data row 2)")
    fails(capsys, "fit", write("empty.csv", "a,b\n"), "--out", tmp_path / "m",
          match="no data rows")
    np.save(tmp_path / "empty.npy", np.zeros([0, 2]))
    fails(capsys, "fit", tmp_path / "empty.npy", "--out", tmp_path / "m", match="no data")
    (tmp_path / "binary.npy").write_bytes(b"\x00\x01garbage")
    fails(capsys, "fit", tmp_path / "binary.npy", "--out", tmp_path / "m",
          match="not a readable .npy")
    fails(capsys, "fit", write("data.txt", "1,2\n"), "--out", tmp_path / "m",
          match="use .npy or .csv")
    fails(capsys, "fit", good, "--out", tmp_path / "m", "--conditional-columns", "2",
          match="only 2 columns")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    fails(capsys, "fit", good, "--out", tmp_path / "taken", match="already exists")
    fails(capsys, "fit", good, "--out", tmp_path / "taken", "--force",
          match="not a tfp_naf model folder")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    # Model folders: missing, invalid.
    fails(capsys, "sample", tmp_path / "nope", "-n", "3", "--out", tmp_path / "s.npy",
          match="no such model folder")
    fails(capsys, "sample", tmp_path / "taken", "-n", "3", "--out", tmp_path / "s.npy",
          match="not a model folder")
    (tmp_path / "bad_model").mkdir()
    write("bad_model/config.json", "{")
    fails(capsys, "log-prob", tmp_path / "bad_model", good, "--out", tmp_path / "lp.npy",
          match="unreadable")
    # A real model, then wrong column counts and conditions.
    model = tmp_path / "model"
    assert run(capsys, "fit", good, "--out", model, "--epochs", "1", "--quiet",
               "--validation-split", "0", *TINY)[0] == 0
    fails(capsys, "log-prob", model, write("three.csv", "1,2,3\n"), "--out", tmp_path / "lp.npy",
          match="3 columns, but the model was fitted to 2")
    fails(capsys, "sample", model, "-n", "3", "--out", tmp_path / "s.npy", "--condition", "1",
          match="not a conditional model")
    fails(capsys, "sample", model, "-n", "3", "--out", tmp_path / "s.txt",
          match="use .npy or .csv")
    (model / "weights.index").unlink()
    fails(capsys, "sample", model, "-n", "3", "--out", tmp_path / "s.npy", match="no weights")
    # Bad syntax is argparse's: exit status 2 with usage.
    with pytest.raises(SystemExit) as e:
        main(["fit", str(good), "--out", str(model), "--hidden", "a,b"])
    assert e.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(SystemExit) as e:
            main(["fit", str(good), "--out", str(model), "--base-rate", bad])
        assert e.value.code == 2
        assert "--base-rate: must be finite and >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["fit", str(good), "--out", str(model), "--activation", "sofrelu"])
    assert e.value.code == 2
    assert "--activation: Unknown activation 'sofrelu'" in capsys.readouterr().err


def test_interrupted_model_write_leaves_the_old_folder_whole(tmp_path, capsys, monkeypatch):
    from tfp_naf import model_io
    from tfp_naf.keras import NAFDensityModel

    data = tmp_path / "data.npy"
    np.save(data, datasets.make_toy("8gaussians", 200, seed=0))
    model = tmp_path / "model"
    fit = ("fit", data, "--epochs", "1", "--quiet", "--validation-split", "0", *TINY)
    assert run(capsys, *fit, "--out", model)[0] == 0

    def snapshot(folder):
        return {p.relative_to(folder): p.read_bytes()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    before = snapshot(model)
    assert {"config.json", "weights.index", "metrics.json"} <= {p.name for p in before}
    real_save_weights = NAFDensityModel.save_weights

    def interrupted(self, filepath, *args, **kwargs):
        real_save_weights(self, filepath, *args, **kwargs)
        Path(f"{filepath}.index").write_bytes(b"")  # Cut short mid-write...
        raise KeyboardInterrupt  # ...by Ctrl-C.

    monkeypatch.setattr(NAFDensityModel, "save_weights", interrupted)
    code, _, err = run(capsys, *fit, "--out", model, "--force", "--seed", "5")
    assert code == 130 and "interrupted" in err
    assert snapshot(model) == before  # The old model, every byte of it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npy", "model"]  # No temp left.

    # A first write that fails leaves nothing at the destination either.
    def disk_full(self, filepath, *args, **kwargs):
        Path(f"{filepath}.index").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(NAFDensityModel, "save_weights", disk_full)
    with pytest.raises(OSError, match="No space left"):
        main([str(a) for a in (*fit, "--out", tmp_path / "new")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npy", "model"]

    # Where the two folders cannot be swapped atomically, the fallback (old folder
    # aside, new one in, old one removed) still replaces it whole and leaves no debris.
    monkeypatch.setattr(NAFDensityModel, "save_weights", real_save_weights)
    monkeypatch.setattr(model_io, "_swap", lambda a, b: False)
    assert run(capsys, *fit, "--out", model, "--force", "--seed", "5")[0] == 0
    after = snapshot(model)
    assert after.keys() == before.keys() and after != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npy", "model"]
    assert json.loads((model / "metrics.json").read_text())["settings"]["seed"] == 5


def compile_calls(monkeypatch) -> list:
    """The `jit_compile` of every `NAFDensityModel.compile` call from now on."""
    from tfp_naf.keras import NAFDensityModel

    compiled = []
    compile_ = NAFDensityModel.compile

    def spy(self, *args, **kwargs):
        compiled.append(kwargs.get("jit_compile"))
        return compile_(self, *args, **kwargs)

    monkeypatch.setattr(NAFDensityModel, "compile", spy)
    return compiled


def test_fit_xla_auto_times_both_steps_on_long_jobs_only(tmp_path, capsys, monkeypatch):
    """`--xla auto` is plain `tf.function` for a short job; for a long one the model
    compiles both and metrics.json records what the timing chose. The default is off."""
    from tfp_naf import cli

    compiled = compile_calls(monkeypatch)
    data = tmp_path / "data.npy"
    np.save(data, datasets.make_toy("pinwheel", 1200, seed=1))
    out = tmp_path / "short"
    assert run(capsys, "fit", data, "--out", out, "--epochs", "1", "--quiet", *TINY)[0] == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["xla"] == "off"
    assert metrics["training_step"] == {"choice": "tf.function"}
    out = tmp_path / "short_auto"
    assert run(capsys, "fit", data, "--out", out, "--epochs", "1", "--quiet", "--xla", "auto",
               *TINY)[0] == 0
    assert json.loads((out / "metrics.json").read_text())["training_step"] == {
        "choice": "tf.function"}
    monkeypatch.setattr(cli, "AUTO_XLA_MIN_STEPS", 70)
    out = tmp_path / "long"  # 15 epochs of 5 steps: the timing needs 74.
    assert run(capsys, "fit", data, "--out", out, "--epochs", "15", "--batch-size", "216",
               "--xla", "auto",
               "--patience", "100", "--quiet", *TINY)[0] == 0
    step = json.loads((out / "metrics.json").read_text())["training_step"]
    assert compiled == [False, False, "auto"]
    assert step["choice"] in ("tf.function", "xla")
    assert set(step["ms_per_call"]) == {"tf.function", "xla"}


def test_fit_with_xla_trains_the_same_model(tmp_path, capsys, monkeypatch):
    """`fit --xla` XLA-compiles the training step: the same losses and the same fitted
    density as without, up to float rounding, and the model folder records the choice."""
    compiled = compile_calls(monkeypatch)
    data = tmp_path / "data.npy"
    np.save(data, datasets.make_toy("pinwheel", 400, seed=1))
    metrics = {}
    for xla in (False, True):
        out = tmp_path / f"model_{xla}"
        assert run(capsys, "fit", data, "--out", out, "--epochs", "2", "--quiet",
                   *(["--xla"] if xla else ["--xla", "off"]), *TINY)[0] == 0
        metrics[xla] = json.loads((out / "metrics.json").read_text())
    assert compiled == [False, True]
    assert [metrics[x]["settings"]["xla"] for x in (False, True)] == ["off", "on"]
    assert [metrics[x]["training_step"]["choice"] for x in (False, True)] == [
        "tf.function", "xla"]
    for key in ("train_nll", "validation_nll"):
        assert np.isfinite(metrics[True][key])
        np.testing.assert_allclose(metrics[True][key], metrics[False][key], rtol=1e-4)
    np.testing.assert_allclose(metrics[True]["history"]["loss"],
                               metrics[False]["history"]["loss"], rtol=1e-4)
    lp = {}
    for xla in (False, True):
        lp[xla] = tmp_path / f"lp_{xla}.npy"
        assert run(capsys, "log-prob", tmp_path / f"model_{xla}", data, "--out", lp[xla])[0] == 0
    np.testing.assert_allclose(np.load(lp[True]), np.load(lp[False]), rtol=1e-4, atol=1e-4)
