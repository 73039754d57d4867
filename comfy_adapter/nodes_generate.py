"""Generator nodes: one per registry family; run musubi's generate script and return what the family
makes (its rules.output): a ComfyUI VIDEO, or an IMAGE."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .base import (LORA, NONE, PIPELINE, NodeError, StageNode, build_stage, family_classes, finish_stage, full_path,
                   lora_picker, lora_value, model_inputs, node_slots, registry, set_if, stage_inputs, start_pipeline,
                   step_files, task_widget, tip)
from .nodes_train import MEMORY_CONFIG, memory_fields

PROMPTS = "MUSUBI_PROMPTS"
VIDEO_SUFFIXES = (".mp4", ".webm")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


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


def image_from_file(path: str):
    """A ComfyUI IMAGE of a picture file."""
    from PIL import Image

    from .base import image_tensor

    with Image.open(path) as im:
        return image_tensor(im)


@dataclass(frozen=True)
class Output:
    """What a generator returns for a family's output kind (the registry's rules.output)."""

    type: str  # ComfyUI socket type
    name: str
    tooltip: str
    suffixes: tuple[str, ...]
    load: Callable


OUTPUTS = {
    "video": Output("VIDEO", "video", "the generated video (connect Save Video)", VIDEO_SUFFIXES, video_from_file),
    "image": Output("IMAGE", "image", "the generated image (connect Save Image)", IMAGE_SUFFIXES, image_from_file),
}


class _Generator(StageNode):
    FAMILY = ""
    SLOTS: tuple[str, ...] = ()
    IMAGE = False  # start (and end) IMAGE inputs
    OUTPUT = OUTPUTS["video"]
    CATEGORY = "MusubiTuner/Generate"

    @classmethod
    def INPUT_TYPES(cls):
        fam = registry().family(cls.FAMILY)
        noun = cls.OUTPUT.name
        required, optional, hidden = stage_inputs("generate", pipeline_required=False)
        if fam.tasks:
            required["task"] = task_widget(fam.task_names(), "what to generate")
        required.update(model_inputs(*cls.SLOTS, families=[fam]))
        required["prompt"] = tip("STRING", f"what the {noun} shows (ignored when a Batch Processor is connected)", multiline=True, default="")
        required["width"] = tip("INT", f"{noun} width (0 = the family's default)", default=0, min=0, max=4096, step=16)
        required["height"] = tip("INT", f"{noun} height (0 = the family's default)", default=0, min=0, max=4096, step=16)
        rule = fam.rule("frame_rule") or "see the family's length options"
        required["video_length"] = tip("INT", f"frames, {rule} (0 = the family's default)", default=0, min=0, max=1025)
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
            optional["end_image"] = ("IMAGE", {"tooltip": "end image"})
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
        out = self.OUTPUT
        made = [p for p in run.outputs.get(stage, []) if p.lower().endswith(out.suffixes)]
        written = [p for o in step.outputs if o.kind == "files" for p in step_files(step, o.name)]
        files = made or [p for p in written if p.lower().endswith(out.suffixes)]
        if not files:
            raise NodeError(f"{stage}: no {out.name} was written to {step.meta.get('save_path')}; check output_type in options")
        if prompts:
            return self._batch_result(prompts, step.meta["save_path"], started if made else None, pipe)
        newest = max(files, key=lambda p: Path(p).stat().st_mtime)
        return (out.load(newest), pipe, "\n".join(files))

    def _batch_result(self, prompts: list[dict], folder: str, since: float | None, pipe: dict) -> dict:
        """Each prompt's file, by tools.prompts' matching rule; one line per prompt in the paths
        output (empty where a prompt made none), the first prompt's on the first output."""
        from ..tools.prompts import list_outputs, match_outputs

        out = self.OUTPUT
        if since is None:  # the step was up to date: its files are the newest in the folder
            recent = [o for o in list_outputs(folder) if o.path.lower().endswith(out.suffixes)][-len(prompts):]
            since = recent[0].time.timestamp() if recent else None
        matched = match_outputs(prompts, folder, since)
        paths = [m.output if m.output and m.output.lower().endswith(out.suffixes) else "" for m in matched]
        lines = [f"{m.index + 1}. {m.prompt.text[:60]} -> {Path(p).name if p else 'no ' + out.name}" for m, p in zip(matched, paths)]
        first = next((p for p in paths if p), None)
        if first is None:
            raise NodeError(f"none of the {len(prompts)} prompts has a {out.name} in {folder} (matched by seed and order); see the run log")
        return {"ui": {"text": ["\n".join(lines)]}, "result": (out.load(first), pipe, "\n".join(paths))}


def _generator_attrs(fam) -> dict:
    """The generator of a family: what it makes (the registry's rules.output) decides its first output."""
    out = OUTPUTS[fam.output]
    tasks = [*fam.tasks.values()] or [fam.model]
    notes = " Section prompts go in options as section_prompts." if fam.rule("section_prompts") else ""
    return {
        "SLOTS": node_slots(fam, "generate"),
        "IMAGE": any(t.get("start_image") for t in tasks),
        "OUTPUT": out,
        "RETURN_TYPES": (out.type, PIPELINE, "STRING"),
        "RETURN_NAMES": (out.name, "pipeline", f"{out.name}_paths"),
        "OUTPUT_TOOLTIPS": (out.tooltip, "the pipeline with this stage", f"every {out.name} file made, one per line; with a "
                            f"Batch Processor, one line per prompt in its order (empty where a prompt made none)"),
        "DESCRIPTION": f"Generates a {fam.title} {out.name} ({', '.join(t.title for t in tasks)}), with LoRAs; returns "
                       f"{'a VIDEO for Save Video' if out.type == 'VIDEO' else 'an IMAGE'}.{notes} Family and task come "
                       "from the pipeline when one is connected.",
    }


NODES = family_classes("generate", _Generator, "{name} {output} Generator (musubi)", _generator_attrs)
