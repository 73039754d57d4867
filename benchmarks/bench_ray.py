"""Ray executor figures against the local executor, on a local Ray cluster (head + worker node, two
fake GPUs each, tests/ray_cluster.py) with the musubi-tuner test double:

- per-step overhead: a chain of steps that do nothing (a Python that exits), local vs Ray;
- independent steps side by side on 4 GPUs: the makespan against the ideal;
- child line -> listener latency through the step's actor and the driver;
- output throughput: lines per second one step can stream back to the driver's display and log;
- cancel -> every process of a running step gone;
- the driver's CPU while many steps run quietly (polling their actors);
- a lost node -> its steps recorded as failed.

    python benchmarks/bench_ray.py [--steps 10] [--branches 16] [--seconds 2] [--ticks 200] [--lines 20000]

Prints figures, asserts nothing. Needs Ray (pip install -e '.[ray]').
"""
from __future__ import annotations

import importlib.util
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from executor_plans import config_for  # noqa: E402
from musubi_double import make_fake_checkout  # noqa: E402
from musubi_pipe.compiler.plan import Plan, Step  # noqa: E402
from musubi_pipe.executors.local import LocalExecutor  # noqa: E402

SCRIPT = '''"""benchmark helper: {lines} timestamped lines on stderr ({pause} s apart), then {sleep} s idle."""
import sys, time
for i in range({lines}):
    sys.stderr.write(f"tick {{time.time():.6f}} {{i}}\\n")
    if {pause}:
        sys.stderr.flush()
        time.sleep({pause})
time.sleep({sleep})
'''


def _script(checkout: Path, name: str, lines: int = 0, pause: float = 0.0, sleep: float = 0.0) -> str:
    (checkout / "src" / "musubi_tuner" / f"{name}.py").write_text(SCRIPT.format(lines=lines, pause=pause, sleep=sleep))
    return f"{name}.py"


def _plan(tmp: Path, name: str, script: str, n: int = 1) -> Plan:
    # kind cache_latents: a step that takes one GPU, as most of musubi's do; chained, so one at a time
    steps = [Step(id=f"s{i}", kind="cache_latents", family="wan", script=script, args=[], fingerprint=f"{name}{i}",
                  needs=[f"s{i - 1}"] if i else []) for i in range(n)]
    return Plan(name=name, source=str(tmp / f"{name}.toml"), workdir=str(tmp / name), steps=steps)


def overhead(executors: dict, checkout: Path, tmp: Path, n: int, rounds: int = 3) -> None:
    script = _script(checkout, "_bench_noop")
    per: dict = {label: [] for label in executors}
    for r in range(rounds + 1):  # round 0 warms up: imports, the cluster's workers
        for label, make in executors.items():  # alternating, so a busy moment of the machine hits both
            plan = _plan(tmp, f"noop_{label}", script, n)
            began = time.perf_counter()
            result = make().run(plan, [], force=True, jobs=1)
            assert result.status == "succeeded", result.steps
            if r:
                per[label].append((time.perf_counter() - began) / n)
    local, ray = statistics.median(per["local"]), statistics.median(per["ray"])
    print(f"per step, a chain of {n} steps that do nothing (median of {rounds} runs): local {local * 1000:.0f} ms, "
          f"Ray {ray * 1000:.0f} ms (Ray adds {(ray - local) * 1000:.0f} ms)")


def side_by_side(executors: dict, checkout: Path, tmp: Path, branches: int, seconds: float) -> None:
    """Independent steps of `seconds` each on 4 GPUs (the cluster's; locally a pool of 4): the
    makespan against the ideal (work / GPUs), i.e. what scheduling and starting cost at once."""
    script = _script(checkout, "_bench_work", sleep=seconds)
    ideal = -(-branches // 4) * seconds
    for label, make in executors.items():
        plan = _plan(tmp, f"side_{label}", script, branches)
        plan.steps = [replace(s, needs=[]) for s in plan.steps]
        ex = make()
        if label == "local":
            ex.config = replace(ex.config, gpus="0,1,2,3")
        began = time.perf_counter()
        result = ex.run(plan, [], force=True, jobs=4)
        took = time.perf_counter() - began
        assert result.status == "succeeded", result.steps
        print(f"{branches} independent steps of {seconds:g} s on 4 GPUs ({label}): makespan {took:.2f} s, ideal {ideal:g} s "
              f"(+{(took - ideal) / branches * 1000:.0f} ms per step)")


def latency(executors: dict, checkout: Path, tmp: Path, ticks: int) -> None:
    script = _script(checkout, "_bench_ticker", lines=ticks, pause=0.01)
    for label, make in executors.items():
        seen = []

        def listener(e):
            if e.kind == "log" and e.data.get("text", "").startswith("tick "):
                seen.append(time.time() - float(e.data["text"].split()[1]))

        make().run(_plan(tmp, f"lat_{label}", script), [listener], force=True)
        ms = sorted(x * 1000 for x in seen)
        print(f"child line -> listener event ({label}): {len(ms)} lines, median {statistics.median(ms):.1f} ms, "
              f"p95 {ms[int(len(ms) * 0.95)]:.1f} ms")


def throughput(executors: dict, checkout: Path, tmp: Path, lines: int) -> None:
    script = _script(checkout, "_bench_flood", lines=lines)
    for label, make in executors.items():
        count = [0]

        def listener(e):
            if e.kind == "log":
                count[0] += 1

        began = time.perf_counter()
        make().run(_plan(tmp, f"flood_{label}", script), [listener], force=True)
        took = time.perf_counter() - began
        print(f"output throughput ({label}): {count[0]} lines in {took:.2f} s = {count[0] / took:,.0f} lines/s per step")


def cancel(executors: dict, checkout: Path, tmp: Path) -> None:
    script = _script(checkout, "_bench_sleeper", lines=1, pause=0.01, sleep=300)
    for label, make in executors.items():
        ex = make()
        started = threading.Event()
        pid = []

        def listener(e):
            text = e.data.get("text", "") if e.kind == "log" else ""
            if text.startswith("tick "):
                started.set()
            if " pid " in text:
                pid.append(int(text.rsplit("pid ", 1)[1]))

        t = threading.Thread(target=ex.run, args=(_plan(tmp, f"cancel_{label}", script), [listener]), kwargs={"force": True})
        t.start()
        started.wait(60)
        time.sleep(0.3)
        if not pid:  # the local executor: the step is the newest child of this process
            pid.append(max(p.pid for p in psutil.Process().children(recursive=True) if "_bench_sleeper" in " ".join(p.cmdline())))
        proc = psutil.Process(pid[0])
        began = time.perf_counter()
        ex.cancel()
        psutil.wait_procs([proc], timeout=30)
        gone = time.perf_counter() - began
        t.join(60)
        print(f"cancel -> the step's process gone ({label}): {gone * 1000:.0f} ms; run returned after "
              f"{(time.perf_counter() - began) * 1000:.0f} ms")


def idle_cost(make, checkout: Path, tmp: Path, n: int) -> None:
    """The driver's own CPU while n steps run on the cluster and print nothing: the price of
    polling each step's actor (what grows with the number of running steps)."""
    script = _script(checkout, "_bench_quiet", lines=1, pause=0.01, sleep=8)
    steps = [Step(id=f"q{i}", kind="convert", family="wan", script=script, args=[], fingerprint=f"q{i}") for i in range(n)]
    plan = Plan(name="quiet", source=str(tmp / "quiet.toml"), workdir=str(tmp / "quiet"), steps=steps)  # no GPU each
    started = []
    t = threading.Thread(target=make().run, args=(plan, [lambda e: e.kind == "log" and "runs on node" in e.data.get("text", "")
                                                        and started.append(e.step)]), kwargs={"force": True, "jobs": n})
    t.start()
    while len(started) < n:
        time.sleep(0.05)
    me = psutil.Process()
    time.sleep(1.0)
    cpu0, wall0 = sum(me.cpu_times()[:2]), time.perf_counter()
    time.sleep(3.0)
    cpu = (sum(me.cpu_times()[:2]) - cpu0) / (time.perf_counter() - wall0)
    t.join(120)
    print(f"driver CPU while {n} steps run quietly: {cpu * 100:.0f}% of a core ({cpu / n * 1000:.1f} ms of CPU per step per second)")


def lost_node(make, checkout: Path, tmp: Path, cluster) -> None:
    """Four one-GPU steps fill both nodes; the worker's raylet is killed: how long until the steps
    it ran are recorded as failed with their cause."""
    script = _script(checkout, "_bench_long", lines=1, pause=0.01, sleep=300)
    plan = _plan(tmp, "lost", script, 4)
    plan.steps = [replace(s, needs=[]) for s in plan.steps]
    ex = make()
    placed, ended = {}, {}

    def listener(e):
        text = e.data.get("text", "") if e.kind == "log" else ""
        if "runs on node" in text:
            placed[e.step] = text
        if e.kind == "step_end":
            ended[e.step] = (time.perf_counter(), e.data.get("cause", ""))

    t = threading.Thread(target=ex.run, args=(plan, [listener]), kwargs={"force": True, "jobs": 4})
    t.start()
    while len(placed) < 4:
        time.sleep(0.05)
    time.sleep(0.5)
    worker = cluster.worker_node_id()
    lost = [step for step, text in placed.items() if worker in text]
    began = time.perf_counter()
    cluster.worker_raylet().kill()
    while not all(step in ended for step in lost):
        time.sleep(0.02)
    took = max(ended[step][0] for step in lost) - began
    ex.cancel()
    t.join(60)
    cluster.add_worker()
    checks = "health checks every 0.5 s, 3 misses" if cluster.fast_health else "Ray's default health checks"
    print(f"worker node lost -> its {len(lost)} steps failed ({ended[lost[0]][1][:40]}...): {took:.1f} s ({checks})")


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10, help="steps in the chain timed for the per-step overhead")
    ap.add_argument("--branches", type=int, default=16, help="independent steps run 4 at a time")
    ap.add_argument("--seconds", type=float, default=2.0, help="how long each of them works")
    ap.add_argument("--ticks", type=int, default=200, help="log lines for the latency figure")
    ap.add_argument("--lines", type=int, default=20000, help="lines one step floods for the throughput figure")
    ap.add_argument("--quiet-steps", type=int, default=12, help="steps run at once for the driver's polling cost")
    ap.add_argument("--default-health", action="store_true", help="the cluster with Ray's default node health checks")
    ap.add_argument("--only-lost-node", action="store_true", help="only the lost-node figure")
    args = ap.parse_args()
    if importlib.util.find_spec("ray") is None:
        print("Ray is not installed: pip install -e '.[ray]'")
        return
    from musubi_pipe.executors.ray_runner import RayExecutor
    from ray_cluster import LocalRayCluster, free_base_port

    with tempfile.TemporaryDirectory(prefix="mpbench-", dir="/tmp") as d:
        tmp = Path(d)
        checkout = make_fake_checkout(tmp / "musubi-tuner")
        config = replace(config_for(checkout), shared_root=tmp)
        cluster = LocalRayCluster(tmp / "r", free_base_port(), fast_health=not args.default_health).start()
        try:
            import ray

            began = time.perf_counter()
            ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False, configure_logging=False)
            print(f"connect to the cluster (once per run): {time.perf_counter() - began:.2f} s")
            executors = {"local": lambda: LocalExecutor(config), "ray": lambda: RayExecutor(config, cluster.address)}
            if args.only_lost_node:
                lost_node(executors["ray"], checkout, tmp, cluster)
                return
            overhead(executors, checkout, tmp, args.steps)
            side_by_side(executors, checkout, tmp, args.branches, args.seconds)
            latency(executors, checkout, tmp, args.ticks)
            throughput(executors, checkout, tmp, args.lines)
            cancel(executors, checkout, tmp)
            idle_cost(executors["ray"], checkout, tmp, args.quiet_steps)
            lost_node(executors["ray"], checkout, tmp, cluster)
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
