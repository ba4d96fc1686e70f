"""Validation NLL of first-layer bias spreads, paired by seed with the default before them.

Run from the repository root: `python benchmarks/results/select/hidden_bias_first_layer/
pair_with_default.py [select_T.json ...]`. The default before (the learned-softness ReLU, no
bias draws) is `../soft_relu/select_sr05*.json` for seeds 0-7 and the best validation check
of its fresh-seed test runs (`results/final/quality_fresh_*.json`) for seeds 10-12; `s = 1`
is `select_fl10*.json` (seeds 0-7) and the validation of the new default's test runs
(`results/final/quality_first_bias_*.json`, seeds 0-2 and 10-12, where a seed is in both, the
screen's run, which the library reproduces to the digit). Each further file is a variant,
paired with both.
"""

import glob
import json
import sys
from pathlib import Path

import numpy as np

RESULTS = Path("benchmarks/results")
HERE = RESULTS / "select" / "hidden_bias_first_layer"


def _rows(pattern: str, from_history: bool = False) -> dict:
    out = {}
    for name in sorted(glob.glob(pattern)):
        for r in json.loads(Path(name).read_text()):
            value = (min(v for _, v in r["valid_history"]) if from_history
                     else r["test_nll"])
            out.setdefault((r["dataset"], r["seed"]), value)
    return out


def spread_default() -> dict:
    """Validation NLL of the default `s = 1` by (dataset, seed): screens first, then test runs."""
    spread = _rows(str(HERE / "select_fl10*.json"))
    for key, value in _rows(str(RESULTS / "final" / "quality_first_bias_*.json"),
                            from_history=True).items():
        spread.setdefault(key, value)
    return spread


def main(files) -> None:
    default = _rows(str(RESULTS / "select" / "soft_relu" / "select_sr05*.json"))
    default.update(_rows(str(RESULTS / "final" / "quality_fresh_*.json"), from_history=True))
    spread = spread_default()
    variants = {"s=1": spread}
    variants.update({Path(f).stem.removeprefix("select_"): _rows(f) for f in files})
    references = {"before": default, "s=1": spread}
    for name, rows in variants.items():
        for ref_name, ref in references.items():
            if ref is rows:
                continue
            for ds in ["pinwheel", "checkerboard", "2spirals", "8gaussians"]:
                seeds = sorted(s for (d, s) in rows if d == ds and (d, s) in ref)
                if len(seeds) < 2:
                    continue
                d = np.array([rows[(ds, s)] - ref[(ds, s)] for s in seeds])
                se = d.std(ddof=1) / np.sqrt(len(d))
                print(f"{name:8s} - {ref_name:6s} {ds:13s} {d.mean():+.4f} ± {se:.4f} "
                      f"({len(d)}) seeds {seeds}")

if __name__ == "__main__":
    main(sys.argv[1:])
