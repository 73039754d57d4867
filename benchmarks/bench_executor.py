"""Local executor figures: child line -> listener latency, Ctrl-C -> last process gone, and a fully
skipped re-run of a 6-step pipeline over several GB of (sparse) model files.

    python benchmarks/bench_executor.py [--ticks 200] [--rounds 3] [--reruns 5]

Runs against the musubi-tuner test double; prints figures, asserts nothing.
"""
from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from executor_plans import Recorder, config_for, wan_plan  # noqa: E402
from musubi_double import make_fake_checkout  # noqa: E402
from musubi_pipe.compiler.plan import Output, Plan, Step, fingerprint  # noqa: E402
from musubi_pipe.executors.local import LocalExecutor  # noqa: E402

TICKER = '''"""benchmark helper: timestamped lines on stderr, like musubi's log lines."""
import sys, time
for i in range({ticks}):
    sys.stderr.write(f"tick {time.time():.6f}\\n")
    sys.stderr.flush()
    time.sleep(0.01)
'''


def latency(checkout: Path, tmp: Path, ticks: int = 200) -> None:
    (checkout / "src" / "musubi_tuner" / "_bench_ticker.py").write_text(TICKER.replace("{ticks}", str(ticks)))
    seen = []

    def listener(e):
        if e.kind == "log" and e.data.get("text", "").startswith("tick "):
            seen.append(time.time() - float(e.data["text"].split()[1]))

    step = Step(id="ticker", kind="convert", family="wan", script="_bench_ticker.py", args=[], fingerprint="t")
    plan = Plan(name="bench", source=str(tmp / "b.toml"), workdir=str(tmp / "lat"), steps=[step])
    LocalExecutor(config_for(checkout)).run(plan, [listener])
    ms = sorted(x * 1000 for x in seen)
    print(f"child line -> listener event: {len(ms)} lines, median {statistics.median(ms):.2f} ms, "
          f"p95 {ms[int(len(ms) * 0.95)]:.2f} ms, max {ms[-1]:.2f} ms   (target < 100 ms)")


DRIVER = '''
import signal, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from executor_plans import config_for, wan_plan
from musubi_pipe.executors.local import LocalExecutor
ex = LocalExecutor(config_for(Path({checkout!r})))
signal.signal(signal.SIGINT, lambda *a: ex.cancel())
ex.run(wan_plan(Path({project!r})), [lambda e: print(e.kind, e.step, flush=True)])
'''


def ctrl_c(checkout: Path, tmp: Path, rounds: int = 3) -> None:
    times = []
    for r in range(rounds):
        driver = tmp / f"driver{r}.py"
        driver.write_text(DRIVER.format(tests=str(HERE.parent / "tests"), checkout=str(checkout),
                                        project=str(tmp / f"cancel{r}")))
        env = {**os.environ, "MUSUBI_DOUBLE_FAIL": "wan_train_network:hang"}
        proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, text=True, env=env)
        for line in proc.stdout:
            if line.startswith("step_start train"):
                break
        parent = psutil.Process(proc.pid)
        while len(parent.children(recursive=True)) < 2:  # accelerate launch + training child
            time.sleep(0.01)
        time.sleep(0.3)
        procs = parent.children(recursive=True)
        began = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        while any(_running(p) for p in procs):
            time.sleep(0.002)
        dead = time.perf_counter() - began
        psutil.wait_procs(procs, timeout=30)
        times.append((dead, time.perf_counter() - began))
        proc.wait(timeout=30)
    print(f"Ctrl-C -> every process of the step dead ({len(procs)} processes: accelerate launch + training): "
          + ", ".join(f"{d * 1000:.0f} ms" for d, _ in times) + "   (target < 3 s)")
    print("   ... and reaped from the process table (orphans wait for PID 1): "
          + ", ".join(f"{g * 1000:.0f} ms" for _, g in times))


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def skipped_rerun(checkout: Path, tmp: Path, reruns: int = 5) -> None:
    project = tmp / "skip"
    project.mkdir()
    sizes = {"wan_bf16.safetensors": 14 * 2**30, "t5.pth": 11 * 2**30, "vae.safetensors": 2**29}
    for name, size in sizes.items():
        with open(project / name, "wb") as f:
            f.truncate(size)  # sparse: costs no disk
    plan = wan_plan(project)
    back = plan.step("convert")
    back = replace(back, id="convert_back", needs=["convert"],
                   args=["--input", str(project / "out/lora_comfy.safetensors"), "--output",
                         str(project / "out/lora_back.safetensors"), "--target", "default"],
                   outputs=[Output("lora", "file", str(project / "out/lora_back.safetensors"))])
    plan.steps.append(replace(back, fingerprint=fingerprint(back.args)))
    assert LocalExecutor(config_for(checkout)).run(plan).status == "succeeded"
    total = sum(sizes.values()) / 2**30
    times = []
    for _ in range(reruns):
        rec = Recorder()
        began = time.perf_counter()
        LocalExecutor(config_for(checkout)).run(plan, [rec])
        times.append(time.perf_counter() - began)
        assert len(rec.kinds("step_skipped")) == 6
    print(f"fully skipped re-run, 6 steps, {total:.1f} GiB of models (executor.run): "
          f"median {statistics.median(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms   (target < 1 s)")


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--ticks", type=int, default=200, help="log lines for the latency figure")
    ap.add_argument("--rounds", type=int, default=3, help="Ctrl-C rounds")
    ap.add_argument("--reruns", type=int, default=5, help="fully skipped re-runs timed")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        checkout = make_fake_checkout(tmp / "musubi-tuner")
        latency(checkout, tmp, args.ticks)
        ctrl_c(checkout, tmp, args.rounds)
        skipped_rerun(checkout, tmp, args.reruns)


if __name__ == "__main__":
    main()
