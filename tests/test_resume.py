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
@pytest.mark.parametrize("items", [1, 2])
def test_a_length_free_schedule_resumes_at_an_epoch_boundary_as_the_whole_run(checkout, tmp_path, monkeypatch, scheduler, items):
    """Same learning rates, counts, names and metadata; the same weights with one batch an epoch
    (with more, musubi's resumed epochs are shuffled as the first ones were: other weights)."""
    def plan(project):
        if not (project / "imgs").exists():
            make_images(project / "imgs", names=("a", "b")[:items])
        return wan_plan(project, steps=10, save_every_steps=2, save_state=True,
                        train_extra=["--learning_rate", "1e-4", *scheduler, "--logging_dir", str(project / "logs")])

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run(checkout, plan(whole))[0] == "succeeded"
    crash_once_at(monkeypatch, 8)  # states of steps 2, 4, 6
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
        if name == "lora.safetensors":  # the last epoch's order differs here with 2 items
            assert np.array_equal(c, w) == (items == 1)
        for key in ("ss_steps", "ss_epoch", "ss_output_name", "modelspec.title", "ss_max_train_steps", "ss_num_epochs"):
            assert meta_c[key] == meta_w[key], key
    assert sorted(p.name for p in (cut / "out").iterdir()) == sorted(p.name for p in (whole / "out").iterdir())
    # the display counts the whole run's steps
    progress = [e for e in rec.kinds("progress") if e.step == "train" and e.phase == "training" and e.current]
    assert min(e.current for e in progress) >= 6 and max(e.current for e in progress) == 10
    assert {e.total for e in progress} == {10}
    epochs = [e for e in rec.kinds("progress") if e.step == "train" and e.epoch]
    assert {e.epochs for e in epochs} == {10 // items} and max(e.epoch for e in epochs) == 10 // items


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


# ------------------------------------------------------------- the real musubi-tuner scripts

REAL = os.environ.get("MUSUBI_TUNER_DIR")
TINY_CONFIG = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_len=16)
MAKE_INPUTS = r'''
import sys, torch
torch.cuda.current_device = lambda: 0  # musubi's wan/modules/t5.py calls it at import time
from pathlib import Path
from safetensors.torch import save_file
from musubi_tuner.wan.modules.model import WanModel
from musubi_tuner.dataset.image_video_dataset import ItemInfo
from musubi_tuner.dataset.cache_io import save_latent_cache_wan, save_text_encoder_output_cache_wan
root = Path(sys.argv[1])
torch.manual_seed(0)
m = WanModel(model_type="t2v", model_version="2.1", eps=1e-6, freq_dim=256, in_dim=16, out_dim=16, attn_mode="torch",
             split_attn=False, **{config})
for p in m.parameters():  # Wan zero-initialises its head: then no gradient reaches a LoRA
    if not p.any():
        torch.nn.init.normal_(p, std=0.05)
save_file({{k: v.contiguous() for k, v in m.state_dict().items()}}, str(root / "dit.safetensors"))
for i, stem in enumerate(sys.argv[2].split(",")):
    item = ItemInfo(str(root / "imgs" / f"{{stem}}.png"), stem, (64, 64), (64, 64))
    item.latent_cache_path = str(root / "cache" / f"{{stem}}_0064x0064_wan.safetensors")
    item.text_encoder_output_cache_path = str(root / "cache" / f"{{stem}}_wan_te.safetensors")
    g = torch.Generator().manual_seed(10 + i)
    save_latent_cache_wan(item, torch.randn(16, 1, 8, 8, generator=g), None, None, None)
    save_text_encoder_output_cache_wan(item, torch.randn(4, 4096, generator=g))
'''
# The real script, with Wan's t2v-1.3B config shrunk to the random small DiT above. With
# MUSUBI_PIPE_TEST_KILL_AFTER, the process dies right after saving that state folder: an
# interruption at a known step (a Ctrl-C lands wherever the loop happens to be).
TINY_TRAIN = r'''"""musubi-pipe test: musubi-tuner's real wan_train_network with a small random DiT, on CPU."""
import os
import torch

torch.cuda.current_device = lambda: 0
import accelerate  # noqa: E402
from musubi_tuner.wan.configs import WAN_CONFIGS  # noqa: E402

WAN_CONFIGS["t2v-1.3B"].update({config})
stop = os.environ.get("MUSUBI_PIPE_TEST_KILL_AFTER")
if stop:
    save_state = accelerate.Accelerator.save_state

    def save_and_die(self, output_dir=None, *args, **kwargs):
        result = save_state(self, output_dir, *args, **kwargs)
        if str(output_dir).rstrip("/").endswith(stop):
            os._exit(1)
        return result

    accelerate.Accelerator.save_state = save_and_die
from musubi_tuner.wan_train_network import main  # noqa: E402

main()
'''


def real_plan(project: Path, checkout: Path, scheduler: list[str], items: int, steps: int = 8) -> Plan:
    from musubi_pipe.compiler.plan import Input, fingerprint

    project.mkdir(parents=True, exist_ok=True)
    if not (project / "dit.safetensors").exists():
        names = "ab"[:items]
        make_images(project / "imgs", names=tuple(names))
        (project / "cache").mkdir(exist_ok=True)
        (project / "make.py").write_text(MAKE_INPUTS.format(config=TINY_CONFIG))
        done = subprocess.run([str(Path(REAL) / ".venv/bin/python"), str(project / "make.py"), str(project), ",".join(names)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    ds = project / "ds.toml"
    ds.write_text(f'[general]\nresolution = [64, 64]\ncaption_extension = ".txt"\nbatch_size = 1\n'
                  f'[[datasets]]\nimage_directory = "{project / "imgs"}"\ncache_directory = "{project / "cache"}"\n')
    out = project / "out"
    args = ["--task", "t2v-1.3B", "--dit", str(project / "dit.safetensors"), "--dataset_config", str(ds), "--sdpa",
            "--mixed_precision", "no", "--network_module", "networks.lora_wan", "--network_dim", "4",
            "--optimizer_type", "AdamW", "--learning_rate", "1e-3", *scheduler, "--max_train_steps", str(steps),
            "--save_every_n_steps", "2", "--save_state", "--seed", "42", "--max_data_loader_n_workers", "0",
            "--logging_dir", str(project / "logs"), "--output_dir", str(out), "--output_name", "lora"]
    launch = ["--num_processes", "1", "--num_cpu_threads_per_process", "1", "--mixed_precision", "no"]
    step = Step(id="train", kind="train", family="wan", script="wan_train_network.py", args=args, launcher="accelerate",
                launch_args=launch, inputs=[Input("dit", str(project / "dit.safetensors")), Input("dataset_config", str(ds))],
                outputs=[Output("lora", "file", str(out / "lora.safetensors")),
                         Output("checkpoints", "files", str(out), "lora*.safetensors", required=False)],
                meta={"output_dir": str(out), "output_name": "lora", "save_state": True, "max_train_steps": steps})
    step = Step(**{**step.__dict__, "fingerprint": fingerprint(step.script, args, launch)})
    return Plan(name="real", source=str(project / "pipeline.toml"), workdir=str(project), steps=[step])


def real_weights(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))


@pytest.mark.skipif(not REAL, reason="set MUSUBI_TUNER_DIR to a musubi-tuner checkout with .venv")
@pytest.mark.parametrize("scheduler, items, resumed", [
    (["--lr_scheduler", "cosine"], 2, False),
    (["--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "3"], 1, True),
    (["--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "3"], 2, True),
])
def test_real_scripts_interrupted_and_run_again_train_as_the_uninterrupted_run(tmp_path, monkeypatch, scheduler, items, resumed):
    """A random small Wan DiT, 8 CPU steps of 1 or 2 items a step; killed right after the state of
    step 4. The same weights, except for a resume with more than one batch an epoch: musubi seeds
    each epoch's shuffle with the dataset seed plus the epoch number, which restarts at 1 on
    --resume, so the resumed epochs see the batches in another order (measured, not asserted)."""
    from musubi_pipe.executors.musubi_env import MusubiConfig

    checkout = tmp_path / "musubi-tuner"  # the real package, launched through a script that shrinks the DiT
    (checkout / "src/musubi_tuner").mkdir(parents=True)
    (checkout / "src/musubi_tuner/wan_train_network.py").write_text(TINY_TRAIN.format(config=TINY_CONFIG))
    config = MusubiConfig(musubi_dir=checkout, python=Path(REAL) / ".venv/bin/python", cancel_grace_s=3.0)
    whole, cut = tmp_path / "whole", tmp_path / "cut"

    def go(project):
        rec = Recorder()
        return LocalExecutor(config).run(real_plan(project, checkout, scheduler, items), [rec]).status, rec

    assert go(whole)[0] == "succeeded"
    monkeypatch.setenv("MUSUBI_PIPE_TEST_KILL_AFTER", "lora-step00000004-state")
    assert go(cut)[0] == "failed"
    first = list((cut / "logs").rglob("events.out.tfevents*"))
    monkeypatch.delenv("MUSUBI_PIPE_TEST_KILL_AFTER")
    status, rec = go(cut)
    assert status == "succeeded", rec.ended()
    note = rec.ended()["train"]["changes"][0]
    if resumed:
        assert note == "resumed from lora-step00000004-state: 4 of 8 steps left"
        assert not (cut / "out" / "lora-resume1.safetensors").exists()
        logged = lr_by_step(cut / "logs")
    else:
        assert note.startswith("not resumed from lora-step00000004-state: musubi builds the cosine schedule")
        logged = lr_by_step(cut / "logs", [f for f in (cut / "logs").rglob("events.out.tfevents*") if f not in first])
    expected = lr_by_step(whole / "logs")
    print(f"\n{scheduler}, {items} item(s): lr/unet x1e-4 uninterrupted {expected}\n{scheduler}: lr/unet x1e-4 interrupted   {logged}")
    assert sorted(expected) == list(range(1, 9))
    # the killed attempt died between saving step 4 and logging it; every step after it is logged
    assert set(range(5, 9)) <= set(logged) and logged == pytest.approx({s: expected[s] for s in logged}, rel=1e-6)
    w, c = real_weights(whole / "out/lora.safetensors"), real_weights(cut / "out/lora.safetensors")
    assert set(w) == set(c)
    diff = max(float(np.max(np.abs(w[k] - c[k]))) for k in w)
    scale = max(float(np.max(np.abs(w[k]))) for k in w if "lora_up" in k)
    print(f"{scheduler}, {items} item(s): final LoRA max |difference| {diff:.3g} (largest lora_up weight {scale:.3g})")
    assert scale > 0
    if not (resumed and items > 1):
        assert diff <= 1e-6 * scale
    meta_w, _ = lora_meta(whole / "out/lora.safetensors"), None
    meta_c = lora_meta(cut / "out/lora.safetensors")
    for key in ("ss_steps", "ss_epoch", "ss_output_name", "ss_max_train_steps", "ss_num_epochs"):
        assert meta_c[key] == meta_w[key], key


def lora_meta(path: Path) -> dict:
    with safe_open(str(path), framework="numpy") as f:
        return f.metadata()


@pytest.mark.skipif(not REAL, reason="set MUSUBI_TUNER_DIR to a musubi-tuner checkout with .venv")
def test_real_scripts_cancelled_mid_training_leave_no_process_and_the_next_run_finishes(tmp_path):
    """Ctrl-C (the executor's cancel) while the real trainer runs: accelerate and the trainer are
    gone, the state says cancelled, and the next run resumes from the state saved before it."""
    import threading

    from musubi_pipe.executors.musubi_env import MusubiConfig

    checkout = tmp_path / "musubi-tuner"
    (checkout / "src/musubi_tuner").mkdir(parents=True)
    (checkout / "src/musubi_tuner/wan_train_network.py").write_text(TINY_TRAIN.format(config=TINY_CONFIG))
    config = MusubiConfig(musubi_dir=checkout, python=Path(REAL) / ".venv/bin/python", cancel_grace_s=3.0)
    project = tmp_path / "p"
    schedule = ["--lr_scheduler", "constant"]
    plan = real_plan(project, checkout, schedule, 1, steps=60)  # long enough to be cut short
    executor, box = LocalExecutor(config), {}
    worker = threading.Thread(target=lambda: box.setdefault("result", executor.run(plan, [Recorder()])))
    worker.start()
    deadline = time.monotonic() + 600
    # the step-2 state is complete (accelerate writes the RNG states last): training is under way
    while not list((project / "out").glob("lora-step00000002-state/random_states_*")):
        assert time.monotonic() < deadline and worker.is_alive(), "training never saved its step-2 state"
        time.sleep(0.02)
    executor.cancel()
    worker.join(120)
    assert not worker.is_alive() and box["result"].status == "cancelled"
    left = [p for p in psutil.process_iter(["cmdline"]) if str(checkout) in " ".join(p.info["cmdline"] or [])]
    assert left == [], [p.info["cmdline"] for p in left]
    assert StateFile(state_path(plan)).record("train")["status"] == "cancelled"
    rec = Recorder()
    assert not (project / "out" / "lora.safetensors").exists()  # cut short: no final LoRA yet
    assert LocalExecutor(config).run(real_plan(project, checkout, schedule, 1, steps=60), [rec]).status == "succeeded", rec.ended()
    changes = rec.ended()["train"]["changes"]
    assert any(c.startswith("resumed from lora-step0000000") for c in changes), changes
    assert (project / "out" / "lora.safetensors").exists()


def test_a_state_at_the_end_of_the_run_is_not_resumed_and_the_run_says_why(tmp_path):
    """A run stopped while saving its results left a state of its last step: nothing is left to
    resume, and training again is said, not done silently."""
    from musubi_pipe.executors.resume import TAG_SUFFIX, plan_resume, resume_key

    out = tmp_path / "out"
    (out / "lora-step00000008-state").mkdir(parents=True)
    (out / "lora-step00000008-state" / "random_states_0.pkl").write_bytes(b"rng")
    step = Step(id="train", kind="train", family="wan", script="wan_train_network.py", launcher="accelerate",
                args=["--max_train_steps", "8", "--output_dir", str(out), "--output_name", "lora", "--save_state"],
                meta={"output_dir": str(out), "output_name": "lora", "save_state": True, "max_train_steps": 8},
                fingerprint="f")
    record = {"fingerprint": "f", "needs": {}, "inputs": []}
    key = resume_key(record)
    (out / ("lora-step00000008-state" + TAG_SUFFIX)).write_text(json.dumps({"step": "train", "key": key}))
    resume, note = plan_resume(step, record, {"key": key, "progress": {"steps_per_epoch": 1}})
    assert resume is None
    assert note == ("not resumed from lora-step00000008-state: it is the end of the run, saved when the run was "
                    "stopped; training starts again from step 0")
