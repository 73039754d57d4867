"""Advanced nodes: memory-saving choices for a GPU, and monitors for training runs and GPUs."""
from __future__ import annotations

from pathlib import Path

from .base import (DEFAULT_TASK, FROM_PIPELINE, PIPELINE, NodeError, all_task_choices, default_base, family_choices,
                   family_widget, image_tensor, one_line, pipeline_family, registry, show_text, tip)
from .nodes_train import MEMORY_CONFIG

DEFAULT_RESOLUTION = (832, 480)  # the planner's own default: the size its measurements were made at
DEFAULT_FRAMES = 33


def _dataset_shape(pipe: dict) -> dict:
    """Resolution, frames and batch size of the pipeline's largest training sample ({} without a
    dataset): what the planner needs from the dataset."""
    from pydantic import ValidationError

    from ..dsl.dataset import DatasetConfig
    from ..errors import PipelineError
    from ..tools.dataset import load_config
    from ..tools.memory import largest_sample

    dataset = pipe["document"].get("dataset")
    if dataset is None:
        return {}
    if isinstance(dataset, str):
        dataset = str(Path(pipe.get("base") or default_base()) / dataset)
    try:
        config, _, _ = load_config(dataset)
    except PipelineError as err:
        raise NodeError(one_line(err)) from None
    try:
        return largest_sample(DatasetConfig.model_validate(config))
    except ValidationError as err:
        raise NodeError(f"the pipeline's dataset is not a valid musubi dataset config: {err.errors()[0]['msg']}") from None


def detected_gpu_gib() -> tuple[float | None, str]:
    """(GiB musubi can use on the GPU with the most free memory, where that number comes from), or
    (None, why there is none). ComfyUI's own share counts as free: the pack unloads its models
    before musubi starts."""
    import os

    from ..tools.resources import gpu_report

    report = gpu_report()
    if not report.available:
        return None, report.message
    best = max(report.gpus, key=lambda g: g.memory_free_mib)
    own = sum(p.used_mib or 0 for p in best.processes if p.pid == os.getpid())
    note = f" + {own / 1024:.1f} GiB ComfyUI frees before training" if own else ""
    return (best.memory_free_mib + own) / 1024, f"GPU {best.index} {best.name}: {best.memory_free_mib / 1024:.1f} GiB free{note}"


class MemoryOptimizer:
    DESCRIPTION = ("Plans the fastest memory settings that fit the GPU (gradient checkpointing, fp8, block swap, "
                   "split attention, VAE tiling) with the memory planner, and explains each choice. Connect it to a "
                   "trainer (and the VAE Latent Cache); its choices override the LoRA Training Config's, and a "
                   "stage's options text overrides both.")
    CATEGORY = "MusubiTuner/Advanced"
    RETURN_TYPES = (MEMORY_CONFIG, "STRING")
    RETURN_NAMES = ("memory_config", "explanation")
    OUTPUT_TOOLTIPS = ("connect to a trainer, generator or VAE Latent Cache", "what was chosen and why, with the predicted memory")
    FUNCTION = "choose"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "family": family_widget("model family to plan for"),
                "task": ([FROM_PIPELINE, *all_task_choices()], {"default": FROM_PIPELINE, "tooltip": "task to plan for, one of "
                         "the family's; (from pipeline): the connected pipeline's task, else the family's default; another "
                         "value must agree with the pipeline's"}),
                "use_detected_gpu": tip("BOOLEAN", "plan for the free memory of the largest NVIDIA GPU found; without one, gpu_memory_gib is used", default=True),
                "gpu_memory_gib": tip("FLOAT", "GPU memory to plan for when no GPU is detected or use_detected_gpu is off", default=24.0, min=1.0, max=1024.0, step=1.0),
                "resolution": tip("STRING", "training resolution WIDTHxHEIGHT; empty = the pipeline dataset's (else 832x480)", default=""),
                "frames": tip("INT", "frames per training sample; 0 = the dataset's largest target_frames (else 33)", default=0, min=0, max=1025),
                "batch_size": tip("INT", "samples per step; 0 = the dataset's batch size (else 1)", default=0, min=0, max=64),
                "network_dim": tip("INT", "LoRA rank the trainer uses (its optimizer state takes memory)", default=32, min=1, max=1024),
                "allow_fp8": tip("BOOLEAN", "let the plan use fp8 weights (a little lower quality); off = plan without fp8", default=True),
            },
            "optional": {"pipeline": (PIPELINE, {"tooltip": "the pipeline to plan for: family, task and dataset size are read from it"})},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, use_detected_gpu=True, **kw):
        # The GPU's free memory is an input too: plan again when it moved by a GiB or more.
        return round(detected_gpu_gib()[0] or 0) if use_detected_gpu else "given"

    def choose(self, family, task, use_detected_gpu, gpu_memory_gib, resolution, frames, batch_size, network_dim,
               allow_fp8, pipeline=None, unique_id=None):
        from ..errors import PipelineError
        from ..tools.memory import parse_resolution, plan_memory

        doc = pipeline["document"] if pipeline else {}
        family = pipeline_family(pipeline, family)
        task = _task(family, task, doc.get("task"))
        shape = _dataset_shape(pipeline) if pipeline else {}
        try:
            size = parse_resolution(resolution) if resolution.strip() else shape.get("resolution", DEFAULT_RESOLUTION)
        except PipelineError as err:
            raise NodeError(one_line(err)) from None
        frames = frames or shape.get("frames", DEFAULT_FRAMES)
        batch_size = batch_size or shape.get("batch_size", 1)
        gib, source = detected_gpu_gib() if use_detected_gpu else (None, "use_detected_gpu is off")
        if gib is None:
            source = f"{gpu_memory_gib:g} GiB from gpu_memory_gib ({source})"
            gib = float(gpu_memory_gib)
        try:
            plan = plan_memory(family, task, gib, size, frames, batch_size, network_dim, allow_fp8=allow_fp8)
        except PipelineError as err:
            raise NodeError(one_line(err)) from None
        text = f"memory: {source}\n{plan.explain()}"
        show_text(unique_id, text)
        config = {**plan.memory_config(), "cache_latents": dict(plan.cache_latents)}
        return {"ui": {"text": [text]}, "result": (config, text)}


def _task(family: str, widget: str, piped: str | None) -> str | None:
    """A task widget's task for the family: the pipeline's (or the family's default) unless set;
    a set one must be the family's and agree with the pipeline's."""
    fam = registry().family(family)
    if widget in (FROM_PIPELINE, DEFAULT_TASK, "", None):
        return piped
    task = fam.resolve_task(widget) if fam.tasks else None
    if task is None:
        raise NodeError(f"task: {widget} is not a {fam.title} task; pick one of {', '.join(fam.task_names()) or DEFAULT_TASK}")
    if piped and fam.resolve_task(piped) != task:
        raise NodeError(f"task is {task} here but the pipeline's task is {piped} (chosen on Dataset Config); set task to "
                        f"{FROM_PIPELINE}, or change the task on Dataset Config")
    return task


class TrainingMonitor:
    DESCRIPTION = ("Shows a training run's loss curve (smoothed), step, epoch and ETA, from its run folder or "
                   "TensorBoard logs; re-reads on every queue.")
    CATEGORY = "MusubiTuner/Advanced"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("chart", "status")
    OUTPUT_TOOLTIPS = ("loss chart", "one-line status")
    FUNCTION = "show"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "run_folder": tip("STRING", "a run folder (musubi-out/<name>/runs/...) or musubi's --logging_dir; empty = the newest run under ComfyUI's output/musubi-pipe", default=""),
            "smoothing": tip("FLOAT", "curve smoothing, as in TensorBoard", default=0.6, min=0.0, max=0.99, step=0.01),
        }}

    @classmethod
    def IS_CHANGED(cls, **kw):
        return float("nan")  # the run goes on between queues: always re-read

    def show(self, run_folder, smoothing):
        from ..tools.monitor import TrainingMonitor as Monitor
        from ..tools.monitor import draw_chart

        folder = Path(run_folder) if run_folder.strip() else _newest_run(Path(default_base()))
        try:
            monitor = Monitor(folder)
        except FileNotFoundError as exc:
            raise NodeError(str(exc)) from None
        status = monitor.poll()
        chart = draw_chart(status, 800, 400, smoothing=smoothing)
        line = status.summary_line()
        return {"ui": {"text": [line]}, "result": (image_tensor(chart), line)}


def _newest_run(base: Path) -> Path:
    runs = [p.parent for p in base.glob("**/runs/*/events.jsonl")]
    if not runs:
        raise NodeError(f"no run folder under {base}; give run_folder")
    return max(runs, key=lambda p: (p / "events.jsonl").stat().st_mtime)


class ResourceMonitor:
    DESCRIPTION = ("GPU memory, load and processes as the NVIDIA driver reports them, with the memory planner's advice "
                   "for the chosen family; says so clearly where there is no NVIDIA GPU.")
    CATEGORY = "MusubiTuner/Advanced"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("per GPU: memory, load, processes and advice; or why no GPU is listed",)
    FUNCTION = "report"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "refresh": tip("BOOLEAN", "re-read on every queue", default=True),
            "family": (family_choices(), {"default": registry().default_family(), "tooltip": "model family the advice is for"}),
            "task": ([DEFAULT_TASK, *all_task_choices()], {"default": DEFAULT_TASK, "tooltip": "task the advice is for, one of "
                     f"the family's ({DEFAULT_TASK}: the family's default)"}),
        }}

    @classmethod
    def IS_CHANGED(cls, refresh, **kw):
        return float("nan") if refresh else "once"

    def report(self, refresh, family, task):
        from ..tools.resources import gpu_report, report_text

        text = report_text(gpu_report(), family, _task(family, task, None))
        return {"ui": {"text": [text]}, "result": (text,)}


NODES = {
    "MusubiTuner_MemoryOptimizer": (MemoryOptimizer, "Memory Optimizer (musubi)"),
    "MusubiTuner_TrainingMonitor": (TrainingMonitor, "Training Monitor (musubi)"),
    "MusubiTuner_ResourceMonitor": (ResourceMonitor, "Resource Monitor (musubi)"),
}
