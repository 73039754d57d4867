"""Resume is the uninterrupted run or nothing: a state saved under other settings or inputs is never
used, a schedule musubi would rebuild for the steps left is trained again from step 0, a resumed
run's learning rates, weights, file names, metadata and step counts are the whole run's, and what a
dead run left behind is finished by the next one. Against the test double, which models musubi
30c658c's resume (tests/musubi_double/engine.py)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from safetensors import safe_open

from executor_plans import Recorder, config_for, make_images, wan_plan
from musubi_double import make_fake_checkout
from musubi_pipe.compiler.plan import Output, Plan, Step
from musubi_pipe.executors.local import LocalExecutor
from musubi_pipe.executors.resume import TAG_SUFFIX, schedule_blocker
from musubi_pipe.executors.state import StateFile, missing_outputs, output_snapshot, state_path
from musubi_pipe.tools.monitor import EventFileReader

UP = "lora_unet_blocks_0_self_attn_q.lora_up.weight"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    return make_fake_checkout(tmp_path_factory.mktemp("double") / "musubi-tuner")


@pytest.fixture(autouse=True)
def clean_env(checkout, monkeypatch, tmp_path):
    shutil.rmtree(checkout / ".double-state", ignore_errors=True)
    for k in ("MUSUBI_DOUBLE_FAIL", "MUSUBI_DOUBLE_FAIL_ONCE", "MUSUBI_DOUBLE_FAIL_AT", "MUSUBI_DOUBLE_STEP_SECONDS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MUSUBI_DOUBLE_RECORD", str(tmp_path / "double-runs.jsonl"))


def run(checkout, plan) -> tuple[str, Recorder]:
    rec = Recorder()
    return LocalExecutor(config_for(checkout)).run(plan, [rec]).status, rec


def last_train_argv(tmp_path) -> list[str]:
    lines = (tmp_path / "double-runs.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"wan_train_network"' in line][-1]["argv"]


def crash_once_at(monkeypatch, step: int) -> None:
    monkeypatch.setenv("MUSUBI_DOUBLE_FAIL", "wan_train_network:crash")
    monkeypatch.setenv("MUSUBI_DOUBLE_FAIL_AT", str(step))
    monkeypatch.setenv("MUSUBI_DOUBLE_FAIL_ONCE", "1")


def lora(path: Path) -> tuple[dict, np.ndarray]:
    with safe_open(str(path), framework="numpy") as f:
        return f.metadata(), f.get_tensor(UP)


def lr_by_step(logs: Path, files: list[Path] | None = None) -> dict[int, float]:
    """lr/unet per step over the event files (later files win a step both have)."""
    series = {}
    for f in files if files is not None else sorted(logs.rglob("events.out.tfevents*"), key=lambda p: p.stat().st_mtime_ns):
        for _, step, tag, value in EventFileReader(f, ["lr/unet"]).read():
            series[step] = round(value / 1e-4, 6)
    return series


# ------------------------------------------------------------------------------ stale state


def test_a_state_saved_under_other_settings_is_never_resumed(checkout, tmp_path, monkeypatch):
    """The issue's case: 8 epochs done, change to 9, the run fails, run again."""
    out = tmp_path / "out"
    assert run(checkout, wan_plan(tmp_path, epochs=8, save_state=True))[0] == "succeeded"
    assert lora(out / "lora.safetensors")[0]["ss_steps"] == "16"
    assert (out / ("lora-000007-state" + TAG_SUFFIX)).exists()
    crash_once_at(monkeypatch, 1)
    assert run(checkout, wan_plan(tmp_path, epochs=9, save_state=True))[0] == "failed"
    status, rec = run(checkout, wan_plan(tmp_path, epochs=9, save_state=True))
    assert status == "succeeded", rec.ended()
    argv = last_train_argv(tmp_path)
    assert "--resume" not in argv and argv[argv.index("--max_train_epochs") + 1] == "9"
    assert argv[argv.index("--output_name") + 1] == "lora"
    assert not [c for c in rec.ended()["train"]["changes"] if "resume" in c]
    meta, _ = lora(out / "lora.safetensors")
    assert (meta["ss_steps"], meta["ss_epoch"]) == ("18", "9")  # the new LoRA, not the 8-epoch one
    assert rec.ended()["ema"]["status"] == "succeeded"


def test_a_state_saved_before_the_inputs_changed_is_never_resumed(checkout, tmp_path, monkeypatch):
    out = tmp_path / "out"
    crash_once_at(monkeypatch, 4)  # after the state of step 2
    plan = wan_plan(tmp_path, steps=6, save_every_steps=2, save_state=True)
    assert run(checkout, plan)[0] == "failed"
    assert (out / ("lora-step00000002-state" + TAG_SUFFIX)).exists()
    make_images(tmp_path / "imgs", names=("c",))  # the dataset grew: new caches, another training
    status, rec = run(checkout, wan_plan(tmp_path, steps=6, save_every_steps=2, save_state=True))
    assert status == "succeeded" and rec.ended()["cache_latents"]["status"] == "succeeded"
    assert "--resume" not in last_train_argv(tmp_path)


def test_a_file_that_was_there_before_the_step_is_not_its_output(checkout, tmp_path):
    script = checkout / "src" / "musubi_tuner" / "_test_writes_nothing.py"
    script.write_text("print('done')\n")
    old = tmp_path / "old.safetensors"
    old.write_text("an earlier run's file")
    step = Step(id="convert", kind="convert", family="wan", script=script.name, args=[], fingerprint="x",
                outputs=[Output("lora", "file", str(old))])
    plan = Plan(name="p", source=str(tmp_path / "p.toml"), workdir=str(tmp_path), steps=[step])
    status, rec = run(checkout, plan)
    assert status == "failed"
    assert rec.ended()["convert"]["cause"].startswith(f"exited 0 but did not write {old} (the file there is older than this run)")


def test_missing_outputs_counts_only_files_written_since_the_snapshot(tmp_path):
    f = tmp_path / "a.safetensors"
    f.write_text("old")
    step = Step(id="t", kind="train", family="wan", script="x.py", args=[],
                outputs=[Output("lora", "file", str(f)), Output("videos", "files", str(tmp_path), "*.mp4")])
    (tmp_path / "v1.mp4").write_text("old video")
    before = output_snapshot(step)
    assert missing_outputs(step) == []  # without a snapshot: existence only, as for skip checks
    assert len(missing_outputs(step, before)) == 2
    os.replace(tmp_path / "v1.mp4", tmp_path / "v1.mp4.tmp")
    (tmp_path / "v2.mp4").write_text("new video")
    f.unlink()
    f.write_text("new")
    assert missing_outputs(step, before) == []
    cache = Step(id="c", kind="cache_latents", family="wan", script="x.py", args=[],
                 outputs=[Output("latents", "files", str(tmp_path), "*.mp4")])
    assert missing_outputs(cache, output_snapshot(cache)) == []  # --skip_existing keeps caches


# ------------------------------------------------------------------------ learning rates


def test_a_cosine_schedule_is_trained_again_from_step_0_like_the_uninterrupted_run(checkout, tmp_path, monkeypatch):
    def plan(project):
        return wan_plan(project, steps=8, save_every_steps=2, save_state=True,
                        train_extra=["--learning_rate", "1e-4", "--lr_scheduler", "cosine", "--logging_dir", str(project / "logs")])

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run(checkout, plan(whole))[0] == "succeeded"
    crash_once_at(monkeypatch, 5)  # states of steps 2 and 4 saved
    assert run(checkout, plan(cut))[0] == "failed"
    first_attempt = list((cut / "logs").rglob("events.out.tfevents*"))
    status, rec = run(checkout, plan(cut))
    assert status == "succeeded"
    assert rec.ended()["train"]["changes"][0] == (
        "not resumed from lora-step00000004-state: musubi builds the cosine schedule from the number of steps it is "
        "given and cannot start at a later step; training starts again from step 0")
    argv = last_train_argv(tmp_path)
    assert "--resume" not in argv and argv[argv.index("--max_train_steps") + 1] == "8"
    again = [f for f in (cut / "logs").rglob("events.out.tfevents*") if f not in first_attempt]
    expected = {1: 0.96194, 2: 0.853553, 3: 0.691342, 4: 0.5, 5: 0.308658, 6: 0.146447, 7: 0.038060, 8: 0.0}
    assert lr_by_step(whole / "logs") == pytest.approx(expected, abs=1e-5)
    assert lr_by_step(cut / "logs", again) == lr_by_step(whole / "logs")
    np.testing.assert_array_equal(lora(cut / "out/lora.safetensors")[1], lora(whole / "out/lora.safetensors")[1])


@pytest.mark.parametrize("scheduler", [["--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "3"], []])
def test_a_length_free_schedule_resumes_at_an_epoch_boundary_exactly_as_the_whole_run(checkout, tmp_path, monkeypatch, scheduler):
    def plan(project):
        return wan_plan(project, steps=10, save_every_steps=2, save_state=True,
                        train_extra=["--learning_rate", "1e-4", *scheduler, "--logging_dir", str(project / "logs")])

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run(checkout, plan(whole))[0] == "succeeded"
    crash_once_at(monkeypatch, 8)  # states of steps 2, 4, 6; 2 batches an epoch
    assert run(checkout, plan(cut))[0] == "failed"
    status, rec = run(checkout, plan(cut))
    assert status == "succeeded", rec.ended()
    train = rec.ended()["train"]
    assert train["changes"][0] == "resumed from lora-step00000006-state: 4 of 10 steps left"
    argv = last_train_argv(tmp_path)
    assert argv[argv.index("--resume") + 1] == str(cut / "out/lora-step00000006-state")
    # learning rates: the resumed attempt logged steps 7-10 (TensorBoard steps of the whole run)
    assert lr_by_step(cut / "logs") == lr_by_step(whole / "logs")
    assert len(lr_by_step(whole / "logs")) == 10
    # weights, names and metadata of one run
    for name in ("lora.safetensors", "lora-step00000008.safetensors"):
        meta_w, w = lora(whole / "out" / name)
        meta_c, c = lora(cut / "out" / name)
        np.testing.assert_array_equal(c, w)
        for key in ("ss_steps", "ss_epoch", "ss_output_name", "modelspec.title", "ss_max_train_steps", "ss_num_epochs"):
            assert meta_c[key] == meta_w[key], key
    assert sorted(p.name for p in (cut / "out").iterdir()) == sorted(p.name for p in (whole / "out").iterdir())
    # the display counts the whole run's steps
    progress = [e for e in rec.kinds("progress") if e.step == "train" and e.phase == "training" and e.current]
    assert min(e.current for e in progress) >= 6 and max(e.current for e in progress) == 10
    assert {e.total for e in progress} == {10}
    epochs = [e for e in rec.kinds("progress") if e.step == "train" and e.epoch]
    assert {e.epochs for e in epochs} == {5} and max(e.epoch for e in epochs) == 5


def test_a_state_inside_an_epoch_is_not_resumed(checkout, tmp_path, monkeypatch):
    """musubi starts the epoch's batch order again on --resume: a state saved mid-epoch cannot
    continue the uninterrupted run, an older one at an epoch boundary can."""
    def plan(project):
        return wan_plan(project, steps=10, save_every_steps=3, save_state=True, train_extra=["--learning_rate", "1e-4"])

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run(checkout, plan(whole))[0] == "succeeded"
    crash_once_at(monkeypatch, 5)  # only the state of step 3, inside epoch 2
    assert run(checkout, plan(cut))[0] == "failed"
    status, rec = run(checkout, plan(cut))
    assert status == "succeeded"
    assert rec.ended()["train"]["changes"][0].startswith(
        "not resumed from lora-step00000003-state: its step is not at the end of an epoch")
    np.testing.assert_array_equal(lora(cut / "out/lora.safetensors")[1], lora(whole / "out/lora.safetensors")[1])
    shutil.rmtree(checkout / ".double-state")
    crash_once_at(monkeypatch, 8)  # states of 3 and 6: step 6 ends epoch 3
    status, rec = run(checkout, wan_plan(cut, steps=10, save_every_steps=3, save_state=True,
                                         train_extra=["--learning_rate", "1e-4", "--seed", "1"]))
    assert status == "failed"
    status, rec = run(checkout, wan_plan(cut, steps=10, save_every_steps=3, save_state=True,
                                         train_extra=["--learning_rate", "1e-4", "--seed", "1"]))
    assert rec.ended()["train"]["changes"][0] == "resumed from lora-step00000006-state: 4 of 10 steps left"


@pytest.mark.parametrize("args, blocked", [
    ([], False), (["--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "100"], False),
    (["--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "0.1"], True),
    (["--lr_scheduler", "linear"], True), (["--lr_scheduler", "cosine_with_restarts"], True),
    (["--lr_scheduler", "adafactor:1e-4"], False), (["--lr_scheduler", "cosine", "--optimizer_type", "AdamWScheduleFree"], False),
    (["--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=10"], False),
])
def test_which_schedules_a_shorter_resumed_run_follows(args, blocked):
    assert (schedule_blocker(args) is not None) == blocked


# ------------------------------------------------------------------- a run that died


DRIVER = '''
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from executor_plans import config_for, wan_plan
from musubi_pipe.executors.local import LocalExecutor
plan = wan_plan(Path({project!r}), steps=12, save_every_steps=2, save_state=True)
LocalExecutor(config_for(Path({checkout!r}))).run(plan, [lambda e: print(e.kind, e.step, flush=True)])
'''


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_files_of_a_resumed_attempt_whose_run_was_killed_are_renamed_and_resumed_from(checkout, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def plan():
        return wan_plan(tmp_path, steps=12, save_every_steps=2, save_state=True)

    crash_once_at(monkeypatch, 7)  # states of steps 2, 4, 6
    assert run(checkout, plan())[0] == "failed"
    # the resumed attempt saves its step 2 (step 8 of the run), then musubi-pipe is killed
    shutil.rmtree(checkout / ".double-state")
    env = {**os.environ, "MUSUBI_DOUBLE_FAIL": "wan_train_network:hang", "MUSUBI_DOUBLE_FAIL_AT": "3"}
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(tests=str(Path(__file__).parent), project=str(tmp_path), checkout=str(checkout)))
    proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 60
    while not (out / "lora-resume1-step00000002-state" / "random_states_0.pkl").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for child in children:  # what this test started; ending orphans is not what it is about
        child.kill()
    assert StateFile(state_path(plan())).record("train")["status"] == "running"

    status, rec = run(checkout, plan())
    assert status == "succeeded", rec.ended()
    changes = rec.ended()["train"]["changes"]
    assert "renamed lora-resume1-step00000002-state -> lora-step00000008-state (left by an earlier run)" in changes
    assert "resumed from lora-step00000008-state: 4 of 12 steps left" in changes
    argv = last_train_argv(tmp_path)
    assert argv[argv.index("--output_name") + 1] == "lora-resume2"
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if "resume" in n]
    assert "lora-step00000010.safetensors" in names and lora(out / "lora.safetensors")[0]["ss_steps"] == "12"
    assert lora(out / "lora-step00000008.safetensors")[0]["ss_steps"] == "8"
