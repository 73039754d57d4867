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

    # The copy in the loras folder deleted: the trainer node runs again (its IS_CHANGED notices) and
    # copies the final LoRA from the workdir again; nothing is retrained, and the loss chart is the
    # earlier run's (not an empty one).
    lora.unlink()
    prompt = wan_training(str(clips), unique, base_folder=base)
    prompt["8"] = {"class_type": "PreviewImage", "inputs": {"images": ["6", 3]}}
    third = comfy.run(prompt, timeout=180)
    assert third.ended == "execution_success", third.error()
    assert records(record) == []
    assert lora.is_file(), [m for m in third.messages if m.get("type") in ("execution_cached", "executing")]
    import numpy as np
    from PIL import Image

    from musubi_pipe.tools.monitor import TrainingStatus, draw_chart

    shown = third.outputs("8")["images"][0]
    chart = np.asarray(Image.open(comfy_dir.joinpath("temp", shown["subfolder"], shown["filename"])).convert("RGB"))
    assert chart.shape == (320, 640, 3) and not np.array_equal(chart, np.asarray(draw_chart(TrainingStatus(), 640, 320)))

    # The final LoRA deleted from the workdir: training runs again, caches stay skipped.
    next(Path(base).rglob(f"musubi-out/**/{unique}.safetensors")).unlink()
    fourth = comfy.run(wan_training(str(clips), unique, base_folder=base), timeout=180)
    assert fourth.ended == "execution_success", fourth.error()
    assert [r["script"] for r in records(record)] == ["wan_train_network"]


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


def _lora_picker(comfy) -> set[str]:
    """What ComfyUI's LoRA loader lists (folder_paths.get_filename_list("loras"))."""
    return set(comfy.get("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0])


def test_a_16_epoch_run_adds_one_lora_to_the_picker_and_keeps_the_rest_in_the_workdir(comfy, comfy_dir, clips, record,
                                                                                     unique, test_root):
    """Only the final LoRA goes to ComfyUI's loras folder; epoch checkpoints, states and samples
    stay in the workdir, the newest keep_checkpoints of them; the trainer's IMAGE outputs (loss
    chart, samples) feed Preview Image; its text ends with the LoRA's path."""
    before = _lora_picker(comfy)
    base = test_root / "work" / unique
    prompt = wan_training(str(clips), unique, epochs=16, save_every=1, save_state=True, keep=3, base_folder=str(base))
    prompt["7"]["inputs"]["sample_prompts"] = "a fox --w 96 --h 64 --f 9 --s 2 --d 7\na cat"
    prompt["8"] = {"class_type": "PreviewImage", "inputs": {"images": ["6", 3]}}
    prompt["9"] = {"class_type": "PreviewImage", "inputs": {"images": ["6", 4]}}
    messages: list = []
    outcome = comfy.run(prompt, timeout=600, on_message=messages.append)
    assert outcome.ended == "execution_success", outcome.error()
    assert _lora_picker(comfy) - before == {f"musubi-pipe/{unique}/{unique}.safetensors"}
    assert [p.name for p in (comfy_dir / "models" / "loras" / "musubi-pipe" / unique).iterdir()] == [f"{unique}.safetensors"]
    train = next(base.rglob(f"{unique}.safetensors")).parent  # the train step's output folder in the workdir
    kept = sorted(p.name for p in train.iterdir() if p.name.startswith(f"{unique}-") and p.suffix != ".json")
    assert kept == sorted([f"{unique}-{e:06d}{suffix}" for e in (13, 14, 15) for suffix in (".safetensors", "-state")]
                          + [f"{unique}-state"]), kept  # the newest 3 epochs' checkpoints and states, and the final state
    assert (train / "sample").is_dir()
    # per-sample settings reached musubi's prompt file
    argv = [r for r in records(record) if r["script"] == "wan_train_network"][0]["argv"]
    samples = json.loads(Path(argv[argv.index("--sample_prompts") + 1]).read_text())
    assert samples == [{"prompt": "a fox", "seed": 7, "width": 96, "height": 64, "frame_count": 9, "sample_steps": 2},
                       {"prompt": "a cat"}]
    # IMAGE outputs: the chart and the samples, previewed by core nodes
    assert len(outcome.outputs("8")["images"]) == 1 and len(outcome.outputs("9")["images"]) == 4  # the newest 4 samples
    texts = outcome.texts("6")
    assert texts[-1].endswith(f"done: musubi-pipe/{unique}/{unique}.safetensors"), texts[-3:]
    # the pack's websocket messages: bounded, each progress with what a chart needs
    events = [m["data"] for m in messages if m.get("type") == "musubi_pipe.event"]
    charts = [e["chart"] for e in events if "chart" in e]
    assert charts and all(e["node"] in ("2", "3", "6") for e in events)
    training = [c for c in charts if c["stage"] == "train" and c["phase"] == "training"]
    assert training[-1]["step"] == training[-1]["total"] and training[-1]["loss"] is not None and training[-1]["epoch"] == 16
    assert len(events) < 300

    # A second run with other settings replaces the copy this pack made; a user's file is kept.
    mine = comfy_dir / "models" / "loras" / "musubi-pipe" / unique / f"{unique}.safetensors"
    mine.write_bytes(b"the user's own file")
    prompt["6"]["inputs"]["learning_rate"] = "1e-4"
    outcome = comfy.run(prompt, timeout=600)
    assert outcome.ended == "execution_success", outcome.error()
    assert mine.read_bytes() == b"the user's own file"
    assert mine.with_name(f"{unique}-2.safetensors").is_file()
    assert "kept it, saved this one as" in outcome.texts("6")[-1]


def test_copy_to_loras_final_and_epochs_or_none(comfy, comfy_dir, clips, record, unique, test_root):
    folder = comfy_dir / "models" / "loras" / "musubi-pipe" / unique
    prompt = wan_training(str(clips), unique, epochs=3, save_every=1, copy="final + epochs",
                          base_folder=str(test_root / "work" / unique))
    outcome = comfy.run(prompt, timeout=240)
    assert outcome.ended == "execution_success", outcome.error()
    assert sorted(p.name for p in folder.iterdir()) == [f"{unique}-000001.safetensors", f"{unique}-000002.safetensors",
                                                        f"{unique}.safetensors"]
    name = unique + "-none"
    prompt = wan_training(str(clips), name, epochs=2, copy="none", base_folder=str(test_root / "work" / name))
    outcome = comfy.run(prompt, timeout=240)
    assert outcome.ended == "execution_success", outcome.error()
    assert not (folder.parent / name).exists()
    text = outcome.texts("6")[-1]  # what it trained with, then where the LoRA is (the workdir: nothing copied)
    assert text.startswith("settings: learning_rate 1e-4, max_train_epochs 2, network_dim 4, network_alpha 2, ") and \
        "discrete_flow_shift 3\n" in text, text
    assert text.endswith(f"done: {test_root}/work/{name}/musubi-out/{name}/train/{name}.safetensors"), text


def test_an_empty_media_folder_names_the_dataset_node_and_widget(comfy, clips, record, unique, test_root):
    prompt = wan_training("", unique, base_folder=str(test_root / "work" / unique))
    outcome = comfy.run(prompt, timeout=60)
    assert outcome.ended == "execution_error"
    message = outcome.error()["exception_message"]
    assert message.splitlines()[0] == ("Dataset Config (node 1): media_folder is empty — set it to your folder of clips or "
                                       "images (or give dataset_toml)"), message
    assert "[dataset]" not in message and "(+" not in message and record.read_text() == ""


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
    prompt["6"]["inputs"]["model_paths"] = f"dit = {clips / 'no-such-dit_bf16.safetensors'}"
    outcome = comfy.run(prompt, timeout=120)
    assert outcome.ended == "execution_error"
    message = outcome.error()["exception_message"]
    assert message.startswith("Wan LoRA Trainer (node 6): train:"), message
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
