"""Reading a pipeline document: parse TOML or YAML, interpolate variables, apply defaults,
validate, and turn every problem into one message with file, line, field path and fix."""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import PipelineError, Problem
from ..files import tomllib
from . import limits
from .sweep import expand as expand_sweeps
from .model import STAGE_KINDS, STAGE_MODELS, Pipeline



@dataclass
class Source:
    """Where a document came from, and how to find the line of a field in it."""

    file: str
    text: str
    format: str  # "toml" or "yaml"
    yaml_lines: dict[tuple, int] = field(default_factory=dict)
    sweeps: dict = field(default_factory=dict)  # what dsl/sweep.py expanded, for plan and the run's comparison

    @property
    def folder(self) -> Path:
        return Path(self.file).resolve().parent if self.file else Path.cwd()

    def line_of(self, path: tuple) -> int | None:
        if self.format == "yaml":
            for end in range(len(path), 0, -1):
                if path[:end] in self.yaml_lines:
                    return self.yaml_lines[path[:end]]
            return None
        return _toml_line(self.text, path)

    def problem(self, path: tuple, message: str, fix: str = "", severity: str = "error") -> Problem:
        return Problem(message, path=format_path(path), file=self.file, line=self.line_of(path), fix=fix, severity=severity)


def format_path(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load_pipeline(path: str | Path) -> tuple[Pipeline, Source]:
    """Read and validate a pipeline file; raise PipelineError with every problem found."""
    path = Path(path)
    text = limits.read_document(path, "pipeline")
    fmt = "yaml" if path.suffix.lower() in (".yaml", ".yml") else "toml"
    return parse_pipeline(text, file=str(path), fmt=fmt)


def parse_pipeline(text: str, file: str = "", fmt: str = "toml") -> tuple[Pipeline, Source]:
    source = Source(file=file, text=text, format=fmt)
    data = _parse(source)
    return validate_pipeline(data, source), source


def validate_pipeline(data: Any, source: Source) -> Pipeline:
    """Validate a document already parsed into Python values (also used by the ComfyUI nodes)."""
    if not isinstance(data, dict):
        raise PipelineError([source.problem((), "the document must be a table of settings", "start with name = ..., family = ...")])
    limits.check_shape(data, source)
    problems: list[Problem] = []
    data = _interpolate(data, source, problems)
    data, source.sweeps = expand_sweeps(data, source, problems)
    data = _apply_defaults(data, source, problems)
    try:
        pipeline = Pipeline.model_validate(data)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, data, source))
        raise PipelineError(problems) from None
    if problems:
        raise PipelineError(problems)
    return pipeline


# --- parsing -------------------------------------------------------------------------------

def _parse(source: Source) -> Any:
    """The document's values; every syntax error, excess (see limits.py) or parser failure is a
    PipelineError with the line."""
    if source.format == "yaml":
        return _parse_yaml(source)
    try:
        if source.format == "json":
            import json

            # duplicate keys: json keeps the last one silently; refuse as TOML does
            return json.loads(source.text, object_pairs_hook=_json_object)
        return tomllib.loads(source.text)
    except RecursionError:
        raise limits.too_deep(source.file, source.text) from None
    except _DuplicateKey as exc:
        raise PipelineError([Problem(f"duplicate key {exc.args[0]!r}", file=source.file, line=_json_key_line(source.text, exc.args[0]),
                                     fix="rename or remove one of them")]) from None
    except ValueError as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors; so is a 5000-digit number
        msg = getattr(exc, "msg", None) or str(exc)
        line = getattr(exc, "lineno", None)
        match = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        if match:
            line = int(match.group(1))
            msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", msg)
        if source.format == "json":
            raise PipelineError([Problem(f"JSON syntax error: {msg}", file=source.file, line=line, fix="fix the JSON syntax at that line")]) from None
        raise PipelineError([Problem(f"TOML syntax error: {msg}", file=source.file, line=line, fix="fix the TOML syntax at that line (strings need quotes, tables [name] stand on their own line)")]) from None


class _DuplicateKey(ValueError):
    pass


def _json_object(pairs: list) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _json_key_line(text: str, key: str) -> int | None:
    lines = [i for i, raw in enumerate(text.splitlines(), 1) if f'"{key}"' in raw]
    return lines[1] if len(lines) > 1 else None


def _parse_yaml(source: Source) -> Any:
    import yaml

    try:
        loader, node = limits.compose_yaml(source.text)
        try:
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except limits.YamlRefused as exc:
        raise PipelineError([Problem(exc.message, file=source.file, line=exc.line, fix=exc.fix)]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        what = getattr(exc, "problem", None) or str(exc)
        raise PipelineError([Problem(f"YAML syntax error: {what}", file=source.file, line=line, fix="fix the YAML syntax at that line")]) from None
    except (ValueError, TypeError, RecursionError) as exc:  # a 5000-digit int, an unhashable key, ...
        raise PipelineError([Problem(f"YAML value cannot be read: {exc}", file=source.file, fix="write plain strings, numbers, lists and tables")]) from None
    if node is not None:
        _record_yaml_lines(node, (), source.yaml_lines)
    return data if data is not None else {}


def _record_yaml_lines(node: Any, path: tuple, lines: dict) -> None:
    """Line of every field path (the node graph is bounded by limits.compose_yaml)."""
    import yaml

    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue  # refused by the constructor (unhashable key)
            child = path + (key.value,)
            _record_yaml_lines(value, child, lines)
            lines[child] = key.start_mark.line + 1  # the key's line, not its value's
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _record_yaml_lines(item, path + (i,), lines)


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\"'.]+)\s*=")


def _toml_line(text: str, path: tuple) -> int | None:
    """Best-effort line of a field path in TOML text (tomllib keeps no positions)."""
    if not path:
        return None
    array_counts: dict[str, int] = {}
    current: list[str] = []
    current_index: dict[str, int] = {}
    best: tuple[int, int] | None = None  # (matched depth, line)
    for number, raw in enumerate(text.splitlines(), 1):
        header = _HEADER.match(raw)
        if header:
            current = [part.strip().strip("\"'") for part in header.group(2).split(".")]
            joined = ".".join(current)
            if header.group(1) == "[[":
                array_counts[joined] = array_counts.get(joined, -1) + 1
                current_index = {joined: array_counts[joined]}
            depth = _match_depth(current, current_index, path)
            if depth and (best is None or depth > best[0]):
                best = (depth, number)
            continue
        key = _KEY.match(raw)
        if key:
            full = current + [part.strip().strip("\"'") for part in key.group(1).split(".")]
            depth = _match_depth(full, current_index, path)
            if depth and (best is None or depth > best[0]) and depth >= len(current):
                best = (depth, number)
    return best[1] if best else None


def _match_depth(keys: list[str], indexes: dict[str, int], path: tuple) -> int:
    """How many leading elements of `path` the TOML location `keys` matches."""
    depth, k = 0, 0
    for part in path:
        if isinstance(part, int):
            joined = ".".join(keys[:k])
            if indexes.get(joined) == part:
                depth += 1
                continue
            break
        if k < len(keys) and keys[k] == part:
            depth += 1
            k += 1
        else:
            break
    return depth if k == len(keys) or depth == len(path) else 0


# --- variables and defaults ------------------------------------------------------------------

def _interpolate(data: dict, source: Source, problems: list[Problem]) -> dict:
    """Render {{ var }} in every string with the document's [vars] (see template.py for the
    bounded template language)."""
    raw_vars = data.get("vars", {})
    if not isinstance(raw_vars, dict):
        return data  # the model reports the wrong type
    from .template import MAX_TEMPLATES, TemplateRefused, render as render_template

    context: dict[str, Any] = {"name": data.get("name"), "family": data.get("family"), "pipeline_dir": str(source.folder)}
    budget = [MAX_TEMPLATES]
    done: dict[str, Any] = {}  # text -> rendering, once [vars] are known (YAML aliases repeat strings)

    def render(value: Any, path: tuple) -> Any:
        if isinstance(value, str) and ("{{" in value or "{%" in value or "{#" in value):
            if path[:1] != ("vars",) and value in done:
                return done[value]
            try:
                out = render_template(value, context, budget)
            except TemplateRefused as exc:
                known = ", ".join(sorted(k for k in context if context[k] is not None)) or "none"
                fix = f"{exc.fix} (known: {known})" if exc.fix.startswith("define") else exc.fix
                problems.append(source.problem(path, f"cannot interpolate {_show(value)}: {exc.message}", fix))
                out = value
            if path[:1] != ("vars",):
                done[value] = out
            return out
        if isinstance(value, dict):
            return {k: render(v, path + (k,)) for k, v in value.items()}
        if isinstance(value, list):
            return [render(v, path + (i,)) for i, v in enumerate(value)]
        return value

    for key, value in raw_vars.items():  # in order, so a variable may use the ones before it
        context[key] = render(value, ("vars", key))
    rendered_vars = {k: context[k] for k in raw_vars}
    return {k: (rendered_vars if k == "vars" else render(v, (k,))) for k, v in data.items()}


def _apply_defaults(data: dict, source: Source, problems: list[Problem]) -> dict:
    defaults = data.get("defaults") or {}
    stages = data.get("stages")
    if not isinstance(defaults, dict) or not isinstance(stages, dict):
        return data
    merged = {}
    for name, stage in stages.items():
        kind = stage.get("kind") if isinstance(stage, dict) else None
        extra = defaults.get(kind) if isinstance(kind, str) and kind in STAGE_MODELS else None
        if isinstance(extra, dict) and isinstance(stage, dict):
            fields = STAGE_MODELS[kind].model_fields
            for key in extra:
                if key not in fields:
                    problems.append(_unknown_key(source, ("defaults", kind, key), key, list(fields)))
            stage = {**{k: v for k, v in extra.items() if k in fields}, **stage}
        merged[name] = stage
    return {**data, "stages": merged}


# --- pydantic errors to problems -----------------------------------------------------------------

def _unknown_key(source: Source, path: tuple, key: str, allowed: list[str]) -> Problem:
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    fix = f"did you mean {close[0]!r}?" if close else "remove it"
    if path and path[-1] == key and len(path) >= 3 and path[0] == "stages":
        fix += " (for a musubi option the language does not model, use extra_args)"
    return source.problem(path, f"unknown key {key!r}", fix)


def _pydantic_problems(exc: ValidationError, data: dict, source: Source) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[tuple] = set()
    for err in _union_errors(exc, data):
        kind = err["type"]
        loc = _clean_loc(err["loc"], data, missing_ok=kind == "missing")
        if kind == "extra_forbidden":
            key = loc[-1]
            parent = _model_at(loc[:-1], data)
            allowed = list(parent.model_fields) if parent is not None else []
            problem = _unknown_key(source, loc, key, allowed)
            if loc[:1] == ("dataset",) and not difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6):
                problem = source.problem(loc, f"unknown key {key!r} (musubi: extra keys not allowed)", _dataset_key_fix(loc[1:], data))
        elif kind == "missing":
            problem = source.problem(loc, "required field is missing", f"add {loc[-1]} = ...")
        elif kind == "union_tag_invalid":
            problem = source.problem(loc + ("kind",), f"unknown stage kind {err['input'].get('kind')!r}" if isinstance(err["input"], dict) else "unknown stage kind", f"use one of: {', '.join(STAGE_KINDS)}")
        elif kind == "union_tag_not_found":
            problem = source.problem(loc, "a stage needs a kind", f"add kind = one of: {', '.join(STAGE_KINDS)}")
        elif kind == "literal_error":
            expected = err.get("ctx", {}).get("expected", "")
            problem = source.problem(loc, f"{err['input']!r} is not allowed", f"use one of: {expected}")
        elif kind == "string_pattern_mismatch":
            problem = source.problem(loc, f"{err['input']!r} is not a valid name", "use letters, digits, '_', '-' (and '.' in a pipeline name), starting with a letter or digit")
        elif kind == "value_error":
            problem = source.problem(loc, str(err.get("ctx", {}).get("error", err["msg"])), _type_fix(loc, err))
        else:
            problem = source.problem(loc, f"{err['msg'].lower()}, got {_show(err['input'])}", _type_fix(loc, err))
        key = (problem.path, problem.message)
        if key not in seen:
            seen.add(key)
            problems.append(problem)
    return _drop_union_noise(problems)


_TYPE_ERRORS = ("int_type", "int_from_float", "int_parsing", "float_type", "float_parsing", "tuple_type", "list_type")


def _union_errors(exc: ValidationError, data: Any) -> list[dict]:
    """pydantic's errors, less the "not a <type>" of union branches the value did not mean:
    -1 for a whole-or-decimal number is "must be more than 0", not also "not a whole number"."""
    errors = exc.errors(include_url=False)
    located = [(_clean_loc(e["loc"], data, missing_ok=e["type"] == "missing"), e) for e in errors]
    out = []
    for loc, err in located:
        if err["type"] in _TYPE_ERRORS and any(other is not err and other["type"] not in _TYPE_ERRORS and where[:len(loc)] == loc
                                               for where, other in located):
            continue
        out.append(err)
    return out


def _clean_loc(loc: tuple, data: dict, missing_ok: bool = False) -> tuple:
    """Keep the parts of a pydantic location that exist in the document, dropping union
    branch names ('DatasetConfig', 'video', 'train', ...); with missing_ok, the last part may
    be a key the document lacks."""
    out: list = []
    node: Any = data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif not (missing_ok and i == len(loc) - 1):
            continue
        out.append(part)
    return tuple(out)


def _model_at(loc: tuple, data: dict):
    from .dataset import DatasetConfig, General, ImageDataset, VideoDataset
    from .model import LoraInput, Models, Prompt

    if not loc:
        return Pipeline
    top = loc[0]
    if top == "models":
        return Models
    if top == "stages" and len(loc) >= 2:
        stage = data.get("stages", {}).get(loc[1], {})
        model = STAGE_MODELS.get(stage.get("kind")) if isinstance(stage, dict) else None
        if len(loc) >= 4 and loc[2] in ("loras",):
            return LoraInput
        if len(loc) >= 4 and loc[2] in ("prompts", "sample_prompts"):
            return Prompt
        return model
    if top == "dataset":
        if len(loc) == 1:
            return DatasetConfig
        if loc[1] == "general":
            return General
        if loc[1] == "datasets" and len(loc) >= 3:
            item = data["dataset"]["datasets"][loc[2]]
            return VideoDataset if ("video_directory" in item or "video_jsonl_file" in item) else ImageDataset
    return None


def _drop_union_noise(problems: list[Problem]) -> list[Problem]:
    # `dataset` is a table or a path: when the table is wrong, pydantic also says "not a string".
    detailed = any(p.path.startswith("dataset.") for p in problems)
    return [p for p in problems if not (p.path == "dataset" and detailed)]


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


_BOUNDS = {"greater_than_equal": ("ge", "{n} or more"), "greater_than": ("gt", "more than {n}"),
           "less_than_equal": ("le", "{n} or less"), "less_than": ("lt", "less than {n}")}


def _type_fix(loc: tuple, err: dict) -> str:
    kind = err["type"]
    name = loc[-1] if loc else "value"
    if isinstance(name, int):  # an item of a list: name the list
        name = next((p for p in reversed(loc) if isinstance(p, str)), "value")
    if kind in _BOUNDS:
        key, text = _BOUNDS[kind]
        n = err.get("ctx", {}).get(key)
        return f"set {name} to {text.format(n=int(n) if isinstance(n, float) and n.is_integer() else n)}"
    if kind == "finite_number" or (isinstance(err.get("input"), float) and not math.isfinite(err["input"])):
        return f"write {name} as an ordinary number (nan and inf are not allowed)"
    if kind == "string_too_long":
        return f"shorten {name} to at most {err.get('ctx', {}).get('max_length')} characters"
    if kind.startswith("int"):
        return f"write {name} as a whole number without quotes"
    if kind.startswith("float"):
        return f"write {name} as a number"
    if kind.startswith("bool"):
        return f"write {name} as true or false"
    if kind.startswith("string"):
        return f"write {name} as a quoted string"
    if kind.startswith("list") or kind.startswith("tuple"):
        return f"write {name} as a list, such as [1, 2]"
    if kind.startswith("dict") or kind.startswith("model"):
        return f"write {name} as a table"
    if kind == "value_error" and "float" in str(err.get("msg", "")):
        return f"write {name} with a decimal point, such as {err.get('input')}.0"
    return ""


def load_dataset_file(path: str | Path):
    """Read a musubi dataset config (TOML or JSON) with the same checks and messages as a pipeline."""
    return load_dataset_source(path)[0]


def load_dataset_source(path: str | Path):
    """(DatasetConfig, Source) of a dataset config file; PipelineError with every problem."""
    from .dataset import DatasetConfig

    path = Path(path)
    text = limits.read_document(path, "dataset config")
    source = Source(file=str(path), text=text, format="json" if path.suffix.lower() == ".json" else "toml")
    data = _parse(source)
    limits.check_shape(data, source)
    try:
        return DatasetConfig.model_validate(data), source
    except ValidationError as exc:
        problems = []
        for err in _union_errors(exc, data):
            loc = _clean_loc(err["loc"], data, missing_ok=err["type"] == "missing")
            if err["type"] == "extra_forbidden":
                problems.append(source.problem(loc, f"unknown key {loc[-1]!r} (musubi: extra keys not allowed)", _dataset_key_fix(loc, data)))
            elif err["type"] == "value_error":
                problems.append(source.problem(loc, str(err.get("ctx", {}).get("error", err["msg"])), _type_fix(loc, err)))
            elif err["type"] == "literal_error":
                problems.append(source.problem(loc, f"{err['input']!r} is not allowed", f"use one of: {err.get('ctx', {}).get('expected', '')}"))
            else:
                problems.append(source.problem(loc, f"{err['msg'].lower()}, got {_show(err['input'])}", _type_fix(loc, err)))
        raise PipelineError(problems) from None


def _dataset_key_fix(loc: tuple, data: dict) -> str:
    key = loc[-1]
    if loc[:1] == ("general",) and key == "cache_directory":
        return "cache_directory belongs in each [[datasets]] table, not in [general]"
    if key in ("target_frames", "frame_extraction", "frame_stride", "frame_sample", "max_frames", "source_fps"):
        return f"{key} is a video-dataset key: this dataset has no video_directory/video_jsonl_file"
    return "remove it (see musubi-tuner's docs/dataset_config.md for the keys)"
