"""The NeuralAutoregressiveFlow bijector: exactness, structure, composition, errors."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras
from conftest import randomize

import tfp_naf
from tfp_naf import NeuralAutoregressiveFlow, conditioners

tfb, tfd = tfp.bijectors, tfp.distributions

COND_SIZE = 2

# (transformer, conditional, context_units): the flavours every exactness test covers.
VARIANTS = {
    "dsf": ("dsf", False, None),
    "ddsf": ("ddsf", False, None),
    "dsf-cond": ("dsf", True, None),
    "ddsf-cond": ("ddsf", True, None),
    "dsf-compact": ("dsf", False, 3),
    "ddsf-cond-compact": ("ddsf", True, 3),
}


def build(variant="dsf", event_size=3, dtype=tf.float32, seed=0, randomized=True, **kwargs):
    """A small flow of a `VARIANTS` flavour, randomized unless told otherwise.

    Seeded: the MADE's initial weights, and so the flow, are the same every run.
    """
    tf_keras.utils.set_random_seed(seed)
    transformer, conditional, context_units = VARIANTS[variant]
    options = dict(
        event_shape=[event_size],
        hidden_units=[16, 16],
        transformer=transformer,
        num_units=4,
        num_layers=2,
        conditional_event_shape=[COND_SIZE] if conditional else None,
        context_units=context_units,
        dtype=dtype,
    )
    options.update(kwargs)
    naf = NeuralAutoregressiveFlow(**options)
    return randomize(naf, seed=seed) if randomized else naf


def data(naf, n=6, seed=0, scale=2.0):
    """`(x, kwargs)`: realistic data `[n, D]` and, if conditional, `conditional_input`."""
    rng = np.random.default_rng(seed)
    dtype = naf.dtype.as_numpy_dtype
    x = (scale * rng.normal(size=(n, naf.event_size))).astype(dtype)
    if not naf.conditional:
        return x, {}
    c = rng.normal(size=(n, COND_SIZE)).astype(dtype)
    return x, {"conditional_input": c}


def base(event_size, dtype=tf.float64):
    return tfd.Sample(tfd.Normal(tf.constant(0.0, dtype), tf.constant(1.0, dtype)), [event_size])


class CountingConditioner(tf.Module):
    """Wraps a MADE and counts its calls; optionally hides its input order."""

    def __init__(self, made, expose_order=True):
        super().__init__()
        self.inner = made
        self.expose_order = expose_order
        self.calls = 0

    def __call__(self, x, **kwargs):
        self.calls += 1
        return self.inner(x, **kwargs)

    @property
    def made(self):
        # The flow reads the autoregressive order from `made` when present.
        return self.inner if self.expose_order else None

    @property
    def params(self):
        return self.inner.params

    @property
    def event_shape(self):
        return self.inner.event_shape

    @property
    def dtype(self):
        return self.inner.dtype


# ---- Exactness: log-det, structure, round trips ---------------------------


@pytest.mark.parametrize(
    "variant, event_size",
    [(v, d) for v in ("dsf", "ddsf", "dsf-cond", "ddsf-cond") for d in (1, 2, 5)]
    + [("dsf-compact", 3), ("ddsf-cond-compact", 3)],
)
def test_log_det_matches_autodiff_jacobian(variant, event_size):
    naf = build(variant, event_size, tf.float64)
    x, kwargs = data(naf, n=4)
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        z, log_det = naf.forward_and_log_det(x, **kwargs)
    jacobian = tape.batch_jacobian(z, x).numpy()
    # The autodiff Jacobian is the true one (central differences). With a small
    # step this also catches any float32 arithmetic hiding in a float64 flow.
    h = 1e-6
    for j in range(event_size):
        step = h * np.eye(event_size)[j]
        fd = naf.forward(x + step, **kwargs) - naf.forward(x - step, **kwargs)
        np.testing.assert_allclose(fd.numpy() / (2 * h), jacobian[:, :, j], atol=1e-6)
    sign, expected = np.linalg.slogdet(jacobian)
    assert np.all(sign > 0)
    np.testing.assert_allclose(log_det, expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(naf.forward_log_det_jacobian(x, **kwargs), expected, atol=1e-9)
    ildj = naf.inverse_log_det_jacobian(tf.identity(z), **kwargs)
    np.testing.assert_allclose(ildj, -expected, atol=1e-8)
    # The flow is not the identity: the test is not vacuous.
    assert np.abs(z.numpy() - x.numpy()).max() > 1e-2
    assert np.abs(expected).max() > 1e-2


@pytest.mark.parametrize(
    "variant, input_order",
    [
        ("dsf", "left-to-right"),
        ("ddsf", "right-to-left"),
        ("dsf-cond", "random"),
        ("ddsf", "random"),
        ("ddsf-cond-compact", "random"),
        ("dsf-compact", "right-to-left"),
    ],
)
def test_autoregressive_structure(variant, input_order):
    event_size = 5
    naf = build(variant, event_size, tf.float64, input_order=input_order)
    made = getattr(naf.conditioner, "made", naf.conditioner)
    degrees = np.asarray(made._input_order)  # 1-based position of each dimension.
    np.testing.assert_array_equal(np.sort(degrees), np.arange(1, event_size + 1))
    if input_order == "left-to-right":
        np.testing.assert_array_equal(degrees, np.arange(1, event_size + 1))
    elif input_order == "right-to-left":
        np.testing.assert_array_equal(degrees, np.arange(event_size, 0, -1))
    x, kwargs = data(naf, n=3)
    z = naf.forward(x, **kwargs).numpy()
    for i in range(event_size):
        moved = x.copy()
        moved[:, i] += 0.7
        dz = np.abs(naf.forward(moved, **kwargs).numpy() - z)
        earlier = degrees < degrees[i]
        later = degrees > degrees[i]
        assert np.all(dz[:, earlier] == 0.0), (i, dz)
        assert np.all(dz[:, i] > 1e-3), (i, dz)
        if later.any():  # The conditioner does condition on x_i.
            assert dz[:, later].max() > 1e-4, (i, dz)


F32, F64 = ("float32", 1e-4), ("float64", 1e-9)


@pytest.mark.parametrize(
    "variant, dtype, tol",
    [
        ("dsf", *F32),
        ("ddsf", *F64),
        ("dsf-cond", *F64),
        ("ddsf-cond", *F64),
        ("dsf-compact", *F64),
        ("ddsf-cond-compact", *F32),
    ],
)
def test_round_trips(variant, dtype, tol):
    naf = build(variant, 3, dtype, seed=1)
    x, kwargs = data(naf, n=16, seed=2)
    # tf.identity defeats the bijector cache: the inverse is really solved.
    z = naf.forward(x, **kwargs)
    x_back = naf.inverse(tf.identity(z), **kwargs).numpy()
    assert x_back.dtype == x.dtype
    # x is determined to z's float resolution divided by g' (far from 1e-4 in
    # float32 where a transformer is nearly flat), so check that z comes back
    # and x as far as that conditioning allows.
    # z's resolution: the forward's own rounding, a few ulps from its layers'
    # logits, logs and mixtures (measured up to ~4 ulps in float64).
    eps = np.finfo(x.dtype).eps
    z_resolution = 8.0 * eps * (1.0 + np.abs(z.numpy()))
    z_back = naf.forward(tf.identity(x_back), **kwargs).numpy()
    assert np.all(np.abs(z_back - z.numpy()) <= z_resolution)
    theta = naf.transformer_params(x, **kwargs)
    log_deriv = naf.transformer.forward_and_log_derivative(x, theta)[1]
    assert np.all(np.abs(x_back - x) <= tol + z_resolution / np.exp(log_deriv.numpy()))
    noise = np.random.default_rng(3).normal(size=x.shape).astype(x.dtype)
    x_from_noise = naf.inverse(noise, **kwargs)
    assert np.all(np.isfinite(x_from_noise.numpy()))
    z_back = naf.forward(tf.identity(x_from_noise), **kwargs).numpy()
    # z_i outside the range (g(-inf), g(+inf)) of its transformer (for DDSF it
    # depends on the parameters, so it can be narrow) comes back clamped to it.
    theta = naf.transformer_params(x_from_noise, **kwargs)
    low, high = (t.numpy() for t in naf.transformer.forward_limits(theta))
    inside = (noise > low) & (noise < high)
    assert inside.mean() > 0.7
    np.testing.assert_allclose(z_back, np.clip(noise, low, high), rtol=0, atol=tol)


def test_batch_shapes():
    naf = build("ddsf-cond", 3, tf.float64, seed=12)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 4, 3))
    c = rng.normal(size=(4, COND_SIZE))  # Broadcasts against x's batch shape.
    z, log_det = naf.forward_and_log_det(x, conditional_input=c)
    assert z.shape == (2, 4, 3) and log_det.shape == (2, 4)
    np.testing.assert_allclose(naf.inverse(tf.identity(z), conditional_input=c), x, atol=1e-9)
    # One event without batch axes gives the same numbers as inside a batch.
    z_one, log_det_one = naf.forward_and_log_det(x[1, 2], conditional_input=c[2])
    assert z_one.shape == (3,) and log_det_one.shape == ()
    np.testing.assert_allclose(z_one, z[1, 2], rtol=1e-12)
    np.testing.assert_allclose(log_det_one, log_det[1, 2], rtol=1e-12)
    x_one = naf.inverse(tf.identity(z_one), conditional_input=c[2])
    assert x_one.shape == (3,)
    np.testing.assert_allclose(x_one, x[1, 2], atol=1e-9)


# ---- The flow as a density ------------------------------------------------

GRID_HALF_WIDTH, GRID_POINTS = 12.0, 321


@pytest.fixture(scope="module", params=["dsf", "ddsf-cond"])
def density_2d(request):
    """A randomized 2-D float64 flow, its density, and the density on a grid.

    Built without the initial spread, whose wider start puts mass beyond the grid.
    """
    naf = build(request.param, 2, tf.float64, seed=4, initial_spread=0.0)
    kwargs = {}
    if naf.conditional:
        kwargs = {"conditional_input": tf.constant([0.5, -1.0], tf.float64)}
    flow = tfd.TransformedDistribution(base(2), tfb.Invert(naf))
    t = np.linspace(-GRID_HALF_WIDTH, GRID_HALF_WIDTH, GRID_POINTS)
    cell = (t[1] - t[0]) ** 2
    grid = np.stack(np.meshgrid(t, t, indexing="ij"), axis=-1).reshape(-1, 2)
    ckw = {}
    if kwargs:
        c = np.broadcast_to(kwargs["conditional_input"].numpy(), grid.shape)
        ckw = {"bijector_kwargs": {"conditional_input": c}}
    density = np.exp(flow.log_prob(grid, **ckw).numpy())
    return flow, kwargs, grid, density * cell


def test_density_integrates_to_one(density_2d):
    _, _, grid, mass = density_2d
    assert mass.sum() == pytest.approx(1.0, abs=1e-2)
    # The grid is wide enough: the border carries no mass.
    border = np.abs(grid).max(axis=-1) > GRID_HALF_WIDTH - 1.0
    assert mass[border].sum() < 1e-3


def test_samples_agree_with_log_prob(density_2d):
    flow, kwargs, grid, mass = density_2d
    n = 5000
    bijector_kwargs = {}
    if kwargs:
        c = tf.broadcast_to(kwargs["conditional_input"], [n, 2])
        bijector_kwargs = {"conditional_input": c}
    samples = flow.sample(n, seed=11, bijector_kwargs=bijector_kwargs).numpy()
    assert samples.shape == (n, 2) and np.all(np.isfinite(samples))
    mass = mass / mass.sum()
    # Probabilities of a few regions: by sampling vs by integrating the density.
    regions = {
        "x0<m0": lambda x: x[:, 0] < np.sum(mass * grid[:, 0]),
        "x1<m1": lambda x: x[:, 1] < np.sum(mass * grid[:, 1]),
        "x0>x1": lambda x: x[:, 0] > x[:, 1],
        "|x|<1": lambda x: np.hypot(x[:, 0], x[:, 1]) < 1.0,
        "ring": lambda x: np.abs(np.hypot(x[:, 0], x[:, 1]) - 2.0) < 0.5,
    }
    for name, region in regions.items():
        p_grid = np.sum(mass[region(grid)])
        p_samples = np.mean(region(samples))
        stderr = np.sqrt(p_grid * (1 - p_grid) / n)
        assert abs(p_samples - p_grid) < 5 * stderr + 2e-3, (name, p_samples, p_grid)
    # And moments.
    for k in range(2):
        mean_grid = np.sum(mass * grid[:, k])
        sd = np.sqrt(np.sum(mass * (grid[:, k] - mean_grid) ** 2))
        assert abs(samples[:, k].mean() - mean_grid) < 5 * sd / np.sqrt(n), k


# ---- Gradients, compilation -----------------------------------------------


@pytest.mark.parametrize("variant", ["dsf", "ddsf-cond", "dsf-compact", "ddsf-cond-compact"])
def test_gradients_through_log_prob_and_sample(variant):
    naf = build(variant, 3, tf.float32, seed=5)
    flow = tfd.TransformedDistribution(base(3, tf.float32), tfb.Invert(naf))
    x, kwargs = data(naf, n=8)
    with tf.GradientTape(persistent=True) as tape:
        nll = -tf.reduce_mean(flow.log_prob(x, bijector_kwargs=kwargs))
        samples = flow.sample(8, seed=3, bijector_kwargs=kwargs)
        sample_loss = tf.reduce_mean(samples**2)
    variables = naf.trainable_variables
    assert len(variables) >= 6
    for loss in (nll, sample_loss):
        grads = tape.gradient(loss, variables)
        for v, g in zip(variables, grads, strict=True):
            assert g is not None, v.name
            assert np.all(np.isfinite(g.numpy())), v.name
        assert max(np.abs(g.numpy()).max() for g in grads) > 0


def test_inverse_gradients_match_finite_differences():
    naf = build("ddsf-cond", 2, tf.float64, seed=6)
    z, kwargs = data(naf, n=5, scale=1.0)
    variable = naf.trainable_variables[0]
    direction = np.random.default_rng(0).normal(size=variable.shape)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(naf.inverse(z, **kwargs) ** 3)
    analytic = np.sum(tape.gradient(loss, variable).numpy() * direction)
    start, h = variable.numpy(), 1e-6
    losses = []
    for sign in (1.0, -1.0):
        variable.assign(start + sign * h * direction)
        losses.append(tf.reduce_sum(naf.inverse(tf.identity(z), **kwargs) ** 3).numpy())
    variable.assign(start)
    numeric = (losses[0] - losses[1]) / (2 * h)
    assert abs(numeric) > 1e-3
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5)


def test_tf_function_and_xla_match_eager():
    # Small: compiling the inverse's nested loops with XLA takes ~10 s.
    naf = build("ddsf-cond", 2, tf.float32, seed=7)
    x, kwargs = data(naf, n=8)
    c = kwargs["conditional_input"]

    def run(x, c):
        z = naf.forward(x, conditional_input=c)
        log_det = naf.forward_log_det_jacobian(x, conditional_input=c)
        x_back = naf.inverse(tf.identity(z), conditional_input=c)
        return z, log_det, x_back

    eager = [t.numpy() for t in run(x, c)]
    np.testing.assert_allclose(eager[2], x, atol=1e-4)
    for jit in (False, True):
        compiled = [t.numpy() for t in tf.function(run, jit_compile=jit)(x, c)]
        for name, a, b in zip(("forward", "log_det", "inverse"), eager, compiled, strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=f"{name} jit={jit}")


@pytest.mark.parametrize("mode", ["eager", "function", "jit"])
def test_xla_fused_shared_layers_match_separate_ops(mode, monkeypatch):
    """SharedDenseSigmoidalFlow's XLA cluster (the default for large inputs) gives the
    separate ops' values and gradients, inside a plain `tf.function` and nested inside
    a jit-compiled one."""
    from tfp_naf import shared_mixing

    monkeypatch.setattr(shared_mixing, "XLA_FUSED_MIN_SIZE", 0)  # Fused at any size.
    tf_keras.utils.set_random_seed(8)
    naf = randomize(NeuralAutoregressiveFlow(
        event_shape=[3], hidden_units=[16], transformer="ddsf-shared", num_units=4,
        conditional_event_shape=[COND_SIZE]), seed=8)
    x, kwargs = data(naf, n=16)
    c = kwargs["conditional_input"]
    flow = tfd.TransformedDistribution(base(3, tf.float32), tfb.Invert(naf))

    def run(x, c):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(flow.log_prob(x, bijector_kwargs={"conditional_input": c}))
        grads = tape.gradient(loss, naf.trainable_variables)
        x_back = naf.inverse(tf.identity(naf.forward(x, conditional_input=c)),
                             conditional_input=c)
        return [loss, x_back, *grads]

    results = {}
    for fused in (True, False):
        monkeypatch.setattr(shared_mixing, "XLA_FUSED_LAYERS", fused)
        fn = run if mode == "eager" else tf.function(run, jit_compile=mode == "jit")
        results[fused] = [t.numpy() for t in fn(x, c)]
    for got, want in zip(results[True], results[False], strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    np.testing.assert_allclose(results[True][1], x, atol=1e-4)


def test_xla_fused_shared_layers_are_not_nested_inside_jit(monkeypatch):
    """Inside a jit-compiled function the layers are compiled with it: a nested
    `jit_compile` function there made XLA recompile the whole step at every call."""
    from tfp_naf import shared_mixing

    calls = []
    fused = shared_mixing._fused_shared_layers

    def counting(*args):
        calls.append(args)
        return fused(*args)

    monkeypatch.setattr(shared_mixing, "_fused_shared_layers", counting)
    k = 3
    bij = shared_mixing.SharedDenseSigmoidalFlow(
        params=np.zeros([shared_mixing.SharedDenseSigmoidalFlow.num_params(k, 2)], np.float32),
        mixing_logits=np.zeros([shared_mixing.SharedDenseSigmoidalFlow.num_mixing_params(k, 2)],
                               np.float32), num_units=k)
    x = tf.zeros([shared_mixing.XLA_FUSED_MIN_SIZE], tf.float32)
    want = bij.forward(x).numpy()
    assert len(calls) == 1  # Eager, large enough: fused.
    got = tf.function(bij.forward, jit_compile=True)(x).numpy()
    assert len(calls) == 1  # Inside jit: not nested.
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    tf.function(bij.forward)(x)
    assert len(calls) == 2  # Inside a plain tf.function: fused.
    bij.forward(x[:10])
    assert len(calls) == 2  # Small: not fused.


# ---- Composition -----------------------------------------------------------


def test_chain_with_permute_invert_and_batch_norm_float64():
    d = 3
    # Near-identity starts (randomized below): with spread centres the DDSF's inverse can
    # send a sample beyond the DSF's bounded range (-L, L), where it is clamped.
    naf1 = build("dsf", d, tf.float64, seed=8, initial_spread=0.0)
    naf2 = build("ddsf", d, tf.float64, seed=9, initial_spread=0.0)
    batch_norm = tfb.BatchNormalization(
        batchnorm_layer=tf_keras.layers.BatchNormalization(dtype="float64"), training=False
    )
    permute = tfb.Permute([2, 0, 1])
    chain = tfb.Chain([naf2, permute, batch_norm, naf1])  # Data -> noise.
    flow = tfd.TransformedDistribution(base(d), tfb.Invert(chain))
    x, _ = data(naf1, n=10)
    log_prob = flow.log_prob(x)
    assert log_prob.dtype == tf.float64
    # By hand, layer by layer.
    h1, ld1 = naf1.forward_and_log_det(x)
    h2 = batch_norm.forward(h1)
    ld2 = batch_norm.forward_log_det_jacobian(h1, event_ndims=1)
    h3 = permute.forward(h2)
    z, ld3 = naf2.forward_and_log_det(h3)
    expected = base(d).log_prob(z) + ld1 + ld2 + ld3
    np.testing.assert_allclose(log_prob, expected, rtol=1e-12, atol=1e-12)
    # Sampling inverts the whole chain.
    samples = flow.sample(7, seed=5)
    assert samples.dtype == tf.float64 and samples.shape == (7, d)
    noise = chain.forward(tf.identity(samples))
    np.testing.assert_allclose(chain.inverse(tf.identity(noise)), samples, atol=1e-9)
    np.testing.assert_allclose(
        flow.log_prob(tf.identity(samples)),
        base(d).log_prob(noise) + chain.forward_log_det_jacobian(samples, event_ndims=1),
        rtol=1e-10,
    )
    with tf.GradientTape() as tape:
        loss = -tf.reduce_mean(flow.log_prob(x))
    grads = tape.gradient(loss, chain.trainable_variables)
    assert len(grads) > 10 and all(g is not None for g in grads)


# ---- Conditional flows ------------------------------------------------------


def test_conditional_input_directly_and_through_bijector_kwargs():
    naf = build("ddsf-cond", 2, tf.float64, seed=10)
    x, kwargs = data(naf, n=5)
    c = kwargs["conditional_input"]
    flow = tfd.TransformedDistribution(base(2), tfb.Invert(naf))
    z, log_det = naf.forward_and_log_det(x, conditional_input=c)
    np.testing.assert_allclose(naf.forward(x, conditional_input=c), z)
    np.testing.assert_allclose(
        flow.log_prob(x, bijector_kwargs={"conditional_input": c}),
        base(2).log_prob(z) + log_det,
        rtol=1e-12,
    )
    # The output depends on the conditional input.
    other_z = naf.forward(x, conditional_input=c + 1.0)
    assert np.abs(other_z - z).min() > 1e-4
    other_lp = flow.log_prob(x, bijector_kwargs={"conditional_input": c + 1.0})
    assert np.abs(other_lp - flow.log_prob(x, bijector_kwargs=kwargs)).min() > 1e-4
    # Sampling through bijector_kwargs inverts with the same conditional input.
    seed = (1, 2)  # Stateless: the base draws the same noise.
    samples = flow.sample(5, seed=seed, bijector_kwargs={"conditional_input": c})
    noise = base(2).sample(5, seed=seed)
    np.testing.assert_allclose(
        naf.forward(tf.identity(samples), conditional_input=c), noise, atol=1e-9
    )
    other = flow.sample(5, seed=seed, bijector_kwargs={"conditional_input": c + 1.0})
    assert np.abs(other - samples).max() > 1e-3
    # A single conditional input broadcasts against a batch.
    z0 = naf.forward(x, conditional_input=c[0])
    np.testing.assert_allclose(z0[0], z[0], rtol=1e-12)


# ---- Conditioners ---------------------------------------------------------


def test_user_supplied_conditioner():
    p = NeuralAutoregressiveFlow.conditioner_params("ddsf", 4, 2)
    made = tfb.AutoregressiveNetwork(
        params=p, event_shape=[3], hidden_units=[16], input_order="right-to-left",
        activation="tanh", dtype="float64",
    )
    naf = NeuralAutoregressiveFlow(made, transformer="ddsf", num_units=4, num_layers=2)
    assert naf.dtype == tf.float64 and naf.event_size == 3
    x, _ = data(naf, n=6)
    z = naf.forward(x)
    np.testing.assert_allclose(naf.inverse(tf.identity(z)), x, atol=1e-9)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        z = naf.forward(xt)
    jacobian = tape.batch_jacobian(z, xt).numpy()
    np.testing.assert_allclose(
        naf.forward_log_det_jacobian(xt), np.linalg.slogdet(jacobian)[1], atol=1e-9
    )
    # Right-to-left: z_2 depends on x_2 only, z_0 on everything.
    assert np.all(jacobian[:, 2, :2] == 0) and np.all(jacobian[:, 1, 0] == 0)
    assert np.abs(jacobian[:, 0, 1:]).min() > 0


@pytest.mark.parametrize("variant, rate", [("dsf", None), ("ddsf-cond-compact", 4.0)])
def test_base_params_enter_theta_with_their_rate_and_gradient(variant, rate):
    naf = build(variant, 3, tf.float64, seed=4, base_rate=rate)
    assert naf.base_rate == (tfp_naf.flow.DEFAULT_BASE_RATE if rate is None else rate) > 0
    beta = naf.base_params
    assert beta.shape == (3, naf.num_params) and np.abs(beta.numpy()).max() > 0
    assert any(v is beta for v in naf.trainable_variables)
    x, kwargs = data(naf, n=5, seed=1)
    with tf.GradientTape() as tape:
        theta = naf.transformer_params(x, **kwargs)
        z, log_deriv = naf.transformer.forward_and_log_derivative(x, theta)
        loss = tf.reduce_sum(z**2) - tf.reduce_sum(log_deriv)
    grad_theta, grad_beta = tape.gradient(loss, [theta, beta])
    np.testing.assert_allclose(
        theta, naf.conditioner(x, **kwargs) + naf.base_rate * beta.numpy(), rtol=1e-12)
    # d loss / d beta = r * (d loss / d theta summed over the batch).
    np.testing.assert_allclose(grad_beta, naf.base_rate * grad_theta.numpy().sum(0), rtol=1e-10)
    # The flow's own forward pass uses the same theta.
    np.testing.assert_allclose(naf.forward(x, **kwargs), z, rtol=1e-12)


def test_base_rate_options():
    p = NeuralAutoregressiveFlow.conditioner_params("dsf", 4)
    made = tfb.AutoregressiveNetwork(params=p, event_shape=[3], hidden_units=[8])
    naf = NeuralAutoregressiveFlow(made, transformer="dsf", num_units=4)
    assert naf.base_rate == 0.0 and naf.base_params is None  # A conditioner you pass is kept.
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    np.testing.assert_array_equal(naf.transformer_params(x), made(x))
    naf = NeuralAutoregressiveFlow(made, transformer="dsf", num_units=4, base_rate=3.0)
    assert naf.base_rate == 3.0 and naf.base_params.shape == (3, p)
    naf = build("dsf", 3, randomized=False, base_rate=0.0)
    assert naf.base_params is None
    # A conditional MADE conditions every offset on c: no base parameters by default.
    assert build("dsf-cond", 3, randomized=False).base_params is None
    assert not any("base_params" in v.name for v in naf.trainable_variables)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="base_rate"):
            build("dsf", 3, randomized=False, base_rate=bad)
    class NoEventShape(tf.Module):
        params, dtype = p, tf.float32

        def __call__(self, x):
            return made(x)

    unknown = NoEventShape()
    with pytest.raises(ValueError, match="event size"):
        NeuralAutoregressiveFlow(unknown, transformer="dsf", num_units=4, base_rate=1.0)


def test_wrong_conditioner_params_names_expected_number():
    made = tfb.AutoregressiveNetwork(params=12, event_shape=[3], hidden_units=[8])
    expected = NeuralAutoregressiveFlow.conditioner_params("dsf", 8)
    with pytest.raises(ValueError, match=f"needs {expected}.*params={expected}"):
        NeuralAutoregressiveFlow(made, transformer="dsf", num_units=8)
    with pytest.raises(ValueError, match="event shape"):
        NeuralAutoregressiveFlow(made, event_shape=[4], transformer="dsf", num_units=4)


def test_conditioner_without_known_order_still_inverts():
    p = NeuralAutoregressiveFlow.conditioner_params("dsf", 4)
    made = tfb.AutoregressiveNetwork(
        params=p, event_shape=[3], hidden_units=[16], input_order="random", dtype="float64"
    )
    naf = NeuralAutoregressiveFlow(
        CountingConditioner(made, expose_order=False), transformer="dsf", num_units=4
    )
    x, _ = data(naf, n=6)
    z = naf.forward(x)
    assert np.abs(z - x).max() > 1e-2
    np.testing.assert_allclose(naf.inverse(tf.identity(z)), x, atol=1e-9)


def test_conditioner_params_values():
    assert NeuralAutoregressiveFlow.conditioner_params("dsf", 16) == 48
    assert NeuralAutoregressiveFlow.conditioner_params("dsf", 16, num_layers=5) == 48
    assert NeuralAutoregressiveFlow.conditioner_params("DSF", 4) == 12
    k = 4  # DDSF: 1 -> K: 2K + K^2, K -> K: 2K + 2K^2, K -> 1: 3K + K^2.
    assert NeuralAutoregressiveFlow.conditioner_params("ddsf", k, 1) == 3 * k
    assert NeuralAutoregressiveFlow.conditioner_params("ddsf", k, 2) == 5 * k + 2 * k * k
    assert NeuralAutoregressiveFlow.conditioner_params("ddsf", k, 3) == 7 * k + 4 * k * k
    assert (
        NeuralAutoregressiveFlow.conditioner_params(tfp_naf.DeepDenseSigmoidalFlow, k, 2)
        == 5 * k + 2 * k * k
    )
    with pytest.raises(ValueError, match="Unknown transformer 'maf'"):
        NeuralAutoregressiveFlow.conditioner_params("maf", 4)
    naf = build("ddsf", 2, randomized=False)
    assert naf.num_params == 5 * k + 2 * k * k
    assert naf.conditioner(tf.zeros([1, 2])).shape == (1, 2, naf.num_params)


@pytest.mark.parametrize("variant", ["dsf", "ddsf-cond-compact"])
@pytest.mark.parametrize("spread, first", [(0.0, None), (2.0, None), (0.0, 3.5)])
def test_fresh_flow_starts_at_its_initial_transformer(variant, spread, first, monkeypatch):
    # A small output scale, so the start is (nearly) the transformer's initial_params.
    monkeypatch.setattr(conditioners, "OUTPUT_INIT_SCALE", 1e-2)
    naf = build(variant, 3, randomized=False, initial_spread=spread, first_spread=first,
                input_order="random")
    variables = naf.trainable_variables
    assert len(variables) >= 6
    assert sum(int(np.prod(v.shape)) for v in variables) > 100
    assert naf.parameters["event_shape"] == [3]
    assert naf.parameters["num_units"] == 4
    assert naf.parameters["initial_spread"] == spread
    assert naf.parameters["transformer"] == VARIANTS[variant][0]
    x, kwargs = data(naf, n=4, scale=1.0)
    # Every dimension's parameters start near the transformer's initial_params
    # (the first in autoregressive order's at `first_spread`, which is
    # `initial_spread` unless given)...
    initial = type(naf.transformer).initial_params
    start = np.stack([initial(4, naf.transformer.num_layers, spread)] * 3)
    first_dim = conditioners.solve_order(naf.conditioner)[0]
    start[first_dim] = initial(4, naf.transformer.num_layers, spread if first is None else first)
    theta = naf.transformer_params(x, **kwargs).numpy()
    np.testing.assert_allclose(theta, np.broadcast_to(start, theta.shape), atol=0.1)
    # ... so the flow starts as that transformer applied to each dimension:
    # the identity at spread 0, a monotone map with spread-out units otherwise.
    layers = {"num_layers": 2} if variant.startswith("ddsf") else {}
    expected = type(naf.transformer)(params=start.astype(np.float32), **layers)
    y, log_deriv = expected.forward_and_log_derivative(x)  # params [3, P] against x [4, 3]
    z, log_det = naf.forward_and_log_det(x, **kwargs)
    np.testing.assert_allclose(z, y.numpy(), atol=0.2)
    np.testing.assert_allclose(log_det, log_deriv.numpy().sum(-1), atol=0.2)
    if spread == 0.0 and first is None:
        np.testing.assert_allclose(z, x, atol=0.2)
    else:  # Not the identity: the check above is not vacuous.
        assert np.abs(z - x).max() > 0.2


def test_first_spread_moves_the_first_dimensions_offsets_only():
    # Two flows built alike but for `first_spread` differ exactly by the change
    # of start in the first dimension's parameters, for either head.
    for context_units in (None, 3):
        flows = [build("dsf", 4, randomized=False, seed=2, context_units=context_units,
                       input_order="random", initial_spread=1.0, first_spread=f)
                 for f in (None, 2.5)]
        theta = [naf.transformer_params(tf.zeros([1, 4])).numpy()[0] for naf in flows]
        initial = tfp_naf.DeepSigmoidalFlow.initial_params
        expected = np.zeros_like(theta[0])
        expected[conditioners.solve_order(flows[0].conditioner)[0]] = (
            initial(4, 1, 2.5) - initial(4, 1, 1.0))
        np.testing.assert_allclose(theta[1] - theta[0], expected, atol=1e-6)


def test_initial_spread_is_checked():
    with pytest.raises(ValueError, match="initial_spread"):
        build("dsf", 3, randomized=False, initial_spread=-1.0)
    with pytest.raises(ValueError, match="first_spread"):
        build("dsf", 3, randomized=False, first_spread=float("nan"))


@pytest.mark.parametrize("variant", ["dsf", "ddsf-cond", "dsf-compact"])
def test_fresh_flow_has_distinct_transformer_units(variant):
    # With an all-zero conditioner output every unit of a transformer is the
    # same, gets the same gradient and never separates: the flow stays affine.
    # (The slopes start equal up to the small random output layer.)
    naf = build(variant, 3, randomized=False)
    x, kwargs = data(naf, n=4, scale=1.0)
    theta = naf.transformer_params(x, **kwargs).numpy()
    k = naf.transformer.num_units
    a_raw = theta[..., :k]  # The slopes of the first layer, per dimension.
    assert np.all(a_raw.std(axis=-1) > 1e-2 * conditioners.OUTPUT_INIT_SCALE), a_raw
    assert np.abs(a_raw).max() < 20 * conditioners.OUTPUT_INIT_SCALE


def test_forward_log_det_is_cached():
    made = tfb.AutoregressiveNetwork(
        params=NeuralAutoregressiveFlow.conditioner_params("dsf", 4),
        event_shape=[3], hidden_units=[16],
    )
    counter = CountingConditioner(made)
    naf = NeuralAutoregressiveFlow(counter, transformer="dsf", num_units=4)
    flow = tfd.TransformedDistribution(base(3, tf.float32), tfb.Invert(naf))
    x = tf.constant(data(naf, n=4)[0])  # The cache is keyed by the tensor.
    counter.calls = 0
    log_prob = flow.log_prob(x)
    assert counter.calls == 1
    z, log_det = naf.forward_and_log_det(x)
    np.testing.assert_allclose(log_prob, base(3, tf.float32).log_prob(z) + log_det, rtol=1e-5)
    counter.calls = 0
    z = naf.forward(x)
    naf.forward_log_det_jacobian(x)
    assert counter.calls == 1
    # The inverse takes D passes and caches its log-det as well.
    counter.calls = 0
    y = tf.identity(z)
    naf.inverse(y)
    passes = counter.calls
    assert passes <= 3 + 1
    naf.inverse_log_det_jacobian(y)
    assert counter.calls == passes


# ---- Bad input ------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    naf = build("dsf", 3, randomized=False)
    good = np.zeros([2, 3], np.float32)
    with pytest.raises(ValueError, match="last axis of `x` must have size 3"):
        naf.forward(np.zeros([2, 4], np.float32))
    with pytest.raises(ValueError, match="last axis of `y` must have size 3"):
        naf.inverse(np.zeros([2, 2], np.float32))
    with pytest.raises(ValueError, match="scalar"):
        naf.forward(np.float32(1.0))
    with pytest.raises(ValueError, match="scalar"):
        naf.inverse(np.float32(1.0))
    with pytest.raises((TypeError, ValueError), match="float32.*float64|float64.*float32"):
        naf.forward(tf.zeros([2, 3], tf.float64))
    with pytest.raises((TypeError, ValueError), match="float32.*float64|float64.*float32"):
        naf.inverse(tf.zeros([2, 3], tf.float64))
    with pytest.raises(ValueError, match="not conditional"):
        naf.forward(good, conditional_input=np.zeros([2, 2], np.float32))
    with pytest.raises(ValueError, match="`event_shape` is required"):
        NeuralAutoregressiveFlow(hidden_units=[8])
    with pytest.raises(ValueError, match="Unknown transformer"):
        NeuralAutoregressiveFlow(event_shape=[2], transformer="spline")

    cnaf = build("dsf-cond", 3, randomized=False)
    with pytest.raises(ValueError, match="conditional: pass `conditional_input=`"):
        cnaf.forward(good)
    with pytest.raises(ValueError, match="conditional: pass `conditional_input=`"):
        cnaf.inverse(good)
    flow = tfd.TransformedDistribution(base(3, tf.float32), tfb.Invert(cnaf))
    with pytest.raises(ValueError, match="conditional: pass `conditional_input=`"):
        flow.log_prob(good)
    with pytest.raises(ValueError, match=f"`conditional_input` must have size {COND_SIZE}"):
        cnaf.forward(good, conditional_input=np.zeros([2, 5], np.float32))
    with pytest.raises(ValueError, match=f"`conditional_input` must have size {COND_SIZE}"):
        cnaf.inverse(good, conditional_input=np.zeros([2, 1], np.float32))
    with pytest.raises(TypeError, match="`conditional_input` must have dtype float32"):
        cnaf.forward(good, conditional_input=tf.zeros([2, 2], tf.float64))


def test_nan_input_with_validate_args():
    naf = build("ddsf-cond", 2, validate_args=True)
    x = np.array([[0.1, np.nan]], np.float32)
    c = np.zeros([1, COND_SIZE], np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="`x` must be finite"):
        naf.forward(x, conditional_input=c)
    with pytest.raises(tf.errors.InvalidArgumentError, match="`y` must be finite"):
        naf.inverse(x, conditional_input=c)
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be finite"):
        naf.forward(np.zeros([1, 2], np.float32), conditional_input=c + np.nan)
    # Out of the range of the forward map (DDSF without its linear tail).
    bounded = build("ddsf-cond", 2, validate_args=True, tail_slope=0.0)
    far = np.array([[0.0, 20.0]], np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside the range"):
        bounded.inverse(far, conditional_input=c)
    # Without validate_args the same inverse is finite (clamped to the range).
    lax = build("ddsf-cond", 2, tail_slope=0.0)
    assert np.all(np.isfinite(lax.inverse(far, conditional_input=c).numpy()))
    # With the default tail, every finite value has an exact preimage.
    x_far = naf.inverse(far, conditional_input=c)
    np.testing.assert_allclose(naf.forward(tf.identity(x_far), conditional_input=c), far, atol=1e-3)
