"""LoRA nodes: format conversion, merging into a base model, post-hoc EMA over checkpoints."""
from __future__ import annotations

from pathlib import Path

from .base import (LORA, NONE, PIPELINE, NodeError, StageNode, build_stage, family_widget, finish_stage, full_path,
                   lora_picker, lora_value, loras_folder, model_inputs, model_paths_input, node_slots, one_line, parse_options, pipeline_family, set_if,
                   registry, stage_inputs, start_pipeline, step_files, tip, union_slots)

SAVE_TO = (["loras folder", "pipeline workdir"], {"default": "loras folder", "tooltip": "loras folder: ComfyUI's LoRA loaders list the result"})


def lora_format(path: str) -> str:
    """"musubi" or "comfyui", from the tensor names in the file's header."""
    from ..errors import PipelineError
    from ..tools.lora import detect_format

    try:
        return detect_format(path)
    except PipelineError as err:
        raise NodeError(one_line(err)) from None


def _lora_inputs(required: dict, optional: dict, count: int = 1) -> None:
    for i in range(1, count + 1):
        suffix = "" if count == 1 else f"_{i}"
        required[f"lora_name{suffix}"] = lora_picker()
        optional[f"lora{suffix}"] = (LORA, {"tooltip": "a LoRA from a trainer, converter or EMA node (wins over the picker)"})
        if count > 1:
            required[f"strength{suffix}"] = tip("FLOAT", "weight of this LoRA in the merge", default=1.0, min=-5.0, max=5.0, step=0.05)


def _picked_lora(kw: dict, suffix: str, *pipes) -> str | None:
    value = lora_value(kw.get(f"lora{suffix}"), *pipes)
    if value:
        return value
    name = kw.get(f"lora_name{suffix}", NONE)
    if name == NONE:
        return None
    return full_path("loras", name, f"lora_name{suffix}")


def _picked_loras(kw: dict, *pipes) -> list[tuple[str, float]]:
    """(LoRA, strength) of each of the three LoRA inputs of a merge node that is set."""
    picked = []
    for suffix in ("_1", "_2", "_3"):
        path = _picked_lora(kw, suffix, *pipes)
        if path:
            picked.append((path, kw.get(f"strength{suffix}", 1.0)))
    return picked


def _written(step, stage: str, output: str) -> str:
    """The file a step's output names, as it is on disk; an error when the step did not write it."""
    files = step_files(step, output)
    if not files:
        raise NodeError(f"{stage}: {step.output(output).path} was not written; see the run log")
    return files[0]


def _lora_out(pipe: dict, stage: str, step) -> tuple:
    path = _written(step, stage, "lora")
    return (pipe, {"ref": f"@{stage}.lora", "path": path}, path)


class FormatConverter(StageNode):
    DESCRIPTION = ("Converts a LoRA between musubi's format and the ComfyUI/diffusers format; the direction is detected "
                   "from the file, so musubi LoRAs become loadable by ComfyUI's LoRA loaders.")
    CATEGORY = "MusubiTuner/LoRA"
    RETURN_TYPES = (PIPELINE, LORA, "STRING")
    RETURN_NAMES = ("pipeline", "lora", "lora_path")
    OUTPUT_TOOLTIPS = ("the pipeline with this stage", "the converted LoRA", "the converted file")

    @classmethod
    def INPUT_TYPES(cls):
        required, optional, hidden = stage_inputs("convert", pipeline_required=False)
        required["family"] = family_widget("model family of the LoRA")
        _lora_inputs(required, optional)
        required["to"] = (["auto", "comfyui", "musubi"], {"default": "auto", "tooltip": "auto: the other format than the file's"})
        required["save_to"] = SAVE_TO
        return {"required": required, "optional": optional, "hidden": hidden}

    def run(self, family, to, save_to, unique_id=None, **kw):
        pipe = start_pipeline(kw, "comfyui-convert")
        family = pipeline_family(pipe, family)
        source = _picked_lora(kw, "", pipe, kw.get("more")) or parse_options(kw.get("options", "")).get("input")
        if not source:
            raise NodeError("no LoRA: pick lora_name or connect a LoRA")
        if to == "auto":
            # A LoRA made by a stage of this pipeline is in musubi format; a file is read.
            to = "comfyui" if source.startswith("@") or lora_format(source) == "musubi" else "musubi"
        fields = {"input": source, "to": to}
        if save_to == "loras folder":
            stem = Path(kw["lora"]["path"] if kw.get("lora") else source).stem
            fields["output"] = str(Path(loras_folder()) / "musubi-pipe" / f"{stem}-{to}.safetensors")
        pipe, stage = build_stage(kw, "convert", family, None, (), fields, origin=(self, unique_id))
        _, step, _ = finish_stage(pipe, stage, unique_id)
        return _lora_out(pipe, stage, step)


def ema_beta() -> float:
    """musubi's default EMA beta (the recorded parser of the EMA script, from the registry)."""
    from .base import recorded_default

    return recorded_default(registry().family(registry().default_family()).stages["ema"].script, "beta") or 0.0


class PostHocEMA(StageNode):
    DESCRIPTION = ("Averages a training run's saved checkpoints into a smoother LoRA (post-hoc EMA): a fixed beta, a "
                   "beta range, or the power-function profile sigma_rel.")
    CATEGORY = "MusubiTuner/LoRA"
    RETURN_TYPES = (PIPELINE, LORA, "STRING")
    RETURN_NAMES = ("pipeline", "lora", "lora_path")
    OUTPUT_TOOLTIPS = ("the pipeline with this stage", "the averaged LoRA", "the averaged file")

    @classmethod
    def INPUT_TYPES(cls):
        required, optional, hidden = stage_inputs("ema")
        optional["lora"] = (LORA, {"tooltip": "the LoRA of a trainer node: its checkpoints are averaged (or list checkpoints in options)"})
        required["beta"] = tip("FLOAT", f"EMA decay (musubi's default: {ema_beta()})", default=ema_beta(), min=0.0, max=0.99999, step=0.001)
        required["beta2"] = tip("FLOAT", "end of a beta range (0 = a fixed beta)", default=0.0, min=0.0, max=0.99999, step=0.001)
        required["sigma_rel"] = tip("FLOAT", "power-function EMA width (0 = off; overrides beta)", default=0.0, min=0.0, max=1.0, step=0.01)
        required["save_to"] = SAVE_TO
        return {"required": required, "optional": optional, "hidden": hidden}

    def run(self, beta, beta2, sigma_rel, save_to, unique_id=None, lora=None, **kw):
        checkpoints = lora_value(lora, kw["pipeline"], kw.get("more"), artifact="checkpoints")
        if lora and not (checkpoints or "").startswith("@"):
            raise NodeError("connect the LoRA output of a trainer node in this pipeline: EMA averages its checkpoints")
        if not lora and "checkpoints" not in parse_options(kw.get("options", "")):
            raise NodeError("connect a trainer's LoRA, or list checkpoints = [...] in options, oldest first")
        fields: dict = {"checkpoints": checkpoints} if checkpoints else {}
        if beta not in (0.0, ema_beta()):  # 0: what workflows saved before wrote for the default
            fields["beta"] = beta
        set_if(fields, "beta2", beta2, 0.0)
        set_if(fields, "sigma_rel", sigma_rel, 0.0)
        if save_to == "loras folder":
            stem = Path(lora["path"]).stem if lora else kw["pipeline"]["document"].get("name", "lora")
            fields["output"] = str(Path(loras_folder()) / "musubi-pipe" / f"{stem}-ema.safetensors")
        pipe, stage = build_stage(kw, "ema", None, None, (), fields, origin=(self, unique_id))
        _, step, _ = finish_stage(pipe, stage, unique_id)
        return _lora_out(pipe, stage, step)


class LoRAMerger(StageNode):
    DESCRIPTION = ("Merges up to three LoRAs, each with its weight, into the base DiT and saves the merged model "
                   "(with the family's merge route: its merge script, or its generate script).")
    CATEGORY = "MusubiTuner/LoRA"
    RETURN_TYPES = (PIPELINE, "STRING")
    RETURN_NAMES = ("pipeline", "model_path")
    OUTPUT_TOOLTIPS = ("the pipeline with this stage", "the merged model file (in diffusion_models unless save_to says otherwise)")

    @classmethod
    def INPUT_TYPES(cls):
        required, optional, hidden = stage_inputs("merge", pipeline_required=False)
        required["family"] = family_widget("model family of the base model and LoRAs")
        required.update(model_inputs("dit"))
        _lora_inputs(required, optional, count=3)
        required["output_name"] = tip("STRING", "merged model file name", default="merged.safetensors")
        required["save_to"] = (["diffusion_models folder", "pipeline workdir"], {"default": "diffusion_models folder", "tooltip": "where the merged model goes"})
        # The other models a family's merge route reads (its generate script loads them for
        # Wan): by path, one text instead of a picker per slot of every family.
        paths = model_paths_input(union_slots("merge"))
        needs = "; ".join(f"{fam.title}: {', '.join(s for s in node_slots(fam, 'merge') if s != 'dit') or 'none'}"
                          for fam in registry().families() if "merge" in fam.stages)
        optional["model_paths"] = (paths[0], {**paths[1], "tooltip": paths[1]["tooltip"] + f". Needed besides the DiT: {needs}"})
        return {"required": required, "optional": optional, "hidden": hidden}

    def run(self, family, output_name, save_to, unique_id=None, **kw):
        pipe = start_pipeline(kw, "comfyui-merge")
        family = pipeline_family(pipe, family)
        loras = [{"path": path, "multiplier": strength} for path, strength in _picked_loras(kw, pipe, kw.get("more"))]
        if not loras and "loras" not in parse_options(kw.get("options", "")):
            raise NodeError("nothing to merge: pick or connect at least one LoRA")
        fields: dict = {"loras": loras} if loras else {}
        if save_to == "diffusion_models folder":
            import folder_paths

            name = Path(output_name).name or "merged.safetensors"
            folders = folder_paths.get_folder_paths("diffusion_models")
            folder = next((f for f in folders if Path(f).name == "diffusion_models"), folders[0])
            fields["output"] = str(Path(folder) / "musubi-pipe" / name)
        pipe, stage = build_stage(kw, "merge", family, None, union_slots("merge"), fields, origin=(self, unique_id))
        _, step, _ = finish_stage(pipe, stage, unique_id)
        return (pipe, _written(step, stage, "model"))


class LoRAMergeStage(StageNode):
    DESCRIPTION = ("Adds a weighted LoRA merge to the pipeline and runs it: several LoRAs (files or LoRAs trained "
                   "earlier in the pipeline) into one LoRA, exact or re-factorised to a rank.")
    CATEGORY = "MusubiTuner/LoRA"
    RETURN_TYPES = (PIPELINE, LORA, "STRING")
    RETURN_NAMES = ("pipeline", "lora", "lora_path")
    OUTPUT_TOOLTIPS = ("the pipeline with this stage", "the merged LoRA", "the merged file")

    @classmethod
    def INPUT_TYPES(cls):
        required, optional, hidden = stage_inputs("lora_merge", pipeline_required=False)
        required["family"] = family_widget("model family of the LoRAs")
        _lora_inputs(required, optional, count=3)
        required["rank"] = tip("INT", "rank of the result (0 = exact: the ranks add up)", default=0, min=0, max=4096)
        required["format"] = (["auto", "musubi", "comfyui"], {"default": "auto", "tooltip": "key layout of the result; auto: the first LoRA's"})
        required["dtype"] = (["auto", "float32", "float16", "bfloat16"], {"default": "auto", "tooltip": "dtype of the result; auto: the tool's default"})
        required["save_to"] = SAVE_TO
        return {"required": required, "optional": optional, "hidden": hidden}

    def run(self, family, rank, format, dtype, save_to, unique_id=None, **kw):
        pipe = start_pipeline(kw, "comfyui-lora-merge")
        family = pipeline_family(pipe, family)
        loras = [{"path": path, "multiplier": float(strength)} for path, strength in _picked_loras(kw, pipe, kw.get("more"))]
        if not loras and "loras" not in parse_options(kw.get("options", "")):
            raise NodeError("nothing to merge: pick or connect at least two LoRAs")
        fields: dict = {"loras": loras} if loras else {}
        set_if(fields, "rank", rank)
        set_if(fields, "format", format, "auto")
        set_if(fields, "dtype", dtype, "auto")
        if save_to == "loras folder":
            name = (kw.get("stage_name") or "lora_merge").strip() or "lora_merge"
            fields["output"] = str(Path(loras_folder()) / "musubi-pipe" / f"{pipe['document'].get('name', 'comfyui')}-{name}.safetensors")
        pipe, stage = build_stage(kw, "lora_merge", family, None, (), fields, origin=(self, unique_id))
        _, step, _ = finish_stage(pipe, stage, unique_id)
        return _lora_out(pipe, stage, step)


class LoRAWeightedMerge:
    DESCRIPTION = ("Merges several LoRAs into one LoRA with a weight each (exact, or re-factorised to a rank), "
                   "saved in ComfyUI's loras folder.")
    CATEGORY = "MusubiTuner/LoRA"
    RETURN_TYPES = (LORA, "STRING")
    RETURN_NAMES = ("lora", "lora_path")
    OUTPUT_TOOLTIPS = ("the merged LoRA", "the merged file")
    FUNCTION = "merge"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        required: dict = {}
        optional: dict = {}
        _lora_inputs(required, optional, count=3)
        required["rank"] = tip("INT", "rank of the result (0 = exact: the ranks add up)", default=0, min=0, max=4096)
        required["output_name"] = tip("STRING", "file name in loras/musubi-pipe/", default="merged-lora.safetensors")
        required["overwrite"] = tip("BOOLEAN", "replace an existing file of that name", default=False)
        return {"required": required, "optional": optional}

    def merge(self, rank, output_name, overwrite, **kw):
        from ..errors import PipelineError
        from ..tools.lora import merge_loras

        inputs = [(path, float(strength)) for path, strength in _picked_loras(kw)]
        if len(inputs) < 2:
            raise NodeError("pick or connect at least two LoRAs to merge")
        name = Path(output_name).name or "merged-lora.safetensors"
        output = Path(loras_folder()) / "musubi-pipe" / (name if name.endswith(".safetensors") else name + ".safetensors")
        output.parent.mkdir(parents=True, exist_ok=True)
        try:
            merge_loras(output, inputs, rank=rank or None, force=overwrite)
        except PipelineError as err:
            raise NodeError(one_line(err)) from None
        return ({"ref": "", "path": str(output)}, str(output))


NODES = {
    "MusubiTuner_LoRAWeightedMerge": (LoRAWeightedMerge, "LoRA Weighted Merge (musubi)"),
    "MusubiTuner_FormatConverter": (FormatConverter, "LoRA Format Converter (musubi)"),
    "MusubiTuner_LoRAMerger": (LoRAMerger, "LoRA Merger (musubi)"),
    "MusubiTuner_PostHocEMA": (PostHocEMA, "Post-hoc EMA (musubi)"),
    "MusubiTuner_LoRAMergeStage": (LoRAMergeStage, "LoRA Merge Stage (musubi)"),
}
