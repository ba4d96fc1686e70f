"""Validation NLL of `--hidden-bias-scale S` runs, paired by seed with the default (scale 1).

Run from the repository root: `python benchmarks/results/select/hidden_bias_scale/pair.py
FILE [FILE ...]` (each a `select_*.json` of `benchmarks.quality --evaluate-on validation`).
The default's value for a seed is its screen run where there is one (`../hidden_bias_first_layer/
select_fl10*.json`, which the library reproduces to the digit) and otherwise the best validation
check of its test runs (`results/final/quality_first_bias_*.json`, seeds 0-2 and 10-12).
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "hidden_bias_first_layer"))
from pair_with_default import _rows, spread_default  # noqa: E402


def main(files) -> None:
    default = spread_default()
    rows = {}
    for f in files:
        for key, value in _rows(f).items():
            rows.setdefault(key, value)
    for ds in sorted({d for d, _ in rows}):
        seeds = sorted(s for (d, s) in rows if d == ds and (d, s) in default)
        if len(seeds) < 2:
            continue
        d = np.array([rows[(ds, s)] - default[(ds, s)] for s in seeds])
        se = d.std(ddof=1) / np.sqrt(len(d))
        print(f"{ds:13s} {d.mean():+.4f} ± {se:.4f} ({len(d)}, {int((d < 0).sum())} better) "
              f"seeds {seeds}")


if __name__ == "__main__":
    main(sys.argv[1:])
