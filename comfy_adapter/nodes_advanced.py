"""Advanced nodes: memory-saving choices for a GPU, and monitors for training runs and GPUs."""
from __future__ import annotations

from pathlib import Path

from .base import NodeError, default_base, tip
from .nodes_train import MEMORY_CONFIG

# (free VRAM GiB at least, choices) for a 14B-class DiT; smaller models need less. A starting
# point the user can override, not a promise: musubi-facts' per-family VRAM notes.
PRESETS = [
    (48, {"fp8": False, "blocks_to_swap": 0, "gradient_checkpointing": True}),
    (32, {"fp8": True, "fp8_scaled": True, "blocks_to_swap": 0, "gradient_checkpointing": True}),
    (24, {"fp8": True, "fp8_scaled": True, "blocks_to_swap": 10, "gradient_checkpointing": True}),
    (16, {"fp8": True, "fp8_scaled": True, "blocks_to_swap": 25, "gradient_checkpointing": True, "split_attn": True}),
    (0, {"fp8": True, "fp8_scaled": True, "blocks_to_swap": 36, "gradient_checkpointing": True, "split_attn": True}),
]


def preset_for(gib: float) -> dict:
    return dict(next(choice for floor, choice in PRESETS if gib >= floor))


class MemoryOptimizer:
    DESCRIPTION = ("Chooses fp8, block swap, gradient checkpointing and split attention for a GPU's memory "
                   "(auto: the largest GPU found), or takes your own choices; connect to trainers and generators.")
    CATEGORY = "MusubiTuner/Advanced"
    RETURN_TYPES = (MEMORY_CONFIG, "STRING")
    RETURN_NAMES = ("memory_config", "summary")
    OUTPUT_TOOLTIPS = ("connect to a trainer or generator", "what was chosen and why")
    FUNCTION = "choose"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mode": (["auto", "vram preset", "manual"], {"default": "auto", "tooltip": "auto: read the GPU; vram preset: the GiB below; manual: the switches below"}),
            "vram_gib": tip("INT", "GPU memory to plan for (vram preset mode)", default=24, min=4, max=192),
            "fp8": tip("BOOLEAN", "manual: DiT weights in fp8", default=False),
            "fp8_scaled": tip("BOOLEAN", "manual: scaled fp8 (better quality; needs fp8)", default=False),
            "blocks_to_swap": tip("INT", "manual: DiT blocks kept in CPU memory", default=0, min=0, max=60),
            "gradient_checkpointing": tip("BOOLEAN", "manual: recompute activations (training)", default=True),
            "split_attn": tip("BOOLEAN", "manual: attention in chunks", default=False),
        }}

    def choose(self, mode, vram_gib, **manual):
        if mode == "manual":
            return (dict(manual), f"manual: {manual}")
        why = f"{vram_gib} GiB (preset)"
        if mode == "auto":
            from ..executors.musubi_env import gpus

            found = gpus()
            if isinstance(found, str) or not found:
                raise NodeError(f"auto needs a GPU: {found or 'none found'}; choose vram preset or manual")
            best = max(found, key=lambda g: g["memory_free_mib"])
            vram_gib = best["memory_free_mib"] / 1024
            why = f"{best['name']}: {vram_gib:.1f} GiB free"
        choice = preset_for(vram_gib)
        return (choice, f"{why} -> {choice}")


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
        import numpy as np
        import torch

        from ..tools.monitor import TrainingMonitor as Monitor
        from ..tools.monitor import draw_chart

        folder = Path(run_folder) if run_folder.strip() else _newest_run(Path(default_base()))
        try:
            monitor = Monitor(folder)
        except FileNotFoundError as exc:
            raise NodeError(str(exc)) from None
        status = monitor.poll()
        chart = draw_chart(status, 800, 400, smoothing=smoothing)
        image = torch.from_numpy(np.asarray(chart.convert("RGB"), dtype=np.float32) / 255.0)[None]
        line = monitor.summary_line() if hasattr(monitor, "summary_line") else str(status.loss)
        return {"ui": {"text": [line]}, "result": (image, line)}


def _newest_run(base: Path) -> Path:
    runs = [p.parent for p in base.glob("**/runs/*/events.jsonl")]
    if not runs:
        raise NodeError(f"no run folder under {base}; give run_folder")
    return max(runs, key=lambda p: (p / "events.jsonl").stat().st_mtime)


class ResourceMonitor:
    DESCRIPTION = "GPU memory and load as the driver reports them, with advice on the memory options to use."
    CATEGORY = "MusubiTuner/Advanced"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("one line per GPU",)
    FUNCTION = "report"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"refresh": tip("BOOLEAN", "re-read on every queue", default=True)}}

    @classmethod
    def IS_CHANGED(cls, refresh):
        return float("nan") if refresh else "once"

    def report(self, refresh):
        from ..executors.musubi_env import gpus

        found = gpus()
        if isinstance(found, str):
            text = f"{found}. musubi-tuner needs an NVIDIA GPU."
        else:
            lines = []
            for g in found:
                free = g["memory_free_mib"] / 1024
                lines.append(f"GPU {g['index']} {g['name']}: {free:.1f} of {g['memory_total_mib'] / 1024:.1f} GiB free; "
                             f"for a 14B model use {preset_for(free)}")
            text = "\n".join(lines) or "no GPU listed"
        return {"ui": {"text": [text]}, "result": (text,)}


NODES = {
    "MusubiTuner_MemoryOptimizer": (MemoryOptimizer, "Memory Optimizer (musubi)"),
    "MusubiTuner_TrainingMonitor": (TrainingMonitor, "Training Monitor (musubi)"),
    "MusubiTuner_ResourceMonitor": (ResourceMonitor, "Resource Monitor (musubi)"),
}
