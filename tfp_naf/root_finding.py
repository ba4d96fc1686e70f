"""Inverting strictly increasing scalar functions, elementwise and batched.

The transformers of a neural autoregressive flow have no closed-form inverse.
Their inverse is found numerically by a safeguarded Newton iteration inside a
bracket (after Numerical Recipes' ``rtsafe``): a Newton step is taken when it
lands strictly inside the current bracket and at least halves the previous
step; otherwise a false-position step on the bracket's ends (kept away from
them), or a bisection when the bracket stopped halving. The search starts at
the bracket's false-position point, which is nearly exact where `g` is close
to linear (the transformers' tails), or at a caller's estimate (DSF's
weighted mean of its units' roots), which saves evaluating `g` at the
bracket's ends. It stops when the Newton step is below the tolerance, or
when the error left by the last step, predicted from the last three by
quadratic convergence, is below the float resolution (`PREDICTED_STOP`: no
evaluation only to confirm convergence). Every element is solved at once, so the
loop runs until the slowest element has converged or the iteration cap is
reached; converged elements stay put.

Gradients never flow through the loop (differentiating through bisection gives
NaN and is wasteful). :func:`solve_increasing` instead returns

    x = x* - (r - stop_gradient(r)) / stop_gradient(g'(x*; theta)),
    r = g(x*; theta) - y,

with `x*` the (stopped) root: its value is exactly `x*`, and its derivatives
are those of the implicit function theorem, `dx/dy = 1 / g'` and
`dx/dtheta = -(dg/dtheta) / g'`. That evaluates `g` once more at the root
even when no gradient is wanted; :func:`solve_increasing_with_params`, for a
`g` whose parameters are passed explicitly, gives the same derivatives
through a custom gradient that evaluates `g` at the root only when asked, so
sampling from a flow costs the search alone (`python -m benchmarks.inverse`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import tensorflow as tf

__all__ = [
    "RootSearchResults",
    "expand_bracket",
    "find_root_increasing",
    "solve_increasing",
    "solve_increasing_with_params",
]

# Whether the search stops after a Newton step `s` once the error it leaves,
# estimated by quadratic convergence (`e_next = C e^2`) as `C s^2`, is below the
# float resolution of `x`, `eps (1 + |x|)`: the step is then taken without a
# further evaluation of `g` to confirm it (the last of ~4 per solve in a
# flow's inverse). `C = |s| / s_prev^2` is read off the last two Newton steps
# and trusted only when the two steps before gave the same within a factor of
# 4: a single ratio misjudged steep, far-from-quadratic transformers (roots
# off by up to ~2,000 eps). Read when a search is traced.
PREDICTED_STOP = True

# fn(x) -> (g(x), log g'(x)), elementwise.
ValueAndLogDerivative = Callable[[tf.Tensor], "tuple[tf.Tensor, tf.Tensor]"]


class RootSearchResults(NamedTuple):
    """What the safeguarded Newton search found."""

    root: tf.Tensor
    """The solution `x` of `g(x) = y`, elementwise."""
    objective_at_root: tf.Tensor
    """`g(x) - y` at the last iterate evaluated, from which `root` is at most
    one (converged) Newton step away, or `root` itself."""
    num_iterations: tf.Tensor
    """How many iterations the search ran (shared by all elements)."""
    converged: tf.Tensor
    """Elementwise: whether the step size fell under the tolerance."""


def expand_bracket(
    fn: ValueAndLogDerivative,
    y: tf.Tensor,
    low: tf.Tensor,
    high: tf.Tensor,
    max_doublings: int = 60,
) -> "tuple[tf.Tensor, tf.Tensor]":
    """Widens `[low, high]` until `g(low) <= y <= g(high)` for an increasing `g`.

    The side that fails is moved outwards by a width that doubles at every step.
    For `y` strictly inside the range of `g` this ends after a few steps; after
    `max_doublings` it stops regardless, and the search then converges to the
    end of the bracket.
    """
    width = tf.ones_like(y)

    def misses(lo, hi):  # One evaluation per side, reused by cond and body.
        return fn(lo)[0] > y, fn(hi)[0] < y

    def cond(i, lo, hi, w, lo_bad, hi_bad):
        return tf.reduce_any(lo_bad | hi_bad)

    def body(i, lo, hi, w, lo_bad, hi_bad):
        lo = tf.where(lo_bad, lo - w, lo)
        hi = tf.where(hi_bad, hi + w, hi)
        return (i + 1, lo, hi, 2.0 * w) + misses(lo, hi)

    _, low, high, _, _, _ = tf.while_loop(
        cond,
        body,
        (tf.constant(0), low, high, width) + misses(low, high),
        maximum_iterations=max_doublings,
    )
    return low, high


def find_root_increasing(
    fn: ValueAndLogDerivative,
    y: tf.Tensor,
    low: tf.Tensor,
    high: tf.Tensor,
    tolerance: float,
    max_iterations: int,
    initial: "tf.Tensor | None" = None,
) -> RootSearchResults:
    """Solves `g(x) = y` for an increasing `g` by safeguarded Newton steps.

    Starts at the false-position point of the bracket (two evaluations of
    `g`, at its ends), or at `initial` when given. Each iteration
    evaluates `g` and `g'` once, shrinks the bracket, and takes the Newton
    step if it lands strictly inside the bracket and at most halves the
    previous step; otherwise a false-position (secant) step on the bracket's
    ends, kept at least 1/16 of the width from either end, or a bisection
    after a step that did not halve the bracket.

    Args:
      fn: elementwise `x -> (g(x), log g'(x))`.
      y: targets.
      low, high: a bracket with `g(low) <= y <= g(high)`, same shape as `y`.
      tolerance: an element has converged once its Newton error estimate
        `|g(x) - y| / g'(x)` is below `tolerance * (1 + |x|)` or its bracket
        is narrower than that, or once the error left by its last Newton
        step, predicted from the last three, is below the float resolution
        of `x` (`PREDICTED_STOP`).
      max_iterations: hard cap on the number of iterations.
      initial: optional starting point inside the bracket (for example a
        transformer's own estimate). The ends are then not evaluated: until an
        iterate replaces an end, a rejected Newton step falls back to
        bisection rather than false position.

    Returns:
      `RootSearchResults`. No gradient flows through it.
    """
    y, low, high = (tf.stop_gradient(t) for t in (y, low, high))
    dtype = y.dtype
    tol = tf.constant(tolerance, dtype)
    eps = tf.constant(np.finfo(dtype.as_numpy_dtype).eps, dtype)
    # |g(x) - y| at this level is rounding noise: x is as good as g resolves.
    noise = 4.0 * eps * (1.0 + tf.abs(y))
    if initial is None:
        f_low = fn(low)[0] - y
        f_high = fn(high)[0] - y
    else:  # Unknown until an iterate replaces an end: bisection, not secant, meanwhile.
        f_low = tf.fill(tf.shape(y), tf.constant(-np.inf, dtype))
        f_high = tf.fill(tf.shape(y), tf.constant(np.inf, dtype))

    def secant_point(lo, hi, f_lo, f_hi):
        width = hi - lo
        denom = f_hi - f_lo
        t = tf.math.divide_no_nan(-f_lo, denom)
        t = tf.where(tf.math.is_finite(t), t, 0.5)
        return lo + tf.clip_by_value(t, 1.0 / 16.0, 15.0 / 16.0) * width

    def body(i, x, lo, hi, f_lo, f_hi, last_step, last_width, f, done, was_newton, c_prev):
        value, log_deriv = fn(x)
        f = value - y
        below, above = f < 0, f > 0
        lo, f_lo = tf.where(below, x, lo), tf.where(below, f, f_lo)
        hi, f_hi = tf.where(above, x, hi), tf.where(above, f, f_hi)
        newton_step = f / tf.exp(log_deriv)
        newton = x - newton_step
        width = hi - lo
        scale = tol * (1.0 + tf.abs(x))
        use_newton = (
            (newton > lo)
            & (newton < hi)
            & tf.math.is_finite(newton)
            & (2.0 * tf.abs(newton_step) <= tf.abs(last_step))
        )
        # False position while it shrinks the bracket fast, else bisection.
        fallback = tf.where(
            2.0 * width <= last_width, secant_point(lo, hi, f_lo, f_hi), lo + 0.5 * width
        )
        x_new = tf.where(use_newton, newton, fallback)
        x_new = tf.where((tf.abs(f) <= noise) | done, x, x_new)
        step = tf.abs(newton_step)
        newton_done = step <= scale
        c_now = infinite
        if predicted_stop:  # See PREDICTED_STOP.
            # The quadratic-convergence constant read off this step and the last.
            c_now = tf.where(was_newton & use_newton,
                             tf.math.divide_no_nan(step, tf.square(last_step)), infinite)
            consistent = (c_now <= 4.0 * c_prev) & (c_prev <= 4.0 * c_now)
            predicted = c_now * tf.square(step)
            newton_done |= consistent & (predicted <= eps * (1.0 + tf.abs(x)))
        converged = done | (tf.abs(f) <= noise) | (width <= scale) | (use_newton & newton_done)
        return (i + 1, x_new, lo, hi, f_lo, f_hi, x_new - x,
                tf.where(use_newton, last_width, width), f, converged, use_newton, c_now)

    def cond(i, x, lo, hi, f_lo, f_hi, last_step, last_width, f, done, was_newton, c_prev):
        return tf.logical_not(tf.reduce_all(done))

    predicted_stop = PREDICTED_STOP
    x0 = secant_point(low, high, f_low, f_high) if initial is None else tf.stop_gradient(initial)
    infinite = tf.fill(tf.shape(y), tf.constant(float("inf"), dtype))
    not_yet = tf.zeros_like(y, tf.bool)
    i, x, lo, hi, _, _, _, _, f, done, _, _ = tf.while_loop(
        cond,
        body,
        (tf.constant(0), x0, low, high, f_low, f_high, infinite, infinite,
         tf.zeros_like(y), not_yet, not_yet, infinite),
        maximum_iterations=max_iterations,
    )
    return RootSearchResults(root=x, objective_at_root=f, num_iterations=i, converged=done)


def solve_increasing(
    fn: ValueAndLogDerivative,
    y: tf.Tensor,
    low: tf.Tensor,
    high: tf.Tensor,
    tolerance: float,
    max_iterations: int,
    search_fn: "ValueAndLogDerivative | None" = None,
) -> tf.Tensor:
    """`x` with `g(x) = y`, differentiable by the implicit function theorem.

    `fn` may close over parameters `theta` that carry gradients; the result's
    gradients with respect to `y` and `theta` are `1 / g'` and
    `-(dg/dtheta) / g'` at the root. See the module docstring. `search_fn`,
    when given, is the same `g` used during the search (for example with
    stopped parameters and their own work done once); `fn` is then evaluated
    only at the root.
    """
    root = tf.stop_gradient(
        find_root_increasing(search_fn or fn, y, low, high, tolerance, max_iterations).root
    )
    value, log_deriv = fn(root)
    residual = value - y
    # Zero in value, the implicit-function derivatives in gradient. Where g'
    # underflows (far in a saturated tail) the gradient is huge but finite.
    tiny = tf.constant(np.finfo(y.dtype.as_numpy_dtype).tiny, y.dtype)
    deriv = tf.stop_gradient(tf.maximum(tf.exp(log_deriv), tiny))
    return root - (residual - tf.stop_gradient(residual)) / deriv


def solve_increasing_with_params(
    fn: "Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]",
    y: tf.Tensor,
    params: tf.Tensor,
    low: tf.Tensor,
    high: tf.Tensor,
    tolerance: float,
    max_iterations: int,
    search_fn: "ValueAndLogDerivative | None" = None,
    initial: "tf.Tensor | None" = None,
) -> tf.Tensor:
    """`solve_increasing` for `g(x) = fn(x, params)`, evaluating `g` at the root only for gradients.

    The same root and the same implicit-function gradients, `dx/dy = 1 / g'`
    and `dx/dparams = -(dg/dparams) / g'` at the root, but through a
    `tf.custom_gradient` that evaluates `fn` at the root only when a gradient
    is asked for, so a forward-only solve (drawing samples) costs the search
    alone. `fn` must take its parameters explicitly: tensors it captures
    otherwise get no gradient. `search_fn` (default `fn` at stopped
    `params`) evaluates `g` during the search; `initial` is passed to
    `find_root_increasing`. `y` must have the shape of the result.
    """
    dtype = y.dtype
    tiny = tf.constant(np.finfo(dtype.as_numpy_dtype).tiny, dtype)
    if search_fn is None:
        stopped = tf.stop_gradient(params)

        def search_fn(x):
            return fn(x, stopped)

    @tf.custom_gradient
    def solve(y, params):
        result = find_root_increasing(
            search_fn, y, low, high, tolerance, max_iterations, initial=initial)
        # Where g is not finite at the root (a NaN or infinite y or parameter),
        # the search's x means nothing: NaN, as `solve_increasing`'s residual gives.
        root = tf.where(tf.math.is_finite(result.objective_at_root), result.root,
                        tf.constant(np.nan, dtype))
        root = tf.stop_gradient(root)

        def grad(upstream):
            with tf.GradientTape() as tape:
                tape.watch(params)
                value, log_deriv = fn(root, params)
            scaled = upstream / tf.maximum(tf.exp(log_deriv), tiny)
            grad_params = tape.gradient(value, params, output_gradients=scaled)
            grad_params = tf.zeros_like(params) if grad_params is None else -grad_params
            return scaled, grad_params

        return root, grad

    return solve(y, params)
