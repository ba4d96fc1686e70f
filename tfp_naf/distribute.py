"""Training on several machines: the `tf.distribute` strategy that `TF_CONFIG` describes.

`MultiWorkerMirroredStrategy` runs the same program on every machine
("worker"); each finds the cluster and its own place in it from the
`TF_CONFIG` environment variable, a JSON object such as

```none
{"cluster": {"worker": ["host1:12345", "host2:12345"]},
 "task": {"type": "worker", "index": 0}}
```

(the same `cluster` on every worker, its own `task.index` on each). Worker 0
is the chief (or the single `chief` task, when the cluster lists one): the one
that should write the results. Every gradient step all-reduces the replicas'
gradients, so all workers hold the same weights; `NAFDensityModel`'s loss is
each replica's share of the global batch's mean NLL, so training follows the
single-process run with the same global batch.

Functions here only parse `TF_CONFIG` until a strategy is asked for:
TensorFlow is imported inside `strategy_from_environment`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = [
    "chief_path",
    "cluster_spec",
    "is_chief",
    "num_workers",
    "strategy_from_environment",
]

_JOBS = ("chief", "worker")
_COMMUNICATION = ("auto", "ring", "nccl")


def cluster_spec(environ: "Mapping[str, str] | None" = None) -> "dict[str, Any] | None":
    """The validated `TF_CONFIG` as a dict, or None when it is unset or empty.

    Args:
      environ: the environment to read (default `os.environ`).

    Returns:
      `{"cluster": {"worker": [...], ...}, "task": {"type": ..., "index": ...}}`
      (`task` may be absent for a one-worker cluster), or None.

    Raises:
      ValueError: (one line) for malformed JSON, a cluster that is not a
        mapping of "chief"/"worker" to lists of "host:port" strings, or a
        missing or out-of-range `task` in a cluster of several workers.
    """
    text = (os.environ if environ is None else environ).get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON ({e.msg} at character {e.pos}).") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        raise ValueError(
            'TF_CONFIG must be a JSON object with a "cluster" object, e.g. {"cluster": '
            '{"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}.'
        )
    cluster = config["cluster"]
    unknown = sorted(set(cluster) - set(_JOBS))
    if unknown:
        raise ValueError(
            f"TF_CONFIG's cluster has the jobs {unknown}; only 'worker' (and one 'chief') "
            "are supported (MultiWorkerMirroredStrategy, no parameter servers)."
        )
    for job, addresses in cluster.items():
        if not (isinstance(addresses, list) and addresses
                and all(isinstance(a, str) and ":" in a for a in addresses)):
            raise ValueError(
                f'TF_CONFIG\'s cluster["{job}"] must be a non-empty list of "host:port" '
                f"strings; got {addresses!r}."
            )
    if len(cluster.get("chief", [])) > 1:
        raise ValueError(f"TF_CONFIG's cluster lists {len(cluster['chief'])} chiefs; at most 1.")
    task = config.get("task")
    if task is None:
        if _count(cluster) > 1:
            raise ValueError(
                f"TF_CONFIG describes {_count(cluster)} workers but no \"task\": give each "
                'process its own, e.g. "task": {"type": "worker", "index": 0}.'
            )
        return config
    if not (isinstance(task, dict) and task.get("type") in cluster
            and isinstance(task.get("index"), int) and not isinstance(task["index"], bool)
            and 0 <= task["index"] < len(cluster[task["type"]])):
        raise ValueError(
            f"TF_CONFIG's task {task!r} is not in its cluster: it needs a \"type\" among "
            f"{sorted(cluster)} and an integer \"index\" within that job's list."
        )
    return config


def _count(cluster: Mapping[str, list]) -> int:
    return sum(len(cluster.get(job, [])) for job in _JOBS)


def num_workers(environ: "Mapping[str, str] | None" = None) -> int:
    """How many workers (chief included) `TF_CONFIG` lists; 1 without `TF_CONFIG`."""
    config = cluster_spec(environ)
    return 1 if config is None else _count(config["cluster"])


def is_chief(environ: "Mapping[str, str] | None" = None) -> bool:
    """Whether this process should write results: True without a cluster.

    The chief is the `chief` task if the cluster has one, else worker 0.
    """
    config = cluster_spec(environ)
    if config is None or "task" not in config:
        return True
    task, cluster = config["task"], config["cluster"]
    if "chief" in cluster:
        return task["type"] == "chief"
    return task["index"] == 0


def strategy_from_environment(communication: str = "auto"):
    """`MultiWorkerMirroredStrategy` for a `TF_CONFIG` cluster of several workers, else the default.

    Call it before any other TensorFlow operation runs (the collective ops
    are set up when the strategy is created), then build **and** compile the
    model inside `strategy.scope()`; `fit`'s `batch_size` is the global batch
    (split across all replicas of all workers). Every worker runs the same
    program and blocks at the first step until all have joined.

    Args:
      communication: the all-reduce implementation of the multi-worker
        strategy: "auto" (TensorFlow's choice: ring all-reduce over gRPC on
        CPUs, NCCL on GPUs), "ring" or "nccl". Unused for one worker.

    Returns:
      A `tf.distribute.MultiWorkerMirroredStrategy` when `TF_CONFIG` lists
      more than one worker; otherwise `tf.distribute.get_strategy()` (the
      default strategy, or the one whose scope we are in).

    Raises:
      ValueError: for a malformed `TF_CONFIG` (see `cluster_spec`) or an
        unknown `communication`.

    #### Examples

    On every machine, with that machine's `task.index`:

    ```python
    # TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]},
    #             "task": {"type": "worker", "index": 0}}'   (unset: one process)
    import os, tempfile
    import numpy as np
    import tf_keras
    from tfp_naf.distribute import chief_path, strategy_from_environment
    from tfp_naf.keras import NAFDensityModel

    strategy = strategy_from_environment()
    x = np.random.default_rng(0).normal(size=(512, 2)).astype("float32")
    with strategy.scope():
        model = NAFDensityModel(event_size=2, num_flows=1, hidden_units=[8])
        model.adapt(x)
        model.compile(optimizer=tf_keras.optimizers.Adam(1e-3))
    folder = tempfile.mkdtemp()
    model.fit(x, batch_size=128, epochs=2, verbose=0, callbacks=[
        tf_keras.callbacks.BackupAndRestore(os.path.join(folder, "backup"))])
    with chief_path(os.path.join(folder, "naf.weights.h5")) as path:
        model.save_weights(path)    # Every worker saves; only the chief's file stays.
    ```
    """
    if communication not in _COMMUNICATION:
        raise ValueError(f"`communication` must be one of {_COMMUNICATION}; got {communication!r}.")
    workers = num_workers()
    import tensorflow as tf

    if workers <= 1:
        return tf.distribute.get_strategy()
    implementation = getattr(tf.distribute.experimental.CommunicationImplementation,
                             communication.upper())
    return tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=implementation))


@contextlib.contextmanager
def chief_path(path: "str | os.PathLike") -> Iterator[str]:
    """Yields `path` on the chief, and a path in a temporary folder elsewhere.

    Under `MultiWorkerMirroredStrategy` saving can run collective operations,
    so every worker should save; this gives the other workers a throw-away
    place (`<tmp>/<basename of path>`, not yet existing), deleted on exit.

    #### Examples

    ```python
    with chief_path("model.weights.h5") as path:
        model.save_weights(path)
    ```
    """
    path = os.fspath(path)
    if is_chief():
        yield path
        return
    folder = tempfile.mkdtemp(prefix="tfp_naf_worker_")
    try:
        yield os.path.join(folder, os.path.basename(os.path.normpath(path)) or "out")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
