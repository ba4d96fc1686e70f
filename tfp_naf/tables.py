"""Tables on disk: `.npy` and `.csv`, read and written in chunks (bounded memory).

Reading (`open_table`): a `.npy` file is memory-mapped (`np.load(...,
mmap_mode="r")`; passes in order read the file instead), a `.csv` file is
parsed `chunk_rows` lines at a time by NumPy's C parser (`np.loadtxt` on the
chunk's lines); only a chunk that the fast parser refuses is parsed again cell
by cell, to name the first bad line exactly. No new dependency: NumPy's parser
reads a 1,000,000 x 10 CSV in a few seconds (`benchmarks/scaling.py`).
Every row is checked: a wrong column count, a non-numeric cell and NaN/inf
rows are refused with one-line `TableError`s giving the CSV line number; for
NaN/inf the whole file is scanned first, so the message also says how many rows are bad.

A CSV file is numbers separated by commas, one row per line, with an optional
header line (the first non-blank line, if any of its cells is not a number);
blank lines are skipped.

Writing (`TableWriter`): rows are appended chunk by chunk to a temporary file
beside the destination, renamed into place when complete (a reader never
sees half a file; on an error nothing is left behind). A `.npy` file gets its
header first (with room for the final shape when the row count is not known
yet), then the raw rows.

`ColumnMoments` accumulates column means and standard deviations over chunks
in one pass (Chan et al.'s parallel update, in float64).
"""

from __future__ import annotations

import csv
import itertools
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "ColumnMoments",
    "Table",
    "TableError",
    "TableWriter",
    "open_table",
    "read_table",
    "spool_table",
]

DEFAULT_CHUNK_ROWS = 65536


class TableError(ValueError):
    """A table file is missing, unreadable, or holds bad rows (one-line message)."""


# ---- Reading --------------------------------------------------------------


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


class Table:
    """A `.npy` or `.csv` table, read in chunks; see `open_table`.

    Attributes:
      path: the file.
      header: the CSV header's names, or None.
      n_columns: the number of columns.
      n_rows: the number of data rows; None for a CSV file until a pass over
        it (`chunks`) has finished.
    """

    def __init__(self, path: Path, what: str, chunk_rows: int):
        self.path, self.what, self.chunk_rows = path, what, int(chunk_rows)
        self.header: "list[str] | None" = None
        self.n_rows: "int | None" = None
        self.kind = path.suffix.lower().lstrip(".")
        self._array = None
        if self.kind == "npy":
            self._open_npy()
        else:
            self._open_csv()

    # -- .npy

    def _open_npy(self) -> None:
        path = self.path
        try:
            try:
                values = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError:  # E.g. an empty array: nothing to map.
                values = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise TableError(f"{path}: not a readable .npy array ({e}).") from None
        if not (np.issubdtype(values.dtype, np.number) or values.dtype == bool):
            raise TableError(f"{path}: the array is not numeric (dtype {values.dtype}).")
        if values.ndim == 1:
            values = values.reshape(-1, 1)
        if values.ndim != 2:
            raise TableError(f"{path}: expected a 2-D array [rows, columns]; got {values.shape}.")
        if values.shape[0] == 0 or values.shape[1] == 0:
            raise TableError(f"{path}: no data (shape {values.shape}).")
        self._array = values
        self.n_rows, self.n_columns = values.shape
        # Sequential passes read the file rather than the map: pages of a map that
        # has been read count towards the process's resident memory.
        self._offset = getattr(values, "offset", None) if values.flags.c_contiguous else None

    @property
    def array(self):
        """The `.npy` file's memory map `[rows, columns]` (rows not yet checked)."""
        if self._array is None:
            raise TypeError(f"{self.path} is a CSV file: use chunks() or spool_table().")
        return self._array

    # -- .csv

    def _open_csv(self) -> None:
        self._data_start = 0  # Lines before the first data line.
        with open(self.path, encoding="utf-8") as f:
            try:
                for line_no, line in enumerate(f, start=1):
                    cells = next(csv.reader([line]), [])
                    if not any(cell.strip() for cell in cells):
                        continue
                    if all(_is_number(cell) for cell in cells):
                        self._data_start = line_no - 1
                    else:
                        self.header = [cell.strip() for cell in cells]
                        self._data_start = line_no
                    self.n_columns = len(cells)
                    return
            except UnicodeDecodeError:
                raise TableError(f"{self.path}: not a text CSV file.") from None
        raise TableError(f"{self.path}: no data rows.")

    def _parse_exactly(self, lines: Sequence[str], first_line: int):
        """The cell-by-cell parser: (values, line numbers); raises at the first bad line."""
        width = self.n_columns
        rows, line_numbers = [], []
        for offset, row in enumerate(csv.reader(lines)):
            if not any(cell.strip() for cell in row):
                continue
            line = first_line + offset
            if len(row) != width:
                raise TableError(f"{self.path} line {line}: {len(row)} columns, expected {width}.")
            values = []
            for j, cell in enumerate(row):
                try:
                    values.append(float(cell))
                except ValueError:
                    raise TableError(
                        f"{self.path} line {line}, column {j + 1}: {cell.strip()!r} is not a "
                        "number."
                    ) from None
            rows.append(values)
            line_numbers.append(line)
        return np.array(rows, np.float64).reshape(-1, width), np.array(line_numbers, np.int64)

    def _parse(self, lines: "list[str]", first_line: int):
        """(values `[k, columns]`, line numbers `[k]`) of a chunk of lines."""
        try:
            with warnings.catch_warnings():  # "input contained no data": blank lines only.
                warnings.simplefilter("ignore", UserWarning)
                values = np.loadtxt(lines, delimiter=",", dtype=np.float64, ndmin=2,
                                    comments=None, quotechar='"')
        except ValueError:
            return self._parse_exactly(lines, first_line)
        if values.shape[1] != self.n_columns and len(values):
            return self._parse_exactly(lines, first_line)
        if len(values) == len(lines):
            return values, np.arange(first_line, first_line + len(lines))
        return self._parse_exactly(lines, first_line)  # Blank lines: find each row's line.

    def _csv_chunks(self, rows: int) -> Iterator["tuple[np.ndarray, np.ndarray]"]:
        with open(self.path, encoding="utf-8") as f:
            try:
                for _ in itertools.islice(f, self._data_start):
                    pass
                line_no = self._data_start
                while True:
                    chunk = list(itertools.islice(f, rows))
                    if not chunk:
                        return
                    values, line_numbers = self._parse(chunk, line_no + 1)
                    line_no += len(chunk)
                    if len(values):
                        yield values, line_numbers
            except UnicodeDecodeError:
                raise TableError(f"{self.path}: not a text CSV file.") from None

    def _npy_chunks(self, rows: int) -> Iterator["tuple[np.ndarray, None]"]:
        values = self._array
        if self._offset is None:  # Not a plain C-ordered map: slice it.
            for i in range(0, self.n_rows, rows):
                yield np.asarray(values[i:i + rows], np.float64), None
            return
        dtype, width = values.dtype, self.n_columns
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            for i in range(0, self.n_rows, rows):
                k = min(rows, self.n_rows - i)
                block = np.fromfile(f, dtype=dtype, count=k * width)
                if block.size != k * width:
                    raise TableError(f"{self.path}: the file ends before its last row.")
                yield block.reshape(k, width).astype(np.float64), None

    # -- Both

    def chunks(self, rows: "int | None" = None) -> Iterator[np.ndarray]:
        """Yields the data rows as float64 arrays `[k, columns]`, `k <= rows`.

        Every row is checked on the way; a NaN/inf row stops the yielding,
        the rest of the file is scanned to count such rows, and a
        `TableError` is raised. After a complete pass `n_rows` is set.
        """
        rows = int(rows or self.chunk_rows)
        if self.kind == "npy":
            source = self._npy_chunks(rows)
        else:
            source = self._csv_chunks(rows)
        done = 0
        bad_count, first_bad = 0, None
        for values, line_numbers in source:
            finite = np.isfinite(values).all(axis=1)
            if not finite.all():
                bad = np.flatnonzero(~finite)
                if first_bad is None:
                    first_bad = (done + bad[0] + 1,
                                 None if line_numbers is None else int(line_numbers[bad[0]]))
                bad_count += bad.size
            if first_bad is None:
                yield values
            done += len(values)
        if first_bad is not None:
            where = "" if first_bad[1] is None else f" line {first_bad[1]}"
            raise TableError(f"{self.path}{where}: {bad_count} row(s) contain NaN or inf "
                             f"(first: data row {first_bad[0]}).")
        if done == 0:
            raise TableError(f"{self.path}: no data rows.")
        self.n_rows = done


def open_table(
    path: "str | os.PathLike", what: str = "data", chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> Table:
    """Opens a `.npy` or `.csv` table for reading in chunks.

    Reads only what it needs to know the columns (a `.npy` header, a CSV
    file's first non-blank line); the rows are checked as `Table.chunks`
    reads them.

    Args:
      path: the file.
      what: what the file is, for messages ("data", "condition").
      chunk_rows: rows per chunk.

    Raises:
      TableError: a missing file, a folder, another file type, an unreadable
        or empty table.

    #### Examples

    ```python
    import tempfile
    from pathlib import Path
    from tfp_naf.tables import open_table

    path = Path(tempfile.mkdtemp()) / "t.csv"
    path.write_text("a,b\\n1,2\\n3,4\\n5,6\\n")
    table = open_table(path, chunk_rows=2)
    [chunk.shape for chunk in table.chunks()]     # [(2, 2), (1, 2)]
    table.header, table.n_rows                     # (['a', 'b'], 3)
    ```
    """
    path = Path(path)
    if not path.exists():
        raise TableError(f"{what} file {path}: no such file.")
    if path.is_dir():
        raise TableError(f"{what} file {path} is a folder.")
    if path.suffix.lower() not in (".npy", ".csv"):
        raise TableError(f"{path}: unsupported file type {path.suffix.lower()!r}; "
                         "use .npy or .csv.")
    return Table(path, what, chunk_rows)


def read_table(
    path: "str | os.PathLike", what: str = "data", chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> "tuple[np.ndarray, list[str] | None]":
    """The whole table as a finite, non-empty float64 `[rows, columns]` array, and
    the CSV header (or None). For small tables; see `open_table` for large ones.
    """
    table = open_table(path, what, chunk_rows)
    return np.concatenate(list(table.chunks())), table.header


def spool_table(table: Table, directory: "str | os.PathLike", dtype=np.float32,
                progress=None):
    """All rows of `table`, checked, as a read-only array `[rows, columns]`.

    A `.npy` file's own memory map is returned once its rows are checked
    (one pass, nothing copied). A CSV file is parsed once and its rows are
    written as raw `dtype` values to a file in `directory` (which the caller
    removes), returned as a memory map, so memory stays bounded.

    Args:
      table: from `open_table`.
      directory: where a CSV file's rows go.
      dtype: their type.
      progress: None, or a callable taking the number of rows read so far.
    """
    if table.kind == "npy":
        done = 0
        for chunk in table.chunks():
            done += len(chunk)
            if progress is not None:
                progress(done)
        return table.array
    path = Path(directory) / f"{table.path.stem}.{np.dtype(dtype).name}.raw"
    done = 0
    with open(path, "wb") as f:
        for chunk in table.chunks():
            f.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
            done += len(chunk)
            if progress is not None:
                progress(done)
    return np.memmap(path, dtype=dtype, mode="r", shape=(table.n_rows, table.n_columns))


# ---- Statistics -------------------------------------------------------------


class ColumnMoments:
    """Column means and standard deviations, accumulated chunk by chunk.

    Chunks are merged with the parallel update of Chan, Golub & LeVeque
    (float64), so one pass gives what `np.mean`/`np.std` give for all rows:

    ```none
    n = n_a + n_b,  delta = mean_b - mean_a,
    mean = mean_a + delta n_b / n,
    M2 = M2_a + M2_b + delta^2 n_a n_b / n,   std = sqrt(M2 / n).
    ```

    #### Examples

    ```python
    import numpy as np
    from tfp_naf.tables import ColumnMoments

    x = np.random.default_rng(0).normal(size=(1000, 3))
    moments = ColumnMoments()
    for chunk in np.array_split(x, 7):
        moments.update(chunk)
    np.allclose(moments.mean, x.mean(0)), np.allclose(moments.std, x.std(0))  # True, True
    ```
    """

    def __init__(self):
        self.count = 0
        self.mean = None
        self._m2 = None

    def update(self, chunk) -> None:
        chunk = np.asarray(chunk, np.float64)
        if chunk.ndim != 2:
            raise ValueError(f"Expected a 2-D chunk; got shape {chunk.shape}.")
        if len(chunk) == 0:
            return
        n_b = len(chunk)
        mean_b = chunk.mean(axis=0)
        m2_b = ((chunk - mean_b) ** 2).sum(axis=0)
        if self.count == 0:
            self.count, self.mean, self._m2 = n_b, mean_b, m2_b
            return
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + delta**2 * (self.count * n_b / n)
        self.count = n

    @property
    def std(self) -> np.ndarray:
        """The population standard deviation (`ddof=0`, as `tf.nn.moments`)."""
        if self.count == 0:
            raise ValueError("No rows seen.")
        return np.sqrt(self._m2 / self.count)


# ---- Writing ----------------------------------------------------------------

_NPY_MAGIC = b"\x93NUMPY\x01\x00"
_NPY_RESERVED_ROWS = 10**20  # Header room for any row count.


def _npy_header(dtype: np.dtype, shape: "tuple[int, ...]", length: "int | None" = None) -> bytes:
    """A version 1.0 `.npy` header for `shape`, padded to `length` bytes (or the
    room any row count needs, a multiple of 64)."""
    def text(shape):
        return repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                     "shape": tuple(shape)})

    if length is None:
        room = len(_NPY_MAGIC) + 2 + len(text((_NPY_RESERVED_ROWS, *shape[1:]))) + 1
        length = -(-room // 64) * 64
    body = text(shape).encode("latin1")
    pad = length - len(_NPY_MAGIC) - 2 - len(body) - 1
    if pad < 0:
        raise ValueError(f"No room for the .npy header of shape {shape}.")
    body += b" " * pad + b"\n"
    return _NPY_MAGIC + len(body).to_bytes(2, "little") + body


class TableWriter:
    """Writes a table to `.npy` or `.csv` (by extension) chunk by chunk, atomically.

    Use as a context manager; `write` appends rows. The file appears at
    `path` (replacing what is there) only when the block ends without an
    exception; otherwise the temporary file is removed.

    Args:
      path: the destination.
      columns: None for a 1-D table (one value per row), else the number of
        columns.
      rows: the number of rows, if known (checked at the end).
      header: CSV header names (ignored for `.npy`).
      dtype: the `.npy` dtype (CSV: `%.9g`, enough for float32 exactly).

    #### Examples

    ```python
    import tempfile
    from pathlib import Path
    import numpy as np
    from tfp_naf.tables import TableWriter

    path = Path(tempfile.mkdtemp()) / "out.npy"
    with TableWriter(path, columns=2) as out:
        out.write(np.ones([3, 2]))
        out.write(np.zeros([2, 2]))
    np.load(path).shape          # (5, 2)
    ```
    """

    def __init__(self, path: "str | os.PathLike", columns: "int | None", rows: "int | None" = None,
                 header: "Sequence[str] | None" = None, dtype=np.float64):
        self.path = Path(path)
        self.columns, self.rows = columns, rows
        self.header = list(header) if header else None
        self.dtype = np.dtype(dtype)
        self.npy = self.path.suffix.lower() == ".npy"
        self.written = 0
        self._file = self._tmp = None

    def _shape(self, rows: int):
        return (rows,) if self.columns is None else (rows, self.columns)

    def __enter__(self) -> "TableWriter":
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.tmp-")
        try:
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(self._tmp, 0o666 & ~mask)  # mkstemp makes it private (0600).
            self._file = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            os.remove(self._tmp)
            raise
        if self.npy:
            self._header_length = len(_npy_header(self.dtype, self._shape(0)))
            self._file.write(_npy_header(self.dtype, self._shape(self.rows or 0),
                                         self._header_length))
        elif self.header:
            self._file.write((",".join(self.header) + "\n").encode())
        return self

    def write(self, chunk) -> None:
        """Appends rows `[k]` (1-D table) or `[k, columns]`."""
        chunk = np.asarray(chunk)
        if chunk.shape[1:] != self._shape(0)[1:]:
            raise ValueError(f"Expected rows of shape {self._shape(0)[1:]}; got {chunk.shape[1:]}.")
        if self.npy:
            self._file.write(np.ascontiguousarray(chunk, self.dtype).tobytes())
        elif len(chunk):
            width = 1 if self.columns is None else self.columns
            row = ",".join(["%.9g"] * width) + "\n"
            self._file.write(((row * len(chunk)) % tuple(chunk.ravel().tolist())).encode())
        self.written += len(chunk)

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                if self.rows is not None and self.written != self.rows:
                    raise ValueError(f"{self.path}: {self.written} rows written, "
                                     f"{self.rows} announced.")
                if self.npy and self.rows is None:
                    self._file.seek(0)
                    self._file.write(_npy_header(self.dtype, self._shape(self.written),
                                                 self._header_length))
            self._file.close()
            if kind is None:
                os.replace(self._tmp, self.path)
        finally:
            if not self._file.closed:
                self._file.close()
            if os.path.exists(self._tmp):
                os.remove(self._tmp)
