"""The shipped example workflows: current, listed by ComfyUI's template browser, and runnable."""
from __future__ import annotations

import json
from pathlib import Path

from make_examples import REPO, rendered

EXAMPLES = REPO / "example_workflows"


def test_example_files_are_up_to_date():
    for name, text in rendered().items():
        assert (EXAMPLES / f"{name}.json").read_text() == text, f"run python tests/comfy/make_examples.py ({name})"


def test_examples_are_listed_as_templates(comfy):
    listed = comfy.get("/workflow_templates")
    assert sorted(listed["musubi-pipe"]) == ["format_conversion", "inference_with_lora", "lora_training", "merge_loras"]


def _fill(prompt: dict, models: Path, slots: tuple[str, ...] | None = None, **widgets) -> dict:
    """Point the pickers (of `slots`, default all) at this test's files, as a user would pick them."""
    fake = {"dit": "musubi-test-dit_bf16.safetensors", "vae": "musubi-test-vae.safetensors", "t5": "musubi-test-t5.safetensors",
            "text_encoder1": "musubi-test-te1.safetensors", "text_encoder2": "musubi-test-te2.safetensors"}
    fake = {slot: name for slot, name in fake.items() if slots is None or slot in slots}
    for node in prompt.values():
        inputs = node["inputs"]
        for slot, name in fake.items():
            if slot in inputs and inputs[slot] == "(none)":
                inputs[slot] = name
        for key, value in widgets.items():
            if key in inputs:
                inputs[key] = value
    return prompt


def test_the_four_examples_run(comfy, comfy_dir, clips, record, unique, test_root):
    from musubi_pipe.comfy_adapter.export import ui_to_api

    def load(name):
        return ui_to_api(json.loads((EXAMPLES / f"{name}.json").read_text()))

    training = _fill(load("lora_training"), comfy_dir, media_folder=str(clips), name=unique, width=96, height=64,
                     target_frames="1, 9", max_train_epochs=2, base_folder=str(test_root / "work" / unique))
    outcome = comfy.run(training, timeout=240)
    assert outcome.ended == "execution_success", outcome.error()
    lora = f"musubi-pipe/{unique}/{unique}.safetensors"
    assert (comfy_dir / "models" / "loras" / lora).is_file()

    inference = _fill(load("inference_with_lora"), comfy_dir, lora_name=lora, width=96, height=64, video_length=9, infer_steps=2)
    outcome = comfy.run(inference, timeout=120)
    assert outcome.ended == "execution_success", outcome.error()
    assert outcome.outputs("2")["images"][0]["filename"].endswith(".mp4")

    conversion = _fill(load("format_conversion"), comfy_dir, lora_name=lora)
    outcome = comfy.run(conversion, timeout=120)
    assert outcome.ended == "execution_success", outcome.error()
    from musubi_pipe.tools.lora import detect_format

    converted = comfy_dir / "models" / "loras" / "musubi-pipe" / f"{unique}-comfyui.safetensors"
    assert detect_format(converted) == "comfyui"

    # The double's LoRAs have tiny tensors; merging checks real shapes, so merge two real-shaped ones.
    names = [f"musubi-pipe/{unique}-style{i}.safetensors" for i in (1, 2)]
    for i, name in enumerate(names):
        _real_shaped_lora(comfy_dir / "models" / "loras" / name, seed=i)
    # The merger serves every family: only the pipeline family's models may be set (HunyuanVideo merges need the DiT).
    merging = _fill(load("merge_loras"), comfy_dir, lora_name_1=names[0], lora_name_2=names[1],
                    output_name=f"{unique}-merged.safetensors")
    merging["2"]["inputs"]["model_paths"] = f"vae = {comfy_dir / 'models' / 'vae' / 'musubi-test-vae.safetensors'}"
    outcome = comfy.run(merging, timeout=120)
    assert outcome.ended == "execution_error"
    assert outcome.error()["exception_message"].startswith(
        "LoRA Merger (node 2): vae: HunyuanVideo does not use it here (merge); set vae to (none)"), outcome.error()
    merging = _fill(load("merge_loras"), comfy_dir, slots=("dit",), lora_name_1=names[0], lora_name_2=names[1],
                    output_name=f"{unique}-merged.safetensors")
    outcome = comfy.run(merging, timeout=120)
    assert outcome.ended == "execution_success", outcome.error()
    assert (comfy_dir / "models" / "loras" / "musubi-pipe" / f"{unique}-merged.safetensors").is_file()
    assert (comfy_dir / "models" / "diffusion_models" / "musubi-pipe" / f"{unique}-merged.safetensors").is_file()


def _real_shaped_lora(path: Path, seed: int) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    from musubi_pipe.tools.lora import target_modules

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, module in target_modules("wan", "t2v-1.3B").items():
        if ".0." in module.module:
            tensors[f"{name}.lora_down.weight"] = rng.standard_normal((2, module.in_features), dtype=np.float32) * 0.1
            tensors[f"{name}.lora_up.weight"] = rng.standard_normal((module.out_features, 2), dtype=np.float32) * 0.1
            tensors[f"{name}.alpha"] = np.array(1.0, dtype=np.float32)
    save_file(tensors, str(path), metadata={"modelspec.architecture": "wan2.1/lora"})


def test_a_workflow_saved_before_the_registry_nodes_loads_and_names_what_to_change(comfy, clips, record, unique, test_root):
    """The shipped training example as it was before family and task moved to Dataset Config (the
    generic cache nodes, task widgets everywhere). Its cache nodes still load (widget values by
    position, as the editor reads them); its trainer's widgets have changed since (the main
    settings on the node, the rest behind options and the config nodes), so ComfyUI refuses the
    old values and names the trainer's widgets; with a new trainer node and the task set on Dataset
    Config (the cache nodes' task disagrees and the error says so), it runs."""
    from musubi_pipe.comfy_adapter.export import _inputs, _is_widget, _widget_default, ui_to_api

    saved = json.loads((Path(__file__).parent / "saved" / "lora_training-before-registry.json").read_text())
    prompt = _fill(ui_to_api(saved), None, slots=("dit", "vae", "t5"), media_folder=str(clips), name=unique, width=96, height=64, target_frames="1, 9",
                   max_train_epochs=2, base_folder=str(test_root / "work" / unique))
    assert "family" not in prompt["1"]["inputs"] and prompt["2"]["class_type"] == "MusubiTuner_VAELatentCache"
    status, answer = comfy.post("/prompt", {"prompt": prompt})
    assert set(answer.get("node_errors", {})) == {"8"}, answer  # only the trainer: its widgets by position no longer fit
    assert record.read_text() == ""  # nothing ran

    trainer = prompt["8"]["inputs"]
    prompt["8"]["inputs"] = {n: _widget_default(spec) for n, spec, _ in _inputs("MusubiTuner_WanTrainer") if _is_widget(spec)}
    prompt["8"]["inputs"].update({k: v for k, v in trainer.items() if isinstance(v, list)})  # the links
    prompt["8"]["inputs"].update(dit="musubi-test-dit_bf16.safetensors", vae="musubi-test-vae.safetensors",
                                 t5="musubi-test-t5.safetensors", max_train_epochs=2)
    outcome = comfy.run(prompt, timeout=120)
    assert outcome.ended == "execution_error"
    message = outcome.error()["exception_message"]
    assert message.startswith("Memory Optimizer (node 7): task is t2v-1.3B here but the pipeline's task is t2v-14B "
                              "(chosen on Dataset Config)"), message
    assert record.read_text() == ""  # nothing ran
    prompt["1"]["inputs"]["task"] = "t2v-1.3B"
    outcome = comfy.run(prompt, timeout=240)
    assert outcome.ended == "execution_success", outcome.error()
    assert [json.loads(line)["script"] for line in record.read_text().splitlines()] == [
        "wan_cache_latents", "wan_cache_text_encoder_outputs", "wan_train_network"]
