"""Benchmarks of tfp_naf: density quality (quality.py) and speed (speed.py).

Run everything with `bash run.sh python -m benchmarks` (see benchmarks/README.md).
"""
