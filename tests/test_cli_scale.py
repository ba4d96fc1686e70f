"""The command line at scale: batches, chunked input, weight decay, a quiet fast start."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tfp_naf import cli, datasets
from tfp_naf.cli import main

TINY = ["--flows", "1", "--hidden", "8", "--units", "4"]
ROOT = Path(__file__).resolve().parent.parent
TF_LOG = re.compile(r"cudart|oneDNN|cuInit|cuda|absl|[IWEF]0000|^WARNING:tensorflow", re.M)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fitted")
    x, c = datasets.conditional_ring(400, seed=0)
    np.save(folder / "data.npy", np.concatenate([x, c], axis=1))
    assert main([str(a) for a in ("fit", folder / "data.npy", "--out", folder / "model",
                                  "--epochs", "1", "--quiet", "--conditional-columns", "2",
                                  *TINY)]) == 0
    return folder


def test_sample_in_batches_is_fixed_by_seed_and_batch_size(tmp_path, capsys, fitted):
    model = fitted / "model"

    def sample(name, n, *extra):
        out = tmp_path / name
        code, _, err = run(capsys, "sample", model, "-n", n, "--out", out, "--condition",
                           "0.5", "--seed", "7", *extra)
        assert code == 0, err
        return np.load(out) if out.suffix == ".npy" else np.loadtxt(out, delimiter=",")

    batched = sample("a.npy", 45, "--batch-size", "10")
    assert batched.shape == (45, 3) and np.all(batched[:, 2] == 0.5)
    np.testing.assert_array_equal(sample("b.npy", 45, "--batch-size", "10"), batched)
    # The first rows do not depend on -n (up to float rounding: one batch runs
    # without XLA, several with).
    np.testing.assert_allclose(sample("c.npy", 10, "--batch-size", "10"), batched[:10],
                               rtol=1e-4, atol=1e-4)
    # The default batch size holds all 45 rows: the unbatched model.sample's draw.
    from tfp_naf.model_io import load_model_dir

    loaded, _ = load_model_dir(model)
    direct = loaded.sample(45, c=[0.5], seed=7).numpy()
    np.testing.assert_allclose(sample("d.csv", 45)[:, :2], direct, rtol=1e-5, atol=1e-5)


def test_log_prob_in_batches_and_chunks_equals_one_call(tmp_path, capsys, fitted, monkeypatch):
    model, data = fitted / "model", fitted / "data.npy"
    from tfp_naf.model_io import load_model_dir

    loaded, _ = load_model_dir(model)
    values = np.load(data).astype(np.float32)
    direct = loaded.log_prob(values[:, :2], values[:, 2:]).numpy()
    np.savetxt(tmp_path / "data.csv", values, delimiter=",", fmt="%.9g")
    monkeypatch.setattr(cli, "CHUNK_ROWS", 64)  # Several chunks, a short last one.
    for source, batch in [(data, "16384"), (data, "50"), (tmp_path / "data.csv", "50"),
                          (tmp_path / "data.csv", "1000")]:
        out = tmp_path / f"lp-{batch}-{source.suffix[1:]}.npy"
        code, stdout, err = run(capsys, "log-prob", model, source, "--out", out,
                                "--batch-size", batch)
        assert code == 0, err
        np.testing.assert_allclose(np.load(out), direct, rtol=1e-5, atol=1e-5)
        assert "over 400 rows" in stdout


def test_fit_refuses_a_bad_row_in_the_middle_of_a_chunk(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "CHUNK_ROWS", 8)
    rows = [f"{i},{2 * i}" for i in range(60)]
    for bad, message in [("3,abc", "line 31, column 2: 'abc' is not a number"),
                         ("3", "line 31: 1 columns, expected 2"),
                         ("3,nan", "line 31: 1 row(s) contain NaN or inf (first: data row 30)")]:
        lines = ["x,y"] + rows
        lines[30] = bad  # Line 31: the 6th row of the 4th chunk of 8.
        path = tmp_path / "bad.csv"
        path.write_text("\n".join(lines) + "\n")
        code, _, err = run(capsys, "fit", path, "--out", tmp_path / "m", *TINY)
        assert code == 1 and err.strip() == f"tfp-naf: error: {path} {message}.", err
    assert not (tmp_path / "m").exists()


def test_fit_from_csv_and_npy_is_the_same_fit(tmp_path, capsys, monkeypatch):
    # The CSV is parsed in chunks and spooled; the .npy is memory-mapped: the
    # same float32 rows, the same split, shuffles and standardisation.
    monkeypatch.setattr(cli, "CHUNK_ROWS", 100)
    x = datasets.make_toy("8gaussians", 700, seed=1).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.savetxt(tmp_path / "x.csv", x, delimiter=",", fmt="%.9g")
    metrics = {}
    for suffix in ("npy", "csv"):
        assert run(capsys, "fit", tmp_path / f"x.{suffix}", "--out", tmp_path / suffix,
                   "--epochs", "2", "--quiet", "--batch-size", "64", *TINY)[0] == 0
        metrics[suffix] = json.loads((tmp_path / suffix / "metrics.json").read_text())
        std = json.loads((tmp_path / suffix / "standardization.json").read_text())
        metrics[suffix]["std"] = std
    assert metrics["npy"]["history"] == metrics["csv"]["history"]
    assert metrics["npy"]["train_nll"] == metrics["csv"]["train_nll"]
    assert metrics["npy"]["n_train"] == 630 and metrics["npy"]["n_validation"] == 70
    # The standardisation is the training rows' (not all rows') mean and std.
    perm = np.random.default_rng(0).permutation(700)
    train = x[np.sort(perm[70:])].astype(np.float64)
    np.testing.assert_allclose(metrics["csv"]["std"]["x_mean"], train.mean(0), rtol=1e-6)
    np.testing.assert_allclose(metrics["csv"]["std"]["x_scale"], train.std(0), rtol=1e-6)


def test_weight_decay_shrinks_the_weights(tmp_path, capsys):
    from tfp_naf.model_io import load_model_dir

    np.save(tmp_path / "x.npy", datasets.make_toy("2spirals", 512, seed=0))
    norms = {}
    for decay in ("0", "0.5"):
        out = tmp_path / f"m{decay}"
        assert run(capsys, "fit", tmp_path / "x.npy", "--out", out, "--epochs", "3",
                   "--quiet", "--lr", "0.01", "--weight-decay", decay, *TINY)[0] == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["settings"]["weight_decay"] == float(decay)
        assert metrics["optimizer"] == ("AdamW" if decay != "0" else "Adam")
        model, _ = load_model_dir(out)
        norms[decay] = sum(float(np.sum(v.numpy() ** 2)) for v in model.flow.trainable_variables)
    # 3 epochs x 4 steps at lr <= 0.01 with decay 0.5: each step scales the weights
    # by about 1 - 0.005, so the squared norm drops by several percent.
    assert norms["0.5"] < 0.97 * norms["0"], norms
    code = subprocess.run([sys.executable, "-m", "tfp_naf", "fit", "x.npy", "--out", "m",
                           "--weight-decay", "-1"], cwd=tmp_path, capture_output=True,
                          text=True).returncode
    assert code == 2


def _python(code: str, cwd, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_help_and_option_errors_do_not_import_tensorflow(tmp_path):
    result = _python("""
        import sys
        import tfp_naf, tfp_naf.cli
        for argv in (["--help"], ["fit", "--help"], ["sample", "m", "-n", "x"], []):
            try:
                tfp_naf.cli.main(argv)
            except SystemExit as e:
                print("exit", e.code)
        print("tensorflow imported:", "tensorflow" in sys.modules)
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("exit 0") == 2 and result.stdout.count("exit 2") == 2
    assert "tensorflow imported: False" in result.stdout
    assert "usage: tfp-naf sample" in result.stderr and "expected a number" in result.stderr
    # The lazy names still work (and then TensorFlow is imported).
    result = _python("""
        import sys, tfp_naf
        assert "tensorflow" not in sys.modules
        print(tfp_naf.NeuralAutoregressiveFlow.__name__, tfp_naf.export_saved_model.__module__)
        from tfp_naf import DeepSigmoidalFlow, NAFDensityModel, datasets
        from tfp_naf.keras import export_saved_model, check_keras_model
        assert export_saved_model is tfp_naf.export_saved_model
        assert set(tfp_naf.__all__) <= set(dir(tfp_naf))
        try:
            tfp_naf.nothing
        except AttributeError as e:
            print(e)
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "NeuralAutoregressiveFlow tfp_naf.export" in result.stdout
    assert "has no attribute 'nothing'" in result.stdout


def test_commands_print_no_tensorflow_logging(tmp_path):
    np.save(tmp_path / "x.npy", datasets.make_toy("pinwheel", 200, seed=0))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(json.dumps(
        {"format": "tfp_naf.model", "version": 1, "model": {"event_size": 2}}))
    tiny = ", ".join(repr(a) for a in TINY)
    result = _python(f"""
        from tfp_naf.cli import main
        print("rc", main(["fit", "x.npy", "--out", "m", "--epochs", "1", "--quiet", {tiny}]))
        print("rc", main(["sample", "m", "-n", "5", "--out", "s.npy"]))
        print("rc", main(["sample", "broken", "-n", "5", "--out", "t.npy"]))
        print("rc", main(["log-prob", "m", "missing.csv", "--out", "lp.npy"]))
    """, tmp_path)
    assert result.stdout.count("rc 0") == 2 and result.stdout.count("rc 1") == 2, result
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 2 and all(line.startswith("tfp-naf: error:") for line in errors), \
        result.stderr
    assert "no weights" in errors[0] and "no such file" in errors[1]
    assert not TF_LOG.search(result.stderr) and not TF_LOG.search(result.stdout), result
    # A user who asks for TensorFlow's logging gets it.
    loud = _python("""
        from tfp_naf.cli import main
        main(["sample", "m", "-n", "5", "--out", "s2.npy"])
    """, tmp_path, {"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert loud.returncode == 0 and re.search(r"^I0000", loud.stderr, re.M), loud.stderr


def test_filter_log_drops_only_the_levels_asked_for():
    from tfp_naf.tf_quiet import filter_log

    text = (b"something else\n"
            b"WARNING: All log messages before absl::InitializeLog() is called are written "
            b"to STDERR\n"
            b"I0000 00:00:1796113676.401377    3712 port.cc:153] oneDNN custom operations\n"
            b"W0000 00:00:1796113676.401377    3712 x.cc:1] a warning\n"
            b"its continuation line\n"
            b"E0000 00:00:1796113676.401377    3712 cuda.cc:52] failed call to cuInit\n")
    assert filter_log(text, 0) == text
    assert filter_log(text, 2) == (b"something else\nE0000 00:00:1796113676.401377    3712 "
                                   b"cuda.cc:52] failed call to cuInit\n")
    assert filter_log(text, 3) == b"something else\n"


def test_the_cli_batch_size_is_the_librarys():
    from tfp_naf import batching

    assert cli.BATCH_SIZE == batching.DEFAULT_BATCH_SIZE
