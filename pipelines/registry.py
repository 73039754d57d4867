"""The musubi registry: everything musubi-pipe knows about musubi-tuner's architectures, read from
pipelines/common.toml and one data file per family (pipelines/families/<name>.toml).

This loader is the only code that knows the files' layout; everything else asks it for a typed
`Family`. Nothing outside the data files spells a family, task or musubi flag name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..files import tomllib

ROOT = Path(__file__).resolve().parent
FAMILY_DIR = ROOT / "families"
STAGE_KINDS = ("check_dataset", "cache_latents", "cache_text_encoder", "train", "finetune", "ema", "convert", "merge",
               "lora_merge", "generate")
# Stage kinds that run one of musubi's training loops (LoRA or full fine-tuning): the same progress,
# checkpoints, state folders and resume.
TRAINING_KINDS = ("train", "finetune")


class UnknownFamily(KeyError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown family {self.name!r}: use one of {', '.join(family_names())}"


@dataclass(frozen=True)
class ModelSlot:
    name: str  # the pipeline's [models] key, which is also musubi's flag
    folder: str  # ComfyUI's model folder
    help: str
    hub: bool = False  # a Hugging Face model ID is accepted too (kept as written when no such path exists)
    download: str = ""  # the page its publisher offers it on
    files: tuple[str, ...] = ()  # the file names it is published as (for any task)
    task_files: dict[str, tuple[str, ...]] = field(default_factory=dict)  # task -> its own file names
    task_download: dict[str, str] = field(default_factory=dict)  # task -> its own download page

    def published(self, task: str | None) -> tuple[tuple[str, ...], str]:
        """The file names this slot's model is published as for `task`, and where to download it."""
        return self.task_files.get(task or "", self.files), self.task_download.get(task or "", self.download)

    def hub_id(self, value: str) -> bool:
        """Whether `value` reads as a Hugging Face model ID (owner/name) that this slot accepts."""
        return self.hub and bool(re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", value))


@dataclass(frozen=True)
class Rung:
    """One step of the memory-saving ladder: the settings it turns on. A value "+N" raises an
    integer by N each time, up to the model's maximum; `smaller` means smaller numbers save memory."""

    settings: dict[str, Any]
    why: str
    smaller: bool = False


@dataclass(frozen=True)
class StageSpec:
    script: str
    launcher: str = "python"
    models: dict[str, str] = field(default_factory=dict)  # slot -> required | sampling | if_task:<prop> | sampling_if_task:<prop>
    defaults: dict[str, Any] = field(default_factory=dict)
    task_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)  # task switch -> defaults
    expert_defaults: dict[str, Any] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # family-neutral field -> this family's musubi option
    ladder: tuple[Rung, ...] = ()
    outputs: dict[str, str] = field(default_factory=dict)  # generate: output type -> file glob
    loras: dict[str, tuple[str, str]] = field(default_factory=dict)  # LoRA field -> (weights, multipliers) options
    prompt_options: dict[str, str] = field(default_factory=dict)  # --from_file line options
    one_frame_drops: tuple[str, ...] = ()  # defaults that do nothing in one-frame inference
    sections_drop: tuple[str, ...] = ()  # defaults that --video_sections replaces
    targets: dict[str, str] = field(default_factory=dict)  # convert: `to` -> --target value
    gpus: int = 1  # GPUs the script uses (0: it never touches CUDA); training's count is accelerate's


@dataclass(frozen=True)
class BlockKind:
    count: int
    params: int  # all parameters of one block
    linear_weights: int  # of which Linear weight matrices (what fp8 stores in one byte)


@dataclass(frozen=True)
class DiT:
    """Memory facts of one DiT, as the planner needs them."""

    title: str
    params: int
    hidden: int
    blocks: tuple[BlockKind, ...]  # (double, single) for HunyuanVideo/FramePack; one kind for Wan
    max_blocks_to_swap: int
    fp8_scaled: bool  # musubi has --fp8_scaled for this family's training
    family: str
    task: str  # the task (or the family's one model) these facts are for; also the LoRA variant

    def swapped(self, n: int) -> tuple[int, ...]:
        """How many blocks of each kind --blocks_to_swap n moves to the CPU (musubi's enable_block_swap)."""
        if n <= 0:
            return tuple(0 for _ in self.blocks)
        if len(self.blocks) == 1:
            return (n,)
        double = n // 2
        return (double, (n - double) * 2 + 1)


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    dit: str  # key of the family's memory facts
    switches: dict[str, Any]  # clip, image_latents, start_image, experts, control, one_frame_only, f1, ...
    expert_timesteps: dict[str, tuple[int, int]] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()  # short spellings users type (lower case)

    def get(self, key: str, default: Any = None) -> Any:
        return self.switches.get(key, default)


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    short: str  # musubi's architecture short name: the cache file suffix
    full: str
    aliases: tuple[str, ...]
    modelspec: tuple[str, ...]
    comfy_name: str
    order: int
    rules: dict[str, Any]
    models: dict[str, ModelSlot]
    tasks: dict[str, Task]  # {} for a family without --task
    default_task: str | None
    model: Task  # the one model of a family without tasks
    experts: dict[str, str]  # expert -> model slot of its DiT
    stages: dict[str, StageSpec]
    dits: dict[str, DiT]  # task (or the model's name) -> memory facts
    lora: dict[str, Any]
    memory: dict[str, Any]  # [memory] beyond the DiT facts: cache rules by GPU size, measured runs
    flags: dict[str, Any]  # role -> musubi option (common, overridden per family)
    training: dict[str, Any]  # common training knowledge (attention flags, optimizers, ...)

    @property
    def output(self) -> str:
        return self.rules["output"]

    @property
    def target_fps(self) -> int:
        return self.rules.get("target_fps", 0)  # 0: an image family has no frame rate

    @property
    def network_module(self) -> str:
        return self.lora["network_module"]

    def rule(self, name: str, default: Any = None) -> Any:
        return self.rules.get(name, default)

    def task(self, name: str | None) -> Task:
        """The task's facts (the default task, or the one model of a family without tasks)."""
        if not self.tasks:
            return self.model
        return self.tasks[name or self.default_task]

    def task_names(self) -> list[str]:
        """Tasks in the file's order, the default first."""
        names = list(self.tasks)
        return sorted(names, key=lambda t: t != self.default_task)

    def resolve_task(self, name: str | None) -> str | None:
        """The task's name as musubi spells it, from any capitalisation or a short alias
        (1.3b, a14b); None if not a task here."""
        if name is None:
            return self.default_task
        for task in self.tasks.values():
            if name.lower() in (task.name.lower(), *task.aliases):
                return task.name
        return None

    def dit(self, task: str | None = None) -> DiT:
        return self.dits[self.task(task).name]

    def flag(self, role: str) -> str:
        """The musubi option a compiler role is spelled as."""
        return self.flags[role]

    def slots(self, *kinds: str) -> tuple[str, ...]:
        """The model slots the given stage kinds use, in the family file's order."""
        used = {slot for kind in kinds if kind in self.stages for slot in self.stages[kind].models}
        return tuple(slot for slot in self.models if slot in used)

    def needed_slots(self, task: str | None, kinds: tuple[str, ...], sampling: bool = False) -> tuple[str, ...]:
        """The model slots the stage kinds cannot run without for `task` (with `sampling`: also those
        samples during training need), in the family file's order."""
        props = self.task(task).switches
        used = set()
        for kind in kinds:
            for slot, mode in (self.stages[kind].models.items() if kind in self.stages else ()):
                when, _, cond = mode.partition(":")
                if {"required": True, "sampling": sampling, "if_task": bool(props.get(cond)),
                        "sampling_if_task": sampling and bool(props.get(cond))}.get(when, False):
                    used.add(slot)
        return tuple(slot for slot in self.models if slot in used)


def _rungs(items: list[dict]) -> tuple[Rung, ...]:
    return tuple(Rung(dict(r["set"]), r["why"], bool(r.get("smaller"))) for r in items)


def _stage(spec: dict) -> StageSpec:
    spec = dict(spec)
    spec["ladder"] = _rungs(spec.get("ladder", []))
    spec["loras"] = {k: tuple(v) for k, v in spec.get("loras", {}).items()}
    for key in ("one_frame_drops", "sections_drop"):
        spec[key] = tuple(spec.get(key, ()))
    return StageSpec(**spec)


def _slot(name: str, m: dict) -> ModelSlot:
    return ModelSlot(name, m["folder"], m["help"], m.get("hub", False), m.get("download", ""), tuple(m.get("files", ())),
                     {t: tuple(v) for t, v in m.get("task_files", {}).items()}, dict(m.get("task_download", {})))


def _task(name: str, data: dict) -> Task:
    data = dict(data)
    title, dit = data.pop("title"), data.pop("dit")
    data.pop("default", None)
    timesteps = {k: tuple(v) for k, v in data.pop("expert_timesteps", {}).items()}
    aliases = tuple(a.lower() for a in data.pop("aliases", ()))
    return Task(name, title, dit, data, timesteps, aliases)


@lru_cache(maxsize=1)
def _common() -> dict:
    return tomllib.loads((ROOT / "common.toml").read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def _load(name: str) -> Family:
    data = tomllib.loads((FAMILY_DIR / f"{name}.toml").read_text(encoding="utf-8"))
    common = _common()
    ident = data["identity"]
    tasks = {t: _task(t, spec) for t, spec in data.get("tasks", {}).items()}
    default_task = next((t for t, spec in data.get("tasks", {}).items() if spec.get("default")), None)
    model = _task(ident["name"], data["model"]) if "model" in data else None
    stages = {kind: _stage(spec) for kind, spec in {**common["stages"], **data["stages"]}.items()}
    flags = {**common["flags"], **data.get("flags", {})}
    flags["loras"] = {k: tuple(v) for k, v in flags["loras"].items()}
    for kind in ("generate", "merge"):
        if kind in stages and not stages[kind].loras:
            stages[kind] = StageSpec(**{**stages[kind].__dict__, "loras": flags["loras"]})
    facts = data["memory"]["dits"]
    dits = {}
    for task in (tasks.values() if tasks else [model]):
        f = facts[task.dit]
        dits[task.name] = DiT(task.title, f["params"], f["hidden"], tuple(BlockKind(*b) for b in f["blocks"]),
                              f["max_blocks_to_swap"], f["fp8_scaled"], ident["name"],
                              task.name if tasks else data["lora"]["default_variant"])
    return Family(
        name=ident["name"], title=ident["title"], short=ident["short"], full=ident["full"],
        aliases=tuple(ident.get("aliases", ())), modelspec=tuple(ident.get("modelspec", ())),
        comfy_name=ident["comfy_name"], order=ident.get("order", 99), rules=data["rules"],
        models={slot: _slot(slot, m) for slot, m in data["models"].items()},
        tasks=tasks, default_task=default_task, model=model or tasks[default_task],
        experts=data.get("experts", {}), stages=stages, dits=dits, lora=data["lora"],
        memory={k: v for k, v in data["memory"].items() if k != "dits"}, flags=flags,
        training=common["training"],
    )


@lru_cache(maxsize=1)
def family_names() -> tuple[str, ...]:
    """Every family's name, in picker order."""
    names = [p.stem for p in FAMILY_DIR.glob("*.toml")]
    return tuple(sorted(names, key=lambda n: (_load(n).order, n)))


def families() -> list[Family]:
    return [_load(n) for n in family_names()]


def _key(name: str) -> str:
    return name.strip().lower().replace(" ", "_")


@lru_cache(maxsize=None)
def canonical(name: str) -> str | None:
    """The family name for any spelling musubi or users use (hv, hunyuan-video, wan2.2, fpack, ...)."""
    key = _key(name)
    for fam in families():
        if key in (fam.name, fam.short, fam.full) or key in fam.aliases or key in fam.modelspec:
            return fam.name
    for fam in families():  # a release's spelling, such as wan2.1-t2v
        prefix = fam.rules.get("alias_prefix")
        if prefix and key.startswith(prefix):
            return fam.name
    return None


def family(name: str) -> Family:
    """A family by name or alias; UnknownFamily otherwise."""
    found = canonical(name)
    if found is None:
        raise UnknownFamily(name)
    return _load(found)


def family_of_modelspec(architecture: str) -> str | None:
    """'wan2.1/lora' -> the Wan family's name; None for an architecture musubi-pipe does not know."""
    base = architecture.split("/")[0].strip().lower()
    for fam in families():
        if base in (m.lower() for m in fam.modelspec):
            return fam.name
    return None


def by_short_name(short: str) -> Family | None:
    for fam in families():
        if fam.short == short:
            return fam
    return None


def all_task_names() -> set[str]:
    return {t for fam in families() for t in fam.tasks}


def training() -> dict[str, Any]:
    """What musubi's training does the same for every family (common.toml [training])."""
    return dict(_common()["training"])


def finetune_rules() -> dict[str, Any]:
    """The rules musubi's full fine-tuning scripts enforce (common.toml [finetune])."""
    return dict(_common()["finetune"])


def policy() -> dict[str, list[str]]:
    """What options can do beyond their step (common.toml [policy]): load code, send data, write."""
    return dict(_common()["policy"])


def option(role: str) -> str:
    """A musubi option every family spells the same, as a flag ("--resume"), by its role."""
    return "--" + _common()["flags"][role]


def stage_gpus(family_name: str, kind: str) -> int:
    """GPUs one step of this stage kind uses (a training step's are accelerate's processes instead);
    1 for what the registry does not know."""
    name = canonical(family_name)
    spec = family(name).stages.get(kind) if name else None
    return spec.gpus if spec else 1


def launch_flags() -> dict[str, str]:
    """accelerate launch's options by role (musubi's training scripts run under accelerate)."""
    return dict(_common()["launch"])


def default_family() -> str:
    """The family pickers start on (the first in picker order)."""
    return family_names()[0]
