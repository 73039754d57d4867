"""Cancel stops the whole process tree of every kind of step, keeps the state file consistent and
saved checkpoints intact; the next run resumes training with the steps that are left."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from executor_plans import Recorder, config_for, wan_plan
from musubi_double import make_fake_checkout
from musubi_pipe.compiler.plan import Output, Plan, Step
from musubi_pipe.executors.local import LocalExecutor
from musubi_pipe.executors.state import StateFile, state_path

pytestmark = pytest.mark.skipif(os.name == "nt", reason="process-group signals are POSIX")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    return make_fake_checkout(tmp_path_factory.mktemp("double") / "musubi-tuner")


@pytest.fixture(autouse=True)
def clean_env(checkout, monkeypatch):
    shutil.rmtree(checkout / ".double-state", ignore_errors=True)
    for k in ("MUSUBI_DOUBLE_FAIL", "MUSUBI_DOUBLE_FAIL_ONCE", "MUSUBI_DOUBLE_FAIL_AT", "MUSUBI_DOUBLE_STEP_SECONDS",
              "MUSUBI_DOUBLE_RECORD"):
        monkeypatch.delenv(k, raising=False)


def start(executor, plan, **kw):
    """Run in a thread; return (thread, recorder, box with the result)."""
    rec, box = Recorder(), {}
    t = threading.Thread(target=lambda: box.setdefault("result", executor.run(plan, [rec], **kw)), daemon=True)
    t.start()
    return t, rec, box


def wait_for(predicate, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


def tree() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def assert_gone(procs: list[psutil.Process]) -> None:
    alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.cmdline()) for p in alive]


SCRIPTS = {"cache_latents": "wan_cache_latents", "cache_text": "wan_cache_text_encoder_outputs",
           "train": "wan_train_network", "ema": "lora_post_hoc_ema", "convert": "convert_lora"}


@pytest.mark.parametrize("step_id", list(SCRIPTS))
def test_cancel_stops_every_process_of_each_kind_of_step(checkout, tmp_path, monkeypatch, step_id):
    monkeypatch.setenv("MUSUBI_DOUBLE_FAIL", f"{SCRIPTS[step_id]}:hang")
    ex = LocalExecutor(config_for(checkout))
    plan = wan_plan(tmp_path)
    t, rec, box = start(ex, plan)
    wait_for(lambda: any(e.kind == "step_start" and e.step == step_id for e in rec.events))
    if step_id == "train":  # accelerate launch + the training child
        wait_for(lambda: len(tree()) >= 2)
    time.sleep(0.3)
    procs = tree()
    assert procs
    began = time.monotonic()
    ex.cancel()
    t.join(timeout=20)
    assert not t.is_alive()
    assert time.monotonic() - began < 3.0
    assert_gone(procs)
    result = box["result"]
    assert result.status == "cancelled" and result.steps[step_id] == "cancelled"
    state = StateFile(state_path(plan))
    order = list(SCRIPTS)
    for earlier in order[:order.index(step_id)]:
        assert state.record(earlier)["status"] == "succeeded"
    assert state.record(step_id)["status"] == "cancelled"
    for later in order[order.index(step_id) + 1:]:
        assert state.record(later) is None
    assert rec.ended()[step_id]["status"] == "cancelled"


def test_cancelled_training_keeps_checkpoints_and_resumes_with_the_steps_left(checkout, tmp_path, monkeypatch):
    record = tmp_path / "double-runs.jsonl"
    monkeypatch.setenv("MUSUBI_DOUBLE_RECORD", str(record))
    monkeypatch.setenv("MUSUBI_DOUBLE_FAIL", "wan_train_network:hang")
    monkeypatch.setenv("MUSUBI_DOUBLE_FAIL_AT", "7")  # hangs in step 7, after saving steps 2, 4 and 6
    monkeypatch.setenv("MUSUBI_DOUBLE_FAIL_ONCE", "1")
    out = tmp_path / "out"
    plan = wan_plan(tmp_path, steps=10, save_every_steps=2, save_state=True)
    ex = LocalExecutor(config_for(checkout))
    t, rec, box = start(ex, plan)
    wait_for(lambda: (out / "lora-step00000006-state" / "random_states_0.pkl").exists())
    time.sleep(0.5)
    saved = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    ex.cancel()
    t.join(timeout=20)
    assert box["result"].status == "cancelled"
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    tags = {n for n in after if n.endswith(".musubi-pipe.json")}  # which settings saved each state
    assert tags == {f"lora-step0000000{i}-state.musubi-pipe.json" for i in (2, 4, 6)}
    assert {n: t for n, t in after.items() if n not in tags} == saved  # nothing removed or touched
    assert "lora-step00000006.safetensors" in saved and "lora-step00000006-state" in saved
    assert StateFile(state_path(plan)).record("train")["progress"]["total"] == 10

    rec2 = Recorder()
    result = LocalExecutor(config_for(checkout)).run(wan_plan(tmp_path, steps=10, save_every_steps=2, save_state=True), [rec2])
    assert result.status == "succeeded", rec2.ended()
    assert rec2.skipped() == {"cache_latents": "up to date", "cache_text": "up to date"}
    train_runs = [json.loads(line) for line in record.read_text().splitlines() if '"wan_train_network"' in line]
    argv = train_runs[-1]["argv"]
    assert argv[argv.index("--resume") + 1] == str(out / "lora-step00000006-state")
    assert argv[argv.index("--max_train_steps") + 1] == "4"
    assert rec2.ended()["train"]["changes"][0] == "resumed from lora-step00000006-state: 4 of 10 steps left"
    # the resumed run's files carry the numbering of one uninterrupted run; old ones untouched
    names = sorted(p.name for p in out.iterdir())
    assert "lora-step00000008.safetensors" in names and "lora-step00000008-state" in names
    assert "lora.safetensors" in names and not [n for n in names if "resume" in n]
    for name, mtime in saved.items():
        assert (out / name).stat().st_mtime_ns == mtime
    # and the run after that skips everything
    rec3 = Recorder()
    LocalExecutor(config_for(checkout)).run(wan_plan(tmp_path, steps=10, save_every_steps=2, save_state=True), [rec3])
    assert set(rec3.skipped().values()) == {"up to date"}


STUBBORN = '''"""musubi-pipe test: a step that ignores SIGTERM and leaves a grandchild in its own session."""
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"],
                 start_new_session=True)
print("started", flush=True)
time.sleep(600)
'''


def test_a_step_that_ignores_sigterm_is_killed_after_the_grace_period(checkout, tmp_path):
    script = checkout / "src" / "musubi_tuner" / "_test_stubborn.py"
    script.write_text(STUBBORN)
    step = Step(id="stubborn", kind="convert", family="wan", script="_test_stubborn.py", args=[], fingerprint="x",
                outputs=[Output("x", "file", str(tmp_path / "never"))])
    plan = Plan(name="s", source=str(tmp_path / "s.toml"), workdir=str(tmp_path), steps=[step])
    ex = LocalExecutor(config_for(checkout, grace_s=0.5))
    t, rec, box = start(ex, plan)
    wait_for(lambda: any(e.kind == "log" and "started" in e.data.get("text", "") for e in rec.events))
    wait_for(lambda: len(tree()) >= 2)
    procs = tree()
    began = time.monotonic()
    ex.cancel()
    t.join(timeout=20)
    assert time.monotonic() - began < 3.0
    assert_gone(procs)  # the grandchild left the process group and is still found and killed
    assert box["result"].status == "cancelled"


def test_ctrl_c_in_the_terminal_stops_the_run(checkout, tmp_path):
    """SIGINT to a driver that installs the same handler as `musubi-pipe run`."""
    driver = tmp_path / "driver.py"
    driver.write_text(f'''
import signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from executor_plans import config_for, wan_plan
from musubi_pipe.executors.local import LocalExecutor
from pathlib import Path
ex = LocalExecutor(config_for(Path({str(checkout)!r})))
signal.signal(signal.SIGINT, lambda *a: ex.cancel())
result = ex.run(wan_plan(Path({str(tmp_path / "p")!r})), [lambda e: print(e.kind, e.step, flush=True)])
sys.exit(130 if result.status == "cancelled" else 1)
''')
    env = {**os.environ, "MUSUBI_DOUBLE_FAIL": "wan_train_network:hang"}
    proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("step_start train"):
            break
    wait_for(lambda: len(psutil.Process(proc.pid).children(recursive=True)) >= 2)
    procs = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 130
    assert_gone(procs)


def test_a_resumed_run_cancelled_again_resumes_from_its_own_newest_state(checkout, tmp_path, monkeypatch):
    record = tmp_path / "double-runs.jsonl"
    monkeypatch.setenv("MUSUBI_DOUBLE_RECORD", str(record))
    monkeypatch.setenv("MUSUBI_DOUBLE_STEP_SECONDS", "0.4")  # cancel lands well before the next save
    out = tmp_path / "out"

    def plan():
        return wan_plan(tmp_path, steps=12, save_every_steps=2, save_state=True)

    for newest in ("lora-step00000004-state", "lora-resume1-step00000002-state"):  # the 2nd is step 6 overall
        ex = LocalExecutor(config_for(checkout))
        t, rec, box = start(ex, plan())
        wait_for(lambda: (out / newest / "random_states_0.pkl").exists())
        ex.cancel()
        t.join(timeout=20)
        assert box["result"].status == "cancelled"
    assert (out / "lora-step00000006-state").is_dir()  # renamed into one run's numbering
    monkeypatch.setenv("MUSUBI_DOUBLE_STEP_SECONDS", "0.01")
    rec = Recorder()
    assert LocalExecutor(config_for(checkout)).run(plan(), [rec]).status == "succeeded"
    argv = [json.loads(line) for line in record.read_text().splitlines() if '"wan_train_network"' in line][-1]["argv"]
    assert argv[argv.index("--resume") + 1] == str(out / "lora-step00000006-state")
    assert argv[argv.index("--max_train_steps") + 1] == "6"
    assert argv[argv.index("--output_name") + 1] == "lora-resume2"
    assert (out / "lora-step00000010.safetensors").exists() and (out / "lora.safetensors").exists()


def test_cancel_during_the_wait_before_a_retry_ends_the_step_like_any_cancel(checkout, tmp_path, monkeypatch):
    from musubi_pipe.executors.local import RetryPolicy

    monkeypatch.setenv("MUSUBI_DOUBLE_FAIL", "wan_cache_latents:hub_download")
    ex = LocalExecutor(config_for(checkout))
    plan = wan_plan(tmp_path)
    t, rec, box = start(ex, plan, retry=RetryPolicy(enabled=True, backoff_s=(600.0,)))
    wait_for(lambda: any(e.kind == "log" and "retrying in 600 s" in e.data.get("text", "") for e in rec.events))
    ex.cancel()
    t.join(timeout=20)
    assert box["result"].status == "cancelled"
    end = rec.ended()["cache_latents"]
    assert (end["status"], end["cause"]) == ("cancelled", "cancelled by the user")
    assert end["fix"].startswith("run again: finished steps are skipped")
    record = StateFile(state_path(plan)).record("cache_latents")
    assert (record["status"], record["cause"], record["fix"]) == ("cancelled", end["cause"], end["fix"])
