"""The flows compared by the benchmarks, all built the same way.

Every model is a chain of `num_flows` autoregressive layers with a reversal
(`tfb.Permute`) between consecutive layers, on a standard-normal base, with
a MADE conditioner of the given hidden units (NAFs: the library's default
activation, the learned-softness ReLU of unconditional flows; MAF and the
spline flow: ReLU):

* "naf-dsf", "naf-ddsf": `tfp_naf.NeuralAutoregressiveFlow` (forward maps data
  to noise, so the distribution uses `tfb.Invert` of the chain);
* "naf-dsf-ctx<C>", "naf-ddsf-ctx<C>": the same with the compact conditioner
  (`context_units=C`);
* "naf-ddsf-shared", "naf-ddsf-shared-ctx<C>": DDSF with shared, learned mixing
  matrices (`transformer="ddsf-shared"`, the original NAF code's form), with
  the full or the compact conditioner;
* any of these with `-relu` appended ("naf-dsf-relu"): ReLU hidden units;
* "maf": TFP's affine `tfb.MaskedAutoregressiveFlow` with
  `tfb.AutoregressiveNetwork(params=2)`, output layer scaled by 1e-2 (near-identity start);
* "rqs": `tfb.MaskedAutoregressiveFlow` whose `bijector_fn` builds a
  `tfb.RationalQuadraticSpline` (8 bins on `[-B, B]`, identity tails) from a
  MADE output.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

import tfp_naf
from tfp_naf.conditioners import shrink_output_layer

tfb, tfd = tfp.bijectors, tfp.distributions

__all__ = ["MODELS", "NAF_KWARGS", "build_flow", "conditional_kwargs", "conditioners_of", "perturb"]

MODELS = ("naf-dsf", "naf-ddsf", "maf", "rqs")
SPLINE_BINS = 8
SPLINE_BOUND = 5.0
_MIN_BIN = 1e-3
_MIN_SLOPE = 1e-3


class _SplineFn(tf.Module):
    """`bijector_fn` of an autoregressive rational-quadratic spline layer."""

    def __init__(self, event_size: int, hidden_units: Sequence[int], bins: int, bound: float):
        super().__init__()
        self._bins, self._bound = bins, bound
        self.made = tfb.AutoregressiveNetwork(
            params=3 * bins - 1, event_shape=[event_size], hidden_units=list(hidden_units),
            activation="relu",  # AutoregressiveNetwork's default (None) is a linear MADE.
        )

    def _sizes(self, logits):
        b = self._bins
        return tf.math.softmax(logits, axis=-1) * (2 * self._bound - b * _MIN_BIN) + _MIN_BIN

    def __call__(self, x, **kwargs):
        del kwargs
        p = self.made(x)
        b = self._bins
        return tfb.RationalQuadraticSpline(
            bin_widths=self._sizes(p[..., :b]),
            bin_heights=self._sizes(p[..., b : 2 * b]),
            knot_slopes=tf.math.softplus(p[..., 2 * b :]) + _MIN_SLOPE,
            range_min=-self._bound,
        )


# MAF's MADE output layer is scaled by this at the start (fixed, not the NAF default).
MAF_OUTPUT_SCALE = 1e-2
# Extra keyword arguments for every NAF built here (diagnostics set them).
NAF_KWARGS: dict = {}

def _layer(model: str, event_size: int, hidden_units, num_units: int, dtype,
           conditional_size: "int | None" = None, name: str = "naf"):
    """One autoregressive layer and its conditioner."""
    match = re.fullmatch(r"naf-(dsf|ddsf|ddsf-shared)(?:-ctx(\d+))?(-relu)?", model)
    if match:
        # `-relu`: ReLU hidden units instead of the default (the learned-softness ReLU).
        relu = {"activation": "relu"} if match.group(3) else {}
        naf = tfp_naf.NeuralAutoregressiveFlow(
            event_shape=[event_size],
            hidden_units=list(hidden_units),
            transformer=match.group(1),
            num_units=num_units,
            context_units=int(match.group(2)) if match.group(2) else None,
            conditional_event_shape=None if conditional_size is None else [conditional_size],
            dtype=dtype,
            name=name,
            **{**NAF_KWARGS, **relu},
        )
        return naf, naf.conditioner
    if conditional_size is not None:
        raise ValueError(f"Model {model!r} has no conditional variant here.")
    if model == "maf":
        made = tfb.AutoregressiveNetwork(
            params=2, event_shape=[event_size], hidden_units=list(hidden_units),
            activation="relu", dtype=dtype,
        )
        # Start near the identity, as the NAF does: with a full-size random output
        # layer the 5 unbounded affine layers overflow on 43-d data (NaN at once).
        made.build((None, event_size))
        shrink_output_layer(made, scale=MAF_OUTPUT_SCALE)
        return tfb.MaskedAutoregressiveFlow(shift_and_log_scale_fn=made), made
    if model == "rqs":
        fn = _SplineFn(event_size, hidden_units, SPLINE_BINS, SPLINE_BOUND)
        return tfb.MaskedAutoregressiveFlow(bijector_fn=fn), fn.made
    raise ValueError(
        f"Unknown model {model!r}; expected one of {MODELS} or naf-*[-ctx<C>][-relu].")


def build_flow(
    model: str,
    event_size: int,
    hidden_units: Sequence[int],
    num_flows: int = 5,
    num_units: int = 16,
    dtype=tf.float32,
    conditional_size: "int | None" = None,
):
    """`(distribution, to_noise, conditioners)` for the named model.

    `distribution` is a `tfd.TransformedDistribution` over `[event_size]`;
    `to_noise` is the bijector mapping data to noise (log_prob is one pass of
    it); `conditioners` are the layers' MADEs, in data-to-noise order. With
    `conditional_size` (NAF models only) the NAFs are named `naf_0`, `naf_1`,
    ... and take `bijector_kwargs=conditional_kwargs(num_flows, c)`.
    """
    layers, conds = [], []
    reverse = tfb.Permute(list(reversed(range(event_size))))
    for i in range(num_flows):
        layer, cond = _layer(model, event_size, hidden_units, num_units, dtype,
                             conditional_size, name=f"naf_{i}")
        if i:
            layers.append(reverse)
        layers.append(layer)
        conds.append(cond)
    # `layers` is in data -> noise order for NAF; MAF layers map noise -> data.
    base = tfd.Sample(tfd.Normal(tf.constant(0.0, dtype), 1.0), [event_size])
    if model.startswith("naf"):
        to_noise = tfb.Chain(list(reversed(layers)))
        dist = tfd.TransformedDistribution(base, tfb.Invert(to_noise))
    else:
        to_data = tfb.Chain(layers)
        to_noise = tfb.Invert(to_data)
        dist = tfd.TransformedDistribution(base, to_data)
    # MAF/RQS MADEs are built lazily: one call builds them.
    if conditional_size is None:
        dist.log_prob(tf.zeros([1, event_size], dtype))
    return dist, to_noise, conds


def conditional_kwargs(num_flows: int, c) -> dict:
    """`bijector_kwargs` passing the condition `c` to every NAF of a conditional `build_flow`."""
    return {f"naf_{i}": {"conditional_input": c} for i in range(num_flows)}


def conditioners_of(conds):
    return list(conds)


def perturb(conds, scale: float = 0.3, seed: int = 0) -> None:
    """Moves every conditioner weight randomly, keeping the MADE masks.

    A freshly built NAF is the identity; speed and round-trip measurements
    need a generic flow. Masked kernels are re-masked through their
    constraint (never assign random values to MADE kernels directly).
    """
    gen = tf.random.Generator.from_seed(seed)
    for cond in conds:
        for layer in cond.submodules:
            if not isinstance(layer, tf_keras.layers.Layer):
                continue
            for w in layer._trainable_weights:
                new = w + tf.cast(scale, w.dtype) * gen.normal(w.shape, dtype=w.dtype)
                constraint = (
                    getattr(layer, "kernel_constraint", None)
                    if w is getattr(layer, "kernel", None)
                    else None
                )
                w.assign(constraint(new) if constraint is not None else new)
