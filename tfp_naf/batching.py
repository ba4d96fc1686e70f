"""Batched `log_prob` and `sample` of a `NAFDensityModel`, in bounded memory.

Rows are processed `batch_size` at a time by a `tf.function` traced once per
model and batch size: every batch has the same shape (the last one is padded
and cut back), so no batch retraces. The generators yield NumPy arrays, so a
caller can write each batch out and keep memory flat in the number of rows.

Log-densities are row by row, so batching does not change them beyond float
rounding. Sampling defines its random numbers per batch:

```none
batch k = rows [k B, (k + 1) B),   B = min(batch_size, n),
noise of batch k = the base distribution's B draws with stateless seed [seed, k],
```

so the samples are a function of `(seed, batch_size)` and the row index:
the same seed and batch size give the same rows in any process, and the
first `m` rows of `n` samples are the `m` samples (up to float rounding).
Batch 0 is `model.sample(B, seed=seed)`'s noise, so `n <= batch_size` rows
are `model.sample(n, seed=seed)` (up to float rounding); a different batch
size gives different (equally valid) samples.

With `jit_compile=True` the inverse (noise -> data) is XLA-compiled; the
noise itself is always drawn outside XLA (XLA's random-number generator
gives other numbers), so XLA changes samples by float rounding only.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf

if TYPE_CHECKING:
    from tfp_naf.keras import NAFDensityModel

__all__ = ["DEFAULT_BATCH_SIZE", "iter_log_prob", "iter_sample"]

DEFAULT_BATCH_SIZE = 16384


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer; got {batch_size!r}.")
    return int(batch_size)


def _cache(model) -> dict:
    # In __dict__ directly: Keras' attribute tracking would wrap the dict (and
    # checkpoints would look into it); these functions are not model state.
    return model.__dict__.setdefault("_tfp_naf_batched_functions", {})


def cached_function(model, key, build):
    """`build()` (a compiled function of `model`), built once per model and `key`."""
    cache = _cache(model)
    if key not in cache:
        cache[key] = build()
    return cache[key]


def _log_prob_function(model, batch: int):
    def build():
        dtype = tf.as_dtype(model.dtype)
        x_spec = tf.TensorSpec([batch, model.event_size], dtype)
        if model.conditional:
            c_spec = tf.TensorSpec([batch, model.conditional_size], dtype)
            return tf.function(model.log_prob, input_signature=[x_spec, c_spec],
                               autograph=False)
        return tf.function(lambda x: model.log_prob(x), input_signature=[x_spec],
                           autograph=False)

    return cached_function(model, ("log_prob", batch), build)


def _sample_function(model, batch: int, jit_compile: bool):
    def build():
        dtype = tf.as_dtype(model.dtype)
        seed_spec = tf.TensorSpec([2], tf.int32)
        noise_spec = tf.TensorSpec([batch, model.event_size], dtype)
        c_spec = tf.TensorSpec([batch, model.conditional_size or 0], dtype)

        def noise(seed):
            return model.flow.distribution.sample(batch, seed=seed)

        def transform(z, c):
            return model.noise_to_data(z, c if model.conditional else None)

        noise_fn = tf.function(noise, input_signature=[seed_spec], autograph=False)
        transform_fn = tf.function(transform, input_signature=[noise_spec, c_spec],
                                   autograph=False, jit_compile=bool(jit_compile))
        return lambda seed, c: transform_fn(noise_fn(seed), c)

    return cached_function(model, ("sample", batch, bool(jit_compile)), build)


def _rows(values, start: int, stop: int, dtype, pad_to: int) -> np.ndarray:
    """`values[start:stop]` as `dtype`, padded to `pad_to` rows by repeating the last."""
    block = np.asarray(values[start:stop], dtype=dtype)
    if len(block) < pad_to:
        block = np.concatenate([block, np.repeat(block[-1:], pad_to - len(block), axis=0)])
    return block


def iter_log_prob(
    model: "NAFDensityModel",
    x,
    c=None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    fixed_batch: bool = False,
) -> Iterator[np.ndarray]:
    """Yields `log p(x | c)` of `x` (`[n, D]`, any array-like that slices: NumPy,
    a memory map) `batch_size` rows at a time, as NumPy arrays of the model's
    dtype. `c`: `[n, C]` for a conditional model, else None.

    The compiled batch has `min(batch_size, n)` rows, or `batch_size` rows
    with `fixed_batch=True` (for a caller feeding a long table chunk by
    chunk, so that a short last chunk does not trace another shape).
    """
    batch_size = _check_batch_size(batch_size)
    n = len(x)
    if c is not None and len(c) != n:
        raise ValueError(f"`x` has {n} rows but `c` has {len(c)}.")
    if n == 0:
        return
    batch = batch_size if fixed_batch else min(batch_size, n)
    fn = _log_prob_function(model, batch)
    dtype = model.dtype
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        args = [_rows(x, start, stop, dtype, batch)]
        if c is not None:
            args.append(_rows(c, start, stop, dtype, batch))
        yield fn(*args).numpy()[: stop - start]


def iter_sample(
    model: "NAFDensityModel",
    n: int,
    c=None,
    seed: "int | None" = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    jit_compile: bool = False,
) -> Iterator[np.ndarray]:
    """Yields `n` samples `[k, D]` in data units, `batch_size` rows at a time.

    `c`: for a conditional model, `[C]` (one condition for all rows) or
    `[n, C]` (any array-like that slices). `seed`: an int (see the module
    docstring for what it determines) or None (a random one).
    """
    batch_size = _check_batch_size(batch_size)
    n = int(n)
    if n < 0:
        raise ValueError(f"`n` must be >= 0; got {n}.")
    if model.conditional != (c is not None):
        raise ValueError("This model is conditional: give the condition `c`."
                         if model.conditional else
                         "This model is not conditional, but a condition `c` was given.")
    if n == 0:
        return
    batch = min(batch_size, n)
    csize = model.conditional_size or 0
    if c is not None and np.ndim(c) == 1:
        c = np.broadcast_to(np.asarray(c, model.dtype), (n, csize))
    if c is not None and (len(c) != n or np.shape(c)[-1] != csize):
        raise ValueError(f"`c` must have shape [{csize}] or [{n}, {csize}]; "
                         f"got {tuple(np.shape(c))}.")
    seed = secrets.randbits(31) if seed is None else int(seed)
    seed = int(np.array(seed, np.int64).astype(np.int32))  # Wrapped as tf.cast does.
    fn = _sample_function(model, batch, jit_compile)
    empty = np.zeros([batch, 0], model.dtype)
    for k, start in enumerate(range(0, n, batch)):
        stop = min(start + batch, n)
        cb = empty if c is None else _rows(c, start, stop, model.dtype, batch)
        yield fn(tf.constant([seed, k], tf.int32), cb).numpy()[: stop - start]
