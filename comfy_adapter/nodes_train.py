"""Training nodes: config nodes that return plain settings, and one LoRA trainer per registry family."""
from __future__ import annotations

import os
from pathlib import Path

from .base import (LORA, PIPELINE, NodeError, StageNode, build_stage, config_origin, family_classes, finish_stage,
                   format_number, locate_errors, loras_folder, model_inputs, model_paths_input, node_slots, parse_number,
                   registry, set_if, show_text, stage_inputs, step_files, tip)

TRAIN_CONFIG = "MUSUBI_TRAIN_CONFIG"
OPTIMIZER_CONFIG = "MUSUBI_OPTIMIZER_CONFIG"
SAMPLING_CONFIG = "MUSUBI_SAMPLING_CONFIG"
MEMORY_CONFIG = "MUSUBI_MEMORY_CONFIG"
DEFAULT = "(default)"


def train_defaults() -> dict:
    """The default family's training defaults (its family file): the config widgets start there, so
    a widget left alone says what a pipeline file that does not set it says."""
    return registry().family(registry().default_family()).stages["train"].defaults


def parse_learning_rate(value, widget: str = "learning_rate") -> float:
    rate = parse_number(value, widget, above=0.0, maximum=1.0)
    if rate is None:
        raise NodeError(f"{widget} is empty; write a learning rate such as 2e-4")
    return float(rate)


def _sample_fields() -> dict[str, str]:
    """Inline option -> prompt field, for the per-sample options the pipeline language takes
    (the registry's sample_options: musubi's training sample-prompt parser)."""
    from ..dsl.model import Prompt

    return {option: name for name, option in registry().training()["sample_options"].items() if name in Prompt.model_fields}


def sample_options_help() -> str:
    return ", ".join(f"--{option} {name}" for option, name in _sample_fields().items())


def parse_sample_prompts(text: str, widget: str = "sample_prompts") -> list[dict]:
    """One sample per line: its text, then musubi's inline options (`a fox --w 832 --h 480 --f 33
    --s 20 --d 42 --g 5`), as the pipeline language's prompt fields. Every bad line is named."""
    from ..tools.prompts import FLOAT_FIELDS, INT_FIELDS

    fields = _sample_fields()
    prompts, problems = [], []
    for number, line in enumerate((text or "").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        first, *parts = line.split(" --")
        prompt: dict = {"text": first.strip()}
        if not prompt["text"] or prompt["text"].startswith("--"):
            problems.append(f"{widget} line {number}: starts with an option; write the prompt text first")
            continue
        for part in parts:
            option, _, value = part.strip().partition(" ")
            value = value.strip()
            name = fields.get(option)
            if name is None:
                problems.append(f"{widget} line {number}: --{option} is not a sample option; use one of {sample_options_help()}")
                continue
            if not value:
                problems.append(f"{widget} line {number}: --{option} ({name}) has no value")
                continue
            if name in INT_FIELDS or name in FLOAT_FIELDS:
                try:
                    parsed = parse_number(value, f"{widget} line {number}: --{option} ({name})", integer=name in INT_FIELDS,
                                          minimum=0)
                except NodeError as err:
                    problems.append(str(err))
                    continue
                prompt[name] = parsed
            elif name == "control_images":
                prompt.setdefault(name, []).append(value)
            else:
                prompt[name] = value
        prompts.append(prompt)
    if problems:
        raise NodeError("\n".join(problems))
    return prompts


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
            "learning_rate": tip("STRING", "learning rate, typed as a number such as 2e-4 or 0.0002 (text: ComfyUI's "
                                 "number widgets round small values to 0)", default=format_number(d["learning_rate"])),
            "max_train_epochs": tip("INT", "epochs to train (0 = use max_train_steps)", default=d["max_train_epochs"], min=0, max=100000),
            "max_train_steps": tip("INT", "steps to train when epochs is 0", default=0, min=0, max=10000000),
            "save_every_n_epochs": tip("INT", "save a checkpoint every N epochs (0 = the family template's cadence, or with "
                                       "max_train_steps about every eighth of the run); checkpoints protect your work",
                                       default=d["save_every_n_epochs"], min=0, max=100000),
            "save_every_n_steps": tip("INT", "save a checkpoint every N steps (0 = off)", default=0, min=0, max=10000000),
            "save_state": tip("BOOLEAN", "save optimizer state with each checkpoint, so an interrupted run resumes", default=True),
            "seed": tip("INT", "training seed", default=d["seed"], min=0, max=2**31 - 1, control_after_generate=False),
            "gradient_checkpointing": tip("BOOLEAN", "trade speed for much less VRAM", default=d["gradient_checkpointing"]),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    @locate_errors
    def build(self, unique_id=None, **kw):
        if not kw.get("max_train_epochs") and not kw.get("max_train_steps"):
            raise NodeError("set max_train_epochs or max_train_steps (both are 0)")
        defaults = train_defaults()
        kw["learning_rate"] = parse_learning_rate(kw["learning_rate"])
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
        return (config_origin(config, self, unique_id),)


def default_grad_norm() -> float:
    from .base import real_default

    return real_default(registry().family(registry().default_family()), "train", "max_grad_norm") or 0.0


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
            "max_grad_norm": tip("FLOAT", f"gradient clipping (musubi's default: {default_grad_norm()}; 0 also leaves it to "
                                 "the default, as workflows saved before wrote it)",
                                 default=default_grad_norm(), min=0.0, max=100.0, step=0.1),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    @locate_errors
    def build(self, optimizer_type, custom_optimizer, optimizer_args, lr_scheduler, lr_warmup_steps, max_grad_norm, unique_id=None):
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
        if max_grad_norm not in (0.0, default_grad_norm()):
            config["max_grad_norm"] = max_grad_norm
        return (config_origin(config, self, unique_id),)


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
            "discrete_flow_shift": tip("STRING", "flow shift for training: a number, or default = the family template's "
                                       "(it depends on the family chosen on Dataset Config; the trainer's text says what it "
                                       "resolved to)", default="default"),
            "sample_prompts": tip("STRING", "one prompt per line for samples made during training (empty = none); a line "
                                  "may end with musubi's per-sample options: " + sample_options_help(), multiline=True, default=""),
            "sample_every_n_epochs": tip("INT", "make samples every N epochs (0 = off)", default=0, min=0, max=100000),
            "sample_every_n_steps": tip("INT", "make samples every N steps (0 = off)", default=0, min=0, max=10000000),
            "sample_at_first": tip("BOOLEAN", "also make samples before training starts", default=False),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    @locate_errors
    def build(self, timestep_sampling, discrete_flow_shift, sample_prompts, sample_every_n_epochs, sample_every_n_steps,
              sample_at_first, unique_id=None):
        config: dict = {}
        set_if(config, "timestep_sampling", timestep_sampling, DEFAULT)
        shift = parse_number(discrete_flow_shift, "discrete_flow_shift", above=0.0) if discrete_flow_shift not in (0, 0.0) else None
        if shift is not None:  # 0 is what workflows saved before wrote for the default
            config["discrete_flow_shift"] = float(shift)
        prompts = parse_sample_prompts(sample_prompts)
        if prompts:
            config["sample_prompts"] = prompts
            set_if(config, "sample_every_n_epochs", sample_every_n_epochs)
            set_if(config, "sample_every_n_steps", sample_every_n_steps)
            set_if(config, "sample_at_first", sample_at_first, False)
        return (config_origin(config, self, unique_id),)


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


SAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".mp4", ".webm")


def newest_samples(output_dir: str, keep: int = 4) -> list[Path]:
    """The newest sample files musubi wrote during training (its output_dir/sample), oldest first."""
    folder = Path(output_dir) / "sample" if output_dir else None
    if folder is None or not folder.is_dir():
        return []
    files = [p for p in folder.iterdir() if p.suffix.lower() in SAMPLE_SUFFIXES and not p.name.startswith(".")]
    return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))[-keep:]


def sample_previews(files: list[Path], node_id) -> list[dict]:
    """Sample files copied where ComfyUI's /view serves them (its temp folder), for the node's preview."""
    import shutil

    import folder_paths

    from ..files import atomic_path

    target = Path(folder_paths.get_temp_directory()) / "musubi-pipe" / f"samples-{node_id}"
    shown = []
    for p in files:
        with atomic_path(target / p.name) as tmp:  # /view may serve the file while it is copied
            shutil.copyfile(p, tmp)
        shown.append({"filename": p.name, "subfolder": f"musubi-pipe/samples-{node_id}", "type": "temp"})
    return shown


def note_image(text: str, size: int = 64):
    """A black picture with a short note: what an IMAGE output holds when there is nothing to show
    (a downstream Preview or Save Image still gets a valid batch)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(text.split("\n")):
        draw.text((3, 3 + 11 * i), line, fill=(220, 220, 220))
    return img


def samples_image(files: list[Path]):
    """The samples as one IMAGE batch [B, H, W, 3] (a video's first frame), each resized to the
    first one's size; a 1x64x64 black picture saying "no samples" when there are none."""
    from PIL import Image

    from .base import image_tensor

    pictures = []
    for path in files:
        try:
            if path.suffix.lower() in (".mp4", ".webm"):
                from ..tools.video import grab_frames

                picture = grab_frames(path, [0.0])[0]
            else:
                with Image.open(path) as im:
                    picture = im.convert("RGB")
        except Exception:  # a sample being written or unreadable: leave it out
            continue
        if pictures and picture.size != pictures[0].size:
            picture = picture.resize(pictures[0].size)
        pictures.append(picture)
    if not pictures:
        return image_tensor(note_image("no\nsamples"))
    import torch

    return torch.cat([image_tensor(p) for p in pictures])


def loss_chart(runs: Path, stage: str):
    """The loss chart of the training step as a PIL picture (tools.monitor's chart): from the newest
    run folder (named by start time) in `runs` that trained it, so a step that was up to date
    shows the run that made its LoRA."""
    from ..tools.monitor import TrainingMonitor, TrainingStatus, draw_chart

    status = TrainingStatus()
    folders = sorted((p for p in runs.iterdir() if p.is_dir()), reverse=True) if runs.is_dir() else []
    for folder in folders[:20]:
        status = TrainingMonitor(folder, step=stage).poll()
        if status.loss_series().values:
            break
    return draw_chart(status, 640, 320)


# Files this pack copied into ComfyUI's loras folder, with their size and mtime when copied: only
# those may be replaced by a later run; anything else of the same name is the user's.
PLACED_RECORD = "placed-loras.json"


def _placed_record() -> Path:
    from .base import default_base

    return Path(default_base()) / PLACED_RECORD


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def place_file(source: str, target: Path) -> tuple[Path, str]:
    """Copy a trained file into ComfyUI's loras folder atomically (a temporary name the pickers do
    not list, then a rename). A file of the same name that this pack did not put there (or that
    changed since) is never replaced: the copy gets a -2, -3... suffix and the note says so.
    Returns (the copy, a note or "")."""
    import filecmp
    import json
    import os
    import shutil
    import tempfile

    from ..files import write_atomic

    record_path = _placed_record()
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {}
    note = ""
    chosen = target
    for n in range(2, 1000):
        if not chosen.exists():
            break
        if record.get(str(chosen)) == _stamp(chosen):
            break  # ours, unchanged since: a newer run replaces it
        if filecmp.cmp(source, chosen, shallow=False):
            return chosen, ""  # the same file is there already
        chosen = target.with_name(f"{target.stem}-{n}{target.suffix}")
    else:
        raise NodeError(f"copy_to_loras: {target} and 998 suffixed names are taken; clear some, or set copy_to_loras to none")
    if chosen != target:
        note = f"{target.name} in {target.parent} is not one this pack made: kept it, saved this one as {chosen.name}"
    chosen.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{chosen.name}.", suffix=".partial", dir=chosen.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, chosen)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    record[str(chosen)] = _stamp(chosen)
    write_atomic(record_path, json.dumps(record, indent=1) + "\n")
    return chosen, note


# The settings the trainer's text reports, each as set or as the template's default resolved.
REPORTED = ("learning_rate", "max_train_epochs", "network_dim", "network_alpha", "optimizer_type", "timestep_sampling",
            "discrete_flow_shift")


def settings_line(family: str, stage: dict) -> str:
    """What the run trained with: each reported setting as set, or "(default)" where the family
    template (or musubi) decided, e.g. "learning_rate 2e-4 (default), discrete_flow_shift 3 (default)"."""
    from .base import real_default

    fam = registry().family(family)
    parts = []
    for key in REPORTED:
        value = stage.get(key, real_default(fam, "train", key))
        if value is None:
            continue
        shown = format_number(value) if isinstance(value, float) else str(value)
        parts.append(f"{key} {shown}" + ("" if key in stage else " (default)"))
    return "settings: " + ", ".join(parts)


COPY_CHOICES = ["final", "final + epochs", "none"]
MEMORY_PRESETS = {"family template": None, "fit 12 GB": 12.0, "fit 16 GB": 16.0, "fit 24 GB": 24.0, "fit 32 GB": 32.0,
                  "fit 48 GB": 48.0, "fit 80 GB": 80.0}


class _Trainer(StageNode):
    FAMILY = ""
    SLOTS: tuple[str, ...] = ()  # every model the stage reads (model_paths takes each)
    PICKERS: tuple[str, ...] = ()  # those with a picker: what training itself loads (the DiT, each expert's)
    CATEGORY = "MusubiTuner/Train"
    RETURN_TYPES = (PIPELINE, LORA, "STRING", "IMAGE", "IMAGE")
    RETURN_NAMES = ("pipeline", "lora", "lora_path", "loss_chart", "samples")
    OUTPUT_TOOLTIPS = ("the pipeline with this stage", "the trained LoRA, for generators, converters and EMA",
                       "the final LoRA file: its copy in ComfyUI's loras folder (copy_to_loras), else the one in the workdir",
                       "the loss chart of the run (connect Preview Image or Save Image)",
                       "the newest samples made during training as one IMAGE batch (a black 64x64 picture saying "
                       "'no samples' when there are none)")
    # Widgets whose value is a stage field of the same name, left unset at the family template's value.
    MAIN_FIELDS = ("learning_rate", "max_train_epochs", "network_dim")

    @classmethod
    def INPUT_TYPES(cls):
        fam = registry().family(cls.FAMILY)
        d = fam.stages["train"].defaults
        required, optional, hidden = stage_inputs("train")
        required.update(model_inputs(*cls.PICKERS, families=[fam]))
        required["learning_rate"] = tip("STRING", f"learning rate as text, such as 2e-4 (the {fam.title} template's: "
                                        f"{format_number(d['learning_rate'])})", default=format_number(d["learning_rate"]))
        required["max_train_epochs"] = tip("INT", "epochs to train", default=d.get("max_train_epochs", 16), min=1, max=100000)
        required["network_dim"] = tip("INT", "LoRA rank: bigger learns more detail and makes a bigger file",
                                      default=d.get("network_dim", 32), min=1, max=1024)
        required["memory_preset"] = (list(MEMORY_PRESETS), {"default": "family template", "tooltip": "memory settings: the "
                                     "family template's, or the fastest settings (fp8, block swap, checkpointing) that fit a "
                                     "GPU of this size; a Memory Optimizer on memory_config decides instead when connected"})
        required["copy_to_loras"] = (COPY_CHOICES, {"default": "final", "tooltip": "what goes to ComfyUI's loras folder "
                                     "(loras/musubi-pipe/<pipeline name>/): the final LoRA, also each saved epoch's, or "
                                     "nothing. Checkpoints, states, samples and logs stay in the pipeline's workdir"})
        required["keep_checkpoints"] = tip("INT", "how many of the newest epoch (or step) checkpoints and states to keep "
                                           "in the workdir; older ones the run saved are removed as it goes (0 = keep all)",
                                           default=0, min=0, max=10000)
        if fam.experts:
            two = ", ".join(t.title for t in fam.tasks.values() if t.get("experts"))
            required["expert"] = (["none", *fam.experts["slots"]], {"default": "none", "tooltip": f"{two}: which noise expert "
                                  "this run trains (one trainer node each); none for the other tasks"})
        optional["options"] = tip("STRING", "every other setting in the pipeline language, one `name = value` per line, "
                                  "e.g. output_name = \"my-style\", attention = \"flash\", network_alpha = 16, "
                                  "save_every_n_epochs = 1 (later wins over the widgets and config nodes)", multiline=True, default="")
        optional["model_paths"] = model_paths_input(cls.SLOTS)
        optional.update({
            "training_config": (TRAIN_CONFIG, {"tooltip": "advanced: from LoRA Training Config (alpha, cadence, seed...); "
                                "this node's widgets win where changed from the template's value"}),
            "optimizer_config": (OPTIMIZER_CONFIG, {"tooltip": "advanced: from Optimizer Config"}),
            "sampling_config": (SAMPLING_CONFIG, {"tooltip": "advanced: from Sampling Config (sample prompts with per-sample size, "
                                "frames, steps, seed, guidance)"}),
            "memory_config": (MEMORY_CONFIG, {"tooltip": "advanced: from Memory Optimizer (wins over memory_preset)"}),
        })
        return {"required": required, "optional": optional, "hidden": hidden}

    def document(self, learning_rate=None, max_train_epochs=None, network_dim=None, memory_preset="family template",
                 keep_checkpoints=0, training_config=None, optimizer_config=None, sampling_config=None, memory_config=None,
                 expert="none", unique_id=None, copy_to_loras="final", **kw) -> tuple[dict, str]:
        """The pipeline with this node's train stage: (pipeline, stage name). Family and task are
        the pipeline's (Dataset Config); the three main widgets set their field only when changed
        from the family template's value, so that a config node (or the template) decides otherwise."""
        defaults = registry().family(self.FAMILY).stages["train"].defaults
        fields: dict = {"expert": expert} if expert != "none" else {}
        values = {"learning_rate": None if learning_rate is None else parse_learning_rate(learning_rate),
                  "max_train_epochs": max_train_epochs, "network_dim": network_dim}
        for key, value in values.items():
            if value is not None and value != defaults.get(key):
                fields[key] = value
        gib = MEMORY_PRESETS.get(memory_preset)
        if memory_preset not in MEMORY_PRESETS:
            raise NodeError(f"memory_preset: {memory_preset!r} is not one of {', '.join(MEMORY_PRESETS)}")
        if gib and not memory_config:
            fields["gpu_memory_gib"] = gib
        pipe, name = build_stage(kw, "train", self.FAMILY, None, self.SLOTS, fields, training_config, optimizer_config,
                                 sampling_config, memory_fields(memory_config, True), origin=(self, unique_id),
                                 widgets={"gpu_memory_gib": "memory_preset"})
        if keep_checkpoints:
            # musubi removes its own older checkpoints as it saves new ones, and the states with
            # them (save_last_n_*_state defaults to save_last_n_*): nothing else in the folder is touched.
            stage = pipe["document"]["stages"][name]
            by_steps = bool(stage.get("save_every_n_steps")) and not stage.get("save_every_n_epochs")
            key = "save_last_n_steps" if by_steps else "save_last_n_epochs"
            stage.setdefault(key, keep_checkpoints)
            origin = pipe.get("nodes", {}).get(f"stages.{name}")
            if origin:
                origin["widgets"][key] = "keep_checkpoints"
        return pipe, name

    def run(self, copy_to_loras="final", unique_id=None, **kw):
        if copy_to_loras not in COPY_CHOICES:
            raise NodeError(f"copy_to_loras: {copy_to_loras!r} is not one of {', '.join(COPY_CHOICES)}")
        pipe, stage = self.document(unique_id=unique_id, **kw)
        plan, step, run = finish_stage(pipe, stage, unique_id, chart=True)
        files = step_files(step, "lora")
        if not files:
            raise NodeError(f"{stage}: training finished but {step.output('lora').path} is missing; see the run log in {plan.workdir}")
        final = files[0]
        path, notes = final, []
        if copy_to_loras != "none":
            folder = Path(loras_folder()) / "musubi-pipe" / pipe["document"].get("name", "musubi")
            if not folder.resolve().is_relative_to(Path(loras_folder()).resolve()):  # the compiler checked the name; be sure
                raise NodeError(f"copy_to_loras: {folder} is outside ComfyUI's loras folder; give the pipeline a plain name")
            path, note = place_file(final, folder / Path(final).name)
            notes += [note] if note else []
            if copy_to_loras == "final + epochs":
                for checkpoint in step_files(step, "checkpoints"):
                    if checkpoint != final:
                        _, note = place_file(checkpoint, folder / Path(checkpoint).name)
                        notes += [note] if note else []
        path = str(path)
        from .base import _MADE, remember_outputs

        # A copy deleted from the loras folder makes the node run again (IS_CHANGED), which copies it back.
        remember_outputs(unique_id, [*_MADE.get(str(unique_id), []), path])
        loras = loras_folder()
        shown = os.path.relpath(path, loras) if Path(path).is_relative_to(loras) else path
        samples = newest_samples(step.meta.get("output_dir", ""))
        chart = loss_chart(Path(run.run_dir).parent if run.run_dir else Path(plan.workdir) / "runs", stage)
        from .base import image_tensor

        status = "\n".join([*notes, settings_line(self.FAMILY, pipe["document"]["stages"][stage]),
                            f"done: {shown}" if copy_to_loras != "none" else f"done: {path}"])
        show_text(unique_id, status)  # the node's progress line ends with where the LoRA is, not "saving 18/18"
        result = (pipe, {"ref": f"@{stage}.lora", "path": path}, path, image_tensor(chart), samples_image(samples))
        return {"ui": {"images": sample_previews(samples, unique_id), "animated": (True,), "text": [status]}, "result": result}


def _trainer_attrs(fam) -> dict:
    tasks = ", ".join(t.title for t in fam.tasks.values()) or fam.title
    slots = node_slots(fam, "train")
    roles = fam.stages["train"].models
    experts = set(fam.experts.get("slots", {}).values())
    return {"SLOTS": slots,
            # The models only samples need (VAE, text encoders) come with the pipeline from the cache nodes.
            "PICKERS": tuple(s for s in slots if s in experts or not str(roles.get(s, "")).startswith("sampling")),
            "DESCRIPTION": f"Trains a {fam.title} LoRA ({tasks}) on the cached dataset, with live loss chart, progress and "
                           "cancel. Family and task come from the pipeline (Dataset Config); the models samples need "
                           "(VAE, text encoders) from the cache nodes. Only the final LoRA goes to ComfyUI's loras folder."}


NODES = {
    "MusubiTuner_TrainingConfig": (TrainingConfig, "LoRA Training Config (musubi)"),
    "MusubiTuner_OptimizerConfig": (OptimizerConfig, "Optimizer Config (musubi)"),
    "MusubiTuner_SamplingConfig": (SamplingConfig, "Sampling Config (musubi)"),
    **family_classes("train", _Trainer, "{name} LoRA Trainer (musubi)", _trainer_attrs),
}
