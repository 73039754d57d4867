"""Workflow export: the exported workflow, queued in a real ComfyUI, runs exactly the plan's commands."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
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
        "MusubiTuner_DatasetConfig", "MusubiTuner_WanLatentCache", "MusubiTuner_WanTextEncoderCache",
        "MusubiTuner_WanTrainer", "MusubiTuner_PostHocEMA", "MusubiTuner_FormatConverter", "MusubiTuner_WanGenerator"]
    # family and task are set once, on Dataset Config; the other nodes read them from the pipeline
    assert (api["1"]["inputs"]["family"], api["1"]["inputs"]["task"]) == ("wan", "t2v-1.3B")
    for node in list(api.values())[1:]:
        assert node["inputs"].get("family", "(from pipeline)") == "(from pipeline)"
        assert node["inputs"].get("task", "(from pipeline)") == "(from pipeline)"
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


TOOL_STAGES = """
[stages.check]
kind = "check_dataset"
contact_sheet = true

[stages.merged]
kind = "lora_merge"
loras = [{ path = "a.safetensors", multiplier = 0.7 }, { path = "@train.lora", multiplier = 0.3 }]
rank = 4
"""


def test_every_stage_kind_has_a_node_in_the_pack():
    from musubi_pipe.comfy_adapter.export import FAMILY_NODES, KIND_NODES
    from musubi_pipe.comfy_adapter.nodes import NODE_CLASS_MAPPINGS
    from musubi_pipe.dsl.model import FAMILIES, STAGE_KINDS

    # A whole-model fine-tune runs from the command line: export refuses it with that fix (tested below).
    without_node = {"finetune"}
    for kind in set(STAGE_KINDS) - without_node:
        for family in FAMILIES:
            node = KIND_NODES.get(kind) or FAMILY_NODES.get((kind, family))
            assert node in NODE_CLASS_MAPPINGS, f"{kind} ({family}) has no node"


def test_export_maps_the_tool_stages_to_their_nodes(tmp_path):
    from musubi_pipe.cli import main
    from musubi_pipe.comfy_adapter.base import parse_options

    clips = tmp_path / "clips"
    clips.mkdir()
    path = write_pipeline(tmp_path / "p", "exp", clips)
    path.write_text(path.read_text() + TOOL_STAGES)
    result = CliRunner().invoke(main, ["export-comfy", str(path), "-o", str(tmp_path / "wf.json"), "--format", "api"])
    assert result.exit_code == 0, result.output
    api = json.loads((tmp_path / "wf.json").read_text())
    by_stage = {node["inputs"].get("stage_name"): (k, node) for k, node in api.items()}
    check_id, check = by_stage["check"]
    assert check["class_type"] == "MusubiTuner_DatasetCheck" and check["inputs"]["pipeline"] == ["1", 0]
    assert parse_options(check["inputs"]["options"]) == {"contact_sheet": True}
    # caching waits for the check, so the cache nodes extend the check's pipeline
    assert by_stage["cache_latents"][1]["inputs"]["pipeline"] == [check_id, 0]
    merge_id, merge = by_stage["merged"]
    assert merge["class_type"] == "MusubiTuner_LoRAMergeStage"
    assert merge["inputs"]["pipeline"] == [by_stage["train"][0], 0]
    assert parse_options(merge["inputs"]["options"]) == {
        "loras": [{"path": "a.safetensors", "multiplier": 0.7}, {"path": "@train.lora", "multiplier": 0.3}], "rank": 4}


def test_exported_tool_stages_run_in_comfyui(comfy, comfy_dir, clips, record, unique, test_root):
    import numpy as np
    from test_lora_tools import deltas, make_lora

    from musubi_pipe.compiler.build import compile_file
    from musubi_pipe.comfy_adapter.export import export_workflow

    folder = test_root / "work" / unique
    path = write_pipeline(folder, unique, clips)
    a = make_lora(folder / "a.safetensors", rank=4, seed=1)
    b = make_lora(folder / "b.safetensors", rank=4, seed=2)
    path.write_text(path.read_text() + TOOL_STAGES.replace("@train.lora", "b.safetensors").replace("rank = 4\n", ""))
    plan = compile_file(path)
    outcome = comfy.run(export_workflow(path, "api"), timeout=240)
    assert outcome.ended == "execution_success", outcome.error()
    report = json.loads(Path(plan.step("check").output("report").path).read_text())
    assert sum(len(d["items"]) for d in report["datasets"]) == 3
    sheet = Path(plan.step("check").output("contact_sheet").path)
    assert sheet.stat().st_size > 1000
    preview = outcome.outputs("2")["images"][0]  # the sheet shown on the check node
    assert (comfy_dir / "temp" / preview["subfolder"] / preview["filename"]).read_bytes() == sheet.read_bytes()
    merged, da, db = deltas(plan.step("merged").output("lora").path), deltas(a), deltas(b)
    assert set(merged) == set(da)
    for key in da:  # an exact merge: the weighted sum of the two LoRAs' weight changes
        np.testing.assert_allclose(merged[key], 0.7 * da[key] + 0.3 * db[key], rtol=1e-4, atol=1e-6)
    # musubi ran exactly the plan's musubi steps; the tool stages ran musubi-pipe, not musubi
    ran = sorted((json.loads(line)["script"] + ".py", json.loads(line)["argv"]) for line in record.read_text().splitlines())
    expected = sorted((step.script, step.args) for step in plan.steps if step.kind not in ("check_dataset", "lora_merge"))
    assert ran == expected


def test_a_broken_dataset_fails_the_check_node_before_caching(comfy, clips, record, unique, test_root):
    import shutil

    from musubi_pipe.comfy_adapter.export import export_workflow

    bad = test_root / "work" / (unique + "-clips")
    shutil.copytree(clips, bad)
    (bad / "clip0.txt").unlink()
    (bad / "clip1.mp4").write_bytes(b"not a video")
    path = write_pipeline(test_root / "work" / unique, unique, bad)
    path.write_text(path.read_text() + '\n[stages.check]\nkind = "check_dataset"\n')
    outcome = comfy.run(export_workflow(path, "api"), timeout=240)
    assert outcome.ended == "execution_error"
    error = outcome.error()
    assert error["node_id"] == "2" and error["exception_type"].endswith("NodeError")  # the check node, one line
    assert error["exception_message"].startswith("Dataset Check (node 2): check:"), error["exception_message"]
    assert record.read_text() == ""  # musubi never started


def test_exporting_a_fine_tune_says_to_run_it_from_the_command_line(tmp_path):
    from musubi_pipe.comfy_adapter.export import export_workflow
    from musubi_pipe.errors import PipelineError

    example = Path(__file__).resolve().parents[2] / "pipelines" / "examples" / "zimage_full_finetune.toml"
    with pytest.raises(PipelineError, match="a finetune stage has no node that runs it inside a workflow"):
        export_workflow(example, "api")
