"""Parallel branches: a sweep (learning rates x network dims) on the Wan 2.1 1.3B pipeline run with
`--jobs` on a simulated pool of GPUs through the musubi-tuner test double, every script taking a
fixed time (MUSUBI_DOUBLE_RUN_SECONDS). Prints the makespan against the ideal, max(GPU work /
GPUs, critical path), and the executor's own cost per step.

    python benchmarks/bench_parallel.py [--gpus 8] [--lrs 4] [--dims 4] [--seconds 2]

The steps: two caches (1 GPU each), one train per branch (1 GPU), one conversion per branch
(no GPU). No GPU is used: the "GPUs" are CUDA_VISIBLE_DEVICES values the double records.
Prints figures, asserts nothing.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from executor_plans import SMALL_WAN, Recorder, config_for  # noqa: E402
from media_factory import make_video  # noqa: E402
from musubi_double import make_fake_checkout  # noqa: E402
from musubi_pipe.compiler import compile_file  # noqa: E402
from musubi_pipe.executors.local import LocalExecutor  # noqa: E402
from musubi_pipe.executors.runner import LocalRunner  # noqa: E402
from musubi_pipe.executors.schedule import Scheduler, step_gpus  # noqa: E402

PIPELINE = """
name = "bench-parallel"
""" + SMALL_WAN + """[stages.train]
kind = "train"
max_train_steps = 2
sweep = {{ learning_rate = [{lrs}], network_dim = [{dims}] }}
[stages.comfy]
kind = "convert"
input = "@train.lora"
"""


def project(folder: Path, lrs: int, dims: int) -> Path:
    (folder / "models").mkdir(parents=True)
    for model in ("wan_bf16.safetensors", "vae.safetensors", "t5.safetensors"):
        (folder / "models" / model).write_bytes(b"\0" * 16)
    (folder / "clips").mkdir()
    make_video(folder / "clips" / "c0.mp4", n=8, fps=16.0, width=96, height=64)
    (folder / "clips" / "c0.txt").write_text("clip")
    path = folder / "pipeline.toml"
    path.write_text(PIPELINE.format(lrs=", ".join(f"{i + 1}e-4" for i in range(lrs)),
                                    dims=", ".join(str(4 * (i + 1)) for i in range(dims))))
    return path


def critical_path(plan, seconds: float) -> float:
    longest: dict[str, float] = {}
    for step in plan.steps:  # plan order is a topological order
        longest[step.id] = seconds + max((longest[n] for n in step.needs if n in longest), default=0.0)
    return max(longest.values())


class TimingRunner(LocalRunner):
    """LocalRunner noting when each command starts and when its exit is first seen, by argv."""

    def __init__(self, grace_s: float):
        super().__init__(grace_s)
        self.started: dict[tuple, float] = {}
        self.exited: dict[tuple, float] = {}

    def start(self, argv, cwd, env, devices=()):
        key = tuple(argv)
        self.started[key] = time.time()
        proc = super().start(argv, cwd, env, devices)
        wait = proc.wait

        def timed_wait(timeout=None):
            rc = wait(timeout)
            if rc is not None:
                self.exited.setdefault(key, time.time())
            return rc

        proc.wait = timed_wait
        return proc


def simulated(plan, pool: list[str], jobs: int, seconds: float) -> float:
    """The makespan the scheduler's own choices give when every step takes exactly `seconds` and
    nothing else costs time: what is left of the gap to the ideal is the graph's shape."""
    sched = Scheduler(list(plan.steps), jobs, pool)
    now, ending = 0.0, []
    while sched.waiting or sched.running:
        ending += [(now + seconds, step.id) for step, _ in sched.startable()]
        ending.sort()
        now, sid = ending.pop(0)
        sched.finish(sid, "succeeded")
    return now


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=8, help="size of the simulated GPU pool")
    ap.add_argument("--lrs", type=int, default=4, help="learning rates swept")
    ap.add_argument("--dims", type=int, default=4, help="network dims swept")
    ap.add_argument("--seconds", type=float, default=2.0, help="fixed time every script takes")
    ap.add_argument("--jobs", type=int, default=0, help="--jobs (default: twice the GPUs, so CPU steps never wait)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        checkout = make_fake_checkout(tmp / "musubi-tuner")
        plan = compile_file(project(tmp / "p", args.lrs, args.dims))
        times, record = tmp / "times.jsonl", tmp / "record.jsonl"
        os.environ.update(MUSUBI_DOUBLE_TIMES=str(times), MUSUBI_DOUBLE_RECORD=str(record),
                          MUSUBI_DOUBLE_RUN_SECONDS=str(args.seconds))
        config = replace(config_for(checkout), gpus=",".join(str(g) for g in range(args.gpus)))
        rec = Recorder()
        jobs = args.jobs or 2 * args.gpus
        began = time.perf_counter()
        runner = TimingRunner(config.cancel_grace_s)
        result = LocalExecutor(config, runner=runner).run(plan, [rec], jobs=jobs)
        wall = time.perf_counter() - began
        if result.status != "succeeded":
            raise SystemExit(f"the run {result.status}: {result.steps}")

        n = len(plan.steps)
        branches = args.lrs * args.dims
        gpu_work = sum(step_gpus(s) for s in plan.steps) * args.seconds
        path = critical_path(plan, args.seconds)
        ideal = max(gpu_work / args.gpus, path)
        print(f"{branches}-branch sweep on {args.gpus} GPUs, --jobs {jobs}: {n} steps of {args.seconds:g} s each "
              f"(GPU work {gpu_work:g} GPU-s, critical path {path:g} s)")
        print(f"makespan {wall:.2f} s vs ideal {ideal:.2f} s = max(GPU work / GPUs {gpu_work / args.gpus:.2f} s, "
              f"critical path {path:.2f} s): ratio {wall / ideal:.2f}")
        best = simulated(plan, config.gpus.split(","), jobs, args.seconds)
        print(f"   the same schedule with no cost but the fixed time: {best:.2f} s (whole waves of steps: the graph's "
              f"shape); the rest, {wall - best:.2f} s, is the cost per step below")

        starts = {e.step: e.time for e in rec.kinds("step_start")}
        ends = {e.step: e.time for e in rec.kinds("step_end")}
        runs = [json.loads(line) for line in times.read_text().splitlines()]
        argv = {r["pid"]: r["argv"] for r in map(json.loads, record.read_text().splitlines())}
        by_args = {tuple(s.args): s.id for s in plan.steps}
        script = {by_args[tuple(argv[r["pid"]])]: r for r in runs if r.get("rank") in (None, "0")}
        ms = lambda xs: f"median {statistics.median(xs) * 1000:.0f} ms, max {max(xs) * 1000:.0f} ms"  # noqa: E731
        over = [ends[s] - starts[s] - args.seconds for s in starts]
        print(f"per step, STEP_START -> STEP_END beyond the fixed {args.seconds:g} s: {ms(over)}; of which")
        print(f"   launch (STEP_START -> the script's main: Python start-up, imports, accelerate's launcher): "
              f"{ms([script[s]['start'] - starts[s] for s in script])}")
        print(f"   the double's own work after its fixed time: {ms([script[s]['end'] - script[s]['start'] - args.seconds for s in script])}")
        print(f"   finish (script's main returns -> STEP_END: exit, output check, state write): "
              f"{ms([ends[s] - script[s]['end'] for s in script])}")
        # the scheduler starts steps when a step ends (a dependency or a GPU is free) or the run starts
        moments = sorted([rec.kinds("plan")[0].time, *ends.values()])
        # the executor's own part: STEP_START -> the runner's start, and the exit seen -> STEP_END
        by_tail = {}
        for key in runner.started:
            by_tail[next(s.id for s in plan.steps if list(key[-len(s.args):]) == s.args)] = key
        own = [(runner.started[by_tail[s]] - starts[s]) + (ends[s] - runner.exited[by_tail[s]]) for s in by_tail]
        print(f"   the executor's own part (STEP_START -> process start, plus exit seen -> STEP_END): {ms(own)}")
        lag = [t - max(m for m in moments if m <= t) for t in starts.values()]
        print(f"dispatch (the step end, or the run's start, that freed a step -> its STEP_START): {ms(lag)}")
        devices = [set(r["devices"].split(",")) for r in runs if r["devices"]]
        gpu_runs = [r for r in runs if r["devices"] and r.get("rank") in (None, "0")]
        print(f"busiest moment: {peak(runs)} scripts at once, {peak(gpu_runs)} of them on a GPU; "
              f"devices used: {len(set().union(*devices))} of {args.gpus}")


def peak(runs: list[dict]) -> int:
    edges = sorted([(r["start"], 1) for r in runs] + [(r["end"], -1) for r in runs])
    now = best = 0
    for _, delta in edges:
        now += delta
        best = max(best, now)
    return best


if __name__ == "__main__":
    main()
