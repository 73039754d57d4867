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
    optimizer = OptimizerConfig().build("adamw8bit", "", "weight_decay=0.01", "cosine", 0, 1.0)[0]
    sampling = SamplingConfig().build("shift", "3", "a cat\n\n a dog ", 1, 0, False)[0]
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


def test_compile_errors_name_the_node_and_widget_to_fix_and_list_every_problem(tmp_path):
    """A problem the compiler finds with a field path is shown as the node (title and id) and
    widget that set it; every problem gets its line (no "+N more")."""
    from musubi_pipe.comfy_adapter import base
    from musubi_pipe.comfy_adapter.nodes_data import DatasetConfig
    from musubi_pipe.comfy_adapter.nodes_train import TrainingConfig
    from musubi_pipe.pipelines import registry

    fam = registry.family("wan")
    # the training example run unmodified: media_folder empty
    pipe = DatasetConfig().build(name="p", media_folder="", base_folder=str(tmp_path), family=fam.name, unique_id="3")[0]
    trainer = _node("train", fam)()
    built, _ = trainer.document(pipeline=pipe, stage_name="train", unique_id="8")
    with pytest.raises(base.NodeError) as err:
        base.compile_pipeline(built)
    lines = str(err.value).splitlines()
    assert lines[0] == "Dataset Config (node 3): media_folder is empty — set it to your folder of clips or images (or give dataset_toml)"
    assert "Wan LoRA Trainer (node 8): dit (pick it, or give it in model_paths): " in str(err.value)  # the missing DiT
    assert len(lines) >= 2 and not any("(+" in line or "[dataset] table" in line for line in lines)

    # a field from a config node names that node; a field from options names options
    (tmp_path / "clips").mkdir()
    pipe = DatasetConfig().build(name="p", media_folder="clips", base_folder=str(tmp_path), family=fam.name, unique_id="3",
                                 width=96, height=64, target_frames="1", frame_extraction="head", caption_extension=".txt",
                                 batch_size=1, num_repeats=1, enable_bucket=False)[0]
    config = TrainingConfig().build(network_dim=8, network_alpha=4.0, learning_rate="1e-4", max_train_epochs=2, max_train_steps=0,
                                    save_every_n_epochs=5, save_every_n_steps=0, save_state=True, seed=1,
                                    gradient_checkpointing=True, unique_id="4")[0]
    built, _ = trainer.document(pipeline=pipe, stage_name="train", unique_id="8", training_config=config,
                                options="save_last_n_epochs = 0\nnetwork_args = 3", model_paths="dit = /m/dit.safetensors")
    with pytest.raises(base.NodeError) as err:
        base.compile_pipeline(built)
    message = str(err.value)
    assert "Wan LoRA Trainer (node 8): options: network_args: " in message, message
    assert "Wan LoRA Trainer (node 8): options: save_last_n_epochs: " in message and "(+" not in message


def test_numbers_typed_as_text_are_checked_with_the_widget_named():
    from musubi_pipe.comfy_adapter import base
    from musubi_pipe.comfy_adapter.nodes_train import TrainingConfig

    widgets = dict(network_dim=8, network_alpha=4.0, max_train_epochs=3, max_train_steps=0, save_every_n_epochs=1,
                   save_every_n_steps=0, save_state=False, seed=5, gradient_checkpointing=True)
    assert TrainingConfig().build(learning_rate=" 5e-5 ", **widgets)[0]["learning_rate"] == 5e-5
    for bad, why in (("2e-4x", "is not a number; write a number such as 2e-4"), ("0", "must be greater than 0"),
                     ("", "is empty"), ("nan", "not a finite number")):
        with pytest.raises(base.NodeError) as err:
            TrainingConfig().build(learning_rate=bad, unique_id="4", **widgets)
        assert str(err.value).startswith("LoRA Training Config (node 4): learning_rate") and why in str(err.value), str(err.value)
    assert base.format_number(2e-4) == "2e-4" and base.format_number(1.5e-5) == "1.5e-5" and base.format_number(0.05) == "0.05"


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


# ------------------------------------------------------------------ the pack reads the registry


def _node(kind_or_id: str, family=None):
    from musubi_pipe.comfy_adapter import base
    from musubi_pipe.comfy_adapter.nodes import NODE_CLASS_MAPPINGS

    return NODE_CLASS_MAPPINGS[base.family_node_id(family, kind_or_id) if family else kind_or_id]


def _picker_slots(cls) -> set[str]:
    """The model slots a node shows: pickers whose tooltip names a ComfyUI model folder (one
    model_paths text takes files outside those folders)."""
    types = cls.INPUT_TYPES()
    names = {**types["required"], **types.get("optional", {})}
    return {n for n, spec in names.items() if isinstance(spec[0], list) and " folder); " in spec[1].get("tooltip", "")}


FAMILY_KINDS = ("cache_latents", "cache_text_encoder", "train", "generate")


@pytest.mark.parametrize("family", __import__("musubi_pipe.pipelines.registry", fromlist=["x"]).family_names())
def test_every_registry_family_has_its_nodes_showing_only_its_model_slots(family):
    from musubi_pipe import NODE_DISPLAY_NAME_MAPPINGS
    from musubi_pipe.comfy_adapter import base
    from musubi_pipe.comfy_adapter.export import FAMILY_NODES
    from musubi_pipe.pipelines import registry

    fam = registry.family(family)
    for kind in FAMILY_KINDS:
        node_id = f"MusubiTuner_{fam.comfy_name}{base.FAMILY_NODE_SUFFIX[kind]}"
        cls = _node(node_id)
        assert cls.FAMILY == fam.name and FAMILY_NODES[(kind, fam.name)] == node_id
        wanted = set(fam.slots(kind)) | (set(fam.experts.get("slots", {}).values()) if kind == "train" else set())
        assert set(cls.SLOTS) == wanted and set(cls.INPUT_TYPES()["optional"]["model_paths"][1]["tooltip"].split("slots: ")[1]
                                                .split(" (dit_dtype")[0].split(", ")) - {"dit_dtype", ""} == wanted
        if kind == "train":  # pickers for what training loads; the models samples need come from the cache nodes
            roles = fam.stages["train"].models
            wanted = {s for s in wanted if not roles.get(s, "").startswith("sampling")} | set(fam.experts.get("slots", {}).values())
        assert _picker_slots(cls) == wanted, f"{node_id} shows {_picker_slots(cls)}"
        for slot in wanted:  # folder and help are the registry's
            spec = cls.INPUT_TYPES()["required"][slot]
            assert f"({fam.models[slot].folder} folder)" in spec[1]["tooltip"] and fam.models[slot].help in spec[1]["tooltip"]
        assert fam.comfy_name in NODE_DISPLAY_NAME_MAPPINGS[node_id]
        types = cls.INPUT_TYPES()["required"]
        assert "family" not in types  # the pipeline socket carries it
        if kind == "train":  # the trainer always extends a pipeline: its family and task, chosen on Dataset Config
            assert fam.title in cls.DESCRIPTION and "task" not in types
        elif kind == "generate":  # a generator also runs on its own, so it may name a task
            assert fam.title in cls.DESCRIPTION
            if fam.tasks:  # a dropdown of the family's tasks that defaults to the pipeline's
                assert types["task"][0] == [base.FROM_PIPELINE, *fam.task_names()]
                assert types["task"][1]["default"] == base.FROM_PIPELINE
            else:
                assert "task" not in types
        else:
            assert "task" not in types
    generator = _node("generate", fam)
    assert generator.RETURN_TYPES[0] == {"video": "VIDEO", "image": "IMAGE"}[fam.output]


def test_task_is_a_dropdown_everywhere_and_family_defaults_come_from_the_registry():
    from musubi_pipe.comfy_adapter import base
    from musubi_pipe.comfy_adapter.nodes import NODE_CLASS_MAPPINGS
    from musubi_pipe.pipelines import registry

    every_task = list(dict.fromkeys(t for fam in registry.families() for t in fam.task_names()))  # families share names (i2v)
    for name, cls in NODE_CLASS_MAPPINGS.items():
        types = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for input_name, spec in types.get(section, {}).items():
                if input_name == "task":
                    assert isinstance(spec[0], list), f"{name}.task is not a dropdown"
                    assert set(spec[0]) - {base.FROM_PIPELINE, base.DEFAULT_TASK, ""} <= set(every_task)
                if input_name == "family":
                    assert set(spec[0]) - {base.FROM_PIPELINE} == set(registry.family_names()), name
                    assert spec[1]["default"] in (base.FROM_PIPELINE, registry.default_family()), name
    dataset = NODE_CLASS_MAPPINGS["MusubiTuner_DatasetConfig"].INPUT_TYPES()["optional"]
    assert dataset["family"][0] == list(registry.family_names())
    assert dataset["task"][0] == [base.DEFAULT_TASK, *every_task]
    # the two come last, so that editor workflows saved before them keep their widget values by position
    assert list(dataset)[-2:] == ["family", "task"]


def test_family_and_task_are_chosen_once_and_flow_down_the_pipeline(tmp_path):
    from musubi_pipe.comfy_adapter import base
    from musubi_pipe.comfy_adapter.nodes_data import DatasetConfig
    from musubi_pipe.pipelines import registry

    fam = registry.family(registry.default_family())
    other = next(f for f in registry.families() if f.name != fam.name and f.tasks)
    start = dict(name="p", media_folder="", base_folder=str(tmp_path))
    pipe = DatasetConfig().build(**start)[0]  # a workflow saved before the two widgets: the defaults
    assert (pipe["document"]["family"], pipe["document"]["task"]) == (fam.name, fam.default_task)
    task = fam.task_names()[1]
    pipe = DatasetConfig().build(**start, family=fam.name, task=task)[0]
    assert pipe["document"]["task"] == task
    with pytest.raises(base.NodeError, match=rf"task: {other.task_names()[0]} is not a {fam.title} task"):
        DatasetConfig().build(**start, family=fam.name, task=other.task_names()[0])

    trainer = _node("train", fam)()
    widgets = dict(stage_name="train", copy_to_loras="none")
    built, _ = trainer.document(pipeline=pipe, **widgets)  # the trainer has no task widget: the pipeline's
    assert built["document"]["task"] == task and built["document"]["family"] == fam.name
    # a generator (which also runs on its own) has one: it may only agree
    base.build_stage({"pipeline": pipe, "stage_name": "g"}, "generate", fam.name, task, (), {})
    with pytest.raises(base.NodeError, match=rf"task is {fam.default_task} here but the pipeline's task is {task}"):
        base.build_stage({"pipeline": pipe, "stage_name": "g"}, "generate", fam.name, fam.default_task, (), {})
    with pytest.raises(base.NodeError, match=rf"this node is for {other.title}, but the pipeline it extends is {fam.name}"):
        _node("train", other)().document(pipeline=pipe, **widgets)
    # a node of several families confirms the pipeline's, or names the widget that contradicts it
    assert base.pipeline_family(pipe) == fam.name
    with pytest.raises(base.NodeError, match=rf"family is {other.name} here but the pipeline it extends is {fam.name}"):
        base.pipeline_family(pipe, other.name)


def test_a_node_serving_several_families_refuses_another_familys_models(tmp_path):
    from musubi_pipe.comfy_adapter import base
    from musubi_pipe.comfy_adapter.nodes_cache import VAELatentCache
    from musubi_pipe.pipelines import registry

    for fam in registry.families():
        foreign = [s for s in base.union_slots("merge") if s not in base.node_slots(fam, "merge")]
        for slot in foreign:
            with pytest.raises(base.NodeError, match=rf"^{slot}: {fam.title} does not use it here \(merge\); set {slot} to"):
                base.build_stage({"stage_name": "m", f"{slot}_path": "/m/x.safetensors"}, "merge", fam.name, None,
                                 base.union_slots("merge"), {})
    # the deprecated shared cache node: saved workflows' layout, family and task confirmed against the pipeline
    fam = registry.family(registry.default_family())
    assert list(VAELatentCache.INPUT_TYPES()["required"])[:4] == ["pipeline", "stage_name", "family", "task"]
    pipe = base.new_pipeline("p", base=str(tmp_path), family=fam.name, task=fam.default_task)
    other = next(f for f in registry.families() if f.name != fam.name)
    node = VAELatentCache()
    assert node.document({"pipeline": pipe, "stage_name": "c"}, base.pipeline_family(pipe, fam.name), {}, "")[0]["document"]["task"] == fam.default_task
    with pytest.raises(base.NodeError, match="family is .* here but the pipeline it extends is"):
        base.pipeline_family(pipe, other.name)


def test_an_image_family_gets_an_image_generator_from_the_same_code():
    """The output kind is a switch in the registry (rules.output), not a copied class."""
    import dataclasses

    from musubi_pipe.comfy_adapter.nodes_generate import OUTPUTS, _generator_attrs
    from musubi_pipe.pipelines import registry

    fam = registry.family(registry.default_family())
    image = dataclasses.replace(fam, rules={**fam.rules, "output": "image"})
    attrs = _generator_attrs(image)
    assert attrs["RETURN_TYPES"] == ("IMAGE", "MUSUBI_PIPELINE", "STRING", "MASK")
    assert attrs["RETURN_NAMES"] == ("image", "pipeline", "image_paths", "mask")
    assert attrs["OUTPUT"] is OUTPUTS["image"] and ".png" in attrs["OUTPUT"].suffixes
    assert _generator_attrs(fam)["RETURN_TYPES"] == ("VIDEO", "MUSUBI_PIPELINE", "STRING")


def _generate_options(fam) -> set[str]:
    from musubi_pipe.compiler import contract

    return set(contract.options(fam.stages["generate"].script))


@pytest.mark.parametrize("family", __import__("musubi_pipe.pipelines.registry", fromlist=["x"]).family_names())
def test_a_generator_shows_only_the_settings_its_familys_script_takes(family):
    """Widgets follow the recorded contract of the family's generate script (under the family's
    aliases): size as video_size or image_size, length in frames or seconds, no widget that the
    compiler would refuse; image inputs from the tasks' switches."""
    from musubi_pipe.comfy_adapter.nodes_generate import CONTROL_INPUTS
    from musubi_pipe.pipelines import registry

    fam = registry.family(family)
    spec = fam.stages["generate"]
    known = _generate_options(fam)

    def takes(field):
        option = spec.aliases.get(field, field)
        return all(o in known for o in (option if isinstance(option, list) else [option]))

    cls = _node("generate", fam)
    types = cls.INPUT_TYPES()
    required, optional = types["required"], types["optional"]
    for widget in ("video_length", "video_seconds", "infer_steps", "guidance_scale", "seed"):
        assert (widget in required) == takes(widget), widget
    assert "flow_shift" not in required  # in options, with the other settings few people change
    assert ("width" in required) == ("height" in required) == (takes("video_size") or takes("image_size"))
    assert cls.SIZE == ("image_size" if fam.output == "image" else "video_size")
    assert ("prompts" in optional) == (fam.flag("batch_file") in known)
    tasks = list(fam.tasks.values()) or [fam.model]
    starts = any(t.get("start_image") for t in tasks)
    assert ("image" in optional) == (starts and takes("image_path"))
    assert ("end_image" in optional) == (starts and takes("end_image_path"))
    edits = [t for t in tasks if t.get("control_generate")]
    controls = [n for n in optional if n.startswith("control_image")]
    if not edits:
        assert controls == []
    else:  # one input per control image a task takes, or the docs' 3 where a task takes any number
        limits = [t.get("max_control_images") for t in edits]
        assert len(controls) == (max(limits) if all(limits) else CONTROL_INPUTS)
        assert all(optional[n][0] == "IMAGE" for n in controls)


def test_image_generator_widgets_become_image_size_and_control_images(tmp_path, monkeypatch):
    """An image family's generator writes image_size [height, width], never video fields; each
    picture of each control IMAGE input becomes one control image, in input order."""
    from musubi_pipe.comfy_adapter import base, nodes_generate
    from musubi_pipe.pipelines import registry

    fam = next(f for f in registry.families() if f.output == "image" and any(t.get("control_generate") for t in f.tasks.values()))
    task = next(t for t, spec in fam.tasks.items() if spec.get("control_generate") and not spec.get("max_control_images"))
    cls = _node("generate", fam)
    class Built(Exception):
        pass

    def finish_stage(pipe, stage, node):  # stop before running: the document is what is checked
        raise Built(pipe)

    monkeypatch.setattr(nodes_generate, "save_images", lambda batch: [f"/in/{name}.png" for name in batch])
    monkeypatch.setattr(nodes_generate, "finish_stage", finish_stage)
    pipe = base.new_pipeline("p", base=str(tmp_path), family=fam.name, task=task)
    with pytest.raises(Built) as stop:
        cls().run(prompt="a cat", lora_name=base.NONE, lora_strength=1.0, pipeline=pipe, stage_name="g", options="",
                  width=512, height=256, infer_steps=3, video_length=9, seed=7,
                  control_image=["a", "b"], control_image_3=["c"])
    stage = stop.value.args[0]["document"]["stages"]["g"]
    assert stage["image_size"] == [256, 512] and stage["control_image_path"] == ["/in/a.png", "/in/b.png", "/in/c.png"]
    assert "video_size" not in stage and "video_length" not in stage and stage["seed"] == 7 and stage["infer_steps"] == 3


CLI_PIPELINE = """
name = "style"
family = "{family}"
task = "{task}"

[models]
{models}

[dataset]
general = {{ resolution = [96, 64], caption_extension = ".txt", batch_size = 1 }}
datasets = [{{ video_directory = "clips", cache_directory = "cache", target_frames = [1, 9] }}]

[stages.cache_latents]
kind = "cache_latents"

[stages.cache_text_encoder]
kind = "cache_text_encoder"

[stages.train]
kind = "train"
save_state = true
"""


def test_training_config_left_at_its_defaults_trains_what_the_cli_pipeline_trains(tmp_path):
    """Config widgets start at the default family's template values and, left there, say what a
    pipeline file that does not set them says: the same document, the same argv."""
    from musubi_pipe.comfy_adapter import base
    from musubi_pipe.comfy_adapter.nodes_data import DatasetConfig
    from musubi_pipe.comfy_adapter.nodes_train import OptimizerConfig, TrainingConfig
    from musubi_pipe.comfy_adapter.export import _widget_default
    from musubi_pipe.compiler.build import compile_file
    from musubi_pipe.pipelines import registry

    fam = registry.family(registry.default_family())
    defaults = fam.stages["train"].defaults
    (tmp_path / "clips").mkdir()
    models = {}
    for slot in set(base.node_slots(fam, "train")) - set(fam.experts.get("slots", {}).values()) | {"dit"}:
        if fam.stages["train"].models.get(slot) in ("required", "sampling"):
            models[slot] = str(tmp_path / f"{slot}.safetensors")
            Path(models[slot]).write_bytes(b"\0" * 16)
    task = fam.task_names()[1] if fam.tasks else None

    def at_defaults(cls) -> dict:
        return {n: _widget_default(spec) for n, spec in cls.INPUT_TYPES()["required"].items()}

    training = at_defaults(TrainingConfig)
    for key in ("network_dim", "network_alpha", "learning_rate", "max_train_epochs", "save_every_n_epochs", "seed"):
        value = float(training[key]) if key == "learning_rate" else training[key]  # typed as text: "2e-4"
        assert value == defaults[key], key  # the family file's, not the node's own
    dataset_toml = 'general = { resolution = [96, 64], caption_extension = ".txt", batch_size = 1 }\n' \
                   'datasets = [{ video_directory = "clips", cache_directory = "cache", target_frames = [1, 9] }]\n'
    pipe = DatasetConfig().build(name="style", media_folder="", dataset_toml=dataset_toml, base_folder=str(tmp_path),
                                 family=fam.name, task=task or base.DEFAULT_TASK)[0]
    for kind in ("cache_latents", "cache_text_encoder"):
        node = _node(kind, fam)()
        paths = {f"{slot}_path": models[slot] for slot in node.SLOTS if slot in models}
        pipe, _ = node.document({"pipeline": pipe, "stage_name": kind, **paths}, fam.name, {})
    trainer = _node("train", fam)()
    paths = {f"{slot}_path": path for slot, path in models.items() if slot in trainer.SLOTS}
    from musubi_pipe.comfy_adapter.export import _is_widget

    trainer_widgets = {n: _widget_default(spec) for n, spec in type(trainer).INPUT_TYPES()["required"].items()
                       if _is_widget(spec)}  # the trainer's own widgets left at theirs too
    pipe, _ = trainer.document(pipeline=pipe, **{**trainer_widgets, "stage_name": "train"},
                               training_config=TrainingConfig().build(**training)[0],
                               optimizer_config=OptimizerConfig().build(**at_defaults(OptimizerConfig))[0], **paths)
    assert pipe["document"]["stages"]["train"] == {"kind": "train", "save_state": True}

    cli = tmp_path / "style.toml"
    cli.write_text(CLI_PIPELINE.format(family=fam.name, task=task, models="\n".join(f'{k} = "{v}"' for k, v in models.items())))
    ours, theirs = base.compile_pipeline(pipe), compile_file(cli)
    assert [(s.id, s.script, s.args, s.launch_args) for s in ours.steps] == [(s.id, s.script, s.args, s.launch_args) for s in theirs.steps]
    assert len(ours.steps) == 3
    train = ours.step("train").args
    for key in ("network_alpha", "save_every_n_epochs"):  # the values ComfyUI and the CLI used to disagree on
        assert train[train.index(f"--{key}") + 1] == str(defaults[key])


def test_export_links_a_stage_after_a_generator_to_its_pipeline_output(tmp_path):
    """A generator's first output is its picture or video: a later stage takes the pipeline output."""
    from musubi_pipe.comfy_adapter.export import pipeline_nodes, to_api
    from musubi_pipe.pipelines import registry

    fam = next(f for f in registry.families() if f.output == "image" and not f.tasks)
    models = "\n".join(f'{slot} = "{slot}.safetensors"' for slot in fam.slots("generate"))
    for slot in fam.slots("generate"):
        (tmp_path / f"{slot}.safetensors").write_bytes(b"\0")
    path = tmp_path / "p.toml"
    path.write_text(f'name = "x"\nfamily = "{fam.name}"\n[models]\n{models}\n[stages.a]\nkind = "generate"\nprompt = "one"\n'
                    '[stages.b]\nkind = "generate"\nprompt = "two"\nneeds = ["a"]\n')
    nodes, links = pipeline_nodes(path, "")
    assert links == [("1", 0, "2", "pipeline"), ("2", 1, "3", "pipeline")]
    assert to_api(nodes, links)["3"]["inputs"]["pipeline"] == ["2", 1]


def test_progress_messages_are_throttled_and_carry_what_a_chart_needs():
    from musubi_pipe.comfy_adapter import base
    from musubi_pipe.executors import events as ev

    run = base.Run("8")
    sent: list = []
    run._send = lambda e: sent.append(base.event_message("8", e))
    run._forward(ev.Event(ev.STEP_START, step="train"))
    for i in range(1, 1001):  # 1,000 steps in a few milliseconds, two epochs
        run._forward(ev.Event(ev.PROGRESS, step="train", phase="training", current=i, total=1000, epoch=1 + i // 501,
                              epochs=2, loss=1.0 / i))
    run._forward(ev.Event(ev.STEP_END, step="train", data={"status": "succeeded"}))
    progress = [m for m in sent if m["event"]["kind"] == ev.PROGRESS]
    assert 2 <= len(progress) <= 4  # the first, the last (and what 0.25 s lets through)
    assert progress[-1]["chart"] == {"stage": "train", "phase": "training", "step": 1000, "total": 1000, "epoch": 2,
                                     "epochs": 2, "loss": 1.0 / 1000, "time": progress[-1]["chart"]["time"]}
    assert {m["node"] for m in sent} == {"8"} and sent[-1]["event"]["kind"] == ev.STEP_END
    # a progress held back goes out before the next other event
    run = base.Run("8")
    sent.clear()
    run._send = lambda e: sent.append(base.event_message("8", e))
    for i in (1, 2, 3):
        run._forward(ev.Event(ev.PROGRESS, step="train", phase="training", current=i, total=10, epoch=1, loss=0.5))
    run._forward(ev.Event(ev.STEP_END, step="train", data={"status": "failed"}))
    assert [m["chart"]["step"] for m in sent if "chart" in m] == [1, 3]


def test_sample_prompt_lines_carry_per_sample_settings_and_bad_lines_are_named():
    from musubi_pipe.comfy_adapter import base
    from musubi_pipe.comfy_adapter.nodes_train import SamplingConfig, parse_sample_prompts

    prompts = parse_sample_prompts("a fox in snow --w 832 --h 480 --f 33 --s 20 --d 42 --g 5.5\n\n# a comment\n a cat ")
    assert prompts == [{"text": "a fox in snow", "width": 832, "height": 480, "frames": 33, "steps": 20, "seed": 42,
                        "guidance": 5.5}, {"text": "a cat"}]
    with pytest.raises(base.NodeError) as err:
        SamplingConfig().build("(default)", 0.0, "ok --w 512\nbad --w wide\nworse --zz 3\n--s 4", 1, 0, False, unique_id="6")
    lines = str(err.value).splitlines()
    assert len(lines) == 3 and all(line.startswith("Sampling Config (node 6): sample_prompts line ") for line in lines)
    assert "line 2: --w (width): 'wide' is not a number" in lines[0] and "line 3: --zz is not a sample option" in lines[1]
    assert "line 4: starts with an option" in lines[2]


def test_the_final_lora_is_copied_atomically_and_a_users_file_is_never_replaced(tmp_path, monkeypatch):
    from musubi_pipe.comfy_adapter import base
    from musubi_pipe.comfy_adapter.nodes_train import place_file

    monkeypatch.setattr(base, "default_base", lambda: str(tmp_path / "base"))
    trained = tmp_path / "work" / "style.safetensors"
    trained.parent.mkdir()
    trained.write_bytes(b"run one")
    target = tmp_path / "loras" / "musubi-pipe" / "style" / "style.safetensors"
    assert place_file(str(trained), target) == (target, "") and target.read_bytes() == b"run one"
    trained.write_bytes(b"run two")  # a later run replaces the copy this pack made
    assert place_file(str(trained), target) == (target, "") and target.read_bytes() == b"run two"
    target.write_bytes(b"the user's own file")  # changed since: the user's now
    copy, note = place_file(str(trained), target)
    assert copy == target.with_name("style-2.safetensors") and copy.read_bytes() == b"run two"
    assert target.read_bytes() == b"the user's own file" and "kept it, saved this one as style-2.safetensors" in note
    assert sorted(p.name for p in target.parent.iterdir()) == ["style-2.safetensors", "style.safetensors"]  # no temporary left


@pytest.mark.parametrize("family", __import__("musubi_pipe.pipelines.registry", fromlist=["x"]).family_names())
def test_widgets_that_mean_the_default_show_the_real_default(family):
    """No settings widget shows 0 for "the template's default": it shows the family template's (or
    musubi's recorded) value, or says default where musubi takes it from the task's config."""
    from musubi_pipe.comfy_adapter.base import real_default
    from musubi_pipe.pipelines import registry

    fam = registry.family(family)
    required = _node("generate", fam).INPUT_TYPES()["required"]
    for name in ("infer_steps", "guidance_scale"):
        if name not in required:
            continue
        kind, options = required[name]
        known = real_default(fam, "generate", name)
        if known is None:
            assert (kind, options["default"]) == ("STRING", "default"), name
        else:
            assert options["default"] == known, name  # 0.0 only where it is the real default (Z-Image's guidance)
    if "width" in required:
        size = real_default(fam, "generate", "image_size" if fam.output == "image" else "video_size")
        assert [required["height"][1]["default"], required["width"][1]["default"]] == (size or [0, 0])
    trainer = _node("train", fam).INPUT_TYPES()["required"]
    defaults = fam.stages["train"].defaults
    assert float(trainer["learning_rate"][1]["default"]) == defaults["learning_rate"] and trainer["learning_rate"][0] == "STRING"
    text = _node("cache_text_encoder", fam).INPUT_TYPES()["required"]["batch_size"][1]
    assert text["default"] == (real_default(fam, "cache_text_encoder", "batch_size") or 0)


def test_batch_prompts_carry_per_prompt_settings():
    from musubi_pipe.comfy_adapter import base
    from musubi_pipe.comfy_adapter.nodes_io import BatchProcessor

    prompts = BatchProcessor().build("a fox --w 832 --h 480 --s 20\na cat --d 99\n\na dog", 5)[0]
    assert prompts == [{"text": "a fox", "seed": 5, "width": 832, "height": 480, "steps": 20},
                       {"text": "a cat", "seed": 99}, {"text": "a dog", "seed": 7}]
    with pytest.raises(base.NodeError, match=r"^Batch Processor: prompts line 2: --s \(steps\): 'many' is not a number"):
        BatchProcessor().build("a fox\na cat --s many", -1)


def test_a_nodes_text_ends_with_how_each_step_ended(monkeypatch):
    """The node's progress text may not stay at the last progress line ("caching 2") once the step ended."""
    from musubi_pipe.comfy_adapter import base
    from musubi_pipe.executors import events as ev

    shown = []
    monkeypatch.setattr(base, "show_text", lambda node, text: shown.append(text))
    run = base.Run("7")
    run.listener(ev.Event(ev.STEP_START, step="cache_latents", data={}))
    run.listener(ev.Event(ev.PROGRESS, step="cache_latents", phase="caching", current=2, total=None, data={}))
    run.listener(ev.Event(ev.STEP_END, step="cache_latents", data={"status": "succeeded"}))
    assert shown[-1] == "cache_latents: done"
    run.listener(ev.Event(ev.STEP_END, step="train", data={"status": "failed", "cause": "out of GPU memory"}))
    assert shown[-1] == "train: failed: out of GPU memory"


def test_an_exported_workflow_opens_below_the_editors_bars_without_overlaps(tmp_path):
    """ComfyUI draws a node's title above its position: at TOP and LEFT (the shipped examples' view,
    which the browser checks look at) no title hides under the tab bar, and no two nodes overlap."""
    import json

    from click.testing import CliRunner

    from musubi_pipe.cli import main
    from musubi_pipe.comfy_adapter.export import LEFT, SCALE, TOP

    out = tmp_path / "wf.json"
    result = CliRunner().invoke(main, ["export-comfy", str(REPO / "pipelines/examples/wan21_t2v_1.3b_lora.toml"),
                                       "-o", str(out), "--format", "ui"])
    assert result.exit_code == 0, result.output
    workflow = json.loads(out.read_text())
    assert workflow["extra"]["ds"] == {"scale": SCALE, "offset": [0, 0]}
    boxes = [(n["pos"][0], n["pos"][1], n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1]) for n in workflow["nodes"]]
    assert min(b[1] for b in boxes) >= TOP and min(b[0] for b in boxes) >= LEFT
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
