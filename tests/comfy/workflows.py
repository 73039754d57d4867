"""API-format workflows the tests queue (widget values by input name; links as [node, output])."""
from __future__ import annotations

NONE = "(none)"


def model_widgets(*slots: str, **picked: str) -> dict:
    """The model pickers (files outside ComfyUI's folders go in the node's model_paths text)."""
    return {slot: picked.get(slot, NONE) for slot in slots}


def wan_training(clips: str, name: str, steps: int = 0, epochs: int = 2, base_folder: str = "", save_every: int = 1,
                 save_state: bool = False, keep: int = 0, copy: str = "final") -> dict:
    """Dataset (Wan, t2v-1.3B) -> latent cache -> text cache -> Wan trainer with its config nodes."""
    return {
        "1": {"class_type": "MusubiTuner_DatasetConfig", "inputs": {
            "name": name, "media_folder": clips, "width": 96, "height": 64, "target_frames": "1, 9",
            "frame_extraction": "head", "caption_extension": ".txt", "batch_size": 1, "num_repeats": 1,
            "enable_bucket": False, "cache_folder": "", "base_folder": base_folder, "family": "wan", "task": "t2v-1.3B"}},
        "2": {"class_type": "MusubiTuner_WanLatentCache", "inputs": {
            "pipeline": ["1", 0], "stage_name": "cache_latents", "batch_size": 0,
            **model_widgets("vae", "clip", vae="musubi-test-vae.safetensors")}},
        "3": {"class_type": "MusubiTuner_WanTextEncoderCache", "inputs": {
            "pipeline": ["2", 0], "stage_name": "cache_text_encoder", "batch_size": 0, "fp8_text_encoder": False,
            **model_widgets("t5", t5="musubi-test-t5.safetensors")}},
        "4": {"class_type": "MusubiTuner_TrainingConfig", "inputs": {
            "network_dim": 4, "network_alpha": 2.0, "learning_rate": 1e-4, "max_train_epochs": 0 if steps else epochs,
            "max_train_steps": steps, "save_every_n_epochs": 0 if steps else save_every, "save_every_n_steps": 0,
            "save_state": save_state, "seed": 1, "gradient_checkpointing": True}},
        "5": {"class_type": "MusubiTuner_OptimizerConfig", "inputs": {
            "optimizer_type": "adamw8bit", "custom_optimizer": "", "optimizer_args": "", "lr_scheduler": "constant",
            "lr_warmup_steps": 0, "max_grad_norm": 0.0}},
        "7": {"class_type": "MusubiTuner_SamplingConfig", "inputs": {
            "timestep_sampling": "shift", "discrete_flow_shift": 3.0, "sample_prompts": "a fox\na cat",
            "sample_every_n_epochs": 1, "sample_every_n_steps": 0, "sample_at_first": False}},
        "6": {"class_type": "MusubiTuner_WanTrainer", "inputs": {"sampling_config": ["7", 0],
            "pipeline": ["3", 0], "stage_name": "train", "learning_rate": "2e-4", "max_train_epochs": 16, "network_dim": 32,
            "memory_preset": "family template", "copy_to_loras": copy, "keep_checkpoints": keep, "expert": "none",
            "options": 'attention = "sdpa"', "training_config": ["4", 0], "optimizer_config": ["5", 0],
            **model_widgets("dit", "dit_high_noise", "vae", "t5", "clip", dit="musubi-test-dit_bf16.safetensors",
                            vae="musubi-test-vae.safetensors", t5="musubi-test-t5.safetensors")}},
    }
