"""The shipped example workflows: current, listed by ComfyUI's template browser, and runnable."""
from __future__ import annotations

import json
from pathlib import Path

from make_examples import REPO, all_edits, api_prompt, examples, rendered

EXAMPLES = REPO / "example_workflows"


def test_example_files_are_up_to_date():
    for name, text in rendered().items():
        assert (EXAMPLES / f"{name}.json").read_text() == text, f"run python tests/comfy/make_examples.py ({name})"


def test_examples_are_listed_as_templates(comfy):
    listed = comfy.get("/workflow_templates")
    assert sorted(listed["musubi-pipe"]) == sorted(examples())


# The test's stand-ins for the files a user downloads (tests/comfy/conftest.py puts them in the model folders).
MODELS = {"dit": "musubi-test-dit_bf16.safetensors", "vae": "musubi-test-vae.safetensors", "t5": "musubi-test-t5.safetensors",
          "text_encoder1": "musubi-test-te1.safetensors", "text_encoder2": "musubi-test-te2.safetensors"}


def user_edits(name: str, **values) -> dict[tuple[str, str], object]:
    """The edits the example's notes name, {(node id, widget): value}: models picked from MODELS,
    the rest from `values` (by the edit's test_value key)."""
    out = {}
    for edit in all_edits(examples()[name]):
        key = edit.test_value
        out[(edit.node, edit.widget)] = MODELS[key.split(":", 1)[1]] if key.startswith("model:") else values[key]
    return out


# Not an edit a user needs: a pipeline name no earlier test used, so each test's run starts fresh
# (LoRAs land in ComfyUI's shared loras folder). Everything else runs as shipped.
FRESH_NAME = {"lora_training": ("1", "name")}


def prepared(comfy, name: str, edits: dict, unique: str = "") -> dict:
    """The example as the editor queues it after the notes' edits (and, with `unique`, a fresh name)."""
    prompt = api_prompt(json.loads((EXAMPLES / f"{name}.json").read_text()), comfy.get("/object_info"))
    changes = {**edits, **({FRESH_NAME[name]: unique} if unique and name in FRESH_NAME else {})}
    for (node, widget), value in changes.items():
        assert widget in prompt[node]["inputs"], f"{name}: node {node} has no widget {widget}"
        prompt[node]["inputs"][widget] = value
    return prompt


def test_the_four_examples_run_after_the_edits_their_notes_name(comfy, comfy_dir, clips, record, unique):
    training = prepared(comfy, "lora_training", user_edits("lora_training", clips=str(clips)), unique)
    outcome = comfy.run(training, timeout=240)
    assert outcome.ended == "execution_success", outcome.error()
    lora = f"musubi-pipe/{unique}/{unique}.safetensors"
    assert (comfy_dir / "models" / "loras" / lora).is_file()
    assert outcome.outputs("8")["text"][0].endswith(f"{unique}.safetensors")  # "Your LoRA" shows its path

    edits = user_edits("inference_with_lora", lora=lora, prompt="a fox in the trained style")
    outcome = comfy.run(prepared(comfy, "inference_with_lora", edits), timeout=120)
    assert outcome.ended == "execution_success", outcome.error()
    assert outcome.outputs("2")["images"][0]["filename"].endswith(".mp4")

    outcome = comfy.run(prepared(comfy, "format_conversion", user_edits("format_conversion", lora=lora)), timeout=120)
    assert outcome.ended == "execution_success", outcome.error()
    from musubi_pipe.tools.lora import detect_format

    converted = comfy_dir / "models" / "loras" / "musubi-pipe" / f"{unique}-comfyui.safetensors"
    assert detect_format(converted) == "comfyui"

    # The double's LoRAs have tiny tensors; merging checks real shapes, so merge two real-shaped ones.
    names = [f"musubi-pipe/{unique}-style{i}.safetensors" for i in (1, 2)]
    for i, name in enumerate(names):
        _real_shaped_lora(comfy_dir / "models" / "loras" / name, seed=i)
    edits = user_edits("merge_loras", lora_1=names[0], lora_2=names[1], mixed=f"{unique}-mixed.safetensors",
                       merged=f"{unique}-merged.safetensors")
    # The merger serves every family: a model the family does not use here is refused, by name.
    vae = f"vae = {comfy_dir / 'models' / 'vae' / MODELS['vae']}"
    outcome = comfy.run(prepared(comfy, "merge_loras", {**edits, ("2", "model_paths"): vae}), timeout=120)
    assert outcome.ended == "execution_error"
    assert outcome.error()["exception_message"].startswith(
        "LoRA Merger (node 2): vae: HunyuanVideo does not use it here (merge); set vae to (none)"), outcome.error()
    outcome = comfy.run(prepared(comfy, "merge_loras", edits), timeout=120)
    assert outcome.ended == "execution_success", outcome.error()
    assert (comfy_dir / "models" / "loras" / "musubi-pipe" / f"{unique}-mixed.safetensors").is_file()
    assert (comfy_dir / "models" / "diffusion_models" / "musubi-pipe" / f"{unique}-merged.safetensors").is_file()


def test_an_unedited_example_names_the_widget_to_edit(comfy, record):
    """Queued as shipped, the training example fails before running anything, naming the edit its note asks for."""
    outcome = comfy.run(prepared(comfy, "lora_training", {}), timeout=60)
    assert outcome.ended == "execution_error"
    assert "media_folder" in outcome.error()["exception_message"], outcome.error()
    assert record.read_text() == ""


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
