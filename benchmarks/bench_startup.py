"""Benchmark: start-up of `musubi-pipe --version`, `--help` and a cold `plan` of a 10-stage pipeline,
as whole processes: modules imported (python -X importtime) and the median CPU and wall time of
several runs; side by side, `dvc --help` where a Python with dvc is given or this one has it.
Targets (issue 12): `--help` and `--version` import no subcommand, a 10-stage plan under 0.35 s.

    python benchmarks/bench_startup.py [--runs 9] [--dvc-python PYTHON]

Prints figures; asserts nothing."""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_plan import pipeline_text  # noqa: E402

# What the console script does (pip's entry-point wrapper), so that figures are those of `musubi-pipe`.
CLI = "import sys; from musubi_pipe.cli import main; sys.argv[0] = 'musubi-pipe'; sys.exit(main())"


def run(argv: list[str]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one run of argv, its output discarded."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, wall


def modules(python: str, argv: list[str]) -> int:
    """How many modules the command imports, the interpreter's own start included."""
    done = subprocess.run([python, "-X", "importtime", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, check=True)
    return sum(line.startswith("import time:") for line in done.stderr.splitlines()) - 1  # less the heading


def measure(label: str, python: str, argv: list[str], runs: int, results: dict) -> None:
    run([python, *argv])  # warm the file cache
    times, walls = [], []
    for _ in range(runs):
        cpu, wall = run([python, *argv])
        times.append(cpu)
        walls.append(wall)
    results[label] = (statistics.median(times), statistics.median(walls))
    print(f"{label:34s} {modules(python, argv):5d} modules   cpu {results[label][0] * 1000:6.0f} ms   "
          f"wall {results[label][1] * 1000:6.0f} ms   (median of {runs})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--dvc-python", help="a Python with dvc installed, for `dvc --help` side by side")
    args = ap.parse_args()
    python = sys.executable
    dvc = args.dvc_python or python
    if subprocess.run([dvc, "-c", "import dvc"], capture_output=True).returncode != 0:
        if args.dvc_python:
            raise SystemExit(f"{dvc} cannot import dvc")
        dvc = None
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}; figures are whole processes")
    results: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        text = pipeline_text(3)
        pipeline = Path(tmp) / "ten.toml"
        pipeline.write_text(text[:text.index("[stages.ema2]")])  # 2 caches + 3 x (train, generate, ema) - 1 = 10
        measure("python -c pass", python, ["-c", "pass"], args.runs, results)
        measure("musubi-pipe --version", python, ["-c", CLI, "--version"], args.runs, results)
        measure("musubi-pipe --help", python, ["-c", CLI, "--help"], args.runs, results)
        measure("musubi-pipe plan (10 stages)", python, ["-c", CLI, "plan", str(pipeline)], args.runs, results)
        if dvc is None:
            print("dvc --help: skipped (no Python with dvc; give --dvc-python)")
        else:
            measure("dvc --help", dvc, ["-m", "dvc", "--help"], args.runs, results)
            ours, theirs = results["musubi-pipe --help"], results["dvc --help"]
            print(f"musubi-pipe --help / dvc --help: cpu {ours[0] / theirs[0]:.2f}, wall {ours[1] / theirs[1]:.2f}")
    plan_wall = results["musubi-pipe plan (10 stages)"][1]
    print(f"10-stage plan: {plan_wall:.3f} s wall (target < 0.35 s on the 2-core dev box)")


if __name__ == "__main__":
    main()
