"""Merges quality result files into one table: `python -m benchmarks.report [files...]`.

Later files override earlier ones for the same (model, dataset, seed); cells
with several seeds give the mean ± standard error over seeds. Without
arguments it reads benchmarks/results/quality*.json except the --fast ones, in
name order, and writes quality_merged.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.quality import RESULTS, markdown


def merge(paths) -> "list[dict]":
    table = {}
    for path in paths:
        for r in json.loads(Path(path).read_text()):
            table[(r["model"], r["dataset"], r.get("seed", 0))] = r
    return list(table.values())


def main(argv=None) -> str:
    paths = (argv if argv is not None else sys.argv[1:]) or sorted(
        p for p in RESULTS.glob("quality*.json") if "fast" not in p.name)
    text = markdown(merge(paths))
    (RESULTS / "quality_merged.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
