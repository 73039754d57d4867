"""Generator nodes: one per registry family; run musubi's generate script and return what the family
makes (its rules.output): a ComfyUI VIDEO, or an IMAGE batch of every picture the run made. The
widgets are those the family's generate script takes (the recorded contract).

torch is ComfyUI's: the IMAGE tensors are built inside the node's run, so the pack imports without it."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .base import (LORA, NONE, PIPELINE, NodeError, StageNode, accepts, build_stage, family_classes, finish_stage, full_path,
                   has_role, lora_picker, lora_value, model_inputs, model_paths_input, node_slots, parse_number,
                   real_default, registry, set_if, stage_inputs, start_pipeline, step_files, task_widget, tip)
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


def save_images(image) -> list[str]:
    """Each picture of an IMAGE batch as a PNG in ComfyUI's temp folder, named by its content so
    that the same picture gives the same pipeline (and so the same fingerprint)."""
    import numpy as np
    from PIL import Image

    import folder_paths

    from ..tools.contact_sheet import save_png

    paths = []
    for picture in image:
        array = (picture.cpu().numpy() * 255.0).clip(0, 255).astype(np.uint8)
        digest = hashlib.sha256(array.tobytes()).hexdigest()[:16]
        path = Path(folder_paths.get_temp_directory()) / "musubi-pipe" / f"image-{digest}.png"
        if not path.exists():
            save_png(Image.fromarray(array), path)
        paths.append(str(path))
    return paths


def save_image(image) -> str:
    """The first picture of an IMAGE input as a PNG (see save_images)."""
    return save_images(image[:1])[0]


def video_result(files: list[str]) -> tuple[tuple, list[str]]:
    """The newest video file as the VIDEO output: (outputs after the first three, files shown)."""
    newest = max(files, key=lambda p: Path(p).stat().st_mtime)
    return (video_from_file(newest),), [newest]


def image_result(files: list[str]) -> tuple[tuple, list[str]]:
    """Picture files as one IMAGE batch and its MASK (a batch has one size: those of another are
    left out); returns ((image, mask), the files in the batch)."""
    from .base import image_batch

    image, mask, kept = image_batch(files)
    return (image, mask), kept


@dataclass(frozen=True)
class Output:
    """What a generator returns for a family's output kind (the registry's rules.output)."""

    type: str  # ComfyUI socket type of the first output
    name: str
    tooltip: str
    suffixes: tuple[str, ...]
    result: Callable  # files -> (the output values, the files they hold)
    extra: tuple[tuple[str, str, str], ...] = ()  # (type, name, tooltip) of outputs after the paths


OUTPUTS = {
    "video": Output("VIDEO", "video", "the generated video (connect Save Video)", VIDEO_SUFFIXES, video_result),
    "image": Output("IMAGE", "image", "the generated pictures as one IMAGE batch: each picture the run made (every layer "
                    "of a layered picture; with a Batch Processor, each prompt's), of the first one's size (connect Save "
                    "Image or Preview Image)", IMAGE_SUFFIXES, image_result,
                    (("MASK", "mask", "each picture's transparency (1 where transparent, as Load Image gives it)"),)),
}

# The pipeline-language fields of a generate stage behind the size and length widgets, in the
# order a family's script is asked for them: the first the script takes gets the widgets.
SIZE_FIELDS = ("video_size", "image_size")
LENGTH_FIELDS = ("video_length", "video_seconds")
# The musubi docs' limit where a task takes any number of control images ("correct operation is
# confirmed up to 3"): a generator shows this many control IMAGE inputs.
CONTROL_INPUTS = 3
# Settings widgets a generator shows when its script takes them: name -> (whole number, what it is).
# (flow_shift and the rest go in the options text: few people change them.)
SETTINGS = {"infer_steps": (True, "denoising steps"), "guidance_scale": (False, "guidance scale")}


class _Generator(StageNode):
    FAMILY = ""
    SLOTS: tuple[str, ...] = ()
    IMAGE = False  # a start IMAGE input
    END_IMAGE = False  # an end IMAGE input
    CONTROLS = 0  # control IMAGE inputs (image editing)
    BATCH = True  # a prompts input (the script has a batch mode)
    SIZE = "video_size"  # the field width and height set ("" = no size widgets)
    LENGTH = "video_length"  # the field the length widget sets ("" = none)
    SETTINGS: tuple[str, ...] = ("infer_steps", "guidance_scale", "seed")  # widgets the script takes
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
        if cls.SIZE:
            step = fam.rule("size_step")
            grid = f"; a multiple of {step}" if step else ""
            size = real_default(fam, "generate", cls.SIZE) or [0, 0]
            required["width"] = tip("INT", f"{noun} width{grid}", default=size[1], min=0, max=4096, step=16)
            required["height"] = tip("INT", f"{noun} height{grid}", default=size[0], min=0, max=4096, step=16)
        if cls.LENGTH == "video_length":
            rule = fam.rule("frame_rule") or "see the family's length options"
            required["video_length"] = tip("INT", f"frames, {rule}", default=real_default(fam, "generate", "video_length") or 0,
                                           min=0, max=1025)
        elif cls.LENGTH == "video_seconds":
            required["video_seconds"] = tip("FLOAT", "video length in seconds", default=float(
                real_default(fam, "generate", "video_seconds") or 0.0), min=0.0, max=600.0, step=0.1)
        for name, (integer, what) in SETTINGS.items():
            if name not in cls.SETTINGS:
                continue
            known = real_default(fam, "generate", name)
            if known is not None:
                required[name] = tip("INT" if integer else "FLOAT", f"{what} ({fam.title}'s default: {known})", default=known,
                                     min=0, max=200 if integer else 100.0, **({} if integer else {"step": 0.1}))
            else:  # musubi takes it from the task's own config: a number typed, or "default"
                required[name] = tip("STRING", f"{what}: a number, or default = musubi's value for the task (from its "
                                     "task config; the node's text says so)", default="default")
        if "seed" in cls.SETTINGS:
            required["seed"] = tip("INT", "seed (-1 = random)", default=-1, min=-1, max=2**31 - 1, control_after_generate=False)
        required["lora_name"] = lora_picker()
        required["lora_strength"] = tip("FLOAT", "multiplier of the picked or connected LoRA", default=1.0, min=-5.0, max=5.0, step=0.05)
        optional["options"] = tip("STRING", "every other setting in the pipeline language, one `name = value` per line "
                                  "(e.g. negative_prompt = \"blurry\", flow_shift = 5.0, fp8 = true)", multiline=True, default="")
        optional["model_paths"] = model_paths_input(cls.SLOTS)
        optional["lora"] = (LORA, {"tooltip": "a LoRA from a trainer, converter or EMA node"})
        if cls.BATCH:
            optional["prompts"] = (PROMPTS, {"tooltip": "many prompts in one run (from Batch Processor)"})
        optional["memory_config"] = (MEMORY_CONFIG, {"tooltip": "from Memory Optimizer"})
        if cls.IMAGE:
            optional["image"] = ("IMAGE", {"tooltip": "start image (image-to-video)"})
        if cls.END_IMAGE:
            optional["end_image"] = ("IMAGE", {"tooltip": "end image"})
        for name in _control_names(cls.CONTROLS):
            optional[name] = ("IMAGE", {"tooltip": f"control image(s) the picture is made from ({_control_tasks(fam)}); each "
                                        "picture of the batch is one control image, in order after the inputs above it"})
        return {"required": required, "optional": optional, "hidden": hidden}

    def run(self, prompt, lora_name, lora_strength, unique_id=None, task=None, lora=None, prompts=None, memory_config=None,
            image=None, end_image=None, width=0, height=0, video_length=0, video_seconds=0.0, seed=-1, **kw):
        controls = [kw.pop(name) for name in _control_names(CONTROL_INPUTS) if kw.get(name) is not None]
        pipe = start_pipeline(kw, "comfyui-generate")
        fields: dict = {}
        if prompts:
            fields["prompts"] = prompts
        elif prompt.strip():
            fields["prompt"] = prompt
        fam = registry().family(self.FAMILY)
        if (width or height) and self.SIZE:
            if not (width and height):
                raise NodeError("width / height: set both, or leave both at the family's default")
            if [height, width] != real_default(fam, "generate", self.SIZE):
                fields[self.SIZE] = [height, width]
        if self.LENGTH:
            value = {"video_length": video_length, "video_seconds": video_seconds}[self.LENGTH]
            set_if(fields, self.LENGTH, value, real_default(fam, "generate", self.LENGTH) or 0)
        notes = []
        for name, (integer, _) in SETTINGS.items():
            if name not in self.SETTINGS or name not in kw:
                continue
            value = parse_number(kw.pop(name), name, integer=integer, minimum=0)
            known = real_default(fam, "generate", name)
            if not value:  # "default" (or 0, which workflows saved before used for it)
                if known is None:
                    notes.append(f"{name}: default (musubi's value for the task, from its task config)")
            elif value != known:
                fields[name] = value
        set_if(fields, "seed", seed, -1)
        if image is not None:
            fields["image_path"] = save_image(image)
        if end_image is not None:
            fields["end_image_path"] = save_image(end_image)
        if controls:
            fields["control_image_path"] = [path for batch in controls for path in save_images(batch)]
        fields.update(memory_fields(memory_config, False))
        loras = []
        if lora:
            loras.append({"path": lora_value(lora, pipe, kw.get("more")), "multiplier": lora_strength})
        if lora_name != NONE:
            loras.append({"path": full_path("loras", lora_name, "lora_name"), "multiplier": lora_strength})
        if loras:
            fields["loras"] = loras
        pipe, stage = build_stage(kw, "generate", self.FAMILY, task, self.SLOTS, fields, origin=(self, unique_id))
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
        from ..tools.prompts import output_group

        # The newest output and the files it is made of (every layer of a layered picture).
        newest = output_group(max(files, key=lambda p: Path(p).stat().st_mtime))
        values, shown = out.result([p for p in newest if p.lower().endswith(out.suffixes)])
        if out.type == "VIDEO":
            shown = files  # every video in the folder, as before
        return {"ui": {"text": ["\n".join([*notes, *shown])]}, "result": (values[0], pipe, "\n".join(shown), *values[1:])}

    def _batch_result(self, prompts: list[dict], folder: str, since: float | None, pipe: dict) -> dict:
        """Each prompt's file, by tools.prompts' matching rule; one line per prompt in the paths
        output (empty where a prompt made none), the first prompt's (for pictures: every prompt's,
        in one batch) on the first output."""
        from ..tools.prompts import list_outputs, match_outputs, output_group

        out = self.OUTPUT
        if since is None:  # the step was up to date: its files are the newest in the folder
            recent = [o for o in list_outputs(folder) if o.path.lower().endswith(out.suffixes) and not o.layer][-len(prompts):]
            since = recent[0].time.timestamp() if recent else None
        matched = match_outputs(prompts, folder, since)
        paths = [m.output if m.output and m.output.lower().endswith(out.suffixes) else "" for m in matched]
        first = next((p for p in paths if p), None)
        if first is None:
            raise NodeError(f"none of the {len(prompts)} prompts has a {out.name} in {folder} (matched by seed and order); see the run log")
        if out.type == "VIDEO":
            values, shown = out.result([first])
        else:
            values, shown = out.result([f for p in paths if p for f in output_group(p)])
        lines = []
        for m, p in zip(matched, paths):
            note = "" if not p or set(output_group(p)) & set(shown) else f" (not in the {out.type} batch: another size)"
            lines.append(f"{m.index + 1}. {m.prompt.text[:60]} -> {Path(p).name if p else 'no ' + out.name}{note}")
        return {"ui": {"text": ["\n".join(lines)]}, "result": (values[0], pipe, "\n".join(paths), *values[1:])}


def _control_names(count: int) -> list[str]:
    return ["control_image", *(f"control_image_{i}" for i in range(2, count + 1))][:count]


def _control_tasks(fam) -> str:
    return ", ".join(t.title for t in fam.tasks.values() if t.get("control_generate"))


def _generator_attrs(fam) -> dict:
    """The generator of a family, from the registry: what it makes (rules.output) decides its first
    output; the recorded contract of its generate script decides which widgets it shows."""
    out = OUTPUTS[fam.output]
    tasks = [*fam.tasks.values()] or [fam.model]
    notes = " Section prompts go in options as section_prompts." if fam.rule("section_prompts") else ""
    start = any(t.get("start_image") for t in tasks)
    control = [t for t in tasks if t.get("control_generate")]
    limits = [t.get("max_control_images") for t in control]
    controls = 0 if not control else max(limits) if all(limits) else CONTROL_INPUTS
    extra_types = tuple(e[0] for e in out.extra)
    what = "a VIDEO for Save Video" if out.type == "VIDEO" else "an IMAGE batch (and its MASK) for Save Image or Preview Image"
    return {
        "SLOTS": node_slots(fam, "generate"),
        "IMAGE": start and accepts(fam, "generate", "image_path"),
        "END_IMAGE": start and accepts(fam, "generate", "end_image_path"),
        "CONTROLS": controls if accepts(fam, "generate", "control_image_path") else 0,
        "BATCH": has_role(fam, "generate", "batch_file"),
        "SIZE": next((f for f in SIZE_FIELDS if accepts(fam, "generate", f)), ""),
        "LENGTH": next((f for f in LENGTH_FIELDS if accepts(fam, "generate", f)), ""),
        "SETTINGS": tuple(f for f in _Generator.SETTINGS if accepts(fam, "generate", f)),
        "OUTPUT": out,
        "RETURN_TYPES": (out.type, PIPELINE, "STRING", *extra_types),
        "RETURN_NAMES": (out.name, "pipeline", f"{out.name}_paths", *(e[1] for e in out.extra)),
        "OUTPUT_TOOLTIPS": (out.tooltip, "the pipeline with this stage", f"the {out.name} files the first output holds, one "
                            f"per line; with a Batch Processor, one line per prompt in its order (empty where a prompt made none)",
                            *(e[2] for e in out.extra)),
        "DESCRIPTION": f"Generates a {fam.title} {out.name} ({', '.join(t.title for t in tasks)}), with LoRAs; returns "
                       f"{what}.{notes} Family and task come from the pipeline when one is connected.",
    }


NODES = family_classes("generate", _Generator, "{name} {output} Generator (musubi)", _generator_attrs)
