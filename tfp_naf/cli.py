"""The `tfp-naf` command line: demo, fit, sample, log-prob.

```none
tfp-naf demo [--out DIR] [--dataset NAME] [--steps N] [--seed S]
tfp-naf fit DATA --out DIR [--conditional-columns I,J] [--epochs N] ...
tfp-naf sample DIR -n N --out FILE [--seed S] [--condition FILE|V1,V2,...]
tfp-naf log-prob DIR DATA --out FILE
```

DATA and FILE are `.npy` (a 2-D numeric array) or `.csv` (comma-separated
numbers, with an optional header row). Every error is reported as one line on
stderr with exit status 1 (2 for bad command-line syntax), without a traceback.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["main"]

PROG = "tfp-naf"


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit status 1."""


# ---- Tables: .npy and .csv -----------------------------------------------


def _parse_csv(path: Path) -> "tuple[np.ndarray, list[str] | None]":
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise CLIError(f"{path}: not a text CSV file.") from None
    rows = [(i, row) for i, row in enumerate(csv.reader(io.StringIO(text)), start=1)
            if row and any(cell.strip() for cell in row)]
    header = None
    if rows:
        try:
            [float(cell) for cell in rows[0][1]]
        except ValueError:
            header = [cell.strip() for cell in rows[0][1]]
            rows = rows[1:]
    if not rows:
        raise CLIError(f"{path}: no data rows.")
    width = len(header) if header is not None else len(rows[0][1])
    values = np.empty((len(rows), width))
    for r, (line, row) in enumerate(rows):
        if len(row) != width:
            raise CLIError(f"{path} line {line}: {len(row)} columns, expected {width}.")
        for j, cell in enumerate(row):
            try:
                values[r, j] = float(cell)
            except ValueError:
                raise CLIError(
                    f"{path} line {line}, column {j + 1}: {cell.strip()!r} is not a number."
                ) from None
    return values, header


def read_table(path: "str | os.PathLike", what: str = "data") -> "tuple[np.ndarray, list | None]":
    """A finite, non-empty float64 `[rows, columns]` array and the CSV header (or None)."""
    path = Path(path)
    if not path.exists():
        raise CLIError(f"{what} file {path}: no such file.")
    if path.is_dir():
        raise CLIError(f"{what} file {path} is a folder.")
    suffix = path.suffix.lower()
    header = None
    if suffix == ".csv":
        values, header = _parse_csv(path)
    elif suffix == ".npy":
        try:
            values = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CLIError(f"{path}: not a readable .npy array ({e}).") from None
        if not (np.issubdtype(values.dtype, np.number) or values.dtype == bool):
            raise CLIError(f"{path}: the array is not numeric (dtype {values.dtype}).")
        if values.ndim == 1:
            values = values[:, None]
        if values.ndim != 2:
            raise CLIError(f"{path}: expected a 2-D array [rows, columns]; got {values.shape}.")
        values = values.astype(np.float64)
    else:
        raise CLIError(f"{path}: unsupported file type {suffix!r}; use .npy or .csv.")
    if values.shape[0] == 0 or values.shape[1] == 0:
        raise CLIError(f"{path}: no data (shape {values.shape}).")
    bad = np.flatnonzero(~np.all(np.isfinite(values), axis=1))
    if bad.size:
        raise CLIError(
            f"{path}: {bad.size} row(s) contain NaN or inf (first: data row {bad[0] + 1})."
        )
    return values, header


def _check_out_file(path: Path, force: bool) -> None:
    if path.suffix.lower() not in (".npy", ".csv"):
        raise CLIError(f"--out {path}: unsupported file type {path.suffix!r}; use .npy or .csv.")
    if path.is_dir():
        raise CLIError(f"--out {path} is a folder.")
    if path.exists() and not force:
        raise CLIError(f"--out {path} already exists; use --force to overwrite it.")
    if not path.parent.is_dir():
        raise CLIError(f"--out {path}: the folder {path.parent} does not exist.")


def write_table(path: Path, values: np.ndarray, header: "list[str] | None" = None) -> None:
    """Writes `values` as .npy or .csv (by extension), atomically (temp file + rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes it private (0600).
        with os.fdopen(fd, "wb") as f:
            if path.suffix.lower() == ".npy":
                np.save(f, values)
            else:
                np.savetxt(f, np.atleast_2d(values.T).T, delimiter=",", fmt="%.9g",
                           header=",".join(header) if header else "", comments="")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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


def _add_model_options(p: argparse.ArgumentParser, flows: int, hidden: str, units: int) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--transformer", choices=("dsf", "ddsf"), default="dsf",
                   help="deep sigmoidal (dsf) or deep dense sigmoidal (ddsf) flow")
    g.add_argument("--units", type=_positive(int), default=units,
                   help="sigmoid units per transformer layer (default %(default)s)")
    g.add_argument("--layers", type=_positive(int), default=2,
                   help="transformer layers, ddsf only (default %(default)s)")
    g.add_argument("--flows", type=_positive(int), default=flows,
                   help="NAFs chained, with reversals between (default %(default)s)")
    g.add_argument("--hidden", type=_int_list, default=hidden,
                   help="MADE hidden widths, e.g. 64,64 (default %(default)s)")
    g.add_argument("--context-units", type=_positive(int), default=None,
                   help="use the compact conditioner with this many features per dimension")


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
    _add_model_options(p, flows=5, hidden="64,64", units=16)

    p = sub.add_parser("fit", help="fit a density to .npy/.csv data; write a model folder",
                       description="Fits p(x) (or p(x | c)) by maximum likelihood with "
                       "early stopping on a validation split. Data are standardised by the "
                       "training statistics; NLLs are in the data's own units.")
    p.add_argument("data", type=Path, metavar="DATA", help=".npy or .csv file, rows = samples")
    p.add_argument("--out", type=Path, required=True, help="model folder to create")
    p.add_argument("--conditional-columns", type=_int_list, default=None, metavar="I,J",
                   help="0-based column indices of DATA used as the condition c")
    p.add_argument("--epochs", type=_positive(int), default=100, help="(default %(default)s)")
    p.add_argument("--batch-size", type=_positive(int), default=256, help="(default %(default)s)")
    p.add_argument("--lr", type=_positive(float), default=1e-3, help="(default %(default)s)")
    p.add_argument("--clipnorm", type=_positive(float), default=5.0,
                   help="global gradient-norm clipping (default %(default)s)")
    p.add_argument("--validation-split", type=float, default=0.1,
                   help="fraction of rows held out for early stopping (default %(default)s)")
    p.add_argument("--patience", type=_positive(int), default=10,
                   help="early-stopping patience in epochs (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    p.add_argument("--saved-model", action="store_true",
                   help="also export a TensorFlow SavedModel into the model folder")
    p.add_argument("--force", action="store_true", help="replace an existing model folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_options(p, flows=5, hidden="64,64", units=16)

    p = sub.add_parser("sample", help="draw samples from a model folder")
    p.add_argument("model", type=Path, metavar="DIR")
    p.add_argument("-n", type=_positive(int), required=True, help="number of samples")
    p.add_argument("--out", type=Path, required=True, help=".npy or .csv file to write")
    p.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    p.add_argument("--condition", default=None, metavar="FILE|V1,V2,...",
                   help="conditional models: one condition (comma-separated values), or a "
                   ".npy/.csv file with 1 or n rows")
    p.add_argument("--force", action="store_true", help="overwrite --out")

    p = sub.add_parser("log-prob", help="log-density of each row of DATA under a model")
    p.add_argument("model", type=Path, metavar="DIR")
    p.add_argument("data", type=Path, metavar="DATA")
    p.add_argument("--out", type=Path, required=True, help=".npy or .csv file to write")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    return parser


# ---- Shared helpers -------------------------------------------------------


def _model_kwargs(args) -> dict:
    return dict(transformer=args.transformer, num_units=args.units, num_layers=args.layers,
                num_flows=args.flows, hidden_units=args.hidden,
                context_units=args.context_units)


def _settings(args) -> dict:
    skip = ("command", "start_time")
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
            if k not in skip}


def _batched_log_prob(model, x, c=None, batch: int = 4096) -> np.ndarray:
    dtype = model.dtype
    out = []
    for i in range(0, len(x), batch):
        xi = x[i:i + batch].astype(dtype)
        ci = None if c is None else c[i:i + batch].astype(dtype)
        out.append(model.log_prob(xi, ci).numpy())
    return np.concatenate(out).astype(np.float64)


def _load(path: Path):
    from tfp_naf.model_io import ModelDirError, load_model_dir

    try:
        return load_model_dir(path)
    except ModelDirError as e:
        raise CLIError(str(e)) from None


def _split_columns(values: np.ndarray, layout: dict, path: Path):
    total = layout["total"]
    if values.shape[1] != total:
        raise CLIError(
            f"{path}: {values.shape[1]} columns, but the model was fitted to {total} "
            f"(x columns {layout['x']}, condition columns {layout['c']})."
        )
    c = values[:, layout["c"]] if layout["c"] else None
    return values[:, layout["x"]], c


def _fit_callbacks(tf_keras, has_validation: bool, patience: int):
    callbacks = [tf_keras.callbacks.TerminateOnNaN()]
    if has_validation:
        callbacks.append(tf_keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=patience, restore_best_weights=True))
    return callbacks


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
    values, header = read_table(args.data)
    total = values.shape[1]
    c_cols = sorted(set(args.conditional_columns or []))
    if c_cols and c_cols[-1] >= total:
        raise CLIError(f"--conditional-columns {c_cols}: DATA has only {total} columns "
                       f"(indices 0..{total - 1}).")
    x_cols = [j for j in range(total) if j not in c_cols]
    if not x_cols:
        raise CLIError("--conditional-columns leaves no columns to model.")
    n_val = int(round(args.validation_split * len(values)))
    if len(values) - n_val < 2:
        raise CLIError(f"{args.data}: too few rows ({len(values)}) to fit.")

    import tf_keras

    from tfp_naf.keras import NAFDensityModel
    from tfp_naf.model_io import save_model_dir

    strategy = distribute.strategy_from_environment()  # Before any other TF operation.
    tf_keras.utils.set_random_seed(args.seed)
    perm = np.random.default_rng(args.seed).permutation(len(values))
    val_rows, train_rows = perm[:n_val], perm[n_val:]
    x, c = values[:, x_cols].astype(np.float32), values[:, c_cols].astype(np.float32)

    def inputs(rows):
        return {"x": x[rows], "c": c[rows]} if c_cols else x[rows]

    with strategy.scope():  # --batch-size is the global batch, split over all replicas.
        model = NAFDensityModel(event_size=len(x_cols),
                                conditional_size=len(c_cols) or None, **_model_kwargs(args))
        model.adapt(x[train_rows], c[train_rows] if c_cols else None)
        steps = args.epochs * math.ceil(len(train_rows) / args.batch_size)
        schedule = tf_keras.optimizers.schedules.CosineDecay(args.lr, steps, alpha=0.1)
        model.compile(optimizer=tf_keras.optimizers.Adam(schedule, global_clipnorm=args.clipnorm))
    start = time.perf_counter()
    history = model.fit(
        inputs(train_rows), batch_size=args.batch_size, epochs=args.epochs, shuffle=True,
        validation_data=(inputs(val_rows),) if n_val else None,
        callbacks=_fit_callbacks(tf_keras, n_val > 0, args.patience),
        verbose=0 if args.quiet else "auto",
    )
    seconds = time.perf_counter() - start

    def nll(rows):
        return float(-np.mean(_batched_log_prob(
            model, x[rows], c[rows] if c_cols else None))) if len(rows) else None

    metrics = {
        "train_nll": nll(train_rows), "validation_nll": nll(val_rows),
        "epochs": len(history.history["loss"]), "fit_seconds": round(seconds, 2),
        "n_train": len(train_rows), "n_validation": n_val,
        "replicas": strategy.num_replicas_in_sync,
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "settings": _settings(args),
    }
    if not np.isfinite(metrics["train_nll"]):
        raise CLIError("training diverged (non-finite NLL); try a smaller --lr.")
    layout = {"total": total, "x": x_cols, "c": c_cols, "header": header}
    try:  # Every worker saves (saving may all-reduce); the others' copies are deleted.
        with distribute.chief_path(args.out) as out:
            save_model_dir(model, out, metadata={"columns": layout}, metrics=metrics,
                           saved_model=args.saved_model, force=args.force)
    except ModelDirError as e:
        raise CLIError(str(e)) from None
    if not chief:
        print(f"train NLL {metrics['train_nll']:.4f}; worker done (the chief writes {args.out})")
        return 0
    print(f"train NLL {metrics['train_nll']:.4f}"
          + (f", validation NLL {metrics['validation_nll']:.4f}" if n_val else "")
          + f" (nats per row, data units); model folder: {args.out}")
    return 0


def _condition(text: str, size: int, n: int) -> np.ndarray:
    if text.lower().endswith((".npy", ".csv")):
        c, _ = read_table(text, what="condition")
    else:
        try:
            c = np.array([[float(v) for v in text.split(",")]])
        except ValueError:
            raise CLIError(f"--condition {text!r}: expected comma-separated numbers "
                           "or a .npy/.csv file.") from None
        if not np.all(np.isfinite(c)):
            raise CLIError(f"--condition {text!r}: values must be finite.")
    if c.shape[1] != size:
        raise CLIError(f"--condition has {c.shape[1]} values per row; the model's condition "
                       f"has {size}.")
    if c.shape[0] not in (1, n):
        raise CLIError(f"--condition has {c.shape[0]} rows; give 1 or n = {n}.")
    return np.broadcast_to(c, (n, size))


def cmd_sample(args) -> int:
    _check_out_file(args.out, args.force)
    model, config = _load(args.model)
    layout = config["columns"]
    if model.conditional and args.condition is None:
        raise CLIError(f"{args.model} is a conditional model: give --condition.")
    if not model.conditional and args.condition is not None:
        raise CLIError(f"{args.model} is not a conditional model; drop --condition.")
    c = None if args.condition is None else _condition(
        args.condition, model.conditional_size, args.n)
    x = model.sample(args.n, c=None if c is None else c.astype(model.dtype),
                     seed=args.seed).numpy().astype(np.float64)
    rows = np.empty((args.n, layout["total"]))
    rows[:, layout["x"]] = x
    if c is not None:
        rows[:, layout["c"]] = c
    write_table(args.out, rows, layout.get("header"))
    print(f"wrote {args.n} samples to {args.out}")
    return 0


def cmd_log_prob(args) -> int:
    _check_out_file(args.out, args.force)
    model, config = _load(args.model)
    values, _ = read_table(args.data)
    x, c = _split_columns(values, config["columns"], args.data)
    log_prob = _batched_log_prob(model, x, c)
    write_table(args.out, log_prob, ["log_prob"])
    print(f"mean log-prob {np.mean(log_prob):.4f} over {len(log_prob)} rows; wrote {args.out}")
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
    density = np.exp(_batched_log_prob(model, points)).reshape(gx.shape)
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

    import tensorflow as tf
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
    model.compile(optimizer=tf_keras.optimizers.Adam(schedule, global_clipnorm=5.0))
    dataset = (tf.data.Dataset.from_tensor_slices(train)
               .shuffle(len(train), seed=args.seed).repeat()
               .batch(args.batch_size, drop_remainder=True).prefetch(2))
    print(f"Training a {args.flows}-flow {args.transformer.upper()} NAF on {args.dataset!r} "
          f"({epochs * steps_per_epoch} steps of {args.batch_size})...")
    start = time.perf_counter()
    history = model.fit(dataset, epochs=epochs, steps_per_epoch=steps_per_epoch,
                        validation_data=(test,), validation_batch_size=5000,
                        callbacks=[tf_keras.callbacks.TerminateOnNaN()], verbose="auto")
    fit_seconds = time.perf_counter() - start
    samples = model.sample(len(test), seed=args.seed).numpy()
    metrics = {
        "dataset": args.dataset,
        "train_nll": float(-np.mean(_batched_log_prob(model, train))),
        "test_nll": float(-np.mean(_batched_log_prob(model, test))),
        "steps": epochs * steps_per_epoch,
        "fit_seconds": round(fit_seconds, 2),
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
    args = _parser().parse_args(argv)
    args.start_time = start_time
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return COMMANDS[args.command](args)
    except CLIError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
