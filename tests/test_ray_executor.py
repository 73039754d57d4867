"""The Ray executor on a real local Ray cluster (a head and a worker node, two fake GPUs each) with
the musubi-tuner test double: a sweep and a Wan 2.2 two-expert pipeline run with their steps at the
same time on GPUs apart, a cancel leaves no process, a lost worker fails its steps with the cause,
and the state file stays consistent. Skipped without Ray, except where MUSUBI_PIPE_REQUIRE_RAY=1
(CI), where a missing Ray is a failure."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

if importlib.util.find_spec("ray") is None:
    if os.environ.get("MUSUBI_PIPE_REQUIRE_RAY") == "1":
        raise ImportError("MUSUBI_PIPE_REQUIRE_RAY=1 and Ray is not installed: pip install -e '.[test,ray]'")
    pytest.skip("Ray is not installed: pip install -e '.[test,ray]'", allow_module_level=True)

from executor_plans import SMALL_WAN_DATA, SMALL_WAN_MODELS, Recorder, config_for
from media_factory import make_video
from musubi_double import make_fake_checkout
from musubi_pipe.compiler import compile_file
from musubi_pipe.executors.ray_runner import RayExecutor
from musubi_pipe.executors.state import RUNNING, StateFile, state_path
from ray_cluster import LocalRayCluster, free_base_port

STEP_SECONDS = 0.05  # the double's seconds per training step, on every node
PLACED = "ray: step runs on node "  # the driver's note on where a step runs (events.jsonl)

COMMON = "\n" + SMALL_WAN_DATA
SWEEP = """
name = "sweep"
""" + SMALL_WAN_MODELS + COMMON + """
[stages.train]
kind = "train"
max_train_steps = {steps}
sweep = {{ learning_rate = [1e-4, 2e-4], network_dim = [4, 8] }}
"""
WAN22 = """
name = "wan22"
family = "wan"
task = "t2v-A14B"
[models]
dit = "models/wan2.2_t2v_low_noise_14B_fp16.safetensors"
dit_high_noise = "models/wan2.2_t2v_high_noise_14B_fp16.safetensors"
vae = "models/vae.safetensors"
t5 = "models/t5.safetensors"
""" + COMMON + """
[stages.train_high]
kind = "train"
expert = "high"
max_train_steps = {steps}
[stages.train_low]
kind = "train"
expert = "low"
max_train_steps = {steps}
"""


@pytest.fixture(scope="module")
def cluster():
    # short folder: Ray's socket paths must fit in 108 bytes
    root = Path(tempfile.mkdtemp(prefix="mpray-"))
    record, times = root / "double-runs.jsonl", root / "double-times.jsonl"
    # the nodes' own environment reaches the steps (the driver's shell does not travel)
    c = LocalRayCluster(root / "r", free_base_port(), env={
        "MUSUBI_DOUBLE_RECORD": str(record), "MUSUBI_DOUBLE_TIMES": str(times), "MUSUBI_DOUBLE_STEP_SECONDS": str(STEP_SECONDS)})
    c.start()
    c.record, c.times = record, times
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    return make_fake_checkout(tmp_path_factory.mktemp("double") / "musubi-tuner")


def project(folder: Path, text: str) -> Path:
    (folder / "models").mkdir(parents=True, exist_ok=True)
    for model in ("wan_bf16.safetensors", "wan2.2_t2v_low_noise_14B_fp16.safetensors",
                  "wan2.2_t2v_high_noise_14B_fp16.safetensors", "vae.safetensors", "t5.safetensors"):
        (folder / "models" / model).write_bytes(b"\0" * 16)
    make_video(folder / "clips" / "c0.mp4", n=8, fps=16.0, width=96, height=64)
    (folder / "clips" / "c0.txt").write_text("clip")
    path = folder / "pipeline.toml"
    path.write_text(text)
    return path


def executor(cluster, checkout, folder: Path) -> RayExecutor:
    return RayExecutor(replace(config_for(checkout, grace_s=2.0), shared_root=folder), cluster.address)


def double_runs(cluster, folder: Path) -> list[dict]:
    """What the double ran for this project: {script, pid, devices (its CUDA_VISIBLE_DEVICES), ...}."""
    lines = cluster.record.read_text().splitlines() if cluster.record.exists() else []
    return [r for r in map(json.loads, lines) if r["cwd"] == str(folder)]


def double_times(cluster, folder: Path) -> list[dict]:
    """When each of this project's double processes started and ended (by the process's own clock)."""
    pids = {r["pid"] for r in double_runs(cluster, folder)}
    lines = cluster.times.read_text().splitlines() if cluster.times.exists() else []
    return [r for r in map(json.loads, lines) if r["pid"] in pids]


def placements(run_dir: Path) -> dict[str, tuple[str, str, int]]:
    """Step -> (node id, GPUs, pid) from the run's own events (the line the driver logs)."""
    out = {}
    events = Path(run_dir) / "events.jsonl"
    for line in (events.read_text().splitlines() if events.exists() else []):
        try:
            e = json.loads(line)
        except ValueError:  # the driver is writing that line right now
            continue
        text = e.get("data", {}).get("text", "")
        if e["kind"] == "log" and e["data"].get("stream") == "musubi-pipe" and text.startswith(PLACED):
            node = text.split("(", 1)[1].split(")", 1)[0]
            gpus = text.split("GPUs [", 1)[1].split("]", 1)[0]
            out[e["step"]] = (node, gpus, int(text.rsplit("pid ", 1)[1]))
    return out


def intervals(plan) -> dict[str, tuple[float, float]]:
    state = StateFile(state_path(plan))
    return {s.id: (state.record(s.id)["started"], state.record(s.id)["finished"]) for s in plan.steps if state.record(s.id)}


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def no_running_records(plan) -> None:
    state = StateFile(state_path(plan))
    assert not [sid for sid, r in state.steps.items() if isinstance(r, dict) and r.get("status") == RUNNING]


def _alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _wait(what, timeout: float = 60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = what()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what.__doc__ or what}")


def test_a_sweep_runs_its_branches_at_once_on_gpus_apart_and_then_skips(cluster, checkout, tmp_path):
    plan = compile_file(project(tmp_path, SWEEP.format(steps=20)))
    trains = [s.id for s in plan.steps if s.kind == "train"]
    assert len(trains) == 4
    rec = Recorder()
    result = executor(cluster, checkout, tmp_path).run(plan, [rec])
    assert result.status == "succeeded", result.steps
    scripts = [r["script"] for r in double_runs(cluster, tmp_path)]
    assert scripts.count("wan_cache_latents") == 1 and scripts.count("wan_train_network") == 4  # caches shared
    where = placements(result.run_dir)
    assert set(trains) <= set(where)
    assert len({node for node, _, _ in where.values()}) == 2  # both nodes ran steps
    spans = intervals(plan)
    together = [(a, b) for i, a in enumerate(trains) for b in trains[i + 1:] if overlap(spans[a], spans[b])]
    assert together, spans  # branches ran at the same time
    for a, b in together:  # ... never on the same GPU of the same node
        assert where[a][:2] != where[b][:2], (a, b, where)
    # each double process saw exactly the one GPU Ray gave its step
    seen = {r["devices"] for r in double_runs(cluster, tmp_path) if r["script"] == "wan_train_network"}
    assert seen <= {"0", "1"}
    assert (result.run_dir / "sweep.txt").is_file()
    no_running_records(plan)
    again = executor(cluster, checkout, tmp_path).run(compile_file(plan.source), [])
    assert set(again.steps.values()) == {"skipped"}


def test_wan22_experts_train_at_the_same_time_on_their_own_gpus(cluster, checkout, tmp_path):
    plan = compile_file(project(tmp_path, WAN22.format(steps=30)))
    result = executor(cluster, checkout, tmp_path).run(plan, [])
    assert result.status == "succeeded", result.steps
    spans, where = intervals(plan), placements(result.run_dir)
    assert overlap(spans["train_high"], spans["train_low"]), spans
    assert where["train_high"][:2] != where["train_low"][:2]
    trains = [r for r in double_times(cluster, tmp_path) if r["script"] == "wan_train_network"]
    assert len(trains) == 2 and overlap((trains[0]["start"], trains[0]["end"]), (trains[1]["start"], trains[1]["end"]))
    assert {r["devices"] for r in trains} <= {"0", "1"}
    state = StateFile(state_path(plan))
    for step in ("train_high", "train_low"):
        loras = [o["path"] for o in state.record(step)["outputs"] if o["output"] == "lora"]
        assert loras and all(Path(p).is_file() for p in loras)
    assert set(executor(cluster, checkout, tmp_path).run(compile_file(plan.source), []).steps.values()) == {"skipped"}


def test_a_two_gpu_train_gets_two_gpus_of_one_node_and_accelerate_is_pointed_at_them(cluster, checkout, tmp_path):
    text = SWEEP.format(steps=20).replace("sweep = { learning_rate = [1e-4, 2e-4], network_dim = [4, 8] }",
                        "num_processes = 2\nsweep = { learning_rate = [1e-4, 2e-4] }")
    plan = compile_file(project(tmp_path, text))
    trains = [s.id for s in plan.steps if s.kind == "train"]
    assert len(trains) == 2
    result = executor(cluster, checkout, tmp_path).run(plan, [])
    assert result.status == "succeeded", result.steps
    where, spans = placements(result.run_dir), intervals(plan)
    assert overlap(spans[trains[0]], spans[trains[1]])  # a node each, at the same time
    assert {where[t][1] for t in trains} == {"0,1"} and where[trains[0]][0] != where[trains[1]][0]
    ranks = [r for r in double_runs(cluster, tmp_path) if r["script"] == "wan_train_network"]
    # accelerate's --gpu_ids named Ray's devices, not the scheduler's placeholders ("2,3" for one branch)
    assert len(ranks) == 4 and {r["devices"] for r in ranks} == {"0,1"}


def _start_in_thread(ex: RayExecutor, plan) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def go():
        try:
            out["result"] = ex.run(plan, [])
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            out["error"] = exc

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, out


def test_cancel_stops_every_step_on_every_node_and_leaves_no_process(cluster, checkout, tmp_path):
    plan = compile_file(project(tmp_path, SWEEP.format(steps=4000)))
    ex = executor(cluster, checkout, tmp_path)
    thread, out = _start_in_thread(ex, plan)

    def four_training():
        return len([r for r in double_runs(cluster, tmp_path) if r["script"] == "wan_train_network"]) == 4

    _wait(four_training, 90)
    time.sleep(1.0)
    run_dir = max((Path(plan.workdir) / "runs").iterdir())
    where = placements(run_dir)
    assert len({node for node, _, _ in where.values()}) == 2
    ex.cancel()
    thread.join(60)
    assert not thread.is_alive() and "error" not in out, out
    assert out["result"].status == "cancelled"
    pids = [r["pid"] for r in double_runs(cluster, tmp_path)] + [pid for _, _, pid in where.values()]
    _wait(lambda: not _alive(pids), 10)
    # no step actor is left on the cluster either
    assert not [p for p in cluster.processes() if "StepHost" in _cmdline(p)]
    state = StateFile(state_path(plan))
    trains = [s.id for s in plan.steps if s.kind == "train"]
    assert {state.record(t)["status"] for t in trains} == {"cancelled"}
    no_running_records(plan)


def test_a_lost_worker_fails_its_steps_with_the_cause_and_the_state_stays_consistent(cluster, checkout, tmp_path):
    plan = compile_file(project(tmp_path, SWEEP.format(steps=4000)))
    ex = executor(cluster, checkout, tmp_path)
    thread, out = _start_in_thread(ex, plan)
    worker = cluster.worker_node_id()
    runs = Path(plan.workdir) / "runs"
    run_dir = _wait(lambda: next(runs.iterdir(), None) if runs.exists() else None)

    def on_worker():
        where = placements(run_dir)
        running = [r for r in double_runs(cluster, tmp_path) if r["script"] == "wan_train_network"]
        return [s for s, (node, _, _) in where.items() if node == worker and s.startswith("train")] if len(running) == 4 else None

    lost = _wait(on_worker, 90)
    cluster_pids = [r["pid"] for r in double_runs(cluster, tmp_path)]
    cluster.worker_raylet().kill()
    try:
        state_of = lambda: StateFile(state_path(plan))  # noqa: E731
        _wait(lambda: all((state_of().record(s) or {}).get("status") == "failed" for s in lost), 60)
        ex.cancel()  # the branches on the head would train for minutes more
        thread.join(60)
        assert not thread.is_alive() and "error" not in out, out
        state = state_of()
        for sid in lost:
            record = state.record(sid)
            assert record["status"] == "failed" and record["category"] == "node_lost"
            assert record["cause"].startswith("node ") and "lost while the step ran" in record["cause"], record["cause"]
            assert "lost while the step ran" in (run_dir / f"{sid}.log").read_text()
        no_running_records(plan)
        # nothing of the step is left running, on the lost node either (its watchdog ended it)
        _wait(lambda: not _alive(cluster_pids), 20)
        # consistent: the caches stay done; what failed or was stopped runs again
        from musubi_pipe.executors.dry import DryExecutor

        again = DryExecutor(config_for(checkout)).run(compile_file(plan.source), [])
        assert again.steps["latents"] == again.steps["text"] == "skipped"
        assert {again.steps[s] for s in lost} == {"dry-run"}
    finally:
        cluster.add_worker()


def _cli(cluster, checkout, folder: Path, pipeline: Path, *extra: str) -> subprocess.Popen:
    from musubi_double import double_python

    config = folder / "config.toml"
    config.write_text(f'musubi_tuner_dir = "{checkout}"\npython = "{double_python(checkout)}"\nshared_root = "{folder}"\n'
                      "cancel_grace_s = 2.0\n")
    env = {**os.environ, "MUSUBI_PIPE_CONFIG": str(config)}
    # the config file names the double: environment overrides (a real checkout's MUSUBI_TUNER_DIR
    # when the real-checkout tests run) would beat it
    for name in ("RAY_ADDRESS", "MUSUBI_TUNER_DIR", "MUSUBI_PIPE_PYTHON", "MUSUBI_PIPE_GPUS"):
        env.pop(name, None)
    return subprocess.Popen([sys.executable, "-m", "musubi_pipe.cli", "run", "--executor", "ray", "--address", cluster.address,
                             "--plain", *extra, str(pipeline)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_the_command_line_runs_on_the_cluster_and_ctrl_c_stops_every_node(cluster, checkout, tmp_path):
    short = project(tmp_path / "short", WAN22.format(steps=10))
    proc = _cli(cluster, checkout, tmp_path, short)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "train_high" in out and "train_low" in out
    again = _cli(cluster, checkout, tmp_path, short)
    out = again.communicate(timeout=120)[0]
    assert again.returncode == 0 and "up to date" in out, out

    long = project(tmp_path / "long", WAN22.format(steps=4000))
    proc = _cli(cluster, checkout, tmp_path, long)
    folder = tmp_path / "long"
    _wait(lambda: len([r for r in double_runs(cluster, folder) if r["script"] == "wan_train_network"]) == 2, 90)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, out
    _wait(lambda: not _alive([r["pid"] for r in double_runs(cluster, folder)]), 10)
    no_running_records(compile_file(long))


def test_a_killed_driver_leaves_no_step_running_on_the_cluster(cluster, checkout, tmp_path):
    """kill -9 of `musubi-pipe run`: Ray ends the driver's actors, each actor's end its step's
    watchdog, and the next run records the steps as interrupted."""
    pipeline = project(tmp_path / "w", WAN22.format(steps=4000))
    folder = tmp_path / "w"
    proc = _cli(cluster, checkout, tmp_path, pipeline)
    _wait(lambda: len([r for r in double_runs(cluster, folder) if r["script"] == "wan_train_network"]) == 2, 90)
    time.sleep(0.5)
    proc.kill()
    proc.communicate(timeout=30)
    _wait(lambda: not _alive([r["pid"] for r in double_runs(cluster, folder)]), 20)
    again = _cli(cluster, checkout, tmp_path, pipeline, "--only", "latents")
    out = again.communicate(timeout=120)[0]
    assert again.returncode == 0, out
    state = StateFile(state_path(compile_file(pipeline)))
    for step in ("train_high", "train_low"):
        record = state.record(step)
        assert record["status"] == "failed" and record.get("interrupted"), record


def test_with_retry_a_step_of_a_lost_node_runs_again_on_the_nodes_left(cluster, checkout, tmp_path):
    from musubi_pipe.executors.local import RetryPolicy

    plan = compile_file(project(tmp_path, SWEEP.format(steps=80)))
    ex = executor(cluster, checkout, tmp_path)
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(result=ex.run(plan, [], retry=RetryPolicy(enabled=True, backoff_s=(0.2,)))),
                              daemon=True)
    thread.start()
    worker = cluster.worker_node_id()
    runs = Path(plan.workdir) / "runs"
    run_dir = _wait(lambda: next(runs.iterdir(), None) if runs.exists() else None)
    lost = _wait(lambda: [s for s, (node, _, _) in placements(run_dir).items() if node == worker and s.startswith("train")]
                 if len([r for r in double_runs(cluster, tmp_path) if r["script"] == "wan_train_network"]) == 4 else None, 90)
    cluster.worker_raylet().kill()
    try:
        thread.join(120)
        assert out["result"].status == "succeeded", out["result"].steps
        state = StateFile(state_path(plan))
        for sid in lost:
            assert any("lost while the step ran" in c and "retrying" in c for c in state.record(sid)["changes"])
        assert len([r for r in double_runs(cluster, tmp_path) if r["script"] == "wan_train_network"]) == 4 + len(lost)
    finally:
        cluster.add_worker()
