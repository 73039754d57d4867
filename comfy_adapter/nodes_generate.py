"""Generator nodes: one per family; run musubi's generate script and return a ComfyUI VIDEO."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

from .base import (LORA, NONE, PIPELINE, NodeError, StageNode, build_stage, finish_stage, full_path, lora_picker,
                   lora_value, model_inputs, set_if, stage_inputs, start_pipeline, step_files, task_choices, tip)
from .nodes_train import MEMORY_CONFIG, memory_fields

PROMPTS = "MUSUBI_PROMPTS"
VIDEO_SUFFIXES = (".mp4", ".webm")


def video_from_file(path: str):
    """A ComfyUI VIDEO of a file; the core SaveVideo node remuxes it without re-encoding."""
    try:
        from comfy_api.input_impl import VideoFromFile
    except ImportError:  # newer ComfyUI keeps it only under comfy_api.latest
        from comfy_api.latest import InputImpl

        VideoFromFile = InputImpl.VideoFromFile
    return VideoFromFile(path)


def save_image(image) -> str:
    """An IMAGE input as a PNG in ComfyUI's temp folder, named by its content so that the same
    picture gives the same pipeline (and so the same fingerprint)."""
    import numpy as np
    from PIL import Image

    import folder_paths

    from ..tools.contact_sheet import save_png

    array = (image[0].cpu().numpy() * 255.0).clip(0, 255).astype(np.uint8)
    digest = hashlib.sha256(array.tobytes()).hexdigest()[:16]
    path = Path(folder_paths.get_temp_directory()) / "musubi-pipe" / f"image-{digest}.png"
    if not path.exists():
        save_png(Image.fromarray(array), path)
    return str(path)


class _Generator(StageNode):
    FAMILY = ""
    SLOTS: tuple[str, ...] = ()
    IMAGE = False
    CATEGORY = "MusubiTuner/Generate"
    RETURN_TYPES = ("VIDEO", PIPELINE, "STRING")
    RETURN_NAMES = ("video", "pipeline", "video_paths")
    OUTPUT_TOOLTIPS = ("the generated video (connect Save Video)", "the pipeline with this stage", "every video file made, one per line; with a Batch Processor, one line per prompt in its order (empty where a prompt made none)")

    @classmethod
    def INPUT_TYPES(cls):
        required, optional, hidden = stage_inputs("generate", pipeline_required=False)
        tasks = task_choices(cls.FAMILY)
        if tasks:
            required["task"] = (tasks, {"default": tasks[0], "tooltip": "what to generate"})
        required.update(model_inputs(*cls.SLOTS))
        required["prompt"] = tip("STRING", "what the video shows (ignored when a Batch Processor is connected)", multiline=True, default="")
        required["width"] = tip("INT", "video width (0 = the family's default)", default=0, min=0, max=4096, step=16)
        required["height"] = tip("INT", "video height (0 = the family's default)", default=0, min=0, max=4096, step=16)
        required["video_length"] = tip("INT", "frames, 4*N+1 (0 = the family's default)", default=0, min=0, max=1025)
        required["infer_steps"] = tip("INT", "denoising steps (0 = the family's default)", default=0, min=0, max=200)
        required["guidance_scale"] = tip("FLOAT", "guidance scale (0 = the family's default)", default=0.0, min=0.0, max=30.0, step=0.1)
        required["flow_shift"] = tip("FLOAT", "flow shift (0 = the family's default)", default=0.0, min=0.0, max=100.0, step=0.1)
        required["seed"] = tip("INT", "seed (-1 = random)", default=-1, min=-1, max=2**31 - 1, control_after_generate=False)
        required["lora_name"] = lora_picker()
        required["lora_strength"] = tip("FLOAT", "multiplier of the picked or connected LoRA", default=1.0, min=-5.0, max=5.0, step=0.05)
        optional.update({
            "lora": (LORA, {"tooltip": "a LoRA from a trainer, converter or EMA node"}),
            "prompts": (PROMPTS, {"tooltip": "many prompts in one run (from Batch Processor)"}),
            "memory_config": (MEMORY_CONFIG, {"tooltip": "from Memory Optimizer"}),
        })
        if cls.IMAGE:
            optional["image"] = ("IMAGE", {"tooltip": "start image (image-to-video)"})
            optional["end_image"] = ("IMAGE", {"tooltip": "end image (FLF2V, FramePack end frame)"})
        return {"required": required, "optional": optional, "hidden": hidden}

    def run(self, prompt, width, height, video_length, infer_steps, guidance_scale, flow_shift, seed, lora_name,
            lora_strength, unique_id=None, task=None, lora=None, prompts=None, memory_config=None, image=None,
            end_image=None, **kw):
        pipe = start_pipeline(kw, "comfyui-generate")
        fields: dict = {}
        if prompts:
            fields["prompts"] = prompts
        elif prompt.strip():
            fields["prompt"] = prompt
        if width or height:
            if not (width and height):
                raise NodeError("set both width and height, or leave both 0")
            fields["video_size"] = [height, width]
        set_if(fields, "video_length", video_length)
        set_if(fields, "infer_steps", infer_steps)
        set_if(fields, "guidance_scale", guidance_scale, 0.0)
        set_if(fields, "flow_shift", flow_shift, 0.0)
        set_if(fields, "seed", seed, -1)
        if image is not None:
            fields["image_path"] = save_image(image)
        if end_image is not None:
            fields["end_image_path"] = save_image(end_image)
        fields.update(memory_fields(memory_config, False))
        loras = []
        if lora:
            loras.append({"path": lora_value(lora, pipe, kw.get("more")), "multiplier": lora_strength})
        if lora_name != NONE:
            loras.append({"path": full_path("loras", lora_name, "lora_name"), "multiplier": lora_strength})
        if loras:
            fields["loras"] = loras
        pipe, stage = build_stage(kw, "generate", self.FAMILY, task, self.SLOTS, fields)
        started = time.time()
        plan, step, run = finish_stage(pipe, stage, unique_id)
        made = [p for p in run.outputs.get(stage, []) if p.lower().endswith(VIDEO_SUFFIXES)]
        videos = made or [p for p in step_files(step, "videos") if p.lower().endswith(VIDEO_SUFFIXES)]
        if not videos:
            raise NodeError(f"{stage}: no video was written to {step.meta.get('save_path')}; check output_type in options")
        if prompts:
            return self._batch_result(prompts, step.meta["save_path"], started if made else None, pipe)
        newest = max(videos, key=lambda p: Path(p).stat().st_mtime)
        return (video_from_file(newest), pipe, "\n".join(videos))

    @staticmethod
    def _batch_result(prompts: list[dict], folder: str, since: float | None, pipe: dict) -> dict:
        """Each prompt's video, by tools.prompts' matching rule; one line per prompt in `video_paths`
        (empty where a prompt made none), the first prompt's video on the VIDEO output."""
        from ..tools.prompts import list_outputs, match_outputs

        if since is None:  # the step was up to date: its videos are the newest in the folder
            recent = [o for o in list_outputs(folder) if o.path.lower().endswith(VIDEO_SUFFIXES)][-len(prompts):]
            since = recent[0].time.timestamp() if recent else None
        matched = match_outputs(prompts, folder, since)
        paths = [m.output if m.output and m.output.lower().endswith(VIDEO_SUFFIXES) else "" for m in matched]
        lines = [f"{m.index + 1}. {m.prompt.text[:60]} -> {Path(p).name if p else 'no video'}" for m, p in zip(matched, paths)]
        first = next((p for p in paths if p), None)
        if first is None:
            raise NodeError(f"none of the {len(prompts)} prompts has a video in {folder} (matched by seed and order); see the run log")
        return {"ui": {"text": ["\n".join(lines)]}, "result": (video_from_file(first), pipe, "\n".join(paths))}


class HunyuanVideoGenerator(_Generator):
    DESCRIPTION = "Generates a HunyuanVideo clip (text-to-video), with LoRAs; returns a VIDEO for Save Video."
    FAMILY = "hunyuan_video"
    SLOTS = ("dit", "vae", "text_encoder1", "text_encoder2")


class WanGenerator(_Generator):
    DESCRIPTION = "Generates a Wan clip: T2V, I2V, FLF2V or Wan 2.2 A14B, with LoRAs; returns a VIDEO for Save Video."
    FAMILY = "wan"
    SLOTS = ("dit", "dit_high_noise", "vae", "t5", "clip")
    IMAGE = True


class FramePackGenerator(_Generator):
    DESCRIPTION = ("Generates a FramePack clip from a start image (section prompts go in options as "
                   "section_prompts); returns a VIDEO for Save Video.")
    FAMILY = "framepack"
    SLOTS = ("dit", "vae", "text_encoder1", "text_encoder2", "image_encoder")
    IMAGE = True


NODES = {
    "MusubiTuner_HunyuanVideoGenerator": (HunyuanVideoGenerator, "HunyuanVideo Video Generator (musubi)"),
    "MusubiTuner_WanGenerator": (WanGenerator, "Wan Video Generator (musubi)"),
    "MusubiTuner_FramePackGenerator": (FramePackGenerator, "FramePack Video Generator (musubi)"),
}
