"""Prompt files for musubi: `--from_file` batches for the generate scripts and `--sample_prompts`
files for training, written so musubi parses back exactly what was meant; and generated outputs
matched back to their prompts."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Sequence

from ..errors import PipelineError, Problem
from ..files import write_atomic

# Prompt field -> inline option, per parser: the registry's generate stages (prompt_options:
# parse_prompt_line splits a line on " --" and reads the first word of each part) and training's
# sample prompts (training/sampling_prompts.py line_to_prompt_dict: inline options in .txt, the
# same keys spelled out in .json).


def generate_options() -> dict[str, dict[str, str]]:
    """Generate script (stem) -> prompt field -> inline option, for scripts with --from_file."""
    from ..pipelines import registry

    return {Path(f.stages["generate"].script).stem: f.stages["generate"].prompt_options
            for f in registry.families() if "generate" in f.stages and f.stages["generate"].prompt_options}


def _sample(table: str) -> dict[str, str]:
    from ..pipelines import registry

    return registry.training()[table]


# The sample parser also tries every option pattern on the prompt text itself (case-insensitive),
# so "i love my cat" becomes image_path="love my cat".
_SAMPLE_TEXT_TRAPS = re.compile(r"^(?:[whfds] \d|(?:g|fs|l) [\d.]|(?:n|i|ei|cn|ci|of) .)", re.IGNORECASE)
INT_FIELDS = {"width", "height", "frames", "seed", "steps", "video_sections"}
FLOAT_FIELDS = {"guidance", "cfg_scale", "flow_shift", "video_seconds"}


@dataclass
class Prompt:
    """One prompt with every per-prompt option of musubi's parsers. Not dsl.model.Prompt: that is the
    pipeline language's strict subset; this one keeps a bad value so that every problem of a batch
    is reported at once, by its prompts[i].field path."""

    text: str
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    frames: int | None = None  # video length in frames
    video_seconds: float | None = None  # FramePack's length
    video_sections: int | None = None  # FramePack
    steps: int | None = None
    guidance: float | None = None  # --g
    cfg_scale: float | None = None  # --l
    flow_shift: float | None = None
    negative: str | None = None
    image: str | None = None
    end_image: str | None = None
    control: str | None = None  # control video
    control_images: list[str] = field(default_factory=list)
    one_frame: str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "Prompt":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown prompt fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def _as_prompts(prompts: Sequence[Prompt | dict]) -> list[Prompt]:
    return [Prompt.from_dict(p) if isinstance(p, dict) else p for p in prompts]


def _is_set(value) -> bool:
    return value not in (None, [], ())


def _problem(i: int, name: str, message: str, fix: str, file: str) -> Problem:
    return Problem(message, path=f"prompts[{i}].{name}", file=file, fix=fix)


def _check_value(i: int, name: str, value, file: str) -> list[Problem]:
    """Checks that an option value survives musubi's line parsing unchanged."""
    if name in INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return [_problem(i, name, f"must be a whole number >= 0, got {value!r}", "give an integer", file)]
        return []
    if name in FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            return [_problem(i, name, f"must be a number >= 0, got {value!r}", "give a non-negative number", file)]
        return []
    text = str(value)
    if not text.strip():
        return [_problem(i, name, "is empty", "remove it or give a value", file)]
    if "\n" in text or "\r" in text:
        return [_problem(i, name, "contains a line break: a prompt file holds one prompt per line", "put it on one line", file)]
    if " --" in text:
        return [_problem(i, name, f"contains ' --', where musubi splits a line into options: {text!r}",
                         "remove the space before '--' (or the dashes)", file)]
    if text != text.strip():
        return [_problem(i, name, "has leading or trailing spaces, which musubi strips", "remove them", file)]
    return []


def _number(value) -> str:
    if isinstance(value, int):
        return str(value)
    text = repr(float(value))
    if "e" in text or "E" in text:  # the sample parser reads [\d.]+ only
        text = f"{value:.12f}".rstrip("0").rstrip(".")
    return text


def _line(prompt: Prompt, i: int, options: dict[str, str], file: str, sample: bool) -> tuple[str, list[Problem]]:
    problems = []
    text = prompt.text if isinstance(prompt.text, str) else ""
    if not text.strip():
        problems.append(_problem(i, "text", "is empty: musubi skips empty lines, so every later prompt would shift",
                                 "give a prompt text", file))
    else:
        problems += _check_value(i, "text", text, file)
        if text.lstrip().startswith("#"):
            problems.append(_problem(i, "text", "starts with '#', which musubi reads as a comment", "reword the start", file))
        if sample and _SAMPLE_TEXT_TRAPS.match(text):
            problems.append(_problem(i, "text", f"starts like an inline option, so training's sample parser misreads it: {text[:30]!r}",
                                     "write the sample prompts as .json (no inline options), or reword the start", file))
    parts = [text]
    for name, option in options.items():
        value = getattr(prompt, name)
        if not _is_set(value):
            continue
        for v in (value if name == "control_images" else [value]):
            found = _check_value(i, name, v, file)
            problems += found
            if not found:
                parts.append(f"--{option} {_number(v) if name in INT_FIELDS | FLOAT_FIELDS else v}")
    return " ".join(parts), problems


def _unsupported(prompt: Prompt, i: int, options: dict[str, str], where: str, file: str) -> list[Problem]:
    out = []
    for f in fields(Prompt):
        value = getattr(prompt, f.name)
        if f.name != "text" and f.name not in options and _is_set(value):
            out.append(_problem(i, f.name, f"{where} has no per-prompt option for {f.name}",
                                f"remove it, or use one of: {', '.join(sorted(options))}", file))
    return out


def generate_prompt_lines(prompts: Sequence[Prompt | dict], script: str, file: str = "") -> list[str]:
    """Lines of a `--from_file` prompt file for a generate script; all problems raise at once."""
    script = Path(script).stem
    options = generate_options()
    if script not in options:
        has = ", ".join(sorted(options))
        raise PipelineError([Problem(f"{script}.py has no --from_file batch mode (scripts with it: {has})",
                                     path="script", file=file, fix="run one generate step per prompt for this family")])
    options = options[script]
    lines, problems = [], []
    for i, p in enumerate(_as_prompts(prompts)):
        problems += _unsupported(p, i, options, f"{script}.py", file)
        if p.guidance is not None and p.cfg_scale is not None and p.guidance != p.cfg_scale:
            problems.append(_problem(i, "cfg_scale", "the generate scripts read --g and --l as the same guidance_scale",
                                     "give only one of guidance and cfg_scale", file))
        line, found = _line(p, i, options, file, sample=False)
        problems += found
        lines.append(line)
    if not prompts:
        problems.append(Problem("no prompts", path="prompts", file=file, fix="give at least one prompt"))
    if problems:
        raise PipelineError(problems)
    return lines


def write_generate_prompts(prompts: Sequence[Prompt | dict], path: str | os.PathLike, script: str) -> Path:
    """Write a `--from_file` prompt file (UTF-8, one prompt per line) atomically."""
    path = Path(path)
    lines = generate_prompt_lines(prompts, script, file=str(path))
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def sample_prompts_json(prompts: Sequence[Prompt | dict], file: str = "") -> str:
    """Training sample prompts as musubi's .json format: texts are never parsed for options."""
    problems, out = [], []
    for i, p in enumerate(_as_prompts(prompts)):
        problems += _unsupported(p, i, _sample("sample_options"), "training's sample prompts", file)
        if not isinstance(p.text, str) or not p.text.strip():
            problems.append(_problem(i, "text", "is empty", "give a prompt text", file))
        for name in INT_FIELDS | FLOAT_FIELDS:
            if getattr(p, name, None) is not None:
                problems += _check_value(i, name, getattr(p, name), file)
        out.append({_sample("sample_json_keys")[f.name]: getattr(p, f.name) for f in fields(Prompt)
                    if f.name in _sample("sample_json_keys") and _is_set(getattr(p, f.name))})
    if problems:
        raise PipelineError(problems)
    return json.dumps(out, ensure_ascii=False, indent=1) + "\n"


def write_sample_prompts(prompts: Sequence[Prompt | dict], path: str | os.PathLike) -> Path:
    """Write a training `--sample_prompts` file. `.json` (recommended: prompt texts are never
    parsed for options) or `.txt` (inline options; texts that musubi would misread are refused)."""
    path = Path(path)
    items = _as_prompts(prompts)
    if path.suffix.lower() == ".json":
        write_atomic(path, sample_prompts_json(items, file=str(path)))
        return path
    if path.suffix.lower() != ".txt":
        raise PipelineError([Problem(f"musubi reads sample prompts from .txt, .toml or .json, not {path.suffix or '(no extension)'}",
                                     file=str(path), fix="name the file prompts.json")])
    problems = [q for i, p in enumerate(items) for q in _unsupported(p, i, _sample("sample_options"), "training's sample prompts", str(path))]
    lines = []
    for i, p in enumerate(items):
        line, found = _line(p, i, _sample("sample_options"), str(path), sample=True)
        problems += found
        lines.append(line)
    if problems:
        raise PipelineError(problems)
    write_atomic(path, "\n".join(lines) + "\n")
    return path


# ---- outputs back to prompts ---------------------------------------------------------------

# generate scripts save "{YYYYmmdd-HHMMSS-mmm}_{seed}[_{extra}].mp4" (or a .png / a folder of images);
# an image script that splits a picture into layers saves "{time}_layer{i}_{seed}_000.png" per layer.
OUTPUT_NAME = re.compile(r"^(?P<time>\d{8}-\d{6}-\d{3})(?:_layer(?P<layer>\d+))?_(?P<seed>\d+)(?:_(?P<extra>.+))?$")
MEDIA_SUFFIXES = {".mp4", ".webm", ".png", ".jpg", ".webp", ".gif", ""}


@dataclass
class Output:
    path: str
    time: datetime
    seed: int
    layer: int | None = None  # the layer of a picture saved as layers


@dataclass
class PromptOutput:
    index: int
    prompt: Prompt
    output: str | None  # None when no output was found for it


def list_outputs(folder: str | os.PathLike, since: float | None = None) -> list[Output]:
    """Generated files in `folder`, oldest first, optionally only those made at or after `since`
    (a time.time() value; one second of slack for clock rounding). Latent files are ignored."""
    folder = Path(folder)
    found = []
    if not folder.is_dir():
        return found
    for p in folder.iterdir():
        stem, suffix = (p.name, "") if p.is_dir() else (p.stem, p.suffix.lower())
        m = OUTPUT_NAME.match(stem)
        if not m or suffix not in MEDIA_SUFFIXES or (m["extra"] or "").endswith("latent"):
            continue
        when = datetime.strptime(m["time"] + "000", "%Y%m%d-%H%M%S-%f")
        if since is not None and when.timestamp() < since - 1:
            continue
        found.append(Output(str(p), when, int(m["seed"]), int(m["layer"]) if m["layer"] else None))
    found.sort(key=lambda o: (o.time, o.layer or 0, o.path))
    return found


def output_group(path: str | os.PathLike) -> list[str]:
    """The files one output of a generate run is made of: a picture saved as layers gives every
    layer (in layer order), any other output just itself."""
    path = Path(path)
    m = OUTPUT_NAME.match(path.stem)
    if not m or m["layer"] is None:
        return [str(path)]
    return [o.path for o in list_outputs(path.parent) if o.layer is not None and
            OUTPUT_NAME.match(Path(o.path).stem)["time"] == m["time"] and o.seed == int(m["seed"]) and Path(o.path).suffix == path.suffix]


def match_outputs(prompts: Sequence[Prompt | dict], folder: str | os.PathLike, since: float | None = None) -> list[PromptOutput]:
    """Pair each prompt of a --from_file batch with the file it produced.

    Rule: the generate scripts decode and save in prompt order, naming each file by a millisecond
    timestamp and its seed. Outputs made since the batch started are taken oldest first; each
    prompt gets the first remaining output (after the previous match) whose seed equals its own.
    A prompt with no seed takes the next output in order. A prompt whose output is missing (a
    failed prompt) gets None and does not consume another prompt's file."""
    outputs = [o for o in list_outputs(folder, since) if not o.layer]  # a layered picture counts once (its layer 0)
    result, cursor = [], 0
    for i, p in enumerate(_as_prompts(prompts)):
        chosen = None
        for k in range(cursor, len(outputs)):
            if p.seed is None or outputs[k].seed == p.seed:
                chosen = k
                break
        if chosen is None:
            result.append(PromptOutput(i, p, None))
            continue
        result.append(PromptOutput(i, p, outputs[chosen].path))
        cursor = chosen + 1
    return result

