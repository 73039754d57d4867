"""musubi-pipe's own tools as pipeline stages: dataset check before caching, LoRA merge, and
memory options planned for the GPU size."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from executor_plans import Recorder, config_for
from media_factory import make_video
from musubi_double import make_fake_checkout
from musubi_pipe.compiler import compile_file
from musubi_pipe.errors import PipelineError
from musubi_pipe.executors.local import LocalExecutor
from test_lora_tools import deltas, make_lora

WAN = """
name = "tools"
family = "wan"
task = "{task}"
[models]
dit = "models/wan_bf16.safetensors"
vae = "models/vae.safetensors"
t5 = "models/t5.safetensors"
[dataset.general]
resolution = [832, 480]
caption_extension = ".txt"
[[dataset.datasets]]
video_directory = "clips"
cache_directory = "cache"
target_frames = [1, 33]
"""


def write(folder: Path, body: str, task: str = "t2v-1.3B") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pipeline.toml"
    path.write_text(WAN.format(task=task) + body)
    return path


def args_of(plan, step):
    return plan.step(step).args


def test_gpu_memory_picks_the_fastest_setting_that_fits(tmp_path):
    body = """
[stages.big]
kind = "train"
gpu_memory_gib = 80
[stages.small]
kind = "train"
gpu_memory_gib = 24
[stages.mine]
kind = "train"
gpu_memory_gib = 80
gradient_checkpointing = true
"""
    plan = compile_file(write(tmp_path / "a", body))
    big, small, mine = (args_of(plan, s) for s in ("big", "small", "mine"))
    assert "--gradient_checkpointing" not in big  # 80 GB: 1.3B trains fastest without it (gpu-measurements run d)
    assert "--gradient_checkpointing" in mine  # what the user set wins over the planner
    assert "--blocks_to_swap" not in big and "--fp8_base" not in big
    assert "gradient_checkpointing" in plan.step("big").meta["memory_plan"]
    plan14 = compile_file(write(tmp_path / "b", body, task="t2v-14B"))
    small14 = args_of(plan14, "small")
    assert "--fp8_base" in small14 and "--fp8_scaled" in small14 and "--blocks_to_swap" in small14
    assert "--blocks_to_swap" not in args_of(plan14, "big")  # 80 GB: 14B without block swap


def test_a_gpu_too_small_is_an_error_on_the_field(tmp_path):
    path = write(tmp_path, '[stages.t]\nkind = "train"\ngpu_memory_gib = 4\n', task="t2v-14B")
    with pytest.raises(PipelineError) as err:
        compile_file(path)
    assert "stages.t.gpu_memory_gib" in str(err.value)


def test_check_dataset_runs_before_caching_and_merge_args(tmp_path):
    body = """
[stages.check]
kind = "check_dataset"
contact_sheet = true
[stages.latents]
kind = "cache_latents"
[stages.merged]
kind = "lora_merge"
loras = [{ path = "a.safetensors", multiplier = 0.7 }, "b.safetensors"]
rank = 8
"""
    plan = compile_file(write(tmp_path, body))
    assert plan.step("latents").needs == ["check"]
    check = plan.step("check")
    assert check.display_argv()[:3] == ["musubi-pipe", "dataset", "inspect"]
    merged = plan.step("merged").args
    assert merged[:2] == ["lora", "merge"] and merged[3:5] == [f"{tmp_path}/a.safetensors:0.7", f"{tmp_path}/b.safetensors:1.0"]
    assert merged[merged.index("--rank") + 1] == "8"


def double_and_project(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A test-double checkout recording its runs, and a project folder with placeholder models."""
    checkout = make_fake_checkout(tmp_path / "musubi-tuner")
    monkeypatch.setenv("MUSUBI_DOUBLE_RECORD", str(tmp_path / "record.jsonl"))
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    for name in ("wan_bf16.safetensors", "vae.safetensors", "t5.safetensors"):
        (project / "models" / name).write_bytes(b"\0" * 16)
    return checkout, project


def test_tool_stages_run_through_the_executor(tmp_path, monkeypatch):
    checkout, project = double_and_project(tmp_path, monkeypatch)
    (project / "clips").mkdir(parents=True)
    for i in range(2):
        make_video(project / "clips" / f"c{i}.mp4", n=40, fps=16.0, width=96, height=64)
        (project / "clips" / f"c{i}.txt").write_text(f"clip {i}")
    a = make_lora(project / "a.safetensors", rank=4, seed=1)
    b = make_lora(project / "b.safetensors", rank=4, seed=2)
    body = """
[stages.check]
kind = "check_dataset"
contact_sheet = true
[stages.latents]
kind = "cache_latents"
[stages.merged]
kind = "lora_merge"
loras = [{ path = "a.safetensors", multiplier = 0.7 }, { path = "b.safetensors", multiplier = 0.3 }]
"""
    plan = compile_file(write(project, body))
    rec = Recorder()
    result = LocalExecutor(config_for(checkout)).run(plan, [rec])
    assert result.status == "succeeded", rec.ended()
    report = json.loads(Path(plan.step("check").output("report").path).read_text())
    assert sum(len(d["items"]) for d in report["datasets"]) == 2
    assert Path(plan.step("check").output("contact_sheet").path).stat().st_size > 1000
    merged = deltas(plan.step("merged").output("lora").path)
    da, db = deltas(a), deltas(b)
    for key in da:
        np.testing.assert_allclose(merged[key], 0.7 * da[key] + 0.3 * db[key], rtol=1e-4, atol=1e-6)

    # A broken dataset stops the run at the check, before any caching.
    (project / "clips" / "c1.txt").unlink()
    (project / "clips" / "c2.mp4").write_bytes(b"not a video")
    (tmp_path / "record.jsonl").write_text("")
    rec = Recorder()
    result = LocalExecutor(config_for(checkout)).run(plan, [rec])
    assert result.status == "failed"
    assert result.steps["check"] == "failed"
    assert (tmp_path / "record.jsonl").read_text() == ""  # musubi never started
    end = next(e for e in rec.events if e.kind == "step_end" and e.step == "check")
    assert Path(end.data["log"]).exists() and "c2.mp4" in Path(end.data["log"]).read_text()


def test_batch_generation_matches_outputs_to_prompts(tmp_path, monkeypatch):
    checkout, project = double_and_project(tmp_path, monkeypatch)
    body = """
[stages.batch]
kind = "generate"
video_size = [64, 96]
video_length = 9
prompts = [
  { text = "a red fox", seed = 11 },
  { text = "a blue whale", seed = 22, frames = 13 },
  { text = "a green frog", seed = 33 },
]
"""
    plan = compile_file(write(project, body))
    step = plan.step("batch")
    assert "--from_file" in step.args and "--prompt" not in step.args
    rec = Recorder()
    result = LocalExecutor(config_for(checkout)).run(plan, [rec])
    assert result.status == "succeeded", rec.ended()
    assert len((tmp_path / "record.jsonl").read_text().splitlines()) == 1  # one model load for three prompts
    table = json.loads((result.run_dir / "batch-prompts.json").read_text())
    assert [row["prompt"] for row in table] == ["a red fox", "a blue whale", "a green frog"]
    outputs = [row["output"] for row in table]
    assert all(outputs) and len(set(outputs)) == 3
    for row in table:
        assert Path(row["output"]).name.endswith(f"_{row['seed']}.mp4")
    events = [e for e in rec.kinds("output") if e.data.get("name") == "prompt_output"]
    assert [e.data["prompt"] for e in events] == [0, 1, 2]
