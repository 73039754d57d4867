"""Do the files a pipeline reads exist here? Model files, LoRAs, images, prompt files, and the
dataset's folders, JSONL files and captions. `run` refuses to start without them; `validate`
and `plan` say "not found here" as a warning, since a pipeline may be written for another
machine."""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Iterator

from ..errors import Problem
from .limits import MAX_DOCUMENT_BYTES
from .model import Pipeline

# Stage fields that name a file or folder the stage reads (when not an @reference).
INPUT_FIELDS = ("dit", "network_weights", "latents", "text_encoder_cache", "image_path", "end_image_path", "input", "checkpoints")
PROMPT_FILE_FIELDS = ("sample_prompts", "prompts")


def check_file(path: str | Path, severity: str = "error", produced_under: str = "") -> list[Problem]:
    """input_problems of a pipeline file (read again: the commands hold only its plan)."""
    from .load import load_pipeline

    pipeline, source = load_pipeline(path)
    return input_problems(pipeline, source, severity, produced_under)


def input_problems(pipeline: Pipeline, source, severity: str = "error", produced_under: str = "") -> list[Problem]:
    """Every input of `pipeline` missing on this machine, as Problems of `severity`. Paths
    under `produced_under` (the workdir: made by the run itself) are not checked."""
    base = source.folder
    here = " here" if severity == "warning" else ""
    fix = ("correct the path, or ignore this if the pipeline runs on another machine" if severity == "warning"
           else "correct the path (relative paths are from the pipeline's folder)")
    problems: list[Problem] = []
    slots = _family_slots(pipeline.family)
    for where, value, prompt_file in _declared_inputs(pipeline):
        if value.startswith("@"):
            continue  # made by another stage
        path = _resolve(value, base)
        if where[0] == "models" and where[1] in slots and slots[where[1]].hub_id(value) and not os.path.exists(path):
            continue  # a Hugging Face model ID, which musubi downloads
        if produced_under and _is_under(path, produced_under):
            continue
        try:
            info = os.stat(path)
        except OSError:
            problems.append(source.problem(where, f"not found{here}: {path}", fix, severity))
            continue
        if prompt_file and not (stat.S_ISREG(info.st_mode) and info.st_size <= MAX_DOCUMENT_BYTES):
            problems.append(source.problem(where, f"{path} is not a prompt file (a regular file of at most {MAX_DOCUMENT_BYTES >> 20} MiB)",
                                           "give the path of a text or JSON prompt file", severity))
    problems += _dataset_problems(pipeline, source, severity, here, fix)
    return problems


def _family_slots(family: str) -> dict:
    from ..pipelines import registry

    try:
        return registry.family(family).models
    except registry.UnknownFamily:
        return {}


def _declared_inputs(pipeline: Pipeline) -> Iterator[tuple[tuple, str, bool]]:
    """(field path, path as written, is a prompt file) of every input named in the document."""
    for slot, value in pipeline.models.model_dump(exclude_none=True).items():
        if slot != "dit_dtype":
            yield ("models", slot), value, False
    for name, stage in pipeline.stages.items():
        where = ("stages", name)
        for field in INPUT_FIELDS:
            value = getattr(stage, field, None)
            if isinstance(value, str):
                yield where + (field,), value, False
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    yield where + (field, i), item, False
        for i, lora in enumerate(getattr(stage, "loras", None) or []):
            yield where + ("loras", i, "path"), lora.path, False
        for field in PROMPT_FILE_FIELDS:
            value = getattr(stage, field, None)
            if isinstance(value, str):
                yield where + (field,), value, True
            elif isinstance(value, list):
                for i, prompt in enumerate(value):
                    for key in ("image", "end_image"):
                        if getattr(prompt, key, None):
                            yield where + (field, i, key), getattr(prompt, key), False


def _resolve(value: str, base: Path) -> str:
    return value if os.path.isabs(value) else str((base / value).resolve())


def _is_under(path: str, folder: str) -> bool:
    try:
        return Path(path).resolve().is_relative_to(Path(folder).resolve())
    except (OSError, ValueError):
        return False


def _dataset_problems(pipeline: Pipeline, source, severity: str, here: str, fix: str) -> list[Problem]:
    """The dataset's folders, JSONL files, media and captions, as musubi's caching will look for them."""
    from ..errors import PipelineError
    from .load import load_dataset_source

    data = pipeline.dataset
    if data is None:
        return []
    if isinstance(data, str):
        try:
            config, dsource = load_dataset_source(_resolve(data, source.folder))
        except PipelineError:
            return []  # the compiler reports it
        base, where = Path(dsource.file).resolve().parent, ()
    else:
        config, dsource, base, where = data, source, source.folder, ("dataset",)
    problems: list[Problem] = []
    resolved = config.with_paths_resolved(base)
    for i, d in enumerate(resolved.datasets):
        at = where + ("datasets", i)
        for key, want_dir in (("image_directory", True), ("video_directory", True), ("control_directory", True),
                              ("image_jsonl_file", False), ("video_jsonl_file", False)):
            value = getattr(d, key, None)
            if not value:
                continue
            ok = os.path.isdir(value) if want_dir else os.path.isfile(value)
            if not ok:
                what = "folder" if want_dir else "file"
                if os.path.exists(value):
                    problems.append(dsource.problem(at + (key,), f"{value} is not a {what}", fix, severity))
                else:
                    problems.append(dsource.problem(at + (key,), f"{what} not found{here}: {value}", fix, severity))
    if problems:
        return problems
    return _caption_problems(resolved, pipeline.family, dsource, where, severity)


def _caption_problems(config, family: str, dsource, where: tuple, severity: str) -> list[Problem]:
    """Media without captions and folders without media, from the dataset inspector (the same
    rules as the check_dataset stage), one line per dataset."""
    from ..errors import PipelineError
    from ..tools.dataset import inspect_dataset

    try:
        report = inspect_dataset(config, family, read_media=False, check_cache=False)
    except (PipelineError, ValueError, OSError):
        return []
    problems: list[Problem] = []
    for ds in report.datasets:
        at = where + ("datasets", ds.index)
        for p in ds.problems:
            if "not found" in p.message:
                continue  # checked above, with the line
            key = p.path.rsplit(".", 1)[-1] if "." in p.path else None
            problems.append(dsource.problem(at + ((key,) if key else ()), p.message, p.fix,
                                            "warning" if p.severity == "warning" else severity))
        missing = [item for item in ds.items if item.caption is None or (item.error and "not found" in item.error)]
        if missing:
            kind = "videos" if ds.kind == "video" else "images"
            first: Any = missing[0]
            why = first.error or first.skipped or "no caption"
            problems.append(dsource.problem(at, f"{len(missing)} of {len(ds.items)} {kind} have no caption (first: {Path(first.path).name}: {why})",
                                            "write a caption file beside each one (its name with caption_extension), or remove the file",
                                            severity if ds.kind == "video" else "warning"))
    return problems
