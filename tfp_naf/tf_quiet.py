"""Importing TensorFlow without its start-up logging (for the command line).

TensorFlow 2.21 logs from C++ while its shared libraries load, before its
logging is set up, so `TF_CPP_MIN_LOG_LEVEL` does not reach those lines:

```none
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:... port.cc:153] oneDNN custom operations are on. ...
I0000 00:00:... cudart_stub.cc:31] Could not find cuda drivers on your machine, ...
```

`import_tensorflow` imports TensorFlow with the process's stderr (file
descriptor 2) sent to a temporary file, then writes back every line that is
not such a log line below the level `TF_CPP_MIN_LOG_LEVEL` asks for (absl's
`I`, `W`, `E`, `F` lines are levels 0-3; the default here is 3, see
`tfp_naf/__init__.py`), so a user who sets `TF_CPP_MIN_LOG_LEVEL=0` sees them
all. Nothing about the computation changes (oneDNN stays as TensorFlow
chooses). Python-side TensorFlow warnings (`tf.get_logger()`) are lowered to
errors only by `quiet_python_logging`, which the command line calls.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

__all__ = ["import_tensorflow", "quiet_python_logging"]

# absl's prefix: severity letter, MMDD, time, thread id, file:line].
_ABSL_LINE = re.compile(rb"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^ ]+:\d+\] ")
_ABSL_PREAMBLE = b"WARNING: All log messages before absl::InitializeLog() is called"
_LEVELS = {b"I": 0, b"W": 1, b"E": 2, b"F": 3}


def _min_level() -> int:
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def filter_log(text: bytes, min_level: int) -> bytes:
    """`text` without absl log lines (and their continuation lines) below `min_level`."""
    kept, dropping = [], False
    for line in text.splitlines(keepends=True):
        match = _ABSL_LINE.match(line)
        if match:
            dropping = _LEVELS[match.group(1)] < min_level
        elif line.startswith(_ABSL_PREAMBLE):
            dropping = min_level > 0
        if not dropping:
            kept.append(line)
    return b"".join(kept)


def _fileno(stream) -> "int | None":
    try:
        return stream.fileno()
    except (OSError, ValueError, AttributeError):
        return None


def import_tensorflow():
    """Imports and returns `tensorflow`, filtering its load-time C++ logging."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # No usable stderr: nothing to filter.
        import tensorflow

        return tensorflow
    # Only what C++ writes to the file descriptor is captured: Python's own
    # sys.stderr goes on to the terminal meanwhile (through a copy of the descriptor).
    python_stderr = sys.stderr
    with tempfile.TemporaryFile() as captured, os.fdopen(
        os.dup(saved), "w", buffering=1, encoding=getattr(python_stderr, "encoding", None),
        errors="backslashreplace",
    ) as direct:
        os.dup2(captured.fileno(), 2)
        if _fileno(python_stderr) == 2:
            sys.stderr = direct
        try:
            import tensorflow
        finally:
            sys.stderr = python_stderr
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            rest = filter_log(captured.read(), _min_level())
            if rest:
                sys.stderr.flush()
                os.write(2, rest)
    return tensorflow


def quiet_python_logging() -> None:
    """TensorFlow's and absl's Python loggers report errors only."""
    import logging

    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    try:
        from absl import logging as absl_logging
    except ImportError:
        return
    absl_logging.set_verbosity(absl_logging.ERROR)
