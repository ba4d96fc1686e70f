"""Runs every benchmark: `python -m benchmarks [--fast] [--max-minutes M]`.

Quality first (all datasets and models, plus the compact-conditioner
variants), then speed. Results go to benchmarks/results/.
"""

from __future__ import annotations

import argparse

from benchmarks import quality, speed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="smoke check of both benchmarks")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="wall-clock cap on each quality training run")
    args = parser.parse_args(argv)
    quality_args = ["--fast"] if args.fast else []
    if args.max_minutes is not None:
        quality_args += ["--max-minutes", str(args.max_minutes)]
    quality.main(quality_args)
    speed.main(["--fast", "--no-memory"] if args.fast else [])


if __name__ == "__main__":
    main()
