"""Workflow export: the exported workflow, queued in a real ComfyUI, runs exactly the plan's commands."""
from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

PIPELINE = """
name = "{name}"
family = "wan"
task = "t2v-1.3B"

[models]
dit = "models/wan2.1_t2v_1.3B_bf16.safetensors"
vae = "models/wan_vae.safetensors"
t5 = "models/umt5.safetensors"

[dataset.general]
resolution = [96, 64]
caption_extension = ".txt"
batch_size = 1

[[dataset.datasets]]
video_directory = "{clips}"
cache_directory = "cache"
target_frames = [1, 9]

[stages.cache_latents]
kind = "cache_latents"

[stages.cache_text]
kind = "cache_text_encoder"
batch_size = 4

[stages.train]
kind = "train"
network_dim = 4
network_alpha = 2
learning_rate = 1e-4
optimizer_type = "adamw8bit"
max_train_epochs = 3
save_every_n_epochs = 1

[stages.ema]
kind = "ema"
checkpoints = "@train.checkpoints"
beta = 0.9

[stages.to_comfy]
kind = "convert"
input = "@ema.lora"
to = "comfyui"

[stages.preview]
kind = "generate"
prompt = "a lighthouse at dusk"
loras = [{{ path = "@train.lora", multiplier = 0.8 }}]
video_size = [64, 96]
video_length = 9
infer_steps = 2
seed = 3
"""


def write_pipeline(folder: Path, name: str, clips: Path) -> Path:
    (folder / "models").mkdir(parents=True)
    for f in ("wan2.1_t2v_1.3B_bf16.safetensors", "wan_vae.safetensors", "umt5.safetensors"):
        (folder / "models" / f).write_bytes(b"\0" * 16)
    path = folder / "pipeline.toml"
    path.write_text(PIPELINE.format(name=name, clips=clips))
    return path


def test_export_command_writes_both_formats(tmp_path):
    from musubi_pipe.cli import main
    from musubi_pipe.comfy_adapter.export import ui_to_api

    clips = tmp_path / "clips"
    clips.mkdir()
    path = write_pipeline(tmp_path / "p", "exp", clips)
    runner = CliRunner()
    for fmt in ("api", "ui"):
        result = runner.invoke(main, ["export-comfy", str(path), "-o", str(tmp_path / f"{fmt}.json"), "--format", fmt])
        assert result.exit_code == 0, result.output
    api = json.loads((tmp_path / "api.json").read_text())
    ui = json.loads((tmp_path / "ui.json").read_text())
    # one node per stage plus the pipeline start, each stage's node wired to what it uses
    assert [api[k]["class_type"] for k in sorted(api, key=int)] == [
        "MusubiTuner_DatasetConfig", "MusubiTuner_VAELatentCache", "MusubiTuner_TextEncoderCache",
        "MusubiTuner_WanTrainer", "MusubiTuner_PostHocEMA", "MusubiTuner_FormatConverter", "MusubiTuner_WanGenerator"]
    # the editor format says the same thing as the API format, and reads left to right
    assert {k: {n: v for n, v in node["inputs"].items()} for k, node in ui_to_api(ui).items()} == \
           {k: node["inputs"] for k, node in api.items()}
    xs = {n["id"]: n["pos"][0] for n in ui["nodes"]}
    for link in ui["links"]:
        assert xs[link[1]] < xs[link[3]], f"link {link} runs right to left"
    bad = runner.invoke(main, ["export-comfy", str(tmp_path / "missing.toml"), "-o", str(tmp_path / "x.json")])
    assert bad.exit_code == 2 and "no such file" in bad.output


def test_exported_workflow_runs_the_plans_commands(comfy, clips, record, unique, test_root):
    from musubi_pipe.compiler.build import compile_file
    from musubi_pipe.comfy_adapter.export import export_workflow

    path = write_pipeline(test_root / "work" / unique, unique, clips)
    plan = compile_file(path)
    outcome = comfy.run(export_workflow(path, "api"), timeout=240)
    assert outcome.ended == "execution_success", outcome.error()
    ran = sorted((json.loads(line)["script"] + ".py", json.loads(line)["argv"]) for line in record.read_text().splitlines())
    expected = sorted((step.script, step.args) for step in plan.steps)
    assert ran == expected


def test_comfy_executor_follows_the_run_with_the_same_events(comfy, clips, record, unique, test_root):
    import threading

    from musubi_pipe.executors import events as ev
    from musubi_pipe.executors.comfy import ComfyExecutor

    path = write_pipeline(test_root / "work" / unique, unique, clips)
    seen: list = []
    result = ComfyExecutor(comfy.url).run(path, [seen.append])
    assert result.status == "succeeded"
    kinds = [e.kind for e in seen]
    assert kinds[0] == ev.PLAN and kinds[-1] == ev.RUN_END and seen[-1].data["status"] == "succeeded"
    ended = {e.step: e.data["status"] for e in seen if e.kind == ev.STEP_END}
    assert ended == {"cache_latents": "succeeded", "cache_text": "succeeded", "train": "succeeded",
                     "ema": "succeeded", "to_comfy": "succeeded", "preview": "succeeded"}
    training = [e for e in seen if e.kind == ev.PROGRESS and e.step == "train" and e.phase == "training"]
    assert training and training[-1].current == training[-1].total and training[-1].loss is not None

    # Cancel: the executor asks ComfyUI to interrupt; the run ends cancelled.
    slow = test_root / "work" / (unique + "-slow")
    path = write_pipeline(slow, unique + "-slow", clips)
    path.write_text(path.read_text().replace("max_train_epochs = 3", "max_train_epochs = 100000").replace("save_every_n_epochs = 1", "save_every_n_epochs = 50000"))
    executor = ComfyExecutor(comfy.url)

    def cancel_when_training(e):
        if e.kind == ev.PROGRESS and e.phase == "training":
            threading.Thread(target=executor.cancel).start()

    assert executor.run(path, [cancel_when_training]).status == "cancelled"


def test_run_command_with_the_comfy_executor(comfy, clips, record, unique, test_root):
    import subprocess
    import sys

    path = write_pipeline(test_root / "work" / unique, unique, clips)
    run = subprocess.run([sys.executable, "-m", "musubi_pipe.cli", "run", "--executor", "comfy", "--comfy-url", comfy.url,
                          "--plain", str(path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "train" in run.stdout + run.stderr
    assert len(record.read_text().splitlines()) == 6  # every step ran in ComfyUI's process, through the double
    refused = subprocess.run([sys.executable, "-m", "musubi_pipe.cli", "run", "--executor", "comfy", "--force", str(path)],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "apply to the local executor" in refused.stderr


def test_export_names_a_stage_no_node_can_run(tmp_path):
    from musubi_pipe.cli import main

    clips = tmp_path / "clips"
    clips.mkdir()
    path = write_pipeline(tmp_path / "p", "exp", clips)
    path.write_text(path.read_text() + '\n[stages.check]\nkind = "check_dataset"\n')
    result = CliRunner().invoke(main, ["export-comfy", str(path), "-o", str(tmp_path / "wf.json")])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)  # a message, not a traceback
    assert "stages.check: a check_dataset stage has no node" in result.output
    assert not (tmp_path / "wf.json").exists()
