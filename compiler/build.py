"""From a validated pipeline to a plan: resolve templates and references, check musubi's
run-time rules before anything runs, and emit each step's argv."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..dsl.dataset import DatasetConfig
from ..dsl.load import Source, format_path, load_dataset_source, load_pipeline
from ..dsl.model import Pipeline
from ..errors import PipelineError, Problem
from . import contract, ladder
from .graph import Reference, build_graph
from .plan import LAUNCH_ACCELERATE, LAUNCH_TOOL, GeneratedFile, Input, Output, Plan, Step, fingerprint
from ..pipelines import registry
from ..pipelines.registry import Family, StageSpec

# Fields of the language that are not musubi options of the same name: the compiler turns
# them into flags (or files) itself.
LANGUAGE_FIELDS = {
    "kind", "needs", "extra_args", "description", "sweep",
    "output_name", "output_dir", "dit", "expert", "attention", "network_module", "mixed_precision",
    "sample_prompts", "num_processes", "num_machines", "latents", "text_encoder_cache",
    "prompt", "section_prompts", "section_images", "prompts", "loras", "loras_high_noise", "save_path",
    "checkpoints", "output", "input", "to", "gpu_memory_gib", "rank", "format", "dtype", "contact_sheet",
}
# Stage fields that hold LoRAs; the registry says which flags each becomes for a family.
LORA_FIELDS = ("loras", "loras_high_noise")
# Characters a shell would act on. We never use a shell, but a path with them in a shared
# pipeline is a mistake or an attempt at injection when someone pastes the plan's commands.
SHELL_META = re.compile(r"[;|&$`<>\n\r\x00]")
PATH_FIELDS = {
    "image_path", "end_image_path", "network_weights", "logging_dir", "output_dir", "save_path", "output", "dit", "input",
    "control_image_path", "mask_path",
}


def compile_file(path: str | Path) -> Plan:
    pipeline, source = load_pipeline(path)
    return compile_pipeline(pipeline, source)


def compile_pipeline(pipeline: Pipeline, source: Source) -> Plan:
    """The plan of a pipeline, or PipelineError listing every problem at once."""
    return _Compiler(pipeline, source).run()


class _Compiler:
    def __init__(self, pipeline: Pipeline, source: Source):
        self.p = pipeline
        self.src = source
        self.problems: list[Problem] = []
        self.fam: Family = registry.family(pipeline.family)
        self.task = pipeline.task or self.fam.default_task
        self.task_props = self.fam.task(self.task) if self.task in self.fam.tasks or not self.fam.tasks else self.fam.model
        # The architecture name musubi's caches carry: per task where versions differ (Qwen-Image-Edit).
        self.cache_arch = self.task_props.get("cache_arch") or self.fam.short
        # The value musubi's --task gets, where the registry's task names more than it (HiDream-O1's dev-t2i).
        self.task_arg = self.task_props.get("task_value") or self.task
        self.base = source.folder
        self.workdir = self.path(pipeline.workdir) if pipeline.workdir else str(self.base / "musubi-out" / pipeline.name)
        self.files: list[GeneratedFile] = []
        self.file_index: dict[str, int] = {}  # path -> its place in self.files
        self.steps: dict[str, Step] = {}
        self.dataset: DatasetConfig | None = None
        self.reported = 0  # problems known before the current stage was built
        self.dataset_file = ""
        self.train_stages = sum(1 for s in pipeline.stages.values() if s.kind in registry.TRAINING_KINDS)
        self.hub_warned: set[str] = set()

    # --- helpers -------------------------------------------------------------------------

    def add_file(self, file: GeneratedFile) -> None:
        self.file_index.setdefault(file.path, len(self.files))
        self.files.append(file)

    def error(self, path: tuple, message: str, fix: str = "") -> None:
        self.problems.append(self.src.problem(path, message, fix))

    def warn(self, path: tuple, message: str, fix: str = "") -> None:
        self.problems.append(self.src.problem(path, message, fix, severity="warning"))

    def path(self, value: str) -> str:
        """A user path made absolute against the pipeline's folder (Windows paths kept as written)."""
        if os.path.isabs(value) or re.match(r"^[A-Za-z]:[\\/]", value) or value.startswith("\\\\"):
            return value
        return str((self.base / value).resolve())

    def check_path(self, where: tuple, value: str | None) -> None:
        if not isinstance(value, str):
            return
        if SHELL_META.search(value):
            bad = sorted(set(SHELL_META.findall(value)))
            self.error(where, f"path {value!r} contains shell metacharacters {' '.join(repr(c) for c in bad)}",
                       "rename the file or folder without ; | & $ ` < > or line breaks")
        elif value.startswith("-"):
            self.error(where, f"path {value!r} starts with '-', so musubi would read it as an option", "write it as ./" + value)

    # --- main ------------------------------------------------------------------------------

    def run(self) -> Plan:
        import networkx as nx  # not at the top: importing the compiler builds no graph

        self.check_task()
        self.check_paths()
        self.load_dataset()
        graph, refs = build_graph(self.p, self.src, self.problems)
        if any(p.severity == "error" for p in self.problems) and not nx.is_directed_acyclic_graph(graph):
            raise PipelineError(self.problems)
        written = {name: i for i, name in enumerate(self.p.stages)}  # ties keep the document's order
        order = list(nx.lexicographical_topological_sort(graph, key=written.__getitem__))
        position = {name: i for i, name in enumerate(order)}
        for name in order:
            stage = self.p.stages[name]
            if stage.kind not in self.fam.stages:
                why = self.fam.rule("missing_stages", {}).get(stage.kind)
                self.error(("stages", name, "kind"), f"{self.fam.title} has no {stage.kind} stage" + (f": {why}" if why else ""),
                           self.fam.rule("missing_stage_fix", {}).get(stage.kind, "remove the stage"))
                continue
            build = getattr(self, f"build_{stage.kind}")
            self.reported = len(self.problems)
            try:
                step = build(name, stage, self.fam.stages[stage.kind], {r.field: r for r in refs[name]})
            except _Skip:
                continue
            step = self.finish(name, stage, step, sorted(graph.predecessors(name), key=position.__getitem__))
            self.steps[name] = step
        errors = [p for p in self.problems if p.severity == "error"]
        if errors:
            raise PipelineError(self.problems)
        return Plan(
            name=self.p.name,
            source=self.src.file,
            workdir=self.workdir,
            steps=[self.steps[n] for n in order if n in self.steps],
            files=self.files,
            warnings=[str(p) for p in self.problems],
            musubi_contract=contract.CONTRACT,
            sweeps=self.src.sweeps,
        )

    def check_task(self) -> None:
        if self.fam.tasks and self.task not in self.fam.tasks:
            self.error(("task",), f"{self.p.task!r} is not a {self.fam.title} task", f"use one of: {', '.join(self.fam.tasks)}")
        elif not self.fam.tasks and self.p.task is not None:
            self.error(("task",), f"{self.fam.title} has no tasks", "remove task")

    def check_paths(self) -> None:
        for slot, value in self.p.models.model_dump(exclude_none=True).items():
            if slot != "dit_dtype":
                self.check_path(("models", slot), value)
                if value.startswith("@"):
                    self.error(("models", slot), f"models.{slot} takes a file, not a reference ({value!r})",
                               f"set {slot} = {value!r} on the stage that should use it (train and generate stages take dit)")
        self.check_path(("workdir",), self.p.workdir)
        for name, stage in self.p.stages.items():
            for field in PATH_FIELDS & set(type(stage).model_fields):
                self.check_path(("stages", name, field), getattr(stage, field))
            for field in ("loras", "loras_high_noise"):
                for i, lora in enumerate(getattr(stage, field, None) or []):
                    self.check_path(("stages", name, field, i, "path"), lora.path)
            for key, value in (getattr(stage, "section_images", None) or {}).items():
                self.check_path(("stages", name, "section_images", key), value)

    def load_dataset(self) -> None:
        data = self.p.dataset
        if data is None:
            return
        if isinstance(data, str):
            self.check_path(("dataset",), data)
            file = Path(self.path(data))
            try:
                config, source = load_dataset_source(file)
            except PipelineError as exc:
                self.problems.extend(exc.problems)
                return
            base, where = file.parent, ()
        else:
            config, base, where, source = data, self.base, ("dataset",), self.src
        for i, d in enumerate(config.datasets):
            for key in ("image_directory", "image_jsonl_file", "video_directory", "video_jsonl_file", "cache_directory", "control_directory"):
                value = getattr(d, key, None)
                if value and SHELL_META.search(value):
                    self.problems.append(source.problem(where + ("datasets", i, key), f"path {value!r} contains shell metacharacters", "rename the folder without ; | & $ ` < > or line breaks"))
        for field, message, fix in config.problems():
            path = where + tuple(int(x) if x.isdigit() else x for x in re.split(r"[.\[\]]+", field) if x)
            if message.startswith("warning: "):
                self.problems.append(source.problem(path, message.removeprefix("warning: "), fix, severity="warning"))
            else:
                self.problems.append(source.problem(path, message, fix))
        if self.task_props.get("control"):
            for i, d in enumerate(config.datasets):
                if d.control_directory is None and not getattr(d, "video_jsonl_file", None) and not getattr(d, "image_jsonl_file", None):
                    self.problems.append(source.problem(where + ("datasets", i), f"task {self.task} (Fun-Control) trains on control videos", "set control_directory for this dataset"))
        self.check_image_datasets(config, source, where, base)
        self.dataset = config.with_paths_resolved(base)
        self.dataset_file = str(Path(self.workdir) / "generated" / "dataset.toml")
        self.add_file(GeneratedFile(self.dataset_file, self.dataset.to_toml()))

    def check_image_datasets(self, config: DatasetConfig, source: Source, where: tuple, base: Path) -> None:
        """An image family's dataset rules: image datasets only, control images where the task edits
        them (and nowhere else), several targets where the task needs them, sizes on musubi's grid."""
        if self.fam.output != "image":
            return
        title = f"{self.fam.title} {self.task or ''}".strip()
        step = self.fam.rule("size_step")
        general_bucket = config.general.enable_bucket
        for i, d in enumerate(config.datasets):
            at = where + ("datasets", i)
            if d.is_video:
                self.problems.append(source.problem(at, f"{self.fam.title} trains on images, and this is a video dataset (musubi stops with 'Unsupported architecture')",
                                                    "use image_directory or image_jsonl_file instead of video_directory / video_jsonl_file"))
                continue
            has_control = d.control_directory is not None or (d.image_jsonl_file is not None and _jsonl_has(base, d.image_jsonl_file, "control_path"))
            # A switch set to "optional" (FLUX.2) takes control images and trains without them too.
            if self.task_props.get("control_dataset") is True and not has_control:
                fix = ("give each line of image_jsonl_file a control_path (control_path_0, control_path_1, ... for several)" if d.image_jsonl_file
                       else "set control_directory to a folder with a control image per target image (same file name)")
                self.problems.append(source.problem(at, f"{title} trains on pairs of control and target images, and this dataset has no control images", fix))
            elif has_control and not self.task_props.get("control_dataset"):
                why = "the family uses no control images" if self.fam.rule("no_control_images") else f"only the edit tasks ({', '.join(self.control_tasks())}) use them"
                refused = self.fam.rule("control_dataset_refused")  # musubi stops instead of ignoring them
                self.problems.append(source.problem(at + (("control_directory",) if d.control_directory else ()),
                                                    f"{title} " + (f"refuses a dataset with control images (musubi raises): {why}" if refused else f"ignores control images: {why}"),
                                                    "remove control_directory" + (f", or set task to one of {', '.join(self.control_tasks())}" if self.control_tasks() else ""),
                                                    severity="error" if refused else "warning"))
            if self.task_props.get("multiple_target") and not d.multiple_target:
                self.problems.append(source.problem(at, f"{title} trains on several target images per item (the layers)",
                                                    "set multiple_target = true and name the targets <name>_0, <name>_1, ... (docs/dataset_config.md)"))
            elif d.multiple_target and not self.task_props.get("multiple_target"):
                self.problems.append(source.problem(at + ("multiple_target",), f"multiple_target is for layered training, not {title}",
                                                    "remove multiple_target" + (f", or set task to one of {', '.join(self.tasks_with('multiple_target'))}" if self.tasks_with("multiple_target") else "")))
            bucket = d.enable_bucket if d.enable_bucket is not None else general_bucket
            resolution = d.resolution or config.general.resolution
            if step and resolution is not None and not bucket:
                w, h = (resolution, resolution) if isinstance(resolution, int) else resolution
                if w % step or h % step:
                    key = "resolution" if d.resolution is not None else None
                    path = at + ("resolution",) if key else where + ("general", "resolution")
                    self.problems.append(source.problem(path, f"resolution {w}x{h} is not a multiple of {step}, and without buckets musubi trains at exactly this size ({self.fam.title} latents need multiples of {step})",
                                                        f"use [{w // step * step}, {h // step * step}], or enable_bucket = true"))

    def tasks_with(self, switch: str) -> list[str]:
        return [t for t, task in self.fam.tasks.items() if task.get(switch)]

    def control_tasks(self) -> list[str]:
        return self.tasks_with("control_dataset")

    def need_dataset(self, name: str, skip: bool = True) -> str:
        """The generated dataset config; without a dataset, report it and (if skip) stop building the stage."""
        if self.dataset is None:
            if self.p.dataset is None:
                self.error(("stages", name), "this stage needs a dataset, and the pipeline has none", "add a [dataset] table or dataset = \"path/to/dataset.toml\"")
            if skip:
                raise _Skip
        return self.dataset_file

    # --- option handling -------------------------------------------------------------------

    def settings(self, stage, tpl: StageSpec) -> dict[str, Any]:
        """Template defaults, then task defaults, then the stage's own (already merged with the
        pipeline's [defaults]) values."""
        values = dict(tpl.defaults)
        for prop, extra in tpl.task_defaults.items():
            if self.task_props.get(prop):
                values.update(extra)
        values.update(stage.model_dump(exclude_none=True, exclude=set(LANGUAGE_FIELDS) - {"mixed_precision", "attention", "network_module"}))
        for alias, option in tpl.aliases.items():
            if alias in values:
                value = values.pop(alias)
                if alias in PATH_FIELDS and isinstance(value, str):
                    value = self.path(value)
                elif alias in PATH_FIELDS and isinstance(value, list):
                    value = [self.path(v) for v in value]
                if isinstance(option, list):  # video_size [height, width] -> --height, --width
                    values.update(zip(option, value))
                else:
                    values[option] = value
        return values

    def arg(self, script: str, role: str, value) -> list[str]:
        """argv words for a value the compiler fills, under the option the registry names for its role."""
        return contract.render(script, self.fam.flag(role), value)

    def has(self, script: str, role: str) -> bool:
        return self.fam.flag(role) in contract.options(script)

    def options(self, name: str, stage, script: str, values: dict[str, Any]) -> list[str]:
        known = contract.options(script)
        args: list[str] = []
        self.check_option_rules(name, stage, values)
        for key, value in values.items():
            if key in LANGUAGE_FIELDS:
                continue
            if key not in known:
                fields_set = stage.model_fields_set
                where = ("stages", name, key) if key in fields_set else ("stages", name)
                self.error(where, f"{key} is not an option of {script} ({self.fam.title})",
                           self.fam.rule("option_hints", {}).get(key) or f"remove {key}; musubi-tuner {contract.CONTRACT} does not accept it for this family")
                continue
            if key in PATH_FIELDS and isinstance(value, str):
                value = self.path(value)
            elif key in PATH_FIELDS and isinstance(value, list):
                value = [self.path(v) for v in value]
            args += self.render(("stages", name, key) if key in stage.model_fields_set else ("stages", name), script, key, value)
        return args

    def check_option_rules(self, name: str, stage, values: dict[str, Any]) -> None:
        """The family's rules on option values: options only some tasks take, options that exclude each other."""
        def where(key: str) -> tuple:
            if key in extra:
                return ("stages", name, "extra_args", extra[key])
            return ("stages", name, key) if key in stage.model_fields_set else ("stages", name)

        extra = {k.lstrip("-").replace("-", "_"): k for k in stage.extra_args}
        values = {**values, **{dest: stage.extra_args[k] for dest, k in extra.items()}}

        for option, switch in self.fam.rule("task_only_options", {}).items():
            if values.get(option) and not self.task_props.get(switch):
                tasks = self.tasks_with(switch)
                self.error(where(option), f"{option} is only for {', '.join(tasks)}, not {self.task or self.fam.title}",
                           f"remove {option}, or set task to {tasks[0]}" if tasks else f"remove {option}")
        kind = self.p.stages[name].kind
        slots = {slot for slot in self.fam.stages[kind].models if getattr(self.p.models, slot, None) is not None}
        given = lambda o: values.get(o) not in (None, False) or o in slots  # an option, or a model slot this stage passes
        for option, needed in self.fam.rule("option_requires", {}).items():
            if given(option) and not given(needed) and (needed in contract.options(self.fam.stages[kind].script) or needed in slots):
                self.error(where(option), f"{option} requires {needed} (musubi stops otherwise)", f"set {needed}" + (f" (models.{needed})" if needed in self.fam.models else " = true" if isinstance(values.get(option), bool) else ""))
        for option, allowed in self.fam.rule("option_values", {}).items():
            if option in values and str(values[option]) not in allowed:
                self.error(where(option), f"{self.fam.title} refuses {option} {values[option]!r} (musubi-tuner's docs and scripts)", f"use {' or '.join(allowed)}")
        for option, why in self.fam.rule("refused_options", {}).get(stage.kind, {}).items():  # options a script has but stops on
            if values.get(option) not in (None, False):
                self.error(where(option), f"{option}: {why}", f"remove {option}")
        for group in self.fam.rule("exclusive_options", []):
            chosen = [o for o in group if given(o)]
            if len(chosen) > 1:
                self.error(where(chosen[-1]), f"{' and '.join(chosen)} cannot be used together (musubi-tuner's docs)", f"keep one of {', '.join(chosen)}")

    def render(self, where: tuple, script: str, dest: str, value) -> list[str]:
        """argv words for an option; a list item that musubi's parser would read as a flag is refused
        (`network_args = ["--network_module", "x"]` would otherwise choose what musubi imports)."""
        if isinstance(value, (list, tuple)):
            flags = [v for v in value if isinstance(v, str) and v.startswith("-") and not contract.is_number(v)]
            if flags:
                self.error(where, f"{dest} item {flags[0]!r} starts with '-', so musubi would read it as another option",
                           f"remove it: {dest} items are values such as 'key=value'")
                return []
        return contract.render(script, dest, value)

    def extra(self, name: str, stage, script: str, taken: set[str]) -> list[str]:
        known = contract.options(script)
        args: list[str] = []
        for key, value in stage.extra_args.items():
            dest = key.lstrip("-").replace("-", "_")
            where = ("stages", name, "extra_args", key)
            if dest not in known:
                import difflib

                close = difflib.get_close_matches(dest, list(known), n=1)
                self.error(where, f"{script} has no option {key!r}", f"did you mean {close[0]!r}?" if close else f"see musubi-tuner's {script} --help")
                continue
            if dest in type(stage).model_fields or dest in taken:
                self.error(where, f"{dest} is set by the pipeline language", f"set {dest} on the stage itself, not in extra_args")
                continue
            args += self.render(where, script, dest, value)
        return args

    def models(self, name: str, stage, tpl: StageSpec, script: str, sampling: bool = False, skip: tuple = ()) -> list[str]:
        args: list[str] = []
        for slot, mode in tpl.models.items():
            if slot in skip:
                continue
            value = getattr(self.p.models, slot)
            when, _, cond = mode.partition(":")  # required | sampling | if_task:<prop> | sampling_if_task:<prop>
            for_task = bool(self.task_props.get(cond))
            wanted = {"required": True, "sampling": sampling, "if_task": for_task, "sampling_if_task": sampling and for_task,
                      "optional": value is not None}[when]
            if not wanted:
                continue
            if value is None:
                why = f"for task {self.task}" if cond else ("to make samples during training" if when == "sampling" else f"for {stage.kind}")
                self.error(("models", slot), f"models.{slot} is required {why} (stage {name!r})", f"set models.{slot} to the model file")
                continue
            args += contract.render(script, slot, self.model_path(slot, value))
        return args

    def model_path(self, slot: str, value: str) -> str:
        """A model file made absolute; for a slot that takes a Hugging Face model ID (registry: hub),
        an 'owner/name' with no such path here stays as written, for musubi to download."""
        if self.fam.models[slot].hub_id(value) and not os.path.exists(self.path(value)):
            if slot not in self.hub_warned:
                self.hub_warned.add(slot)
                self.warn(("models", slot), f"{value!r} is not a file or folder here, so it is read as a Hugging Face model ID: musubi downloads it on first use",
                          "set a local snapshot folder to run offline (write ./name for a folder beside the pipeline)")
            return value
        return self.path(value)

    def finish(self, name: str, stage, step: Step, needs: list[str]) -> Step:
        if step.launcher == LAUNCH_TOOL:
            if stage.extra_args:
                self.error(("stages", name, "extra_args"), f"{stage.kind} is musubi-pipe's own tool, not a musubi script", "remove extra_args")
            args, reason, fallbacks = step.args, None, []
        else:
            words = set(step.args)
            taken = {dest for dest, opt in contract.options(step.script).items() if opt.flag in words}
            args = step.args + self.extra(name, stage, step.script, taken)
            # musubi's parser is the last word, but only on a stage whose own problems are fixed.
            reported = any(p.severity == "error" for p in self.problems[self.reported:])
            reason = None if reported else contract.check(step.script, args)
            sound = not reported and not reason
            fallbacks = ladder.fallbacks(self.fam, stage.kind, step.script, args, self.task) if sound else []
        if reason:
            self.error(("stages", name), f"musubi's {step.script} would reject this command: {reason}", "fix the option named in the message")
        upstream = [self.steps[n].fingerprint for n in needs if n in self.steps]
        # the generated files this argv names, in the order they were made (one look-up per word)
        files = [self.files[i].content for i in sorted({self.file_index[a] for a in args if a in self.file_index})]
        fp = fingerprint(step.script, step.launcher, step.launch_args, args, files, upstream)
        return Step(
            id=name, kind=stage.kind, family=self.p.family, script=step.script, args=args,
            launcher=step.launcher, launch_args=step.launch_args, env=step.env, cwd=str(self.base),
            needs=needs, inputs=step.inputs, outputs=step.outputs, fingerprint=fp, meta=step.meta, fallbacks=fallbacks,
        )

    def ref_path(self, ref: Reference) -> str | list[str]:
        upstream = self.steps.get(ref.stage)
        if upstream is None:
            raise _Skip
        if ref.artifact == "checkpoints":
            return upstream.meta["checkpoints"]
        out = upstream.output(ref.artifact)
        return out.path

    def value_or_ref(self, refs: dict, path: tuple, value: str) -> tuple[str, str]:
        """(path, producing stage) of a field that is a file path or a reference."""
        if path in refs:
            return self.ref_path(refs[path]), refs[path].stage
        return self.path(value), ""

    # --- stage builders ---------------------------------------------------------------------

    def build_cache_latents(self, name, stage, tpl, refs) -> Step:
        return self.cache_step(name, stage, tpl, "latent_cache", f"*_{self.cache_arch}.safetensors")

    def build_cache_text_encoder(self, name, stage, tpl, refs) -> Step:
        return self.cache_step(name, stage, tpl, "text_encoder_cache", f"*_{self.cache_arch}_te.safetensors")

    def cache_step(self, name, stage, tpl, artifact: str, pattern: str) -> Step:
        """A caching step: reads the dataset and its media, writes `pattern` files into each cache folder."""
        dataset = self.need_dataset(name)
        values = self.settings(stage, tpl)
        changing = [o for o in self.fam.rule("cache_content_options", []) if values.get(o)]
        if changing and "skip_existing" not in stage.model_fields_set:
            # These change what a cache file holds under the same name: musubi's docs re-cache
            # without --skip_existing (docs/framepack_1f.md).
            values.pop("skip_existing", None)
        args = self.arg(tpl.script, "dataset_config", dataset) + self.models(name, stage, tpl, tpl.script)
        if self.task and self.has(tpl.script, "task"):  # Qwen-Image caches per --model_version
            args += self.arg(tpl.script, "task", self.task_arg)
        args += self.options(name, stage, tpl.script, values)
        assert self.dataset is not None
        outputs = [Output(artifact, "files", self.dataset.cache_directory(i) or "", pattern) for i in range(len(self.dataset.datasets))]
        return Step(name, stage.kind, self.p.family, tpl.script, args, inputs=self.media_inputs(dataset), outputs=outputs,
                    meta={"cache_arch": self.cache_arch})

    def media_inputs(self, dataset_file: str) -> list[Input]:
        """The dataset config and its media: adding a clip or editing a caption re-runs caching."""
        assert self.dataset is not None
        inputs = [Input("dataset_config", dataset_file)]
        for i, d in enumerate(self.dataset.datasets):
            jsonl = d.video_jsonl_file if d.is_video else d.image_jsonl_file
            for path in (d.media_directory, jsonl, d.control_directory):
                if path:
                    inputs.append(Input(f"media{i}", path))
        return inputs

    def build_train(self, name, stage, tpl, refs) -> Step:
        dataset = self.need_dataset(name, skip=False)
        where = ("stages", name)
        values = self.settings(stage, tpl)
        script = tpl.script
        sampling = stage.sample_prompts is not None
        args: list[str] = []
        if self.has(script, "task"):
            args += self.arg(script, "task", self.task_arg)
        dit, dit_from = self.train_dit(name, stage, tpl, values, refs)
        if dit:
            args += self.arg(script, "dit", dit)
        args += self.arg(script, "dataset_config", dataset)
        args += self.models(name, stage, tpl, script, sampling=sampling, skip=("dit",))
        # Exactly one attention flag; musubi's training refuses sage attention.
        attention = values.pop("attention", "sdpa")
        if attention not in self.fam.training["attention"]:
            self.error(where + ("attention",), f"musubi's training scripts reject {attention} (it is for inference)", f"use {', '.join(self.fam.training['attention'])}")
        else:
            args += contract.render(script, attention, True)
        full = stage.kind == "finetune"  # the whole DiT: no network module, a model file as the artifact
        if not full:
            module = values.pop("network_module", None) or self.fam.network_module
            lycoris = self.fam.training["lycoris_modules"]
            if module != self.fam.network_module and module not in lycoris:
                self.error(where + ("network_module",), f"{module} is not the {self.fam.title} LoRA module (musubi fails with 'No LoRA modules found')", f"use {self.fam.network_module} (or {' / '.join(lycoris[:2])}), or leave it unset")
            args += self.arg(script, "network_module", module)
        mixed = self.mixed_precision(name, stage, values.pop("mixed_precision", None))
        args += self.arg(script, "mixed_precision", mixed)
        if getattr(stage, "network_weights", None) is not None:
            values["network_weights"] = self.value_or_ref(refs, where + ("network_weights",), stage.network_weights)[0]
        memory_why = self.plan_memory(name, stage, values) if getattr(stage, "gpu_memory_gib", None) is not None else {}
        self.training_length(stage, values)
        self.check_train_rules(name, stage, values)
        if full:
            self.check_finetune_rules(name, stage, values, mixed)
        args += self.options(name, stage, script, values)
        output_dir = self.path(stage.output_dir) if stage.output_dir else str(Path(self.workdir) / name)
        output_name = stage.output_name or (self.p.name if self.train_stages == 1 else f"{self.p.name}-{name}")
        if stage.output_name and (SHELL_META.search(output_name) or "/" in output_name or "\\" in output_name):
            self.error(where + ("output_name",), f"output_name {output_name!r} must be a plain file name", "use letters, digits, '-', '_' and '.'")
        if sampling:
            if self.task_props.get("samples_need_image") and not isinstance(stage.sample_prompts, str):
                for i, prompt in enumerate(stage.sample_prompts):
                    if not prompt.image:
                        self.error(where + ("sample_prompts", i, "image"), f"{self.fam.title} {self.task} samples start from an image (musubi asserts 'image_path should be set')",
                                   "give each sample prompt an image")
            if self.fam.output == "image" and not isinstance(stage.sample_prompts, str):
                for i, prompt in enumerate(stage.sample_prompts):
                    if prompt.frames is not None:
                        self.error(where + ("sample_prompts", i, "frames"), f"{self.fam.title} makes images, not videos", "remove frames")
            args += self.arg(script, "sample_prompts", self.prompt_file(name, stage.sample_prompts, "sample"))
        args += self.arg(script, "output_dir", output_dir) + self.arg(script, "output_name", output_name)
        launch = launch_args(stage.num_processes or 1, mixed, stage.num_machines or 1)
        if (stage.num_processes or 1) % (stage.num_machines or 1):  # accelerate starts num_processes / num_machines per machine
            self.error(where + ("num_processes",), f"num_processes {stage.num_processes or 1} (all machines together) is not a "
                       f"multiple of num_machines {stage.num_machines}", "give every machine the same number of GPUs")
        checkpoints = self.checkpoint_names(values, output_dir, output_name)
        save_state = bool(values.get("save_state") or values.get("save_state_on_train_end"))
        outputs = [
            Output("model" if full else "lora", "file", str(Path(output_dir) / f"{output_name}.safetensors")),
            Output("checkpoints", "files", output_dir, f"{output_name}*.safetensors", required=False),
        ]
        if save_state:
            outputs.append(Output("state", "dir", str(Path(output_dir) / f"{output_name}-state"), required=False))
        inputs = [Input("dit", dit or "", dit_from), Input("dataset_config", dataset)]
        inputs += [Input(r.artifact, "", r.stage) for r in refs.values()]
        meta = {
            "output_dir": output_dir, "output_name": output_name, "save_state": save_state,
            "checkpoints": checkpoints, "mixed_precision": mixed, "task": self.task, "family": self.p.family,
            "cache_arch": self.cache_arch,
        }
        if memory_why:
            meta["memory_plan"] = memory_why
        for key in self.fam.training["meta"]:
            if key in values:
                meta[key] = values[key]
        return Step(name, stage.kind, self.p.family, script, args, launcher=LAUNCH_ACCELERATE, launch_args=launch,
                    inputs=inputs, outputs=outputs, meta=meta)

    def train_dit(self, name, stage, tpl: StageSpec, values: dict, refs: dict) -> tuple[str | None, str]:
        """(the DiT this training runs on, the stage that makes it or "")."""
        where = ("stages", name)
        if stage.dit:
            path, producer = self.value_or_ref(refs, where + ("dit",), stage.dit)
        if self.task_props.get("experts"):
            if getattr(stage, "expert", None) is None:
                self.error(where + ("expert",), f"{self.fam.title} {self.task} trains one expert per run", "set expert = \"high\" or \"low\" (one train stage each)")
                return None, ""
            low_high = self.task_props.expert_timesteps[stage.expert]
            for key, value in zip(self.fam.experts["timestep_options"], low_high):
                values.setdefault(key, value)
            for key, value in tpl.expert_defaults.items():
                values.setdefault(key, value)
            if stage.dit:
                return path, producer
            slot = self.fam.experts["slots"][stage.expert]
            if getattr(self.p.models, slot) is None:
                self.error(("models", slot), f"models.{slot} is required to train the {stage.expert}-noise expert", f"set models.{slot}")
                return None, ""
            return self.path(getattr(self.p.models, slot)), ""
        if getattr(stage, "expert", None) is not None:
            self.error(where + ("expert",), f"expert applies to two-expert tasks ({', '.join(self.expert_tasks()) or 'none here'}), not {self.task or self.fam.title}", "remove expert")
        if stage.dit:
            return path, producer
        if self.p.models.dit is None:
            self.error(("models", "dit"), f"models.dit is required to train (stage {name!r})", "set models.dit to the DiT checkpoint")
            return None, ""
        return self.path(self.p.models.dit), ""

    def build_finetune(self, name, stage, tpl, refs) -> Step:
        return self.build_train(name, stage, tpl, refs)

    def check_finetune_rules(self, name: str, stage, values: dict, mixed: str) -> None:
        """What musubi's full fine-tuning scripts assert, crash on or silently ignore (common.toml [finetune])."""
        where = ("stages", name)
        rules = registry.finetune_rules()
        extra = {k.lstrip("-").replace("-", "_"): k for k in stage.extra_args}

        def at(option: str) -> tuple:
            if option in extra:
                return where + ("extra_args", extra[option])
            return where + (option,) if option in stage.model_fields_set else where

        chosen = {**values, **{dest: stage.extra_args[k] for dest, k in extra.items()}}
        for option in extra:
            why = rules["ignored"].get(option) or (rules["ignored_prefix_why"] if option.startswith(rules["ignored_prefix"]) else None)
            if why:
                self.error(at(option), f"{option} does nothing in a full fine-tune: {why}", f"remove {option}" + ("; for a LoRA use kind = \"train\"" if option.startswith(rules["ignored_prefix"]) else ""))
        for option, precision in rules["precision"].items():
            if chosen.get(option) and mixed != precision:
                self.error(at(option), f"{option} needs mixed_precision {precision} (musubi asserts it), got {mixed}", f"set mixed_precision = \"{precision}\", or remove {option}")
        optimizer = str(chosen.get(self.fam.flag("optimizer_type"), "")).lower()
        fused = chosen.get(rules["fused"])
        if fused and optimizer not in rules["fused_optimizers"]:
            self.error(at(rules["fused"]), f"{rules['fused']} works only with {', '.join(rules['fused_optimizers'])} (musubi patches the optimizer with Adafactor's step), and the optimizer is {optimizer or 'not set'}",
                       f"set optimizer_type = \"{rules['fused_optimizers'][0]}\", or {rules['fused']} = false")
        if fused and int(chosen.get("gradient_accumulation_steps") or 1) > 1:
            self.error(at("gradient_accumulation_steps"), f"{rules['fused']} does not support gradient accumulation (musubi's docs): each micro-batch would take an optimizer step",
                       f"remove gradient_accumulation_steps, or set {rules['fused']} = false")
        if fused and chosen.get("max_grad_norm") not in (None, 0, 0.0):
            self.warn(at("max_grad_norm"), f"with {rules['fused']}, max_grad_norm clips each weight's gradient on its own, not their norm together (musubi's docs recommend 0)", "set max_grad_norm = 0")
        patch = rules["swap_patch"]
        if int(chosen.get("blocks_to_swap") or 0) > 0 and not fused:
            if not self.has_option(stage, patch):
                self.error(at("blocks_to_swap"), f"{self.fam.title} fine-tuning swaps blocks only with {rules['fused']} ({self.fam.stages[stage.kind].script} has no {patch})",
                           f"set {rules['fused']} = true with optimizer_type = \"{rules['fused_optimizers'][0]}\", or remove blocks_to_swap")
            elif not chosen.get(patch):
                self.error(at("blocks_to_swap"), f"block swap without {rules['fused']} leaves gradients on another device than their swapped weights, and the optimizer step fails (musubi's docs)",
                           f"set {patch} = true (AdamW, Adafactor), or {rules['fused']} = true with Adafactor")
            elif optimizer in rules["swap_patch_refuses"]:
                self.error(at(patch), f"{patch} does not work with {optimizer} (musubi's docs)", "use optimizer_type = \"adamw\" or \"adafactor\"")
        self.check_model_files(name, stage, chosen, rules)

    def has_option(self, stage, option: str) -> bool:
        return option in contract.options(self.fam.stages[stage.kind].script)

    def check_model_files(self, name: str, stage, values: dict, rules: dict) -> None:
        """A fine-tune saves the whole DiT each time (float32 unless its weights are bfloat16): say how much
        disk the kept files take when that is a lot."""
        if self.fam.tasks and self.task not in self.fam.tasks:
            return
        size = self.fam.dit(self.task).params * (2 if values.get(rules["half_weights"]) else 4)
        epochs, every = values.get("max_train_epochs"), values.get("save_every_n_epochs")
        steps, every_steps = values.get("max_train_steps"), values.get("save_every_n_steps")
        if every_steps and steps:
            count, keep = -(-steps // every_steps), values.get("save_last_n_steps")
        elif every and epochs:
            count, keep = -(-epochs // every), values.get("save_last_n_epochs")
        else:
            count, keep = 1, None
        count = min(count, keep + 1) if keep else count
        total = count * size / 2**30
        if count > 2 and total > 100:
            self.warn(("stages", name), f"this fine-tune keeps {count} model files of {size / 2**30:.0f} GiB each ({total:.0f} GiB of disk)",
                      "keep fewer with save_last_n_epochs (or save_last_n_steps), or save less often")

    def expert_tasks(self) -> list[str]:
        return [t for t, task in self.fam.tasks.items() if task.get("experts")]

    def plan_memory(self, name: str, stage, values: dict) -> dict[str, str]:
        """Fill the memory options the user did not set with the planner's fastest setting that
        fits `gpu_memory_gib`, for the dataset's largest training sample. This is per GPU whatever
        num_processes says: under accelerate's data parallelism every rank holds the whole model and
        its own batch (musubi's batch_size is per GPU), and a LoRA's gradients, which DDP mirrors,
        are a few MiB."""
        from ..tools.memory import largest_sample, plan_memory

        if self.dataset is None:
            return {}
        shape = largest_sample(self.dataset)
        try:
            plan = plan_memory(self.p.family, self.task, float(stage.gpu_memory_gib), shape["resolution"], shape["frames"],
                               shape["batch_size"], int(values.get("network_dim", 32)))
        except PipelineError as exc:
            for problem in exc.problems:
                self.error(("stages", name, "gpu_memory_gib"), problem.message, problem.fix)
            return {}
        chosen = dict(self.fam.training["memory_options"])  # what the planner decides, each at its "off" value
        chosen.update({k: v for k, v in plan.train.items() if k in chosen})
        for key, value in chosen.items():
            if key not in stage.model_fields_set:
                if value in (False, 0):
                    values.pop(key, None)  # musubi's default is off
                else:
                    values[key] = value
        return dict(plan.why)

    def mixed_precision(self, name: str, stage, requested: str | None) -> str:
        dtype = self.p.models.dit_dtype or _guess_dtype(stage.dit or self.p.models.dit or "")
        if requested is None:
            return {"fp16": "fp16", "bf16": "bf16"}.get(dtype or "", "bf16")
        if dtype in ("bf16", "fp16") and requested not in ("no", dtype):
            message = f"mixed_precision {requested} does not match the DiT's {dtype} weights"
            fix = f"set mixed_precision = \"{dtype}\" (or models.dit_dtype if the file name misleads)"
            if self.fam.rule("dit_dtype") == "assert":
                self.error(("stages", name, "mixed_precision"), message + f" (musubi asserts this for {self.fam.title})", fix)
            else:
                self.warn(("stages", name, "mixed_precision"), message, fix)
        return requested

    def training_length(self, stage, values: dict) -> None:
        """A length in steps replaces the template's length in epochs (musubi lets epochs win), and
        gets checkpoints at about every eighth of the run, so an interrupted run can resume."""
        chosen = stage.model_fields_set
        if "max_train_steps" in chosen and "max_train_epochs" not in chosen:
            values.pop("max_train_epochs", None)
            if "save_every_n_epochs" not in chosen:
                values.setdefault("save_every_n_steps", max(1, values["max_train_steps"] // 8))
        if "save_every_n_steps" in values and "save_every_n_epochs" not in chosen:
            values.pop("save_every_n_epochs", None)  # a step cadence replaces the template's epoch cadence

    def check_train_rules(self, name: str, stage, values: dict) -> None:
        where = ("stages", name)
        optimizer = str(values.get("optimizer_type", ""))
        if not optimizer:
            self.error(where + ("optimizer_type",), "optimizer_type is empty, and musubi's default for it crashes", "set optimizer_type = \"adamw8bit\" (or AdamW, AdaFactor, a dotted class path)")
        elif optimizer.lower() not in self.fam.training["optimizers"] and "." not in optimizer:
            self.error(where + ("optimizer_type",), f"unknown optimizer {optimizer!r}", "use AdamW, AdamW8bit, AdaFactor, or a dotted class path such as prodigyopt.Prodigy")
        self.check_swap(name, values)
        rule = self.fam.rule("swap_batch_one")  # block swap works only one sample per step on these paths
        if rule and values.get("blocks_to_swap") and self.dataset is not None:
            path = self.task_props.get(rule["task"]) and f"task {self.task}" or (stage.attention in rule["attention"] and f"attention {stage.attention}")
            sizes = [d.batch_size or self.dataset.general.batch_size or 1 for d in self.dataset.datasets]
            if path and max(sizes, default=1) > 1:
                self.error(where + ("blocks_to_swap",), f"{self.fam.title} with {path} swaps blocks only with a dataset batch_size of 1, got {max(sizes)} (musubi raises)",
                           "set batch_size = 1 in the dataset, or remove blocks_to_swap")
        option = self.fam.rule("dtype_option")  # the option naming the DiT's compute dtype (a stage value or extra_args)
        wanted = values.get(option, stage.extra_args.get(option)) if option else None
        dtype = self.p.models.dit_dtype or _guess_dtype(stage.dit or self.p.models.dit or "")
        if dtype == "fp16" and str(wanted).lower() in ("bfloat16", "bf16", "float32", "fp32", "float"):
            at = where + (option,) if option in values else where + ("extra_args", option)
            self.error(at, f"the DiT's weights are float16, and musubi refuses {option} {wanted} for them (it cannot raise float16 weights)",
                       f"remove {option} (musubi then keeps float16), or use a bf16 DiT file")
        if values.get("fp8_scaled") and not values.get("fp8_base"):
            self.error(where + ("fp8_scaled",), "fp8_scaled requires fp8_base (musubi stops with 'fp8_scaled requires fp8_base')", "set fp8_base = true")
        boundary = values.get("timestep_boundary")
        if boundary is not None and 0 < boundary < 1:
            self.error(where + ("timestep_boundary",), f"Wan training takes timestep_boundary as a whole number, got {boundary}", f"write {int(round(boundary * 1000))}")
        if self.task_props.get("one_frame_only") and not values.get("one_frame"):
            self.error(where, f"{self.task} trains only as one-frame training (video FLF2V training crashes in musubi)", "set one_frame = true and use a one-frame dataset (docs/wan_1f.md)")
        if not values.get("max_train_epochs") and not values.get("max_train_steps"):
            self.error(where, "the training length is not set", "set max_train_epochs (or max_train_steps)")

    def checkpoint_names(self, values: dict, output_dir: str, output_name: str) -> list[str] | None:
        """The LoRA files training saves, oldest first, when they can be known before it runs."""
        epochs, every_epochs = values.get("max_train_epochs"), values.get("save_every_n_epochs")
        steps, every_steps = values.get("max_train_steps"), values.get("save_every_n_steps")
        names: list[str] = []
        if epochs and every_epochs and not every_steps:
            names = [f"{output_name}-{e:06d}.safetensors" for e in range(every_epochs, epochs, every_epochs)]
        elif every_steps and steps and not epochs:
            names = [f"{output_name}-step{s:08d}.safetensors" for s in range(every_steps, steps, every_steps)]
        else:
            return None
        keep = values.get("save_last_n_epochs") or values.get("save_last_n_steps")
        if keep:
            names = names[-keep:]
        return [str(Path(output_dir) / n) for n in names] + [str(Path(output_dir) / f"{output_name}.safetensors")]

    def prompt_file(self, name: str, prompts, purpose: str, script: str = "") -> str:
        """The prompt file a stage passes to musubi, written by the plan (content checked here)."""
        field = "prompts" if purpose == "batch" else "sample_prompts"
        if isinstance(prompts, str):
            self.check_path(("stages", name, field), prompts)
            return self.path(prompts)
        from ..tools import prompts as prompt_files

        items = [p.model_dump(exclude_none=True) for p in prompts]
        # Sample prompts go as JSON: musubi's .txt parser reads options out of the prompt text.
        suffix = "txt" if purpose == "batch" else "json"
        path = str(Path(self.workdir) / "generated" / f"{name}-{purpose}-prompts.{suffix}")
        try:
            if purpose == "batch":
                text = "\n".join(prompt_files.generate_prompt_lines(items, script, file=self.src.file)) + "\n"
            else:
                text = prompt_files.sample_prompts_json(items, file=self.src.file)
        except PipelineError as exc:
            for problem in exc.problems:
                sub = problem.path.removeprefix("prompts")
                self.problems.append(Problem(problem.message, path=f"stages.{name}.{field}{sub}", file=self.src.file,
                                             line=self.src.line_of(("stages", name, field)), fix=problem.fix))
            return path
        self.add_file(GeneratedFile(path, text))
        return path

    def lora_args(self, name, stage, refs, script, tpl: StageSpec) -> tuple[list[str], list[Input]]:
        """The LoRA flags of each LoRA field the stage's script has (Wan 2.2: one pair per expert)."""
        args: list[str] = []
        inputs: list[Input] = []
        for field in LORA_FIELDS:
            loras = getattr(stage, field, None) or []
            if not loras:
                continue
            flags = tpl.loras.get(field)
            if flags is None or flags[0] not in contract.options(script) or (field != "loras" and not self.task_props.get("experts")):
                self.error(("stages", name, field), f"{self.fam.title} {self.task or ''} {stage.kind} takes no {field}".replace("  ", " "),
                           f"remove it; {field} is for two-expert tasks ({', '.join(self.expert_tasks()) or 'none in this family'})")
                continue
            weights_flag, multipliers_flag = flags
            weights, multipliers = [], []
            for i, lora in enumerate(loras):
                path, producer = self.value_or_ref(refs, ("stages", name, field, i, "path"), lora.path)
                weights.append(path)
                multipliers.append(float(lora.multiplier))
                inputs.append(Input(f"lora{i}" if field == "loras" else f"{field}{i}", path, producer))
            if weights:
                # Always one multiplier per LoRA: musubi silently uses 1.0 for a missing one.
                args += contract.render(script, weights_flag, weights) + contract.render(script, multipliers_flag, multipliers)
        return args, inputs

    def build_generate(self, name, stage, tpl, refs) -> Step:
        where = ("stages", name)
        script = tpl.script
        values = self.settings(stage, tpl)
        chosen = stage.model_fields_set
        args: list[str] = []
        if self.has(script, "task"):
            args += self.arg(script, "task", self.task_arg)
        inputs: list[Input] = []
        if stage.dit:  # a merged model or another DiT file instead of models.dit
            dit, producer = self.value_or_ref(refs, where + ("dit",), stage.dit)
            args += self.arg(script, "dit", dit)
            inputs.append(Input("dit", dit, producer))
        args += self.models(name, stage, tpl, script, skip=("dit",) if stage.dit else ())
        lora_args, lora_inputs = self.lora_args(name, stage, refs, script, tpl)
        args += lora_args
        inputs += lora_inputs
        save_path = self.path(stage.save_path) if stage.save_path else str(Path(self.workdir) / name)
        texts = [stage.prompt is not None, stage.prompts is not None, stage.section_prompts is not None]
        if sum(texts) != 1:
            self.error(where, "a generate stage needs exactly one of prompt, prompts or section_prompts", "set prompt = \"...\" (or prompts = [...] for a batch)")
        if stage.prompt is not None:
            words = self.arg(script, "prompt", stage.prompt)
            # A positional prompt goes first: after a list option (--lora_multiplier) argparse would take it as a value.
            positional = contract.options(script)[self.fam.flag("prompt")].action == "positional"
            args = words + args if positional else args + words
        sections = self.fam.rule("section_prompts")
        if stage.section_prompts is not None:
            if not sections:
                self.error(where + ("section_prompts",), f"section prompts are not a {self.fam.title} feature", "use prompt")
            args += self.arg(script, "prompt", _sections(stage.section_prompts))
        if stage.section_images is not None:
            if not sections:
                self.error(where + ("section_images",), f"section start images are not a {self.fam.title} feature", "use image_path")
            elif stage.image_path is not None and "0" in stage.section_images:
                self.error(where + ("section_images",), "section 0's image is the start image, and image_path sets it too", "remove image_path or section_images['0']")
            else:
                images = {k: self.path(v) for k, v in stage.section_images.items()}
                if stage.image_path is not None:
                    images = {"0": self.path(stage.image_path), **images}
                values.pop(self.fam.flag("image"), None)
                args += self.arg(script, "image", _sections(images))
        if stage.prompts is not None:
            if not self.has(script, "batch_file"):
                self.error(where + ("prompts",), f"{script} has no batch mode (--{self.fam.flag('batch_file')})", "make one generate stage per prompt")
            else:
                args += self.arg(script, "batch_file", self.prompt_file(name, stage.prompts, "batch", script))
        one_frame = values.get(self.fam.flag("one_frame_inference")) is not None
        # Template defaults that do nothing in the mode the stage asks for are left out.
        drops = (tpl.one_frame_drops if one_frame else ()) + (tpl.sections_drop if values.get(self.fam.flag("video_sections")) else ())
        for option in drops:
            if option not in chosen:
                values.pop(option, None)
        if self.task_props.get("start_image") and stage.image_path is None and not stage.section_images and stage.prompts is None:
            black = self.fam.rule("silent_black_start")
            self.error(where + ("image_path",), f"{self.fam.title} {self.task or ''} generation starts from an image".replace("  ", " "), "set image_path (musubi would silently use a black image)" if black else "set image_path")
        if self.task_props.get("control") and values.get(self.fam.flag("control_video")) is None and stage.prompts is None:
            self.error(where + (self.fam.flag("control_video"),), f"{self.task} (Fun-Control) generates from a control video", f"set {self.fam.flag('control_video')} to the control video")
        if self.fam.output == "image":
            inputs += self.check_image_generation(name, stage, values)
        length = values.get(self.fam.flag("video_length"))
        if self.fam.rule("frame_rule") == "4n+1" and length is not None and (length - 1) % 4:
            self.error(where + ("video_length",), f"video_length must be 4*N+1, got {length}", f"use {(length - 1) // 4 * 4 + 1} or {((length - 1) // 4 + 1) * 4 + 1}")
        self.check_video_rules(name, stage)
        self.check_swap(name, values)
        args += self.options(name, stage, script, values)
        # The outputs table's first type is the script's default --output_type.
        kind = tpl.outputs.get(values.get(self.fam.flag("output_type"), next(iter(tpl.outputs), "")), "*")
        # A script that writes one file by name (rule save_file) gets <save_path>/<stage>.<type's suffix>.
        target = str(Path(save_path) / f"{name}{Path(kind).suffix}") if self.fam.rule("save_file") else save_path
        args += self.arg(script, "save_path", target)
        return Step(name, stage.kind, self.p.family, script, args, inputs=inputs,
                    outputs=[Output(f"{self.fam.output}s", "files", save_path, kind)],
                    meta={"save_path": save_path, "prompts": len(stage.prompts or []) or 1,
                          "batch_prompts": [p.model_dump(exclude_none=True) for p in stage.prompts or []]})

    def check_video_rules(self, name: str, stage) -> None:
        """Generation rules of the registry: sizes on the family's (or task's) grid, and an image that
        makes musubi load another model than the task's (rule image_selects_model)."""
        where = ("stages", name)
        step = self.task_props.get("size_step") or self.fam.rule("size_step")
        size = stage.video_size
        if step and size and (size[0] % step or size[1] % step):
            self.error(where + ("video_size",), f"video_size {list(size)}: {self.fam.title} {self.task or ''} needs height and width divisible by {step}".replace("  ", " "),
                       f"use {[max(step, v // step * step) for v in size]}")
        if self.fam.rule("image_selects_model") and stage.image_path is not None and not self.task_props.get("start_image"):
            image_tasks = [t for t, task in self.fam.tasks.items() if task.get("start_image")]
            self.error(where + ("image_path",), f"an image_path makes musubi load the image-to-video model, and task {self.task} is not one",
                       f"remove image_path, or set task = {image_tasks[0]!r} with its DiT" if image_tasks else "remove image_path")

    def check_swap(self, name: str, values: dict) -> None:
        """blocks_to_swap above what the DiT's enable_block_swap accepts (clamped where the family's rule says so)."""
        swap = values.get("blocks_to_swap")
        if not isinstance(swap, int) or (self.fam.tasks and self.task not in self.fam.tasks):
            return  # nothing to check, or a task already reported as unknown
        top = self.fam.dit(self.task).max_blocks_to_swap
        if swap > top:
            where = ("stages", name, "blocks_to_swap")
            if self.fam.rule("block_swap_clamped"):
                self.warn(where, f"{self.fam.title} swaps at most {top} blocks; musubi clamps {swap} to that", f"set blocks_to_swap = {top}")
            else:
                self.error(where, f"{self.fam.title} swaps at most {top} blocks, got {swap} (musubi's enable_block_swap refuses more)", f"set blocks_to_swap = {top} or less")

    def check_image_generation(self, name: str, stage, values: dict) -> list[Input]:
        """An image family's generation rules: the control image an edit task needs (and how many it
        takes), the size on musubi's grid; returns the control images as inputs."""
        where = ("stages", name)
        flag = self.fam.flag("control_images")
        controls = values.get(flag) or []
        title = f"{self.fam.title} {self.task or ''}".strip()
        if self.task_props.get("control_generate") is True and not controls and stage.prompts is None:
            self.error(where + (flag,), f"{title} generates from a control image", f"set {flag} = [\"path/to/image.png\"]")
        if controls and not self.task_props.get("control_generate") and not self.task_props.get("control_optional"):
            tasks = self.tasks_with("control_generate")
            self.error(where + (flag,), f"{title} takes no control image", f"remove {flag}" + (f", or set task to one of {', '.join(tasks)}" if tasks else ""))
        most = self.task_props.get("max_control_images")
        if most and len(controls) > most:
            self.error(where + (flag,), f"{title} takes {most} control image(s), got {len(controls)}", f"keep {most}")
        for option, value in self.fam.stages["generate"].task_defaults.get("official_control_size", {}).items():
            if self.task_props.get("official_control_size") and values.get(option) != value:
                self.error(where + (option,), f"{title} needs {option} = {str(value).lower()} (musubi-tuner's docs: mandatory)", f"remove {option} = {values.get(option)!r}")
        step = self.fam.rule("size_step")
        size = values.get("image_size")
        if step and size and (size[0] % step or size[1] % step):
            self.error(where + ("image_size",), f"image_size {list(size)} is not a multiple of {step} (musubi stops: 'height and width have to be divisible by {step}')",
                       f"use [{size[0] // step * step}, {size[1] // step * step}]")
        rule = self.fam.rule("json_prompt")  # the script verifies the prompt as a structured JSON caption
        if rule and stage.prompt is not None and not values.get(rule["unless"]) and not stage.extra_args.get(rule["unless"]):
            import json

            try:
                caption = json.loads(stage.prompt)
            except ValueError:
                caption = None
            missing = [k for k in rule["keys"] if not isinstance(caption, dict) or k not in caption]
            if missing:
                self.error(where + ("prompt",), f"{self.fam.title} takes a structured JSON prompt, and this one " + ("is not a JSON object" if not isinstance(caption, dict) else f"has no {', '.join(missing)}") + " (musubi stops: 'caption verifier flagged prompt')",
                           f"write the prompt as JSON with {', '.join(rule['keys'])}, or set extra_args {rule['unless']} = true to only warn")
        return [Input(f"control_image{i}", self.path(p)) for i, p in enumerate(controls)]

    def build_merge(self, name, stage, tpl, refs) -> Step:
        where = ("stages", name)
        script = tpl.script
        output = self.path(stage.output) if stage.output else str(Path(self.workdir) / name / f"{self.p.name}-merged.safetensors")
        if not stage.loras:
            self.error(where + ("loras",), "nothing to merge", "list the LoRAs to merge into the DiT")
        for i, lora in enumerate(stage.loras):
            ref = refs.get(where + ("loras", i, "path"))
            if ref is not None and self.p.stages[ref.stage].kind == "convert" and self.p.stages[ref.stage].to == "comfyui":
                self.error(where + ("loras", i, "path"), "musubi merges only musubi-format LoRAs, and this one was converted to ComfyUI format", f"refer to the LoRA before conversion, such as '@{self.p.stages[ref.stage].input.lstrip('@')}'")
        lora_args, inputs = self.lora_args(name, stage, refs, script, tpl)
        if self.fam.rule("merge_route") == "merge_lora":
            args = self.models(name, stage, tpl, script) + lora_args + self.arg(script, "merged_model", output)
            if stage.device:
                args += self.arg(script, "device", stage.device)
        else:
            # Through the generate script. Without --lycoris, Wan and FramePack exit 0 and save nothing
            # (upstream PR #594); a Wan merge also encodes a prompt before it loads the DiT.
            args = (self.arg(script, "task", self.task_arg) if self.has(script, "task") else []) + self.models(name, stage, tpl, script) + lora_args
            args += self.arg(script, "lycoris", True) + self.arg(script, "merged_model", output) + self.arg(script, "prompt", "merge")
            args += self.options(name, stage, script, dict(tpl.defaults))  # what the script needs before it loads the DiT
            args += self.arg(script, "save_path", str(Path(self.workdir) / name))
            self.warn(where, f"merging {self.fam.title} LoRAs needs the lycoris-lora package in musubi-tuner's venv", "pip install lycoris-lora there (musubi-pipe doctor checks it)")
        return Step(name, stage.kind, self.p.family, script, args, inputs=inputs,
                    outputs=[Output("model", "file", output)], meta={"output": output})

    def build_ema(self, name, stage, tpl, refs) -> Step:
        where = ("stages", name)
        script = tpl.script
        if isinstance(stage.checkpoints, str):
            paths, producer = self.value_or_ref(refs, where + ("checkpoints",), stage.checkpoints)
            if producer and paths is None:
                self.error(where + ("checkpoints",), f"the checkpoints of {producer!r} cannot be known before it runs", f"give stage {producer!r} save_every_n_epochs with max_train_epochs (or save_every_n_steps with max_train_steps)")
                raise _Skip
            if not producer:
                self.error(where + ("checkpoints",), "a single file is not a series of checkpoints", "refer to '@<train stage>.checkpoints' or list the files oldest first")
                raise _Skip
            if self.p.stages[producer].kind == "finetune":
                self.error(where + ("checkpoints",), f"post-hoc EMA here averages LoRA checkpoints, and {producer!r} saves whole models", "average the checkpoints of a LoRA train stage, or use the fine-tuned model as it is")
                raise _Skip
            inputs = [Input("checkpoints", p, producer) for p in paths]
        else:
            paths, inputs = [], []
            for i, item in enumerate(stage.checkpoints):
                path, producer = self.value_or_ref(refs, where + ("checkpoints", i), item)
                paths.append(path)
                inputs.append(Input(f"checkpoint{i}", path, producer))
        if len(paths) < 2:
            self.error(where + ("checkpoints",), f"post-hoc EMA needs at least two checkpoints, got {len(paths)}", "save checkpoints more often (save_every_n_epochs) or list more files")
        values = self.settings(stage, tpl)
        for key, low, high in (("beta", 0.0, 1.0), ("beta2", 0.0, 1.0)):
            if key in values and not low < values[key] < high:
                self.error(where + (key,), f"{key} must be between 0 and 1, got {values[key]}", "use a value such as 0.95")
        if "sigma_rel" in values:
            if values["sigma_rel"] <= 0:
                self.error(where + ("sigma_rel",), f"sigma_rel must be positive, got {values['sigma_rel']}", "use a value such as 0.2")
            if "beta" in values or "beta2" in values:
                self.warn(where + ("sigma_rel",), "sigma_rel overrides beta and beta2", "remove beta/beta2 or sigma_rel")
        output = self.path(stage.output) if stage.output else str(Path(self.workdir) / name / f"{self.p.name}-ema.safetensors")
        # Files in training order, and --no_sort: musubi would otherwise order them by mtime.
        args = list(paths) + self.arg(script, "ema_keep_order", True) + self.options(name, stage, script, values) + self.arg(script, "ema_output", output)
        return Step(name, stage.kind, self.p.family, script, args, inputs=inputs,
                    outputs=[Output("lora", "file", output)], meta={"output": output})

    def build_convert(self, name, stage, tpl, refs) -> Step:
        where = ("stages", name)
        script = tpl.script
        source, producer = self.value_or_ref(refs, where + ("input",), stage.input)
        if producer:
            made_by = self.p.stages[producer]
            current = made_by.to if made_by.kind == "convert" else "musubi"
            if current == stage.to:
                self.error(where + ("to",), f"the LoRA from {producer!r} is already in {stage.to} format", "remove this stage, or convert the other way")
        elif os.path.isfile(source):
            # A file that exists now can be checked now: converting to its own format does nothing.
            from ..tools.lora import refuse_if_already

            try:
                refuse_if_already(source, stage.to)
            except PipelineError as exc:
                self.problems.extend(Problem(p.message, path=format_path(where + ("input",)), file=self.src.file,
                                             line=self.src.line_of(where + ("input",)), fix=p.fix) for p in exc.problems)
        warning = self.fam.rule("convert_comfyui_warning")
        if warning and stage.to == "comfyui":
            self.warn(where + ("to",), warning if isinstance(warning, str) else f"musubi-tuner {contract.CONTRACT}'s convert_lora.py writes wrong key names for most FramePack modules",
                      f"check the result with `musubi-pipe lora inspect --family {self.fam.name}`, or keep the musubi-format LoRA")
        stem = Path(source).stem
        output = self.path(stage.output) if stage.output else str(Path(self.workdir) / name / f"{stem}-{stage.to}.safetensors")
        values = self.settings(stage, tpl)
        args = self.arg(script, "convert_input", source) + self.arg(script, "convert_output", output) + self.arg(script, "convert_target", tpl.targets[stage.to])
        args += self.options(name, stage, script, values)
        return Step(name, stage.kind, self.p.family, script, args, inputs=[Input("lora", source, producer)],
                    outputs=[Output("lora", "file", output)], meta={"output": output, "to": stage.to})


    def build_lora_merge(self, name, stage, tpl, refs) -> Step:
        where = ("stages", name)
        if len(stage.loras) < 2:
            self.error(where + ("loras",), f"merging needs at least two LoRAs, got {len(stage.loras)}", "list the LoRAs to merge")
        inputs, specs = [], []
        for i, lora in enumerate(stage.loras):
            path, producer = self.value_or_ref(refs, where + ("loras", i, "path"), lora.path)
            inputs.append(Input(f"lora{i}", path, producer))
            specs.append(f"{path}:{float(lora.multiplier)!r}")
        output = self.path(stage.output) if stage.output else str(Path(self.workdir) / name / f"{self.p.name}-{name}.safetensors")
        # --force: the stage owns its output and replaces it when its inputs change.
        args = ["lora", "merge", output, *specs, "--family", self.p.family, "--force"]
        for option in ("rank", "format", "dtype"):
            value = getattr(stage, option)
            if value is not None:
                args += [f"--{option}", str(value)]
        return Step(name, stage.kind, self.p.family, tpl.script, args, launcher=LAUNCH_TOOL, inputs=inputs,
                    outputs=[Output("lora", "file", output)], meta={"output": output})

    def build_check_dataset(self, name, stage, tpl, refs) -> Step:
        dataset = self.need_dataset(name)
        report = str(Path(self.workdir) / name / "dataset-report.json")
        args = ["dataset", "inspect", dataset, "--family", self.p.family, "--report", report]
        outputs = [Output("report", "file", report)]
        if stage.contact_sheet:
            sheet = str(Path(self.workdir) / name / "contact-sheet.png")
            args += ["--sheet", sheet]
            outputs.append(Output("contact_sheet", "file", sheet))
        return Step(name, stage.kind, self.p.family, tpl.script, args, launcher=LAUNCH_TOOL,
                    inputs=self.media_inputs(dataset), outputs=outputs)


def _jsonl_has(base: Path, jsonl: str, prefix: str) -> bool:
    """Whether a metadata JSONL's lines have a key starting with `prefix` (true when the file cannot be read yet)."""
    import json

    path = Path(jsonl) if os.path.isabs(jsonl) else base / jsonl
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [json.loads(line) for line in fh if line.strip()]
    except (OSError, ValueError):
        return True
    return all(any(k.startswith(prefix) for k in line) for line in lines if isinstance(line, dict))


def _sections(items: dict[str, str]) -> str:
    """musubi's per-section syntax for --prompt and --image_path: index:value;;;index:value."""
    return ";;;".join(f"{k}:{v}" for k, v in items.items())


def launch_args(processes: int, mixed_precision: str, machines: int = 1) -> list[str]:
    """accelerate launch flags with everything explicit, so nobody needs `accelerate config`."""
    flag = {role: "--" + option for role, option in registry.launch_flags().items()}
    args = [flag["threads"], "1", flag["processes"], str(processes), flag["mixed_precision"], mixed_precision]
    if processes > 1:
        args.insert(0, flag["multi_gpu"])
    if machines > 1:
        args += [flag["machines"], str(machines)]
    return args


class _Skip(Exception):
    """A stage that cannot be built because of problems already reported."""


def _guess_dtype(path: str) -> str | None:
    name = Path(path).name.lower()
    if "bf16" in name or "bfloat16" in name:
        return "bf16"
    if "fp16" in name or "float16" in name:
        return "fp16"
    return None


__all__ = ["compile_file", "compile_pipeline", "format_path"]
