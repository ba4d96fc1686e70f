"""The neural autoregressive flow bijector."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.internal import assert_util
from tensorflow_probability.python.internal import prefer_static as ps

from tfp_naf import activations, conditioners
from tfp_naf.shared_mixing import SharedDenseSigmoidalFlow
from tfp_naf.transformers import (
    DEFAULT_CLIP,
    DEFAULT_MIN_SLOPE,
    DeepDenseSigmoidalFlow,
    DeepSigmoidalFlow,
)

# The transformers a flow accepts by name (`transformer=`).
TRANSFORMERS = {
    "dsf": DeepSigmoidalFlow,
    "ddsf": DeepDenseSigmoidalFlow,
    "ddsf-shared": SharedDenseSigmoidalFlow,
}

# Initial spread of the built conditioner's sigmoid centres (see `initial_spread`),
# chosen on validation data (benchmarks/README.md).
DEFAULT_INITIAL_SPREAD = 2.0
# The same for the first dimension in the autoregressive order, whose conditioner
# sees no `x` (see `first_spread`), chosen on validation data (benchmarks/README.md).
DEFAULT_FIRST_SPREAD = 3.0
# Learning-rate factor of the built conditioner's unconditioned base parameters
# (see `base_rate`), chosen on validation data (benchmarks/README.md).
DEFAULT_BASE_RATE = 10.0

tfb = tfp.bijectors

__all__ = ["NeuralAutoregressiveFlow"]


def _transformer_class(transformer):
    if isinstance(transformer, str):
        key = transformer.lower()
        if key not in TRANSFORMERS:
            raise ValueError(
                f"Unknown transformer {transformer!r}; expected one of "
                f"{sorted(TRANSFORMERS)} or a transformer class."
            )
        return TRANSFORMERS[key]
    if isinstance(transformer, type) and hasattr(transformer, "num_params"):
        return transformer
    raise TypeError(f"`transformer` must be a name or a class; got {transformer!r}.")


def _difference(first, initial, size) -> "np.ndarray | None":
    """`first - initial` (None standing for zeros), or None where it is 0."""
    if first is None and initial is None:
        return None
    delta = (np.zeros(size) if first is None else first) - (
        np.zeros(size) if initial is None else initial)
    return delta if np.any(delta) else None


def _as_shape(shape) -> "list[int] | None":
    if shape is None:
        return None
    return [int(s) for s in np.atleast_1d(shape)]


class NeuralAutoregressiveFlow(tfb.Bijector):
    """Neural autoregressive flow (NAF) of Huang, Krueger, Lacoste & Courville (2018).

    An autoregressive bijector whose per-dimension transform is a small
    monotone neural network (a *transformer*), with parameters emitted by a
    MADE *conditioner*:

    ```none
    z_i = g(x_i; theta_i),    theta = conditioner(x, c) + r beta  (theta_i sees x_<i)
    log |det dz/dx| = sum_i log g'(x_i; theta_i)
    ```

    The Jacobian is triangular, so the log-determinant is the closed-form sum
    of the transformer's log-derivatives: one parallel conditioner pass gives
    `forward` and `forward_log_det_jacobian` together (the latter is cached,
    not recomputed). `g` is a `DeepSigmoidalFlow` ("dsf") or a
    `DeepDenseSigmoidalFlow` ("ddsf") or a `SharedDenseSigmoidalFlow`
    ("ddsf-shared": DDSF whose mixing matrices are learned variables of this
    bijector shared by all dimensions and batch members, the original NAF
    code's parameterisation; its conditioner emits 112 instead of 592
    outputs per dimension at 16 units and 2 layers).

    `inverse` has no closed form. It takes `D` sequential conditioner passes:
    pass `k` solves dimension `order[k]` by bracketed, safeguarded Newton
    iterations (see `tfp_naf.root_finding`), all batch members at once, inside
    a `tf.while_loop`. For a MADE conditioner (`tfb.AutoregressiveNetwork` or
    `CompactAutoregressiveNetwork`) pass `k` runs the hidden layers but only
    dimension `order[k]`'s slice of the output layer, so a pass costs about
    what one of TFP's affine MAF passes costs; one last parallel pass gives the
    log-det. Its gradients come from the implicit function theorem, never
    from the iterations. The forward map's range is bounded (each `z_i`
    lies in `(-L, L)`, `L = logit(1 - clip / 2)`, about 14.5 by default):
    `z_i` outside the range of its transformer is clamped to just inside it,
    giving a large finite `x_i` (with `validate_args=True`, an error). DDSF
    adds a small linear tail by default (`tail_slope`), making its range the
    whole real line.

    Direction: `forward` maps data to noise. For density estimation use
    `tfd.TransformedDistribution(base, tfb.Invert(naf))` (log_prob is one
    parallel pass); for sampling-first uses such as variational posteriors use
    `tfd.TransformedDistribution(base, naf)`.

    #### Examples

    ```python
    import numpy as np
    import tensorflow_probability as tfp
    import tfp_naf

    tfb, tfd = tfp.bijectors, tfp.distributions
    naf = tfp_naf.NeuralAutoregressiveFlow(
        event_shape=[2], hidden_units=[32, 32], transformer="dsf", num_units=8)
    flow = tfd.TransformedDistribution(
        tfd.Sample(tfd.Normal(0., 1.), [2]), tfb.Invert(naf))
    x = np.random.randn(16, 2).astype("float32")
    flow.log_prob(x)        # [16]
    flow.sample(4)          # [4, 2]

    # Conditional density p(x | c), with c of size 3:
    cnaf = tfp_naf.NeuralAutoregressiveFlow(
        event_shape=[2], hidden_units=[32], conditional_event_shape=[3])
    cflow = tfd.TransformedDistribution(
        tfd.Sample(tfd.Normal(0., 1.), [2]), tfb.Invert(cnaf))
    c = np.random.randn(16, 3).astype("float32")
    cflow.log_prob(x, bijector_kwargs={"conditional_input": c})
    ```
    """

    def __init__(
        self,
        conditioner: "tf.Module | None" = None,
        *,
        event_shape: "Sequence[int] | int | None" = None,
        hidden_units: "Sequence[int] | None" = None,
        transformer: "str | type" = "dsf",
        num_units: int = 16,
        num_layers: int = 2,
        activation=None,
        input_order: "str | Sequence[int]" = "left-to-right",
        hidden_degrees: str = "equal",
        conditional_event_shape: "Sequence[int] | int | None" = None,
        conditional_input_layers: str = "all_layers",
        context_units: "int | None" = None,
        initial_spread: "float | None" = None,
        first_spread: "float | None" = None,
        base_rate: "float | None" = None,
        clip: float = DEFAULT_CLIP,
        min_slope: float = DEFAULT_MIN_SLOPE,
        tail_slope: "float | None" = None,
        tolerance: "float | None" = None,
        max_iterations: int = 100,
        dtype=tf.float32,
        validate_args: bool = False,
        name: str = "neural_autoregressive_flow",
    ):
        """Builds a neural autoregressive flow.

        Args:
          conditioner: a `tfb.AutoregressiveNetwork` (or
            `CompactAutoregressiveNetwork`) whose `params` equals
            `conditioner_params(transformer, num_units, num_layers)`. When None,
            one is built from `event_shape`, `hidden_units` and the MADE options
            below, with its output layer scaled (by
            `conditioners.OUTPUT_INIT_SCALE`, 0.3, times a Glorot
            initialisation) and offset to the transformer's
            `initial_params(spread=initial_spread)`, so its transformer units
            start distinct; the scale was chosen on validation data.
          event_shape: `[D]`, required when building the conditioner.
          hidden_units: hidden layer widths of the built MADE.
          transformer: "dsf", "ddsf", "ddsf-shared", or a transformer class.
          num_units: `K`, sigmoids per transformer layer.
          num_layers: layers of the DDSF transformer (ignored for DSF).
          activation: the built MADE's hidden activation. `"soft_relu"` gives
            it one `tfp_naf.activations.SoftReLU`, a ReLU whose softness is
            learned (from 0.05, shared by its hidden layers); otherwise as for
            `tfb.AutoregressiveNetwork` (`"relu"`, a callable, ...). None
            means `"soft_relu"` for an unconditional flow and `"relu"` for a
            conditional one (`activations.default_activation`, each chosen on
            validation data, benchmarks/README.md).
          input_order, hidden_degrees, conditional_event_shape,
            conditional_input_layers: as for `tfb.AutoregressiveNetwork`. A
            flow with `conditional_event_shape` is conditional: every call needs
            `conditional_input=`.
          context_units: when set, the built conditioner is a
            `CompactAutoregressiveNetwork` emitting this many context features
            per dimension, mapped to the transformer's parameters by a shared
            layer.
          initial_spread: the built conditioner starts near the transformer's
            `initial_params(spread=initial_spread)`: the first layer's sigmoid
            centres spread over `[-initial_spread, initial_spread]` (in
            standardised units), so the units start distinct and spread out
            rather than stacked at 0. 0 starts every flow near the identity.
            None means `DEFAULT_INITIAL_SPREAD` (2), chosen on validation data
            (benchmarks/README.md). Ignored for a conditioner you pass in.
          first_spread: the same for the first dimension in the autoregressive
            order. Its conditioner sees no `x`, so its transformer is one fixed
            map of the whole marginal, which a wider start covers sooner. None
            means `DEFAULT_FIRST_SPREAD` (3, chosen on validation data) when
            `initial_spread` is None, and `initial_spread` otherwise.
          base_rate: `r >= 0`. The flow also learns unconditioned base
            parameters `beta` (`[D, P]`, starting at 0) and uses
            `theta = conditioner(x, c) + r * beta`. Under Adam-like optimisers
            each variable moves about one learning rate per step, so the
            per-dimension offsets of `theta` (held by the MADE's output bias
            alone, which is all the first dimension has) learn about `1 + r`
            times faster while the conditioned part is unchanged. (Plain SGD
            moves them `1 + r^2` times faster: with SGD use a smaller rate, or
            0.) None means `DEFAULT_BASE_RATE` (10, chosen on validation
            data, benchmarks/README.md) for a built unconditional conditioner,
            and 0 (no base parameters) for a conditional one, whose offsets
            are conditioned on `c` through full weight rows (validation
            favoured 0 there), and for a conditioner you pass in.
          clip, min_slope: transformer options (see `DeepSigmoidalFlow`).
          tail_slope: slope of the transformer's linear tail; None keeps the
            transformer's default (0 for DSF, 1e-3 for DDSF, whose range would
            otherwise depend on the parameters).
          tolerance, max_iterations: inverse search options.
          dtype: dtype of the built conditioner (float32 or float64).
          validate_args: check inputs are finite, and inverse inputs in range.
          name: name scope.

        Raises:
          ValueError: for a conditioner with the wrong number of outputs, a
            missing `event_shape`, or inconsistent shapes.
        """
        parameters = dict(locals())
        with tf.name_scope(name) as name:
            transformer_cls = _transformer_class(transformer)
            num_layers = 1 if transformer_cls is TRANSFORMERS["dsf"] else int(num_layers)
            num_params = transformer_cls.num_params(int(num_units), num_layers)
            event_shape = _as_shape(event_shape)
            built = conditioner is None
            if built:
                if event_shape is None:
                    raise ValueError(
                        "`event_shape` is required when no `conditioner` is given."
                    )
                initial = self._initial_params(
                    transformer_cls, int(num_units), num_layers, initial_spread)
                first = self._initial_params(
                    transformer_cls, int(num_units), num_layers,
                    self._first_spread(transformer_cls, initial_spread, first_spread),
                    "first_spread")
                conditioner = self._build_conditioner(
                    num_params=num_params,
                    event_shape=event_shape,
                    hidden_units=hidden_units,
                    activation=activation,
                    input_order=input_order,
                    hidden_degrees=hidden_degrees,
                    conditional_event_shape=conditional_event_shape,
                    conditional_input_layers=conditional_input_layers,
                    context_units=context_units,
                    initial_params=initial,
                    dtype=dtype,
                )
                conditioners.add_to_first_offsets(
                    conditioner, _difference(first, initial, num_params))
            else:
                self._check_conditioner(conditioner, num_params, event_shape)
                dtype = conditioner.dtype
                if event_shape is None and getattr(conditioner, "event_shape", None):
                    event_shape = _as_shape(conditioner.event_shape)
                if event_shape is not None and getattr(conditioner, "built", True) is False:
                    conditioner.build((None, event_shape[-1]))
                conditioners.match_dtype(conditioner)
            dtype = tf.as_dtype(dtype)
            if not dtype.is_floating:
                raise TypeError(f"`dtype` must be a floating type; got {dtype}.")
            self._conditioner = conditioner
            self._event_size = None if event_shape is None else int(event_shape[-1])
            self._conditional_size = self._conditioner_conditional_size(conditioner)
            self._num_params = num_params
            self._base_rate, self._base_params = self._make_base(
                base_rate, built and self._conditional_size is None, self._event_size,
                num_params, dtype)
            shared = {}
            if hasattr(transformer_cls, "num_mixing_params"):
                # Shared mixing logits (SharedDenseSigmoidalFlow): learned, not
                # conditioned; small random values so the units start distinct.
                size = transformer_cls.num_mixing_params(int(num_units), num_layers)
                self._mixing_logits = tf.Variable(
                    tf.random.normal([size], stddev=conditioners.OUTPUT_INIT_SCALE,
                                     dtype=dtype), name="mixing_logits")
                shared["mixing_logits"] = self._mixing_logits
            self._transformer = transformer_cls(
                params=tf.zeros([num_params], dtype),
                **shared,
                num_units=num_units,
                **({} if transformer_cls is TRANSFORMERS["dsf"] else {"num_layers": num_layers}),
                clip=clip,
                min_slope=min_slope,
                **({} if tail_slope is None else {"tail_slope": tail_slope}),
                tolerance=tolerance,
                max_iterations=max_iterations,
                validate_args=validate_args,
            )
            super().__init__(
                forward_min_event_ndims=1,
                is_constant_jacobian=False,
                validate_args=validate_args,
                dtype=dtype,
                parameters=parameters,
                name=name,
            )

    # ---- Construction helpers -------------------------------------------

    @staticmethod
    def conditioner_params(
        transformer: "str | type" = "dsf", num_units: int = 16, num_layers: int = 2
    ) -> int:
        """How many conditioner outputs per dimension a transformer needs.

        `num_layers` only matters for "ddsf". For example
        `conditioner_params("dsf", 16) == 48`.
        """
        cls = _transformer_class(transformer)
        return cls.num_params(int(num_units), 1 if cls is TRANSFORMERS["dsf"] else int(num_layers))

    @staticmethod
    def _first_spread(transformer_cls, initial_spread, first_spread):
        """The first dimension's spread: given, or the default rule (see `first_spread`).

        None (start at 0) for a transformer class without `initial_params` by default.
        """
        if first_spread is not None:
            return first_spread
        if initial_spread is not None:
            return initial_spread
        return DEFAULT_FIRST_SPREAD if hasattr(transformer_cls, "initial_params") else None

    @staticmethod
    def _initial_params(transformer_cls, num_units, num_layers, spread,
                        name="initial_spread") -> "np.ndarray | None":
        """The built conditioner's starting point; None where it is 0.

        A transformer class of your own without `initial_params` starts at 0
        by default; asking it for a spread is an error.
        """
        if spread is None:
            if not hasattr(transformer_cls, "initial_params"):
                return None
            spread = DEFAULT_INITIAL_SPREAD
        spread = float(spread)
        if spread == 0.0:
            return None
        if spread < 0.0 or not np.isfinite(spread):
            raise ValueError(f"`{name}` must be finite and >= 0; got {spread}.")
        if not hasattr(transformer_cls, "initial_params"):
            raise ValueError(
                f"{transformer_cls.__name__} has no `initial_params`; pass {name}=0.")
        return transformer_cls.initial_params(num_units, num_layers, spread)

    @staticmethod
    def _build_conditioner(
        num_params,
        event_shape,
        hidden_units,
        activation,
        input_order,
        hidden_degrees,
        conditional_event_shape,
        conditional_input_layers,
        context_units,
        initial_params,
        dtype,
    ):
        if len(event_shape) != 1:
            raise ValueError(f"`event_shape` must be [D]; got {event_shape}.")
        conditional_event_shape = _as_shape(conditional_event_shape)
        options = dict(
            event_shape=event_shape,
            hidden_units=list(hidden_units or []),
            activation=activations.resolve(
                activation, dtype, conditional=conditional_event_shape is not None),
            input_order=input_order,
            hidden_degrees=hidden_degrees,
            conditional=conditional_event_shape is not None,
            conditional_event_shape=conditional_event_shape,
            conditional_input_layers=conditional_input_layers,
            dtype=tf.as_dtype(dtype).name,
        )
        bias_scale = (conditioners.CONDITIONAL_HIDDEN_BIAS_SCALE
                      if conditional_event_shape is not None
                      else conditioners.HIDDEN_BIAS_SCALE)
        if context_units is None:
            made = tfb.AutoregressiveNetwork(params=num_params, **options)
            made.build((None, event_shape[-1]))
            conditioners.match_dtype(made)
            conditioners.shrink_output_layer(made, offset=initial_params)
            conditioners.spread_hidden_biases(made, bias_scale)
            return made
        net = conditioners.CompactAutoregressiveNetwork(
            params=num_params, context_units=context_units, initial_params=initial_params,
            **options
        )
        net.build((None, event_shape[-1]))
        conditioners.spread_hidden_biases(net, bias_scale)
        return net

    @staticmethod
    def _make_base(base_rate, by_default, event_size, num_params, dtype):
        """`(rate, beta)`: the base parameters' factor and variable (None when the rate is 0)."""
        if base_rate is None:
            base_rate = DEFAULT_BASE_RATE if by_default else 0.0
        rate = float(base_rate)
        if not np.isfinite(rate) or rate < 0.0:
            raise ValueError(f"`base_rate` must be finite and >= 0; got {base_rate}.")
        if rate == 0.0:
            return 0.0, None
        if event_size is None:
            raise ValueError(
                "`base_rate` > 0 needs the event size: pass `event_shape` (or a "
                "conditioner with an `event_shape`), or `base_rate=0`.")
        beta = tf.Variable(tf.zeros([event_size, num_params], dtype), name="base_params")
        return rate, beta

    @staticmethod
    def _check_conditioner(conditioner, num_params, event_shape):
        if not callable(conditioner):
            raise TypeError(f"`conditioner` must be callable; got {conditioner!r}.")
        params = getattr(conditioner, "params", None)
        if params is not None and int(params) != num_params:
            raise ValueError(
                f"The conditioner outputs {params} parameters per dimension, but the "
                f"transformer needs {num_params} (see "
                "`NeuralAutoregressiveFlow.conditioner_params`); build it with "
                f"`params={num_params}`."
            )
        own = getattr(conditioner, "event_shape", None)
        if own is not None and event_shape is not None and _as_shape(own) != event_shape:
            raise ValueError(
                f"`event_shape={event_shape}` disagrees with the conditioner's "
                f"event shape {_as_shape(own)}."
            )

    @staticmethod
    def _conditioner_conditional_size(conditioner) -> "int | None":
        made = getattr(conditioner, "made", conditioner)
        if not getattr(made, "_conditional", False):
            return None
        return int(made._conditional_size)

    # ---- Properties ------------------------------------------------------

    @classmethod
    def _parameter_properties(cls, dtype):
        return dict()

    @property
    def conditioner(self):
        """The MADE that maps `x` (and `c`) to pseudo-parameters `[..., D, P]`."""
        return self._conditioner

    @property
    def transformer(self):
        """A transformer bijector holding this flow's transformer options."""
        return self._transformer

    @property
    def num_params(self) -> int:
        """Conditioner outputs per dimension (`P`)."""
        return self._num_params

    @property
    def event_size(self) -> "int | None":
        return self._event_size

    @property
    def base_rate(self) -> float:
        """`r` in `theta = conditioner(x, c) + r * beta` (0: no base parameters)."""
        return self._base_rate

    @property
    def base_params(self) -> "tf.Variable | None":
        """`beta`, the learned unconditioned base parameters `[D, P]`, or None."""
        return self._base_params

    def _base(self, dtype):
        """`r * beta`, `[D, P]`, or None."""
        if self._base_params is None:
            return None
        return tf.constant(self._base_rate, dtype) * self._base_params

    @property
    def conditional(self) -> bool:
        return self._conditional_size is not None

    @property
    def range_limit(self) -> float:
        """`L`: every output of `forward` lies in `(-L, L)`."""
        return self._transformer.range_limit

    # ---- Input checks ----------------------------------------------------

    def _check_event(self, t, what):
        if t.shape.rank is not None and t.shape.rank < 1:
            raise ValueError(f"`{what}` must have at least one axis; got a scalar.")
        size = tf.compat.dimension_value(t.shape[-1]) if t.shape.rank else None
        if self._event_size is None and size is not None:
            self._event_size = size
        if size is not None and size != self._event_size:
            raise ValueError(
                f"{type(self).__name__}: the last axis of `{what}` must have size "
                f"{self._event_size} (the event size); got shape {t.shape}."
            )
        if self.validate_args:
            with tf.control_dependencies(
                [assert_util.assert_equal(
                    tf.reduce_all(tf.math.is_finite(t)), True,
                    message=f"`{what}` must be finite.")]
            ):
                t = tf.identity(t)
        return t

    def _conditioner_kwargs(self, conditional_input):
        if not self.conditional:
            if conditional_input is not None:
                raise ValueError(
                    "This flow is not conditional, but `conditional_input` was given; "
                    "build it with `conditional_event_shape` to condition on inputs."
                )
            return {}
        if conditional_input is None:
            raise ValueError(
                "This flow is conditional: pass `conditional_input=` (directly, or "
                "through TransformedDistribution's `bijector_kwargs`)."
            )
        c = tf.convert_to_tensor(conditional_input, dtype_hint=self.dtype)
        if c.dtype != self.dtype:
            raise TypeError(
                f"`conditional_input` must have dtype {self.dtype.name}; got "
                f"{c.dtype.name}."
            )
        size = tf.compat.dimension_value(c.shape[-1]) if c.shape.rank else None
        if c.shape.rank == 0 or (size is not None and size != self._conditional_size):
            raise ValueError(
                f"The last axis of `conditional_input` must have size "
                f"{self._conditional_size}; got shape {c.shape}."
            )
        if self.validate_args:
            with tf.control_dependencies(
                [assert_util.assert_equal(
                    tf.reduce_all(tf.math.is_finite(c)), True,
                    message="`conditional_input` must be finite.")]
            ):
                c = tf.identity(c)
        return {"conditional_input": c}

    @staticmethod
    def _flat_batch(x, ckwargs):
        """`(x [N, D], ckwargs with c [N, C], batch shape)`, x and c broadcast together.

        The MADE is a Keras layer: it is called on a flat batch (Keras squeezes
        a trailing size-1 axis of rank-3+ inputs, which breaks D = 1).
        """
        event = ps.shape(x)[-1:]
        batch = ps.shape(x)[:-1]
        c = ckwargs.get("conditional_input")
        if c is not None:
            batch = ps.broadcast_shape(batch, ps.shape(c)[:-1])
            c = tf.broadcast_to(c, ps.concat([batch, ps.shape(c)[-1:]], axis=0))
            ckwargs = {"conditional_input": tf.reshape(c, ps.concat([[-1], ps.shape(c)[-1:]], 0))}
        x = tf.broadcast_to(x, ps.concat([batch, event], axis=0))
        return tf.reshape(x, ps.concat([[-1], event], axis=0)), ckwargs, batch

    def _theta(self, x, ckwargs):
        """`theta = conditioner(x, c) + r * beta`, `[..., D, P]`, for any batch shape."""
        base = self._base(x.dtype)
        if x.shape.rank == 2 and "conditional_input" not in ckwargs:
            return conditioners.call_conditioner(self._conditioner, x, offset=base)
        flat_x, flat_ckwargs, batch = self._flat_batch(x, ckwargs)
        theta = conditioners.call_conditioner(self._conditioner, flat_x, offset=base,
                                              **flat_ckwargs)
        return tf.reshape(theta, ps.concat([batch, ps.shape(theta)[-2:]], axis=0))

    def transformer_params(self, x, conditional_input=None) -> tf.Tensor:
        """The transformers' pseudo-parameters at `x`: `theta`, `[..., D, P]`.

        `theta = conditioner(x, c) + base_rate * base_params`; `theta[..., i, :]`
        depends on `x` only through the dimensions before `i` in the
        autoregressive order.
        """
        x = tf.convert_to_tensor(x, dtype_hint=self.dtype)
        x = self._check_event(x, "x")
        return self._theta(x, self._conditioner_kwargs(conditional_input))

    # ---- Forward: one parallel pass -------------------------------------

    def forward_and_log_det(self, x, conditional_input=None):
        """`(z, log|det dz/dx|)` in one conditioner pass (no caching)."""
        x = tf.convert_to_tensor(x, dtype_hint=self.dtype)
        x = self._check_event(x, "x")
        theta = self._theta(x, self._conditioner_kwargs(conditional_input))
        z, log_deriv = self._transformer.forward_and_log_derivative(x, theta)
        return z, tf.reduce_sum(log_deriv, axis=-1)

    def _forward(self, x, **kwargs):
        z, log_det = self.forward_and_log_det(x, **kwargs)
        # The log-det came for free: cache it for forward_log_det_jacobian(x).
        self._cache.forward_attributes(x, **kwargs)["ildj"] = -log_det
        return z

    def _forward_log_det_jacobian(self, x, **kwargs):
        return self.forward_and_log_det(x, **kwargs)[1]

    # ---- Inverse: D sequential passes ------------------------------------

    def _inverse(self, y, **kwargs):
        cache_key = y
        y = self._check_event(y, "y")
        y, ckwargs, batch = self._flat_batch(
            y, self._conditioner_kwargs(kwargs.get("conditional_input"))
        )
        if not getattr(self._conditioner, "built", True):
            self._theta(tf.zeros_like(y), ckwargs)  # Builds the conditioner.
        order = conditioners.solve_order(self._conditioner)
        incremental = head = None
        if order is not None:
            incremental = conditioners.incremental_head(self._conditioner)
        if order is not None and incremental is None:
            head = conditioners.dimension_head(self._conditioner)
        if incremental is not None:
            x = self._inverse_incrementally(y, order, incremental,
                                            ckwargs.get("conditional_input"))
        elif head is not None:
            x = self._inverse_by_dimension(y, ckwargs, order, head)
        else:
            x = self._inverse_by_full_passes(y, ckwargs, order)
        # One parallel pass at the solution gives the log-det.
        log_deriv = self._transformer.forward_and_log_derivative(x, self._theta(x, ckwargs))[1]
        x = tf.reshape(x, ps.concat([batch, [self._event_size]], axis=0))
        log_det = tf.reshape(tf.reduce_sum(log_deriv, axis=-1), batch)
        self._cache.inverse_attributes(cache_key, **kwargs)["ildj"] = -log_det
        return x

    def _sequential_passes(self, y, solve_pass):
        """`x` after `D` passes `x <- solve_pass(k, x)` from `x = 0`, in a `tf.while_loop`."""
        event_size = self._event_size
        _, x = tf.while_loop(
            lambda k, x: k < event_size,
            lambda k, x: (k + 1, solve_pass(k, x)),
            (tf.constant(0), tf.zeros_like(y)),
            maximum_iterations=event_size,
        )
        return x

    def _place(self, x, d, x_d):
        """`x` with column `d` replaced by `x_d`."""
        return tf.where(tf.equal(tf.range(self._event_size), d), x_d[:, tf.newaxis], x)

    def _inverse_by_dimension(self, y, ckwargs, order, head):
        """Pass `k` evaluates only dimension `order[k]`'s parameters and solves it.

        The MADE's hidden layers run at every pass, its output layer only for
        the `P` outputs of one dimension (see `conditioners.dimension_head`):
        `_inverse_incrementally` with `x` itself as the carried state.
        """
        c = ckwargs.get("conditional_input")
        return self._inverse_incrementally(y, order, conditioners.IncrementalHead(
            start=lambda x, conditional_input=None: x,
            params=lambda x, d: head(x, d, c),
            update=self._place,
        ))

    def _inverse_incrementally(self, y, order, head, conditional_input=None):
        """Pass `k` solves dimension `order[k]` from `head`'s state, then updates the state.

        With `conditioners.incremental_head` the state is the MADE's first-layer
        pre-activation, to which each pass adds the solved input's kernel row
        instead of recomputing the first layer (with a conditional MADE, also
        its hidden layers' terms in `conditional_input`, computed once).
        """
        order = tf.constant(order, tf.int32)
        base = self._base(y.dtype)
        x = tf.zeros_like(y)

        def body(k, x, state):
            d = tf.gather(order, k)
            theta_d = head.params(state, d)
            if base is not None:
                theta_d = theta_d + base[d]
            x_d = self._transformer.solve(tf.gather(y, d, axis=-1), theta_d)
            return k + 1, self._place(x, d, x_d), head.update(state, d, x_d)

        _, x, _ = tf.while_loop(
            lambda k, x, state: k < self._event_size,
            body,
            (tf.constant(0), x, head.start(x, conditional_input)),
            maximum_iterations=self._event_size,
        )
        return x

    def _inverse_by_full_passes(self, y, ckwargs, order):
        """Any conditioner: `D` whole conditioner passes, each solving one dimension.

        With an unknown autoregressive order every dimension is solved at
        every pass; after `D` passes the first `k` in the (unknown) order are
        exact, so all are.
        """
        solve = self._transformer.solve
        order = None if order is None else tf.constant(order, tf.int32)

        def solve_pass(k, x):
            theta = self._theta(x, ckwargs)
            if order is None:
                return solve(y, theta)
            d = tf.gather(order, k)
            return self._place(x, d, solve(tf.gather(y, d, axis=-1), tf.gather(theta, d, axis=-2)))

        return self._sequential_passes(y, solve_pass)

    def _inverse_log_det_jacobian(self, y, **kwargs):
        return -self.forward_and_log_det(self.inverse(y, **kwargs), **kwargs)[1]

