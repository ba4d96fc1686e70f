"""Bounded supports: a fixed map from a box onto R^D, applied before a flow.

A density on the box `B = (low_1, high_1) x ... x (low_D, high_D)` (either
bound of a dimension may be infinite) is a density on R^D pulled back through
the unconstraining map `u = T(x)`, one dimension at a time:

```none
both bounds finite:  u = logit((x - low) / (high - low)) = log(x - low) - log(high - x)
low only:            u = log(x - low)
high only:           u = -log(high - x)
neither:             u = x

p_X(x) = p_U(T(x)) prod_j T_j'(x_j)   for x in B,   p_X(x) = 0 outside,
T_j'(x) = (high - low) / ((x - low)(high - x)),  1 / (x - low),  1 / (high - x),  1.
```

Every `T_j` is increasing, so the order of values (and an autoregressive
flow's dimension order) is kept, and the one-sided maps are the two-sided
logit with the missing side's term dropped. Samples are `x = T^{-1}(u)`,
which lies in `B` for every finite `u`.

`T^{-1}` (the "constraining" bijector, R^D -> B, in TFP's sense of
`experimental_default_event_space_bijector`) is built from TFP bijectors:
`tfb.Sigmoid(low, high)`, `tfb.Shift(low)(tfb.Exp())`,
`tfb.Shift(high)(tfb.Scale(-1)(tfb.Exp()(tfb.Scale(-1))))` and `tfb.Identity`;
adjacent dimensions of the same kind share one bijector (with vector bounds)
and the blocks are joined with `tfb.Blockwise`. Their inverses take
`x - low` and `high - x`, which float arithmetic computes exactly near the
bound (Sterbenz), and `tfb.Sigmoid` computes its log-Jacobian from the
logit, so log-densities stay accurate up to the bounds.

Nothing here imports TensorFlow until a TensorFlow method is called, so the
command line can validate `--support` without it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["BoxSupport"]

_KINDS = ("none", "lower", "upper", "both")


def _side(value, what: str, unbounded: float, size: int) -> np.ndarray:
    """One side of the box as `[size]` float64, `None` read as `unbounded`."""
    if isinstance(value, (str, bytes)):
        raise ValueError(f"`support` {what} must be numbers or None; got {value!r}.")
    items = [value] if value is None or np.ndim(value) == 0 else list(value)
    if len(items) not in (1, size):
        raise ValueError(
            f"`support` {what} must be one value or {size} (event_size); got {len(items)}."
        )
    out = np.empty(len(items))
    for j, item in enumerate(items):
        if item is None:
            out[j] = unbounded
            continue
        if isinstance(item, (bool, np.bool_, str, bytes)):
            raise ValueError(f"`support` {what}[{j}] must be a number or None; got {item!r}.")
        try:
            out[j] = float(item)
        except (TypeError, ValueError):
            raise ValueError(
                f"`support` {what}[{j}] must be a number or None; got {item!r}."
            ) from None
        if np.isnan(out[j]):
            raise ValueError(f"`support` {what}[{j}] is NaN.")
    return np.broadcast_to(out, [size]).copy()


def _open_bound(bound: np.ndarray, direction: int) -> np.ndarray:
    """The nearest normal (or zero) value strictly inside a bound, towards `direction`.

    TensorFlow flushes subnormal numbers to zero on CPUs (its kernels run with
    flush-to-zero), so the value next to a bound of 0 is the smallest normal
    number, not the smallest subnormal (which would read as 0, on the bound).
    """
    tiny = np.finfo(bound.dtype).tiny
    value = np.nextafter(bound, np.array(direction * np.inf, bound.dtype))
    subnormal = (value != 0) & (np.abs(value) < tiny)
    # From 0 the next normal value is +-tiny; from -+tiny (towards 0) it is 0.
    moved = np.where(np.sign(value) == direction, direction * tiny, 0)
    return np.where(subnormal, moved, value).astype(bound.dtype)


class BoxSupport:
    """Per-dimension bounds `low < high` of a density's support, validated.

    `support` is a pair `(low, high)`; each side is one value for every
    dimension or `event_size` values. A bound of `-inf` / `inf` (or None)
    leaves that side unbounded. The bounds are rounded to `dtype`; those
    rounded values (`low`, `high`) are the support everything here uses,
    and the open box must hold at least one `dtype` value in every
    dimension.

    Attributes:
      low, high: `[D]` arrays of `dtype`, with `-inf` / `inf` for unbounded sides.
      kinds: per dimension "both", "lower", "upper" or "none" (which sides are bounded).
      open_low, open_high: `[D]` arrays of `dtype`, the open box's nearest
        representable values (`nextafter(low, +inf)`, `nextafter(high, -inf)`;
        next to a bound of 0 the smallest normal number, since TensorFlow
        flushes subnormal numbers to zero), the largest finite values for the
        unbounded side of a one-sided dimension, and `-inf` / `inf` for a
        dimension with no bounds. `constrain` clamps to them.

    #### Examples

    ```python
    import numpy as np
    from tfp_naf.support import BoxSupport

    box = BoxSupport(([-3.0, 0.0], [3.0, None]), event_size=2)
    box.kinds                           # ('both', 'lower')
    box.config()                        # [[-3.0, 0.0], [3.0, None]]
    u, log_det, outside = box.unconstrain(np.array([[0.0, 1.0], [4.0, 1.0]], "float32"))
    outside.numpy()                     # [False, True]
    box.constrain(np.float32([[40.0, -200.0]])).numpy() < box.high   # strictly inside
    ```

    Raises (on construction):
      ValueError: for a malformed pair, the wrong number of values, NaN, a
        lower bound of +inf or an upper bound of -inf, a finite bound that
        overflows `dtype` or is subnormal in it, or `low >= high` (also after
        rounding to `dtype`: the open interval must hold a `dtype` value).
    """

    def __init__(self, support, event_size: int, dtype: Any = "float32"):
        size = int(event_size)
        try:
            pair = None if isinstance(support, (str, bytes, dict)) else list(support)
        except TypeError:
            pair = None
        if pair is None or len(pair) != 2:
            raise ValueError(f"`support` must be None or a pair (low, high); got {support!r}.")
        self.dtype = np.dtype(getattr(dtype, "as_numpy_dtype", dtype))
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"`support` needs a float32 or float64 model; got {self.dtype}.")
        given_low = _side(pair[0], "low", -np.inf, size)
        given_high = _side(pair[1], "high", np.inf, size)
        for what, values, wrong, side in (("low", given_low, np.inf, "lower"),
                                          ("high", given_high, -np.inf, "upper")):
            bad = np.flatnonzero(values == wrong)
            if bad.size:
                raise ValueError(
                    f"`support` {what}[{bad[0]}] = {values[bad[0]]}: a {side} bound must be "
                    f"finite or {-wrong} (None)."
                )
        self._given = (given_low, given_high)
        info = np.finfo(self.dtype)
        with np.errstate(over="ignore"):
            low, high = given_low.astype(self.dtype), given_high.astype(self.dtype)
        for what, given, rounded in (("low", given_low, low), ("high", given_high, high)):
            for bad, problem in ((np.isfinite(given) & ~np.isfinite(rounded), "overflows"),
                                 ((rounded != 0) & (np.abs(rounded) < info.tiny),
                                  "is subnormal (TensorFlow flushes it to 0) in")):
                if np.any(bad):
                    j = np.flatnonzero(bad)[0]
                    raise ValueError(f"`support` {what}[{j}] = {given[j]} {problem} {self.dtype}.")
        lower, upper = np.isfinite(low), np.isfinite(high)
        # One-sided: the unbounded side stops at the largest finite value, so a
        # sample never overflows to +-inf; no bounds: no clamping at all.
        self.open_low = np.where(lower, _open_bound(low, +1),
                                 np.where(upper, -info.max, -np.inf)).astype(self.dtype)
        self.open_high = np.where(upper, _open_bound(high, -1),
                                  np.where(lower, info.max, np.inf)).astype(self.dtype)
        bad = np.flatnonzero(~(given_low < given_high) | ~(self.open_low <= self.open_high))
        if bad.size:
            j = bad[0]
            raise ValueError(
                f"`support` needs low < high in every dimension, with a {self.dtype} value "
                f"strictly between; dimension {j} has low = {given_low[j]}, high = "
                f"{given_high[j]}."
            )
        self.low, self.high = low, high
        self.kinds = tuple(_KINDS[int(a) + 2 * int(b)] for a, b in zip(lower, upper, strict=True))
        self._tf_cache: "dict[str, dict[str, Any]]" = {}

    @property
    def event_size(self) -> int:
        return len(self.low)

    def config(self) -> "list[list[float | None]]":
        """`[[low_1, ..., low_D], [high_1, ..., high_D]]` as given (before rounding
        to `dtype`), None for an unbounded side: JSON-serialisable, and
        `BoxSupport(box.config(), D, dtype)` is the same support."""
        return [[None if np.isinf(v) else float(v) for v in side] for side in self._given]

    def __eq__(self, other) -> bool:
        return (isinstance(other, BoxSupport) and self.dtype == other.dtype
                and self.config() == other.config())

    __hash__ = None

    def __repr__(self) -> str:
        return f"BoxSupport({self.config()}, event_size={self.event_size}, dtype={self.dtype})"

    # ---- TensorFlow ------------------------------------------------------

    def _tf(self, dtype) -> "dict[str, Any]":
        """The bijector and bound tensors in `dtype`, built once, eagerly.

        `tf.init_scope` lifts the construction out of any `tf.function` being
        traced, so the cached tensors are eager constants every graph can capture.
        """
        import tensorflow as tf

        dtype = tf.as_dtype(dtype)
        if dtype.name not in self._tf_cache:
            with tf.init_scope():
                constant = lambda v: tf.constant(np.asarray(v), dtype)  # noqa: E731
                safe = np.where(np.isfinite(self.low), self.open_low,
                                np.where(np.isfinite(self.high), self.open_high, 0))
                self._tf_cache[dtype.name] = dict(
                    bijector=self._build_bijector(dtype),
                    low=constant(self.low), high=constant(self.high),
                    open_low=constant(self.open_low), open_high=constant(self.open_high),
                    safe=constant(safe),
                )
        return self._tf_cache[dtype.name]

    def _build_bijector(self, dtype):
        import tensorflow as tf
        import tensorflow_probability as tfp

        tfb = tfp.bijectors
        blocks, sizes, start = [], [], 0
        for j in range(1, self.event_size + 1):
            if j < self.event_size and self.kinds[j] == self.kinds[start]:
                continue
            low = tf.constant(self.low[start:j], dtype)
            high = tf.constant(self.high[start:j], dtype)
            minus_one = tf.constant(-1, dtype)
            kind = self.kinds[start]
            if kind == "both":
                block = tfb.Sigmoid(low=low, high=high, name="support_both")
            elif kind == "lower":
                block = tfb.Chain([tfb.Shift(low), tfb.Exp()], name="support_lower")
            elif kind == "upper":
                block = tfb.Chain([tfb.Shift(high), tfb.Scale(minus_one), tfb.Exp(),
                                   tfb.Scale(minus_one)], name="support_upper")
            else:
                block = tfb.Identity(name="support_none")
            blocks.append(block)
            sizes.append(j - start)
            start = j
        if len(blocks) == 1:
            return blocks[0]
        return tfb.Blockwise(blocks, block_sizes=sizes, maybe_changes_size=False,
                             name="support")

    def bijector(self, dtype: Any = None):
        """The constraining bijector `T^{-1}`: R^D -> the box (`forward`), in
        `dtype` (default: this support's), for event shape `[D]`.

        Its `inverse` is `T` (defined inside the box only; NaN or infinite
        outside) and `inverse_log_det_jacobian(x, event_ndims=1)` is
        `sum_j log T_j'(x_j)`. `constrain` and `unconstrain` add the clamping
        and the outside-the-box handling.
        """
        return self._tf(self.dtype if dtype is None else dtype)["bijector"]

    def unconstrain(self, x) -> "tuple[Any, Any, Any]":
        """`(u, log_det, outside)` for `x` `[..., D]`: `u = T(x)`, `log_det =
        sum_j log T_j'(x_j)` (`[...]`) and `outside` (`[...]`, bool): whether
        the row lies outside the open box (on a bound, beyond it, or infinite
        on a bounded side). Rows outside get the `u` and `log_det` of a point
        inside (finite values with finite gradients) and are for the caller to
        mask; NaN stays NaN.
        """
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        k = self._tf(x.dtype)
        outside = (x <= k["low"]) | (x >= k["high"])
        inside_x = tf.where(outside, k["safe"], x)
        bijector = k["bijector"]
        u = bijector.inverse(inside_x)
        log_det = bijector.inverse_log_det_jacobian(inside_x, event_ndims=1)
        log_det = tf.broadcast_to(log_det, tf.shape(x)[:-1])  # Identity's is a scalar.
        return u, log_det, tf.reduce_any(outside, axis=-1)

    def constrain(self, u):
        """`T^{-1}(u)` for `u` `[..., D]`, clamped to `[open_low, open_high]`.

        In float arithmetic `T^{-1}` reaches a bound itself (the sigmoid of a
        large `u` rounds to 1, `low + exp(u)` to `low` for a very negative `u`),
        so the clamp is what makes every value strictly inside the box (and
        finite). Clamped values have zero gradient.
        """
        import tensorflow as tf

        u = tf.convert_to_tensor(u)
        k = self._tf(u.dtype)
        return tf.clip_by_value(k["bijector"].forward(u), k["open_low"], k["open_high"])

    def outside_rows(self, x: np.ndarray) -> np.ndarray:
        """NumPy: which rows of `x` `[n, D]` lie outside the open box (`[n]`, bool)."""
        x = np.asarray(x)
        return np.any((x <= self.low) | (x >= self.high), axis=-1)
