"""Bounded supports (`NAFDensityModel(support=...)`, `tfp_naf.support`).

The density must put all of its mass inside the open box: it integrates to 1
over the box, it is `-inf` outside, it equals the flow's density of the
transformed data plus the transform's log-Jacobian, every sample lies strictly
inside (in float32, also where the map saturates), and the support survives
every way the model is saved and loaded, with weights of another support refused.
"""

import json
import re
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from conftest import randomize
from test_cli import TINY, fails, run

from tfp_naf import datasets
from tfp_naf.batching import iter_sample
from tfp_naf.keras import NAFDensityModel
from tfp_naf.model_io import ModelDirError, load_model_dir, save_model_dir
from tfp_naf.support import BoxSupport
from tfp_naf.tables import ColumnMoments

SMALL = dict(num_flows=2, hidden_units=[8], num_units=4)
INF = np.inf
# Every kind, and two "both" blocks apart (the Blockwise path).
MIXED = ([-3.0, None, 0.0, 1.0, -INF], [3.0, None, INF, 1.5, 2.0])


def _model(event_size, support, seed=0, **kwargs):
    tf_keras.utils.set_random_seed(seed)
    model = NAFDensityModel(event_size=event_size, support=support, **SMALL, **kwargs)
    for naf in model.flow.bijector.bijector.bijectors[::2]:
        randomize(naf, scale=0.3, seed=seed)
    return model


def _unconstrain_numpy(x, low, high):
    """T(x) and sum_j log T_j'(x_j), float64, written out per kind."""
    x = np.asarray(x, np.float64)
    low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
    lo, hi = np.isfinite(low), np.isfinite(high)
    with np.errstate(invalid="ignore", divide="ignore"):  # Unused infinite sides.
        a, b = np.log(x - low), np.log(high - x)
        u = np.where(lo & hi, a - b, np.where(lo, a, np.where(hi, -b, x)))
        log_det = np.where(lo & hi, np.log(high - low) - a - b,
                           np.where(lo, -a, np.where(hi, -b, 0.0)))
    return u, log_det.sum(-1)


# ---- Validation and config ------------------------------------------------


@pytest.mark.parametrize("support, match", [
    ("0,1", "a pair"),
    (5.0, "a pair"),
    ((0.0, 1.0, 2.0), "a pair"),
    (([0.0, 1.0, 2.0], 3.0), "one value or 2"),
    ((1.0, 1.0), "low < high"),
    ((2.0, 1.0), "dimension 0 has low = 2.0, high = 1.0"),
    (([0.0, 1.0], [1.0, 1.0 + 1e-9]), "dimension 1"),  # Equal once rounded to float32.
    ((np.nan, 1.0), "NaN"),
    ((INF, 1.0), "lower bound must be finite or -inf"),
    ((0.0, -INF), "upper bound must be finite or inf"),
    ((0.0, 1e39), "overflows float32"),
    ((1e-40, 1.0), "subnormal"),
    (("a", 1.0), "numbers or None"),
    (([0.0, "x"], 1.0), r"low\[1\] must be a number"),
    ((True, 2.0), "must be a number"),
])
def test_bad_support_is_a_clear_error(support, match):
    with pytest.raises(ValueError, match=match):
        NAFDensityModel(event_size=2, num_flows=1, hidden_units=[4], support=support)


def test_support_config_round_trips_and_is_plain_json():
    model = NAFDensityModel(event_size=5, support=MIXED, **SMALL)
    config = model.get_config()
    assert config["support"] == [[-3.0, None, 0.0, 1.0, None], [3.0, None, None, 1.5, 2.0]]
    json.dumps(config, allow_nan=False)  # No Infinity: strict JSON.
    clone = NAFDensityModel.from_config(json.loads(json.dumps(config)))
    assert clone.get_config() == config and clone.support == model.support
    assert model.support.kinds == ("both", "none", "lower", "both", "upper")
    # Scalars broadcast; inf and None are the same; bounds are kept as given
    # (0.1 is not 0.1f) but computed with in the model's dtype.
    box = NAFDensityModel(event_size=2, support=(0.1, INF), **SMALL).support
    assert box.config() == [[0.1, 0.1], [None, None]]
    assert box.low.dtype == np.float32 and box.low[0] == np.float32(0.1)
    assert NAFDensityModel(event_size=2, **SMALL).get_config()["support"] is None
    assert BoxSupport((0.0, None), 3, "float64").open_low.dtype == np.float64


def test_float64_model_with_a_support():
    model = NAFDensityModel(event_size=2, dtype="float64", support=([-1.0, 0.0], [1.0, None]),
                            **SMALL)
    assert model.support.low.dtype == np.float64 and model.x_mean.dtype == tf.float64
    lp = model.log_prob(np.array([[0.5, 1.0], [1.0, 1.0]])).numpy()
    assert lp.dtype == np.float64 and np.isfinite(lp[0]) and lp[1] == -INF
    model.x_mean.assign([1e3, -1e3])
    draws = model.sample(50, seed=0).numpy()
    assert np.all((draws > [-1.0, 0.0]) & (draws < 1.0))


def test_box_support_docstring_example_runs():
    blocks = re.findall(r"#### Examples\s*```python\n(.*?)```", BoxSupport.__doc__, flags=re.S)
    assert len(blocks) == 1
    exec(compile(textwrap.dedent(blocks[0]), "BoxSupport example", "exec"), {})


# ---- The density ---------------------------------------------------------


def _midpoint_mass(model, edges_0, edges_1):
    """The integral of the model's density over the grid cells (data units)."""
    mid_0, mid_1 = (edges_0[1:] + edges_0[:-1]) / 2, (edges_1[1:] + edges_1[:-1]) / 2
    width = np.outer(np.diff(edges_0), np.diff(edges_1))
    grid = np.stack(np.meshgrid(mid_0, mid_1, indexing="ij"), -1).reshape(-1, 2)
    density = np.exp(model.log_prob(grid.astype(np.float32), batch_size=2**16).numpy())
    return float(np.sum(density.astype(np.float64) * width.ravel()))


def test_density_integrates_to_one_over_a_two_sided_box():
    model = _model(2, ([-1.0, 0.0], [2.0, 0.5]))
    model.x_mean.assign([0.3, -0.2])
    model.x_scale.assign([0.8, 0.6])
    mass = _midpoint_mass(model, np.linspace(-1.0, 2.0, 601), np.linspace(0.0, 0.5, 601))
    assert mass == pytest.approx(1.0, abs=5e-3)
    # The same flow without the support spreads mass beyond the box.
    plain = _model(2, None)
    plain.x_mean.assign([0.5, 0.25])
    plain.x_scale.assign([1.0, 0.3])
    assert _midpoint_mass(plain, np.linspace(-1.0, 2.0, 301), np.linspace(0.0, 0.5, 301)) < 0.8


def test_density_integrates_to_one_with_one_sided_bounds():
    model = _model(2, ([0.0, -INF], [INF, 1.0]))  # x_0 > 0, x_1 < 1.
    model.x_scale.assign([0.7, 0.7])
    steps = np.geomspace(1e-7, 1e5, 1501)
    edges_0 = np.concatenate([[0.0], steps])  # Cells in data units, finer near the bound.
    edges_1 = np.concatenate([1.0 - steps[::-1], [1.0]])
    assert _midpoint_mass(model, edges_0, edges_1) == pytest.approx(1.0, abs=5e-3)


def test_log_prob_is_the_flow_density_plus_the_log_det():
    model = _model(5, MIXED)
    model.x_mean.assign([0.2, -1.0, 0.5, 0.1, -0.3])
    model.x_scale.assign([1.5, 2.0, 0.7, 1.2, 0.9])
    box = model.support
    rng = np.random.default_rng(0)
    inner = np.stack([rng.uniform(-3, 3, 64), rng.normal(0, 3, 64), rng.exponential(2, 64),
                      rng.uniform(1, 1.5, 64), 2 - rng.exponential(1, 64)], 1)
    # Rows at the open box's last float32 values and 1e-6 inside the bounds.
    edges = np.array([box.open_low, box.open_high,
                      [-3 + 1e-6, 0.0, 1e-6, 1 + 1e-6, 2 - 1e-6]], np.float64)
    edges[:, 1], edges[1, 2], edges[0, 4] = 0.0, 1e30, -1e30
    x = np.concatenate([inner, edges]).astype(np.float32)
    u, log_det = _unconstrain_numpy(x, box.low, box.high)
    np.testing.assert_allclose(model.support_bijector.inverse(x), u, rtol=1e-5, atol=1e-5)
    standardized = ((u - model.x_mean.numpy()) / model.x_scale.numpy()).astype(np.float32)
    expected = (model.flow.log_prob(standardized).numpy()
                - np.sum(np.log(model.x_scale.numpy())) + log_det)
    got = model.log_prob(x).numpy()
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-4)


def test_log_prob_outside_the_support_is_minus_inf_with_finite_gradients():
    model = _model(2, ([-1.0, 0.0], [1.0, INF]))
    x = np.array([[0.0, 1.0],      # inside
                  [1.0, 1.0],      # on the upper bound
                  [-1.5, 1.0],     # below the lower bound
                  [0.5, 0.0],      # on the one-sided bound
                  [0.5, -2.0],     # below it
                  [0.5, INF],      # infinite on the bounded side's open end
                  [0.999, 1e-3]],  # inside, near both bounds
                 np.float32)
    lp = model.log_prob(x).numpy()
    assert np.all(np.isfinite(lp[[0, 6]]))
    assert np.all(lp[1:6] == -INF)
    assert np.isnan(model.log_prob(np.float32([[np.nan, 1.0]])).numpy()[0])  # NaN stays NaN.
    # The rows outside do not poison the gradients of the rows inside.
    with tf.GradientTape() as tape:
        inside = tf.gather(model.log_prob(x), [0, 6])
        loss = -tf.reduce_sum(inside)
    grads = tape.gradient(loss, model.flow.trainable_variables)
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)
    # Batched and in a tf.function, the same up to float rounding (graph
    # rewrites may fuse ops differently from eager), the -inf rows exactly.
    np.testing.assert_allclose(model.log_prob(x, batch_size=4).numpy(), lp, rtol=1e-5, atol=0)


def test_samples_stay_strictly_inside_where_the_map_saturates():
    model = _model(3, ([-3.0, 0.0, -INF], [3.0, INF, 5.0]))
    box = model.support
    for shift in (1e3, -1e3):  # Far beyond where sigmoid / exp round to the bounds.
        model.x_mean.assign([shift, -shift, -shift])
        for samples in (model.sample(200, seed=1).numpy(),
                        np.concatenate(list(iter_sample(model, 300, seed=2, batch_size=128,
                                                        jit_compile=True))),
                        model.noise_to_data(np.float32([[40.0, -40.0, 40.0]])).numpy()):
            assert samples.dtype == np.float32
            assert np.all((samples > box.low) & (samples < box.high)), samples[:3]
            assert np.all(np.isfinite(samples))
            assert np.all(np.isfinite(model.log_prob(samples).numpy()))
    # The last shift sends dimension 0 to its lower bound, 1 past float32's
    # range (exp overflows) and 2 to its upper bound.
    np.testing.assert_array_equal(samples[0], [box.open_low[0], box.open_high[1],
                                               box.open_high[2]])
    assert box.open_low[1] == np.finfo(np.float32).tiny  # Not a subnormal TF would flush to 0.


def test_training_on_data_at_the_bounds_keeps_samples_inside():
    rng = np.random.default_rng(0)
    raw = np.stack([rng.beta(0.3, 0.3, 1024), rng.exponential(0.01, 1024)], 1)
    model = _model(2, ([0.0, 0.0], [1.0, INF]))
    data = raw.astype(np.float32)
    data[0, 0] = 1.0  # Rounded onto the bound: log-density -inf, so adapt refuses it.
    with pytest.raises(ValueError, match="row 0 lies outside the support"):
        model.adapt(data)
    box = model.support
    data = np.clip(data, box.open_low, box.open_high)
    model.adapt(data)
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-2, global_clipnorm=5.0))
    history = model.fit(data, batch_size=128, epochs=3, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert history.history["loss"][-1] < history.history["loss"][0]
    samples = model.sample(4000, seed=3).numpy()
    assert np.all((samples > box.low) & (samples < box.high))
    assert np.all(np.isfinite(model.log_prob(samples).numpy()))


def test_adapt_standardises_the_transformed_data_as_streaming_statistics_do():
    rng = np.random.default_rng(1)
    x = np.stack([rng.uniform(-3, 3, 900), rng.exponential(1.0, 900) + 1e-3], 1)
    x = x.astype(np.float32)
    adapted = _model(2, ([-3.0, 0.0], [3.0, None]))
    adapted.adapt(x)
    u, _ = _unconstrain_numpy(x, adapted.support.low, adapted.support.high)
    np.testing.assert_allclose(adapted.x_mean.numpy(), u.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(adapted.x_scale.numpy(), u.std(0), rtol=1e-4)
    # One pass over chunks of T(x) (what `tfp-naf fit` does) gives the same.
    moments = ColumnMoments()
    for chunk in np.array_split(x.astype(np.float64), 7):
        moments.update(adapted.support.unconstrain(chunk)[0].numpy())
    given = _model(2, ([-3.0, 0.0], [3.0, None]))
    given.set_standardization(moments.mean, moments.std)
    for name in ("x_mean", "x_scale"):
        np.testing.assert_allclose(getattr(given, name).numpy(), getattr(adapted, name).numpy(),
                                   rtol=1e-5)


def test_conditional_model_with_a_support():
    theta, obs = datasets.slcp(768, seed=0)
    theta, c = theta[:, :2], obs[:, :2]
    model = _model(2, (-3.0, 3.0), conditional_size=2)
    model.adapt(theta, c)
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-2))
    history = model.fit({"x": theta, "c": c}, batch_size=128, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    for condition in (c[0], c[1], [8.0, -8.0]):  # The last: far from the training data.
        draws = model.sample(1000, c=condition, seed=4).numpy()
        assert np.all(np.abs(draws) < 3.0)
    lp = model.log_prob(np.float32([[0.0, 0.0], [3.0, 0.0], [0.0, -3.5]]), c[:3]).numpy()
    assert np.isfinite(lp[0]) and np.all(lp[1:] == -INF)
    np.testing.assert_array_equal(model((theta[:5], c[:5])), model.log_prob(theta[:5], c[:5]))


# ---- Saving and loading --------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A conditional model with every kind of bound, saved every way it can be."""
    path = tmp_path_factory.mktemp("support")
    model = _model(5, MIXED, conditional_size=2, seed=3)
    rng = np.random.default_rng(2)
    c = rng.normal(size=(12, 2)).astype(np.float32)
    x = model.sample(12, c=c, seed=5).numpy()
    x[3, 0], x[7, 2] = 3.5, -1.0  # Two rows outside.
    model.x_mean.assign(rng.normal(size=5))
    model.c_scale.assign([2.0, 0.5])
    for name in ("ckpt", "w.h5", "w.weights.h5"):
        model.save_weights(str(path / name))
    model.save(str(path / "m.keras"))
    save_model_dir(model, path / "folder", saved_model=True)
    return model, x, c, path


def _clone(support=MIXED, seed=9):
    return _model(5, support, conditional_size=2, seed=seed)


@pytest.mark.parametrize("name", ["ckpt", "w.h5", "w.weights.h5"])
def test_weights_round_trip_exactly(saved, name):
    model, x, c, path = saved
    clone = _clone()
    assert not np.allclose(clone.log_prob(x, c), model.log_prob(x, c))
    clone.load_weights(str(path / name))
    expected = model.log_prob(x, c).numpy()
    assert np.sum(expected == -INF) == 2
    np.testing.assert_array_equal(clone.log_prob(x, c).numpy(), expected)
    np.testing.assert_array_equal(clone.sample(7, c=c[0], seed=1), model.sample(7, c=c[0], seed=1))


def test_keras_file_and_model_folder_round_trip_exactly(saved):
    model, x, c, path = saved
    loaded = tf_keras.models.load_model(str(path / "m.keras"),
                                        custom_objects={"NAFDensityModel": NAFDensityModel})
    folder_model, config = load_model_dir(path / "folder")
    assert config["model"]["support"] == model.get_config()["support"]
    readable = json.loads((path / "folder" / "standardization.json").read_text())
    assert readable["support"] == model.get_config()["support"]
    for clone in (loaded, folder_model):
        assert clone.get_config() == model.get_config()
        np.testing.assert_array_equal(clone.log_prob(x, c).numpy(), model.log_prob(x, c).numpy())


def test_saved_model_keeps_the_support(saved):
    model, x, c, path = saved
    exported = tf.saved_model.load(str(path / "folder" / "saved_model"))
    lp = exported.log_prob(x, c)["log_prob"].numpy()
    expected = model.log_prob(x, c).numpy()
    np.testing.assert_array_equal(lp == -INF, expected == -INF)
    np.testing.assert_allclose(lp, expected, rtol=1e-5)
    draws = exported.sample(tf.constant(500), tf.constant(3), c[:1])["x"].numpy()
    box = model.support
    assert np.all((draws > box.low) & (draws < box.high))
    np.testing.assert_allclose(draws, model.sample(500, c=c[:1], seed=3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["ckpt", "w.h5", "w.weights.h5"])
@pytest.mark.parametrize("support", [None, (MIXED[0], [2.0, None, INF, 1.5, 2.0])],
                         ids=["none", "other"])
def test_weights_of_another_support_are_refused(saved, name, support):
    _, x, c, path = saved
    other = _clone(support)
    before = other.log_prob(x, c).numpy()
    with pytest.raises(ValueError, match="support|config"):
        other.load_weights(str(path / name))
    np.testing.assert_array_equal(other.log_prob(x, c).numpy(), before)  # Nothing loaded.


def test_weights_without_a_support_are_refused_by_a_model_with_one(tmp_path):
    plain = _model(5, None, conditional_size=2)
    plain.save_weights(str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="saved from a model with no support"):
        _clone().load_weights(str(tmp_path / "ckpt"))
    # A model folder whose config.json names another support does not load either.
    folder = save_model_dir(_clone(), tmp_path / "folder")
    config = json.loads((folder / "config.json").read_text())
    config["model"]["support"] = [[-2.0] * 5, [2.0] * 5]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="do not fit the config"):
        load_model_dir(folder)


def test_legacy_h5_weights_from_before_support_still_load(tmp_path):
    import h5py

    model = _model(2, None)
    path = str(tmp_path / "w.h5")
    model.save_weights(path)
    with h5py.File(path, "r+") as f:  # As written before `support` existed.
        config = json.loads(f.attrs["tfp_naf_config"])
        del config["support"]
        f.attrs["tfp_naf_config"] = json.dumps(config)
    clone = _model(2, None, seed=4)
    clone.load_weights(path)
    x = np.float32([[0.1, 0.2]])
    np.testing.assert_array_equal(clone.log_prob(x), model.log_prob(x))


# ---- The command line ----------------------------------------------------


def test_cli_fit_with_a_support(tmp_path, capsys):
    theta, obs = datasets.slcp(400, seed=1)
    table = np.concatenate([theta[:, :2], obs[:, :1], np.abs(theta[:, 2:3]) + 1e-3], 1)
    data = tmp_path / "data.npy"
    np.save(data, table)  # Columns: theta_0, theta_1, c, |theta_2| > 0.
    model = tmp_path / "model"
    code, _, err = run(capsys, "fit", data, "--out", model, "--conditional-columns", "2",
                       "--support", "-3,3", "--column-support", "3=0,inf", "--epochs", "1",
                       "--quiet", *TINY)
    assert code == 0, err
    config = json.loads((model / "config.json").read_text())
    assert config["model"]["support"] == [[-3.0, -3.0, 0.0], [3.0, 3.0, None]]
    std = json.loads((model / "standardization.json").read_text())
    u, _ = _unconstrain_numpy(table[:, [0, 1, 3]].astype(np.float32), [-3, -3, 0], [3, 3, INF])
    np.testing.assert_allclose(std["x_mean"], u.mean(0), atol=0.15)  # Training rows' (90%).
    samples = tmp_path / "s.npy"
    assert run(capsys, "sample", model, "-n", "3000", "--out", samples, "--condition", "0.5",
               "--batch-size", "1024")[0] == 0
    drawn = np.load(samples)
    assert np.all(np.abs(drawn[:, :2]) < 3.0) and np.all(drawn[:, 3] > 0.0)
    lp = tmp_path / "lp.npy"
    assert run(capsys, "log-prob", model, samples, "--out", lp)[0] == 0
    assert np.all(np.isfinite(np.load(lp)))
    # Data outside the support, bad columns and bad bounds are clear errors.
    fails(capsys, "fit", data, "--out", tmp_path / "m2", "--support", "-2,3", *TINY,
          match="lies outside the support")
    fails(capsys, "fit", data, "--out", tmp_path / "m2", "--conditional-columns", "2",
          "--column-support", "2=0,1", *TINY, match="column 2 is a condition column")
    fails(capsys, "fit", data, "--out", tmp_path / "m2", "--support", "3,-3", *TINY,
          match="low < high")
    with pytest.raises(SystemExit) as error:  # Syntax: argparse's exit status 2.
        run(capsys, "fit", data, "--out", tmp_path / "m2", "--support", "0;1")
    assert error.value.code == 2
    assert "expected LOW,HIGH" in capsys.readouterr().err
