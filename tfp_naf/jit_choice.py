"""The training step compiled both ways, timed on the first steps; the faster one is kept.

XLA (`jit_compile=True`) fuses the transformer's elementwise work, but its CPU
code is host-dependent: on an AMD Zen 5 with AVX-512 an XLA training step took
62 ms against `tf.function`'s 73 ms, on an AVX2 host XLA was the slower one
(`benchmarks/results/fit.md`). So no fixed choice is the faster everywhere.
`FasterOf` runs the first calls alternately through both compiled versions of
the same step, times them, and from then on calls only the faster one:

```none
calls 0 .. 2 w - 1:  tf.function, XLA, tf.function, ... untimed (tracing, compilation,
                     and the first steps, which run slower while caches and the input
                     pipeline warm up)
then n blocks:       tf.function, XLA, XLA, tf.function, each call timed
ratio of a block:    (its two XLA times) / (its two tf.function times)
XLA is kept when the median block ratio is at most `margin`.
```

The mirrored order in each block cancels a steady drift of the step time
(still warming up, or another job's load coming or going), which in
measurements here moved plain alternation's medians by up to 40% between two
identical functions over 5 calls each.

Every call is a real training step of the same training: both versions
compute the same loss, gradients and update, up to float rounding. The only
cost of the choice is compiling the version not kept. `NAFDensityModel.compile(
jit_compile="auto")` uses it for its training step.

#### Examples

```python
step = FasterOf(tf.function(fn), tf.function(fn, jit_compile=True))
for batch in data:
    step(batch)
step.choice   # "tf.function" or "xla", after 2 * WARMUP_CALLS + 4 * TIMED_BLOCKS calls
```
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf

__all__ = ["FasterOf", "TIMED_BLOCKS", "WARMUP_CALLS", "XLA_MARGIN"]

WARMUP_CALLS = 5  # Untimed calls of each version first.
TIMED_BLOCKS = 16  # Blocks of four timed calls (tf.function, XLA, XLA, tf.function).
XLA_MARGIN = 0.95  # XLA is kept when it takes at most this fraction of tf.function's time.

PLAIN, XLA = "tf.function", "xla"


def _wait(result) -> None:
    """Blocks until `result` (a structure of tensors) has been computed."""
    tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, result)


class FasterOf:
    """Calls `plain` and `xla` in turn on the first calls, then only the faster.

    Args:
      plain: the step as a `tf.function` (or any callable).
      xla: the same step XLA-compiled.
      warmup_calls: untimed calls of each version first.
      timed_blocks: blocks of four timed calls (plain, xla, xla, plain).
      margin: XLA is kept when the median over blocks of its time over
        `plain`'s is at most `margin`; near-ties go to `plain`, which compiles
        no more per input shape.
      clock: seconds, for timing (`time.perf_counter`).

    If the first call of `xla` raises an error of XLA's compilation
    (`InvalidArgumentError`, `UnimplementedError`), `plain` is kept and every
    later call goes to it.
    """

    _BLOCK = (PLAIN, XLA, XLA, PLAIN)

    def __init__(self, plain: Callable, xla: Callable, warmup_calls: int = WARMUP_CALLS,
                 timed_blocks: int = TIMED_BLOCKS, margin: float = XLA_MARGIN,
                 clock: Callable[[], float] = time.perf_counter):
        if int(warmup_calls) < 1 or int(timed_blocks) < 1:
            raise ValueError(f"`warmup_calls` and `timed_blocks` must be >= 1; got "
                             f"{warmup_calls}, {timed_blocks}.")
        if not 0.0 < float(margin) <= 1.0:
            raise ValueError(f"`margin` must be in (0, 1]; got {margin}.")
        self._versions = {PLAIN: plain, XLA: xla}
        self._warmup = 2 * int(warmup_calls)
        self._timed_blocks = int(timed_blocks)
        self._margin = float(margin)
        self._clock = clock
        self._calls = 0
        self._seconds = {PLAIN: [], XLA: []}
        self._chosen: "str | None" = None
        self._xla_error: "str | None" = None

    @property
    def choice(self) -> "str | None":
        """`"tf.function"` or `"xla"` once chosen, else None."""
        return self._chosen

    @property
    def seconds(self) -> "dict[str, float]":
        """Median seconds per timed call of each version (those timed so far)."""
        return {k: float(np.median(v)) for k, v in self._seconds.items() if v}

    @property
    def ratio(self) -> "float | None":
        """Median over the complete blocks of XLA's time over `plain`'s, or None."""
        p, x = self._seconds[PLAIN], self._seconds[XLA]
        blocks = min(len(p), len(x)) // 2
        if not blocks:
            return None
        return float(np.median([(x[2 * b] + x[2 * b + 1]) / (p[2 * b] + p[2 * b + 1])
                                for b in range(blocks)]))

    @property
    def xla_error(self) -> "str | None":
        """Why XLA was ruled out, when its first call raised."""
        return self._xla_error

    def __call__(self, *args, **kwargs):
        if self._chosen is not None:
            return self._versions[self._chosen](*args, **kwargs)
        i = self._calls
        self._calls += 1
        if i < self._warmup:
            name = PLAIN if i % 2 == 0 else XLA
            if i != 1:
                return self._versions[name](*args, **kwargs)
            try:  # XLA's first call: its compilation.
                result = self._versions[XLA](*args, **kwargs)
                _wait(result)
                return result
            except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as err:
                self._xla_error = f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
                self._chosen = PLAIN
                return self._versions[PLAIN](*args, **kwargs)
        name = self._BLOCK[(i - self._warmup) % 4]
        start = self._clock()
        result = self._versions[name](*args, **kwargs)
        _wait(result)
        self._seconds[name].append(self._clock() - start)
        if len(self._seconds[PLAIN]) >= 2 * self._timed_blocks:
            self._chosen = XLA if self.ratio <= self._margin else PLAIN
        return result
