"""The node pack inside a real ComfyUI (started by .ci/comfyui.sh) against the musubi-tuner test double."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from workflows import model_widgets, wan_training

from musubi_pipe.pipelines import registry

# One cache pair, trainer and generator per registry family: a new family file adds its nodes.
FAMILY_NODES = {f"MusubiTuner_{fam.comfy_name}{suffix}" for fam in registry.families()
                for suffix in ("LatentCache", "TextEncoderCache", "Trainer", "Generator")}
PACK_NODES = FAMILY_NODES | {
    "MusubiTuner_DatasetConfig", "MusubiTuner_DatasetViewer", "MusubiTuner_DatasetCheck", "MusubiTuner_VAELatentCache", "MusubiTuner_TextEncoderCache",
    "MusubiTuner_TrainingConfig", "MusubiTuner_OptimizerConfig", "MusubiTuner_SamplingConfig",
    "MusubiTuner_FormatConverter", "MusubiTuner_LoRAMerger", "MusubiTuner_LoRAWeightedMerge", "MusubiTuner_PostHocEMA",
    "MusubiTuner_LoRAMergeStage",
    "MusubiTuner_VideoInput", "MusubiTuner_VideoOutput", "MusubiTuner_BatchProcessor",
    "MusubiTuner_MemoryOptimizer", "MusubiTuner_TrainingMonitor", "MusubiTuner_ResourceMonitor", "MusubiTuner_NewPipeline",
}


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_every_node_is_registered_with_descriptions_and_tooltips(comfy):
    info = comfy.get("/object_info")
    ours = {name: spec for name, spec in info.items() if name.startswith("MusubiTuner_")}
    assert set(ours) == PACK_NODES
    for name, spec in ours.items():
        assert spec["category"].startswith("MusubiTuner/"), name
        assert spec["description"], name
        for section in ("required", "optional"):
            for input_name, value in spec["input"].get(section, {}).items():
                assert value[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
    for fam in registry.families():  # a generator gives what its family makes
        generator = ours[f"MusubiTuner_{fam.comfy_name}Generator"]
        assert generator["output"][0] == {"video": "VIDEO", "image": "IMAGE"}[fam.output], fam.name
        if fam.output == "image":  # a picture's size, no video length
            assert {"width", "height"} <= set(generator["input"]["required"]), fam.name
            assert not {"video_length", "video_seconds"} & set(generator["input"]["required"]), fam.name


def test_training_workflow_runs_reports_progress_and_lands_in_loras(comfy, comfy_dir, clips, record, unique, test_root):
    base = str(test_root / "work" / unique)
    outcome = comfy.run(wan_training(str(clips), unique, base_folder=base), timeout=180)
    assert outcome.ended == "execution_success", outcome.error()
    scripts = [r["script"] for r in records(record)]
    assert scripts == ["wan_cache_latents", "wan_cache_text_encoder_outputs", "wan_train_network"]
    lora = comfy_dir / "models" / "loras" / "musubi-pipe" / unique / f"{unique}.safetensors"
    assert lora.is_file()
    bar = outcome.progress("6")
    assert bar and bar[-1][0] == bar[-1][1]  # the trainer's bar reached its end
    texts = outcome.texts("6")
    assert any("training" in t and "loss" in t and "ETA" in t for t in texts), texts[-3:]

    # samples made during training are shown on the node
    samples = outcome.outputs("6")["images"]
    assert samples and all(s["type"] == "temp" for s in samples)
    assert comfy_dir.joinpath("temp", samples[0]["subfolder"], samples[0]["filename"]).is_file()

    # Unchanged and queued again: ComfyUI serves the cached result; nothing runs.
    record.write_text("")
    again = comfy.run(wan_training(str(clips), unique, base_folder=base), timeout=60)
    assert again.ended == "execution_success"
    assert records(record) == []
    cached = [m for m in again.messages if m.get("type") == "execution_cached"]
    assert "6" in cached[0]["data"]["nodes"]

    # The LoRA deleted: the trainer node runs again (its IS_CHANGED notices), caches stay skipped.
    lora.unlink()
    third = comfy.run(wan_training(str(clips), unique, base_folder=base), timeout=180)
    assert third.ended == "execution_success", third.error()
    assert [r["script"] for r in records(record)] == ["wan_train_network"]
    assert lora.is_file()


def test_generator_returns_a_video_that_save_video_accepts(comfy, comfy_dir, test_root, record, unique):
    start = wan_training("", unique, base_folder=str(test_root / "work" / unique))["1"]
    prompt = {
        "0": start,
        "1": {"class_type": "MusubiTuner_WanGenerator", "inputs": {"pipeline": ["0", 0],
            "stage_name": "generate", "task": "t2v-1.3B", "prompt": "a red fox in snow", "width": 96, "height": 64,
            "video_length": 9, "infer_steps": 2, "guidance_scale": 0.0, "flow_shift": 0.0, "seed": 7,
            "lora_name": "(none)", "lora_strength": 1.0, "options": "",
            **model_widgets("dit", "dit_high_noise", "vae", "t5", "clip", dit="musubi-test-dit_bf16.safetensors",
                            vae="musubi-test-vae.safetensors", t5="musubi-test-t5.safetensors")}},
        "2": {"class_type": "SaveVideo", "inputs": {"video": ["1", 0], "filename_prefix": "musubi-test/fox",
                                                    "format": "auto", "codec": "auto"}},
    }
    outcome = comfy.run(prompt, timeout=120)
    assert outcome.ended == "execution_success", outcome.error()
    assert [r["script"] for r in records(record)] == ["wan_generate_video"]
    cached = [m["data"]["nodes"] for m in outcome.messages if m.get("type") == "execution_cached"]
    assert "images" in outcome.outputs("2"), (cached, outcome.history.get("outputs"))
    saved = outcome.outputs("2")["images"][0]
    video = comfy_dir / "output" / saved["subfolder"] / saved["filename"]
    from musubi_pipe.tools.video import probe

    assert probe(video).frames >= 1


def test_bad_settings_fail_with_one_line_cause_and_fix(comfy, clips, record, unique, test_root):
    prompt = wan_training(str(clips), unique, base_folder=str(test_root / "work" / unique))
    prompt["5"]["inputs"]["optimizer_type"] = "custom"  # and no class path given
    outcome = comfy.run(prompt, timeout=60)
    assert outcome.ended == "execution_error"
    error = outcome.error()
    assert error["node_id"] == "5"
    assert "custom_optimizer is empty" in error["exception_message"]
    assert "\n" not in error["exception_message"].strip()


def test_musubi_failure_shows_the_executors_cause(comfy, clips, record, unique, test_root):
    prompt = wan_training(str(clips), unique, base_folder=str(test_root / "work" / unique))
    prompt["6"]["inputs"]["dit"] = "(none)"
    prompt["6"]["inputs"]["dit_path"] = str(clips / "no-such-dit_bf16.safetensors")
    outcome = comfy.run(prompt, timeout=120)
    assert outcome.ended == "execution_error"
    message = outcome.error()["exception_message"]
    assert message.startswith("train:"), message
    assert "no-such-dit" in message and "fix:" in message, message


def _musubi_processes(double_dir: str) -> list:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(double_dir in part for part in (p.info["cmdline"] or [])):
                found.append(p)
        except psutil.Error:
            pass
    return found


def test_cancel_stops_every_process_and_reports_cancelled(comfy, clips, record, test_root, unique):
    double_dir = str(test_root / "musubi-tuner")
    prompt = wan_training(str(clips), unique, base_folder=str(test_root / "work" / unique), epochs=100000, save_every=0)
    started = threading.Event()

    def watch(msg):  # training runs and its live loss chart arrived as a preview image (binary kinds 1, 4)
        if msg.get("type") == "binary" and msg["kind"] in (1, 4):
            started.set()

    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("o", comfy.run(prompt, timeout=120, on_message=watch)))
    thread.start()
    assert started.wait(90), "no loss chart preview while training"
    assert _musubi_processes(double_dir), "no musubi process while training"
    t0 = time.monotonic()
    assert comfy.post("/interrupt")[0] == 200
    while _musubi_processes(double_dir) and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    gone_after = time.monotonic() - t0
    thread.join(60)
    assert not _musubi_processes(double_dir)
    assert gone_after < 10
    assert result["o"].ended == "execution_interrupted"
