"""Writes example_workflows/*.json (the original design's four workflows) in the editor's format.
`python tests/comfy/make_examples.py` rewrites them; a test checks the committed files match."""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def examples() -> dict[str, tuple[list[dict], list[tuple]]]:
    training = [
        {"id": "1", "class_type": "MusubiTuner_DatasetConfig", "widgets": {"name": "my-wan-lora", "target_frames": "1, 25, 45",
                                                                         "family": "wan", "task": "t2v-1.3B"}},
        {"id": "2", "class_type": "MusubiTuner_WanLatentCache", "widgets": {}},
        {"id": "3", "class_type": "MusubiTuner_WanTextEncoderCache", "widgets": {}},
        {"id": "4", "class_type": "MusubiTuner_TrainingConfig", "widgets": {}},
        {"id": "5", "class_type": "MusubiTuner_OptimizerConfig", "widgets": {}},
        {"id": "6", "class_type": "MusubiTuner_SamplingConfig", "widgets": {"timestep_sampling": "shift", "discrete_flow_shift": 3.0}},
        {"id": "7", "class_type": "MusubiTuner_MemoryOptimizer", "widgets": {}},
        {"id": "8", "class_type": "MusubiTuner_WanTrainer", "widgets": {"attention": "sdpa"}},
    ]
    training_links = [("1", 0, "2", "pipeline"), ("2", 0, "3", "pipeline"), ("3", 0, "8", "pipeline"),
                      ("4", 0, "8", "training_config"), ("5", 0, "8", "optimizer_config"),
                      ("6", 0, "8", "sampling_config"), ("1", 0, "7", "pipeline"), ("7", 0, "2", "memory_config"),
                      ("7", 0, "8", "memory_config")]
    inference = [
        {"id": "1", "class_type": "MusubiTuner_WanGenerator", "widgets": {
            "task": "t2v-1.3B", "prompt": "a lighthouse on a cliff at dusk, in the trained style", "width": 832,
            "height": 480, "video_length": 33, "infer_steps": 20, "seed": 42, "lora_strength": 1.0}},
        {"id": "2", "class_type": "SaveVideo", "widgets": {"filename_prefix": "musubi/video"}},
    ]
    merging = [
        {"id": "1", "class_type": "MusubiTuner_LoRAWeightedMerge", "widgets": {"strength_1": 0.7, "strength_2": 0.3, "strength_3": 0.0}},
        {"id": "2", "class_type": "MusubiTuner_LoRAMerger", "widgets": {"family": "hunyuan_video", "output_name": "merged-dit.safetensors"}},
    ]
    conversion = [
        {"id": "1", "class_type": "MusubiTuner_FormatConverter", "widgets": {"family": "wan", "to": "auto"}},
    ]
    return {
        "lora_training": (training, training_links),
        "inference_with_lora": (inference, [("1", 0, "2", "video")]),
        "merge_loras": (merging, [("1", 0, "2", "lora_1")]),
        "format_conversion": (conversion, []),
    }


def rendered() -> dict[str, str]:
    sys.path.insert(0, str(REPO.parent))
    from musubi_pipe.comfy_adapter.export import to_ui

    return {name: json.dumps(to_ui(nodes, links), indent=2) + "\n" for name, (nodes, links) in examples().items()}


if __name__ == "__main__":
    from musubi_pipe.files import write_atomic

    folder = REPO / "example_workflows"
    for name, text in rendered().items():
        write_atomic(folder / f"{name}.json", text)
        print(f"wrote {folder / name}.json")
