"""Cache nodes: VAE latents and text-encoder outputs before training. One pair per registry family,
each showing only its family's models; family and task come from the pipeline socket.

Why per family rather than one cache node for all: a node's widgets are fixed when ComfyUI loads
it, so one shared node would have to show every family's model pickers (with each new family,
more that do nothing for yours). Per family, the node shows exactly what to pick, and its name
says what it is for, as the trainers and generators do."""
from __future__ import annotations

from .base import (FROM_PIPELINE, PIPELINE, StageNode, accepts, all_task_choices, build_stage, family_classes, family_widget,
                   finish_stage, model_inputs, model_paths_input, node_slots, pipeline_family, real_default, registry, set_if, stage_inputs, tip)
from .nodes_train import MEMORY_CONFIG


def _cache(node, kw: dict, family: str, fields: dict, unique_id, task: str | None = None) -> tuple:
    """Add and run the node's cache stage; return (pipeline, its cache folders)."""
    pipe, name = node.document(kw, family, fields, task, unique_id)
    _, step, _ = finish_stage(pipe, name, unique_id)
    return (pipe, ", ".join(sorted({o.path for o in step.outputs})))


def _tiling_default(fam) -> bool:
    return bool(fam.stages[_LatentCache.KIND].defaults.get("vae_tiling", False))


def _batch_widget(what: str, default: int | None, most: int) -> tuple:
    """batch_size showing the real default (the family template's or musubi's); 0 where musubi
    takes it from the dataset config (its batch size)."""
    if default:
        return tip("INT", f"{what} encoded at once (default {default})", default=default, min=0, max=most)
    return tip("INT", f"{what} encoded at once; 0 = the dataset's batch size (musubi's default)", default=0, min=0, max=most)


def _latent_widgets(required: dict, optional: dict, tiling: bool, tiling_default: bool = False, batch: int | None = None) -> None:
    required["batch_size"] = _batch_widget("items", batch, 64)
    if tiling:
        required["vae_tiling"] = tip("BOOLEAN", "encode in tiles to save VRAM", default=tiling_default)
    optional["memory_config"] = (MEMORY_CONFIG, {"tooltip": "from Memory Optimizer: VAE tiling, chunk size or CPU cache for this GPU"})


def _latent_fields(batch_size, vae_tiling, memory_config, tiling_default: bool = False, batch: int | None = None) -> dict:
    """The widgets as stage fields; values at the family template's default are left to it."""
    fields: dict = dict((memory_config or {}).get("cache_latents", {}))
    set_if(fields, "batch_size", 0 if batch_size == batch else batch_size)
    set_if(fields, "vae_tiling", vae_tiling, tiling_default)
    return fields


def _text_widgets(required: dict, fp8: bool = True, batch: int | None = None) -> None:
    required["batch_size"] = _batch_widget("captions", batch, 256)
    if fp8:
        required["fp8_text_encoder"] = tip("BOOLEAN", "load the text encoder in fp8 to save VRAM", default=False)


def _text_fields(batch_size, fp8_text_encoder, batch: int | None = None) -> dict:
    fields: dict = {}
    set_if(fields, "batch_size", 0 if batch_size == batch else batch_size)
    set_if(fields, "fp8_text_encoder", fp8_text_encoder, False)
    return fields


class _Cache(StageNode):
    FAMILY = ""
    KIND = ""
    SLOTS: tuple[str, ...] = ()
    CATEGORY = "MusubiTuner/Cache"
    RETURN_TYPES = (PIPELINE, "STRING")
    RETURN_NAMES = ("pipeline", "cache_folder")

    def document(self, kw: dict, family: str, fields: dict, task: str | None = None, unique_id=None) -> tuple[dict, str]:
        """The pipeline with this node's cache stage: (pipeline, stage name)."""
        return build_stage(kw, self.KIND, family, task, self.SLOTS, fields, origin=(self, unique_id))

    @classmethod
    def _inputs(cls) -> tuple[dict, dict, dict]:
        required, optional, hidden = stage_inputs(cls.KIND)
        required.update(model_inputs(*cls.SLOTS, families=[registry().family(cls.FAMILY)]))
        optional["model_paths"] = model_paths_input(cls.SLOTS)
        return required, optional, hidden


class _LatentCache(_Cache):
    KIND = "cache_latents"
    OUTPUT_TOOLTIPS = ("the pipeline with this stage", "folder of the latent cache files")

    @classmethod
    def INPUT_TYPES(cls):
        fam = registry().family(cls.FAMILY)
        required, optional, hidden = cls._inputs()
        _latent_widgets(required, optional, accepts(fam, cls.KIND, "vae_tiling"), _tiling_default(fam),
                        real_default(fam, cls.KIND, "batch_size"))
        return {"required": required, "optional": optional, "hidden": hidden}

    def run(self, batch_size, vae_tiling=None, unique_id=None, memory_config=None, **kw):
        fam = registry().family(self.FAMILY)
        default = _tiling_default(fam)
        fields = _latent_fields(batch_size, default if vae_tiling is None else vae_tiling, memory_config, default,
                                real_default(fam, self.KIND, "batch_size"))
        return _cache(self, kw, self.FAMILY, fields, unique_id)


class _TextEncoderCache(_Cache):
    KIND = "cache_text_encoder"
    OUTPUT_TOOLTIPS = ("the pipeline with this stage", "folder of the text-encoder cache files")

    @classmethod
    def INPUT_TYPES(cls):
        required, optional, hidden = cls._inputs()
        fam = registry().family(cls.FAMILY)
        _text_widgets(required, accepts(fam, cls.KIND, "fp8_text_encoder"), real_default(fam, cls.KIND, "batch_size"))
        return {"required": required, "optional": optional, "hidden": hidden}

    def run(self, batch_size, fp8_text_encoder=False, unique_id=None, **kw):
        batch = real_default(registry().family(self.FAMILY), self.KIND, "batch_size")
        return _cache(self, kw, self.FAMILY, _text_fields(batch_size, fp8_text_encoder, batch), unique_id)


def _models_text(fam, kind: str) -> str:
    return "; ".join(fam.models[slot].help for slot in node_slots(fam, kind))


def _latent_attrs(fam) -> dict:
    kind = _LatentCache.KIND
    return {"SLOTS": node_slots(fam, kind),
            "DESCRIPTION": f"{fam.title}: encodes the dataset into latent cache files ({_models_text(fam, kind)}). "
                           "Family and task come from the pipeline; files already cached are kept."}


def _text_attrs(fam) -> dict:
    kind = _TextEncoderCache.KIND
    return {"SLOTS": node_slots(fam, kind),
            "DESCRIPTION": f"{fam.title}: encodes every caption into text-encoder cache files ({_models_text(fam, kind)}). "
                           "Family and task come from the pipeline."}


# ------------------------------------------------------------------ workflows saved before

# The widgets of the one cache node per kind that workflows saved before the per-family nodes
# use, frozen in that order: a saved editor workflow stores widget values by position.
LEGACY_SLOTS = {"cache_latents": ("vae", "clip", "image_encoder"), "cache_text_encoder": ("text_encoder1", "text_encoder2", "t5")}
LEGACY_TASK = ""  # the old free-text task's "empty = the family's default": here, the pipeline's


def _legacy_inputs(kind: str) -> tuple[dict, dict, dict]:
    required, optional, hidden = stage_inputs(kind)
    required["family"] = family_widget("model family the caches are for")
    required["task"] = ([FROM_PIPELINE, LEGACY_TASK, *all_task_choices()],
                        {"default": FROM_PIPELINE, "tooltip": f"{FROM_PIPELINE} (or empty): the pipeline's task; another "
                         "value must agree with it"})
    required.update(model_inputs(*LEGACY_SLOTS[kind], legacy=True))
    return required, optional, hidden


class VAELatentCache(_LatentCache):
    DESCRIPTION = ("Deprecated: use the latent cache node of your family (<family> Latent Cache), which shows only its "
                   "models. Kept so that workflows saved before keep loading; the family must agree with the pipeline's.")
    DEPRECATED = True
    SLOTS = LEGACY_SLOTS["cache_latents"]

    @classmethod
    def INPUT_TYPES(cls):
        required, optional, hidden = _legacy_inputs(cls.KIND)
        _latent_widgets(required, optional, True)
        return {"required": required, "optional": optional, "hidden": hidden}

    def run(self, family, task, batch_size, vae_tiling=False, unique_id=None, memory_config=None, **kw):
        fields = _latent_fields(batch_size, vae_tiling, memory_config)
        return _cache(self, kw, pipeline_family(kw.get("pipeline"), family), fields, unique_id, task)


class TextEncoderCache(_TextEncoderCache):
    DESCRIPTION = ("Deprecated: use the text encoder cache node of your family (<family> Text Encoder Cache), which shows "
                   "only its models. Kept so that workflows saved before keep loading; the family must agree with the pipeline's.")
    DEPRECATED = True
    SLOTS = LEGACY_SLOTS["cache_text_encoder"]

    @classmethod
    def INPUT_TYPES(cls):
        required, optional, hidden = _legacy_inputs(cls.KIND)
        _text_widgets(required)
        return {"required": required, "optional": optional, "hidden": hidden}

    def run(self, family, task, batch_size, fp8_text_encoder, unique_id=None, **kw):
        fields = _text_fields(batch_size, fp8_text_encoder)
        return _cache(self, kw, pipeline_family(kw.get("pipeline"), family), fields, unique_id, task)


NODES = {
    **family_classes("cache_latents", _LatentCache, "{name} Latent Cache (musubi)", _latent_attrs),
    **family_classes("cache_text_encoder", _TextEncoderCache, "{name} Text Encoder Cache (musubi)", _text_attrs),
    "MusubiTuner_VAELatentCache": (VAELatentCache, "VAE Latent Cache (musubi, deprecated)"),
    "MusubiTuner_TextEncoderCache": (TextEncoderCache, "Text Encoder Cache (musubi, deprecated)"),
}
