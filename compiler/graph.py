"""Stages and the artifacts they refer to, as a networkx graph: references become edges, and
the graph is checked for unknown stages, artifacts of the wrong kind, and cycles."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..dsl.load import Source
from ..dsl.model import Pipeline
from ..errors import Problem
from ..pipelines.registry import TRAINING_KINDS

if TYPE_CHECKING:  # networkx is imported when a graph is built, not with this module
    import networkx as nx

# What each kind of stage makes, the first being what "@stage" alone means.
ARTIFACTS = {
    "check_dataset": ("report",),
    "cache_latents": ("latent_cache",),
    "cache_text_encoder": ("text_encoder_cache",),
    "train": ("lora", "checkpoints", "state"),
    "finetune": ("model", "checkpoints", "state"),
    "ema": ("lora",),
    "convert": ("lora",),
    "merge": ("model",),
    "lora_merge": ("lora",),
    "generate": ("videos",),
}


@dataclass(frozen=True)
class Reference:
    field: tuple  # where the reference is written, e.g. ("stages", "gen", "loras", 0, "path")
    stage: str
    artifact: str
    expects: tuple[str, ...]  # artifact kinds that make sense there


def is_reference(value: object) -> bool:
    return isinstance(value, str) and value.startswith("@")


def parse_reference(value: str) -> tuple[str, str | None]:
    body = value[1:]
    stage, _, artifact = body.partition(".")
    return stage, artifact or None


# Where a stage may refer to another stage's artifact, and which artifacts fit there.
REFERENCE_FIELDS = {
    "loras": ("lora",), "loras_high_noise": ("lora",), "network_weights": ("lora",), "input": ("lora",),
    "latents": ("latent_cache",), "text_encoder_cache": ("text_encoder_cache",), "dit": ("model",),
}


# Free text, where '@' is just a character.
TEXT_FIELDS = {"prompt", "negative_prompt", "section_prompts", "description", "text", "negative", "one_frame_inference",
               "one_frame", "output_name"}


def references(name: str, stage) -> list[tuple[tuple, str, tuple[str, ...]]]:
    """(field path, reference text, accepted artifact kinds) for every reference in a stage,
    found wherever it is written; kinds is () where the field takes no reference."""
    base = ("stages", name)
    found = []
    for field in type(stage).model_fields:
        value = getattr(stage, field)
        if field == "checkpoints":
            items = [value] if isinstance(value, str) else value
            for i, item in enumerate(items):
                path = base + ("checkpoints",) if isinstance(value, str) else base + ("checkpoints", i)
                found.append((path, item, ("checkpoints",) if isinstance(value, str) else ("lora",)))
            continue
        kinds = REFERENCE_FIELDS.get(field, ())
        for path, text in _strings(base + (field,), value):
            if TEXT_FIELDS & {p for p in path if isinstance(p, str)}:
                continue  # free text may start with '@'; references are for paths
            if path[-1] == "path" and field in ("loras", "loras_high_noise"):
                found.append((path, text, kinds))
            else:
                found.append((path, text, kinds if len(path) == 3 else ()))
    return [(path, value, kinds) for path, value, kinds in found if is_reference(value)]


def _strings(path: tuple, value) -> list[tuple[tuple, str]]:
    """Every string inside a field's value, with its path (lists, tables and LoRA entries)."""
    if isinstance(value, str):
        return [(path, value)]
    if isinstance(value, (list, tuple)):
        return [found for i, item in enumerate(value) for found in _strings(path + (i,), item)]
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in _strings(path + (key,), item)]
    if hasattr(type(value), "model_fields"):
        return [found for key in type(value).model_fields for found in _strings(path + (key,), getattr(value, key))]
    return []


def build_graph(pipeline: Pipeline, source: Source, problems: list[Problem]) -> tuple[nx.DiGraph, dict[str, list[Reference]]]:
    """The stage graph (edges from a stage to those that need it) and each stage's resolved references."""
    import networkx as nx

    graph = nx.DiGraph()
    stages = pipeline.stages
    names = list(stages)
    graph.add_nodes_from(names)
    resolved: dict[str, list[Reference]] = {name: [] for name in names}

    def unknown(path: tuple, target: str) -> Problem:
        close = difflib.get_close_matches(target, names, n=1)
        fix = f"did you mean '{close[0]}'?" if close else f"use one of the stages: {', '.join(names) or 'none defined'}"
        return source.problem(path, f"there is no stage named {target!r}", fix)

    for name, stage in stages.items():
        for i, need in enumerate(stage.needs):
            if need not in stages:
                problems.append(unknown(("stages", name, "needs", i), need))
            elif need == name:
                problems.append(source.problem(("stages", name, "needs", i), "a stage cannot need itself", "remove it from needs"))
            else:
                graph.add_edge(need, name, why="needs")
        for path, text, expects in references(name, stage):
            if not expects:
                problems.append(source.problem(path, f"{text!r} looks like a reference, but {format_field(path)} takes no reference",
                                               f"write a file path here; references work in {', '.join(sorted(REFERENCE_FIELDS))} and checkpoints"))
                continue
            target, artifact = parse_reference(text)
            if target not in stages:
                problems.append(unknown(path, target))
                continue
            made = ARTIFACTS[stages[target].kind]
            artifact = artifact or made[0]
            if artifact not in made:
                problems.append(source.problem(path, f"stage {target!r} ({stages[target].kind}) makes no {artifact!r}", f"it makes: {', '.join(made)}"))
                continue
            if artifact not in expects:
                problems.append(source.problem(path, f"{text!r} is a {artifact}, but a {' or '.join(expects)} is needed here", _artifact_fix(expects, stages)))
                continue
            if target == name:
                problems.append(source.problem(path, "a stage cannot use its own output", "refer to another stage"))
                continue
            resolved[name].append(Reference(path, target, artifact, expects))
            graph.add_edge(target, name, why=artifact)
    _link_caches_to_training(pipeline, graph, resolved)
    for cycle in _cycles(graph):
        first = cycle[0]
        loop = " -> ".join(cycle + [first])
        problems.append(source.problem(("stages", first), f"the stages form a cycle: {loop}", "remove one of these references or needs"))
    return graph, resolved


def _link_caches_to_training(pipeline: Pipeline, graph: nx.DiGraph, resolved: dict[str, list[Reference]]) -> None:
    """A train stage without explicit cache references uses the pipeline's cache stages, and
    caching waits for the dataset check, so a broken dataset stops the run before any GPU work."""
    by_kind: dict[str, list[str]] = {}
    for name, stage in pipeline.stages.items():
        by_kind.setdefault(stage.kind, []).append(name)
    for check in by_kind.get("check_dataset", []):
        for cache in by_kind.get("cache_latents", []) + by_kind.get("cache_text_encoder", []):
            graph.add_edge(check, cache, why="report")
    for name, stage in pipeline.stages.items():
        if stage.kind not in TRAINING_KINDS:
            continue
        for field, kind in (("latents", "cache_latents"), ("text_encoder_cache", "cache_text_encoder")):
            if getattr(stage, field) is None:
                for cache in by_kind.get(kind, []):
                    graph.add_edge(cache, name, why=ARTIFACTS[kind][0])
                    resolved[name].append(Reference(("stages", name, field), cache, ARTIFACTS[kind][0], (ARTIFACTS[kind][0],)))


def format_field(path: tuple) -> str:
    return ".".join(str(p) for p in path[2:])


def _artifact_fix(expects: tuple[str, ...], stages) -> str:
    makers = [f"'@{n}.{a}'" for n, s in stages.items() for a in ARTIFACTS[s.kind] if a in expects]
    return f"refer to one of: {', '.join(makers)}" if makers else "give a file path instead"


def _cycles(graph: nx.DiGraph) -> list[list[str]]:
    import networkx as nx

    found = []
    for component in nx.strongly_connected_components(graph):
        if len(component) > 1:
            cycle = nx.find_cycle(graph.subgraph(component))
            found.append([edge[0] for edge in cycle])
    return found
