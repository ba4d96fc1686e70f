"""Scaling of the command line: time and peak memory against the number of rows.

```bash
python -m benchmarks.scaling [--fast] [--baseline DIR]
```

Every case runs in a fresh process (`python -m tfp_naf ...` through a small
wrapper that reads the process's peak resident memory, `VmHWM` in
/proc/self/status, at exit; the wall time is the parent's, start-up
included). Cases:

* `sample -n N` of a 5-D model (5 DSF flows, MADE [64, 64], 16 units,
  trained for one epoch on 5,000 rows) to `.npy`, N = 1e4 ... 1e7;
* `log-prob` of those samples (`.npy` in, `.npy` out);
* reading a 10-column CSV the way `fit` does (chunked parse, spooled to a
  raw file, checked) in a process that does not import TensorFlow: time,
  peak memory, and peak memory above the process's size before reading,
  against the file's size;
* one `fit` epoch (`--epochs 1 --batch-size 1024`, validation split 0.1,
  final NLLs over all rows) of 1e5 and 1e6 rows, from CSV and from `.npy`;
* `tfp-naf --help` (median of 5) and whether it imports TensorFlow;
* TensorFlow logging lines (cudart, oneDNN, cuInit, absl `I0000`/`W0000`/
  `E0000` lines...) in the output of every case, of `tfp-naf demo` (50
  steps) and of four error paths, with `TF_CPP_MIN_LOG_LEVEL` unset.

`--baseline DIR` also times `sample -n 200000` from an older checkout
(e.g. `git archive ddaf455 | tar -x -C DIR`), the case reported in the issue.
`--fast`: N up to 1e5, fit of 1e4 and 1e5 rows, demo of 20 steps.

Results: `benchmarks/results/scaling{,_fast}.json` and `.md`. The machine's
2 cores are shared with other jobs: times are wall clock under that load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
TF_LOG = re.compile(r"cudart|oneDNN|cuInit|cuda_|absl::|^[IWEF]\d{4} \d\d:\d\d|"
                    r"^WARNING:tensorflow|cpu_feature_guard", re.M)

# Runs tfp-naf's main in this process, then reports its peak memory.
_WRAPPER = textwrap.dedent("""
    import json, sys
    from tfp_naf.cli import main
    code = main(sys.argv[2:])
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    json.dump({"rc": code, "vmhwm_kb": int(status["VmHWM"].split()[0])}, open(sys.argv[1], "w"))
    sys.exit(code)
""")

# Reads a CSV as `fit` does, without TensorFlow.
_READER = textwrap.dedent("""
    import json, sys, tempfile, time
    import numpy as np
    from tfp_naf.tables import ColumnMoments, open_table, spool_table
    def rss(key):
        status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
        return int(status[key].split()[0])
    before = rss("VmRSS")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        values = spool_table(open_table(sys.argv[2]), scratch)
        moments = ColumnMoments()
        for i in range(0, len(values), 65536):
            moments.update(values[i:i + 65536])
        seconds = time.perf_counter() - start
        out = {"seconds": seconds, "rows": len(values), "rss_before_kb": before,
               "vmhwm_kb": rss("VmHWM")}
    json.dump(out, open(sys.argv[1], "w"))
""")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _peak_kb(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cli(args, cwd: Path, pythonpath: str, timeout: float = 1500) -> dict:
    """Runs `tfp-naf args` in a fresh process; wall time, peak memory, log lines.

    The peak is the process's own VmHWM at exit; a case that runs past
    `timeout` seconds is killed and reported with the peak polled so far.
    """
    report = cwd / ".measure.json"
    report.unlink(missing_ok=True)
    env = _env()
    env["PYTHONPATH"] = pythonpath
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen([sys.executable, "-c", _WRAPPER, str(report), *map(str, args)],
                                 cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        polled, timed_out = 0, False
        while child.poll() is None:
            polled = max(polled, _peak_kb(child.pid))
            if time.perf_counter() - start > timeout:
                child.kill()
                child.wait()
                timed_out = True
                break
            time.sleep(0.5)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    measured = json.loads(report.read_text()) if report.exists() else {}
    output = stdout + stderr
    return {
        "args": [str(a) for a in args], "seconds": round(seconds, 2),
        "peak_rss_mb": round(max(measured.get("vmhwm_kb", 0), polled) / 1024, 1),
        "rc": child.returncode, "timed_out": timed_out,
        "tf_log_lines": len(TF_LOG.findall(output)),
        "stderr_tail": stderr.strip().splitlines()[-3:],
    }


def _print(case: dict) -> None:
    print(json.dumps({k: v for k, v in case.items() if k != "stderr_tail"}), flush=True)


def _fit_model(work: Path, pythonpath: str) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5000, 5)) @ rng.normal(size=(5, 5)) + np.sin(rng.normal(size=(5000, 5)))
    np.save(work / "train5.npy", x)
    case = _cli(["fit", "train5.npy", "--out", "model5", "--epochs", "1", "--quiet"], work,
                pythonpath)
    if case["rc"] != 0:
        raise SystemExit(f"fitting the 5-D model failed: {case}")
    return work / "model5"


def _help_timing(pythonpath: str, repeats: int = 5) -> dict:
    env = _env()
    env["PYTHONPATH"] = pythonpath
    code = ("import sys, time; t = time.perf_counter(); import tfp_naf.cli\n"
            "try:\n    tfp_naf.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('tensorflow' in sys.modules, file=sys.stderr)")
    times, imported = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                text=True)
        times.append(time.perf_counter() - start)
        imported = result.stderr.strip().splitlines()[-1] == "True"
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "tfp_naf", "fit", "--help"], env=env,
                            capture_output=True, text=True)
    fit_help = time.perf_counter() - start
    start = time.perf_counter()
    error = subprocess.run([sys.executable, "-m", "tfp_naf", "sample", "m", "-n", "x"],
                           env=env, capture_output=True, text=True)
    bad_option = time.perf_counter() - start
    return {"help_seconds_median": round(statistics.median(times), 3),
            "help_seconds": [round(t, 3) for t in times], "help_imports_tensorflow": imported,
            "fit_help_seconds": round(fit_help, 3), "fit_help_rc": result.returncode,
            "bad_option_seconds": round(bad_option, 3), "bad_option_rc": error.returncode}


def _csv(path: Path, n: int, seed: int) -> None:
    from tfp_naf.tables import TableWriter

    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(10, 10))
    with TableWriter(path, columns=10, rows=n, header=[f"x{i}" for i in range(10)]) as out:
        for start in range(0, n, 100_000):
            k = min(100_000, n - start)
            out.write((rng.normal(size=(k, 10)) @ mix).astype(np.float32))


def _read_csv(path: Path, work: Path, pythonpath: str) -> dict:
    report = work / ".read.json"
    env = _env()
    env["PYTHONPATH"] = pythonpath
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", _READER, str(report), str(path)], env=env, check=True,
                   capture_output=True, text=True)
    wall = time.perf_counter() - start
    measured = json.loads(report.read_text())
    size_mb = path.stat().st_size / 2**20
    peak = measured["vmhwm_kb"] / 1024
    above = (measured["vmhwm_kb"] - measured["rss_before_kb"]) / 1024
    return {"case": "read-csv", "rows": measured["rows"], "file_mb": round(size_mb, 1),
            "read_seconds": round(measured["seconds"], 2), "process_seconds": round(wall, 2),
            "peak_rss_mb": round(peak, 1),
            "rss_before_mb": round(measured["rss_before_kb"] / 1024, 1),
            "peak_above_start_mb": round(above, 1),
            "peak_over_file_size": round(peak / size_mb, 2),
            "peak_above_start_over_file_size": round(above / size_mb, 2)}


def _markdown(results: dict) -> str:
    lines = [f"# Scaling ({'fast' if results['fast'] else 'full'} run)", "",
             f"Commit {results['commit']}, {results['machine']}; every case a fresh process, "
             "wall time including start-up (about 5 s of importing TensorFlow), peak RSS = "
             "VmHWM. The 2 cores were shared with other jobs.", "",
             "| command | rows | seconds | peak RSS (MB) | TF log lines |", "|---|---|---|---|---|"]
    for case in results["cases"]:
        lines.append(f"| `{case['case']}` | {case['rows']:,} | {case['seconds']} | "
                     f"{case['peak_rss_mb']} | {case['tf_log_lines']} |")
    lines += ["", "Reading a 10-column CSV as `fit` does (chunked parse, spooled, checked; no "
              "TensorFlow in the process):", "",
              "| rows | file (MB) | seconds | peak RSS (MB) | above start (MB) | "
              "peak / file size | above start / file size |", "|---|---|---|---|---|---|---|"]
    for case in results["reads"]:
        lines.append(f"| {case['rows']:,} | {case['file_mb']} | {case['read_seconds']} | "
                     f"{case['peak_rss_mb']} | {case['peak_above_start_mb']} | "
                     f"{case['peak_over_file_size']} | {case['peak_above_start_over_file_size']} |")
    h = results["help"]
    lines += ["", f"`tfp-naf --help`: median {h['help_seconds_median']} s of "
              f"{len(h['help_seconds'])}, imports TensorFlow: {h['help_imports_tensorflow']}; "
              f"`fit --help` {h['fit_help_seconds']} s; a bad option {h['bad_option_seconds']} s "
              f"(exit {h['bad_option_rc']}).", "",
              "TensorFlow logging lines (TF_CPP_MIN_LOG_LEVEL unset): "
              + ", ".join(f"{c['case']}: {c['tf_log_lines']}" for c in results["quiet"]) + "."]
    if results.get("baseline"):
        b = results["baseline"]
        lines += ["", f"Baseline ({b['source']}): `{' '.join(b['args'])}` {b['seconds']} s, "
                  f"peak RSS {b['peak_rss_mb']} MB, {b['tf_log_lines']} TF log lines."]
    lines += ["", "Targets:", ""] + [f"- {t}" for t in results["targets"]]
    return "\n".join(lines) + "\n"


def _targets(results: dict) -> "list[str]":
    out = []
    by = {(c["case"], c["rows"]): c for c in results["cases"]}
    big = by.get(("sample", 10_000_000))
    if big:
        verdict = "met" if big["peak_rss_mb"] < 1536 else "missed"
        out.append(f"`sample -n 10000000` (5-D) peak RSS < 1.5 GB: {verdict}, "
                   f"{big['peak_rss_mb']} MB ({big['seconds']} s)")
    read = [r for r in results["reads"] if r["rows"] == 1_000_000]
    if read:
        r = read[0]
        fast = "met" if r["read_seconds"] < 5 else "missed"
        small = "met" if r["peak_rss_mb"] < 3 * r["file_mb"] else "missed"
        out.append(f"reading a 1,000,000 x 10 CSV for fit < 5 s: {fast}, {r['read_seconds']} s")
        out.append(f"... in < 3x the file's size ({r['file_mb']} MB) of memory: {small}, "
                   f"peak RSS {r['peak_rss_mb']} MB = {r['peak_over_file_size']}x "
                   f"({r['peak_above_start_mb']} MB above the process's start)")
    h = results["help"]
    out.append(f"`tfp-naf --help` < 1 s: {'met' if h['help_seconds_median'] < 1 else 'missed'}, "
               f"{h['help_seconds_median']} s (median of {len(h['help_seconds'])})")
    lines = sum(c["tf_log_lines"] for c in results["quiet"])
    out.append(f"zero lines of TF logging in the demo's and errors' output: "
               f"{'met' if lines == 0 else 'missed'}, {lines} lines")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small sizes (a smoke check)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="an older checkout to time `sample -n 200000` from")
    args = parser.parse_args(argv)
    import tfp_naf

    root = str(Path(tfp_naf.__file__).resolve().parent.parent)
    pythonpath = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    sample_sizes = [10_000, 100_000] if args.fast else [10_000, 100_000, 1_000_000, 10_000_000]
    fit_sizes = [10_000, 100_000] if args.fast else [100_000, 1_000_000]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                capture_output=True, text=True).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    if commit == "unknown" and os.environ.get("SCALING_COMMIT"):
        commit = os.environ["SCALING_COMMIT"]
    results = {"fast": args.fast, "commit": commit, "tfp_naf": tfp_naf.__file__,
               "machine": f"{platform.machine()}, {os.cpu_count()} cores", "cases": [],
               "reads": [], "quiet": []}
    with tempfile.TemporaryDirectory(prefix="tfp-naf-scaling-") as tmp:
        work = Path(tmp)
        results["help"] = _help_timing(pythonpath)
        print(json.dumps(results["help"]), flush=True)
        _fit_model(work, pythonpath)
        for n in sample_sizes:
            case = _cli(["sample", "model5", "-n", n, "--out", f"s{n}.npy", "--quiet"], work,
                        pythonpath)
            results["cases"].append({"case": "sample", "rows": n, **case})
            _print(results["cases"][-1])
            case = _cli(["log-prob", "model5", f"s{n}.npy", "--out", f"lp{n}.npy", "--quiet"],
                        work, pythonpath)
            results["cases"].append({"case": "log-prob", "rows": n, **case})
            _print(results["cases"][-1])
            lp = np.load(work / f"lp{n}.npy", mmap_mode="r")
            results["cases"][-1]["mean_log_prob"] = round(float(np.mean(lp)), 4)
            for name in (f"s{n}.npy", f"lp{n}.npy"):
                (work / name).unlink()
        for n in fit_sizes:
            csv_path = work / f"fit{n}.csv"
            _csv(csv_path, n, seed=n)
            results["reads"].append(_read_csv(csv_path, work, pythonpath))
            print(json.dumps(results["reads"][-1]), flush=True)
            from tfp_naf.tables import open_table, spool_table

            with tempfile.TemporaryDirectory() as scratch:
                np.save(work / f"fit{n}.npy", spool_table(open_table(csv_path), scratch))
            for source in (csv_path, work / f"fit{n}.npy"):
                case = _cli(["fit", source.name, "--out", f"m{n}{source.suffix[1:]}",
                             "--epochs", "1", "--batch-size", "1024", "--quiet"], work,
                            pythonpath)
                metrics = json.loads((work / f"m{n}{source.suffix[1:]}" / "metrics.json")
                                     .read_text()) if case["rc"] == 0 else {}
                case["fit_seconds"] = metrics.get("fit_seconds")
                case["train_nll"] = metrics.get("train_nll")
                results["cases"].append({"case": f"fit ({source.suffix[1:]}, 1 epoch)",
                                         "rows": n, **case})
                _print(results["cases"][-1])
            for name in (csv_path, work / f"fit{n}.npy"):
                name.unlink()
        # Quiet output: the demo and error paths.
        (work / "bad.csv").write_text("a,b\n1,2\n3,x\n")
        (work / "nofolder").mkdir()
        steps = "20" if args.fast else "50"
        quiet_cases = [
            ("demo", ["demo", "--out", "demo", "--steps", steps, "--train-size", "2000",
                      "--no-saved-model"]),
            ("error: bad CSV", ["fit", "bad.csv", "--out", "m_bad"]),
            ("error: not a model folder", ["sample", "nofolder", "-n", "3", "--out", "x.npy"]),
            ("error: wrong columns", ["log-prob", "model5", "bad.csv", "--out", "x.npy"]),
            ("error: bad option", ["sample", "model5", "-n", "many"]),
        ]
        for name, cli_args in quiet_cases:
            case = _cli(cli_args, work, pythonpath)
            results["quiet"].append({"case": name, **case})
            _print(results["quiet"][-1])
        if args.baseline is not None:
            case = _cli(["sample", "model5", "-n", 200_000, "--out", "base.npy"], work,
                        str(args.baseline.resolve()))
            results["baseline"] = {"source": str(args.baseline), **case}
            _print(results["baseline"])
    results["targets"] = _targets(results)
    RESULTS.mkdir(exist_ok=True)
    stem = "scaling_fast" if args.fast else "scaling"
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(_markdown(results))
    print(_markdown(results))


if __name__ == "__main__":
    main()
