"""Data nodes: build or load a musubi dataset config and start a pipeline; view a dataset."""
from __future__ import annotations

from pathlib import Path

from .base import (DEFAULT_TASK, PIPELINE, NodeError, StageNode, all_task_choices, build_stage, default_base, ensure_pipeline,
                   family_choices, family_widget, finish_stage, image_tensor, locate_errors, new_pipeline, note_origin,
                   one_line, parse_options, pipeline_family, registry, stage_inputs, step_files, tip)


def _dataset_from_widgets(kw: dict, base: str, name: str) -> dict | str | None:
    from ..dsl.dataset import VIDEO_EXTENSIONS

    text = (kw.get("dataset_toml") or "").strip()
    if text:
        if "\n" not in text and text.lower().endswith(".toml"):
            return text  # a dataset TOML file; the compiler reads and checks it
        return parse_options(text, "dataset_toml")
    folder = (kw.get("media_folder") or "").strip()
    if not folder:
        return None  # a pipeline without training data (generation, conversion, merging)
    path = Path(folder) if Path(folder).is_absolute() else Path(base) / folder
    if not path.is_dir():
        raise NodeError(f"media_folder {path} is not a folder; give the folder that holds your clips or images")
    is_video = any(p.suffix.lower() in VIDEO_EXTENSIONS for p in path.iterdir())
    entry: dict = {"video_directory" if is_video else "image_directory": folder,
                   "cache_directory": kw.get("cache_folder") or str(Path(default_base()) / name / "cache")}
    if is_video:
        counts = str(kw.get("target_frames", "1"))
        try:
            frames = [int(x) for x in counts.replace(" ", "").split(",") if x]
        except ValueError:
            raise NodeError(f"target_frames {counts!r}: write whole frame counts separated by commas, such as 1, 25, 45") from None
        entry["target_frames"] = frames
        entry["frame_extraction"] = kw.get("frame_extraction", "head")
    general = {"resolution": [kw["width"], kw["height"]], "caption_extension": kw.get("caption_extension") or ".txt",
               "batch_size": kw["batch_size"], "num_repeats": kw["num_repeats"], "enable_bucket": kw["enable_bucket"]}
    return {"general": general, "datasets": [entry]}


class DatasetConfig:
    DESCRIPTION = ("Starts a musubi pipeline: the model family and task (chosen here once; every later node reads them "
                   "from the pipeline), and a dataset: a folder of clips or images with captions, or a musubi dataset "
                   "TOML (inline or a file path). Checks it the way musubi will and passes the pipeline on. Leave both "
                   "empty for a pipeline that only generates, converts or merges.")
    CATEGORY = "MusubiTuner/Data"
    RETURN_TYPES = (PIPELINE, "STRING")
    RETURN_NAMES = ("pipeline", "summary")
    OUTPUT_TOOLTIPS = ("the pipeline so far: connect a cache or trainer node", "what the dataset holds")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "name": tip("STRING", "pipeline name: used for the LoRA file name and output folders", default="my-lora"),
                "media_folder": tip("STRING", "folder of training clips or images, each with a caption file beside it", default=""),
                "width": tip("INT", "training resolution width", default=960, min=64, max=4096, step=16),
                "height": tip("INT", "training resolution height", default=544, min=64, max=4096, step=16),
                "target_frames": tip("STRING", "video clips: frame counts to cut, comma separated, each 4*N+1", default="1, 25, 45"),
                "frame_extraction": (["head", "chunk", "slide", "uniform", "full"], {"default": "head", "tooltip": "how clips are cut from each video"}),
                "caption_extension": tip("STRING", "caption file extension", default=".txt"),
                "batch_size": tip("INT", "items per batch", default=1, min=1, max=64),
                "num_repeats": tip("INT", "times each item is repeated per epoch", default=1, min=1, max=1000),
                "enable_bucket": tip("BOOLEAN", "group items of other aspect ratios into buckets instead of cropping", default=True),
            },
            "optional": {
                "dataset_toml": tip("STRING", "a musubi dataset TOML ([general] and [[datasets]]) or the path of one; overrides the widgets above", multiline=True, default=""),
                "cache_folder": tip("STRING", "where latent and text caches go (default: ComfyUI's output/musubi-pipe/<name>/cache)", default=""),
                "base_folder": tip("STRING", "folder relative paths are taken from, and where run records go (default: ComfyUI's output/musubi-pipe)", default=""),
                "workdir": tip("STRING", "where outputs go (default: musubi-out/<name> in the base folder)", default=""),
                # Last, so that workflows saved before these two existed keep their widget values.
                "family": (family_choices(), {"default": registry().default_family(), "tooltip": "model family of the whole "
                           "pipeline: every later node reads it from the pipeline (" + ", ".join(
                               f"{f.name}: {f.title}" for f in registry().families()) + ")"}),
                "task": ([DEFAULT_TASK, *all_task_choices()], {"default": DEFAULT_TASK, "tooltip": "task of the whole pipeline, "
                         "one of the family's (" + "; ".join(f"{f.title}: {', '.join(f.task_names())}" for f in registry().families()
                                                            if f.tasks) + f"); {DEFAULT_TASK}: the family's default"}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @locate_errors
    def build(self, name, base_folder="", workdir="", family=None, task=DEFAULT_TASK, unique_id=None, **kw):
        from ..dsl.dataset import DatasetConfig as Model
        from ..errors import PipelineError

        fam = registry().family(family or registry().default_family())
        chosen = fam.default_task if task in (None, "", DEFAULT_TASK) else fam.resolve_task(task) if fam.tasks else None
        if task not in (None, "", DEFAULT_TASK) and chosen is None:
            raise NodeError(f"task: {task} is not a {fam.title} task; pick one of "
                            f"{', '.join(fam.task_names()) if fam.tasks else DEFAULT_TASK + ' (it has one model)'}")
        base = base_folder or default_base()
        dataset = _dataset_from_widgets(kw, base, name)
        pipe = new_pipeline(name, base=base, workdir=workdir, dataset=dataset, family=fam.name, task=chosen)
        # Problems the compiler finds with the dataset later are shown as this node's widgets.
        note_origin(pipe, "dataset", self, unique_id, from_toml=bool((kw.get("dataset_toml") or "").strip()))
        if dataset is None:
            return (pipe, "no dataset: this pipeline can generate, convert and merge, not cache or train")
        if isinstance(dataset, dict):
            try:
                config = Model.model_validate(dataset)
            except Exception as exc:
                raise NodeError(f"dataset: {str(exc).splitlines()[0]}; check the dataset settings") from None
            errors = [(f, m, x) for f, m, x in config.problems() if not m.startswith("warning: ")]
            if errors:
                from .base import DATASET_WIDGETS

                def widget(field: str) -> str:
                    if (kw.get("dataset_toml") or "").strip():
                        return f"dataset_toml: {field}"
                    return next((DATASET_WIDGETS[t] for t in reversed(field.replace("[", ".").split(".")) if t in DATASET_WIDGETS), field)
                raise NodeError("\n".join(f"{widget(f)}: {m} (fix: {x})" for f, m, x in errors))
        try:
            from ..tools.dataset import inspect_dataset

            report = inspect_dataset(dataset if isinstance(dataset, dict) else str(Path(base) / dataset), read_media=False, check_cache=False)
            summary = report.format()
        except PipelineError as err:
            raise NodeError(one_line(err)) from None
        except Exception as exc:  # a summary is not worth failing the pipeline for
            summary = f"(no summary: {exc})"
        return (pipe, summary)


class DatasetViewer:
    DESCRIPTION = ("Shows the dataset as musubi will see it: a grid of thumbnails with captions, flagging missing "
                   "captions, unreadable files and clips too short for the frame counts.")
    CATEGORY = "MusubiTuner/Data"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("contact_sheet", "report")
    OUTPUT_TOOLTIPS = ("one tile per item, problems in red", "the full dataset report")
    FUNCTION = "view"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipeline": (PIPELINE, {"tooltip": "a pipeline holding the dataset (from Dataset Config)"}),
                "family": family_widget("model family: decides frame rate and cache names"),
                "max_items": tip("INT", "at most this many tiles", default=24, min=1, max=500),
                "columns": tip("INT", "tiles per row", default=6, min=1, max=20),
            }
        }

    def view(self, pipeline, family, max_items, columns):
        from ..errors import PipelineError
        from ..tools.contact_sheet import make_contact_sheet
        from ..tools.dataset import inspect_dataset

        pipe = ensure_pipeline(pipeline)
        family = pipeline_family(pipe, family)
        dataset = pipe["document"].get("dataset")
        if dataset is None:
            raise NodeError("the pipeline has no dataset; connect a Dataset Config node")
        if isinstance(dataset, str):
            dataset = str(Path(pipe.get("base") or default_base()) / dataset)
        try:
            report = inspect_dataset(dataset, family=family)
        except PipelineError as err:
            raise NodeError(one_line(err)) from None
        items = [i for d in report.datasets for i in d.items][:max_items]
        sheet = make_contact_sheet(items, columns=columns, title=f"{len(items)} items, {family}")
        text = report.format()
        return {"ui": {"images": [_preview(sheet)], "text": [text]}, "result": (image_tensor(sheet), text)}


class DatasetCheck(StageNode):
    DESCRIPTION = ("Adds a dataset check to the pipeline and runs it: `musubi-pipe dataset inspect` writes a report "
                   "(and optionally a contact sheet) and stops the run on dataset errors. Caching waits for it.")
    CATEGORY = "MusubiTuner/Data"
    RETURN_TYPES = (PIPELINE, "STRING")
    RETURN_NAMES = ("pipeline", "report_path")
    OUTPUT_TOOLTIPS = ("the pipeline with this stage: connect a cache node", "the JSON dataset report")

    @classmethod
    def INPUT_TYPES(cls):
        required, optional, hidden = stage_inputs("check")
        required["family"] = family_widget("model family: decides frame rate and cache names")
        required["contact_sheet"] = tip("BOOLEAN", "also draw a contact sheet of the dataset, shown on this node", default=False)
        return {"required": required, "optional": optional, "hidden": hidden}

    def run(self, family, contact_sheet, unique_id=None, **kw):
        fields = {"contact_sheet": True} if contact_sheet else {}
        pipe, name = build_stage(kw, "check_dataset", pipeline_family(kw.get("pipeline"), family), None, (), fields,
                                 origin=(self, unique_id))
        _, step, _ = finish_stage(pipe, name, unique_id)
        reports = step_files(step, "report")
        if not reports:
            raise NodeError(f"{name}: {step.output('report').path} was not written; see the run log")
        ui: dict = {"text": [reports[0]]}
        sheets = step_files(step, "contact_sheet")
        if sheets:
            ui["images"] = [_preview_file(sheets[0])]
        return {"ui": ui, "result": (pipe, reports[0])}


def _preview_file(path: str) -> dict:
    """A PNG made by a stage, copied to ComfyUI's temp folder (previews are served only from there); named by content."""
    import hashlib

    import folder_paths

    from ..files import write_atomic

    data = Path(path).read_bytes()
    name = f"contact-sheet-{hashlib.sha256(data).hexdigest()[:16]}.png"
    folder = Path(folder_paths.get_temp_directory()) / "musubi-pipe"
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / name, data)
    return {"filename": name, "subfolder": "musubi-pipe", "type": "temp"}


def _preview(sheet) -> dict:
    """The sheet as a PNG in ComfyUI's temp folder, shown on the node; named by its content."""
    import hashlib

    import folder_paths

    from ..tools.contact_sheet import save_png

    name = f"contact-sheet-{hashlib.sha256(sheet.tobytes()).hexdigest()[:16]}.png"
    save_png(sheet, Path(folder_paths.get_temp_directory()) / "musubi-pipe" / name)
    return {"filename": name, "subfolder": "musubi-pipe", "type": "temp"}


NODES = {"MusubiTuner_DatasetConfig": (DatasetConfig, "Dataset Config (musubi)"),
         "MusubiTuner_DatasetViewer": (DatasetViewer, "Dataset Viewer (musubi)"),
         "MusubiTuner_DatasetCheck": (DatasetCheck, "Dataset Check (musubi)")}
