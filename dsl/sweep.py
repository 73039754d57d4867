"""Sweeps: `sweep = { learning_rate = [1e-4, 2e-4], network_dim = [16, 32] }` on a stage becomes one
branch per combination, before the graph is built (a document transform: the compiler sees plain
stages). A branch is the swept stage and every stage downstream of it, renamed
`<stage>-<setting><value>...`; stages upstream (the caches) stay single and are shared.

A branch's name comes from its values only, so adding a value to a sweep leaves the other branches'
names, paths and fingerprints as they were. Documents are untrusted: a sweep is bounded."""
from __future__ import annotations

import copy
import itertools
import re
from typing import Any

from ..errors import Problem

MAX_BRANCHES = 64  # in one document, all sweeps together
MAX_SUFFIX = 80  # characters a branch adds to a stage's name
# Fields a sweep cannot vary: they shape the graph, not a run.
FIXED = {"kind", "needs", "extra_args", "description", "sweep"}
# Fields naming what a stage writes: each branch gets its own (a suffix), so branches never share files.
WRITTEN = ("output_name", "output_dir", "logging_dir", "output", "save_path")
NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def expand(data: dict, source, problems: list[Problem]) -> tuple[dict, dict[str, Any]]:
    """(the document with every sweep expanded, what was expanded: stage -> {settings, branches}).
    Problems are appended; on any, the document comes back unexpanded."""
    stages = data.get("stages")
    if not isinstance(stages, dict):
        return data, {}
    swept = [name for name, st in stages.items() if isinstance(st, dict) and "sweep" in st]
    if not swept:
        return data, {}
    from .model import STAGE_MODELS

    before = len(problems)
    matrices: dict[str, list[dict[str, Any]]] = {}
    for name in swept:
        matrices[name] = _matrix(name, stages[name], STAGE_MODELS, source, problems)
    total = sum(len(m) for m in matrices.values())
    if total > MAX_BRANCHES and len(problems) == before:
        problems.append(source.problem(("stages", swept[0], "sweep"), f"the sweeps make {total} branches (at most {MAX_BRANCHES})",
                                       "sweep fewer values, or split the sweep over several pipelines"))
    down = {name: _downstream(name, stages) for name in swept}
    owner: dict[str, str] = {}
    for name in swept:
        for other in down[name]:
            if other in owner or other in swept:
                first = owner.get(other, other)
                problems.append(source.problem(("stages", other), f"stage {other!r} is downstream of two sweeps ({first!r} and {name!r})",
                                               "sweep only one of them, or give each its own copy of the downstream stages"))
            owner[other] = name
    if len(problems) > before:
        return data, {}

    renames: dict[str, dict[str, str]] = {}  # swept stage -> branch name -> {old stage name: new}
    info: dict[str, Any] = {}
    taken = set(stages)
    for name in swept:
        keys = list(matrices[name][0])
        short = _short_names(keys)
        branches = {}
        for values in matrices[name]:
            suffix = "-".join(short[k] + _word(v) for k, v in values.items())
            label = f"{name}[{','.join(f'{short[k]}={_text(v)}' for k, v in values.items())}]"
            group = [name, *down[name]]
            names = {old: f"{old}-{suffix}" for old in group}
            clash = [n for n in names.values() if n in taken]
            if clash or len(suffix) > MAX_SUFFIX:
                why = f"makes the name {clash[0]!r}, which is taken" if clash else f"makes a name suffix of {len(suffix)} characters (at most {MAX_SUFFIX})"
                problems.append(source.problem(("stages", name, "sweep"), f"branch {label} {why}",
                                               "rename the stage, or sweep fewer or shorter values"))
                continue
            taken.update(names.values())
            renames.setdefault(name, {})[suffix] = names
            branches[names[name]] = {"label": label, "values": values, "stages": names}
        info[name] = {"settings": {short[k]: k for k in keys}, "branches": branches}
    if len(problems) > before:
        return data, {}

    out: dict[str, Any] = {}
    for old, stage in stages.items():
        group_of = old if old in swept else owner.get(old)
        if group_of is None:
            out[old] = stage
            continue
        for suffix, names in renames[group_of].items():
            copied = _rename(copy.deepcopy(stage), names)
            if old == group_of:
                copied.pop("sweep")
                copied.update(info[group_of]["branches"][names[old]]["values"])
            for key in WRITTEN:
                if isinstance(copied.get(key), str) and not copied[key].startswith("@"):
                    copied[key] = _suffixed(copied[key], suffix)
            out[names[old]] = copied
    return {**data, "stages": out}, info


def _matrix(name: str, stage: dict, models: dict, source, problems: list[Problem]) -> list[dict[str, Any]]:
    where = ("stages", name, "sweep")
    sweep = stage["sweep"]
    model = models.get(stage.get("kind"))
    if not isinstance(sweep, dict) or not sweep:
        problems.append(source.problem(where, "sweep must be a table of settings, each with a list of values",
                                       "sweep = { learning_rate = [1e-4, 2e-4] }"))
        return []
    ok = True
    for key, values in sweep.items():
        if model is not None and (key not in model.model_fields or key in FIXED):
            problems.append(source.problem(where + (key,), f"{key!r} cannot be swept on a {stage.get('kind')} stage",
                                           "sweep a setting of the stage, e.g. learning_rate or network_dim"))
            ok = False
        elif key in stage:
            problems.append(source.problem(("stages", name, key), f"{key!r} is set on the stage and swept",
                                           "remove it from the stage (the sweep gives every value)"))
            ok = False
        elif not isinstance(values, list) or not values or not all(isinstance(v, (bool, int, float, str)) for v in values):
            problems.append(source.problem(where + (key,), "expected a list of values (numbers, true/false or words)",
                                           f"{key} = [value1, value2]"))
            ok = False
        elif len({_text(v) for v in values}) != len(values):
            problems.append(source.problem(where + (key,), "a value is listed twice", "list each value once"))
            ok = False
        elif len(values) > MAX_BRANCHES:
            problems.append(source.problem(where + (key,), f"{len(values)} values (at most {MAX_BRANCHES})", "sweep fewer values"))
            ok = False
    if not ok:
        return []
    count = 1
    for values in sweep.values():
        count *= len(values)
    if count > MAX_BRANCHES:  # refused before the product is built
        problems.append(source.problem(where, f"this sweep makes {count} branches (at most {MAX_BRANCHES})",
                                       "sweep fewer values, or split the sweep over several pipelines"))
        return []
    keys = list(sweep)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(sweep[k] for k in keys))]


def _downstream(name: str, stages: dict) -> list[str]:
    """Stages that need `name`, or refer to it, directly or through others, in document order."""
    found: set[str] = set()
    frontier = {name}
    while frontier:
        frontier = {other for other, st in stages.items() if other not in found and other != name
                    and isinstance(st, dict) and any(_uses(st, f) for f in frontier)}
        found |= frontier
    return [n for n in stages if n in found]


def _uses(stage: dict, target: str) -> bool:
    needs = stage.get("needs")
    if isinstance(needs, list) and target in needs:
        return True
    return any(_refers(s, target) for s in _strings(stage))


def _refers(text: str, target: str) -> bool:
    return text.startswith("@") and text[1:].partition(".")[0] == target


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)


def _rename(value: Any, names: dict[str, str], key: str = "") -> Any:
    """References to (and needs of) the branch's stages point at the branch's copies."""
    if isinstance(value, str):
        target, dot, rest = value[1:].partition(".")
        return f"@{names[target]}{dot}{rest}" if value.startswith("@") and target in names else value
    if isinstance(value, list):
        return [names.get(v, v) if key == "needs" and isinstance(v, str) else _rename(v, names) for v in value]
    if isinstance(value, dict):
        return {k: _rename(v, names, k) for k, v in value.items()}
    return value


def _short_names(keys: list[str]) -> dict[str, str]:
    """learning_rate -> lr, network_dim -> nd: the initials of a setting's words, or the whole name
    where initials would be ambiguous or say nothing (one word)."""
    initials = {k: "".join(w[0] for w in k.split("_") if w) if "_" in k else k for k in keys}
    dupes = {v for v in initials.values() if list(initials.values()).count(v) > 1}
    return {k: (k if v in dupes or not v else v) for k, v in initials.items()}


def _text(value: Any) -> str:
    """A value as the label shows it: 1e-4, not 0.0001."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        plain = f"{value:g}"
        mantissa, _, exp = f"{value:e}".partition("e")
        sci = mantissa.rstrip("0").rstrip(".") + "e" + str(int(exp))
        return sci if len(sci) < len(plain) else plain
    return str(value)


def _word(value: Any) -> str:
    """A value as part of a stage name (letters, digits, '-', '_'): 1.5e-4 -> 1p5e-4."""
    return NAME_CHARS.sub("_", _text(value).replace(".", "p"))


def _suffixed(path: str, suffix: str) -> str:
    """out/lora.safetensors -> out/lora-<suffix>.safetensors; out/dir -> out/dir-<suffix>."""
    head, slash, last = path.rstrip("/").rpartition("/")
    stem, dot, ext = last.rpartition(".")
    last = f"{stem}-{suffix}.{ext}" if dot and stem else f"{last}-{suffix}"
    return f"{head}{slash}{last}"
