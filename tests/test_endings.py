"""Every way `musubi-pipe run` can end leaves no process of the run behind, a valid state file, and
a next run that does the right thing: Ctrl-C, SIGTERM, SIGHUP (a closed SSH session), kill -9, a
broken output pipe (`2>&1 | tee log` ended by the same Ctrl-C) and a crash of musubi-pipe, each
during caching and during training. Also: one run of a pipeline at a time, and one pipeline per
workdir. The runs are real `musubi-pipe run` processes against the musubi-tuner test double."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from executor_plans import SMALL_WAN
from media_factory import make_video
from musubi_double import make_fake_checkout
from musubi_pipe.compiler import compile_file
from musubi_pipe.errors import PipelineError
from musubi_pipe.executors.dry import DryExecutor
from musubi_pipe.executors.local import LocalExecutor
from musubi_pipe.executors.state import StateFile

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX signals")

PIPELINE = """
name = "{name}"
""" + SMALL_WAN + """[stages.train]
kind = "train"
network_dim = 4
max_train_steps = 6
save_every_n_steps = 1
save_state = true
"""
# Runs musubi-pipe's CLI; SIGUSR1 makes it crash wherever it is (an exception in the main thread).
DRIVER = """
import signal, sys
def crash(signum, frame):
    raise RuntimeError("injected crash")
signal.signal(signal.SIGUSR1, crash)
from musubi_pipe.cli import main
main(args=sys.argv[1:], prog_name="musubi-pipe")
"""
HANG = {"caching": ("latents", "wan_cache_latents"), "training": ("train", "wan_train_network")}


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    return make_fake_checkout(tmp_path_factory.mktemp("double") / "musubi-tuner")


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def fresh_faults(checkout):
    shutil.rmtree(checkout / ".double-state", ignore_errors=True)  # fail-once markers of earlier tests
    yield
    for proc in STARTED:  # a failed test must not leave its hanging run to the next tests
        if proc.poll() is None:
            family = psutil.Process(proc.pid).children(recursive=True)
            proc.kill()
            proc.wait()
            for p in family:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
    STARTED.clear()


def project(folder: Path, name: str = "ends", file: str = "pipeline.toml") -> Path:
    (folder / "models").mkdir(parents=True, exist_ok=True)
    for model in ("wan_bf16.safetensors", "vae.safetensors", "t5.safetensors"):
        (folder / "models" / model).write_bytes(b"\0" * 16)
    if not (folder / "clips").exists():
        (folder / "clips").mkdir()
        for i in range(2):
            make_video(folder / "clips" / f"c{i}.mp4", n=8, fps=16.0, width=96, height=64)
            (folder / "clips" / f"c{i}.txt").write_text(f"clip {i}")
    path = folder / file
    path.write_text(PIPELINE.format(name=name))
    return path


def cli_env(checkout: Path, tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSUBI_DOUBLE_")}
    env.update(MUSUBI_TUNER_DIR=str(checkout), MUSUBI_PIPE_CONFIG=str(tmp_path / "no-config.toml"), CI="1",
               MUSUBI_DOUBLE_STEP_SECONDS="0.05", **extra)
    return env


def start(pipeline: Path, env: dict) -> subprocess.Popen:
    return _started(subprocess.Popen([sys.executable, "-c", DRIVER, "run", "--plain", str(pipeline)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, cwd=pipeline.parent))


def _started(proc: subprocess.Popen) -> subprocess.Popen:
    STARTED.append(proc)
    return proc


def read_until(proc: subprocess.Popen, text: str, timeout: float = 60.0) -> list[str]:
    seen, end = [], time.monotonic() + timeout
    for raw in proc.stdout:
        line = raw.decode("utf-8", "replace")
        seen.append(line)
        if text in line:
            return seen
        assert time.monotonic() < end, "".join(seen)
    raise AssertionError(f"{text!r} never came:\n{''.join(seen)}")


def wait_for(predicate, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def scripts(procs: list[psutil.Process]) -> str:
    return " ".join(" ".join(p.cmdline()) for p in alive(procs))


def hanging(proc: subprocess.Popen, point: str, folder: Path) -> list[psutil.Process]:
    """Once the step hangs (caching: after batch 1 of 2; training: in step 3, after saving the
    states of steps 1 and 2): every process of the run (step, its children, the watchdog)."""
    step, script = HANG[point]
    read_until(proc, f"▶ {step}")
    if point == "training":
        wait_for(lambda: (folder / "musubi-out/ends/train/ends-step00000002-state/random_states_0.pkl").exists())
    else:
        wait_for(lambda: list((folder / "cache").glob("*_wan.safetensors")))
    parent = psutil.Process(proc.pid)
    wanted = 3 if point == "training" else 2  # accelerate + trainer, or the cache script; + watchdog
    wait_for(lambda: len(parent.children(recursive=True)) >= wanted)
    time.sleep(0.3)
    procs = parent.children(recursive=True)
    assert script in scripts(procs) and "psutil" in scripts(procs)
    return procs


def end_by(proc: subprocess.Popen, how: str) -> int:
    if how == "broken pipe":  # `| tee log`: Ctrl-C reaches tee too, then musubi-pipe's output has no reader
        proc.stdout.close()
        proc.send_signal(signal.SIGINT)
    else:
        {"ctrl-c": lambda: proc.send_signal(signal.SIGINT), "sigterm": proc.terminate, "sighup":
         lambda: proc.send_signal(signal.SIGHUP), "kill -9": proc.kill, "crash": lambda: proc.send_signal(signal.SIGUSR1)}[how]()
    rc = proc.wait(timeout=30)
    if not proc.stdout.closed:
        proc.stdout.read()
    return rc


EXPECTED = {  # exit code, the interrupted step's status in the state file right after
    "ctrl-c": (130, "cancelled"), "sigterm": (128 + signal.SIGTERM, "cancelled"), "sighup": (128 + signal.SIGHUP, "cancelled"),
    "broken pipe": (130, "cancelled"), "kill -9": (-signal.SIGKILL, "running"), "crash": (1, "failed"),
}


@pytest.mark.parametrize("point", ["caching", "training"])
@pytest.mark.parametrize("how", list(EXPECTED))
def test_every_ending_leaves_no_process_a_valid_state_and_a_next_run_that_finishes(checkout, tmp_path, how, point):
    pipeline = project(tmp_path / "p")
    plan = compile_file(pipeline)
    step, script = HANG[point]
    env = cli_env(checkout, tmp_path, MUSUBI_DOUBLE_FAIL=f"{script}:hang", MUSUBI_DOUBLE_FAIL_ONCE="1",
                  MUSUBI_DOUBLE_FAIL_AT="3" if point == "training" else "2")  # caching: batch 2 of 2
    proc = start(pipeline, env)
    procs = hanging(proc, point, pipeline.parent)
    rc = end_by(proc, how)
    wait_for(lambda: not alive(procs), timeout=10)  # kill -9: the watchdog ends them, SIGTERM first

    code, status = EXPECTED[how]
    assert rc == code
    state = json.loads((pipeline.parent / "pipeline.musubi-lock.json").read_text())  # valid JSON
    assert state["steps"][step]["status"] == status
    if how == "crash":
        assert "injected crash" in state["steps"][step]["cause"] and state["steps"][step]["interrupted"]

    again = subprocess.run([sys.executable, "-m", "musubi_pipe.cli", "run", "--plain", str(pipeline)], env=env,
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    after = StateFile(pipeline.parent / "pipeline.musubi-lock.json")
    assert {s.id: after.record(s.id)["status"] for s in plan.steps} == dict.fromkeys(["latents", "text", "train"], "succeeded")
    if point == "training":  # states saved at steps 1 and 2: the rest of the run, not all of it again
        assert "resumed from ends-step00000002-state: 4 of 6 steps left" in again.stdout
    else:
        assert "latents skipped" not in again.stdout and "text skipped" not in again.stdout


def test_after_kill_9_the_next_run_records_the_dead_runs_step_as_interrupted(checkout, tmp_path):
    pipeline = project(tmp_path / "p")
    env = cli_env(checkout, tmp_path, MUSUBI_DOUBLE_FAIL="wan_train_network:hang", MUSUBI_DOUBLE_FAIL_AT="3")
    proc = start(pipeline, env)
    procs = hanging(proc, "training", pipeline.parent)
    end_by(proc, "kill -9")
    wait_for(lambda: not alive(procs), timeout=10)
    state = pipeline.parent / "pipeline.musubi-lock.json"
    assert StateFile(state).record("train")["status"] == "running"  # nobody could record it
    # the next run takes the lock, so no process of this pipeline can be running that step
    result = LocalExecutor(_config(checkout)).run(compile_file(pipeline), [], only=["latents"])
    assert result.steps == {"latents": "skipped", "text": "skipped", "train": "skipped"}
    record = StateFile(state).record("train")
    assert record["status"] == "failed" and record["interrupted"]
    assert "ended without recording how" in record["cause"] and record["fix"].startswith("run again")


def _config(checkout: Path):
    from executor_plans import config_for

    return config_for(checkout)


def test_a_second_run_of_the_same_pipeline_is_refused_naming_the_running_pid(checkout, tmp_path):
    pipeline = project(tmp_path / "p")
    env = cli_env(checkout, tmp_path, MUSUBI_DOUBLE_FAIL="wan_train_network:hang", MUSUBI_DOUBLE_FAIL_AT="3")
    first = start(pipeline, env)
    try:
        hanging(first, "training", pipeline.parent)
        second = subprocess.run([sys.executable, "-m", "musubi_pipe.cli", "run", "--plain", str(pipeline)], env=env,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert f"another run of this pipeline is running (pid {first.pid}" in second.stderr
        assert "kill" in second.stderr and "a run that died holds no lock" in second.stderr
        with pytest.raises(PipelineError, match=f"pid {first.pid}"):  # in-process (ComfyUI) too
            LocalExecutor(_config(checkout)).run(compile_file(pipeline), [])
        state = json.loads((pipeline.parent / "pipeline.musubi-lock.json").read_text())
        assert state["steps"]["train"]["status"] == "running"  # the refused runs changed nothing
    finally:
        end_by(first, "ctrl-c")
    assert first.returncode == 130


def test_two_pipelines_with_the_same_name_do_not_share_a_workdir(checkout, tmp_path):
    folder = tmp_path / "p"
    first, second = project(folder, file="a.toml"), project(folder, file="b.toml")
    assert compile_file(first).workdir == compile_file(second).workdir  # musubi-out/ends for both
    config = _config(checkout)
    assert LocalExecutor(config).run(compile_file(first), []).status == "succeeded"
    for executor in (LocalExecutor(config), DryExecutor(config)):
        with pytest.raises(PipelineError) as err:
            executor.run(compile_file(second), [])
        text = str(err.value)
        assert f"belongs to another pipeline, {first}" in text and "both pipelines are named 'ends'" in text
        assert "give this pipeline another `name`, or set `workdir" in text and str(second) in text
    # a name of its own, or a workdir of its own, and it runs
    second.write_text(PIPELINE.format(name="ends-b"))
    assert LocalExecutor(config).run(compile_file(second), []).status == "succeeded"
    second.write_text(PIPELINE.format(name="ends").replace('task = "t2v-1.3B"', 'task = "t2v-1.3B"\nworkdir = "out-b"'))
    assert LocalExecutor(config).run(compile_file(second), []).status == "succeeded"
    # a renamed pipeline file keeps its workdir
    first.rename(folder / "renamed.toml")
    assert LocalExecutor(config).run(compile_file(folder / "renamed.toml"), []).status == "succeeded"
    owner = json.loads((folder / "musubi-out" / "ends" / ".musubi-pipe" / "owner.json").read_text())
    assert owner["pipeline"] == str(folder / "renamed.toml")


def test_inside_one_process_a_second_run_is_refused_and_told_who_runs(checkout, tmp_path, monkeypatch):
    """ComfyUI runs pipelines in its own process: the lock holds between threads too, and the
    message does not tell the user to kill the server."""
    import threading

    pipeline = project(tmp_path / "p")
    monkeypatch.setenv("MUSUBI_DOUBLE_FAIL", "wan_cache_latents:hang")
    first = LocalExecutor(_config(checkout))
    thread = threading.Thread(target=lambda: first.run(compile_file(pipeline), []), daemon=True)
    thread.start()
    wait_for(lambda: len(psutil.Process().children()) >= 2)  # the hanging cache script and its watchdog
    try:
        with pytest.raises(PipelineError) as err:
            LocalExecutor(_config(checkout)).run(compile_file(pipeline), [])
        assert "in this process" in str(err.value) and "kill" not in str(err.value)
    finally:
        first.cancel()
        thread.join(timeout=20)
    monkeypatch.delenv("MUSUBI_DOUBLE_FAIL")
    assert LocalExecutor(_config(checkout)).run(compile_file(pipeline), [], until="latents").status == "succeeded"


def test_an_unwritable_workdir_is_a_message_not_a_traceback(checkout, tmp_path):
    pipeline = project(tmp_path / "p")
    (pipeline.parent / "musubi-out").write_text("a file where the workdir's parent should be")
    with pytest.raises(PipelineError) as err:
        LocalExecutor(_config(checkout)).run(compile_file(pipeline), [])
    assert "cannot open the run lock" in str(err.value) and "workdir" in str(err.value)


def test_closing_the_terminal_of_a_run_with_live_bars_cancels_it(checkout, tmp_path):
    """A closed SSH session: the kernel hangs up the terminal (SIGHUP to the session), and every
    later write to it fails. Live bars (rich), as in a real terminal."""
    import fcntl
    import pty
    import select
    import termios

    pipeline = project(tmp_path / "p")
    env = cli_env(checkout, tmp_path, MUSUBI_DOUBLE_FAIL="wan_train_network:hang", MUSUBI_DOUBLE_FAIL_AT="3")
    env.pop("CI")
    master, slave = pty.openpty()
    proc = _started(subprocess.Popen([sys.executable, "-c", DRIVER, "run", str(pipeline)], stdin=slave, stdout=slave,
                                     stderr=slave, env=env, cwd=pipeline.parent, start_new_session=True,
                                     preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0)))  # the pty is its terminal
    os.close(slave)
    state_saved = pipeline.parent / "musubi-out/ends/train/ends-step00000002-state/random_states_0.pkl"
    shown, end = b"", time.monotonic() + 60
    while not (state_saved.exists() and len(psutil.Process(proc.pid).children(recursive=True)) >= 3):
        assert time.monotonic() < end and proc.poll() is None, shown.decode("utf-8", "replace")
        if select.select([master], [], [], 0.05)[0]:
            shown += os.read(master, 65536)
    procs = psutil.Process(proc.pid).children(recursive=True)
    assert "━" in shown.decode("utf-8", "replace")  # live bars, not plain lines
    os.close(master)  # the terminal goes away
    assert proc.wait(timeout=30) == 128 + signal.SIGHUP
    wait_for(lambda: not alive(procs), timeout=10)
    assert StateFile(pipeline.parent / "pipeline.musubi-lock.json").record("train")["status"] == "cancelled"
