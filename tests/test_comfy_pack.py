"""The node pack without ComfyUI: import cost, registry shape, requirements in sync, node logic."""
from __future__ import annotations

import re
import subprocess
import sys
from musubi_pipe.files import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_pack_imports_without_torch_or_heavy_libraries():
    code = ("import sys, musubi_pipe; m = musubi_pipe.NODE_CLASS_MAPPINGS; "
            "print(len(m), sorted(x for x in ('torch', 'numpy', 'pydantic', 'av', 'PIL', 'safetensors', 'folder_paths') if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)
    assert int(out[0]) >= 20
    assert out[1].strip() == "[]"


def test_every_node_is_named_categorised_described_and_tooltipped():
    from musubi_pipe import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert re.fullmatch(r"MusubiTuner_[A-Za-z0-9]+", name)
        assert name in NODE_DISPLAY_NAME_MAPPINGS
        assert cls.CATEGORY.startswith("MusubiTuner/") and cls.DESCRIPTION
        assert len(cls.RETURN_TYPES) == len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))
        types = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for input_name, spec in types.get(section, {}).items():
                assert spec[1].get("tooltip"), f"{name}.{input_name}"
        assert callable(getattr(cls(), cls.FUNCTION))


def test_requirements_match_pyproject_and_never_list_torch():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [l.split("#")[0].strip() for l in (REPO / "requirements.txt").read_text().splitlines()]
    lines = [l for l in lines if l]
    norm = lambda s: s.replace(" ", "").replace("'", '"')
    assert sorted(map(norm, lines)) == sorted(map(norm, deps))
    assert not any(re.match(r"^(torch|torchvision|torchaudio)\b", l) for l in lines)


def test_stage_nodes_build_the_pipeline_document_without_flags():
    """Widgets and config sockets become fields of the pipeline language; conflicts are refused."""
    from musubi_pipe.comfy_adapter import base
    from musubi_pipe.comfy_adapter.nodes_train import OptimizerConfig, SamplingConfig, TrainingConfig, memory_fields

    training = TrainingConfig().build(network_dim=8, network_alpha=4.0, learning_rate=1e-4, max_train_epochs=3,
                                      max_train_steps=0, save_every_n_epochs=1, save_every_n_steps=0, save_state=True,
                                      seed=5, gradient_checkpointing=True)[0]
    optimizer = OptimizerConfig().build("adamw8bit", "", "weight_decay=0.01", "cosine", 0, 0.0)[0]
    sampling = SamplingConfig().build("shift", 3.0, "a cat\n\n a dog ", 1, 0, False)[0]
    # gradient_checkpointing and adamw8bit are the family template's: left to it, as a pipeline file would
    assert training == {"network_dim": 8, "network_alpha": 4.0, "learning_rate": 1e-4, "max_train_epochs": 3,
                        "save_every_n_epochs": 1, "save_state": True, "seed": 5}
    assert optimizer == {"lr_scheduler": "cosine", "optimizer_args": ["weight_decay=0.01"]}
    assert sampling["sample_prompts"] == [{"text": "a cat"}, {"text": "a dog"}]
    assert memory_fields({"fp8": True, "fp8_scaled": True, "blocks_to_swap": 20}, True) == \
        {"fp8_base": True, "fp8_scaled": True, "blocks_to_swap": 20}
    assert memory_fields({"fp8": True, "blocks_to_swap": 0}, False) == {"fp8": True}

    pipe = base.new_pipeline("p", base="/tmp")
    kw = {"pipeline": pipe, "stage_name": "train", "options": "max_train_epochs = 9\nnetwork_args = ['a=1']"}
    built, name = base.build_stage(kw, "train", "wan", "t2v-1.3B", (), {"output_name": "x"}, training, optimizer)
    stage = built["document"]["stages"]["train"]
    assert stage["max_train_epochs"] == 9 and stage["network_args"] == ["a=1"] and stage["output_name"] == "x"
    assert pipe["document"]["stages"] == {}  # the incoming pipeline is never changed
    with pytest.raises(base.NodeError, match="pipeline it extends is wan"):
        base.build_stage({"pipeline": built, "stage_name": "g"}, "generate", "hunyuan_video", None, (), {})
    with pytest.raises(base.NodeError, match="already has a stage 'train'"):
        base.build_stage({"pipeline": built, "stage_name": "train"}, "train", "wan", None, (), {"seed": 1})
    with pytest.raises(base.NodeError, match="not valid TOML"):
        base.parse_options("x = ")


def test_compile_errors_become_one_line_with_the_fix(tmp_path):
    from musubi_pipe.comfy_adapter import base

    pipe = base.new_pipeline("p", base=str(tmp_path))
    pipe["document"].update({"family": "wan", "stages": {"train": {"kind": "train", "max_train_epochs": 1}}})
    with pytest.raises(base.NodeError) as err:
        base.compile_pipeline(pipe)
    message = str(err.value)
    assert "\n" not in message and "fix:" in message


def test_memory_optimizer_plans_from_the_pipeline_with_the_memory_planner(tmp_path):
    """Family, task and sample size come from the incoming pipeline; the config is the planner's."""
    from musubi_pipe.comfy_adapter import base
    from musubi_pipe.comfy_adapter.nodes_advanced import MemoryOptimizer
    from musubi_pipe.comfy_adapter.nodes_train import memory_fields
    from musubi_pipe.tools.memory import plan_memory, tokens_for

    (tmp_path / "clips").mkdir()
    dataset = {"general": {"resolution": [512, 320], "caption_extension": ".txt", "batch_size": 2},
               "datasets": [{"video_directory": str(tmp_path / "clips"), "cache_directory": str(tmp_path / "c1"), "target_frames": [1, 25]},
                            {"image_directory": str(tmp_path / "clips"), "cache_directory": str(tmp_path / "c2"), "resolution": [1024, 1024], "batch_size": 1}]}
    pipe = base.new_pipeline("p", base=str(tmp_path), dataset=dataset)
    pipe["document"].update({"family": "wan", "task": "t2v-14B"})
    widgets = dict(family="(from pipeline)", task="", use_detected_gpu=False, gpu_memory_gib=24.0, resolution="", frames=0,
                   batch_size=0, network_dim=32, allow_fp8=True)
    out = MemoryOptimizer().choose(**widgets, pipeline=pipe)
    config, text = out["result"]
    # the largest sample: 512x320x25 in batches of 2 (16,000 tokens) beats 1024x1024 images (4,096)
    expected = plan_memory("wan", "t2v-14B", 24.0, (512, 320), 25, 2, 32)
    assert expected.tokens == 2 * tokens_for(512, 320, 25)
    assert config == {**expected.memory_config(), "cache_latents": expected.cache_latents}
    assert f"{expected.tokens:,} tokens" in text and text.startswith("memory: 24 GiB from gpu_memory_gib")
    assert memory_fields(config, True)["blocks_to_swap"] == expected.chosen.settings.blocks_to_swap > 0

    # the same dataset as a TOML file beside the pipeline, and widgets that override its sample size;
    # family and task widgets may only confirm the pipeline's
    import tomli_w

    (tmp_path / "dataset.toml").write_text(tomli_w.dumps(dataset))
    pipe["document"]["dataset"] = "dataset.toml"
    with pytest.raises(base.NodeError, match=r"task is t2v-1.3B here but the pipeline's task is t2v-14B .*set task to \(from pipeline\)"):
        MemoryOptimizer().choose(**{**widgets, "task": "t2v-1.3B"}, pipeline=pipe)
    with pytest.raises(base.NodeError, match="family is framepack here but the pipeline it extends is wan"):
        MemoryOptimizer().choose(**{**widgets, "family": "framepack"}, pipeline=pipe)
    pipe["document"]["task"] = "t2v-1.3B"
    config, text = MemoryOptimizer().choose(**{**widgets, "family": "wan", "task": "t2v-1.3B", "gpu_memory_gib": 80.0,
                                                 "resolution": "832x480", "frames": 33, "batch_size": 1}, pipeline=pipe)["result"]
    assert config["gradient_checkpointing"] is False and config["fp8"] is False
    # "off" is written out, so it overrides the Training Config's and the template's "on"
    assert memory_fields(config, True) == {"gradient_checkpointing": False}

    with pytest.raises(base.NodeError, match="no pipeline with a family"):
        MemoryOptimizer().choose(**widgets)
    with pytest.raises(base.NodeError, match="resolution 'big' is not WIDTHxHEIGHT"):
        MemoryOptimizer().choose(**{**widgets, "family": "wan", "resolution": "big"})


def test_gpu_nodes_read_nvml_through_tools_resources(monkeypatch):
    """With a GPU (a stand-in NVML): the Memory Optimizer plans for its free memory plus what ComfyUI
    itself holds (unloaded before musubi starts); the Resource Monitor shows the tools' report."""
    import os
    from types import SimpleNamespace

    from test_resources import GIB, fake_nvml

    from musubi_pipe.comfy_adapter.nodes_advanced import MemoryOptimizer, ResourceMonitor
    from musubi_pipe.tools import resources
    from musubi_pipe.tools.memory import plan_memory

    nv = fake_nvml(total_gib=24, used_gib=3)
    nv.nvmlDeviceGetComputeRunningProcesses = lambda h: [SimpleNamespace(pid=os.getpid(), usedGpuMemory=2 * GIB)]
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    config, text = MemoryOptimizer().choose(family="wan", task="t2v-14B", use_detected_gpu=True, gpu_memory_gib=80.0,
                                            resolution="832x480", frames=33, batch_size=1, network_dim=32,
                                            allow_fp8=True)["result"]
    assert text.startswith("memory: GPU 0 NVIDIA GeForce RTX 4090: 21.0 GiB free + 2.0 GiB ComfyUI frees before training\n")
    expected = plan_memory("wan", "t2v-14B", 23.0, (832, 480), 33, 1, 32)
    assert config == {**expected.memory_config(), "cache_latents": expected.cache_latents}
    assert MemoryOptimizer.IS_CHANGED(use_detected_gpu=True) == 23

    report = ResourceMonitor().report(refresh=True, family="wan", task="t2v-14B")["result"][0]
    assert report == resources.report_text(resources.gpu_report(), "wan", "t2v-14B")
    assert report.startswith("GPU 0 NVIDIA GeForce RTX 4090: 3.0 of 24.0 GiB used, 21.0 GiB free, 87% busy")
    assert "advice: wan t2v-14B" in report
