"""Cache nodes: VAE latents and text-encoder outputs, for every family, before training."""
from __future__ import annotations

from .base import PIPELINE, StageNode, build_stage, family_choices, finish_stage, model_inputs, set_if, stage_inputs, tip
from .nodes_train import MEMORY_CONFIG


def _family_inputs() -> dict:
    return {
        "family": (family_choices(), {"default": "wan", "tooltip": "model family the caches are for"}),
        "task": tip("STRING", "Wan: t2v-14B, i2v-14B, t2v-A14B, ...; FramePack: i2v or f1; empty = the family's default", default=""),
    }


def _cache(node, kw: dict, family: str, task: str, fields: dict, unique_id) -> tuple:
    """Add and run the node's cache stage; return (pipeline, its cache folders)."""
    pipe, name = build_stage(kw, node.KIND, family, task, node.SLOTS, fields)
    _, step, _ = finish_stage(pipe, name, unique_id)
    return (pipe, ", ".join(sorted({o.path for o in step.outputs})))


class VAELatentCache(StageNode):
    DESCRIPTION = ("Encodes the dataset with the VAE into latent cache files (Wan I2V also with the CLIP image encoder, "
                   "FramePack with its SigLIP image encoder). Files already cached are kept.")
    CATEGORY = "MusubiTuner/Cache"
    RETURN_TYPES = (PIPELINE, "STRING")
    RETURN_NAMES = ("pipeline", "cache_folder")
    OUTPUT_TOOLTIPS = ("the pipeline with this stage", "folder of the latent cache files")
    KIND = "cache_latents"
    SLOTS = ("vae", "clip", "image_encoder")

    @classmethod
    def INPUT_TYPES(cls):
        required, optional, hidden = stage_inputs(cls.KIND)
        required.update(_family_inputs())
        required.update(model_inputs(*cls.SLOTS))
        required["batch_size"] = tip("INT", "items encoded at once; 0 = the family template's default", default=0, min=0, max=64)
        required["vae_tiling"] = tip("BOOLEAN", "encode in tiles to save VRAM (HunyuanVideo)", default=False)
        optional["memory_config"] = (MEMORY_CONFIG, {"tooltip": "from Memory Optimizer: VAE tiling, chunk size or CPU cache for this GPU"})
        return {"required": required, "optional": optional, "hidden": hidden}

    def run(self, family, task, batch_size, vae_tiling, unique_id=None, memory_config=None, **kw):
        fields: dict = dict((memory_config or {}).get("cache_latents", {}))
        set_if(fields, "batch_size", batch_size)
        set_if(fields, "vae_tiling", vae_tiling, False)
        return _cache(self, kw, family, task, fields, unique_id)


class TextEncoderCache(StageNode):
    DESCRIPTION = ("Encodes every caption with the text encoders into cache files (HunyuanVideo and FramePack: LLM + "
                   "CLIP-L; Wan: umT5).")
    CATEGORY = "MusubiTuner/Cache"
    RETURN_TYPES = (PIPELINE, "STRING")
    RETURN_NAMES = ("pipeline", "cache_folder")
    OUTPUT_TOOLTIPS = ("the pipeline with this stage", "folder of the text-encoder cache files")
    KIND = "cache_text_encoder"
    SLOTS = ("text_encoder1", "text_encoder2", "t5")

    @classmethod
    def INPUT_TYPES(cls):
        required, optional, hidden = stage_inputs(cls.KIND)
        required.update(_family_inputs())
        required.update(model_inputs(*cls.SLOTS))
        required["batch_size"] = tip("INT", "captions encoded at once; 0 = the family template's default", default=0, min=0, max=256)
        required["fp8_text_encoder"] = tip("BOOLEAN", "load the LLM (HunyuanVideo/FramePack) or T5 (Wan) in fp8 to save VRAM", default=False)
        return {"required": required, "optional": optional, "hidden": hidden}

    def run(self, family, task, batch_size, fp8_text_encoder, unique_id=None, **kw):
        fields: dict = {}
        set_if(fields, "batch_size", batch_size)
        set_if(fields, "fp8_text_encoder", fp8_text_encoder, False)
        return _cache(self, kw, family, task, fields, unique_id)


NODES = {"MusubiTuner_VAELatentCache": (VAELatentCache, "VAE Latent Cache (musubi)"),
         "MusubiTuner_TextEncoderCache": (TextEncoderCache, "Text Encoder Cache (musubi)")}
