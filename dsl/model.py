"""The pipeline language: one document (TOML or YAML) from dataset to generated video.

Stage options carry musubi-tuner's own argument names (`network_dim`, `blocks_to_swap`), so a
user who knows musubi knows the language. A field left unset takes the family template's
default, then the pipeline's `[defaults.<kind>]`, then the stage's own value.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr, create_model

from ..pipelines import registry
from .dataset import Count, DatasetConfig

FAMILIES = registry.family_names()
STAGE_KINDS = ("check_dataset", "cache_latents", "cache_text_encoder", "train", "finetune", "ema", "convert", "merge", "lora_merge", "generate")
ATTENTION = ("sdpa", "flash_attn", "flash3", "xformers", "sage_attn")

Finite = Annotated[float, Field(allow_inf_nan=False)]  # nan and inf reach musubi as text it cannot use
Scalar = Union[StrictBool, StrictInt, Finite, StrictStr]
ArgValue = Union[Scalar, list[Scalar]]
Number = Union[StrictInt, Finite]


def _number(**bounds) -> Any:
    """A whole or decimal number within bounds (ge/gt/le/lt)."""
    return Union[Annotated[StrictInt, Field(**bounds)], Annotated[float, Field(allow_inf_nan=False, **bounds)]]


# Ranges where musubi fails or silently misbehaves outside them.
Amount = Annotated[StrictInt, Field(ge=0)]  # workers, blocks to swap, indexes
TrainSeed = Annotated[StrictInt, Field(ge=0, le=2**32 - 1)]  # numpy's seed range (accelerate's set_seed)
Seed = Annotated[StrictInt, Field(ge=0, le=2**64 - 1)]  # torch's manual_seed range
Positive = _number(gt=0)
NonNegative = _number(ge=0)
Fraction = _number(ge=0, le=1)
Dropout = _number(ge=0, lt=1)
Timestep = Annotated[StrictInt, Field(ge=0, le=1000)]
TimestepBoundary = _number(ge=0, le=1000)  # Wan training: whole numbers out of 1000
GiB = _number(gt=0, le=4096)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _model_slots() -> dict[str, Any]:
    """Every family's model slots (the registry's [models]), each a path field; help from the first
    family that has the slot, with the titles of all families that use it."""
    fields: dict[str, Any] = {}
    users: dict[str, list[str]] = {}
    for fam in registry.families():
        for slot in fam.models.values():
            users.setdefault(slot.name, []).append(fam.title)
            fields.setdefault(slot.name, slot.help)
    return {name: (StrictStr | None, Field(None, description=f"{', '.join(users[name])}: {text}"))
            for name, text in fields.items()}


Models = create_model(
    "Models", __base__=_Strict, __doc__="Model files. Paths relative to the pipeline file are resolved against its folder.",
    **_model_slots(),
    dit_dtype=(Literal["bf16", "fp16", "fp32"] | None, Field(None, description="dtype of the DiT weights; guessed from the file name when unset")),
)


class LoraInput(_Strict):
    path: StrictStr = Field(description="a LoRA file, or a reference such as '@train.lora'")
    multiplier: Number = 1.0


def _lora_list(value: Any) -> Any:
    if isinstance(value, list):
        return [{"path": v} if isinstance(v, str) else v for v in value]
    return value


# `loras = ["@train.lora"]` is short for `[{ path = "@train.lora" }]`.
LoraList = Annotated[list[LoraInput], BeforeValidator(_lora_list)]


class Prompt(_Strict):
    """One prompt of a batch generation or of the samples made during training. Control options
    are musubi's per-prompt ones (Fun-Control video, one-frame control images and mode)."""

    text: StrictStr
    negative: StrictStr | None = None
    seed: Seed | None = None
    width: Count | None = None
    height: Count | None = None
    frames: Count | None = None
    steps: Count | None = None
    guidance: NonNegative | None = None
    flow_shift: Positive | None = None
    image: StrictStr | None = None
    end_image: StrictStr | None = None
    control: StrictStr | None = Field(None, description="Fun-Control: the control video")
    control_images: list[StrictStr] | None = Field(None, description="one-frame inference: control (reference) images")
    one_frame: StrictStr | None = Field(None, description="one-frame inference mode, e.g. 'target_index=1,control_index=0'")


class _Stage(_Strict):
    needs: list[StrictStr] = Field(default_factory=list, description="stages that must run first, besides those referenced")
    extra_args: dict[str, ArgValue] = Field(
        default_factory=dict,
        description="musubi options the language does not model, by argument name (checked against musubi's parser)",
    )
    description: StrictStr | None = None
    sweep: dict[StrictStr, list[Scalar]] | None = Field(
        None, description="try several values of settings: one branch per combination, sharing the upstream stages "
                          "(expanded before the graph is built; at most 64 branches)")


class CacheLatentsStage(_Stage):
    kind: Literal["cache_latents"]
    batch_size: Count | None = None
    num_workers: Amount | None = None
    device: StrictStr | None = None
    vae_dtype: StrictStr | None = None
    skip_existing: StrictBool | None = Field(None, description="keep cache files that already exist (default true)")
    keep_cache: StrictBool | None = Field(None, description="never delete cache files of items not in the dataset (default true)")
    vae_tiling: StrictBool | None = None
    vae_chunk_size: Count | None = None
    vae_spatial_tile_sample_min_size: Count | None = None
    vae_cache_cpu: StrictBool | None = None
    one_frame: StrictBool | None = Field(None, description="cache for one-frame training (caching then runs without skip_existing)")
    one_frame_no_2x: StrictBool | None = Field(None, description="FramePack one-frame: no 2x clean latents")
    one_frame_no_4x: StrictBool | None = Field(None, description="FramePack one-frame: no 4x clean latents")


class CacheTextEncoderStage(_Stage):
    kind: Literal["cache_text_encoder"]
    batch_size: Count | None = None
    num_workers: Amount | None = None
    device: StrictStr | None = None
    skip_existing: StrictBool | None = None
    keep_cache: StrictBool | None = None
    fp8_llm: StrictBool | None = None
    fp8_t5: StrictBool | None = None
    fp8_text_encoder: StrictBool | None = Field(
        None, description="load the family's text encoder in fp8 (HunyuanVideo/FramePack: fp8_llm; Wan: fp8_t5)")
    text_encoder_dtype: StrictStr | None = None


class TrainStage(_Stage):
    kind: Literal["train"]
    output_name: StrictStr | None = Field(None, max_length=200, description="file name of the LoRA, without extension")
    output_dir: StrictStr | None = None
    dit: StrictStr | None = Field(None, description="train on this DiT instead of models.dit")
    expert: Literal["high", "low"] | None = Field(None, description="Wan 2.2 A14B: which expert this run trains")
    network_module: StrictStr | None = None
    network_dim: Count | None = None
    network_alpha: NonNegative | None = None
    network_args: list[StrictStr] | None = None
    network_dropout: Dropout | None = None
    network_weights: StrictStr | None = Field(None, description="start from this LoRA")
    learning_rate: Positive | None = None
    optimizer_type: StrictStr | None = None
    optimizer_args: list[StrictStr] | None = None
    lr_scheduler: StrictStr | None = None
    lr_warmup_steps: NonNegative | None = None
    lr_scheduler_args: list[StrictStr] | None = None
    max_grad_norm: NonNegative | None = None
    max_train_epochs: Count | None = None
    max_train_steps: Count | None = None
    gradient_accumulation_steps: Count | None = None
    save_every_n_epochs: Count | None = None
    save_every_n_steps: Count | None = None
    save_last_n_epochs: Count | None = None
    save_last_n_steps: Count | None = None
    save_state: StrictBool | None = Field(None, description="save optimizer state with each checkpoint, so an interrupted run can resume")
    save_state_on_train_end: StrictBool | None = None
    save_last_n_epochs_state: Count | None = None
    save_last_n_steps_state: Count | None = None
    save_precision: Literal["fp32", "fp16", "bf16", "float", "float16", "bfloat16"] | None = None
    seed: TrainSeed | None = None
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    attention: Literal["sdpa", "flash_attn", "flash3", "xformers", "sage_attn"] | None = None
    split_attn: StrictBool | None = None
    gradient_checkpointing: StrictBool | None = None
    gradient_checkpointing_cpu_offload: StrictBool | None = None
    fp8_base: StrictBool | None = None
    fp8_scaled: StrictBool | None = None
    fp8_llm: StrictBool | None = None
    blocks_to_swap: Amount | None = None
    use_pinned_memory_for_block_swap: StrictBool | None = None
    img_in_txt_in_offloading: StrictBool | None = None
    timestep_sampling: StrictStr | None = None
    discrete_flow_shift: Positive | None = None
    weighting_scheme: StrictStr | None = None
    sigmoid_scale: Positive | None = None
    min_timestep: Timestep | None = None
    max_timestep: Timestep | None = None
    preserve_distribution_shape: StrictBool | None = None
    timestep_boundary: TimestepBoundary | None = None
    guidance_scale: NonNegative | None = None
    max_data_loader_n_workers: Amount | None = None
    persistent_data_loader_workers: StrictBool | None = None
    logging_dir: StrictStr | None = None
    log_with: Literal["tensorboard", "wandb", "all"] | None = None
    log_prefix: StrictStr | None = None
    sample_prompts: list[Prompt] | StrictStr | None = Field(None, description="prompts for samples during training, or a prompt file")
    sample_every_n_epochs: Count | None = None
    sample_every_n_steps: Count | None = None
    sample_at_first: StrictBool | None = None
    one_frame: StrictBool | None = None
    latent_window_size: Count | None = None
    num_processes: Count | None = Field(None, description="GPUs to train on, all machines together (accelerate --num_processes); "
                                        "the batch size is per GPU")
    num_machines: Count | None = Field(None, description="machines to train on; each machine's own configuration "
                                       "gives its machine_rank and the main process's address")
    ddp_timeout: Count | None = Field(None, description="several GPUs: minutes a rank waits for the others")
    ddp_gradient_as_bucket_view: StrictBool | None = None
    ddp_static_graph: StrictBool | None = None
    gpu_memory_gib: GiB | None = Field(
        None, description="plan gradient checkpointing, fp8 and block swap for a GPU of this size (the fastest setting that fits); options set explicitly win")
    latents: StrictStr | None = Field(None, description="latent cache to train on (default: the pipeline's cache_latents stage)")
    text_encoder_cache: StrictStr | None = Field(None, description="text-encoder cache (default: the pipeline's cache_text_encoder stage)")


class FinetuneStage(_Stage):
    """Full fine-tuning of the whole DiT (musubi's *_train.py scripts), where a family has it: no LoRA
    network; its artifact is a model file ('@stage.model') for generate's or a train stage's dit."""

    kind: Literal["finetune"]
    output_name: StrictStr | None = Field(None, max_length=200, description="file name of the model, without extension")
    output_dir: StrictStr | None = None
    dit: StrictStr | None = Field(None, description="fine-tune this DiT instead of models.dit")
    learning_rate: Positive | None = None
    optimizer_type: StrictStr | None = None
    optimizer_args: list[StrictStr] | None = None
    lr_scheduler: StrictStr | None = None
    lr_warmup_steps: NonNegative | None = None
    lr_scheduler_args: list[StrictStr] | None = None
    max_grad_norm: NonNegative | None = None
    max_train_epochs: Count | None = None
    max_train_steps: Count | None = None
    gradient_accumulation_steps: Count | None = None
    save_every_n_epochs: Count | None = None
    save_every_n_steps: Count | None = None
    save_last_n_epochs: Count | None = None
    save_last_n_steps: Count | None = None
    save_state: StrictBool | None = Field(None, description="save optimizer state with each checkpoint, so an interrupted run can resume")
    save_state_on_train_end: StrictBool | None = None
    save_last_n_epochs_state: Count | None = None
    save_last_n_steps_state: Count | None = None
    seed: TrainSeed | None = None
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    attention: Literal["sdpa", "flash_attn", "flash3", "xformers", "sage_attn"] | None = None
    split_attn: StrictBool | None = None
    gradient_checkpointing: StrictBool | None = None
    gradient_checkpointing_cpu_offload: StrictBool | None = None
    full_bf16: StrictBool | None = Field(None, description="keep the DiT's weights (and the saved model) in bfloat16: much less VRAM, slightly less accurate")
    fused_backward_pass: StrictBool | None = Field(None, description="Adafactor's step inside the backward pass: less VRAM (no gradient accumulation)")
    mem_eff_save: StrictBool | None = Field(None, description="save checkpoints with less system RAM")
    blocks_to_swap: Amount | None = None
    block_swap_optimizer_patch_params: StrictBool | None = Field(None, description="block swap without fused_backward_pass (AdamW, Adafactor)")
    use_pinned_memory_for_block_swap: StrictBool | None = None
    timestep_sampling: StrictStr | None = None
    discrete_flow_shift: Positive | None = None
    weighting_scheme: StrictStr | None = None
    sigmoid_scale: Positive | None = None
    min_timestep: Timestep | None = None
    max_timestep: Timestep | None = None
    max_data_loader_n_workers: Amount | None = None
    persistent_data_loader_workers: StrictBool | None = None
    logging_dir: StrictStr | None = None
    log_with: Literal["tensorboard", "wandb", "all"] | None = None
    log_prefix: StrictStr | None = None
    sample_prompts: list[Prompt] | StrictStr | None = Field(None, description="prompts for samples during training, or a prompt file")
    sample_every_n_epochs: Count | None = None
    sample_every_n_steps: Count | None = None
    sample_at_first: StrictBool | None = None
    num_processes: Count | None = Field(None, description="GPUs to train on (accelerate --num_processes)")
    num_machines: Count | None = None
    latents: StrictStr | None = Field(None, description="latent cache to train on (default: the pipeline's cache_latents stage)")
    text_encoder_cache: StrictStr | None = Field(None, description="text-encoder cache (default: the pipeline's cache_text_encoder stage)")


class GenerateStage(_Stage):
    kind: Literal["generate"]
    dit: StrictStr | None = Field(None, description="generate with this DiT instead of models.dit, e.g. '@merge.model'")
    prompt: StrictStr | None = None
    section_prompts: dict[StrictStr, StrictStr] | None = Field(None, description="FramePack: prompt per section index ('0', '1', '-1', '0-2')")
    prompts: list[Prompt] | None = Field(None, description="many prompts in one run, one model load")
    negative_prompt: StrictStr | None = None
    image_path: StrictStr | None = Field(None, description="start image")
    section_images: dict[StrictStr, StrictStr] | None = Field(None, description="FramePack: start image per section index ('0' is image_path)")
    end_image_path: StrictStr | None = None
    one_frame_inference: StrictStr | None = Field(None, description="one-frame inference options, e.g. 'target_index=1,control_index=0'")
    control_image_path: list[StrictStr] | None = Field(None, description="control (reference) images: one-frame inference, image editing")
    control_image_mask_path: list[StrictStr] | None = None
    control_path: StrictStr | None = Field(None, description="Fun-Control: the control video")
    video_size: tuple[Count, Count] | None = Field(None, description="[height, width]")
    image_size: tuple[Count, Count] | None = Field(None, description="image families: [height, width] of the image")
    video_length: Count | None = None
    video_seconds: Positive | None = None
    video_sections: Count | None = None
    fps: Count | None = None
    infer_steps: Count | None = None
    guidance_scale: NonNegative | None = None
    embedded_cfg_scale: NonNegative | None = None
    flow_shift: Positive | None = None
    seed: Seed | None = None
    sample_solver: Literal["unipc", "dpm++", "vanilla"] | None = None
    attn_mode: StrictStr | None = None
    loras: LoraList = Field(default_factory=list)
    loras_high_noise: LoraList = Field(default_factory=list, description="Wan 2.2 A14B: LoRAs for the high-noise expert (loras go on the low-noise one)")
    fp8: StrictBool | None = None
    fp8_scaled: StrictBool | None = None
    blocks_to_swap: Amount | None = None
    split_attn: StrictBool | None = None
    vae_chunk_size: Count | None = None
    vae_spatial_tile_sample_min_size: Count | None = None
    latent_window_size: Count | None = None
    f1: StrictBool | None = None
    output_type: Literal["video", "images", "latent", "both", "latent_images"] | None = None
    save_path: StrictStr | None = Field(None, description="output folder (musubi names the files)")


class EmaStage(_Stage):
    kind: Literal["ema"]
    checkpoints: StrictStr | list[StrictStr] = Field(description="'@train.checkpoints', or LoRA files oldest first")
    beta: Fraction | None = None
    beta2: Fraction | None = None
    sigma_rel: Positive | None = None
    output: StrictStr | None = None


class ConvertStage(_Stage):
    kind: Literal["convert"]
    input: StrictStr = Field(description="a LoRA file or a reference such as '@train.lora'")
    to: Literal["comfyui", "musubi"] = Field("comfyui", description="comfyui: diffusion_model.* lora_A/B keys; musubi: lora_unet_* keys")
    diffusers_prefix: StrictStr | None = None
    output: StrictStr | None = None


class MergeStage(_Stage):
    kind: Literal["merge"]
    loras: LoraList = Field(description="LoRAs to merge into the base DiT")
    output: StrictStr | None = None
    device: StrictStr | None = None


class LoraMergeStage(_Stage):
    """Several LoRAs into one LoRA, weighted (musubi-pipe's own tool, not a musubi script)."""

    kind: Literal["lora_merge"]
    loras: LoraList = Field(description="LoRAs to merge; multiplier is each one's weight")
    rank: Count | None = Field(None, description="re-factorise to this rank by SVD (default: exact, the ranks add up)")
    format: Literal["musubi", "comfyui"] | None = Field(None, description="key layout of the result (default: the first input's)")
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    output: StrictStr | None = None


class CheckDatasetStage(_Stage):
    """Inspect the dataset as musubi will see it (musubi-pipe's own tool); caching waits for it."""

    kind: Literal["check_dataset"]
    contact_sheet: StrictBool = Field(False, description="also draw a contact sheet of the dataset")


Stage = Annotated[
    Union[CacheLatentsStage, CacheTextEncoderStage, TrainStage, FinetuneStage, GenerateStage, EmaStage, ConvertStage, MergeStage,
          LoraMergeStage, CheckDatasetStage],
    Field(discriminator="kind"),
]
STAGE_MODELS = {
    "cache_latents": CacheLatentsStage,
    "cache_text_encoder": CacheTextEncoderStage,
    "train": TrainStage,
    "finetune": FinetuneStage,
    "generate": GenerateStage,
    "ema": EmaStage,
    "convert": ConvertStage,
    "merge": MergeStage,
    "lora_merge": LoraMergeStage,
    "check_dataset": CheckDatasetStage,
}


def _family(value: Any) -> Any:
    """A family's alias (hv, fpack, wan2.2) as its name; anything else is left to the type check."""
    return registry.canonical(value) or value if isinstance(value, str) else value


class Pipeline(_Strict):
    """A musubi-pipe pipeline document."""

    version: Literal[1] = 1
    name: StrictStr = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100, description="used for output names and folders")
    family: Annotated[Literal[FAMILIES], BeforeValidator(_family)] = Field(description="model family (an alias such as hv or fpack works too)")
    task: StrictStr | None = Field(None, max_length=100, description="what the model does, for families with tasks: " + "; ".join(
        f"{f.title}: {', '.join(f.task_names())}" for f in registry.families() if f.tasks))
    workdir: StrictStr | None = Field(None, description="where outputs go (default: musubi-out/<name> beside the pipeline)")
    vars: dict[str, Scalar] = Field(default_factory=dict, description="values for {{ name }} interpolation")
    models: Models = Models()
    dataset: DatasetConfig | StrictStr | None = Field(None, description="musubi's [general] and [[datasets]], or a dataset TOML path")
    defaults: dict[Literal["check_dataset", "cache_latents", "cache_text_encoder", "train", "finetune", "ema", "convert", "merge", "lora_merge", "generate"], dict[str, Any]] = Field(
        default_factory=dict, description="option values for every stage of a kind"
    )
    stages: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")], Stage] = Field(default_factory=dict)
