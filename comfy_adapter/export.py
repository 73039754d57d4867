"""Workflow export: the ComfyUI workflow (API or UI format) of this pack's nodes that does what
`musubi-pipe run` does for a pipeline file. Each stage becomes its node; settings without a widget
go into the node's `options` text, so the nodes rebuild exactly the same pipeline document."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .base import DEFAULT_TASK, FAMILY_NODE_SUFFIX, family_node_id, options_text, registry

# The node that runs each stage kind; the kinds in FAMILY_NODE_SUFFIX have one node per family.
# Where a workflow opens in ComfyUI's editor: at this zoom the first node's title clears the tab
# bar, breadcrumb and Run bar (TOP) and the side bar (LEFT). The shipped examples use them too.
TOP, LEFT, SCALE = 180.0, 90.0, 1.0

KIND_NODES = {
    "ema": "MusubiTuner_PostHocEMA",
    "convert": "MusubiTuner_FormatConverter",
    "merge": "MusubiTuner_LoRAMerger",
    "check_dataset": "MusubiTuner_DatasetCheck",
    "lora_merge": "MusubiTuner_LoRAMergeStage",
}
FAMILY_NODES = {(kind, fam.name): family_node_id(fam, kind)
                for fam in registry().families() for kind in FAMILY_NODE_SUFFIX if kind in fam.stages}
SOCKET_TYPES = {"MUSUBI_PIPELINE", "MUSUBI_LORA", "MUSUBI_PROMPTS", "MUSUBI_TRAIN_CONFIG", "MUSUBI_OPTIMIZER_CONFIG",
                "MUSUBI_SAMPLING_CONFIG", "MUSUBI_MEMORY_CONFIG", "IMAGE", "VIDEO", "MASK"}


class _SaveVideo:
    """ComfyUI's core SaveVideo node, as far as example workflows use it."""

    RETURN_TYPES: tuple = ()
    RETURN_NAMES: tuple = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"video": ("VIDEO",), "filename_prefix": ("STRING", {"default": "video/ComfyUI"}),
                             "format": (["auto", "mp4"], {"default": "auto"}), "codec": (["auto", "h264"], {"default": "auto"})}}


def _classes() -> dict:
    from .nodes import NODE_CLASS_MAPPINGS

    return {**NODE_CLASS_MAPPINGS, "SaveVideo": _SaveVideo}


def _is_widget(spec: tuple) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN")


def _widget_default(spec: tuple) -> Any:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    if "default" in opts:
        return opts["default"]
    if isinstance(kind, list):
        return kind[0] if kind else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


def _inputs(class_type: str) -> list[tuple[str, tuple, bool]]:
    """(name, spec, required) of a node class, in ComfyUI's widget order (required, then optional)."""
    types = _classes()[class_type].INPUT_TYPES()
    return [(n, s, True) for n, s in types.get("required", {}).items()] + \
           [(n, s, False) for n, s in types.get("optional", {}).items()]


def pipeline_nodes(path: str | Path, base_folder: str | None = None) -> tuple[list[dict], list[tuple[str, int, str, str]]]:
    """Nodes (id, class_type, widgets) and links (from id, output slot, to id, input name) for a pipeline file.
    Relative paths resolve against `base_folder` in ComfyUI: the pipeline's own folder when None
    (a workflow run on this machine), "" for ComfyUI's output/musubi-pipe (a workflow to share)."""
    import networkx as nx

    from ..compiler.build import compile_pipeline
    from ..compiler.graph import build_graph
    from ..dsl.load import load_pipeline
    from ..errors import PipelineError

    pipeline, source = load_pipeline(path)
    compile_pipeline(pipeline, source)  # refuse to export what would not plan
    problems: list = []
    graph, _ = build_graph(pipeline, source, problems)
    if pipeline.dataset is None:
        dataset_text = ""
    elif isinstance(pipeline.dataset, str):
        dataset_text = pipeline.dataset
    else:
        import tomli_w

        dataset_text = tomli_w.dumps(pipeline.dataset.to_musubi_dict())
    # Family and task are chosen once, on Dataset Config; every other node reads them from its pipeline socket.
    fam = registry().family(pipeline.family)
    first = {"id": "1", "class_type": "MusubiTuner_DatasetConfig", "widgets": {
        "name": pipeline.name, "media_folder": "", "dataset_toml": dataset_text, "base_folder": str(source.folder) if base_folder is None else base_folder,
        "workdir": pipeline.workdir or "", "cache_folder": "", "family": fam.name,
        "task": (fam.resolve_task(pipeline.task) if fam.tasks else None) or DEFAULT_TASK}}
    nodes, links = [first], []
    node_of: dict[str, str] = {}
    models = pipeline.models.model_dump(exclude_none=True)
    placed: set[str] = set()
    order = list(nx.lexicographical_topological_sort(graph, key=lambda n: list(pipeline.stages).index(n)))
    for number, name in enumerate(order, start=2):
        stage = pipeline.stages[name]
        class_type = KIND_NODES.get(stage.kind) or FAMILY_NODES.get((stage.kind, pipeline.family))
        if class_type is None:
            raise PipelineError([_problem(source.file, f"stages.{name}", f"a {stage.kind} stage has no node that runs it inside a workflow",
                                          "run this pipeline with `musubi-pipe run`, or remove the stage to export the rest")])
        fields = stage.model_dump(mode="json", exclude_unset=True)
        fields.pop("kind")
        # Widgets keep their "not set" values: every stage field travels in `options`.
        widgets: dict[str, Any] = {"stage_name": name}
        inputs = _inputs(class_type)
        names = {n for n, _, _ in inputs}
        for n, spec, _ in inputs:
            if n == "save_to":
                widgets[n] = "pipeline workdir"
            elif n == "to":
                widgets[n] = fields.pop("to", "comfyui")
        if "model_paths" in names:  # the models this node's stage reads, as `slot = path` lines
            takes = set(_node_slots(class_type))
            takes |= {"dit_dtype"} if "dit" in takes else set()
            lines = [f"{slot} = {models[slot]}" for slot in models if slot in takes and slot not in placed]
            placed |= {line.split(" = ")[0] for line in lines}
            widgets["model_paths"] = "\n".join(lines)
        widgets["options"] = options_text(fields)
        node_id = str(number)
        nodes.append({"id": node_id, "class_type": class_type, "widgets": widgets})
        node_of[name] = node_id
        preds = sorted(graph.predecessors(name), key=order.index)
        covered: set[str] = set()
        primary = max(preds, key=lambda p: len(nx.ancestors(graph, p)), default=None)
        if primary:
            links.append((node_of[primary], _pipeline_slot(nodes, node_of[primary]), node_id, "pipeline"))
            covered = nx.ancestors(graph, primary) | {primary}
        else:
            links.append(("1", 0, node_id, "pipeline"))
        rest = [p for p in preds if p not in covered]
        if rest:
            other = max(rest, key=lambda p: len(nx.ancestors(graph, p)))
            links.append((node_of[other], _pipeline_slot(nodes, node_of[other]), node_id, "more"))
            covered |= nx.ancestors(graph, other) | {other}
            if any(p not in covered for p in rest):
                raise PipelineError([_problem(source.file, name, "this stage joins more than two independent branches, "
                                              "which a node cannot take in", "add needs = [...] to chain the branches")])
    missing = sorted(set(models) - placed)
    if missing:
        raise PipelineError([_problem(source.file, "models", f"no stage node takes models {', '.join(missing)}",
                                      "remove them from [models]")])
    return nodes, links


def _node_slots(class_type: str) -> tuple[str, ...]:
    """The model slots a node's model_paths text takes."""
    from .base import union_slots

    cls = _classes()[class_type]
    return getattr(cls, "SLOTS", ()) or (union_slots("merge") if class_type == KIND_NODES["merge"] else ())


def _pipeline_slot(nodes: list[dict], node_id: str) -> int:
    """The output of a node that carries the pipeline (a generator's first output is its video or image)."""
    class_type = next(n["class_type"] for n in nodes if n["id"] == node_id)
    return _classes()[class_type].RETURN_TYPES.index("MUSUBI_PIPELINE")


def _problem(file: str, where: str, message: str, fix: str):
    from ..errors import Problem

    return Problem(message, path=where, file=file, fix=fix)


def _widget_values(class_type: str, widgets: dict) -> dict[str, Any]:
    values = {}
    for n, spec, _ in _inputs(class_type):
        if _is_widget(spec):
            value = widgets.get(n, _widget_default(spec))
            if isinstance(spec[0], list) and spec[0] and value not in spec[0] and not n.endswith("_path"):
                value = spec[0][0]  # a picker over an empty model folder: the free path carries the file
            values[n] = value
    return values


def to_api(nodes: list[dict], links: list) -> dict:
    prompt = {}
    for node in nodes:
        prompt[node["id"]] = {"class_type": node["class_type"], "inputs": _widget_values(node["class_type"], node["widgets"]),
                              "_meta": {"title": _classes()[node["class_type"]].__name__}}
    for src, slot, dst, name in links:
        prompt[dst]["inputs"][name] = [src, slot]
    return prompt


def to_ui(nodes: list[dict], links: list) -> dict:
    """The editor's format, laid out left to right by topological generation."""
    import networkx as nx

    from .nodes import NODE_DISPLAY_NAME_MAPPINGS

    by_id = {n["id"]: n for n in nodes}
    graph = nx.DiGraph()
    graph.add_nodes_from(by_id)
    graph.add_edges_from((s, d) for s, _, d, _ in links)
    position: dict[str, list[float]] = {}
    sizes: dict[str, list[float]] = {}
    for column, generation in enumerate(nx.topological_generations(graph)):
        y = TOP
        for node_id in sorted(generation, key=int):
            cls = by_id[node_id]["class_type"]
            count = sum(1 for _, spec, _ in _inputs(cls) if _is_widget(spec))
            sizes[node_id] = [380.0, 80.0 + 26.0 * count]
            position[node_id] = [LEFT + 440.0 * column, y]
            y += sizes[node_id][1] + 60.0
    ui_links, out_links, in_link = [], {}, {}
    for number, (src, slot, dst, name) in enumerate(links, start=1):
        kind = _classes()[by_id[src]["class_type"]].RETURN_TYPES[slot]
        ui_links.append([number, int(src), slot, int(dst), None, kind])
        out_links.setdefault((src, slot), []).append(number)
        in_link[(dst, name)] = number
    ui_nodes = []
    rank = {node_id: i for i, node_id in enumerate(nx.topological_sort(graph))}
    for order, node in enumerate(sorted(nodes, key=lambda n: rank[n["id"]])):
        cls = node["class_type"]
        values = _widget_values(cls, node["widgets"])
        inputs = []
        for n, spec, _ in _inputs(cls):
            if not _is_widget(spec):
                link = in_link.get((node["id"], n))
                if link is not None:
                    ui_links[link - 1][4] = len(inputs)  # the link's target slot
                inputs.append({"name": n, "type": spec[0], "link": link})
        klass = _classes()[cls]
        outputs = [{"name": name, "type": kind, "slot_index": i, "links": out_links.get((node["id"], i), [])}
                   for i, (name, kind) in enumerate(zip(klass.RETURN_NAMES, klass.RETURN_TYPES))]
        ui_nodes.append({
            "id": int(node["id"]), "type": cls, "pos": position[node["id"]], "size": sizes[node["id"]],
            "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
            "title": node.get("title") or NODE_DISPLAY_NAME_MAPPINGS.get(cls, cls),
            "properties": {"Node name for S&R": cls}, "widgets_values": list(values.values()),
        })
    import uuid

    # A stable id per content, so re-exporting the same pipeline gives the same file.
    identity = uuid.uuid5(uuid.NAMESPACE_URL, "musubi-pipe:" + json.dumps([nodes, links], sort_keys=True, default=str))
    return {
        "id": str(identity), "revision": 0,
        "last_node_id": max(int(n["id"]) for n in nodes), "last_link_id": len(ui_links),
        "nodes": ui_nodes, "links": ui_links, "groups": [], "config": {},
        "extra": {"ds": {"scale": SCALE, "offset": [0, 0]}, "musubi_pipe": {"generated_by": "musubi-pipe export-comfy"}},
        "version": 0.4,
    }


def export_workflow(path: str | Path, fmt: str = "ui", base_folder: str | None = None) -> dict:
    nodes, links = pipeline_nodes(path, base_folder)
    return to_api(nodes, links) if fmt == "api" else to_ui(nodes, links)


def ui_to_api(workflow: dict) -> dict:
    """An editor-format workflow of this pack's nodes as an API prompt (what the editor sends on Queue)."""
    prompt = {}
    links = {link[0]: link for link in workflow["links"]}
    for node in workflow["nodes"]:
        cls = node["type"]
        widget_names = [n for n, spec, _ in _inputs(cls) if _is_widget(spec)]
        inputs: dict[str, Any] = dict(zip(widget_names, node.get("widgets_values", [])))
        for entry in node.get("inputs", []):
            if entry.get("link") is not None:
                link = links[entry["link"]]
                inputs[entry["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": cls, "inputs": inputs}
    return prompt


@click.command("export-comfy")
@click.argument("pipeline", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Workflow file to write.")
@click.option("--format", "fmt", type=click.Choice(["ui", "api"]), default="ui", show_default=True,
              help="ui: opens in the ComfyUI editor; api: for POST /prompt.")
@click.option("--here", is_flag=True, help="Resolve the pipeline's relative paths against its folder on this machine "
                                           "(written into the workflow); without it the workflow names no folder of this machine.")
def export_comfy(pipeline, output, fmt, here):
    """Write the ComfyUI workflow that does what `musubi-pipe run PIPELINE` does, made of the
    MusubiTuner nodes. The workflow is meant for sharing: it names no folder of this machine
    unless --here asks for it."""
    import sys

    from ..errors import PipelineError
    from ..files import write_atomic

    try:
        workflow = export_workflow(pipeline, fmt, None if here else "")
    except PipelineError as err:
        click.echo(str(err), err=True)
        sys.exit(2)
    write_atomic(output, json.dumps(workflow, indent=2, ensure_ascii=False) + "\n")
    click.echo(f"wrote {output} ({fmt} format, {len(workflow['nodes']) if fmt == 'ui' else len(workflow)} nodes)")
