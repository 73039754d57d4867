"""Writes example_workflows/*.json (the workflows ComfyUI's template browser lists) in the editor's
format: the pack's nodes (through export.to_ui, as `export-comfy` writes them), Note nodes saying
what to download, where to put it and which widgets to edit, Preview nodes for the trainer's
pictures, laid out left to right in readable columns below ComfyUI's top bar.

  python tests/comfy/make_examples.py    rewrites the .json files (a test checks they match) and
                                         their .jpg thumbnails (the template browser's cards)

Each example's `edits` are the only changes a user makes before it runs: the notes are written from
them, and tests/comfy/test_comfy_examples.py runs every example after making exactly these edits."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COLUMN_GAP, ROW_GAP = 60.0, 70.0
TITLE = 30.0  # LiteGraph's title bar, drawn above a node's position
NOTE_WIDTH = 460.0
# Nodes start at export's TOP and LEFT, at its zoom (1.0): the notes' 10-pixel text (ComfyUI's
# default) stays readable; the note and three columns fit a 1920-pixel window.


@dataclass
class Edit:
    node: str  # node id
    widget: str
    what: str  # what to put there, for a person
    test_value: str  # what the tests put there (keys of the `values` test_comfy_examples passes)


@dataclass
class Example:
    title: str
    nodes: list[dict]
    links: list[tuple]
    columns: list[list[str]]  # node ids, left to right, top to bottom (notes and previews included)
    intro: str  # the notes' first paragraph
    edits: list[Edit]
    family: str = ""  # the family and task whose model files the notes name
    task: str | None = None
    models: list[tuple[str, str]] = field(default_factory=list)  # (slot, node id whose picker takes it)
    previews: dict[str, tuple[str, int, str, str]] = field(default_factory=dict)  # id -> (core node, source node, output slot, title)
    after: str = ""  # the notes' last paragraph: what comes out and where
    musubi: bool = True  # runs musubi-tuner's scripts (the notes say how to set it up)


# The core nodes an example shows results with: (input name, input type, size).
PREVIEWS = {"PreviewImage": ("images", "IMAGE", [420.0, 360.0]), "PreviewAny": ("source", "*", [420.0, 140.0])}


def _model_edits(example: Example) -> tuple[list[Edit], list[str]]:
    """One picker edit per model slot and node, and one download line per slot, from the registry:
    its folder and help, and the file names and page the family publishes (where it does)."""
    from musubi_pipe.pipelines import registry

    edits, lines = [], {}
    for slot, node in example.models:
        spec = registry.family(example.family).models[slot]
        files, page = spec.published(example.task) if hasattr(spec, "published") else ((), "")
        name = f"**{files[0]}**" + "".join(f" (or {f})" for f in files[1:2]) if files else f"the {spec.help} file"
        where = f" from [its download page]({page})" if page else ""
        first = slot not in lines
        # with a file name to go by, the help's remarks (e.g. on another model version) only distract
        label = spec.help.split(" (")[0] if files else spec.help
        lines.setdefault(slot, f"- **{label}**: {name}{where} → ComfyUI/models/{spec.folder}/")
        what = f"pick {files[0] if files else 'the file'} (in models/{spec.folder})" if first else "pick the same file"
        edits.append(Edit(node, slot, what, f"model:{slot}"))
    return edits, list(lines.values())


MUSUBI_SETUP = ("Install [musubi-tuner](https://github.com/kohya-ss/musubi-tuner) with its venv in .venv, then tell "
                "the pack where it is: **musubi-pipe init --musubi-dir ~/musubi-tuner** in a terminal, or start ComfyUI "
                "with **MUSUBI_TUNER_DIR=~/musubi-tuner** (README: Set up once).")


def note_text(example: Example, titles: dict[str, str]) -> str:
    model_edits, downloads = _model_edits(example)
    sections = []
    if example.musubi:
        sections.append(("Once per machine", MUSUBI_SETUP))
    if downloads:
        sections.append(("Download", "\n".join(downloads) + "\n\nThen press **R** (refresh) so the pickers list them."))
    steps = [f"- **{titles[e.node]}** → *{e.widget}*: {e.what}" for e in [*example.edits, *model_edits]]
    sections.append(("Edit (nothing else is needed)", "\n".join(steps)))
    sections.append(("Run", f"Press **Run**. {example.after}".rstrip()))
    return "\n\n".join([f"## {example.title}", example.intro,
                         *(f"### {i}. {head}\n{body}" for i, (head, body) in enumerate(sections, start=1))])


def all_edits(example: Example) -> list[Edit]:
    return [*example.edits, *_model_edits(example)[0]]


def examples() -> dict[str, Example]:
    training = Example(
        title="Train a Wan 2.1 LoRA from a folder of clips",
        intro="Trains a LoRA on Wan 2.1 T2V 1.3B (the smallest Wan model) from short clips, each with a caption "
              "file of the same name (clip1.mp4 + clip1.txt). The loss chart and the samples show on the right "
              "while it trains.",
        nodes=[
            {"id": "1", "class_type": "MusubiTuner_DatasetConfig", "widgets": {"name": "my-wan-lora", "target_frames": "1, 25, 45",
                                                                             "family": "wan", "task": "t2v-1.3B"}},
            {"id": "2", "class_type": "MusubiTuner_WanLatentCache", "widgets": {}},
            {"id": "3", "class_type": "MusubiTuner_WanTextEncoderCache", "widgets": {}},
            {"id": "4", "class_type": "MusubiTuner_SamplingConfig", "widgets": {
                "sample_prompts": "a person walking along a beach at sunset --w 832 --h 480 --f 33 --s 20 --d 42",
                "sample_every_n_epochs": 4}},
            {"id": "5", "class_type": "MusubiTuner_WanTrainer", "widgets": {}},
        ],
        links=[("1", 0, "2", "pipeline"), ("2", 0, "3", "pipeline"), ("3", 0, "5", "pipeline"), ("4", 0, "5", "sampling_config")],
        previews={"6": ("PreviewImage", "5", 3, "Loss chart"), "7": ("PreviewImage", "5", 4, "Samples"),
                  "8": ("PreviewAny", "5", 2, "Your LoRA")},
        columns=[["100"], ["1"], ["2", "3", "4"], ["5"], ["6", "7", "8"]],
        edits=[Edit("1", "media_folder", "the folder of your clips and their .txt captions", "clips")],
        family="wan", task="t2v-1.3B", models=[("vae", "2"), ("t5", "3"), ("dit", "5")],
        after="Only the final LoRA goes to ComfyUI/models/loras/musubi-pipe/NAME/ (NAME: Dataset Config's *name*; press **R** to see it in the "
              "LoRA pickers; **Your LoRA** shows its path); checkpoints, logs and samples stay in the run folder. "
              "Optional: describe your subject in *sample_prompts*, change the trainer's *learning_rate*, "
              "*max_train_epochs* or *memory_preset* (e.g. fit 12 GB).",
    )
    inference = Example(
        title="Make a video with your LoRA",
        intro="Generates a short Wan 2.1 T2V 1.3B video with a LoRA you trained (the training example's result).",
        nodes=[
            {"id": "1", "class_type": "MusubiTuner_WanGenerator", "widgets": {
                "task": "t2v-1.3B", "prompt": "a lighthouse on a cliff at dusk, in the trained style", "width": 832,
                "height": 480, "video_length": 33, "seed": 42, "lora_strength": 1.0}},
            {"id": "2", "class_type": "SaveVideo", "widgets": {"filename_prefix": "musubi/video"}},
        ],
        links=[("1", 0, "2", "video")],
        columns=[["100"], ["1"], ["2"]],
        edits=[Edit("1", "lora_name", "your LoRA (musubi-pipe/NAME/NAME.safetensors)", "lora"),
               Edit("1", "prompt", "what the video shows", "prompt")],
        family="wan", task="t2v-1.3B", models=[("dit", "1"), ("vae", "1"), ("t5", "1")],
        after="The video goes to ComfyUI/output/musubi/.",
    )
    merging = Example(
        title="Merge two HunyuanVideo LoRAs",
        intro="Mixes two LoRAs by weight, then merges the mix into the HunyuanVideo DiT (a new model file).",
        nodes=[
            {"id": "1", "class_type": "MusubiTuner_LoRAWeightedMerge", "widgets": {"strength_1": 0.7, "strength_2": 0.3, "strength_3": 0.0}},
            {"id": "2", "class_type": "MusubiTuner_LoRAMerger", "widgets": {"family": "hunyuan_video", "output_name": "merged-dit.safetensors"}},
        ],
        links=[("1", 0, "2", "lora_1")],
        columns=[["100"], ["1"], ["2"]],
        edits=[Edit("1", "lora_name_1", "the first LoRA", "lora_1"), Edit("1", "lora_name_2", "the second LoRA", "lora_2"),
               Edit("1", "output_name", "a new file name for the mixed LoRA", "mixed"),
               Edit("2", "output_name", "a new file name for the merged model", "merged")],
        family="hunyuan_video", models=[("dit", "2")],
        after="The merged DiT goes to ComfyUI/models/diffusion_models/musubi-pipe/, the mixed LoRA to models/loras/musubi-pipe/.",
    )
    conversion = Example(
        title="Convert a LoRA for ComfyUI",
        intro="Converts a Wan LoRA saved by musubi-tuner (such as the training example's) to the format ComfyUI's LoRA "
              "loaders read, or back. For another model, set *family* too.",
        nodes=[{"id": "1", "class_type": "MusubiTuner_FormatConverter", "widgets": {"family": "wan", "to": "auto"}}],
        links=[],
        columns=[["100"], ["1"]],
        edits=[Edit("1", "lora_name", "the LoRA to convert", "lora")], musubi=False,
        after="The converted LoRA goes beside it, named NAME-comfyui.safetensors.",
    )
    return {"lora_training": training, "inference_with_lora": inference, "merge_loras": merging, "format_conversion": conversion}


def _height(node: dict) -> float:
    """A node's body height, generous: ComfyUI's own computeSize is 5-15 % smaller (checked in the browser test)."""
    from musubi_pipe.comfy_adapter.export import _inputs, _is_widget

    specs = _inputs(node["type"])
    widgets = [s for _, s, _ in specs if _is_widget(s)]
    multiline = sum(1 for s in widgets if len(s) > 1 and s[1].get("multiline"))
    slots = max(len(node["inputs"]), len(node["outputs"]))
    return 20.0 * slots + 24.0 * len(widgets) + 64.0 * multiline + 16.0


def _note_height(text: str, width: float) -> float:
    """Fits the note's markdown at ComfyUI's default 10-pixel text (measured in the browser: 347 px for
    the training note, this gives 406)."""
    per_line = int((width - 40) / 5.4)
    height = 40.0
    for line in text.splitlines():
        height += 6.0 if not line.strip() else 12.5 * -(-len(line) // per_line) + (6.0 if line.startswith("#") else 0.0)
    return height


def render(example: Example) -> dict:
    sys.path.insert(0, str(REPO.parent))
    from musubi_pipe.comfy_adapter.export import LEFT, TOP, to_ui

    workflow = to_ui(example.nodes, example.links)
    by_id = {str(n["id"]): n for n in workflow["nodes"]}
    titles = {node_id: n["title"] for node_id, n in by_id.items()}
    order = len(by_id)
    link_id = workflow["last_link_id"]
    for preview_id, (kind, src, slot, title) in example.previews.items():
        link_id += 1
        source = by_id[src]
        name, socket, size = PREVIEWS[kind]
        workflow["links"].append([link_id, int(src), slot, int(preview_id), 0, source["outputs"][slot]["type"]])
        source["outputs"][slot]["links"].append(link_id)
        by_id[preview_id] = {"id": int(preview_id), "type": kind, "pos": [0, 0], "size": size, "flags": {},
                             "order": order, "mode": 0, "inputs": [{"name": name, "type": socket, "link": link_id}],
                             "outputs": [], "title": title, "properties": {"Node name for S&R": kind}, "widgets_values": []}
        order += 1
    text = note_text(example, titles)
    # No code spans: the new node renderer draws them blue on blue over the note's brown; no <...>: markdown drops it.
    assert "`" not in text and "<" not in text, f"{example.title}: write the note without code spans or <...>"
    by_id["100"] = {"id": 100, "type": "MarkdownNote", "pos": [0, 0], "size": [NOTE_WIDTH, _note_height(text, NOTE_WIDTH)],
                    "flags": {}, "order": order, "mode": 0, "inputs": [], "outputs": [], "title": "Start here",
                    "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"}
    x = LEFT
    for column in example.columns:
        y = TOP
        width = max(NOTE_WIDTH if by_id[i]["type"] == "MarkdownNote" else by_id[i]["size"][0] for i in column)
        for node_id in column:
            node = by_id[node_id]
            if node["type"] != "MarkdownNote" and node["type"] not in PREVIEWS:
                node["size"] = [node["size"][0], _height(node)]
            node["pos"] = [x, y]
            y += node["size"][1] + TITLE + ROW_GAP
        x += width + COLUMN_GAP
    placed = {i for column in example.columns for i in column}
    assert placed == set(by_id), f"{example.title}: columns must place every node once ({sorted(set(by_id) ^ placed)})"
    workflow["nodes"] = sorted(by_id.values(), key=lambda n: n["order"])
    workflow["last_node_id"] = max(n["id"] for n in workflow["nodes"])
    workflow["last_link_id"] = link_id
    workflow["extra"]["musubi_pipe"] = {"generated_by": "tests/comfy/make_examples.py"}
    return workflow


def rendered() -> dict[str, str]:
    return {name: json.dumps(render(example), indent=2) + "\n" for name, example in examples().items()}


def api_prompt(workflow: dict, object_info: dict) -> dict:
    """What the editor queues for an editor-format workflow: Note nodes left out, widget values by
    name in the server's input order (/object_info), links as [node, output slot]."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in ("Note", "MarkdownNote"):
            continue
        info = object_info[node["type"]]["input"]
        names = []
        for group in ("required", "optional"):
            for name, spec in info.get(group, {}).items():
                kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
                if (isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")) and not opts.get("forceInput"):
                    names.append(name)
                    if opts.get("control_after_generate"):
                        names.append(None)  # the editor's "control after generate" value, not an input
        inputs = {n: v for n, v in zip(names, node.get("widgets_values", [])) if n is not None}
        for entry in node.get("inputs", []):
            if entry.get("link") is not None:
                link = links[entry["link"]]
                inputs[entry["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def thumbnail(workflow: dict, title: str):
    """The template browser's card: the example's title over a map of its nodes (notes brown,
    previews green, links grey), drawn from the saved layout so it always matches the workflow."""
    from PIL import Image, ImageDraw, ImageFont

    W, H, pad = 400, 225, 10  # shown about 210 pixels wide: the title must stay large
    image = Image.new("RGB", (W, H), "#1e1e1e")
    draw = ImageDraw.Draw(image)
    big, small = ImageFont.load_default(size=24), ImageFont.load_default(size=10)
    words, lines = title.split(), [""]
    for word in words:  # wrap the title into at most two lines
        candidate = f"{lines[-1]} {word}".strip()
        if draw.textlength(candidate, font=big) > W - 2 * pad and lines[-1]:
            lines.append(word)
        else:
            lines[-1] = candidate
    lines = lines[:2]
    for i, line in enumerate(lines):
        draw.text((pad, 6 + 27 * i), line, font=big, fill="#f0f0f0")
    top = 16 + 27 * len(lines)
    boxes = {n["id"]: (n["pos"][0], n["pos"][1] - TITLE, n["size"][0], n["size"][1] + TITLE) for n in workflow["nodes"]}
    x0, y0 = min(b[0] for b in boxes.values()), min(b[1] for b in boxes.values())
    x1, y1 = max(b[0] + b[2] for b in boxes.values()), max(b[1] + b[3] for b in boxes.values())
    k = min((W - 2 * pad) / (x1 - x0), (H - top - pad) / (y1 - y0))

    def at(x, y):
        return pad + (x - x0) * k, top + (y - y0) * k

    for link in workflow["links"]:
        (sx, sy, sw, _), (tx, ty, _, _) = boxes[link[1]], boxes[link[3]]
        draw.line([at(sx + sw, sy + 50 + 20 * link[2]), at(tx, ty + 50 + 20 * link[4])], fill="#8a8a8a", width=2)
    colors = {"MarkdownNote": ("#665533", "#443322"), "Note": ("#665533", "#443322"),
              **{kind: ("#2f5a3a", "#1f3a26") for kind in PREVIEWS}}
    for node in workflow["nodes"]:
        x, y, w, h = boxes[node["id"]]
        body, bar = colors.get(node["type"], ("#353535", "#2a4466"))
        (left, upper), (right, lower) = at(x, y), at(x + w, y + h)
        draw.rounded_rectangle([left, upper, right, lower], radius=4, fill=body, outline="#555")
        draw.rounded_rectangle([left, upper, right, upper + 16], radius=4, fill=bar)
        name = node["title"].replace(" (musubi)", "")
        while name and draw.textlength(name, font=small) > right - left - 6:
            name = name[:-2] + "…" if len(name) > 2 else ""
        draw.text((left + 3, upper + 2), name, font=small, fill="#eeeeee")
    return image


if __name__ == "__main__":
    sys.path[:0] = [str(REPO.parent), str(Path(__file__).resolve().parent)]
    from musubi_pipe.files import write_atomic

    folder = REPO / "example_workflows"
    for name, text in rendered().items():
        write_atomic(folder / f"{name}.json", text)
        print(f"wrote {folder / name}.json")
        workflow = json.loads(text)
        card = thumbnail(workflow, examples()[name].title)
        card.save(folder / f"{name}.jpg", "JPEG", quality=85, optimize=True)
        print(f"wrote {folder / name}.jpg")
