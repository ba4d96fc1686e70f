"""tfp_naf.conditioners: the per-dimension head used by the inverse."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from conftest import randomize

from tfp_naf import NeuralAutoregressiveFlow, activations, conditioners

tfb = tfp.bijectors

D = 4


def flow(hidden_units, conditional, context_units, dtype=tf.float64):
    naf = NeuralAutoregressiveFlow(
        event_shape=[D],
        hidden_units=hidden_units,
        num_units=3,
        conditional_event_shape=[2] if conditional else None,
        context_units=context_units,
        input_order="random",
        dtype=dtype,
    )
    return randomize(naf, scale=0.5)


CASES = [
    ([16, 8], False, None),
    ([], False, None),
    ([16], True, None),
    ([16], False, 5),
    ([8, 8], True, 3),
]


@pytest.mark.parametrize("hidden_units, conditional, context_units", CASES)
def test_dimension_head_equals_the_full_conditioners_slice(
    hidden_units, conditional, context_units
):
    naf = flow(hidden_units, conditional, context_units)
    head = conditioners.dimension_head(naf.conditioner)
    assert head is not None
    x = tf.random.normal([7, D], dtype=tf.float64)
    c = tf.random.normal([7, 2], dtype=tf.float64) if conditional else None
    full = naf.conditioner(x, **({"conditional_input": c} if conditional else {}))
    for d in range(D):
        np.testing.assert_allclose(head(x, tf.constant(d), c), full[:, d], rtol=1e-12, atol=1e-12)
    # Gradients reach the same variables, as dense tensors.
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(head(x, tf.constant(D - 1), c) ** 2)
    grads = tape.gradient(loss, naf.trainable_variables)
    assert all(isinstance(g, tf.Tensor) for g in grads if g is not None)


@pytest.mark.parametrize("hidden_units, conditional, context_units", CASES)
def test_inverse_by_dimension_matches_full_passes(hidden_units, conditional, context_units):
    naf = flow(hidden_units, conditional, context_units)
    x = tf.random.normal([6, D], dtype=tf.float64)
    c = tf.random.normal([6, 2], dtype=tf.float64)
    ckwargs = {"conditional_input": c} if conditional else {}
    z = naf.forward(x, **ckwargs)
    order = conditioners.solve_order(naf.conditioner)
    head = conditioners.dimension_head(naf.conditioner)
    by_dimension = naf._inverse_by_dimension(z, ckwargs, order, head)
    by_full_passes = naf._inverse_by_full_passes(z, ckwargs, order)
    np.testing.assert_allclose(by_dimension, by_full_passes, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(naf.inverse(tf.identity(z), **ckwargs), x, atol=1e-9)


def test_other_conditioners_have_no_head():
    class Wrapped(tf.Module):
        def __init__(self, made):
            super().__init__()
            self.made = made

        def __call__(self, x):
            return self.made(x)

    made = tfb.AutoregressiveNetwork(params=9, event_shape=[D], hidden_units=[8])
    made.build((None, D))
    assert conditioners.dimension_head(Wrapped(made)) is None
    assert conditioners.dimension_head(made) is not None


def _check_incremental_head(conditioner, head, c=None):
    # Along the inverse's passes (inputs not yet solved are 0), the carried
    # state gives exactly the full conditioner's slice.
    ckwargs = {} if c is None else {"conditional_input": c}
    x_true = tf.random.normal([5, D], dtype=tf.float64)
    x = tf.zeros_like(x_true)
    state = head.start(x, c)
    for d in conditioners.solve_order(conditioner):
        full = conditioner(x, **ckwargs)
        np.testing.assert_allclose(head.params(state, tf.constant(d)), full[:, d],
                                   rtol=1e-12, atol=1e-12)
        x_d = x_true[:, d]
        x = tf.tensor_scatter_nd_update(
            tf.transpose(x), [[d]], x_d[tf.newaxis])
        x = tf.transpose(x)
        state = head.update(state, tf.constant(d), x_d)
    tf.nest.map_structure(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12),
        state, head.start(x_true, c))
    # Gradients reach every variable of the conditioner (the conditional
    # input's weights too) as dense tensors.
    with tf.GradientTape() as tape:
        state = head.update(head.start(tf.zeros_like(x_true), c), tf.constant(0), x_true[:, 0])
        loss = tf.reduce_sum(head.params(state, tf.constant(D - 1)) ** 2)
    grads = tape.gradient(loss, conditioner.trainable_variables)
    assert all(isinstance(g, tf.Tensor) for g in grads)


@pytest.mark.parametrize("hidden_units, conditional, context_units", CASES)
def test_incremental_head_follows_the_inverse_passes(hidden_units, conditional, context_units):
    naf = flow(hidden_units, conditional, context_units)
    head = conditioners.incremental_head(naf.conditioner)
    if not hidden_units:
        assert head is None
        return
    assert head is not None
    c = tf.random.normal([5, 2], dtype=tf.float64) if conditional else None
    _check_incremental_head(naf.conditioner, head, c)


@pytest.mark.parametrize("conditional_layers, activation",
                         [("first_layer", "relu"), ("all_layers", "relu"),
                          ("all_layers", "soft_relu")])
def test_incremental_head_of_a_conditional_made(conditional_layers, activation):
    act = activations.resolve(activation, tf.float64)
    made = tfb.AutoregressiveNetwork(
        params=3, event_shape=[D], conditional=True, conditional_event_shape=[2],
        conditional_input_layers=conditional_layers, hidden_units=[8, 6], activation=act,
        input_order="random", bias_initializer="glorot_uniform", dtype=tf.float64)
    made(tf.zeros([1, D], tf.float64), conditional_input=tf.zeros([1, 2], tf.float64))
    if activation == "soft_relu":
        act.log_softness_offset.assign(2.0)  # Softness 0.37: far from a ReLU.
    conditioners.match_dtype(made)  # As the flow does with a MADE it is given.
    head = conditioners.incremental_head(made)
    assert head is not None
    _check_incremental_head(made, head, tf.random.normal([5, 2], dtype=tf.float64))
    with pytest.raises(ValueError, match="conditional"):
        head.start(tf.zeros([5, D], tf.float64))


def test_cached_incremental_head_serves_every_graph():
    # The head is cached per conditioner; an inverse traced in one
    # `tf.function`, then in another and eagerly, must not reuse the first
    # graph's tensors.
    naf = flow([16, 8], False, None)
    z = naf.forward(tf.random.normal([6, D], dtype=tf.float64)).numpy()
    first = tf.function(lambda z: naf.inverse(z))(tf.constant(z))
    second = tf.function(lambda z: naf.inverse(z))(tf.constant(z))
    eager = naf.inverse(tf.constant(z))
    np.testing.assert_allclose(second, first, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(eager, first, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("conditional", [False, True])
def test_incremental_head_of_deep_made_with_random_degrees(conditional):
    # Three hidden layers, hidden units' degrees drawn at random (several units
    # become ready at one pass, some at none) and narrower than D: each unit is
    # computed once, when it becomes ready, and the outputs stay exact.
    made = tfb.AutoregressiveNetwork(
        params=2, event_shape=[D], conditional=conditional,
        conditional_event_shape=[2] if conditional else None, hidden_units=[7, 3, 5],
        activation="tanh", input_order="random", hidden_degrees="random",
        bias_initializer="glorot_uniform", dtype=tf.float64)
    c = tf.random.normal([5, 2], dtype=tf.float64) if conditional else None
    made(tf.zeros([1, D], tf.float64),
         **({} if c is None else {"conditional_input": tf.zeros([1, 2], tf.float64)}))
    conditioners.match_dtype(made)
    head = conditioners.incremental_head(made)
    assert head is not None
    _check_incremental_head(made, head, c)


@pytest.mark.parametrize("hidden_units, conditional, context_units",
                         [([16, 8], False, None), ([8, 8], False, 3), ([16], True, None),
                          ([8, 8], True, 3)])
def test_inverse_incrementally_matches_full_passes(hidden_units, conditional, context_units):
    naf = flow(hidden_units, conditional, context_units)
    c = tf.random.normal([6, 2], dtype=tf.float64) if conditional else None
    ckwargs = {} if c is None else {"conditional_input": c}
    z = naf.forward(tf.random.normal([6, D], dtype=tf.float64), **ckwargs)
    order = conditioners.solve_order(naf.conditioner)
    head = conditioners.incremental_head(naf.conditioner)
    incremental = naf._inverse_incrementally(z, order, head, c)
    np.testing.assert_allclose(incremental, naf._inverse_by_full_passes(z, ckwargs, order),
                               rtol=1e-10, atol=1e-10)
    # The public inverse takes this path and agrees too.
    np.testing.assert_allclose(naf.inverse(z, **ckwargs), incremental, rtol=1e-10, atol=1e-10)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(z)
        if c is not None:
            tape.watch(c)
        a = naf._inverse_incrementally(z, order, head, c)
        b = naf._inverse_by_full_passes(z, ckwargs, order)
    # A MADE's kernels are masked (zero off the mask, re-masked after every
    # update): their gradients off the mask do not reach the flow, and differ
    # (the full passes see the partial inputs' values there, the carried
    # state earlier ones), so they are compared on the mask.
    masks = _kernel_masks(naf.conditioner)
    for t in [z] + ([] if c is None else [c]) + list(naf.trainable_variables):
        ga, gb = tape.gradient(a, t), tape.gradient(b, t)
        if gb is None:
            continue
        mask = masks.get(t.ref(), 1.0)
        np.testing.assert_allclose(tf.convert_to_tensor(ga) * mask,
                                   tf.convert_to_tensor(gb) * mask, rtol=1e-8, atol=1e-10)


def _kernel_masks(conditioner) -> dict:
    """`{kernel.ref(): mask}` of the masked Dense layers of a MADE (or a compact network's)."""
    made = getattr(conditioner, "made", conditioner)
    blocks, _ = conditioners._made_layers(made)
    return {dense.kernel.ref(): np.asarray(mask, np.float64)
            for (dense, _), mask in zip(blocks, made._masks, strict=True)}


def _conditional_made(conditional_layers="all_layers", hidden_units=(8, 6)):
    made = tfb.AutoregressiveNetwork(
        params=3, event_shape=[D], conditional=True, conditional_event_shape=[2],
        conditional_input_layers=conditional_layers, hidden_units=list(hidden_units),
        activation="relu", input_order="random", bias_initializer="glorot_uniform",
        dtype=tf.float64)
    made(tf.zeros([1, D], tf.float64), conditional_input=tf.zeros([1, 2], tf.float64))
    conditioners.match_dtype(made)
    return made


@pytest.mark.parametrize("conditional_layers, hidden_units",
                         [("all_layers", (8, 6)), ("first_layer", (8, 6)), ("all_layers", ())])
def test_call_conditioner_equals_the_made_in_values_and_gradients(conditional_layers,
                                                                   hidden_units):
    made = _conditional_made(conditional_layers, hidden_units)
    x = tf.random.normal([5, D], dtype=tf.float64)
    c = tf.random.normal([5, 2], dtype=tf.float64)
    assert conditioners._made_forward(made) is not None
    offset = tf.random.normal([D, 3], dtype=tf.float64)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, c, offset])
        ours = conditioners.call_conditioner(made, x, c)
        theirs = made(x, conditional_input=c)
        ours_offset = conditioners.call_conditioner(made, x, c, offset=offset)
        ours_loss, theirs_loss, offset_loss = (
            tf.reduce_sum(tf.sin(t)) for t in (ours, theirs, ours_offset))
        theirs_offset_loss = tf.reduce_sum(tf.sin(theirs + offset))
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours_offset, theirs + offset, rtol=1e-12, atol=1e-12)
    for t in [x, c, *made.trainable_variables]:
        np.testing.assert_allclose(tape.gradient(ours_loss, t), tape.gradient(theirs_loss, t),
                                   rtol=1e-10, atol=1e-12)
    for t in [x, c, offset, *made.trainable_variables]:
        np.testing.assert_allclose(tape.gradient(offset_loss, t),
                                   tape.gradient(theirs_offset_loss, t), rtol=1e-10, atol=1e-12)
    # A condition broadcast against the batch, as the MADE itself allows.
    np.testing.assert_allclose(conditioners.call_conditioner(made, x, c[:1]),
                               made(x, conditional_input=c[:1]), rtol=1e-12, atol=1e-12)
    # Unconditional calls and unbuilt MADEs go to the conditioner itself.
    unbuilt = tfb.AutoregressiveNetwork(params=3, event_shape=[D], conditional=True,
                                        conditional_event_shape=[2], hidden_units=[4])
    assert conditioners._made_forward(unbuilt) is None


def _assert_offset_is_added(conditioner):
    """`call_conditioner(..., offset=o)` equals `conditioner(x) + o` in values and gradients."""
    x = tf.random.normal([5, D], dtype=tf.float64)
    offset = tf.random.normal([D, 3], dtype=tf.float64)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, offset])
        ours = conditioners.call_conditioner(conditioner, x, offset=offset)
        theirs = conditioner(x) + offset
        ours_loss, theirs_loss = (tf.reduce_sum(tf.sin(t)) for t in (ours, theirs))
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    for t in [x, offset, *conditioner.trainable_variables]:
        np.testing.assert_allclose(tape.gradient(ours_loss, t), tape.gradient(theirs_loss, t),
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("hidden_units", [(8, 6), ()])
def test_offset_joins_the_output_bias_of_an_unconditional_made(hidden_units):
    # The flow's base parameters go into the MADE's output bias: the same values
    # and gradients as adding them to its output, for the MADE and the offset.
    made = tfb.AutoregressiveNetwork(params=3, event_shape=[D], hidden_units=list(hidden_units),
                                     activation="relu", input_order="random",
                                     bias_initializer="glorot_uniform", dtype=tf.float64)
    made.build((None, D))
    conditioners.match_dtype(made)
    assert conditioners._made_forward(made) is not None
    _assert_offset_is_added(made)


def test_offset_joins_the_bias_of_the_compact_head():
    net = conditioners.CompactAutoregressiveNetwork(
        params=3, context_units=2, event_shape=[D], hidden_units=[8], activation="relu",
        dtype=tf.float64)
    net.build((None, D))
    _assert_offset_is_added(net)


def test_conditional_flows_trace_without_graph_rewrite_errors(tmp_path):
    # TensorFlow's oneDNN graph rewrite fails on `MatMul, BiasAdd, Add, Relu`
    # (a conditional MADE's own layer pattern): it logs errors and leaves the
    # function unoptimised. The flow's conditional paths avoid the pattern.
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    code = textwrap.dedent("""
        import tensorflow as tf
        from tfp_naf import NeuralAutoregressiveFlow
        for context_units in (None, 3):
            naf = NeuralAutoregressiveFlow(event_shape=[4], hidden_units=[8, 8], num_units=3,
                                           conditional_event_shape=[2],
                                           context_units=context_units)
            x, c = tf.random.normal([6, 4]), tf.random.normal([6, 2])

            @tf.function
            def step(x, c):
                with tf.GradientTape() as tape:
                    loss = tf.reduce_sum(naf.forward_log_det_jacobian(x, conditional_input=c))
                return tape.gradient(loss, naf.trainable_variables), naf.inverse(
                    x, conditional_input=c)

            step(x, c)
        print("traced")
    """)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "traced" in result.stdout
    for message in ("remapper failed", "empty op name", "does not specify an operation"):
        assert message not in result.stderr, result.stderr[-2000:]


def _hidden_and_output_denses(made):
    import tf_keras

    made = getattr(made, "made", made)
    output = {id(d) for d in conditioners._output_denses(made._network)}
    dense = [layer for layer in made._network.layers if isinstance(layer, tf_keras.layers.Dense)]
    return ([d for d in dense if id(d) not in output and d.bias is not None],
            [d for d in dense if id(d) in output])


@pytest.mark.parametrize("conditional, context_units", [(False, None), (True, None),
                                                        (False, 4)])
def test_flow_built_mades_spread_their_first_hidden_biases(conditional, context_units,
                                                           monkeypatch):
    """With a scale > 0 the first hidden layer's biases are drawn within `scale / sqrt(fan_in)`,
    so its ReLU kinks do not all sit at the origin; later hidden layers keep Keras' zeros, and
    the output layer and the conditional layers are left alone."""
    name = "CONDITIONAL_HIDDEN_BIAS_SCALE" if conditional else "HIDDEN_BIAS_SCALE"
    monkeypatch.setattr(conditioners, name, 1.0)
    monkeypatch.setattr(conditioners, "HIDDEN_BIAS_FRACTION", 0.5)
    kwargs = dict(conditional_event_shape=[3]) if conditional else {}
    naf = NeuralAutoregressiveFlow(event_shape=[2], hidden_units=[32, 32], num_units=4,
                                   context_units=context_units, **kwargs)
    hidden, output = _hidden_and_output_denses(naf.conditioner)
    assert len(hidden) == 2
    first, second = hidden
    bias = first.bias.numpy()
    bound = 1.0 / np.sqrt(first.kernel.shape[0])
    # Every other unit (a fraction of 1/2) is spread, the others keep zero.
    spread = bias[1::2]
    assert np.all(np.abs(bias) <= bound) and np.std(spread) > 0.2 * bound
    assert np.all(spread != 0.0) and np.all(bias[0::2] == 0.0)
    assert np.all(second.bias.numpy() == 0.0)
    # The units fed by x_1 (the only input seen) have their kinks spread out along it.
    w, b = first.kernel.numpy()[0, 1::2], spread
    kinks = -b[w != 0] / w[w != 0]
    assert np.std(kinks) > 0.1
    if context_units is None:  # The output layer keeps its own scaled start.
        bias = conditioners._biased_output_layer(output).bias.numpy()
        assert np.all(np.isfinite(bias))


def test_conditional_and_unconditional_scales_are_separate(monkeypatch):
    """Each kind of flow reads its own scale: zero for one keeps every hidden bias at zero."""
    monkeypatch.setattr(conditioners, "HIDDEN_BIAS_SCALE", 1.0)
    monkeypatch.setattr(conditioners, "CONDITIONAL_HIDDEN_BIAS_SCALE", 0.0)
    conditional = NeuralAutoregressiveFlow(event_shape=[2], hidden_units=[8], num_units=4,
                                           conditional_event_shape=[3])
    hidden, _ = _hidden_and_output_denses(conditional.conditioner)
    assert hidden and all(np.all(layer.bias.numpy() == 0.0) for layer in hidden)
    plain = NeuralAutoregressiveFlow(event_shape=[2], hidden_units=[8], num_units=4)
    hidden, _ = _hidden_and_output_denses(plain.conditioner)
    assert np.any(hidden[0].bias.numpy() != 0.0)


def test_hidden_bias_scale_zero_keeps_keras_zeros(monkeypatch):
    monkeypatch.setattr(conditioners, "HIDDEN_BIAS_SCALE", 0.0)
    naf = NeuralAutoregressiveFlow(event_shape=[3], hidden_units=[8], num_units=4)
    hidden, _ = _hidden_and_output_denses(naf.conditioner)
    assert hidden and all(np.all(layer.bias.numpy() == 0.0) for layer in hidden)


def test_spread_hidden_biases_keeps_the_autoregressive_structure():
    """theta_i depends on x only through x_<i after the biases are drawn (large scale)."""
    made = tfp.bijectors.AutoregressiveNetwork(params=2, event_shape=[4], hidden_units=[16, 16])
    made.build((None, 4))
    conditioners.spread_hidden_biases(made, scale=5.0, seed=3)
    x = tf.constant(np.random.default_rng(0).normal(size=[5, 4]), tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        theta = made(x)
    for i in range(4):
        grad = tape.gradient(theta[:, i], x)
        grad = np.zeros([5, 4]) if grad is None else grad.numpy()
        assert np.all(grad[:, i:] == 0.0)
    with pytest.raises(ValueError, match="scale"):
        conditioners.spread_hidden_biases(made, scale=-1.0)
    with pytest.raises(ValueError, match="fraction"):
        conditioners.spread_hidden_biases(made, fraction=1.5)


@pytest.mark.parametrize("fraction, expected", [(0.0, 0), (0.25, 4), (0.5, 8), (1.0, 16)])
def test_spread_fraction_interleaves_the_units(fraction, expected):
    """`fraction` of the first layer's units are spread, spaced evenly over its units (whose
    MADE degrees are sorted), whatever the draw; the other layers keep zeros."""
    made = tfp.bijectors.AutoregressiveNetwork(params=2, event_shape=[5], hidden_units=[16, 16])
    made.build((None, 5))
    conditioners.spread_hidden_biases(made, scale=1.0, seed=0, fraction=fraction)
    first, second = _hidden_and_output_denses(made)[0]
    spread = np.flatnonzero(first.bias.numpy())
    assert len(spread) == expected
    if expected > 1:  # Evenly spaced: the gaps differ by at most one unit.
        assert np.ptp(np.diff(spread)) <= 1 and spread[-1] == 15
    assert np.all(second.bias.numpy() == 0.0)
