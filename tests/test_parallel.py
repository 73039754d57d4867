"""Parallel branches on local GPUs (`run --jobs N`): steps whose dependencies succeeded run at the
same time, each on its own devices from the configuration's `gpus` pool; the caches several
branches need run once; a failure skips only its dependents; cancel stops every branch; the state
file and run records stay whole. Runs the sweep of tests/test_scale.py through the test double."""
from __future__ import annotations

import itertools
import json
import os
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from executor_plans import Recorder, config_for
from musubi_double import make_fake_checkout
from musubi_pipe.compiler import compile_file
from musubi_pipe.compiler.plan import Output, Step
from musubi_pipe.errors import PipelineError
from musubi_pipe.executors.local import LocalExecutor
from musubi_pipe.executors.schedule import Scheduler, step_gpus
from musubi_pipe.executors.state import RUNNING, StateFile, state_path
from musubi_pipe.executors.terminal import TerminalDisplay
from test_scale import project

FOUR = "sweep = { learning_rate = [1e-4, 2e-4], network_dim = [4, 8] }"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    return make_fake_checkout(tmp_path_factory.mktemp("double") / "musubi-tuner")


@pytest.fixture(autouse=True)
def clean_env(checkout, monkeypatch):
    shutil.rmtree(checkout / ".double-state", ignore_errors=True)
    for k in ("MUSUBI_DOUBLE_FAIL", "MUSUBI_DOUBLE_FAIL_ONCE", "MUSUBI_DOUBLE_STEP_SECONDS", "MUSUBI_DOUBLE_RECORD",
              "MUSUBI_DOUBLE_TIMES", "MUSUBI_DOUBLE_RUN_SECONDS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(k, raising=False)


def executor(checkout, gpus: str) -> LocalExecutor:
    return LocalExecutor(replace(config_for(checkout), gpus=gpus))


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def overlap(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def check_records(plan, result) -> None:
    """The state file holds whole records, none still running; every started step ended."""
    state = json.loads(state_path(plan).read_text())
    assert not [s for s, r in state["steps"].items() if r.get("status") == RUNNING]
    events = [json.loads(line) for line in (result.run_dir / "events.jsonl").read_text().splitlines()]
    started = {e["step"] for e in events if e["kind"] == "step_start"}
    ended = {e["step"] for e in events if e["kind"] == "step_end"}
    assert started == ended
    assert events[-1]["kind"] == "run_end"


# ---- the scheduler on its own ----------------------------------------------------------------

def _s(sid, needs=(), kind="cache_latents", launch=(), outputs=(), launcher=None):
    launcher = launcher or ("accelerate" if launch else "python")
    return Step(sid, kind, "wan", "x.py", [], launcher=launcher, launch_args=list(launch), needs=list(needs),
                outputs=[Output("o", "file", p) for p in outputs])


def test_gpus_a_step_needs_come_from_its_launch_and_the_registry():
    assert step_gpus(_s("a")) == 1  # a GPU script (caching)
    assert step_gpus(_s("a", kind="ema")) == 0 and step_gpus(_s("a", kind="convert")) == 0  # CPU-only, per the registry
    assert step_gpus(_s("a", kind="lora_merge", launcher="musubi-pipe")) == 0  # musubi-pipe's own tool
    assert step_gpus(_s("a", kind="train", launcher="accelerate", launch=["--multi_gpu", "--num_processes", "2"])) == 2
    # on several machines, the GPUs of this one
    assert step_gpus(_s("a", kind="train", launcher="accelerate", launch=["--num_processes", "4", "--num_machines", "2"])) == 2


def test_the_scheduler_gives_each_step_its_own_devices_and_waits_for_dependencies():
    steps = [_s("cache"), _s("a", ["cache"], "train", ["--num_processes", "2"]), _s("b", ["cache"], "train", ["--num_processes", "2"]),
             _s("c", ["cache"], "train", ["--num_processes", "2"]), _s("conv", ["a"], "convert")]
    sched = Scheduler(steps, jobs=8, pool=["0", "1", "2", "3"])
    assert [(s.id, d) for s, d in sched.startable()] == [("cache", ["0"])]
    assert sched.startable() == []  # the trains wait for the cache
    sched.finish("cache", "succeeded")
    assert [(s.id, d) for s, d in sched.startable()] == [("a", ["0", "1"]), ("b", ["2", "3"])]  # c waits for GPUs
    sched.finish("b", "succeeded")
    assert [(s.id, d) for s, d in sched.startable()] == [("c", ["2", "3"])]
    sched.finish("a", "failed")
    assert sched.blocked() == [("conv", "a failed")] and sched.startable() == []


def test_without_a_pool_gpu_steps_take_turns_and_jobs_bound_the_rest():
    steps = [_s("g1"), _s("g2"), _s("t1", kind="convert"), _s("t2", kind="convert"), _s("t3", kind="convert")]
    sched = Scheduler(steps, jobs=3)
    assert [(s.id, d) for s, d in sched.startable()] == [("g1", None), ("t1", []), ("t2", [])]
    sched.finish("g1", "succeeded")
    assert [s.id for s, _ in sched.startable()] == ["g2"]


def test_steps_writing_the_same_output_never_run_together():
    sched = Scheduler([_s("a", outputs=["/x/out"]), _s("b", kind="convert", outputs=["/x/out"])], jobs=4, pool=["0"])
    assert [s.id for s, _ in sched.startable()] == ["a"]
    sched.finish("a", "succeeded")
    assert [s.id for s, _ in sched.startable()] == ["b"]


# ---- through the double ------------------------------------------------------------------------

def test_branches_run_side_by_side_on_their_own_gpus_on_caches_made_once(checkout, tmp_path, monkeypatch):
    times = tmp_path / "times.jsonl"
    monkeypatch.setenv("MUSUBI_DOUBLE_TIMES", str(times))
    monkeypatch.setenv("MUSUBI_DOUBLE_RUN_SECONDS", "2.5")  # long enough to overlap on a loaded machine
    plan = compile_file(project(tmp_path, FOUR))
    rec = Recorder()
    result = executor(checkout, "0,1,2,3").run(plan, [rec], jobs=8)
    assert result.status == "succeeded", result.steps
    runs = lines(times)
    scripts = [r["script"] for r in runs]
    assert scripts.count("wan_cache_latents") == 1 and scripts.count("wan_cache_text_encoder_outputs") == 1
    trains = [r for r in runs if r["script"] == "wan_train_network"]
    caches = [r for r in runs if "cache" in r["script"]]
    assert len(trains) == 4
    assert min(t["start"] for t in trains) >= max(c["end"] for c in caches)  # the branches waited for the caches
    assert overlap(caches[0], caches[1])  # the two caches ran at the same time
    gpu_runs = [r for r in runs if r["devices"]]
    pairs = [(a, b) for a, b in itertools.combinations(gpu_runs, 2) if overlap(a, b)]
    assert sum(overlap(a, b) for a, b in itertools.combinations(trains, 2)) >= 3  # several branches at once
    for a, b in pairs:  # ... never on the same GPU
        assert not set(a["devices"].split(",")) & set(b["devices"].split(",")), (a, b)
    assert all(len(t["devices"].split(",")) == 1 for t in trains)
    assert all(r["devices"] == "" for r in runs if r["script"] == "convert_lora")  # a CPU step sees no GPU
    starts = {e.step: e.data["devices"] for e in rec.kinds("step_start")}
    assert starts["latents"] in (["0"], ["1"]) and starts["comfy-lr1e-4-nd4"] == []
    check_records(plan, result)
    again = executor(checkout, "0,1,2,3").run(compile_file(plan.source), [], jobs=8)
    assert set(again.steps.values()) == {"skipped"}


def test_a_two_gpu_branch_gets_two_devices_and_accelerate_the_same_ids(checkout, tmp_path, monkeypatch):
    record = tmp_path / "runs.jsonl"
    monkeypatch.setenv("MUSUBI_DOUBLE_RECORD", str(record))
    plan = compile_file(project(tmp_path, "num_processes = 2\nsweep = { learning_rate = [1e-4, 2e-4] }"))
    rec = Recorder()
    result = executor(checkout, "0,1,2,3").run(plan, [rec], jobs=4)
    assert result.status == "succeeded", result.steps
    devices = {}
    for e in rec.kinds("step_start"):
        if e.step.startswith("train"):
            argv = e.data["argv"]
            assert argv[argv.index("--gpu_ids") + 1] == ",".join(e.data["devices"])
            devices[e.step] = e.data["devices"]
    assert sorted(map(tuple, devices.values())) == [("0", "1"), ("2", "3")]
    ranks = [r for r in lines(record) if r["script"] == "wan_train_network"]
    assert len(ranks) == 4 and {r["devices"] for r in ranks} == {"0,1", "2,3"}  # each rank sees its step's pair


def test_a_step_needing_more_gpus_than_the_pool_is_refused_before_anything_runs(checkout, tmp_path, monkeypatch):
    record = tmp_path / "runs.jsonl"
    monkeypatch.setenv("MUSUBI_DOUBLE_RECORD", str(record))
    plan = compile_file(project(tmp_path, "num_processes = 4"))
    with pytest.raises(PipelineError) as err:
        executor(checkout, "0,1").run(plan, [], jobs=2)
    text = str(err.value)
    assert "stage 'train' needs 4 GPUs" in text and "stages.train.num_processes" in text and "num_processes = 2 or fewer" in text
    assert not record.exists()


def test_a_failed_branch_skips_its_dependents_and_the_other_branches_finish(checkout, tmp_path):
    plan = compile_file(project(tmp_path, "sweep = { learning_rate = [1e-4, 2e-4] }"))
    bad = "train-lr1e-4"
    plan.steps = [replace(s, env={**s.env, "MUSUBI_DOUBLE_FAIL": "wan_train_network:crash"}) if s.id == bad else s
                  for s in plan.steps]
    rec = Recorder()
    result = executor(checkout, "0,1").run(plan, [rec], jobs=2)
    assert result.status == "failed"
    assert result.steps[bad] == "failed" and result.steps["comfy-lr1e-4"] == "skipped"
    assert result.steps["train-lr2e-4"] == "succeeded" and result.steps["comfy-lr2e-4"] == "succeeded"
    reason = next(e.data["reason"] for e in rec.kinds("step_skipped") if e.step == "comfy-lr1e-4")
    assert reason == f"not run: {bad} failed"
    check_records(plan, result)


def test_cancel_stops_every_branch_and_leaves_no_process(checkout, tmp_path, monkeypatch):
    times = tmp_path / "times.jsonl"
    monkeypatch.setenv("MUSUBI_DOUBLE_TIMES", str(times))
    plan = compile_file(project(tmp_path, FOUR))
    plan.steps = [replace(s, env={**s.env, "MUSUBI_DOUBLE_RUN_SECONDS": "60"}) if s.kind == "train" else s for s in plan.steps]
    ex = executor(checkout, "0,1,2,3")
    ex.grace_s = ex.runner.grace_s = 2.0
    rec, box = Recorder(), {}
    t = threading.Thread(target=lambda: box.setdefault("result", ex.run(plan, [rec], jobs=8)), daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        trains = [p for p in psutil.Process().children(recursive=True) if "wan_train_network" in " ".join(p.cmdline())]
        if len(trains) >= 4 * 2:  # four branches, each an accelerate launcher and its trainer
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the four branches did not start together")
    ex.cancel()
    t.join(60)
    assert not t.is_alive()
    result = box["result"]
    assert result.status == "cancelled"
    gone = [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    assert not gone, [p.cmdline() for p in gone]
    trains = [s for s in result.steps if s.startswith("train")]
    assert {result.steps[s] for s in trains} == {"cancelled"}
    assert {result.steps[s] for s in result.steps if s.startswith("comfy")} == {"skipped"}
    state = StateFile(state_path(plan))
    assert {state.record(s)["status"] for s in trains} == {"cancelled"}
    check_records(plan, result)


def test_the_plain_display_names_each_running_step_and_its_gpu(checkout, tmp_path, monkeypatch):
    import io

    plan = compile_file(project(tmp_path, "sweep = { learning_rate = [1e-4, 2e-4] }"))
    out = io.StringIO()
    result = executor(checkout, "0,1").run(plan, [TerminalDisplay("plain", out)], jobs=4)
    assert result.status == "succeeded"
    text = out.getvalue()
    assert "▶ train-lr1e-4 on GPU " in text and "▶ train-lr2e-4 on GPU " in text
    progress = [line for line in text.splitlines() if line.startswith("  ") and ("training" in line or "caching" in line)]
    assert progress and all(line.split(":")[0].strip() in result.steps for line in progress)


def test_the_state_file_keeps_whole_records_when_threads_write_at_once(tmp_path):
    state = StateFile(tmp_path / "s.json")

    def write(n):
        for i in range(50):
            rec = {"status": "running", "n": n, "i": i, "progress": {"x": list(range(20))}}
            state.put(f"s{n}", rec)
            rec["progress"]["y"] = i  # the owner goes on changing its record

    threads = [threading.Thread(target=write, args=(n,)) for n in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    loaded = StateFile(tmp_path / "s.json")
    assert {k: v["i"] for k, v in loaded.steps.items()} == {f"s{n}": 49 for n in range(6)}


def test_jobs_must_be_positive(checkout, tmp_path):
    with pytest.raises(PipelineError, match="--jobs 0"):
        executor(checkout, "").run(compile_file(project(tmp_path, "")), [], jobs=0)


def test_without_jobs_a_failure_still_stops_the_run_as_before(checkout, tmp_path):
    plan = compile_file(project(tmp_path, "sweep = { learning_rate = [1e-4, 2e-4] }"))
    plan.steps = [replace(s, env={**s.env, "MUSUBI_DOUBLE_FAIL": "wan_train_network:crash"}) if s.id == "train-lr1e-4" else s
                  for s in plan.steps]
    result = executor(checkout, "0,1").run(plan, [])
    assert result.steps["train-lr1e-4"] == "failed" and result.steps["train-lr2e-4"] == "skipped"
    assert os.environ.get("CUDA_VISIBLE_DEVICES") is None



def test_the_memory_planner_plans_per_gpu_whatever_the_number_of_processes(tmp_path):
    one = compile_file(project(tmp_path / "one", "gpu_memory_gib = 12")).step("train")
    two = compile_file(project(tmp_path / "two", "gpu_memory_gib = 12\nnum_processes = 2")).step("train")
    tight = compile_file(project(tmp_path / "tight", "gpu_memory_gib = 6\nnum_processes = 2")).step("train")
    flags = lambda step: [a for a in step.args if a.startswith("--")]  # noqa: E731
    assert flags(one) == flags(two) and one.meta["memory_plan"] == two.meta["memory_plan"]
    assert flags(tight) != flags(two)  # a smaller GPU still changes the plan with two processes


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_ctrl_c_on_the_command_line_stops_every_branch(checkout, tmp_path):
    import signal
    import subprocess
    import sys

    from test_endings import DRIVER, alive, cli_env, read_until

    pipeline = project(tmp_path, "sweep = { learning_rate = [1e-4, 2e-4] }")
    env = cli_env(checkout, tmp_path, MUSUBI_PIPE_GPUS="0,1", MUSUBI_DOUBLE_FAIL="wan_train_network:hang")
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, "run", "--plain", "--jobs", "2", str(pipeline)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        read_until(proc, "▶ train-")
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 30
        # both branches hang in training: two launchers and their trainers
        while sum("wan_train_network" in " ".join(p.cmdline()) for p in alive(parent.children(recursive=True))) < 4:
            assert time.monotonic() < deadline, "both branches did not start"
            time.sleep(0.05)
        family = parent.children(recursive=True)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.2)
    assert not alive(family), [p.cmdline() for p in alive(family)]
    state = StateFile(state_path(compile_file(pipeline)))
    assert state.record("train-lr1e-4")["status"] == state.record("train-lr2e-4")["status"] == "cancelled"
