"""What every MusubiTuner node shares: the pipeline document travelling between nodes, model
pickers over ComfyUI's folders, and running a compiled plan inside ComfyUI with progress and cancel.

Node API: the legacy ("V1") class API (INPUT_TYPES/RETURN_TYPES/FUNCTION). ComfyUI 0.3.x and the
current releases load it unchanged, while the V3 `comfy_api.latest` schema changed between
0.3.x releases; and a pack exporting NODE_CLASS_MAPPINGS is never read through the V3 entrypoint.

ComfyUI modules (folder_paths, comfy.*, server) are imported inside functions: the pack imports
without ComfyUI (tests, the command line) and without torch.
"""
from __future__ import annotations

import copy
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

EVENT_MESSAGE = "musubi_pipe.event"  # websocket message carrying an executor Event (format: event_message)
PROGRESS_INTERVAL_S = 0.25  # at most 4 progress messages a second per node (see Run._forward)
# OUTPUT events executors.progress reads from musubi's log while a step runs (each saved checkpoint):
# throttled with progress; the step's result files come as other OUTPUT events at its end.
SAVED_WHILE_RUNNING = ("checkpoint", "file")
PIPELINE = "MUSUBI_PIPELINE"  # {"document": pipeline dict, "base": folder relative paths resolve against}
LORA = "MUSUBI_LORA"  # {"ref": "@stage.lora" or "", "path": file}
NONE = "(none)"

FROM_PIPELINE = "(from pipeline)"  # a family or task widget that only confirms what the pipeline socket carries
DEFAULT_TASK = "(default)"  # the family's default task


def registry():
    """The musubi registry (pipelines/): families, tasks, model slots, defaults. Everything this
    pack knows about musubi-tuner's architectures is read from it."""
    from ..pipelines import registry as reg

    return reg


class NodeError(Exception):
    """A failure shown on the node: a line of cause and fix per problem, no stack trace needed.
    `located`: each line already names the node (and widget) to fix."""

    def __init__(self, message: str, located: bool = False):
        super().__init__(message)
        self.located = located


def node_title(node: Any) -> str:
    """A node's display name without the pack's "(musubi)" suffix, as error messages name it."""
    from .nodes import NODE_DISPLAY_NAME_MAPPINGS

    cls = node if isinstance(node, type) else type(node)
    title = NODE_DISPLAY_NAME_MAPPINGS.get(f"MusubiTuner_{cls.__name__}", cls.__name__)
    return title.replace(" (musubi)", "").replace(" (musubi, deprecated)", "")


def where(node: Any, node_id: Any) -> str:
    return f"{node_title(node)} (node {node_id})" if node_id is not None else node_title(node)


def locate_errors(fn):
    """Wrap a node's function: a NodeError its own code raises is prefixed, line by line, with the
    node's name and id ("Dataset Config (node 3): media_folder ..."), so the message says which
    node to fix even when ComfyUI shows it elsewhere."""
    import functools

    @functools.wraps(fn)
    def wrapper(self, *args, **kw):
        try:
            return fn(self, *args, **kw)
        except NodeError as err:
            if err.located:
                raise
            import re

            prefix = where(self, kw.get("unique_id"))
            lines = str(err).splitlines() or [""]
            # A line that names its node already (a compiler problem traced to the node that set
            # the field) keeps it; the others are this node's.
            named = re.compile(r"^[^:\n]+ \(node [^)]+\): ")
            raise NodeError("\n".join(line if named.match(line) else f"{prefix}: {line}" for line in lines),
                            located=True) from None

    wrapper.__located__ = True
    return wrapper


# ----------------------------------------------------------------------------- widgets


def tip(kind: Any, tooltip: str, **options: Any) -> tuple:
    return (kind, {"tooltip": tooltip, **options})


# The node of a family that runs each stage kind: MusubiTuner_<comfy_name><suffix>, one class per
# registry family (ids stay stable, so saved workflows keep loading).
FAMILY_NODE_SUFFIX = {"cache_latents": "LatentCache", "cache_text_encoder": "TextEncoderCache", "train": "Trainer",
                      "generate": "Generator"}


def family_node_id(fam, kind: str) -> str:
    return f"MusubiTuner_{fam.comfy_name}{FAMILY_NODE_SUFFIX[kind]}"


def family_classes(kind: str, base: type, title: str, attrs) -> dict[str, tuple[type, str]]:
    """One node class per registry family, made from `base` with the family's attributes
    (attrs(fam) -> dict): {node id: (class, display name)}. `title` formats the display name."""
    out = {}
    for fam in registry().families():
        if kind not in fam.stages:
            continue
        node_id = family_node_id(fam, kind)
        cls = type(node_id.removeprefix("MusubiTuner_"), (base,), {"__module__": base.__module__, "FAMILY": fam.name, **attrs(fam)})
        out[node_id] = (cls, title.format(name=fam.comfy_name, output=fam.output.capitalize()))
    return out


def family_choices() -> list[str]:
    """The registry's families for a family picker, in its picker order (the default first)."""
    return list(registry().family_names())


def all_task_choices() -> list[str]:
    """Every family's tasks, family by family (for a node whose family is not fixed)."""
    seen: dict[str, None] = {}
    for fam in registry().families():
        seen.update(dict.fromkeys(fam.task_names()))
    return list(seen)


def family_widget(tooltip: str) -> tuple:
    """A family picker that defaults to the pipeline socket's family (set once, on Dataset Config)."""
    return ([FROM_PIPELINE, *family_choices()], {"default": FROM_PIPELINE, "tooltip": f"{tooltip}; {FROM_PIPELINE}: the "
             "connected pipeline's (chosen on Dataset Config); another value must agree with it"})


def task_widget(tasks: list[str], tooltip: str) -> tuple:
    """A task picker that defaults to the pipeline socket's task."""
    return ([FROM_PIPELINE, *tasks], {"default": FROM_PIPELINE, "tooltip": f"{tooltip}; {FROM_PIPELINE}: the connected "
             "pipeline's task (chosen on Dataset Config), else the family's default; another value must agree with it"})


def accepts(fam, kind: str, field: str) -> bool:
    """Whether the family's script for `kind` takes this pipeline-language field (under the name
    the family's [stages.<kind>] aliases give it), by the recorded command-line contract: a node
    shows a widget only where it does something."""
    from ..compiler import contract

    spec = fam.stages[kind]
    option = spec.aliases.get(field, field)
    known = contract.options(spec.script)
    return all(o in known for o in (option if isinstance(option, list) else [option]))


def has_role(fam, kind: str, role: str) -> bool:
    """Whether the family's script for `kind` has the option the compiler fills for `role` (the
    registry's [flags]), by the recorded contract."""
    from ..compiler import contract

    return fam.flag(role) in contract.options(fam.stages[kind].script)


def real_default(fam, kind: str, field: str) -> Any:
    """What a stage field is when a pipeline does not set it: the family template's default (the
    registry), else musubi's own default for the option (the recorded parser); None when neither
    says (musubi then takes it from the task's config, or the dataset's)."""
    spec = fam.stages[kind]
    option = spec.aliases.get(field, field)
    if isinstance(option, list):
        return None
    if option in spec.defaults:
        return spec.defaults[option]
    return recorded_default(spec.script, option)


def recorded_default(script: str, option: str) -> Any:
    """musubi's argparse default of an option, from the recorded parser (None when it has none)."""
    import json

    from ..compiler import contract

    path = contract.CONTRACT_ROOT / contract.CONTRACT / (script.removesuffix(".py") + ".json")
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))["args"]
    except (OSError, ValueError, KeyError):
        return None
    return next((a.get("default") for a in recorded if a.get("dest") == option), None)


def slot_folder(slot: str) -> str:
    """ComfyUI's model folder of a model slot (the registry's [models.<slot>] folder)."""
    for fam in registry().families():
        if slot in fam.models:
            return fam.models[slot].folder
    raise KeyError(slot)


def slot_help(slot: str, families) -> str:
    """The registry's help of a model slot, per family where a node serves several."""
    owners = [fam for fam in families if slot in fam.models]
    helps = list(dict.fromkeys(fam.models[slot].help for fam in owners))
    if len(helps) == 1:
        return helps[0]
    return "; ".join(f"{fam.title}: {fam.models[slot].help}" for fam in owners)


def node_slots(fam, kind: str) -> tuple[str, ...]:
    """The model slots a node running `kind` for this family shows, in the family file's order:
    those its stage reads, and for training each expert's DiT (a two-expert task trains one per run)."""
    used = set(fam.slots(kind))
    if kind == "train":
        used |= set(fam.experts.get("slots", {}).values())
    return tuple(slot for slot in fam.models if slot in used)


def union_slots(kind: str) -> tuple[str, ...]:
    """The model slots any family's `kind` stage reads (for a node whose family is not fixed)."""
    seen: dict[str, None] = {}
    for fam in registry().families():
        seen.update(dict.fromkeys(node_slots(fam, kind)))
    return tuple(seen)


def model_inputs(*slots: str, families=None, legacy: bool = False) -> dict[str, tuple]:
    """A picker over ComfyUI's model folder per slot; folder and help from the registry (of
    `families`, default all). A file outside ComfyUI's folders goes in the node's `model_paths`
    text (model_paths_input). `legacy`: the layout workflows saved before keep (by position):
    each picker followed by its free path, the DiT's also by its dtype."""
    families = families or registry().families()
    out: dict[str, tuple] = {}
    for slot in slots:
        folder, help_ = slot_folder(slot), slot_help(slot, families)
        out[slot] = ([NONE, *model_files(folder)],
                     {"default": NONE, "tooltip": f"{help_} ({folder} folder); {NONE} if unused or given in model_paths"})
        if legacy:
            out[f"{slot}_path"] = ("STRING", {"default": "", "tooltip": f"{help_} as a file path (overrides the picker)"})
            if slot == "dit":
                out["dit_dtype"] = (["auto", "bf16", "fp16", "fp32"], {"default": "auto", "tooltip": "dtype of the DiT weights; auto guesses it from the file name"})
    return out


def model_paths_input(slots: tuple[str, ...]) -> tuple:
    """One text for model files outside ComfyUI's folders (and the DiT's dtype), instead of a path
    widget beside every picker."""
    names = ", ".join([*slots, *(["dit_dtype"] if "dit" in slots else [])])
    return ("STRING", {"multiline": True, "default": "", "tooltip": "model files outside ComfyUI's model folders, one "
                       f"`slot = path` per line (overrides the picker); slots: {names} (dit_dtype = bf16, fp16 or fp32; "
                       "default: guessed from the file name)"})


def parse_model_paths(text: str, slots: tuple[str, ...], widget: str = "model_paths") -> dict[str, str]:
    """`slot = path` lines (quotes optional, # comments): {slot: path}; each bad line named."""
    allowed = [*slots, *(["dit_dtype"] if "dit" in slots else [])]
    out: dict[str, str] = {}
    problems = []
    for number, line in enumerate((text or "").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = (part.strip() for part in line.partition("="))
        value = value.strip("\"'")
        if not sep or not value:
            problems.append(f"{widget} line {number}: write `slot = path` (got {line[:60]!r})")
        elif name not in allowed:
            problems.append(f"{widget} line {number}: {name!r} is not a model slot of this node; use one of {', '.join(allowed)}")
        elif name == "dit_dtype" and value not in ("auto", "bf16", "fp16", "fp32"):
            problems.append(f"{widget} line {number}: dit_dtype is bf16, fp16, fp32 or auto (got {value!r})")
        elif name == "dit_dtype" and value == "auto":
            continue
        else:
            out[name] = value
    if problems:
        raise NodeError("\n".join(problems))
    return out


def lora_picker(tooltip: str = "a LoRA from ComfyUI's loras folder") -> tuple:
    return ([NONE, *model_files("loras")], {"default": NONE, "tooltip": tooltip})


def model_files(folder: str) -> list[str]:
    """The files of one of ComfyUI's model folders, for a picker ([] outside ComfyUI)."""
    try:
        import folder_paths
    except ImportError:  # outside ComfyUI
        return []
    try:
        return folder_paths.get_filename_list(folder)
    except KeyError:
        return []


def picked_models(kwargs: dict, slots: tuple[str, ...]) -> dict[str, str]:
    """The models a node's pickers, its model_paths text (or, in workflows saved before, its
    `<slot>_path` widgets) name; a path wins over the picker."""
    paths = parse_model_paths(kwargs.get("model_paths", ""), slots)
    models = {}
    for slot in slots:
        path = paths.get(slot) or (kwargs.get(f"{slot}_path") or "").strip()
        name = kwargs.get(slot) or NONE
        if path:
            models[slot] = path
        elif name != NONE:
            models[slot] = full_path(slot_folder(slot), name, slot)
    dtype = paths.get("dit_dtype") or kwargs.get("dit_dtype", "auto")
    if "dit" in slots and dtype != "auto":
        models["dit_dtype"] = dtype
    return models


def full_path(folder: str, name: str, field: str) -> str:
    """The file a picker names; a clear error when it left the folder after the list was read."""
    import folder_paths

    full = folder_paths.get_full_path(folder, name)
    if full is None:
        raise NodeError(f"{field}: {name} is not in ComfyUI's {folder} folder any more; pick another file")
    return full


def parse_options(text: str, what: str = "options") -> dict[str, Any]:
    """Extra stage fields written as TOML (`name = value` lines), for settings without a widget."""
    text = (text or "").strip()
    if not text:
        return {}
    from ..files import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise NodeError(f"{what}: not valid TOML ({exc}); write one `name = value` per line, strings in quotes") from None


def format_number(value: float) -> str:
    """A float as a person writes it: 2e-4, not 0.0002 (which ComfyUI's renderer shows as 0)."""
    if value and abs(value) < 1e-2:
        mantissa, exponent = f"{value:.6e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:.6g}"


def parse_number(value: Any, widget: str, *, integer: bool = False, minimum: float | None = None,
                 maximum: float | None = None, above: float | None = None) -> float | int | None:
    """A number typed as text ("2e-4", "0.0002"; "" or "default": not set -> None), checked;
    a bad value names the widget and says what to write."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = value
    else:
        text = str(value or "").strip()
        if text.lower() in ("", "default", "(default)"):
            return None
        try:
            number = int(text) if integer else float(text)
        except ValueError:
            example = "a whole number such as 20" if integer else "a number such as 2e-4 or 0.0002"
            raise NodeError(f"{widget}: {text!r} is not a number; write {example} (or default)") from None
    import math

    if not integer and not math.isfinite(number):
        raise NodeError(f"{widget}: {number} is not a finite number")
    if above is not None and not number > above:
        raise NodeError(f"{widget}: {format_number(number)} must be greater than {format_number(above)}")
    if minimum is not None and number < minimum:
        raise NodeError(f"{widget}: {format_number(number)} must be at least {format_number(minimum)}")
    if maximum is not None and number > maximum:
        raise NodeError(f"{widget}: {format_number(number)} must be at most {format_number(maximum)}")
    return number


def options_text(values: dict[str, Any]) -> str:
    import tomli_w

    return tomli_w.dumps(values) if values else ""


# ------------------------------------------------------------------- the pipeline document


def new_pipeline(name: str, base: str = "", workdir: str = "", dataset: Any = None, family: str | None = None,
                 task: str | None = None) -> dict:
    doc: dict[str, Any] = {"name": name}
    if family:
        doc["family"] = family
    if task:
        doc["task"] = task
    if workdir:
        doc["workdir"] = workdir
    if dataset is not None:
        doc["dataset"] = dataset
    doc["stages"] = {}
    return {"document": doc, "base": base}


def start_pipeline(kw: dict, name: str) -> dict:
    """The node's incoming pipeline, or a new one named `name` for a node used on its own."""
    if not kw.get("pipeline"):
        kw["pipeline"] = new_pipeline(name)
    return kw["pipeline"]


def ensure_pipeline(pipe: dict | None, name: str = "comfyui") -> dict:
    """A private copy of an incoming pipeline (or a new one): nodes never change their inputs,
    ComfyUI caches and reuses them."""
    return copy.deepcopy(pipe) if pipe else new_pipeline(name)


def merge_pipelines(pipe: dict, other: dict | None) -> dict:
    """Stages of `other` that `pipe` lacks are added (a node fed by two branches)."""
    if not other:
        return pipe
    for key, origin in other.get("nodes", {}).items():
        pipe.setdefault("nodes", {}).setdefault(key, origin)
    doc, add = pipe["document"], other["document"]
    for key, value in add.items():
        if key == "stages":
            for name, stage in value.items():
                if name in doc["stages"] and doc["stages"][name] != stage:
                    raise NodeError(f"two branches both have a stage {name!r} with different settings; give one another stage_name")
                doc["stages"][name] = stage
        elif key == "models":
            set_models(pipe, value)
        elif key in ("family", "task") and key in doc and doc[key] != value:
            raise NodeError(f"the two pipelines this node joins have different {key}s ({doc[key]} and {value}); one pipeline "
                            f"has one {key}: set the same on both Dataset Config nodes")
        elif key not in doc:
            doc[key] = value
    return pipe


def pipeline_family(pipe: dict | None, widget: str = FROM_PIPELINE, name: str = "family") -> str:
    """The family a node works for: the pipeline socket's, which a family widget (`name`) may
    only confirm. A node used without a pipeline needs the widget set."""
    have = (pipe or {}).get("document", {}).get("family")
    if widget in (None, "", FROM_PIPELINE):
        if not have:
            raise NodeError(f"{name} is {FROM_PIPELINE} but no pipeline with a family is connected; pick the family "
                            "or connect a pipeline (its family is chosen on Dataset Config)")
        return registry().family(have).name
    if have and registry().canonical(have) != registry().canonical(widget):
        raise NodeError(f"{name} is {widget} here but the pipeline it extends is {have} (its family is chosen on "
                        f"Dataset Config); set {name} to {FROM_PIPELINE}, or change the family on Dataset Config")
    return registry().family(widget).name


def set_family(pipe: dict, family: str, task: str | None = None) -> None:
    """Family and task are chosen once (on Dataset Config) and flow down the pipeline socket. The
    first node that sets them writes them; a later node of a family, or a task widget not at
    (from pipeline), must agree."""
    doc = pipe["document"]
    fam = registry().family(family)
    have = doc.get("family")
    if have and registry().canonical(have) != fam.name:
        raise NodeError(f"this node is for {fam.title}, but the pipeline it extends is {have} (family on Dataset Config); "
                        f"use the {registry().family(have).comfy_name} node, or set family on Dataset Config to {fam.name}")
    doc["family"] = have or fam.name
    if task in (None, "", FROM_PIPELINE, DEFAULT_TASK):
        return
    wanted = fam.resolve_task(task) if fam.tasks else None
    if wanted is None:
        raise NodeError(f"task: {task} is not a {fam.title} task; pick one of {', '.join(fam.task_names()) or DEFAULT_TASK}")
    current = doc.get("task") or (fam.default_task if have else None)
    if current and fam.resolve_task(current) != wanted:
        raise NodeError(f"task is {wanted} here but the pipeline's task is {current} (chosen on Dataset Config); one "
                        f"pipeline has one task: set task to {FROM_PIPELINE}, or change the task on Dataset Config")
    doc["task"] = current or wanted


def check_slots(fam, kind: str, models: dict[str, str]) -> None:
    """A node that serves several families shows every family's model pickers: only the pipeline
    family's may be set."""
    allowed = set(node_slots(fam, kind)) | {"dit_dtype"}
    for slot in models:
        if slot not in allowed:
            raise NodeError(f"{slot}: {fam.title} does not use it here ({kind}); set {slot} to {NONE} or take it out of "
                            f"model_paths (this family's models: {', '.join(node_slots(fam, kind)) or 'none'})")


def set_models(pipe: dict, models: dict[str, str]) -> None:
    current = pipe["document"].setdefault("models", {})
    for slot, path in models.items():
        if slot in current and current[slot] != path:
            raise NodeError(f"models.{slot} is {current[slot]} upstream and {path} here; one pipeline uses one {slot}")
        current[slot] = path


def add_stage(pipe: dict, name: str, stage: dict[str, Any]) -> str:
    name = (name or "").strip() or stage["kind"]
    stages = pipe["document"].setdefault("stages", {})
    if name in stages and stages[name] != stage:
        raise NodeError(f"the pipeline already has a stage {name!r}; give this node another stage_name")
    stages[name] = stage
    return name


def lora_value(lora: dict | None, *pipes: dict | None, artifact: str = "") -> str | None:
    """A LoRA socket as the language writes it: a reference when its stage is in one of these
    pipelines (`artifact` picks another output of that stage, e.g. checkpoints), else its file."""
    if not lora:
        return None
    ref = lora.get("ref") or ""
    stage = ref[1:].split(".")[0]
    if ref and any(p and stage in p["document"].get("stages", {}) for p in pipes):
        return f"@{stage}.{artifact}" if artifact else ref
    return lora["path"]


# ------------------------------------------------------- which node made which part

# The dataset's fields and the Dataset Config widget that sets each (the last name of a problem's path).
DATASET_WIDGETS = {"video_directory": "media_folder", "image_directory": "media_folder", "resolution": "width / height",
                   "target_frames": "target_frames", "frame_extraction": "frame_extraction", "caption_extension":
                   "caption_extension", "batch_size": "batch_size", "num_repeats": "num_repeats", "enable_bucket":
                   "enable_bucket", "cache_directory": "cache_folder"}


def note_origin(pipe: dict, key: str, node: Any, node_id: Any, widgets: dict[str, str] | None = None, **extra: Any) -> None:
    """Record which node made a part of the pipeline ("dataset", "stages.<name>",
    "stages.<name>.<field>", "models.<slot>") and which of its widgets set each field, so that a
    compiler problem (a field path) is shown as the node and widget to change. Kept beside the
    document, never in it."""
    if node_id is None:
        return
    pipe.setdefault("nodes", {})[key] = {"node": str(node_id), "title": node_title(node), "widgets": widgets or {}, **extra}


def _locate(pipe: dict, path: str, message: str = "") -> tuple[dict, str] | None:
    """(origin, widget) of a problem's field path, or None when no node is known for it."""
    import re

    origins = pipe.get("nodes", {})
    tokens = re.findall(r"[^.\[\]]+", path or "")
    if not tokens:
        return None
    if tokens[0] == "stages" and len(tokens) > 1:
        field = tokens[2] if len(tokens) > 2 else ""
        origin = origins.get(f"stages.{tokens[1]}.{field}") or origins.get(f"stages.{tokens[1]}")
        if not origin:
            return None
        widget = origin["widgets"].get(field) or (f"options: {field}" if field in origin.get("from_options", ()) else field)
        return origin, widget
    if tokens[0] == "models" and len(tokens) > 1:
        slot = tokens[1]
        origin = origins.get(f"models.{slot}")
        if origin:
            return origin, origin["widgets"].get(slot, slot)
        # Not set anywhere: the node of the stage that needs it (the message names the stage), else
        # the first node that shows its picker.
        named = re.search(r"stage '([^']+)'", message)
        shows = [o for k, o in origins.items() if k.count(".") == 1 and k.startswith("stages.") and slot in o.get("slots", ())]
        origin = origins.get(f"stages.{named.group(1)}") if named else None
        origin = origin if origin in shows else (shows[0] if shows else None)
        if not origin:
            return None
        if slot in origin.get("pickers", ()):
            return origin, f"{slot} (pick it, or give it in model_paths)"
        return origin, f"model_paths: {slot} (or pick it on the cache node that uses it)"
    if tokens[0] == "dataset":
        origin = origins.get("dataset")
        if not origin:
            return None
        if origin.get("from_toml"):
            return origin, "dataset_toml"
        return origin, next((DATASET_WIDGETS[t] for t in reversed(tokens) if t in DATASET_WIDGETS), "media_folder")
    return None


def describe_problems(err, pipe: dict) -> str:
    """Every error of a PipelineError (else every warning), one line each, as the node and widget
    to change where the pipeline knows them: "Wan LoRA Trainer (node 8): learning_rate: ... (fix: ...)"."""
    problems = [p for p in err.problems if p.severity == "error"] or err.problems
    if not problems:
        return str(err)
    dataset = pipe.get("nodes", {}).get("dataset")
    lines = []
    for p in problems:
        if "needs a dataset" in p.message and dataset and not pipe["document"].get("dataset"):
            # The pipeline file's "add a [dataset] table" is, in a workflow, an empty Dataset Config.
            lines.append(f"{dataset['title']} (node {dataset['node']}): media_folder is empty — set it to your folder "
                         "of clips or images (or give dataset_toml)")
            continue
        found = _locate(pipe, p.path, p.message)
        if found:
            origin, widget = found
            head = f"{origin['title']} (node {origin['node']}): {widget}: "
        else:
            head = f"{p.path}: " if p.path else ""
        lines.append(f"{head}{p.message}" + (f" (fix: {p.fix})" if p.fix else ""))
    return "\n".join(dict.fromkeys(lines))


def compile_pipeline(pipe: dict):
    """The plan of the document, through the same loader and compiler as `musubi-pipe plan`."""
    import tomli_w

    from ..compiler.build import compile_pipeline as compile_
    from ..dsl.load import Source, validate_pipeline
    from ..errors import PipelineError

    doc = pipe["document"]
    base = pipe.get("base") or default_base()
    file = str(Path(base) / f"{doc.get('name', 'comfyui')}.workflow.toml")
    try:
        text = tomli_w.dumps(doc)
    except (TypeError, ValueError, RecursionError):  # the loader reports what is wrong
        text = ""
    source = Source(file=file, text=text, format="toml")
    try:
        pipeline = validate_pipeline(copy.deepcopy(doc), source)
        return compile_(pipeline, source)
    except PipelineError as err:
        raise NodeError(describe_problems(err, pipe)) from None


def one_line(err) -> str:
    """A PipelineError as a node shows it: every error (else warning) with its fix, one line each."""
    problems = [p for p in err.problems if p.severity == "error"] or err.problems
    if not problems:
        return str(err)
    return "\n".join(f"{p.path + ': ' if p.path else ''}{p.message}" + (f" (fix: {p.fix})" if p.fix else "") for p in problems)


def default_base() -> str:
    """Where a pipeline built in ComfyUI keeps its records and default outputs."""
    try:
        import folder_paths

        return str(Path(folder_paths.get_output_directory()) / "musubi-pipe")
    except ImportError:
        return str(Path.cwd() / "musubi-out")


def loras_folder() -> str:
    import folder_paths

    return folder_paths.get_folder_paths("loras")[0]


# --------------------------------------------------------------------------- running


def comfy_config():
    """The local configuration, writing only inside its own roots plus ComfyUI's output, temp,
    LoRA and diffusion-model folders (where the LoRA Merger saves): a shared workflow cannot
    write anywhere else."""
    import dataclasses

    import folder_paths

    from ..errors import PipelineError
    from ..executors.musubi_env import load_config

    try:
        config = load_config().require()
    except PipelineError as err:
        raise NodeError(one_line(err)) from None
    roots = list(config.allowed_output_roots) + [Path(folder_paths.get_output_directory()), Path(folder_paths.get_temp_directory())]
    roots += [Path(p) for p in folder_paths.get_folder_paths("loras") + folder_paths.get_folder_paths("diffusion_models")]
    return dataclasses.replace(config, allowed_output_roots=roots)


def image_batch(paths: list[str]):
    """Picture files as a ComfyUI IMAGE batch [B, H, W, 3] in 0..1 and its MASK [B, H, W] (1 where
    transparent, as core Load Image gives it). A batch has one size: pictures of another size than
    the first are left out. Returns (image, mask, the files in the batch)."""
    import numpy as np
    import torch
    from PIL import Image

    pictures, kept, size = [], [], None
    for path in paths:
        with Image.open(path) as im:
            if size is not None and im.size != size:
                continue
            size = im.size
            pictures.append(np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0)
        kept.append(path)
    stack = torch.from_numpy(np.stack(pictures))
    return stack[..., :3].contiguous(), 1.0 - stack[..., 3], kept


def image_tensor(image):
    """A PIL image as a ComfyUI IMAGE: a float tensor [1, H, W, 3] in 0..1."""
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


def show_text(node_id: str | None, text: str) -> None:
    """Progress text on a node (under its title in the editor)."""
    try:
        from server import PromptServer

        if node_id is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # progress text is a nicety; never fail a run over it
        pass


def event_message(node_id: str | None, e) -> dict:
    """The `musubi_pipe.event` websocket message for one executor event (what a front-end
    extension listens to with `api.addEventListener("musubi_pipe.event", ({detail}) => ...)`):

        {"node":  "8",            # the UNIQUE_ID of the node running the plan (trainer, cache, ...)
         "event": {...},          # executors.events.Event.to_dict(): every field that is set
         "chart": {...}}          # progress events only: the point a loss chart needs

    "event" keys: kind (plan, step_start, step_skipped, progress, output, step_end, run_end),
    step (the plan step id, e.g. "train"), time (unix seconds), and for progress: phase
    (loading, caching, training, sampling, saving, generating, ...), current, total, epoch,
    epochs, loss, rate (it/s), eta_s; data holds the rest (step_end: status, cause, fix, log;
    output: name, path; plan: steps, run_dir). Log lines are never sent.

    "chart" (progress only): {"stage": plan step id, "phase", "step": current, "total", "epoch",
    "epochs", "loss", "time"}; a value not known is null (loss is null outside training; step
    counts restart per phase). The node's own messages arrive in order.

    Volume: progress is throttled to one message per PROGRESS_INTERVAL_S (0.25 s) per node: the
    newest progress waits for the interval (or goes out before the step's end), training's last
    point (step == total) always comes; checkpoint outputs seen while training share that budget.
    Other kinds are a few per plan step (start, skipped, result outputs, end). So a node sends at
    most about 4 messages a second while a step runs, whatever musubi prints."""
    from ..executors import events as ev

    message: dict[str, Any] = {"node": node_id, "event": e.to_dict()}
    if e.kind == ev.PROGRESS:
        message["chart"] = {"stage": e.step, "phase": e.phase or None, "step": e.current, "total": e.total,
                            "epoch": e.epoch, "epochs": e.epochs, "loss": e.loss, "time": e.time}
    return message


class Run:
    """One run of a plan inside ComfyUI: progress bar, progress text, loss chart, cancel."""

    def __init__(self, node_id: str | None, chart: bool = False):
        self.node_id = node_id
        self.chart = chart
        self.outputs: dict[str, list[str]] = {}
        self.failure: dict | None = None
        self.run_dir = ""
        self._last_chart = 0.0
        self._monitor = None
        self._pbar = None
        self._executor = None
        self._chart_failed = False
        self.interrupted = False
        self._last_sent = 0.0  # when the last progress message went out (time.monotonic)
        self._last_shown = 0.0  # when the node's bar and text last changed
        self._held = None  # the newest progress event held back by the throttle

    def listener(self, e) -> None:
        from ..executors import events as ev
        from ..executors.terminal import progress_text

        if e.kind != ev.LOG:
            self._forward(e)
        if e.kind == ev.PLAN:
            self.run_dir = e.data.get("run_dir", "")
        elif e.kind == ev.OUTPUT:
            self.outputs.setdefault(e.step, []).append(e.data.get("path", ""))
        elif e.kind == ev.STEP_END:  # the text must not stay at the last progress line ("caching 2")
            status, cause = e.data.get("status") or "ended", e.data.get("cause")
            if e.data.get("status") not in ("succeeded", None):
                self.failure = {"step": e.step, **e.data}
            self._text(f"{e.step}: " + ("done" if status == "succeeded" else status + (f": {cause}" if cause else "")))
        elif e.kind == ev.PROGRESS:
            total = e.total or 0
            # ComfyUI's own bar and text messages, as bounded as ours: 4 a second, and the end.
            now = time.monotonic()
            if now - self._last_shown < PROGRESS_INTERVAL_S and not (e.phase == "training" and total and e.current == total):
                return
            self._last_shown = now
            preview = self._chart(e) if self.chart and e.phase == "training" and total else None
            if self._pbar is not None and total:
                try:
                    self._pbar.update_absolute(min(e.current or 0, total), total, preview)
                except Exception as exc:
                    # ComfyUI's progress hook raises (and clears the flag) when Cancel was pressed.
                    if type(exc).__name__ != "InterruptProcessingException":
                        raise
                    self.interrupted = True
                    if self._executor is not None:
                        self._executor.cancel()
            self._text(f"{e.step}: {progress_text(e)}")
        elif e.kind == ev.STEP_START:
            self._text(f"{e.step}: starting")
        elif e.kind == ev.STEP_SKIPPED:
            self._text(f"{e.step}: skipped ({e.data.get('reason', '')})")

    def _forward(self, e) -> None:
        """Send the event to the browser and to `musubi-pipe run --executor comfy`. Progress is
        throttled to one message per PROGRESS_INTERVAL_S per node (the newest is held back and
        goes out when the interval has passed or before the next other event); training's last
        point (current == total) always goes, so the chart ends where the run did."""
        from ..executors import events as ev

        now = time.monotonic()
        if e.kind == ev.PROGRESS:
            last_point = e.phase == "training" and e.total is not None and e.current == e.total
            if now - self._last_sent < PROGRESS_INTERVAL_S and not last_point:
                self._held = e
                return
            self._last_sent, self._held = now, None
        elif e.kind == ev.OUTPUT and e.data.get("name") in SAVED_WHILE_RUNNING:
            # a checkpoint saved each epoch: shares the progress budget (the run's events.jsonl keeps them all)
            if now - self._last_sent < PROGRESS_INTERVAL_S:
                return
            self._last_sent = now
        elif self._held is not None:
            held, self._held = self._held, None
            self._send(held)
        self._send(e)

    def _send(self, e) -> None:
        try:
            from server import PromptServer

            server = PromptServer.instance
            server.send_sync(EVENT_MESSAGE, event_message(self.node_id, e), server.client_id)
        except Exception:
            pass

    def _text(self, text: str) -> None:
        show_text(self.node_id, text)

    def _chart(self, e):
        now = time.monotonic()
        if now - self._last_chart < 2.0 or not self.run_dir:
            return None
        self._last_chart = now
        try:
            from ..tools.monitor import TrainingMonitor, draw_chart

            if self._monitor is None:
                self._monitor = TrainingMonitor(self.run_dir, step=e.step)
            return ("PNG", draw_chart(self._monitor.poll(), 640, 320), 640)
        except Exception as exc:  # a missing chart must not stop training; say why once
            if not self._chart_failed:
                self._chart_failed = True
                print(f"musubi-pipe: no loss chart: {type(exc).__name__}: {exc}", file=sys.stderr)
            return None

    def execute(self, plan, force: bool = False, pipe: dict | None = None):
        """Run the plan (steps already done are skipped); raise NodeError on failure. With the
        pipeline it was compiled from, problems found before a step starts name node and widget."""
        import comfy.model_management as mm
        import comfy.utils

        from ..errors import PipelineError
        from ..executors.local import LocalExecutor

        config = comfy_config()
        # musubi loads its models on the same GPU: give it the memory ComfyUI holds.
        mm.unload_all_models()
        mm.soft_empty_cache()
        self._pbar = comfy.utils.ProgressBar(100, node_id=self.node_id)
        executor = self._executor = LocalExecutor(config)
        box: dict[str, Any] = {}

        def work():
            try:
                box["result"] = executor.run(plan, [self.listener], force=force)
            except PipelineError as err:
                box["error"] = describe_problems(err, pipe) if pipe else one_line(err)
            except Exception as exc:  # shown on the node, not lost in a thread
                box["error"] = f"{type(exc).__name__}: {exc}"

        thread = threading.Thread(target=work, name="musubi-pipe-run", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
            if mm.processing_interrupted():
                self.interrupted = True
                executor.cancel()
        if self.interrupted:
            mm.interrupt_current_processing(False)
            raise mm.InterruptProcessingException()  # ComfyUI reports the prompt as interrupted
        if "error" in box:
            raise NodeError(box["error"])
        result = box["result"]
        if result.status == "cancelled":
            raise NodeError("cancelled: the run was stopped and its processes ended")
        if result.status != "succeeded":
            f = self.failure or {}
            cause = f.get("cause") or f"step {f.get('step', '?')} {result.status}"
            fix = f.get("fix")
            log = f.get("log")
            raise NodeError(f"{f.get('step', '')}: {cause}" + (f" (fix: {fix})" if fix else "") + (f" [log: {log}]" if log else ""))
        self._pbar.update_absolute(100, 100)
        return result


# Output files each node made on its last run, by node id: IS_CHANGED re-runs a node whose
# outputs were deleted since (ComfyUI would otherwise serve its cached result).
_MADE: dict[str, list[str]] = {}


def remember_outputs(node_id: str | None, paths: list[str]) -> None:
    if node_id is not None:
        _MADE[str(node_id)] = [p for p in paths if p]


def outputs_key(node_id: str | None) -> str:
    # Constant while the outputs exist, so ComfyUI's own input-based caching decides.
    if any(not os.path.exists(p) for p in _MADE.get(str(node_id), [])):
        return f"missing {time.time()}"
    return "outputs present"


# ------------------------------------------------------------------ stage node skeleton


def stage_inputs(default_name: str, pipeline_required: bool = True) -> tuple[dict, dict, dict]:
    """(required, optional, hidden) inputs every stage node has."""
    pipe = (PIPELINE, {"tooltip": "the pipeline so far (from Dataset Config or an earlier stage)"})
    required = {"pipeline": pipe} if pipeline_required else {}
    required["stage_name"] = tip("STRING", "name of this stage in the pipeline (unique; other stages refer to it)", default=default_name)
    optional = {} if pipeline_required else {"pipeline": pipe}
    optional["options"] = tip("STRING", "more settings of this stage in the pipeline language, one `name = value` per line "
                              "(e.g. batch_size = 4)", multiline=True, default="")
    optional["more"] = (PIPELINE, {"tooltip": "a second branch whose stages this one also uses (e.g. two trained LoRAs)"})
    return required, optional, {"unique_id": "UNIQUE_ID"}


def set_if(stage: dict, field: str, value: Any, unset: Any = 0) -> None:
    """Widgets use a sentinel (0, -1, "") for 'the template's default'."""
    if value != unset and value is not None:
        stage[field] = value


CONFIG_ORIGIN = "__node__"  # key of a config socket's dict naming the node that made it (see config_origin)


def config_origin(config: dict, node: Any, node_id: Any) -> dict:
    """A config node's settings with the node that made them, so that a problem with one of its
    fields names that node (build_stage takes the key out again)."""
    if node_id is not None:
        config[CONFIG_ORIGIN] = {"node": str(node_id), "title": node_title(node)}
    return config


def build_stage(kw: dict, kind: str, family: str | None, task: str | None, slots: tuple[str, ...],
                fields: dict[str, Any], *configs: dict | None, origin: tuple = (None, None),
                widgets: dict[str, str] | None = None) -> tuple[dict, str]:
    """The pipeline with this node's stage added: incoming stages, models, config sockets,
    widget fields, then the options text (later wins). Returns (pipeline, stage name).
    `origin` (node, unique id) and `widgets` (field -> widget, where they differ) let compiler
    problems name the node and widget that set each field."""
    node, node_id = origin
    pipe = ensure_pipeline(kw.get("pipeline"), name=kw.get("stage_name") or kind)
    merge_pipelines(pipe, kw.get("more"))
    models = picked_models(kw, slots)
    if family:
        set_family(pipe, family, task or None)
        check_slots(registry().family(family), kind, models)
    set_models(pipe, models)
    stage: dict[str, Any] = {"kind": kind}
    from_configs: dict[str, dict] = {}
    for config in configs:
        config = dict(config or {})
        made_by = config.pop(CONFIG_ORIGIN, None)
        stage.update(config)
        for field in config:
            if made_by:
                from_configs[field] = made_by
            else:
                from_configs.pop(field, None)
    stage.update(fields)
    options = parse_options(kw.get("options", ""))
    stage.update(options)
    stage["kind"] = kind
    name = add_stage(pipe, kw.get("stage_name", kind), stage)
    if node_id is not None:
        for field, made_by in from_configs.items():
            if field not in fields and field not in options:
                pipe.setdefault("nodes", {})[f"stages.{name}.{field}"] = {**made_by, "widgets": {}}
        note_origin(pipe, f"stages.{name}", node, node_id, {f: f for f in fields} | (widgets or {}), from_options=list(options),
                    slots=list(slots), pickers=[s for s in slots if s in type(node).INPUT_TYPES().get("required", {})])
        paths = parse_model_paths(kw.get("model_paths", ""), slots)
        for slot in models:
            note_origin(pipe, f"models.{slot}", node, node_id, {slot: "model_paths" if slot in paths else slot})
    return pipe, name


def finish_stage(pipe: dict, name: str, node_id, chart: bool = False):
    """Compile and run the pipeline (steps already done are skipped); return (plan, step, run)."""
    plan = compile_pipeline(pipe)
    run = Run(node_id, chart=chart)
    run.execute(plan, pipe=pipe)
    step = plan.step(name)
    made = [o.path for o in step.outputs if o.kind == "file"] + run.outputs.get(name, [])
    remember_outputs(node_id, made)
    return plan, step, run


def step_files(step, output: str) -> list[str]:
    """Files of one of a step's outputs as they are on disk now (a skipped step made them earlier)."""
    import glob

    files: list[str] = []
    for out in step.outputs:
        if out.name != output:
            continue
        if out.kind == "file":
            files += [out.path] if os.path.isfile(out.path) else []
        else:
            files += sorted(glob.glob(os.path.join(glob.escape(out.path), out.pattern or "*")))
    return files


class StageNode:
    """Shared by nodes that add a stage and run it."""

    FUNCTION = "run"
    OUTPUT_NODE = True  # runs even when nothing is connected downstream: its product is files

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        run = cls.__dict__.get("run")
        if run is not None and not getattr(run, "__located__", False):
            cls.run = locate_errors(run)

    @classmethod
    def IS_CHANGED(cls, **kw):
        return outputs_key(kw.get("unique_id"))
