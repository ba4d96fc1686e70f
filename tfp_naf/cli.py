"""The `tfp-naf` command line: demo, fit, sample, log-prob.

```none
tfp-naf demo [--out DIR] [--dataset NAME] [--steps N] [--seed S]
tfp-naf fit DATA --out DIR [--conditional-columns I,J] [--support LOW,HIGH]
            [--column-support J=LOW,HIGH ...] [--epochs N] [--weight-decay W] ...
tfp-naf sample DIR -n N --out FILE [--seed S] [--condition FILE|V1,V2,...] [--batch-size B]
tfp-naf log-prob DIR DATA --out FILE [--batch-size B]
```

DATA and FILE are `.npy` (a 2-D numeric array) or `.csv` (comma-separated
numbers, with an optional header row). Every error is reported as one line on
stderr with exit status 1 (2 for bad command-line syntax), without a traceback.

Memory stays bounded whatever the number of rows (`tfp_naf.tables`):
`sample` and `log-prob` work `--batch-size` rows at a time (one compiled
function per job, the last batch padded) and append each batch to a temporary
file that is renamed into place at the end; `fit` memory-maps a `.npy` file,
parses a CSV file in chunks into a temporary raw file it memory-maps (in the
system's temporary folder, `TMPDIR`), computes the standardisation in one
pass over the training rows, and trains from a `tf.data` pipeline that
gathers each batch's rows by index (validation rows are a set of indices, not
a copy). On a terminal, long jobs show a progress line on stderr.

`--help` and bad options answer without importing TensorFlow; TensorFlow's
start-up logging is filtered (`tfp_naf.tf_quiet`; `TF_CPP_MIN_LOG_LEVEL`, 3
unless set, says which levels show).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tfp_naf.progress import Progress, is_terminal
from tfp_naf.tables import DEFAULT_CHUNK_ROWS, TableError, TableWriter, open_table, spool_table

__all__ = ["main"]

PROG = "tfp-naf"
BATCH_SIZE = 16384  # Rows per compiled batch for sample/log-prob (= batching.DEFAULT_BATCH_SIZE).
CHUNK_ROWS = DEFAULT_CHUNK_ROWS  # Rows per chunk when reading a table.


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit status 1."""


def _tensorflow():
    """Imports TensorFlow quietly (see `tfp_naf.tf_quiet`); returns the module."""
    from tfp_naf import tf_quiet

    tf = tf_quiet.import_tensorflow()
    tf_quiet.quiet_python_logging()
    return tf


def _check_out_file(path: Path, force: bool) -> None:
    if path.suffix.lower() not in (".npy", ".csv"):
        raise CLIError(f"--out {path}: unsupported file type {path.suffix!r}; use .npy or .csv.")
    if path.is_dir():
        raise CLIError(f"--out {path} is a folder.")
    if path.exists() and not force:
        raise CLIError(f"--out {path} already exists; use --force to overwrite it.")
    if not path.parent.is_dir():
        raise CLIError(f"--out {path}: the folder {path.parent} does not exist.")


# ---- Argument parsing -----------------------------------------------------


def _int_list(text: str) -> "list[int]":
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value
    return parse


def _non_negative(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be finite and >= 0, got {text!r}")
    return value


def _activation(text):
    """An activation name (checked against Keras', which imports TensorFlow: only when given)."""
    from tfp_naf.activations import check_name

    try:
        return check_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _parse_bounds(text: str) -> "tuple[float, float]":
    """`LOW,HIGH` (numbers; `-inf` / `inf` for an unbounded side) as two floats."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 2 or any(math.isnan(v) for v in values):
        raise argparse.ArgumentTypeError(
            f"expected LOW,HIGH (two numbers; -inf or inf for no bound), got {text!r}")
    return values[0], values[1]


def _bounds(text: str) -> str:
    """Checks `LOW,HIGH`; keeps the text (settings stay plain JSON)."""
    _parse_bounds(text)
    return text


def _column_bounds(text: str) -> str:
    """Checks `J=LOW,HIGH`; keeps the text."""
    column, _, bounds = text.partition("=")
    if not column.strip().isdigit():
        raise argparse.ArgumentTypeError(
            f"expected J=LOW,HIGH with J a 0-based column index, got {text!r}")
    _parse_bounds(bounds)
    return text


# Options whose value may start with "-" (a negative LOW): argparse would take
# `--support -3,3` for two options, so main() joins them as `--support=-3,3`.
_BOUNDS_OPTIONS = ("--support", "--column-support")
_NEGATIVE_VALUE = re.compile(r"-(\d|\.\d|inf)", re.IGNORECASE)


def _join_negative_values(argv: "list[str]") -> "list[str]":
    out, i = [], 0
    while i < len(argv):
        if (argv[i] in _BOUNDS_OPTIONS and i + 1 < len(argv)
                and _NEGATIVE_VALUE.match(argv[i + 1])):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _add_model_options(p: argparse.ArgumentParser, flows: int, hidden: str, units: int) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--transformer", choices=("dsf", "ddsf", "ddsf-shared"), default="dsf",
                   help="deep sigmoidal (dsf) or deep dense sigmoidal (ddsf) flow, or "
                        "ddsf-shared: DDSF whose mixing matrices are learned weights shared "
                        "by all dimensions (the original NAF code's form; far fewer MADE "
                        "outputs than ddsf)")
    g.add_argument("--units", type=_positive(int), default=units,
                   help="sigmoid units per transformer layer (default %(default)s)")
    g.add_argument("--layers", type=_positive(int), default=2,
                   help="transformer layers, ddsf and ddsf-shared only (default %(default)s)")
    g.add_argument("--flows", type=_positive(int), default=flows,
                   help="NAFs chained, with reversals between (default %(default)s)")
    g.add_argument("--hidden", type=_int_list, default=hidden,
                   help="MADE hidden widths, e.g. 64,64 (default %(default)s)")
    g.add_argument("--context-units", type=_positive(int), default=None,
                   help="use the compact conditioner with this many features per dimension")
    g.add_argument("--base-rate", type=_non_negative, default=None, metavar="R",
                   help="learning-rate factor of each flow's unconditioned base parameters "
                        "(theta = MADE(x) + R * beta); 0 for none (default: the library's, "
                        "tfp_naf.flow.DEFAULT_BASE_RATE)")
    g.add_argument("--activation", type=_activation, default=None, metavar="NAME",
                   help="the MADEs' hidden activation: soft_relu (a ReLU with a learned "
                        "softness) or a Keras activation name such as relu (default: "
                        "soft_relu, or relu for a conditional model)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Neural autoregressive flows (TensorFlow Probability).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train on a built-in 2-D dataset; write PNG, metrics, model",
                       description="Trains a NAF on a built-in 2-D dataset and writes "
                       "demo.png (data | learned density | samples), metrics.json and the "
                       "model folder model/ into --out (rewriting those, nothing else).")
    p.add_argument("--out", type=Path, default=Path("tfp-naf-demo"),
                   help="output folder (default %(default)s)")
    p.add_argument("--dataset", default="pinwheel",
                   help="8gaussians, checkerboard, 2spirals or pinwheel (default %(default)s)")
    p.add_argument("--steps", type=_positive(int), default=5000,
                   help="training steps (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    p.add_argument("--batch-size", type=_positive(int), default=256, help="(default %(default)s)")
    p.add_argument("--lr", type=_positive(float), default=3e-3, help="(default %(default)s)")
    p.add_argument("--train-size", type=_positive(int), default=20000, help="(default %(default)s)")
    p.add_argument("--no-saved-model", action="store_true",
                   help="skip the TensorFlow SavedModel export (model/saved_model)")
    _add_xla_option(p)
    _add_model_options(p, flows=5, hidden="64,64", units=16)

    p = sub.add_parser("fit", help="fit a density to .npy/.csv data; write a model folder",
                       description="Fits p(x) (or p(x | c)) by maximum likelihood with "
                       "early stopping on a validation split. Data are standardised by the "
                       "training statistics (of the mapped columns, with --support); NLLs "
                       "are in the data's own units.")
    p.add_argument("data", type=Path, metavar="DATA", help=".npy or .csv file, rows = samples")
    p.add_argument("--out", type=Path, required=True, help="model folder to create")
    p.add_argument("--conditional-columns", type=_int_list, default=None, metavar="I,J",
                   help="0-based column indices of DATA used as the condition c")
    p.add_argument("--support", type=_bounds, default=None, metavar="LOW,HIGH",
                   help="bounds of every modelled (non-condition) column: the density "
                   "puts all its mass in the open interval (LOW, HIGH), by a logit map "
                   "before the flow (a log map for one bound: -inf or inf for no bound, "
                   "e.g. 0,inf); every row must lie strictly inside. A negative LOW "
                   "works as written (--support -3,3)")
    p.add_argument("--column-support", type=_column_bounds, action="append", default=[],
                   metavar="J=LOW,HIGH",
                   help="bounds of DATA column J (0-based, a modelled column), overriding "
                   "--support for it; repeat for more columns (e.g. --column-support "
                   "0=0,1 --column-support 3=-inf,10)")
    p.add_argument("--epochs", type=_positive(int), default=100, help="(default %(default)s)")
    p.add_argument("--batch-size", type=_positive(int), default=256, help="(default %(default)s)")
    p.add_argument("--lr", type=_positive(float), default=1e-3, help="(default %(default)s)")
    p.add_argument("--clipnorm", type=_positive(float), default=5.0,
                   help="global gradient-norm clipping (default %(default)s)")
    p.add_argument("--weight-decay", type=_non_negative, default=0.0, metavar="W",
                   help="decoupled weight decay (AdamW): each step multiplies every weight "
                   "by 1 - lr * W; 0 = plain Adam (default %(default)s)")
    p.add_argument("--validation-split", type=float, default=0.1,
                   help="fraction of rows held out for early stopping (default %(default)s)")
    p.add_argument("--patience", type=_positive(int), default=10,
                   help="early-stopping patience in epochs (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    p.add_argument("--saved-model", action="store_true",
                   help="also export a TensorFlow SavedModel into the model folder")
    _add_xla_option(p)
    p.add_argument("--force", action="store_true", help="replace an existing model folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_options(p, flows=5, hidden="64,64", units=16)

    batch_help = ("rows per compiled batch; memory grows with it, not with the number "
                  "of rows (default %(default)s)")
    p = sub.add_parser("sample", help="draw samples from a model folder",
                       description="Draws -n samples in batches of --batch-size and writes "
                       "them to --out as they come (memory does not grow with -n). Batch k "
                       "uses the noise of seed (--seed, k): the same --seed and --batch-size "
                       "give the same samples; jobs of more than one batch run the inverse "
                       "XLA-compiled (the same samples up to float rounding).")
    p.add_argument("model", type=Path, metavar="DIR")
    p.add_argument("-n", type=_positive(int), required=True, help="number of samples")
    p.add_argument("--out", type=Path, required=True, help=".npy or .csv file to write")
    p.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    p.add_argument("--condition", default=None, metavar="FILE|V1,V2,...",
                   help="conditional models: one condition (comma-separated values), or a "
                   ".npy/.csv file with 1 or n rows")
    p.add_argument("--batch-size", type=_positive(int), default=BATCH_SIZE, help=batch_help)
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--quiet", action="store_true", help="no progress line")

    p = sub.add_parser("log-prob", help="log-density of each row of DATA under a model",
                       description="Writes log p(x | c) of each row of DATA (nats, data "
                       "units) to --out, reading DATA in chunks and evaluating --batch-size "
                       "rows at a time (memory does not grow with the number of rows).")
    p.add_argument("model", type=Path, metavar="DIR")
    p.add_argument("data", type=Path, metavar="DATA")
    p.add_argument("--out", type=Path, required=True, help=".npy or .csv file to write")
    p.add_argument("--batch-size", type=_positive(int), default=BATCH_SIZE, help=batch_help)
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return parser


# ---- Shared helpers -------------------------------------------------------


# Below this many training steps "--xla auto" means off: compiling the training
# step a second way costs seconds, more than a short job could win back.
AUTO_XLA_MIN_STEPS = 1000


def _add_xla_option(p) -> None:
    p.add_argument("--xla", nargs="?", const="on", default="off", choices=("auto", "on", "off"),
                   help="XLA-compile the training step (jit_compile): the same training up to "
                   "float rounding; faster on some CPUs (AVX-512), slower on others (AVX2), "
                   "and each new batch shape compiles once. 'auto' compiles the step both "
                   "ways, times the first steps (each a real step) and keeps the faster "
                   f"(jobs of fewer than {AUTO_XLA_MIN_STEPS} steps and several workers run "
                   "without XLA); --xla alone means 'on' (default %(default)s)")


def _jit_compile(args, steps: int):
    """`jit_compile` for `NAFDensityModel.compile` from `--xla` and the number of steps."""
    if args.xla == "auto":
        return "auto" if steps >= AUTO_XLA_MIN_STEPS else False
    return args.xla == "on"


def _jit_metrics(model) -> dict:
    """How the training step was compiled, for metrics.json."""
    choice = model.jit_choice  # None unless "auto"; its "choice" None if still timing.
    if choice is not None:
        return choice
    return {"choice": "xla" if model.jit_compile else "tf.function"}


def _model_kwargs(args) -> dict:
    return dict(transformer=args.transformer, num_units=args.units, num_layers=args.layers,
                num_flows=args.flows, hidden_units=args.hidden,
                context_units=args.context_units, base_rate=args.base_rate,
                activation=args.activation)


def _settings(args) -> dict:
    skip = ("command", "start_time")
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
            if k not in skip}


def _log_prob(model, x, c=None, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """`log p(x | c)` of array-likes `x` (and `c`), batched, as float64."""
    from tfp_naf.batching import iter_log_prob

    parts = list(iter_log_prob(model, x, c, batch_size=batch_size))
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros([0])


def _load(path: Path):
    from tfp_naf.model_io import ModelDirError, load_model_dir, read_model_config

    try:
        read_model_config(path)  # A bad folder is refused before TensorFlow loads.
        _tensorflow()
        return load_model_dir(path)
    except ModelDirError as e:
        raise CLIError(str(e)) from None


def _check_columns(n_columns: int, layout: dict, path: Path) -> None:
    total = layout["total"]
    if n_columns != total:
        raise CLIError(
            f"{path}: {n_columns} columns, but the model was fitted to {total} "
            f"(x columns {layout['x']}, condition columns {layout['c']})."
        )


def _fit_verbosity(quiet: bool) -> int:
    """Keras' `verbose` for `fit`: nothing when quiet, the progress bar on a terminal,
    else one line per epoch (the bar, redrawn without a terminal, floods logs)."""
    if quiet:
        return 0
    return 1 if is_terminal(sys.stdout) else 2


def _fit_callbacks(tf_keras, has_validation: bool, patience: int):
    callbacks = [tf_keras.callbacks.TerminateOnNaN()]
    if has_validation:
        callbacks.append(tf_keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=patience, restore_best_weights=True))
    return callbacks


class _Rows:
    """Rows `rows` and columns `columns` of `values` (e.g. a memory map), sliceable
    like an array; a slice gathers just its rows."""

    def __init__(self, values, rows: np.ndarray, columns: "list[int]"):
        self.values, self.rows, self.columns = values, rows, columns

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: slice) -> np.ndarray:
        return np.asarray(self.values[self.rows[index]])[:, self.columns]


def _dataset(tf, values, rows: np.ndarray, x_cols, c_cols, batch_size: int,
             seed: "int | None"):
    """A `tf.data.Dataset` of the batches of `values[rows]` (`x` or `{"x", "c"}`).

    Each pass (epoch) visits `rows` in a new order drawn from `[seed, epoch]`
    (in order when `seed` is None); a batch's rows are gathered from `values`
    by index, so nothing is copied beyond one batch.
    """
    dtype = np.float32
    epochs = iter(range(2**62))

    def batches():
        order = rows
        if seed is not None:
            order = np.random.default_rng([seed, next(epochs)]).permutation(rows)
        for start in range(0, len(order), batch_size):
            block = np.asarray(values[np.sort(order[start:start + batch_size])], dtype)
            x = block[:, x_cols]
            yield {"x": x, "c": block[:, c_cols]} if c_cols else x

    x_spec = tf.TensorSpec([None, len(x_cols)], tf.float32)
    spec = {"x": x_spec, "c": tf.TensorSpec([None, len(c_cols)], tf.float32)} if c_cols else x_spec
    steps = math.ceil(len(rows) / batch_size)
    dataset = tf.data.Dataset.from_generator(batches, output_signature=spec)
    # Several workers (TF_CONFIG): each runs this same generator and takes its
    # share of every global batch.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = dataset.with_options(options)
    return dataset.apply(tf.data.experimental.assert_cardinality(steps)).prefetch(2)


def _support(args, x_cols: "list[int]", total: int):
    """The `BoxSupport` of the modelled columns from --support and
    --column-support, or None when neither is given."""
    if args.support is None and not args.column_support:
        return None
    from tfp_naf.support import BoxSupport

    default = (-math.inf, math.inf) if args.support is None else _parse_bounds(args.support)
    bounds = dict.fromkeys(x_cols, default)
    for text in args.column_support:
        column, _, pair = text.partition("=")
        column = int(column)
        if column not in bounds:
            raise CLIError(
                f"--column-support {text}: column {column} is "
                + ("a condition column" if column < total else
                   f"not in DATA (indices 0..{total - 1})")
                + f"; the modelled columns are {x_cols}.")
        bounds[column] = _parse_bounds(pair)
    try:
        return BoxSupport(([bounds[j][0] for j in x_cols], [bounds[j][1] for j in x_cols]),
                          event_size=len(x_cols), dtype="float32")
    except ValueError as e:
        raise CLIError(f"--support/--column-support: {e} (dimensions in the order of the "
                       f"modelled columns {x_cols}).") from None


def _train_moments(values, is_validation: np.ndarray, x_cols, c_cols, support=None,
                   data_name: str = "DATA"):
    """Column means and stds of the training rows, in one pass over `values`.

    With a `support`, the x statistics are those of the transformed columns
    `T(x)` (as `NAFDensityModel.adapt` computes them), and every row,
    validation rows too, must lie inside the support (as the float32 the
    model sees): a row outside is a CLIError.
    """
    from tfp_naf.tables import ColumnMoments

    x_moments, c_moments = ColumnMoments(), ColumnMoments()
    for start in range(0, len(values), CHUNK_ROWS):
        block = np.asarray(values[start:start + CHUNK_ROWS], np.float64)
        training = ~is_validation[start:start + CHUNK_ROWS]
        x = block[:, x_cols]
        if support is not None:
            x = x.astype(np.float32).astype(np.float64)
            outside = support.outside_rows(x)
            if np.any(outside):
                row = int(np.flatnonzero(outside)[0])
                raise CLIError(
                    f"{data_name}: row {start + row} (0-based) lies outside the support "
                    f"(columns {x_cols}: {x[row].tolist()}; low {support.low.tolist()}, high "
                    f"{support.high.tolist()}, bounds excluded).")
            x = support.unconstrain(x[training])[0].numpy()
        else:
            x = x[training]
        x_moments.update(x)
        if c_cols:
            c_moments.update(block[training][:, c_cols])
    return ((x_moments.mean, x_moments.std)
            + ((c_moments.mean, c_moments.std) if c_cols else (None, None)))


def _build_model(args, event_size: int, conditional_size: "int | None", steps: int,
                 standardization, support=None):
    """The model, standardised and compiled (all in one place: a distribution
    strategy's `scope()` can wrap this call)."""
    import tf_keras

    from tfp_naf.keras import NAFDensityModel

    model = NAFDensityModel(event_size=event_size, conditional_size=conditional_size,
                            support=None if support is None else support.config(),
                            **_model_kwargs(args))
    model.set_standardization(*standardization)
    schedule = tf_keras.optimizers.schedules.CosineDecay(args.lr, steps, alpha=0.1)
    if args.weight_decay > 0:
        optimizer = tf_keras.optimizers.AdamW(schedule, weight_decay=args.weight_decay,
                                              global_clipnorm=args.clipnorm)
    else:
        optimizer = tf_keras.optimizers.Adam(schedule, global_clipnorm=args.clipnorm)
    model.compile(optimizer=optimizer, jit_compile=_jit_compile(args, steps))
    return model


# ---- Commands -------------------------------------------------------------


def cmd_fit(args) -> int:
    from tfp_naf import distribute
    from tfp_naf.model_io import ModelDirError, check_replaceable

    try:  # TF_CONFIG (several machines): only the chief writes the model folder.
        chief = distribute.is_chief()
    except ValueError as e:
        raise CLIError(str(e)) from None
    try:
        if chief:
            check_replaceable(args.out.absolute(), args.force)  # Fail before training.
    except ModelDirError as e:
        raise CLIError(str(e)) from None
    if not 0.0 <= args.validation_split < 1.0:
        raise CLIError(f"--validation-split must be in [0, 1); got {args.validation_split}.")
    table = open_table(args.data, chunk_rows=CHUNK_ROWS)
    total = table.n_columns
    c_cols = sorted(set(args.conditional_columns or []))
    if c_cols and c_cols[-1] >= total:
        raise CLIError(f"--conditional-columns {c_cols}: DATA has only {total} columns "
                       f"(indices 0..{total - 1}).")
    x_cols = [j for j in range(total) if j not in c_cols]
    if not x_cols:
        raise CLIError("--conditional-columns leaves no columns to model.")
    support = _support(args, x_cols, total)
    with tempfile.TemporaryDirectory(prefix="tfp-naf-fit-") as scratch:
        with Progress(table.n_rows, f"reading {args.data.name}",
                      enabled=not args.quiet) as progress:
            values = spool_table(table, scratch, progress=progress.update)
        return _fit(args, values, table.header, x_cols, c_cols, support)


def _fit(args, values, header, x_cols: "list[int]", c_cols: "list[int]", support=None) -> int:
    n = len(values)
    n_val = int(round(args.validation_split * n))
    if n - n_val < 2:
        raise CLIError(f"{args.data}: too few rows ({n}) to fit.")
    index = np.int32 if n < 2**31 else np.int64
    perm = np.random.default_rng(args.seed).permutation(n).astype(index)
    val_rows, train_rows = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    del perm
    is_validation = np.zeros(n, bool)
    is_validation[val_rows] = True

    tf = _tensorflow()
    import tf_keras

    from tfp_naf import distribute
    from tfp_naf.model_io import ModelDirError, save_model_dir

    strategy = distribute.strategy_from_environment()  # Before any other TF operation.
    # After the strategy: with a support the statistics pass runs TensorFlow ops.
    standardization = _train_moments(values, is_validation, x_cols, c_cols, support,
                                     data_name=str(args.data))
    del is_validation
    tf_keras.utils.set_random_seed(args.seed)
    steps = args.epochs * math.ceil(len(train_rows) / args.batch_size)
    with strategy.scope():  # --batch-size is the global batch, split over all replicas.
        model = _build_model(args, len(x_cols), len(c_cols) or None, steps, standardization,
                             support)
    train = _dataset(tf, values, train_rows, x_cols, c_cols, args.batch_size, seed=args.seed)
    validation = (_dataset(tf, values, val_rows, x_cols, c_cols, max(args.batch_size, 4096),
                           seed=None) if n_val else None)
    start = time.perf_counter()
    history = model.fit(
        train, epochs=args.epochs, validation_data=validation,
        callbacks=_fit_callbacks(tf_keras, n_val > 0, args.patience),
        verbose=_fit_verbosity(args.quiet),
    )
    seconds = time.perf_counter() - start

    def nll(rows):
        if not len(rows):
            return None
        c = _Rows(values, rows, c_cols) if c_cols else None
        return float(-np.mean(_log_prob(model, _Rows(values, rows, x_cols), c)))

    metrics = {
        "train_nll": nll(train_rows), "validation_nll": nll(val_rows),
        "epochs": len(history.history["loss"]), "fit_seconds": round(seconds, 2),
        "n_train": len(train_rows), "n_validation": n_val,
        "replicas": strategy.num_replicas_in_sync,
        "optimizer": type(model.optimizer).__name__,
        "training_step": _jit_metrics(model),
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "settings": _settings(args),
    }
    if not np.isfinite(metrics["train_nll"]):
        raise CLIError("training diverged (non-finite NLL); try a smaller --lr.")
    layout = {"total": len(x_cols) + len(c_cols), "x": x_cols, "c": c_cols, "header": header}
    try:  # Every worker saves (saving may all-reduce); the others' copies are deleted.
        with distribute.chief_path(args.out) as out:
            save_model_dir(model, out, metadata={"columns": layout}, metrics=metrics,
                           saved_model=args.saved_model, force=args.force)
    except ModelDirError as e:
        raise CLIError(str(e)) from None
    if not distribute.is_chief():
        print(f"train NLL {metrics['train_nll']:.4f}; worker done (the chief writes {args.out})")
        return 0
    print(f"train NLL {metrics['train_nll']:.4f}"
          + (f", validation NLL {metrics['validation_nll']:.4f}" if n_val else "")
          + f" (nats per row, data units); model folder: {args.out}")
    return 0


def _condition(text: str, size: int, n: int, scratch: str):
    """The condition: `[size]` (one for all rows) or an array-like `[n, size]`."""
    if text.lower().endswith((".npy", ".csv")):
        table = open_table(text, what="condition", chunk_rows=CHUNK_ROWS)
        if table.n_columns != size:
            raise CLIError(f"--condition has {table.n_columns} values per row; the model's "
                           f"condition has {size}.")
        if table.n_rows is not None and table.n_rows not in (1, n):
            raise CLIError(f"--condition has {table.n_rows} rows; give 1 or n = {n}.")
        c = spool_table(table, scratch, dtype=np.float64)  # Written back as read.
        if len(c) not in (1, n):
            raise CLIError(f"--condition has {len(c)} rows; give 1 or n = {n}.")
        return np.asarray(c[0], np.float64) if len(c) == 1 else c
    try:
        c = np.array([float(v) for v in text.split(",")])
    except ValueError:
        raise CLIError(f"--condition {text!r}: expected comma-separated numbers "
                       "or a .npy/.csv file.") from None
    if not np.all(np.isfinite(c)):
        raise CLIError(f"--condition {text!r}: values must be finite.")
    if c.size != size:
        raise CLIError(f"--condition has {c.size} values per row; the model's condition "
                       f"has {size}.")
    return c


def cmd_sample(args) -> int:
    _check_out_file(args.out, args.force)
    model, config = _load(args.model)
    layout = config["columns"]
    if model.conditional and args.condition is None:
        raise CLIError(f"{args.model} is a conditional model: give --condition.")
    if not model.conditional and args.condition is not None:
        raise CLIError(f"{args.model} is not a conditional model; drop --condition.")
    from tfp_naf.batching import iter_sample

    with tempfile.TemporaryDirectory(prefix="tfp-naf-sample-") as scratch:
        c = None if args.condition is None else _condition(
            args.condition, model.conditional_size, args.n, scratch)
        samples = iter_sample(model, args.n, c=c, seed=args.seed, batch_size=args.batch_size,
                              jit_compile=args.n > args.batch_size)
        done = 0
        with (TableWriter(args.out, columns=layout["total"], rows=args.n,
                          header=layout.get("header")) as out,
              Progress(args.n, "sampling", enabled=not args.quiet) as progress):
            for x in samples:
                rows = np.empty((len(x), layout["total"]))
                rows[:, layout["x"]] = x
                if c is not None:
                    rows[:, layout["c"]] = c if np.ndim(c) == 1 else c[done:done + len(x)]
                out.write(rows)
                done += len(x)
                progress.update(done)
    print(f"wrote {args.n} samples to {args.out}")
    return 0


def cmd_log_prob(args) -> int:
    _check_out_file(args.out, args.force)
    table = open_table(args.data, chunk_rows=CHUNK_ROWS)
    model, config = _load(args.model)
    layout = config["columns"]
    _check_columns(table.n_columns, layout, args.data)
    from tfp_naf.batching import iter_log_prob

    batch = args.batch_size
    rows_per_chunk = batch * max(1, CHUNK_ROWS // batch)  # Whole batches per chunk.
    # One compiled shape for the whole job: pad a short last chunk to a full batch
    # unless the table is known to fit in one smaller batch.
    pad = table.n_rows is None or table.n_rows > batch
    total, done = 0.0, 0
    with (TableWriter(args.out, columns=None, rows=table.n_rows, header=["log_prob"]) as out,
          Progress(table.n_rows, "log-prob", enabled=not args.quiet) as progress):
        for chunk in table.chunks(rows_per_chunk):
            x = chunk[:, layout["x"]]
            c = chunk[:, layout["c"]] if layout["c"] else None
            for values in iter_log_prob(model, x, c, batch_size=batch, fixed_batch=pad):
                values = values.astype(np.float64)
                out.write(values)
                total += float(values.sum())
                done += len(values)
                progress.update(done)
    print(f"mean log-prob {total / done:.4f} over {done} rows; wrote {args.out}")
    return 0


def _plot(path: Path, model, data: np.ndarray, samples: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = np.percentile(data, [0.5, 99.5], axis=0)
    pad = 0.1 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    grid = [np.linspace(lo[i], hi[i], 200) for i in range(2)]
    gx, gy = np.meshgrid(*grid)
    points = np.stack([gx.ravel(), gy.ravel()], axis=1)
    density = np.exp(_log_prob(model, points)).reshape(gx.shape)
    extent = [lo[0], hi[0], lo[1], hi[1]]
    bins = [np.linspace(lo[i], hi[i], 101) for i in range(2)]
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.5))
    for ax, (name, image) in zip(axes, [
        ("data", np.histogram2d(data[:, 0], data[:, 1], bins)[0].T),
        ("learned density", density),
        ("samples", np.histogram2d(samples[:, 0], samples[:, 1], bins)[0].T),
    ], strict=True):
        ax.imshow(image, origin="lower", extent=extent, cmap="magma", aspect="auto")
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_demo(args) -> int:
    from tfp_naf import datasets

    if args.dataset not in datasets.TOY_DATASETS:
        raise CLIError(f"--dataset {args.dataset!r}: expected one of "
                       f"{', '.join(sorted(datasets.TOY_DATASETS))}.")
    if args.out.exists() and not args.out.is_dir():
        raise CLIError(f"--out {args.out} exists and is not a folder.")
    from tfp_naf.model_io import ModelDirError, check_replaceable

    try:
        check_replaceable((args.out / "model").absolute(), force=True)
    except ModelDirError as e:
        raise CLIError(str(e)) from None

    tf = _tensorflow()
    import tf_keras

    from tfp_naf.keras import NAFDensityModel
    from tfp_naf.model_io import save_model_dir

    tf_keras.utils.set_random_seed(args.seed)
    train = datasets.make_toy(args.dataset, args.train_size, seed=args.seed)
    test = datasets.make_toy(args.dataset, 5000, seed=args.seed + 1)
    model = NAFDensityModel(event_size=2, **_model_kwargs(args))
    model.adapt(train)
    epochs = math.ceil(args.steps / 250)
    steps_per_epoch = math.ceil(args.steps / epochs)
    schedule = tf_keras.optimizers.schedules.CosineDecay(
        args.lr, epochs * steps_per_epoch, alpha=0.05)
    model.compile(optimizer=tf_keras.optimizers.Adam(schedule, global_clipnorm=5.0),
                  jit_compile=_jit_compile(args, epochs * steps_per_epoch))
    dataset = (tf.data.Dataset.from_tensor_slices(train)
               .shuffle(len(train), seed=args.seed).repeat()
               .batch(args.batch_size, drop_remainder=True).prefetch(2))
    print(f"Training a {args.flows}-flow {args.transformer.upper()} NAF on {args.dataset!r} "
          f"({epochs * steps_per_epoch} steps of {args.batch_size})...")
    start = time.perf_counter()
    history = model.fit(dataset, epochs=epochs, steps_per_epoch=steps_per_epoch,
                        validation_data=(test,), validation_batch_size=5000,
                        callbacks=[tf_keras.callbacks.TerminateOnNaN()],
                        verbose=_fit_verbosity(False))
    fit_seconds = time.perf_counter() - start
    samples = model.sample(len(test), seed=args.seed).numpy()
    metrics = {
        "dataset": args.dataset,
        "train_nll": float(-np.mean(_log_prob(model, train))),
        "test_nll": float(-np.mean(_log_prob(model, test))),
        "steps": epochs * steps_per_epoch,
        "fit_seconds": round(fit_seconds, 2),
        "training_step": _jit_metrics(model),
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "settings": _settings(args),
    }
    if not np.isfinite(metrics["test_nll"]):
        raise CLIError("training diverged (non-finite NLL); try a smaller --lr.")
    args.out.mkdir(parents=True, exist_ok=True)
    _plot(args.out / "demo.png", model, test, samples,
          f"NAF ({args.transformer}, {args.flows} flows) on {args.dataset}: "
          f"test NLL {metrics['test_nll']:.3f} nats")
    save_model_dir(model, args.out / "model", force=True, metrics=metrics,
                   metadata={"columns": {"total": 2, "x": [0, 1], "c": [], "header": None}},
                   saved_model=not args.no_saved_model)
    metrics["total_seconds"] = round(time.perf_counter() - args.start_time, 2)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"train NLL {metrics['train_nll']:.4f}, test NLL {metrics['test_nll']:.4f} nats; "
          f"fit {fit_seconds:.1f}s, total {metrics['total_seconds']:.1f}s.\n"
          f"Wrote {args.out / 'demo.png'}, {args.out / 'metrics.json'}, {args.out / 'model'}/")
    return 0


COMMANDS = {"demo": cmd_demo, "fit": cmd_fit, "sample": cmd_sample, "log-prob": cmd_log_prob}


def main(argv: "Sequence[str] | None" = None) -> int:
    """Runs `tfp-naf` with `argv` (default: `sys.argv[1:]`); returns the exit status."""
    start_time = time.perf_counter()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(_join_negative_values(argv))
    args.start_time = start_time
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # As tfp_naf/__init__.py does.
    try:
        return COMMANDS[args.command](args)
    except (CLIError, TableError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
