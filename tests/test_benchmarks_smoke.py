"""Every benchmark runs to the end at a tiny size and prints its figures. No time is asserted:
figures on a shared machine are for people to read (benchmarks/*.py, README), not for CI to judge."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
NUMBER = r"[\d.,]+"

# script, tiny arguments, lines (regular expressions) that must be printed
CASES = {
    "bench_startup.py": (["--runs", "1"], [rf"musubi-pipe --help\s+{NUMBER} modules\s+cpu\s+{NUMBER} ms",
                                           rf"musubi-pipe plan \(10 stages\)\s+{NUMBER} modules",
                                           rf"10-stage plan: {NUMBER} s wall"]),
    "bench_plan.py": (["--trains", "2", "--big-trains", "4"], [rf"compile 8 stages in process:\s+{NUMBER} ms",
                                                              rf"compile 14 stages in process:.* {NUMBER}% of it musubi's argparse re-check",
                                                              r"torch imported:\s+False"]),
    "bench_lora_merge.py": (["--modules", "3", "--dtype", "float32", "--torch-modules", "0"],
                            [rf"\[float32\] exact \(rank 64\)\s+{NUMBER} s",
                             rf"\[float32\] SVD to rank 32\s+{NUMBER} s .* relative error {NUMBER}%"]),
    "bench_tb_read.py": (["--mb", "0.2"], [rf"first read: {NUMBER} scalars from {NUMBER} MB in {NUMBER} s",
                                          rf"poll after {NUMBER} kB appended: 1000 scalars",
                                          r"TensorBoard's EventAccumulator"]),
    "bench_progress.py": (["--steps", "2000"], [rf"events/s: {NUMBER}"]),
    "bench_contact_sheet.py": (["--images", "3", "--videos", "1"], [rf"contact sheet of 4 items .*: {NUMBER} s"]),
    "bench_executor.py": (["--ticks", "5", "--rounds", "1", "--reruns", "1"],
                          [rf"child line -> listener event: 5 lines, median {NUMBER} ms",
                           rf"Ctrl-C -> every process of the step dead .*: {NUMBER} ms",
                           rf"fully skipped re-run, 6 steps.*median {NUMBER} ms"]),
    "bench_parallel.py": (["--gpus", "2", "--lrs", "2", "--dims", "1", "--seconds", "0.2"],
                          [rf"2-branch sweep on 2 GPUs, --jobs 4: 6 steps", rf"makespan {NUMBER} s vs ideal {NUMBER} s",
                           rf"launch .*: median {NUMBER} ms", rf"dispatch .*: median {NUMBER} ms", rf"executor.s own part .*: median {NUMBER} ms",
                           r"devices used: 2 of 2"]),
    "bench_comfy.py": (["--runs", "1"], [rf"pack import .*median {NUMBER} ms", r"COMFYUI_URL not set"]),
}


def test_every_benchmark_has_a_smoke_case():
    assert sorted(CASES) == sorted(p.name for p in BENCH.glob("bench_*.py"))


@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_runs_at_a_tiny_size(script, tmp_path):
    args, expected = CASES[script]
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_URL"}  # bench_comfy: the import figure only
    done = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for pattern in expected:
        assert re.search(pattern, done.stdout), f"{script} did not print {pattern!r}:\n{done.stdout}"
