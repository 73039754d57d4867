"""The local executor against the musubi-tuner test double: runs, records, skips, re-runs what
changed, checks outputs, classifies failures, retries, refuses unsafe plans."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from executor_plans import Recorder, config_for, wan_plan
from musubi_double import make_fake_checkout
from musubi_pipe.compiler.plan import Output
from musubi_pipe.errors import PipelineError
from musubi_pipe.executors.dry import DryExecutor
from musubi_pipe.executors.local import LocalExecutor, RetryPolicy
from musubi_pipe.executors.resume import set_flag
from musubi_pipe.executors.state import StateFile, state_path


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    return make_fake_checkout(tmp_path_factory.mktemp("double") / "musubi-tuner")


@pytest.fixture
def double(checkout, tmp_path, monkeypatch):
    """The checkout with fresh fail-once markers, and a record of every script the double ran."""
    shutil.rmtree(checkout / ".double-state", ignore_errors=True)
    record = tmp_path / "double-runs.jsonl"
    monkeypatch.setenv("MUSUBI_DOUBLE_RECORD", str(record))
    for k in ("MUSUBI_DOUBLE_FAIL", "MUSUBI_DOUBLE_FAIL_ONCE", "MUSUBI_DOUBLE_FAIL_AT", "MUSUBI_DOUBLE_STEP_SECONDS"):
        monkeypatch.delenv(k, raising=False)

    def runs():
        return [json.loads(line)["script"] for line in record.read_text().splitlines()] if record.exists() else []

    return SimpleNamespace(path=checkout, runs=runs)


def run(checkout, plan, **kw):
    rec = Recorder()
    result = LocalExecutor(config_for(checkout.path)).run(plan, [rec], **kw)
    return result, rec


def test_run_completes_with_progress_records_and_outputs(double, tmp_path):
    project = tmp_path / "my project ü"  # spaces and non-ASCII in every path
    plan = wan_plan(project)
    result, rec = run(double, plan)
    assert result.status == "succeeded", rec.ended()
    assert list(result.steps.values()) == ["succeeded"] * 5
    assert double.runs() == ["wan_cache_latents", "wan_cache_text_encoder_outputs", "wan_train_network",
                             "lora_post_hoc_ema", "convert_lora"]
    assert (project / "out" / "lora_comfy.safetensors").exists()
    # progress: training steps with total, epoch, loss
    train = [e for e in rec.kinds("progress") if e.step == "train" and e.phase == "training" and e.current]
    assert train[-1].current == train[-1].total == 4 and train[-1].epochs == 2 and train[-1].loss > 0
    # the run folder: plan, commands, environment, raw logs, events
    run_dir = result.run_dir
    assert run_dir.parent == project / "runs"
    assert json.loads((run_dir / "plan.json").read_text())["name"] == "wan-test"
    commands = (run_dir / "commands.txt").read_text()
    assert "accelerate.commands.launch --num_processes 1" in commands
    assert f"'{project}/out/lora_comfy.safetensors'" in commands  # shell-quoted
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["musubi_tuner"]["version"] == "0.3.4"
    assert "steps:" in (run_dir / "train.log").read_text(encoding="utf-8")
    logged = [json.loads(line)["kind"] for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert logged[0] == "plan" and logged[-1] == "run_end" and "progress" in logged
    outputs = {e.data["path"] for e in rec.kinds("output")}
    assert str(project / "out" / "lora.safetensors") in outputs
    assert StateFile(state_path(plan)).record("convert")["status"] == "succeeded"


def test_second_run_skips_every_step(double, tmp_path):
    plan = wan_plan(tmp_path)
    run(double, plan)
    before = len(double.runs())
    result, rec = run(double, wan_plan(tmp_path))
    assert result.status == "succeeded" and result.run_dir is None  # nothing ran: no run folder
    assert rec.skipped() == dict.fromkeys([s.id for s in plan.steps], "up to date")
    assert len(double.runs()) == before


def test_changing_a_training_setting_reruns_training_and_what_follows(double, tmp_path):
    run(double, wan_plan(tmp_path))
    first = len(double.runs())
    result, rec = run(double, wan_plan(tmp_path, network_dim=8))
    assert result.status == "succeeded"
    assert double.runs()[first:] == ["wan_train_network", "lora_post_hoc_ema", "convert_lora"]
    assert rec.skipped() == {"cache_latents": "up to date", "cache_text": "up to date"}
    assert rec.kinds("plan")[0].data["reasons"]["train"] == "settings changed: network_dim 4 -> 8"
    assert rec.kinds("plan")[0].data["reasons"]["ema"] == "train runs first"


def test_the_dry_run_says_why_each_step_would_run_setting_by_setting(double, tmp_path):
    run(double, wan_plan(tmp_path))
    (tmp_path / "imgs" / "extra.png").write_bytes((tmp_path / "imgs" / next(iter(os.listdir(tmp_path / "imgs")))).read_bytes())
    rec = Recorder()
    DryExecutor(config_for(double.path)).run(wan_plan(tmp_path, network_dim=8), [rec])
    reasons = {e.step: e.data["reason"] for e in rec.kinds("step_start")}
    assert reasons["cache_latents"].startswith(f"input changed: {tmp_path / 'imgs'} (") and "files)" in reasons["cache_latents"]
    assert reasons["train"] == "settings changed: network_dim 4 -> 8"


def test_a_new_image_reruns_caching_and_everything_after(double, tmp_path):
    run(double, wan_plan(tmp_path))
    from executor_plans import make_images

    make_images(tmp_path / "imgs", names=("c",))
    result, rec = run(double, wan_plan(tmp_path))
    assert rec.skipped() == {}
    assert result.status == "succeeded"


def test_deleted_output_reruns_only_its_step_and_followers(double, tmp_path):
    run(double, wan_plan(tmp_path))
    (tmp_path / "out" / "lora_ema.safetensors").unlink()
    first = len(double.runs())
    result, rec = run(double, wan_plan(tmp_path))
    assert double.runs()[first:] == ["lora_post_hoc_ema", "convert_lora"]
    assert rec.kinds("plan")[0].data["reasons"]["ema"].startswith("output missing")


def test_only_from_until_and_force_select_steps(double, tmp_path):
    result, rec = run(double, wan_plan(tmp_path), until="cache_text")
    assert double.runs() == ["wan_cache_latents", "wan_cache_text_encoder_outputs"]
    assert rec.skipped()["train"] == "not selected (never ran)"
    run(double, wan_plan(tmp_path))
    n = len(double.runs())
    run(double, wan_plan(tmp_path), only=["ema"], force=True)
    assert double.runs()[n:] == ["lora_post_hoc_ema"]
    with pytest.raises(PipelineError, match="no step named 'trian'"):
        run(double, wan_plan(tmp_path), from_="trian")


def test_exit_0_without_the_promised_file_is_a_failure(double, tmp_path):
    plan = wan_plan(tmp_path)
    convert = plan.step("convert")
    promised = Output("lora", "file", str(tmp_path / "out" / "never_written.safetensors"))
    plan.steps[-1] = replace(convert, outputs=[promised])
    result, rec = run(double, plan)
    end = rec.ended()["convert"]
    assert result.status == "failed" and end["returncode"] == 0
    assert end["cause"].startswith(f"exited 0 but did not write {promised.path}")
    assert StateFile(state_path(plan)).record("convert")["status"] == "failed"


def test_failure_names_cause_fix_and_log_and_stops_what_follows(double, tmp_path, monkeypatch):
    monkeypatch.setenv("MUSUBI_DOUBLE_FAIL", "wan_train_network:network_module")
    result, rec = run(double, wan_plan(tmp_path))
    end = rec.ended()["train"]
    assert result.status == "failed" and end["status"] == "failed" and end["returncode"] == 1
    assert "network module" in (end["cause"] + end["fix"]).lower()
    assert Path(end["log"]).exists() and "No LoRA modules found" in Path(end["log"]).read_text()
    assert rec.skipped() == {"ema": "not run: train failed", "convert": "not run: train failed"}
    # the caches stay done: the next run starts at training
    n = len(double.runs())
    monkeypatch.delenv("MUSUBI_DOUBLE_FAIL")
    result, rec = run(double, wan_plan(tmp_path))
    assert result.status == "succeeded" and double.runs()[n] == "wan_train_network"


def test_transient_failure_is_retried_when_asked(double, tmp_path, monkeypatch):
    monkeypatch.setenv("MUSUBI_DOUBLE_FAIL", "wan_cache_text_encoder_outputs:hub_download")
    monkeypatch.setenv("MUSUBI_DOUBLE_FAIL_ONCE", "1")
    result, rec = run(double, wan_plan(tmp_path), retry=RetryPolicy(enabled=True, backoff_s=(0.0,)))
    assert result.status == "succeeded"
    assert double.runs().count("wan_cache_text_encoder_outputs") == 2
    assert "retrying" in rec.ended()["cache_text"]["changes"][0]


def test_transient_failure_is_not_retried_by_default(double, tmp_path, monkeypatch):
    monkeypatch.setenv("MUSUBI_DOUBLE_FAIL", "wan_cache_text_encoder_outputs:hub_download")
    monkeypatch.setenv("MUSUBI_DOUBLE_FAIL_ONCE", "1")
    result, _ = run(double, wan_plan(tmp_path))
    assert result.status == "failed" and double.runs().count("wan_cache_text_encoder_outputs") == 1


def test_out_of_memory_is_retried_with_the_plans_next_memory_setting(double, tmp_path, monkeypatch):
    monkeypatch.setenv("MUSUBI_DOUBLE_FAIL", "wan_train_network:oom")
    monkeypatch.setenv("MUSUBI_DOUBLE_FAIL_ONCE", "1")
    plan = wan_plan(tmp_path)
    first = plan.step("train").fallbacks[0]
    result, rec = run(double, plan, retry=RetryPolicy(enabled=True, backoff_s=(0.0,)))
    assert result.status == "succeeded", rec.ended()
    change = rec.ended()["train"]["changes"][0]
    assert change == f"out of memory; retrying with {first.why}"
    flag = "--" + next(iter(first.settings))
    commands = (result.run_dir / "commands.txt").read_text().split("# train")
    assert flag not in commands[1] and flag in commands[2]  # the record shows what changed
    record = StateFile(state_path(plan)).record("train")
    assert record["changes"] == [change] and record["memory"]["settings"] == first.settings


def test_the_next_run_starts_from_the_memory_setting_that_worked(double, tmp_path, monkeypatch):
    monkeypatch.setenv("MUSUBI_DOUBLE_FAIL", "wan_train_network:oom")
    monkeypatch.setenv("MUSUBI_DOUBLE_FAIL_ONCE", "1")
    run(double, wan_plan(tmp_path), retry=RetryPolicy(enabled=True, backoff_s=(0.0,)))
    monkeypatch.delenv("MUSUBI_DOUBLE_FAIL")
    changed = wan_plan(tmp_path, network_dim=8)  # a new setting: training runs again
    result, rec = run(double, changed)
    assert result.status == "succeeded"
    first = changed.step("train").fallbacks[0]
    assert rec.ended()["train"]["changes"][0] == f"starting with {first.why} (it worked last run; out of memory without it)"
    assert "--" + next(iter(first.settings)) in (result.run_dir / "commands.txt").read_text().split("# train")[1]


def test_out_of_memory_steps_through_the_whole_ladder_then_advises_the_dataset(double, tmp_path, monkeypatch):
    monkeypatch.setenv("MUSUBI_DOUBLE_FAIL", "wan_train_network:oom")
    plan = wan_plan(tmp_path)
    result, rec = run(double, plan, retry=RetryPolicy(enabled=True, backoff_s=(0.0,)))
    end = rec.ended()["train"]
    ladder = plan.step("train").fallbacks
    assert result.status == "failed" and end["category"] == "oom"
    assert end["changes"] == [f"out of memory; retrying with {fb.why}" for fb in ladder]
    assert double.runs().count("wan_train_network") == 1 + len(ladder)
    assert "resolution or target_frames" in end["fix"]


def test_generated_files_never_overwrite_a_users_file(double, tmp_path):
    plan = wan_plan(tmp_path)
    (tmp_path / "dataset.toml").write_text("# my own dataset config\n")
    with pytest.raises(PipelineError, match="was not written by musubi-pipe"):
        run(double, plan)
    assert (tmp_path / "dataset.toml").read_text() == "# my own dataset config\n"
    (tmp_path / "dataset.toml").unlink()
    run(double, plan)
    gen = plan.files[0]
    plan.files[0] = replace(gen, content=gen.content + "# changed by the pipeline\n")
    run(double, plan)  # ours: replaced without complaint
    assert (tmp_path / "dataset.toml").read_text().endswith("# changed by the pipeline\n")


@pytest.mark.parametrize("field,value,message", [
    ("script", "../../../bin/evil.py", "not a musubi-tuner script name"),
    ("launch_args", ["--no_python"], "accelerate launch flag '--no_python' is not allowed"),
    ("env", {"LD_PRELOAD": "/tmp/x.so"}, "LD_PRELOAD may not be set"),
    ("env", {"PYTHONPATH": "/tmp"}, "PYTHONPATH may not be set"),
    ("env", {"CUDA_VISIBLE_DEVICES": "3"}, "CUDA_VISIBLE_DEVICES may not be set by a pipeline: which GPUs"),
])
def test_a_plan_cannot_choose_another_program(double, tmp_path, field, value, message):
    plan = wan_plan(tmp_path)
    plan.steps[0] = replace(plan.steps[0], **{field: value})
    with pytest.raises(PipelineError, match=message):
        run(double, plan)
    assert double.runs() == []


def test_outputs_outside_the_allowed_roots_are_refused(double, tmp_path):
    plan = wan_plan(tmp_path / "p")
    cfg = config_for(double.path)
    cfg.allowed_output_roots = [tmp_path / "elsewhere"]
    with pytest.raises(PipelineError, match="outside the allowed output folders"):
        LocalExecutor(cfg).run(plan)
    cfg.allowed_output_roots = [tmp_path / "p"]
    assert LocalExecutor(cfg).run(plan).status == "succeeded"


def test_run_records_outside_the_allowed_roots_are_refused(double, tmp_path):
    # A shared document chooses its workdir (a ComfyUI workflow its base folder): the run
    # records and the state file must stay inside the allowed roots as well.
    plan = wan_plan(tmp_path / "p")
    cfg = config_for(double.path)
    cfg.allowed_output_roots = [tmp_path / "p"]
    with pytest.raises(PipelineError, match="outside the allowed output folders") as err:
        LocalExecutor(cfg).run(replace(plan, workdir=str(tmp_path / "records")))
    assert "workdir" in str(err.value)
    with pytest.raises(PipelineError, match="state file"):
        LocalExecutor(cfg).run(replace(plan, source=str(tmp_path / "elsewhere" / "pipeline.toml")))
    assert double.runs() == []


def test_gpus_from_the_configuration_reach_the_step(double, tmp_path):
    cfg = config_for(double.path)
    cfg.gpus = "1"
    plan = wan_plan(tmp_path)
    LocalExecutor(cfg).run(plan, until="cache_latents")
    run_dir = next((tmp_path / "runs").iterdir())
    assert "CUDA_VISIBLE_DEVICES=1 " in (run_dir / "commands.txt").read_text()


def test_dry_run_emits_the_same_events_and_runs_nothing(double, tmp_path):
    rec = Recorder()
    result = DryExecutor(config_for(double.path)).run(wan_plan(tmp_path), [rec])
    assert result.status == "dry-run"
    assert [e.step for e in rec.kinds("step_start")] == ["cache_latents", "cache_text", "train", "ema", "convert"]
    assert "accelerate.commands.launch" in rec.kinds("step_start")[2].data["argv"]
    assert double.runs() == [] and not (tmp_path / "runs").exists() and not (tmp_path / "dataset.toml").exists()


def test_set_flag_replaces_or_appends():
    assert set_flag(["--a", "1", "--b"], "--a", "2") == ["--b", "--a", "2"]
    assert set_flag(["--a=1"], "--a", "2") == ["--a", "2"]
    assert set_flag(["--x", "1"], "--fp8_base") == ["--x", "1", "--fp8_base"]


# ------------------------------------------------------------- a real musubi-tuner checkout


REAL_PIPELINE = """
name = "real-ema"
family = "wan"

[stages.ema]
kind = "ema"
checkpoints = ["out/lora-000001.safetensors", "out/lora-000002.safetensors", "out/lora-000003.safetensors"]
beta = 0.5

[stages.comfy]
kind = "convert"
input = "@ema.lora"
to = "comfyui"
"""


@pytest.mark.skipif(not os.environ.get("MUSUBI_TUNER_DIR"), reason="set MUSUBI_TUNER_DIR to run against a real checkout")
def test_real_checkout_runs_post_hoc_ema_and_convert_on_cpu(tmp_path, monkeypatch):
    """`musubi-pipe run` of post-hoc EMA and convert with a real musubi-tuner, over LoRA files made here."""
    import numpy as np
    from click.testing import CliRunner
    from safetensors.numpy import load_file, save_file

    from musubi_pipe.cli import main

    monkeypatch.setenv("MUSUBI_PIPE_CONFIG", str(tmp_path / "no-config.toml"))
    (tmp_path / "out").mkdir()
    rng = np.random.default_rng(0)
    ckpts = []
    for i in range(3):
        tensors = {}
        for mod in ("blocks_0_self_attn_q", "blocks_0_cross_attn_k"):
            tensors[f"lora_unet_{mod}.lora_down.weight"] = rng.standard_normal((4, 16)).astype(np.float32)
            tensors[f"lora_unet_{mod}.lora_up.weight"] = rng.standard_normal((16, 4)).astype(np.float32)
            tensors[f"lora_unet_{mod}.alpha"] = np.array(4.0, dtype=np.float32)
        path = tmp_path / "out" / f"lora-{i + 1:06d}.safetensors"
        save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora_wan"})
        ckpts.append(load_file(str(path)))
    pipeline = tmp_path / "real.toml"
    pipeline.write_text(REAL_PIPELINE)
    r = CliRunner().invoke(main, ["run", str(pipeline), "--plain"])
    assert r.exit_code == 0, r.output
    work = tmp_path / "musubi-out" / "real-ema"
    ema = load_file(str(work / "ema" / "real-ema-ema.safetensors"))
    key = "lora_unet_blocks_0_self_attn_q.lora_down.weight"
    # beta 0.5 over three files in the given order: 0.25, 0.25, 0.5
    assert np.allclose(ema[key], 0.25 * ckpts[0][key] + 0.25 * ckpts[1][key] + 0.5 * ckpts[2][key], atol=1e-5)
    comfy_keys = set(load_file(str(work / "comfy" / "real-ema-ema-comfyui.safetensors")))
    assert any(k.startswith("diffusion_model.blocks.0.self_attn.q.lora_A") for k in comfy_keys), sorted(comfy_keys)
    r = CliRunner().invoke(main, ["run", str(pipeline), "--plain"])
    assert r.exit_code == 0 and "- ema skipped: up to date" in r.output and "- comfy skipped: up to date" in r.output


# ------------------------------------------------------------- the shipped example pipelines

EXAMPLES = Path(__file__).resolve().parent.parent / "pipelines" / "examples"
MODEL_EXTS = (".safetensors", ".pth", ".pt", ".bin")


def _prepare_example(src: Path, tmp_path: Path) -> Path:
    """Copy the examples, point /models at this test's folder and make the files they name."""
    from musubi_pipe.compiler import compile_file

    from executor_plans import make_images

    work = tmp_path / "examples"
    shutil.copytree(EXAMPLES, work)
    for f in work.iterdir():
        if f.is_file():
            f.write_text(f.read_text(encoding="utf-8").replace("/models/", f"{tmp_path}/models/"), encoding="utf-8")
    pipeline = work / src.name
    plan = compile_file(pipeline)
    for step in plan.steps:
        for arg in step.args:
            p = Path(arg)
            if not p.is_absolute() or p.exists() or Path(plan.workdir) in p.parents:
                continue
            if p.suffix in MODEL_EXTS:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text("weights")
            elif p.suffix == ".png":
                make_images(p.parent, names=(p.stem,))
    from musubi_pipe.files import tomllib

    for gen in plan.files:
        if gen.path.endswith(".toml") and "[[datasets]]" in gen.content:
            for ds in tomllib.loads(gen.content)["datasets"]:
                if ds.get("image_directory"):
                    make_images(Path(ds["image_directory"]))
                if ds.get("control_directory") and not ds.get("video_directory"):
                    make_images(Path(ds["control_directory"]))  # the same names as the targets
                if ds.get("video_directory"):
                    d = Path(ds["video_directory"])
                    d.mkdir(parents=True, exist_ok=True)
                    for n in ("clip1", "clip2"):
                        (d / f"{n}.mp4").write_bytes(b"not decoded: the sidecar gives the size")
                        (d / f"{n}.mp4.size").write_text("64x48x61")
                        (d / f"{n}.txt").write_text(f"a clip {n}")
    return pipeline


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*") if p.suffix in (".toml", ".yaml")
                                           and p.name != "dataset.toml"))
def test_example_runs_against_the_double_and_then_skips(double, tmp_path, monkeypatch, example):
    from click.testing import CliRunner

    from musubi_pipe.cli import main
    from musubi_pipe.compiler import compile_file
    from musubi_double import double_python

    monkeypatch.setenv("MUSUBI_PIPE_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.setenv("MUSUBI_TUNER_DIR", str(double.path))
    monkeypatch.setenv("MUSUBI_PIPE_PYTHON", double_python(double.path))
    pipeline = _prepare_example(EXAMPLES / example, tmp_path)
    r = CliRunner().invoke(main, ["run", str(pipeline), "--plain"])
    assert r.exit_code == 0, r.output
    assert all(f"✓ {step.id}" in r.output for step in compile_file(pipeline).steps), r.output
    ran = len(double.runs())
    r = CliRunner().invoke(main, ["run", str(pipeline), "--plain"])
    assert r.exit_code == 0 and "running 0 step(s)" in r.output, r.output
    assert len(double.runs()) == ran


def test_example_with_a_changed_training_setting_reruns_training_and_after(double, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from musubi_pipe.cli import main
    from musubi_double import double_python

    monkeypatch.setenv("MUSUBI_PIPE_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.setenv("MUSUBI_TUNER_DIR", str(double.path))
    monkeypatch.setenv("MUSUBI_PIPE_PYTHON", double_python(double.path))
    pipeline = _prepare_example(EXAMPLES / "wan21_t2v_1.3b_lora.toml", tmp_path)
    assert CliRunner().invoke(main, ["run", str(pipeline), "--plain"]).exit_code == 0
    text = pipeline.read_text()
    pipeline.write_text(text.replace("network_dim = 32", "network_dim = 16"))
    n = len(double.runs())
    r = CliRunner().invoke(main, ["run", str(pipeline), "--plain"])
    assert r.exit_code == 0, r.output
    assert double.runs()[n:] == ["wan_train_network", "wan_generate_video"]
    assert "- cache_latents skipped: up to date" in r.output and "- cache_text skipped: up to date" in r.output


@pytest.mark.parametrize("mode", ["rich", "plain", "quiet"])
def test_terminal_display_shows_progress_failures_and_the_log(mode):
    import io

    from musubi_pipe.executors import events as ev
    from musubi_pipe.executors.terminal import TerminalDisplay

    out = io.StringIO()
    show = TerminalDisplay(mode, stream=out)
    for e in [ev.Event(ev.PLAN, data={"steps": ["train"], "run_dir": "/r"}),
              ev.Event(ev.STEP_SKIPPED, step="cache", data={"reason": "up to date"}),
              ev.Event(ev.STEP_START, step="train", data={"argv": ["python", "x.py"], "log": "/r/train.log", "attempt": 1}),
              ev.Event(ev.PROGRESS, step="train", phase="training", current=5, total=10, epoch=1, epochs=2,
                       loss=0.1234, rate=2.5, eta_s=2.0),
              ev.Event(ev.STEP_END, step="train", data={"status": "failed", "cause": "CUDA out of memory [GPU 0]",
                                                         "fix": "add --blocks_to_swap 20", "log": "/r/train.log"}),
              ev.Event(ev.RUN_END, data={"status": "failed", "run_dir": "/r"})]:
        show(e)
    show.close()
    text = out.getvalue()
    assert "train failed: CUDA out of memory [GPU 0]" in text and "/r/train.log" in text
    if mode != "quiet":
        assert "cache skipped: up to date" in text
    if mode == "plain":
        assert "training  5/10  epoch 1/2  loss 0.1234  2.50 it/s  ETA 0:02" in text


def test_the_run_summary_names_the_result_files(double, tmp_path):
    from io import StringIO

    from musubi_pipe.executors.terminal import TerminalDisplay

    out = StringIO()
    plan = wan_plan(tmp_path)
    LocalExecutor(config_for(double.path)).run(plan, [TerminalDisplay("plain", out)])
    lora = plan.step("train").output("lora").path
    assert f"  train: {lora}" in out.getvalue().splitlines()
    again = StringIO()  # everything up to date: the summary still says where the results are
    LocalExecutor(config_for(double.path)).run(plan, [TerminalDisplay("quiet", again)])
    assert f"  train: {lora}" in again.getvalue().splitlines()
