"""The model folder: a trained `NAFDensityModel` on disk, written atomically.

A model folder holds

* `config.json`: `{"format": "tfp_naf.model", "version": 1, "model": {...}}`,
  the model's constructor arguments plus any metadata (column layout, ...);
* `weights.index`, `weights.data-*`: a TensorFlow checkpoint of all weights,
  the fixed standardisation included;
* `standardization.json`: the standardisation, readable (the checkpoint is
  what `load_model_dir` uses), with the model's `support` (None, or
  `[[low, ...], [high, ...]]`): with a support, `x_mean` and `x_scale` are
  those of the transformed data `T(x)` (`tfp_naf.support`), not of `x`;
* `metrics.json`: whatever the trainer measured;
* `saved_model/` (optional): `tfp_naf.keras.export_saved_model`'s output,
  loadable with TensorFlow alone.

`save_model_dir` builds the folder under a temporary name beside its final
place and renames it into place, so a reader never sees half a folder; an
existing folder is replaced (atomically, where the OS can swap two folders)
only with `force=True`, and only if it is a model folder or empty.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tfp_naf.keras import NAFDensityModel

# TensorFlow and tfp_naf.keras are imported by the functions that need them, so
# that checking a destination (`check_replaceable`) does not import TensorFlow.

__all__ = [
    "FORMAT",
    "ModelDirError",
    "check_replaceable",
    "is_model_dir",
    "load_model_dir",
    "read_model_config",
    "save_model_dir",
]

FORMAT = "tfp_naf.model"
VERSION = 1
_CONFIG, _WEIGHTS, _STANDARDIZATION, _METRICS = (
    "config.json", "weights", "standardization.json", "metrics.json",
)


class ModelDirError(ValueError):
    """A model folder is missing, incomplete, invalid, or in the way."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def is_model_dir(path: "str | os.PathLike") -> bool:
    """Whether `path` is a folder with a tfp_naf `config.json`."""
    try:
        config = json.loads((Path(path) / _CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("format") == FORMAT


def check_replaceable(path: Path, force: bool) -> None:
    """Raises `ModelDirError` unless a model folder may be written at `path`.

    Free, or (with `force`) an existing model folder or empty folder.
    """
    if not os.path.lexists(path):
        return
    if not force:
        raise ModelDirError(f"{path} already exists; use --force to replace it.")
    if not path.is_dir() or path.is_symlink():
        raise ModelDirError(f"{path} exists and is not a folder; not replacing it.")
    if any(path.iterdir()) and not is_model_dir(path):
        raise ModelDirError(
            f"{path} exists and is not a tfp_naf model folder; not replacing it "
            "even with --force."
        )


def _swap(a: Path, b: Path) -> bool:
    """Atomically exchanges two paths (Linux renameat2); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _move_into_place(tmp: Path, path: Path, force: bool) -> None:
    check_replaceable(path, force)  # Again: something may have appeared meanwhile.
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    if _swap(tmp, path):  # `tmp` now holds the old folder.
        shutil.rmtree(tmp)
        return
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
    os.rename(path, old / "model")
    os.rename(tmp, path)
    shutil.rmtree(old)


def save_model_dir(
    model: "NAFDensityModel",
    path: "str | os.PathLike",
    *,
    metadata: "dict[str, Any] | None" = None,
    metrics: "dict[str, Any] | None" = None,
    saved_model: bool = False,
    force: bool = False,
) -> Path:
    """Writes `model` to the model folder `path`, atomically.

    Args:
      model: the model.
      path: the folder to create.
      metadata: JSON-serialisable extras stored in `config.json`.
      metrics: JSON-serialisable, stored as `metrics.json`.
      saved_model: also export a TensorFlow SavedModel to `saved_model/`.
      force: replace an existing model folder (or empty folder) at `path`.

    Returns:
      `path` as a `Path`.

    Raises:
      ModelDirError: `path` exists (without `force`), or is something other
        than a model folder or an empty folder.
    """
    from tfp_naf.export import export_saved_model

    path = Path(path).absolute()
    check_replaceable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700).
        config = {"format": FORMAT, "version": VERSION, "model": model.get_config()}
        config.update(metadata or {})
        _write_json(tmp / _CONFIG, config)
        model.save_weights(os.fspath(tmp / _WEIGHTS))
        _write_json(
            tmp / _STANDARDIZATION,
            {**{name: getattr(model, name).numpy().tolist()
                for name in ("x_mean", "x_scale", "c_mean", "c_scale")},
             "support": model.get_config()["support"]},
        )
        _write_json(tmp / _METRICS, metrics or {})
        if saved_model:
            export_saved_model(model, tmp / "saved_model")
        _move_into_place(tmp, path, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def read_model_config(path: "str | os.PathLike") -> "dict[str, Any]":
    """A model folder's `config.json`, checked (format and version),
    without importing TensorFlow.

    Raises:
      ModelDirError: when `path` is not a model folder of this format.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"{path}: no such model folder.")
    try:
        config = json.loads((path / _CONFIG).read_text())
    except FileNotFoundError:
        raise ModelDirError(f"{path} is not a model folder (no {_CONFIG}).") from None
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{path / _CONFIG} is unreadable: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelDirError(f"{path / _CONFIG} is not a tfp_naf model config.")
    if config.get("version") != VERSION:
        raise ModelDirError(
            f"{path} has model format version {config.get('version')!r}; this tfp_naf "
            f"reads version {VERSION}."
        )
    return config


def load_model_dir(path: "str | os.PathLike") -> "tuple[NAFDensityModel, dict[str, Any]]":
    """Reads a model folder: `(model, config)`, `config` as in `config.json`.

    Raises:
      ModelDirError: when `path` is not a complete, valid model folder.
    """
    config = read_model_config(path)
    path = Path(path)
    import tensorflow as tf

    from tfp_naf.keras import NAFDensityModel

    try:
        model = NAFDensityModel.from_config(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelDirError(f"{path / _CONFIG} has an invalid model config: {e}") from None
    if not (path / f"{_WEIGHTS}.index").is_file():
        raise ModelDirError(f"{path} has no weights ({_WEIGHTS}.index is missing).")
    try:
        status = model.load_weights(os.fspath(path / _WEIGHTS))
        # load_weights refuses weights of more or fewer flows; this catches the rest.
        status.assert_existing_objects_matched().expect_partial()  # Optimizer: not needed.
    except (tf.errors.OpError, AssertionError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelDirError(f"{path}: the weights do not fit the config ({first}).") from None
    return model, config
