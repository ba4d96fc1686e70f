"""Executes the notebooks in place, storing their outputs (figures included).

    .venv/bin/python notebooks/run_notebooks.py              # all, full mode
    .venv/bin/python notebooks/run_notebooks.py 02 --fast    # matching names, fast mode

Full mode takes a few minutes per notebook on two CPU cores. `--fast` sets
`TFP_NAF_FAST=1` (few steps, small grids), as the test suite does.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
# TensorFlow's start-up chatter on stderr (absl/oneDNN/CUDA notices), not worth committing.
_TF_NOISE = re.compile(r"^(WARNING: All log messages before absl|[IW]\d{4} .*\] )")


def strip_tf_noise(nb: nbformat.NotebookNode) -> None:
    """Drops TensorFlow's start-up log lines from the stderr outputs of `nb`."""
    for cell in nb.cells:
        outputs = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                lines = [ln for ln in out["text"].splitlines(True) if not _TF_NOISE.match(ln)]
                if not "".join(lines).strip():
                    continue
                out["text"] = "".join(lines)
            outputs.append(out)
        if "outputs" in cell:
            cell["outputs"] = outputs


def execute(path: Path, timeout: int = 1800) -> nbformat.NotebookNode:
    """Runs `path` top to bottom in a fresh `python3` kernel (cwd: notebooks/)."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    )
    client.execute()
    return nb


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="substrings of notebook names (default: all)")
    parser.add_argument("--fast", action="store_true", help="TFP_NAF_FAST=1 (for checks)")
    args = parser.parse_args(argv)
    os.environ["TFP_NAF_FAST"] = "1" if args.fast else "0"
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    paths = sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
    if args.names:
        paths = [p for p in paths if any(n in p.name for n in args.names)]
    for path in paths:
        start = time.perf_counter()
        nb = execute(path)
        strip_tf_noise(nb)
        nbformat.write(nb, path)
        size = path.stat().st_size / 1e6
        print(f"{path.name}: {time.perf_counter() - start:.0f} s, {size:.2f} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
