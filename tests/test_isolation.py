"""No code from a shared document's folders runs: Python modules planted beside a pipeline (the
steps' working directory), in its dataset folder, in its workdir, or in a ComfyUI workflow's
base folder are never imported by any process musubi-pipe starts: training through accelerate,
the caching scripts, musubi-pipe's own tools (check_dataset, lora_merge), the environment probe."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from executor_plans import Recorder, config_for
from media_factory import make_video
from musubi_double import make_fake_checkout
from musubi_pipe.compiler import compile_file
from musubi_pipe.executors.local import LocalExecutor, step_environment
from musubi_pipe.executors.musubi_env import probe_python
from test_lora_tools import make_lora

# Modules the processes musubi-pipe starts import (accelerate, musubi, the tools' click and
# safetensors, the probe's json, the launchers' runpy) and the ones Python imports by itself.
PLANTED_PACKAGES = ("accelerate", "musubi_tuner", "PIL", "networks", "encodings")
PLANTED_MODULES = ("click", "safetensors", "numpy", "json", "runpy", "argparse", "psutil", "toml", "tomli",
                   "sitecustomize", "usercustomize", "_double_engine", "av", "yaml", "pydantic", "rich", "os",
                   "importlib_metadata", "subprocess", "signal")


def plant(folder: Path, marker: Path) -> None:
    """Modules that record their import in `marker`, then stop the process."""
    code = f"open({str(marker)!r}, 'a').write(__name__ + ' from ' + __file__ + '\\n')\nraise SystemExit(97)\n"
    folder.mkdir(parents=True, exist_ok=True)
    for name in PLANTED_PACKAGES:
        (folder / name / "commands").mkdir(parents=True, exist_ok=True)
        (folder / name / "__init__.py").write_text(code)
        (folder / name / "commands" / "__init__.py").write_text(code)
        (folder / name / "commands" / "launch.py").write_text(code)
    for name in PLANTED_MODULES:
        (folder / f"{name}.py").write_text(code)


BODY = """
name = "planted"
family = "wan"
task = "t2v-1.3B"
[models]
dit = "models/wan_bf16.safetensors"
vae = "models/vae.safetensors"
t5 = "models/t5.safetensors"
[dataset.general]
resolution = [96, 64]
caption_extension = ".txt"
[[dataset.datasets]]
video_directory = "clips"
cache_directory = "cache"
target_frames = [1]
[stages.check]
kind = "check_dataset"
[stages.latents]
kind = "cache_latents"
[stages.text]
kind = "cache_text_encoder"
[stages.train]
kind = "train"
network_dim = 4
max_train_epochs = 1
[stages.merged]
kind = "lora_merge"
loras = [{ path = "a.safetensors", multiplier = 0.5 }, { path = "b.safetensors", multiplier = 0.5 }]
"""


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    return make_fake_checkout(tmp_path_factory.mktemp("double") / "musubi-tuner")


def project(folder: Path) -> Path:
    (folder / "models").mkdir(parents=True, exist_ok=True)
    for name in ("wan_bf16.safetensors", "vae.safetensors", "t5.safetensors"):
        (folder / "models" / name).write_bytes(b"\0" * 16)
    (folder / "clips").mkdir(exist_ok=True)
    for i in range(2):
        make_video(folder / "clips" / f"c{i}.mp4", n=8, fps=16.0, width=96, height=64)
        (folder / "clips" / f"c{i}.txt").write_text(f"clip {i}")
    make_lora(folder / "a.safetensors", rank=4, seed=1)
    make_lora(folder / "b.safetensors", rank=4, seed=2)
    return folder


def assert_nothing_imported(marker: Path) -> None:
    assert not marker.exists(), marker.read_text()


@pytest.mark.parametrize("where", ["pipeline folder", "dataset folder", "workdir", "cache folder"])
def test_modules_planted_beside_a_pipeline_never_run(checkout, tmp_path, monkeypatch, where):
    monkeypatch.delenv("MUSUBI_DOUBLE_FAIL", raising=False)
    folder = project(tmp_path / "p")
    path = folder / "pipeline.toml"
    path.write_text(BODY)
    plan = compile_file(path)
    marker = tmp_path / "imported.txt"
    plant({"pipeline folder": folder, "dataset folder": folder / "clips", "workdir": Path(plan.workdir),
           "cache folder": folder / "cache"}[where], marker)
    # the dataset check would list the planted files as strays, not run them
    assert {s.launcher for s in plan.steps} == {"musubi-pipe", "python", "accelerate"}
    assert all(s.cwd == str(folder) for s in plan.steps)
    rec = Recorder()
    result = LocalExecutor(config_for(checkout)).run(plan, [rec])
    assert_nothing_imported(marker)
    assert result.status == "succeeded", rec.ended()
    assert list(result.steps.values()) == ["succeeded"] * 5


def test_a_comfyui_workflows_base_folder_is_no_import_path(checkout, tmp_path, monkeypatch):
    """ComfyUI nodes compile the workflow's document with its base_folder as the steps' working
    directory and run it with the same executor."""
    from musubi_pipe.comfy_adapter.base import add_stage, compile_pipeline, new_pipeline

    monkeypatch.delenv("MUSUBI_DOUBLE_FAIL", raising=False)
    base = project(tmp_path / "base")
    marker = tmp_path / "imported.txt"
    plant(base, marker)
    dataset = {"general": {"resolution": [96, 64], "caption_extension": ".txt"},
               "datasets": [{"video_directory": "clips", "cache_directory": "cache", "target_frames": [1]}]}
    pipe = new_pipeline("wf", base=str(base), dataset=dataset)
    pipe["document"].update(family="wan", task="t2v-1.3B", models={
        "dit": "models/wan_bf16.safetensors", "vae": "models/vae.safetensors", "t5": "models/t5.safetensors"})
    for name, kind, extra in [("check", "check_dataset", {}), ("latents", "cache_latents", {}),
                              ("text", "cache_text_encoder", {}),
                              ("train", "train", {"network_dim": 4, "max_train_epochs": 1})]:
        add_stage(pipe, name, {"kind": kind, **extra})
    plan = compile_pipeline(pipe)
    assert all(s.cwd == str(base) for s in plan.steps)
    rec = Recorder()
    result = LocalExecutor(config_for(checkout)).run(plan, [rec])
    assert_nothing_imported(marker)
    assert result.status == "succeeded", rec.ended()


def test_the_environment_probe_ignores_the_working_directory(checkout, tmp_path, monkeypatch):
    marker = tmp_path / "imported.txt"
    plant(tmp_path / "cwd", marker)
    monkeypatch.chdir(tmp_path / "cwd")
    facts = probe_python(Path(config_for(checkout).python), torch=False)
    assert_nothing_imported(marker)
    assert facts["python"] and "error" not in facts


def test_relative_pythonpath_entries_are_not_passed_to_steps(monkeypatch):
    """A relative (or empty) PYTHONPATH entry means the working directory, which a document chooses."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["", "lib", "/opt/site", ".", "/srv/x"]))
    assert step_environment({})["PYTHONPATH"] == os.pathsep.join(["/opt/site", "/srv/x"])
    monkeypatch.setenv("PYTHONPATH", "plugins")
    assert "PYTHONPATH" not in step_environment({})


def test_the_launch_boot_code_runs_the_module_as_python_dash_m_would(checkout, tmp_path):
    """`python -c <boot> accelerate.commands.launch ...` is `python -m accelerate.commands.launch ...`
    without the working directory on sys.path: same argv, same __main__."""
    from musubi_pipe.compiler.plan import MODULE_BOOT

    mod = tmp_path / "site" / "probe_mod.py"
    mod.parent.mkdir()
    mod.write_text("import sys, json\nif __name__ == '__main__':\n    print(json.dumps({'argv': sys.argv, 'path': sys.path}))\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(mod.parent)}
    out = subprocess.run([sys.executable, "-c", MODULE_BOOT, "probe_mod", "--flag", "x y"], cwd=cwd, env=env,
                         capture_output=True, text=True, check=True).stdout
    seen = json.loads(out)
    assert seen["argv"] == [str(mod), "--flag", "x y"]
    assert "" not in seen["path"] and str(cwd) not in seen["path"]
