"""The notebooks run top to bottom (fast mode) and report sound results.

Each notebook is executed in a fresh `python3` kernel with `TFP_NAF_FAST=1`
(few steps, small grids); its last cell prints `RESULTS_JSON {...}`, which is
parsed and checked here. The MiniBooNE notebook also runs with
`TFP_NAF_NO_MINIBOONE=1`, the path taken on machines without the data.
"""

import json
import math
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from tfp_naf import datasets

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
MARKER = "RESULTS_JSON "


def _run(name, monkeypatch, **env):
    """Executes notebook `name` (fast mode); returns (notebook, results dict)."""
    monkeypatch.setenv("TFP_NAF_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.delenv("TFP_NAF_NO_MINIBOONE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # Raises CellExecutionError, naming the cell, on any error.
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    text = "".join(o.get("text", "") for o in last.outputs if o.get("name") == "stdout")
    assert MARKER in text, f"{name}: the last cell did not print its results"
    results = json.loads(text.split(MARKER, 1)[1])
    assert results["fast"] is True, f"{name} ignored TFP_NAF_FAST=1"
    return nb, results


def _images(nb):
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def _stdout(nb):
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    return "".join(o.get("text", "") for o in outputs if o.get("name") == "stdout")


def _assert_finite(values, what):
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    assert not bad, f"non-finite {what}: {bad}"


def test_two_dimensional_densities(monkeypatch):
    nb, results = _run("01_two_dimensional_densities.ipynb", monkeypatch)
    nll = results["test_nll"]
    assert "8gaussians" in nll
    for name, row in nll.items():
        assert set(row) == {"DSF", "DDSF", "MAF"}, name
        _assert_finite(row, f"test NLL on {name}")
        # These shapes live in [-4, 4]^2: any sane density has NLL well below
        # the uniform's log(64) + slack, and none is a point mass.
        assert all(0.5 < v < 10.0 for v in row.values()), (name, row)
    # The data figure plus one figure per shape.
    assert _images(nb) >= 1 + len(nll)


def test_miniboone(monkeypatch):
    nb, results = _run("02_miniboone.ipynb", monkeypatch)
    nll = results["test_nll"]
    assert set(nll) == {"NAF (DSF)", "MAF (affine)", "RQ-NSF (AR)"}
    _assert_finite(nll, "test NLL")
    if datasets.miniboone_dir() is not None:
        assert results["data"] == "MiniBooNE" and results["dim"] == 43
    else:
        assert results["data"] == "synthetic stand-in"
    assert _images(nb) >= 3


def test_miniboone_fallback_without_the_data(monkeypatch):
    nb, results = _run("02_miniboone.ipynb", monkeypatch, TFP_NAF_NO_MINIBOONE="1")
    assert results["data"] == "synthetic stand-in" and results["dim"] == 8
    assert "NOTE: TFP_NAF_NO_MINIBOONE=1: using a generated 8-d synthetic stand-in" in _stdout(nb)
    _assert_finite(results["test_nll"], "test NLL")
    assert len(results["test_nll"]) == 3


def test_conditional_density(monkeypatch):
    nb, results = _run("03_conditional_density.ipynb", monkeypatch)
    nll = results["test_nll"]
    _assert_finite(nll, "test NLL")
    # The true conditional density is the floor: a learned model may only
    # dip below it by Monte Carlo noise (1,000 test pairs), never by much.
    assert nll["NAF (DSF)"] > nll["true density"] - 0.15, nll
    assert nll["MAF (affine)"] > nll["true density"] - 0.15, nll
    assert math.isfinite(results["radius_rmse"])
    assert _images(nb) >= 3


def test_variational_inference(monkeypatch):
    nb, results = _run("04_variational_inference.ipynb", monkeypatch)
    for target, rows in results["elbo"].items():
        log_z = results["log_z"][target]
        assert set(rows) == {"Gaussian (full rank)", "IAF", "MAF", "NAF (DSF)"}
        for q_name, row in rows.items():
            assert math.isfinite(row["elbo"]), (target, q_name)
            # The ELBO is a lower bound on log Z: exceeding it beyond Monte
            # Carlo error would mean a wrong log-density of q's own samples.
            assert row["elbo"] <= log_z + row["two_std_err"] + 0.05, (target, q_name, row)
    assert _images(nb) >= 1 + len(results["elbo"])
