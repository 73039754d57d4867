"""Training nodes: config nodes that return plain settings, and one LoRA trainer per registry family."""
from __future__ import annotations

import os
from pathlib import Path

from .base import (LORA, PIPELINE, NodeError, StageNode, build_stage, family_classes, finish_stage, loras_folder,
                   model_inputs, node_slots, registry, set_if, stage_inputs, step_files, task_widget, tip)

TRAIN_CONFIG = "MUSUBI_TRAIN_CONFIG"
OPTIMIZER_CONFIG = "MUSUBI_OPTIMIZER_CONFIG"
SAMPLING_CONFIG = "MUSUBI_SAMPLING_CONFIG"
MEMORY_CONFIG = "MUSUBI_MEMORY_CONFIG"
DEFAULT = "(default)"


def train_defaults() -> dict:
    """The default family's training defaults (its family file): the config widgets start there, so
    a widget left alone says what a pipeline file that does not set it says."""
    return registry().family(registry().default_family()).stages["train"].defaults


class TrainingConfig:
    DESCRIPTION = ("LoRA size, learning rate, training length, checkpoint cadence and seed, for a trainer node. A widget "
                   "left at its default leaves the setting to the family template, as a pipeline file that does not set it.")
    CATEGORY = "MusubiTuner/Train"
    RETURN_TYPES = (TRAIN_CONFIG,)
    RETURN_NAMES = ("training_config",)
    OUTPUT_TOOLTIPS = ("connect to a LoRA trainer",)
    FUNCTION = "build"
    # Widgets whose 0 means "not set" rather than a value.
    ZERO_UNSET = ("max_train_epochs", "max_train_steps", "save_every_n_epochs", "save_every_n_steps")

    @classmethod
    def INPUT_TYPES(cls):
        d = train_defaults()
        return {"required": {
            "network_dim": tip("INT", "LoRA rank: bigger learns more detail and makes a bigger file", default=d["network_dim"], min=1, max=1024),
            "network_alpha": tip("FLOAT", "LoRA alpha: scales the update; often dim/2 or 1", default=float(d["network_alpha"]), min=0.0, max=1024.0, step=0.5),
            "learning_rate": tip("FLOAT", "learning rate", default=d["learning_rate"], min=0.0, max=1.0, step=1e-6, round=False),
            "max_train_epochs": tip("INT", "epochs to train (0 = use max_train_steps)", default=d["max_train_epochs"], min=0, max=100000),
            "max_train_steps": tip("INT", "steps to train when epochs is 0", default=0, min=0, max=10000000),
            "save_every_n_epochs": tip("INT", "save a checkpoint every N epochs (0 = the family template's cadence, or with "
                                       "max_train_steps about every eighth of the run); checkpoints protect your work",
                                       default=d["save_every_n_epochs"], min=0, max=100000),
            "save_every_n_steps": tip("INT", "save a checkpoint every N steps (0 = off)", default=0, min=0, max=10000000),
            "save_state": tip("BOOLEAN", "save optimizer state with each checkpoint, so an interrupted run resumes", default=True),
            "seed": tip("INT", "training seed", default=d["seed"], min=0, max=2**31 - 1, control_after_generate=False),
            "gradient_checkpointing": tip("BOOLEAN", "trade speed for much less VRAM", default=d["gradient_checkpointing"]),
        }}

    def build(self, **kw):
        if not kw.get("max_train_epochs") and not kw.get("max_train_steps"):
            raise NodeError("set max_train_epochs or max_train_steps (both are 0)")
        defaults = train_defaults()
        casts = {"network_alpha": float, "learning_rate": float, "save_state": bool, "gradient_checkpointing": bool}
        config: dict = {}
        for key, value in kw.items():
            if key in self.ZERO_UNSET and not value:
                continue
            if key in defaults and value == defaults[key]:
                continue  # the family template's value: a pipeline file says it by not setting it
            if key == "save_state" and not value:
                continue  # musubi's default
            config[key] = casts.get(key, lambda v: v)(value)
        return (config,)


class OptimizerConfig:
    DESCRIPTION = "Optimizer type and arguments, learning-rate scheduler and warmup, for a trainer node."
    CATEGORY = "MusubiTuner/Train"
    RETURN_TYPES = (OPTIMIZER_CONFIG,)
    RETURN_NAMES = ("optimizer_config",)
    OUTPUT_TOOLTIPS = ("connect to a LoRA trainer",)
    FUNCTION = "build"
    SCHEDULERS = ["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial"]

    @classmethod
    def INPUT_TYPES(cls):
        default = train_defaults()["optimizer_type"]
        kinds = list(dict.fromkeys([default, "AdamW", "AdaFactor", "custom"]))
        return {"required": {
            "optimizer_type": (kinds, {"default": default, "tooltip": "optimizer; custom = the class path below"}),
            "custom_optimizer": tip("STRING", "a dotted class path such as prodigyopt.Prodigy (when optimizer_type is custom)", default=""),
            "optimizer_args": tip("STRING", "optimizer arguments as key=value, space separated (e.g. weight_decay=0.01)", default=""),
            "lr_scheduler": (cls.SCHEDULERS, {"default": cls.SCHEDULERS[0], "tooltip": "learning-rate schedule"}),
            "lr_warmup_steps": tip("INT", "warmup steps (0 = none)", default=0, min=0, max=1000000),
            "max_grad_norm": tip("FLOAT", "gradient clipping (0 = the template's default)", default=0.0, min=0.0, max=100.0, step=0.1),
        }}

    def build(self, optimizer_type, custom_optimizer, optimizer_args, lr_scheduler, lr_warmup_steps, max_grad_norm):
        kind = custom_optimizer.strip() if optimizer_type == "custom" else optimizer_type
        if not kind:
            raise NodeError("optimizer_type is custom but custom_optimizer is empty; give a class path such as prodigyopt.Prodigy")
        config: dict = {}
        # Left at their defaults (the family template's optimizer, musubi's constant schedule),
        # they say what a pipeline file that does not set them says.
        set_if(config, "optimizer_type", kind, train_defaults()["optimizer_type"])
        set_if(config, "lr_scheduler", lr_scheduler, self.SCHEDULERS[0])
        if optimizer_args.split():
            config["optimizer_args"] = optimizer_args.split()
        set_if(config, "lr_warmup_steps", lr_warmup_steps)
        set_if(config, "max_grad_norm", max_grad_norm, 0.0)
        return (config,)


class SamplingConfig:
    DESCRIPTION = ("Timestep sampling and discrete flow shift for training, and the prompts of sample videos made "
                   "during training to watch progress.")
    CATEGORY = "MusubiTuner/Train"
    RETURN_TYPES = (SAMPLING_CONFIG,)
    RETURN_NAMES = ("sampling_config",)
    OUTPUT_TOOLTIPS = ("connect to a LoRA trainer",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "timestep_sampling": ([DEFAULT, "shift", "sigmoid", "uniform", "sigma", "flux_shift", "qwen_shift", "logsnr", "qinglong_flux", "qinglong_qwen"],
                                  {"default": DEFAULT, "tooltip": "how training timesteps are drawn"}),
            "discrete_flow_shift": tip("FLOAT", "flow shift for training (0 = the template's default)", default=0.0, min=0.0, max=100.0, step=0.1),
            "sample_prompts": tip("STRING", "one prompt per line for sample videos during training (empty = none)", multiline=True, default=""),
            "sample_every_n_epochs": tip("INT", "make samples every N epochs (0 = off)", default=0, min=0, max=100000),
            "sample_every_n_steps": tip("INT", "make samples every N steps (0 = off)", default=0, min=0, max=10000000),
            "sample_at_first": tip("BOOLEAN", "also make samples before training starts", default=False),
        }}

    def build(self, timestep_sampling, discrete_flow_shift, sample_prompts, sample_every_n_epochs, sample_every_n_steps, sample_at_first):
        config: dict = {}
        set_if(config, "timestep_sampling", timestep_sampling, DEFAULT)
        set_if(config, "discrete_flow_shift", discrete_flow_shift, 0.0)
        prompts = [line.strip() for line in sample_prompts.splitlines() if line.strip()]
        if prompts:
            config["sample_prompts"] = [{"text": p} for p in prompts]
            set_if(config, "sample_every_n_epochs", sample_every_n_epochs)
            set_if(config, "sample_every_n_steps", sample_every_n_steps)
            set_if(config, "sample_at_first", sample_at_first, False)
        return (config,)


def memory_fields(memory: dict | None, for_training: bool) -> dict:
    """The Memory Optimizer's choices (tools.memory.MemoryPlan.memory_config) as the fields of a
    train or generate stage."""
    if not memory:
        return {}
    out: dict = {}
    if memory.get("fp8"):
        out["fp8_base" if for_training else "fp8"] = True
        if memory.get("fp8_scaled"):
            out["fp8_scaled"] = True
    set_if(out, "blocks_to_swap", memory.get("blocks_to_swap", 0))
    set_if(out, "split_attn", memory.get("split_attn", False), False)
    if for_training and "gradient_checkpointing" in memory:
        # Set either way: "off" must override the family template's and the Training Config's "on".
        out["gradient_checkpointing"] = bool(memory["gradient_checkpointing"])
    return out


def sample_previews(output_dir: str, node_id, keep: int = 4) -> list[dict]:
    """The newest samples musubi made during training, copied where ComfyUI's /view serves them."""
    import shutil

    import folder_paths

    from ..files import atomic_path

    folder = Path(output_dir) / "sample"
    if not output_dir or not folder.is_dir():
        return []
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".webp", ".mp4", ".webm")),
                   key=lambda p: p.stat().st_mtime)[-keep:]
    target = Path(folder_paths.get_temp_directory()) / "musubi-pipe" / f"samples-{node_id}"
    shown = []
    for p in files:
        with atomic_path(target / p.name) as tmp:  # /view may serve the file while it is copied
            shutil.copyfile(p, tmp)
        shown.append({"filename": p.name, "subfolder": f"musubi-pipe/samples-{node_id}", "type": "temp"})
    return shown


class _Trainer(StageNode):
    FAMILY = ""
    SLOTS: tuple[str, ...] = ()
    CATEGORY = "MusubiTuner/Train"
    RETURN_TYPES = (PIPELINE, LORA, "STRING")
    RETURN_NAMES = ("pipeline", "lora", "lora_path")
    OUTPUT_TOOLTIPS = ("the pipeline with this stage", "the trained LoRA, for generators, converters and EMA",
                       "the trained LoRA file (in ComfyUI's loras folder unless save_to says otherwise)")

    @classmethod
    def INPUT_TYPES(cls):
        fam = registry().family(cls.FAMILY)
        required, optional, hidden = stage_inputs("train")
        if fam.tasks:  # kept where saved workflows have it; the pipeline's task is what counts
            required["task"] = task_widget(fam.task_names(), "what the LoRA is trained for")
        required.update(model_inputs(*cls.SLOTS, families=[fam]))
        required["output_name"] = tip("STRING", "LoRA file name without extension (empty = the pipeline name)", default="")
        required["save_to"] = (["loras folder", "pipeline workdir"], {"default": "loras folder", "tooltip": "loras folder: ComfyUI's LoRA loaders list the result (and every checkpoint)"})
        required["attention"] = ([DEFAULT, *fam.training["attention"]], {"default": DEFAULT, "tooltip": "attention implementation for training"})
        if fam.experts:
            two = ", ".join(t.title for t in fam.tasks.values() if t.get("experts"))
            required["expert"] = (["none", *fam.experts["slots"]], {"default": "none", "tooltip": f"{two}: which noise expert "
                                  "this run trains (one trainer node each); none for the other tasks"})
        optional.update({
            "training_config": (TRAIN_CONFIG, {"tooltip": "from LoRA Training Config"}),
            "optimizer_config": (OPTIMIZER_CONFIG, {"tooltip": "from Optimizer Config"}),
            "sampling_config": (SAMPLING_CONFIG, {"tooltip": "from Sampling Config"}),
            "memory_config": (MEMORY_CONFIG, {"tooltip": "from Memory Optimizer"}),
        })
        return {"required": required, "optional": optional, "hidden": hidden}

    def document(self, output_name, save_to, attention, task=None, training_config=None, optimizer_config=None,
                 sampling_config=None, memory_config=None, expert="none", **kw) -> tuple[dict, str]:
        """The pipeline with this node's train stage: (pipeline, stage name)."""
        fields: dict = {"expert": expert} if expert != "none" else {}
        set_if(fields, "output_name", output_name.strip(), "")
        set_if(fields, "attention", attention, DEFAULT)
        if save_to == "loras folder":
            name = (kw.get("pipeline") or {}).get("document", {}).get("name", "musubi")
            fields["output_dir"] = str(Path(loras_folder()) / "musubi-pipe" / name)
        return build_stage(kw, "train", self.FAMILY, task, self.SLOTS, fields, training_config, optimizer_config,
                           sampling_config, memory_fields(memory_config, True))

    def run(self, unique_id=None, **kw):
        pipe, stage = self.document(**kw)
        plan, step, _ = finish_stage(pipe, stage, unique_id, chart=True)
        files = step_files(step, "lora")
        if not files:
            raise NodeError(f"{stage}: training finished but {step.output('lora').path} is missing; see the run log in {plan.workdir}")
        path = files[0]
        loras = loras_folder()
        shown = os.path.relpath(path, loras) if Path(path).is_relative_to(loras) else path
        result = (pipe, {"ref": f"@{stage}.lora", "path": path}, shown)
        return {"ui": {"images": sample_previews(step.meta.get("output_dir", ""), unique_id), "animated": (True,),
                       "text": [shown]}, "result": result}


def _trainer_attrs(fam) -> dict:
    tasks = ", ".join(t.title for t in fam.tasks.values()) or fam.title
    return {"SLOTS": node_slots(fam, "train"),
            "DESCRIPTION": f"Trains a {fam.title} LoRA ({tasks}) on the cached dataset, with live loss chart, progress and "
                           "cancel. Family and task come from the pipeline (Dataset Config)."}


NODES = {
    "MusubiTuner_TrainingConfig": (TrainingConfig, "LoRA Training Config (musubi)"),
    "MusubiTuner_OptimizerConfig": (OptimizerConfig, "Optimizer Config (musubi)"),
    "MusubiTuner_SamplingConfig": (SamplingConfig, "Sampling Config (musubi)"),
    **family_classes("train", _Trainer, "{name} LoRA Trainer (musubi)", _trainer_attrs),
}
