"""tfp_naf.tables: chunked reading (CSV, .npy memory maps), incremental writing, moments."""

import io

import numpy as np
import pytest

from tfp_naf.progress import Progress
from tfp_naf.tables import (
    ColumnMoments,
    TableError,
    TableWriter,
    open_table,
    read_table,
    spool_table,
)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 1000])
def test_csv_chunks_equal_the_whole_file(tmp_path, chunk_rows):
    x = np.random.default_rng(0).normal(size=(50, 3)) * [1, 1e6, 1e-6]
    path = tmp_path / "x.csv"
    np.savetxt(path, x, delimiter=",", header="a,b,c", comments="", fmt="%.17g")
    table = open_table(path, chunk_rows=chunk_rows)
    chunks = list(table.chunks())
    assert all(len(chunk) <= chunk_rows for chunk in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks), x)
    assert table.header == ["a", "b", "c"] and table.n_rows == 50 and table.n_columns == 3


def test_csv_fast_and_exact_parsers_agree_on_odd_but_valid_cells(tmp_path):
    # Spaces, quotes, blank lines, exponents, a blank-cells row: each chunk is
    # read by NumPy's parser or, where it refuses, cell by cell; same numbers.
    text = 'x,y\n\n 1.5 , 2\n"3",4e2\n \n-0,+5\n , \n1_000,6\n7,8\n'
    expected = [[1.5, 2], [3, 400], [0, 5], [1000, 6], [7, 8]]
    for chunk_rows in (1, 2, 100):
        values, header = read_table(_write(tmp_path, "odd.csv", text), chunk_rows=chunk_rows)
        np.testing.assert_array_equal(values, expected)
        assert header == ["x", "y"]


def _csv_with_bad_line(tmp_path, bad_line: int, bad: str, n_lines: int = 40):
    lines = ["a,b,c"] + [f"{i},{i + 0.5},{-i}" for i in range(1, n_lines)]
    lines[bad_line - 1] = bad
    return _write(tmp_path, "bad.csv", "\n".join(lines) + "\n")


@pytest.mark.parametrize("chunk_rows", [5, 8, 1000])
def test_a_bad_row_in_the_middle_of_a_chunk_is_refused_with_its_line(tmp_path, chunk_rows):
    # Line 23 is the 22nd data line: inside the 5th chunk of 5 rows, the 3rd of 8.
    cases = [
        ("7,x,9", "line 23, column 2: 'x' is not a number"),
        ("7,8", "line 23: 2 columns, expected 3"),
        ("7,8,9,10", "line 23: 4 columns, expected 3"),
        ("7,,9", "line 23, column 2: '' is not a number"),
    ]
    for bad, message in cases:
        path = _csv_with_bad_line(tmp_path, 23, bad)
        with pytest.raises(TableError, match="^" + str(path) + " " + message.replace("(", r"\(")):
            list(open_table(path, chunk_rows=chunk_rows).chunks())


@pytest.mark.parametrize("chunk_rows", [4, 1000])
def test_nan_rows_are_counted_over_the_whole_file_and_the_first_is_located(tmp_path,
                                                                            chunk_rows):
    text = "a,b\n1,2\n\n3,4\n5,nan\n6,7\n8,9\n10,11\n12,13\ninf,1\n14,15\n"
    path = _write(tmp_path, "nan.csv", text)
    with pytest.raises(TableError) as e:
        list(open_table(path, chunk_rows=chunk_rows).chunks())
    # Line 5 (after the header and a blank line) is data row 3.
    assert str(e.value) == f"{path} line 5: 2 row(s) contain NaN or inf (first: data row 3)."
    np.save(tmp_path / "nan.npy", np.array([[1.0, 2], [3, np.inf], [4, 5], [np.nan, 1]]))
    with pytest.raises(TableError, match=r"nan.npy: 2 row\(s\) contain NaN or inf "
                                         r"\(first: data row 2\)"):
        read_table(tmp_path / "nan.npy", chunk_rows=chunk_rows)


def test_bad_files(tmp_path):
    with pytest.raises(TableError, match="condition file .*nope.csv: no such file"):
        open_table(tmp_path / "nope.csv", what="condition")
    with pytest.raises(TableError, match="use .npy or .csv"):
        open_table(_write(tmp_path, "x.txt", "1\n"))
    with pytest.raises(TableError, match="no data rows"):
        list(open_table(_write(tmp_path, "h.csv", "a,b\n\n")).chunks())
    with pytest.raises(TableError, match="no data rows"):
        open_table(_write(tmp_path, "blank.csv", "\n \n"))
    (tmp_path / "latin.csv").write_bytes(b"1,2\n\xff\xfe,3\n")
    with pytest.raises(TableError, match="not a text CSV file"):
        list(open_table(tmp_path / "latin.csv").chunks())
    np.save(tmp_path / "words.npy", np.array(["a", "b"]))
    with pytest.raises(TableError, match="not numeric"):
        open_table(tmp_path / "words.npy")
    np.save(tmp_path / "cube.npy", np.zeros([2, 2, 2]))
    with pytest.raises(TableError, match="expected a 2-D array"):
        open_table(tmp_path / "cube.npy")


def test_npy_is_memory_mapped_and_spooled_without_a_copy(tmp_path):
    x = np.arange(30, dtype=np.int16).reshape(10, 3)
    np.save(tmp_path / "x.npy", x)
    table = open_table(tmp_path / "x.npy", chunk_rows=4)
    assert isinstance(table.array, np.memmap) and table.n_rows == 10
    assert [chunk.dtype for chunk in table.chunks()] == [np.float64] * 3
    spooled = spool_table(table, tmp_path)
    assert spooled is table.array
    # Passes in order read the file (C order) or slice the map (Fortran order): same rows.
    for order in ("C", "F"):
        y = np.asarray(np.random.default_rng(4).normal(size=(23, 3)), order=order)
        np.save(tmp_path / f"{order}.npy", y)
        chunks = list(open_table(tmp_path / f"{order}.npy", chunk_rows=5).chunks())
        assert [len(chunk) for chunk in chunks] == [5, 5, 5, 5, 3]
        np.testing.assert_array_equal(np.concatenate(chunks), y)
    one_d = tmp_path / "v.npy"
    np.save(one_d, np.arange(5.0))
    assert open_table(one_d).array.shape == (5, 1)


def test_csv_is_spooled_to_a_memory_map(tmp_path):
    x = np.random.default_rng(1).normal(size=(23, 4)).astype(np.float32)
    path = tmp_path / "x.csv"
    np.savetxt(path, x, delimiter=",", fmt="%.9g")
    seen = []
    spooled = spool_table(open_table(path, chunk_rows=5), tmp_path, progress=seen.append)
    assert isinstance(spooled, np.memmap) and spooled.dtype == np.float32
    np.testing.assert_array_equal(spooled, x)  # %.9g round-trips float32 exactly.
    assert seen == [5, 10, 15, 20, 23]


@pytest.mark.parametrize("suffix", [".npy", ".csv"])
@pytest.mark.parametrize("known_rows", [True, False])
def test_writer_appends_chunks_and_renames_into_place(tmp_path, suffix, known_rows):
    x = np.random.default_rng(2).normal(size=(37, 3))
    path = tmp_path / f"out{suffix}"
    with TableWriter(path, columns=3, rows=37 if known_rows else None,
                     header=["a", "b", "c"]) as out:
        for start in range(0, 37, 10):
            out.write(x[start:start + 10])
            assert not path.exists()  # Only a temporary file so far.
    values, header = read_table(path)
    np.testing.assert_allclose(values, x, rtol=1e-8)
    if suffix == ".npy":
        np.testing.assert_array_equal(np.load(path), x)
    else:
        assert header == ["a", "b", "c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    # One value per row (log-prob's output).
    with TableWriter(tmp_path / f"v{suffix}", columns=None, header=["log_prob"]) as out:
        out.write(np.arange(3.0))
        out.write(np.arange(3.0, 5.0))
    values, _ = read_table(tmp_path / f"v{suffix}")
    np.testing.assert_array_equal(values[:, 0], np.arange(5.0))
    if suffix == ".npy":
        assert np.load(tmp_path / f"v{suffix}").shape == (5,)


def test_writer_leaves_nothing_on_error_and_checks_the_row_count(tmp_path):
    path = tmp_path / "out.npy"
    np.save(path, np.ones(3))
    with pytest.raises(RuntimeError):
        with TableWriter(path, columns=2) as out:
            out.write(np.zeros([4, 2]))
            raise RuntimeError("interrupted")
    np.testing.assert_array_equal(np.load(path), np.ones(3))  # The old file, untouched.
    with pytest.raises(ValueError, match="3 rows written, 4 announced"):
        with TableWriter(path, columns=2, rows=4) as out:
            out.write(np.zeros([3, 2]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npy"]


def test_column_moments_match_numpy_in_one_pass():
    x = np.random.default_rng(3).normal(size=(1001, 4)) * [1, 10, 1e-3, 0] + [5, -2, 1e4, 3]
    moments = ColumnMoments()
    for chunk in np.array_split(x, 13):
        moments.update(chunk)
    moments.update(x[:0])
    np.testing.assert_allclose(moments.mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(moments.std, x.std(axis=0), rtol=1e-9, atol=1e-12)
    assert moments.count == 1001


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_draws_on_a_terminal_only_and_wipes_its_line():
    tty = _Terminal()
    with Progress(1000, "sampling", stream=tty, delay=0.0, interval=0.0) as progress:
        progress.update(250)
        assert tty.getvalue().startswith("\rsampling: 250/1,000 rows (25%)")
    assert tty.getvalue().endswith("\r")
    assert tty.getvalue().rsplit("\r", 2)[-2].strip() == ""  # Wiped.
    pipe = io.StringIO()
    with Progress(1000, "sampling", stream=pipe, delay=0.0, interval=0.0) as progress:
        progress.update(250)
    assert pipe.getvalue() == ""
    quiet = _Terminal()
    with Progress(None, "reading", stream=quiet, delay=0.0, enabled=False) as progress:
        progress.update(5)
    assert quiet.getvalue() == ""
