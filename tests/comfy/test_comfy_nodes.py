"""Nodes queued in a real ComfyUI that the workflow tests do not reach: Dataset Viewer, Video
Input/Output, Batch Processor, Training Monitor, Resource Monitor, Memory Optimizer, and the
HunyuanVideo and FramePack trainers and generators (against the musubi-tuner test double)."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from test_comfy_server import records
from workflows import model_widgets, wan_training

RED = (210, 40, 40)  # tools.contact_sheet.FLAG_ERROR: the band of an item musubi cannot use
LOSS_BLUE = (30, 70, 160)  # tools.monitor.draw_chart: the smoothed loss curve
LR_ORANGE = (200, 90, 20)  # ... and the learning-rate curve


def ui_text(outcome, node: str) -> str:
    return "".join(outcome.outputs(node)["text"])


def saved_image(comfy_dir: Path, outcome, node: str):
    """The image a core SaveImage node wrote, as a uint8 array [H, W, 3]."""
    import numpy as np
    from PIL import Image

    saved = outcome.outputs(node)["images"][0]
    with Image.open(comfy_dir / saved["type"] / saved["subfolder"] / saved["filename"]) as im:
        return np.asarray(im.convert("RGB"))


def colour_pixels(image, colour, tolerance: int = 2) -> int:
    import numpy as np

    return int((np.abs(image.astype(int) - np.array(colour)).max(axis=-1) <= tolerance).sum())


def dataset_node(name: str, folder: str, base: Path, target_frames: str = "1, 9", family: str = "wan",
                 task: str = "(default)") -> dict:
    return {"class_type": "MusubiTuner_DatasetConfig", "inputs": {
        "name": name, "media_folder": folder, "width": 96, "height": 64, "target_frames": target_frames,
        "frame_extraction": "head", "caption_extension": ".txt", "batch_size": 1, "num_repeats": 1,
        "enable_bucket": False, "cache_folder": str(base / "cache"), "base_folder": str(base), "family": family, "task": task}}


# ------------------------------------------------------------------------------- data and IO


def test_dataset_viewer_makes_a_contact_sheet_and_flags_missing_captions(comfy, comfy_dir, test_root, unique):
    from media_factory import make_video

    media = test_root / "work" / unique / "media"
    make_video(media / "a_good.mp4", n=25, fps=16.0, width=96, height=64)
    (media / "a_good.txt").write_text("a captioned clip")
    make_video(media / "b_uncaptioned.mp4", n=25, fps=16.0, width=96, height=64)
    make_video(media / "c_short.mp4", n=5, fps=16.0, width=96, height=64)
    (media / "c_short.txt").write_text("a clip shorter than every target frame count")
    prompt = {
        "1": dataset_node(unique, str(media), test_root / "work" / unique, target_frames="9, 17"),
        "2": {"class_type": "MusubiTuner_DatasetViewer", "inputs": {"pipeline": ["1", 0], "family": "(from pipeline)", "max_items": 24, "columns": 3}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": f"musubi-test/{unique}-sheet"}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }
    outcome = comfy.run(prompt, timeout=120)
    assert outcome.ended == "execution_success", outcome.error()

    report = ui_text(outcome, "2")
    assert ui_text(outcome, "4") == report  # the report output says what the node shows
    lines = {line.strip().split(":")[0].lstrip("- "): line for line in report.splitlines() if line.strip().startswith("- ")}
    assert set(lines) == {"b_uncaptioned.mp4", "c_short.mp4"}, report
    assert "no caption" in lines["b_uncaptioned.mp4"]
    assert "too short" in lines["c_short.mp4"]
    assert "3 found" in report and "1 without caption" in report

    # The IMAGE output: one tile per item in name order, a red band on the two bad ones only.
    sheet = saved_image(comfy_dir, outcome, "3")
    width = sheet.shape[1] // 3
    red = [colour_pixels(sheet[:, k * width:(k + 1) * width], RED) for k in range(3)]
    assert red[0] < 50 and red[1] > 500 and red[2] > 500, red
    preview = outcome.outputs("2")["images"][0]  # and the same sheet shown on the node
    assert (comfy_dir / "temp" / preview["subfolder"] / preview["filename"]).is_file()


def test_video_input_to_video_output_round_trip(comfy, comfy_dir, test_root, unique):
    from media_factory import frame_index_of, make_video

    from musubi_pipe.tools.video import probe, read_frames

    source = make_video(test_root / "work" / unique / "source.mp4", n=24, fps=24.0, width=64, height=48)
    prompt = {
        "1": {"class_type": "MusubiTuner_VideoInput", "inputs": {"video": "(path)", "path": str(source), "start": 2,
                                                               "stride": 3, "count": 5, "fps": 0.0}},
        "2": {"class_type": "MusubiTuner_VideoOutput", "inputs": {"frames": ["1", 0], "fps": ["1", 1], "format": "mp4",
                                                                "filename_prefix": f"musubi-test/{unique}", "quality": 10}},
        "3": {"class_type": "MusubiTuner_VideoOutput", "inputs": {"frames": ["1", 0], "fps": ["1", 1], "format": "webm",
                                                                "filename_prefix": f"musubi-test/{unique}", "quality": 10}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["1", 2]}},
    }
    # CRF 10: frames stay identifiable by their colour after lossy encoding (VP9's default of 32
    # sometimes moved a frame's mean blue across the boundary to its neighbour's).
    outcome = comfy.run(prompt, timeout=120)
    assert outcome.ended == "execution_success", outcome.error()
    assert ui_text(outcome, "4") == "5"  # frame_count
    for node, suffix in (("2", ".mp4"), ("3", ".webm")):
        saved = outcome.outputs(node)["images"][0]
        path = comfy_dir / "output" / saved["subfolder"] / saved["filename"]
        assert path.suffix == suffix and path.is_file()
        info = probe(path)
        assert (info.frames, info.width, info.height) == (5, 64, 48)
        assert info.fps == pytest.approx(8.0)  # 24 fps taking every 3rd frame, passed on through the fps link
        frames = read_frames(path, dtype="uint8")
        assert [frame_index_of(f, 24) for f in frames] == [2, 5, 8, 11, 14]


def test_batch_processor_runs_many_prompts_in_one_generate_run(comfy, test_root, record, unique):
    prompt = {
        "0": dataset_node(unique, "", test_root / "work" / unique, task="t2v-1.3B"),
        "1": {"class_type": "MusubiTuner_BatchProcessor", "inputs": {"prompts": "a red fox\n\n  a blue bird \na green frog", "seed": 41}},
        "2": {"class_type": "MusubiTuner_WanGenerator", "inputs": {
            "pipeline": ["0", 0], "prompts": ["1", 0], "stage_name": "batch", "task": "(from pipeline)", "prompt": "ignored",
            "width": 96, "height": 64, "video_length": 9, "infer_steps": 2, "guidance_scale": 0.0, "flow_shift": 0.0,
            "seed": -1, "lora_name": "(none)", "lora_strength": 1.0, "options": "",
            **model_widgets("dit", "dit_high_noise", "vae", "t5", "clip", dit="musubi-test-dit_bf16.safetensors",
                            vae="musubi-test-vae.safetensors", t5="musubi-test-t5.safetensors")}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}},
    }
    outcome = comfy.run(prompt, timeout=120)
    assert outcome.ended == "execution_success", outcome.error()

    # one generate run (one model load) with a --from_file batch of the three prompts and their seeds
    runs = records(record)
    assert [r["script"] for r in runs] == ["wan_generate_video"]
    argv = runs[0]["argv"]
    assert "--prompt" not in argv
    lines = Path(argv[argv.index("--from_file") + 1]).read_text().splitlines()
    parsed = [(line.split(" --")[0], shlex.split(line.split(" --d ")[1])[0]) for line in lines]
    assert parsed == [("a red fox", "41"), ("a blue bird", "42"), ("a green frog", "43")]

    # Each prompt gets its own video, matched by the seed in musubi's file name.
    paths = ui_text(outcome, "3").split("\n")
    assert len(paths) == 3 and len(set(paths)) == 3
    for path, seed in zip(paths, ("41", "42", "43")):
        assert path.endswith(f"_{seed}.mp4") and Path(path).is_file()
    shown = ui_text(outcome, "2").splitlines()
    assert [line.split(" -> ")[0] for line in shown] == ["1. a red fox", "2. a blue bird", "3. a green frog"]


# ------------------------------------------------------------------------------ monitors


def _progress_events(path: Path, steps: range, total: int) -> None:
    from musubi_pipe.executors.events import Event

    with open(path, "a") as f:
        for i in steps:
            e = Event("progress", step="train", time=1000.0 + i, phase="training", current=i, total=total,
                      epoch=1 + i // 50, epochs=2, loss=1.0 / (1 + 0.05 * i), rate=2.0, eta_s=(total - i) / 2.0)
            f.write(json.dumps(e.to_dict()) + "\n")


def test_training_monitor_charts_events_and_tensorboard_logs(comfy, comfy_dir, test_root, unique):
    from musubi_pipe.tools.monitor import EventFileWriter

    root = test_root / "work" / unique
    run = root / "runs" / "20250101-000000"
    run.mkdir(parents=True)
    _progress_events(run / "events.jsonl", range(1, 31), total=100)
    tb = root / "logs" / "network20250101000000" / "events.out.tfevents.1.test"
    writer = EventFileWriter(tb)
    for step in range(1, 51):
        writer.add_scalars(step, {"loss/current": 0.5 + 0.5 / step, "lr/unet": 1e-4 * step / 50}, wall_time=2000.0 + step)
    writer.close()
    (root / "empty").mkdir()

    def prompt():
        out = {}
        for n, folder in enumerate((run, tb.parent.parent, root / "empty")):
            out[f"{n}1"] = {"class_type": "MusubiTuner_TrainingMonitor", "inputs": {"run_folder": str(folder), "smoothing": 0.6}}
            out[f"{n}2"] = {"class_type": "SaveImage", "inputs": {"images": [f"{n}1", 0], "filename_prefix": f"musubi-test/{unique}-{n}"}}
        return out

    outcome = comfy.run(prompt(), timeout=120)
    assert outcome.ended == "execution_success", outcome.error()
    events, logs, empty = (saved_image(comfy_dir, outcome, f"{n}2") for n in range(3))
    assert events.shape == (400, 800, 3)
    status = ui_text(outcome, "01")
    assert "step 30/100" in status and "ETA 0:35" in status, status
    assert "step 50" in ui_text(outcome, "11") and "lr 0.0001" in ui_text(outcome, "11")
    assert colour_pixels(events, LOSS_BLUE) > 300 and colour_pixels(events, LR_ORANGE) == 0
    assert colour_pixels(logs, LOSS_BLUE) > 300 and colour_pixels(logs, LR_ORANGE) > 100
    assert colour_pixels(empty, LOSS_BLUE) == 0 and colour_pixels(empty, LR_ORANGE) == 0

    # The run goes on: queued again, the monitor reads what was appended (it never serves a cached chart).
    _progress_events(run / "events.jsonl", range(31, 61), total=100)
    again = comfy.run(prompt(), timeout=120)
    assert again.ended == "execution_success", again.error()
    assert "step 60/100" in ui_text(again, "01")

    missing = comfy.run({"1": {"class_type": "MusubiTuner_TrainingMonitor",
                               "inputs": {"run_folder": str(root / "nope"), "smoothing": 0.6}}}, timeout=60)
    assert missing.ended == "execution_error"
    assert "no such run folder" in missing.error()["exception_message"]


def test_resource_monitor_reports_the_gpu_or_why_there_is_none(comfy):
    from musubi_pipe.tools.resources import gpu_report

    outcome = comfy.run({"1": {"class_type": "MusubiTuner_ResourceMonitor",
                               "inputs": {"refresh": True, "family": "wan", "task": "t2v-14B"}}}, timeout=60)
    assert outcome.ended == "execution_success", outcome.error()
    text = ui_text(outcome, "1")
    report = gpu_report()  # this machine, as the server sees it
    if not report.available:
        assert text == report.message
        assert "NVIDIA" in text
    else:
        for gpu in report.gpus:
            assert f"GPU {gpu.index} {gpu.name}:" in text and "busy" in text
        assert "advice: wan t2v-14B" in text


# ------------------------------------------------------------------------ memory optimizer


def _memory_node(pipeline: list | None, **widgets) -> dict:
    inputs = {"family": "(from pipeline)", "task": "(from pipeline)", "use_detected_gpu": False, "gpu_memory_gib": 24.0,
              "resolution": "", "frames": 0, "batch_size": 0, "network_dim": 4, "allow_fp8": True, **widgets}
    if pipeline:
        inputs["pipeline"] = pipeline
    return {"class_type": "MusubiTuner_MemoryOptimizer", "inputs": inputs}


def _wan_with_memory(clips, unique, test_root, task: str, memory: dict) -> dict:
    prompt = wan_training(str(clips), unique, base_folder=str(test_root / "work" / unique))
    prompt["1"]["inputs"]["task"] = task  # chosen once; the other nodes read it from the pipeline
    prompt["8"] = memory
    prompt["6"]["inputs"]["memory_config"] = ["8", 0]
    prompt["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["8", 1]}}
    return prompt


def _train_argv(record: Path) -> list[str]:
    return next(r["argv"] for r in records(record) if r["script"] == "wan_train_network")


def test_memory_optimizer_24gb_wan_14b_sets_fp8_and_block_swap_on_the_trainer(comfy, clips, record, unique, test_root):
    from musubi_pipe.tools.memory import plan_memory

    memory = _memory_node(["3", 0], gpu_memory_gib=24.0, resolution="832x480", frames=33)
    outcome = comfy.run(_wan_with_memory(clips, unique, test_root, "t2v-14B", memory), timeout=180)
    assert outcome.ended == "execution_success", outcome.error()
    expected = plan_memory("wan", "t2v-14B", 24.0, (832, 480), 33, 1, 4)
    swap = expected.chosen.settings.blocks_to_swap
    assert expected.chosen.settings.fp8 and swap > 0

    argv = _train_argv(record)
    assert "--fp8_base" in argv and "--fp8_scaled" in argv and "--gradient_checkpointing" in argv
    assert argv[argv.index("--blocks_to_swap") + 1] == str(swap)
    # the planner's explanation: on the node, as progress text, and on the explanation output
    text = ui_text(outcome, "8")
    assert ui_text(outcome, "9") == text and text in outcome.texts("8")
    assert text.startswith("memory: 24 GiB from gpu_memory_gib (use_detected_gpu is off)")
    assert "Wan 2.1 T2V 14B" in text and f"blocks_to_swap: {swap}: the fewest blocks" in text


def test_memory_optimizer_80gb_wan_1_3b_turns_gradient_checkpointing_off(comfy, clips, record, unique, test_root):
    from musubi_pipe.tools.memory import plan_memory, tokens_for
    from musubi_pipe.tools.resources import gpu_report

    # family, task and the sample size come from the pipeline (96x64, up to 9 frames)
    memory = _memory_node(["3", 0], gpu_memory_gib=80.0, use_detected_gpu=True)
    prompt = _wan_with_memory(clips, unique, test_root, "t2v-1.3B", memory)
    assert prompt["4"]["inputs"]["gradient_checkpointing"] is True  # the Training Config says on
    outcome = comfy.run(prompt, timeout=180)
    assert outcome.ended == "execution_success", outcome.error()
    text = ui_text(outcome, "8")
    report = gpu_report()
    if report.available:
        pytest.skip("a GPU is present: the plan follows its free memory, not the 80 GiB asked for")
    assert text.startswith(f"memory: 80 GiB from gpu_memory_gib ({report.message})")
    assert f"{tokens_for(96, 64, 9):,} tokens" in text
    assert "gradient_checkpointing: off" in text
    assert not plan_memory("wan", "t2v-1.3B", 80.0, (96, 64), 9, 1, 4).chosen.settings.gradient_checkpointing

    argv = _train_argv(record)
    assert "--gradient_checkpointing" not in argv
    assert not {"--fp8_base", "--fp8_scaled", "--blocks_to_swap"} & set(argv)


def test_memory_optimizer_errors_are_one_line(comfy):
    def alone(node: dict) -> dict:
        return {"1": node, "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}

    outcome = comfy.run(alone(_memory_node(None)), timeout=60)
    assert outcome.ended == "execution_error"
    assert "no pipeline with a family is connected" in outcome.error()["exception_message"]
    outcome = comfy.run(alone(_memory_node(None, family="wan", task="t2v-14B", gpu_memory_gib=8.0, resolution="1920x1080",
                                           frames=81)), timeout=60)
    assert outcome.ended == "execution_error"
    message = outcome.error()["exception_message"]
    assert "needs about" in message and "fix:" in message and "\n" not in message.strip()


# ------------------------------------------------- HunyuanVideo and FramePack: same as the plan

MODELS = {"dit": ("diffusion_models", "musubi-test-dit_bf16.safetensors"), "vae": ("vae", "musubi-test-vae.safetensors"),
          "text_encoder1": ("text_encoders", "musubi-test-te1.safetensors"),
          "text_encoder2": ("text_encoders", "musubi-test-te2.safetensors"),
          "image_encoder": ("clip_vision", "musubi-test-siglip.safetensors")}
FAMILY = {"hunyuan_video": ("HunyuanVideo", ("dit", "vae", "text_encoder1", "text_encoder2"), None),
          "framepack": ("FramePack", ("dit", "vae", "text_encoder1", "text_encoder2", "image_encoder"), "i2v")}


def _family_workflow(family: str, name: str, clips: Path, base: Path) -> dict:
    title, slots, task = FAMILY[family]
    picked = {slot: MODELS[slot][1] for slot in slots}
    task_widget = {"task": task} if task else {}
    latent_slots = ("vae", "image_encoder") if family == "framepack" else ("vae",)
    prompt = {
        "1": dataset_node(name, str(clips), base, family=family, task=task or "(default)"),
        "2": {"class_type": f"MusubiTuner_{title}LatentCache", "inputs": {
            "pipeline": ["1", 0], "stage_name": "cache_latents", "batch_size": 0, "vae_tiling": family == "hunyuan_video",
            **model_widgets(*latent_slots, **picked)}},
        "3": {"class_type": f"MusubiTuner_{title}TextEncoderCache", "inputs": {
            "pipeline": ["2", 0], "stage_name": "cache_text_encoder", "batch_size": 0,
            "fp8_text_encoder": False, **model_widgets("text_encoder1", "text_encoder2", **picked)}},
        "4": {"class_type": "MusubiTuner_TrainingConfig", "inputs": {
            "network_dim": 4, "network_alpha": 2.0, "learning_rate": 1e-4, "max_train_epochs": 2, "max_train_steps": 0,
            "save_every_n_epochs": 1, "save_every_n_steps": 0, "save_state": False, "seed": 1, "gradient_checkpointing": True}},
        "5": {"class_type": "MusubiTuner_OptimizerConfig", "inputs": {
            "optimizer_type": "adamw8bit", "custom_optimizer": "", "optimizer_args": "", "lr_scheduler": "constant",
            "lr_warmup_steps": 0, "max_grad_norm": 0.0}},
        "6": {"class_type": f"MusubiTuner_{title}Trainer", "inputs": {
            "pipeline": ["3", 0], "stage_name": "train", "learning_rate": "1e-4", "max_train_epochs": 2, "network_dim": 4,
            "memory_preset": "family template", "copy_to_loras": "none", "keep_checkpoints": 0, "options": 'attention = "sdpa"',
            "training_config": ["4", 0], "optimizer_config": ["5", 0],
            **model_widgets(*slots, **picked)}},
        "7": {"class_type": f"MusubiTuner_{title}Generator", "inputs": {
            "pipeline": ["6", 0], "lora": ["6", 1], "stage_name": "generate", "prompt": "a lighthouse at dusk",
            "width": 96, "height": 64, "infer_steps": 2, "guidance_scale": 0.0, "flow_shift": 0.0, "seed": 5,
            "lora_name": "(none)", "lora_strength": 0.8, "options": "", **task_widget, **model_widgets(*slots),
            # the length widget the family's script takes: FramePack's is in seconds
            **({"video_seconds": 1.0} if family == "framepack" else {"video_length": 9})}},
        "8": {"class_type": "SaveVideo", "inputs": {"video": ["7", 0], "filename_prefix": f"musubi-test/{name}",
                                                    "format": "auto", "codec": "auto"}},
    }
    if family == "framepack":  # a start image from the first clip's first frame
        prompt["9"] = {"class_type": "MusubiTuner_VideoInput", "inputs": {"video": "(path)", "path": str(clips / "clip0.mp4"),
                                                                        "start": 0, "stride": 1, "count": 1, "fps": 0.0}}
        prompt["7"]["inputs"]["image"] = ["9", 0]
    return prompt


def _family_pipeline(family: str, name: str, clips: Path, base: Path, comfy_dir: Path, image: str | None) -> str:
    """The pipeline file that says what the workflow above says."""
    _, slots, task = FAMILY[family]
    models = "\n".join(f'{slot} = "{comfy_dir / "models" / MODELS[slot][0] / MODELS[slot][1]}"' for slot in slots)
    generate = ('video_length = 9\n' if family == "hunyuan_video" else f'video_seconds = 1.0\nimage_path = "{image}"\n')
    return f"""
name = "{name}"
family = "{family}"
{f'task = "{task}"' if task else ""}

[models]
{models}

[dataset.general]
resolution = [96, 64]
caption_extension = ".txt"
batch_size = 1
num_repeats = 1
enable_bucket = false

[[dataset.datasets]]
video_directory = "{clips}"
cache_directory = "{base / 'cache'}"
target_frames = [1, 9]
frame_extraction = "head"

[stages.cache_latents]
kind = "cache_latents"

[stages.cache_text_encoder]
kind = "cache_text_encoder"

[stages.train]
kind = "train"
network_dim = 4
network_alpha = 2.0
learning_rate = 1e-4
max_train_epochs = 2
save_every_n_epochs = 1
save_state = false
seed = 1
gradient_checkpointing = true
optimizer_type = "adamw8bit"
attention = "sdpa"

[stages.generate]
kind = "generate"
prompt = "a lighthouse at dusk"
video_size = [64, 96]
infer_steps = 2
seed = 5
loras = [{{ path = "@train.lora", multiplier = 0.8 }}]
{generate}"""


@pytest.mark.parametrize("family", ["hunyuan_video", "framepack"])
def test_trainer_and_generator_run_the_plans_commands(family, comfy, comfy_dir, clips, record, unique, test_root):
    import numpy as np
    from PIL import Image

    from musubi_pipe.compiler.build import compile_file
    from musubi_pipe.tools.video import probe, read_frames

    base = test_root / "work" / unique
    outcome = comfy.run(_family_workflow(family, unique, clips, base), timeout=240)
    assert outcome.ended == "execution_success", outcome.error()
    ran = records(record)
    image = None
    if family == "framepack":  # the IMAGE input reached musubi as a PNG of that frame
        generate = next(r["argv"] for r in ran if r["script"] == "fpack_generate_video")
        image = generate[generate.index("--image_path") + 1]
        with Image.open(image) as im:
            got = np.asarray(im.convert("RGB"), dtype=float)
        assert np.abs(got - read_frames(clips / "clip0.mp4", count=1, dtype="uint8")[0]).mean() < 1.5

    path = base / "pipeline.toml"
    path.write_text(_family_pipeline(family, unique, clips, base, comfy_dir, image))
    plan = compile_file(path)
    assert [s.kind for s in plan.steps] == ["cache_latents", "cache_text_encoder", "train", "generate"]
    assert sorted((r["script"] + ".py", r["argv"]) for r in ran) == sorted((s.script, s.args) for s in plan.steps)

    saved = outcome.outputs("8")["images"][0]  # the generated video reached Save Video
    assert probe(comfy_dir / "output" / saved["subfolder"] / saved["filename"]).frames >= 1


# ----------------------------------------------------------- image families: an IMAGE batch

IMAGE_MODELS = {"dit": "musubi-test-dit_bf16.safetensors", "vae": "musubi-test-vae.safetensors",
                "text_encoder": "musubi-test-te1.safetensors"}


@pytest.mark.parametrize("family, task, pictures", [("zimage", None, 1), ("qwen_image", "layered", 5)])
def test_image_generator_returns_an_image_batch_to_save_and_preview(family, task, pictures, comfy, comfy_dir, test_root,
                                                                     record, unique):
    """An image family's generator: image_size from width and height, a control IMAGE saved as a
    PNG for musubi (Layered splits it into layers), and every picture the run made as one IMAGE
    batch into core Save Image and Preview Image, with the layers' transparency as the MASK."""
    from PIL import Image

    from musubi_pipe.pipelines import registry

    fam = registry.family(family)
    generator = {"class_type": f"MusubiTuner_{fam.comfy_name}Generator", "inputs": {
        "pipeline": ["0", 0], "stage_name": "generate", "prompt": "a red apple on a table", "width": 96, "height": 64,
        "infer_steps": 2, "guidance_scale": 0.0, "flow_shift": 0.0, "seed": 5, "lora_name": "(none)", "lora_strength": 1.0,
        "options": "", **({"task": "(from pipeline)"} if task else {}), **model_widgets("dit", "vae", "text_encoder", **IMAGE_MODELS)}}
    prompt = {
        "0": dataset_node(unique, "", test_root / "work" / unique, family=family, task=task or "(default)"),
        "1": generator,
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": f"musubi-test/{unique}"}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["1", 2]}},
        "5": {"class_type": "MaskToImage", "inputs": {"mask": ["1", 3]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": f"musubi-test/{unique}-mask"}},
    }
    if task:  # the picture to split: a control image from core Empty Image
        prompt["7"] = {"class_type": "EmptyImage", "inputs": {"width": 48, "height": 32, "batch_size": 1, "color": 0x3366CC}}
        generator["inputs"]["control_image"] = ["7", 0]
    outcome = comfy.run(prompt, timeout=120)
    assert outcome.ended == "execution_success", outcome.error()

    runs = records(record)
    assert [r["script"] for r in runs] == [fam.stages["generate"].script.removesuffix(".py")]
    argv = runs[0]["argv"]
    assert argv[argv.index("--image_size") + 1:argv.index("--image_size") + 3] == ["64", "96"]
    assert "--video_size" not in argv and "--video_length" not in argv
    if task:
        control = argv[argv.index("--control_image_path") + 1]
        with Image.open(control) as im:
            assert im.size == (48, 32) and im.convert("RGB").getpixel((5, 5)) == (0x33, 0x66, 0xCC)

    saved = outcome.outputs("2")["images"]
    shown = outcome.outputs("3")["images"]
    assert len(saved) == len(shown) == pictures
    colour = (5 * 37 % 256, 5 * 91 % 256, 5 * 13 % 256)  # the double paints the seed's colour
    for entry in saved:
        with Image.open(comfy_dir / "output" / entry["subfolder"] / entry["filename"]) as im:
            assert im.size == (96, 64) and im.convert("RGB").getpixel((3, 3)) == colour
    paths = "".join(outcome.outputs("4")["text"]).split("\n")
    assert len(paths) == pictures and all(p.endswith("_5_000.png") and Path(p).is_file() for p in paths)
    if task:  # one file per layer, in layer order
        assert [Path(p).name.split("_")[1] for p in paths] == [f"layer{i}" for i in range(pictures)]
    masks = outcome.outputs("6")["images"]  # 1 - alpha: the double's layers get more transparent
    alpha = [255 - 40 * i for i in range(pictures)] if task else [255]
    assert len(masks) == pictures
    for entry, a in zip(masks, alpha):
        with Image.open(comfy_dir / "output" / entry["subfolder"] / entry["filename"]) as im:
            assert abs(im.convert("L").getpixel((3, 3)) - (255 - a)) <= 1
