"""Memory planner: the fastest musubi-tuner LoRA training settings that fit a GPU, from a written
memory and speed model fitted to runs measured on an H100 (shared/design/gpu-measurements.md)."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from ..errors import PipelineError, Problem
from ..pipelines import registry
from ..pipelines.registry import DiT

GIB = 2 ** 30
MIB = 2 ** 20

# --- The model's parts, one per DiT, and the runs the constants are fitted to: memory facts of
# the registry (pipelines/families/*.toml, [memory]).


def dit_for(family: str, task: str | None) -> DiT:
    family, task = resolve_task(family, task)
    return registry.family(family).dits[task]


@lru_cache(maxsize=1)
def _measured() -> tuple[registry.Family, dict]:
    """(the family whose runs were measured, its [memory.measured] table)."""
    for fam in registry.families():
        table = fam.memory.get("measured")
        if table:
            return fam, table
    raise LookupError("no family file has [memory.measured]")


def measured_runs() -> dict[str, tuple]:
    """run: (task, gradient checkpointing, fp8, blocks_to_swap, s/it, torch peak GiB, device peak MiB)."""
    _, table = _measured()
    return {name: (r["task"], r["gradient_checkpointing"], r["fp8"], r["blocks_to_swap"], r["s_per_it"],
                   r["torch_peak_gib"], r["device_peak_mib"]) for name, r in table["runs"].items()}


def _reference(run: str) -> DiT:
    fam, _ = _measured()
    return fam.dits[measured_runs()[run][0]]


BF16 = 2
MEASURED_TOKENS = 14_040  # 832x480x33 with Wan's VAE and patches: the measured runs' sample
MEASURED_RANK = 32
LORA_BYTES_PER_PARAM = 16  # fp32 weight + fp32 grad + AdamW's two fp32 moments
CHECKPOINT_BYTES = BF16  # with checkpointing, each block keeps only its bf16 input per token and hidden unit


@dataclass(frozen=True)
class Settings:
    gradient_checkpointing: bool
    fp8: bool
    blocks_to_swap: int


@dataclass(frozen=True)
class Fit:
    """Constants of the model, each solved from two measured runs (the others are predictions)."""

    act_bytes: float  # activation bytes per token, per hidden unit, per block, without checkpointing (runs a, d)
    constant_gib: float  # what else torch holds: text context, buffers, workspaces (runs a, d)
    overhead_mib: float  # device peak minus torch peak: CUDA context and allocator cache ... (runs a, big_a)
    overhead_per_weight: float  # ... plus this share of the DiT weights' size (runs a, big_a)
    context_gib: float  # the smallest device-minus-torch overhead measured: what a run cannot give back
    checkpointing_factor: float  # s/it with checkpointing / without (a / d)
    fp8_factor: float  # s/it with fp8_base+fp8_scaled / without (b / a)
    time_exponent: float  # s/it grows as (block parameters)^this (d, and big_a without checkpointing)
    swap_bandwidth: float  # bytes/s moved by block swap (c, big_swap) ...
    swap_overlap: float  # ... of which this share of the swapped blocks' compute time is hidden (c, big_swap)


def _block_params(dit: DiT) -> int:
    return sum(b.count * b.params for b in dit.blocks)


@lru_cache(maxsize=None)  # the same for every setting the planner tries
def _lora_params(dit: DiT, rank: int) -> int:
    from .lora import target_modules

    return sum(rank * (m.in_features + m.out_features) for m in target_modules(dit.family, dit.task).values())


def _weight_bytes(dit: DiT, s: Settings) -> tuple[float, float]:
    """(bytes of DiT weights on the GPU, bytes of the swapped blocks in CPU memory)."""
    total = dit.params * BF16
    if s.fp8:
        total -= sum(b.count * b.linear_weights for b in dit.blocks)  # one byte instead of two
    swapped = 0.0
    for b, n in zip(dit.blocks, dit.swapped(s.blocks_to_swap)):
        swapped += n * (b.params * BF16 - (b.linear_weights if s.fp8 else 0))
    return total - swapped, swapped


def _n_blocks(dit: DiT) -> int:
    return sum(b.count for b in dit.blocks)


def _torch_peak(dit: DiT, s: Settings, tokens: int, rank: int, fit: Fit) -> float:
    resident, _ = _weight_bytes(dit, s)
    one_block = tokens * dit.hidden * fit.act_bytes
    if s.gradient_checkpointing:
        activations = _n_blocks(dit) * tokens * dit.hidden * CHECKPOINT_BYTES + one_block
    else:
        activations = _n_blocks(dit) * one_block
    return (resident + _lora_params(dit, rank) * LORA_BYTES_PER_PARAM + activations) / GIB + fit.constant_gib


def _device_peak(dit: DiT, s: Settings, tokens: int, rank: int, fit: Fit) -> float:
    """What nvidia-smi shows at the peak: torch's peak plus the CUDA context and the allocator's
    cache, which grew with the size of the weights loaded (bf16 files, even for fp8) in the runs."""
    loaded = dit.params * BF16
    return _torch_peak(dit, s, tokens, rank, fit) + (fit.overhead_mib * MIB + fit.overhead_per_weight * loaded) / GIB


def _seconds(dit: DiT, s: Settings, tokens: int, fit: Fit) -> float:
    ref = _reference("d")
    t = measured_runs()["d"][4] * (_block_params(dit) / _block_params(ref)) ** fit.time_exponent * tokens / MEASURED_TOKENS
    t *= fit.checkpointing_factor if s.gradient_checkpointing else 1.0
    t *= fit.fp8_factor if s.fp8 else 1.0
    _, swapped = _weight_bytes(dit, s)
    if swapped:
        swapped_params = sum(n * b.params for b, n in zip(dit.blocks, dit.swapped(s.blocks_to_swap)))
        hidden = fit.swap_overlap * t * swapped_params / _block_params(dit)
        t += max(0.0, 2 * swapped / fit.swap_bandwidth - hidden)  # blocks move in forward and in backward
    return t


@lru_cache(maxsize=1)
def fitted() -> Fit:
    """Solve the constants from the measured runs (two runs per pair of constants)."""
    import math

    measured = measured_runs()
    wan13, wan14 = _reference("a"), _reference("big_a")  # the small and the large measured DiT
    a, b, c, d, big_a, big_swap = (measured[k] for k in ("a", "b", "c", "d", "big_a", "big_swap"))
    n, h, tok = _n_blocks(wan13), wan13.hidden, MEASURED_TOKENS
    fixed = (_weight_bytes(wan13, Settings(True, False, 0))[0] + _lora_params(wan13, MEASURED_RANK) * LORA_BYTES_PER_PARAM) / GIB
    # a: peak = fixed + n*tok*h*2/GIB + tok*h*k/GIB + C ;  d: peak = fixed + n*tok*h*k/GIB + C
    rest_a = a[5] - fixed - n * tok * h * CHECKPOINT_BYTES / GIB
    rest_d = d[5] - fixed
    k = (rest_d - rest_a) / ((n - 1) * tok * h) * GIB
    const = rest_a - tok * h * k / GIB
    # device overhead from a and big_a: overhead = o0 + o1 * loaded weight bytes
    w13, w14 = wan13.params * BF16, wan14.params * BF16
    ov_a, ov_big = a[6] * MIB - a[5] * GIB, big_a[6] * MIB - big_a[5] * GIB
    o1 = (ov_big - ov_a) / (w14 - w13)
    o0 = (ov_a - o1 * w13) / MIB
    context = min(r[6] * MIB - r[5] * GIB for r in measured.values()) / GIB
    gc = a[4] / d[4]
    fp8 = b[4] / a[4]
    expo = math.log((big_a[4] / gc) / d[4]) / math.log(_block_params(wan14) / _block_params(wan13))
    # swap: added = 2*bytes/bw - overlap * (t * swapped share), for c and big_swap: two linear equations
    rows = []
    for run, dit, total_blocks in ((c, wan13, 30), (big_swap, wan14, 40)):
        base = a if run is c else big_a
        swapped_bytes = run[3] * dit.blocks[0].params * BF16
        rows.append((2 * swapped_bytes, -base[4] * run[3] / total_blocks, run[4] - base[4]))
    (p1, q1, r1), (p2, q2, r2) = rows
    det = p1 * q2 - p2 * q1
    inv_bw = (r1 * q2 - r2 * q1) / det
    overlap = (p1 * r2 - p2 * r1) / det
    return Fit(k, const, o0, o1, context, gc, fp8, expo, 1 / inv_bw, overlap)


# --- The planner


def tokens_for(width: int, height: int, frames: int) -> int:
    """DiT tokens of one sample: VAE stride (4, 8, 8) then 1x2x2 patches (Wan, HunyuanVideo, FramePack)."""
    latent_frames = (max(frames, 1) - 1) // 4 + 1
    return latent_frames * (height // 16) * (width // 16)


MUSUBI_DEFAULT_RESOLUTION = (960, 544)  # musubi's dataset default when no resolution is given


def largest_sample(dataset) -> dict:
    """Resolution, frames and batch size of a dataset's (dsl.dataset.DatasetConfig) largest training
    step by DiT tokens x batch, as plan_memory takes them; {} for a dataset with no entries. Each
    dataset's own value wins over [general], as in musubi."""
    shapes = []
    for d in dataset.datasets:
        res = d.resolution if d.resolution is not None else dataset.general.resolution
        res = MUSUBI_DEFAULT_RESOLUTION if res is None else (res, res) if isinstance(res, int) else tuple(res)
        frames = max(d.target_frames or [1]) if d.is_video else 1
        batch = d.batch_size or dataset.general.batch_size or 1
        shapes.append({"resolution": (int(res[0]), int(res[1])), "frames": int(frames), "batch_size": int(batch)})
    return max(shapes, key=lambda s: tokens_for(*s["resolution"], s["frames"]) * s["batch_size"], default={})


def parse_resolution(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().replace("*", "x").split("x"))
        if w > 0 and h > 0:
            return w, h
    except ValueError:
        pass
    raise PipelineError([Problem(f"resolution {text!r} is not WIDTHxHEIGHT", path="resolution", fix="write it like 832x480")])


def resolve_task(family: str, task: str | None) -> tuple[str, str]:
    """(family, task) as the registry names them; the one model of a family without tasks."""
    try:
        fam = registry.family(family)
    except registry.UnknownFamily as exc:
        raise PipelineError([Problem(str(exc), path="family", fix=f"use one of: {', '.join(registry.family_names())}")]) from None
    if not fam.tasks:
        return fam.name, fam.model.name
    name = fam.resolve_task(task)
    if name is None:
        raise PipelineError([Problem(f"{fam.name} has no task {task!r} the planner knows", path="task",
                                     fix=f"use one of: {', '.join(fam.task_names())}")])
    return fam.name, name


@dataclass
class Option:
    settings: Settings
    torch_peak_gib: float
    device_peak_gib: float
    seconds_per_step: float
    fits: bool

    @property
    def need_gib(self) -> float:
        """Memory the run cannot do without: torch's peak plus the CUDA context. The rest of the
        device peak is allocator cache, which PyTorch frees and retries with before it fails."""
        return self.torch_peak_gib + fitted().context_gib


@dataclass
class MemoryPlan:
    family: str
    task: str
    vram_gib: float
    limit_gib: float  # vram minus the safety margin
    tokens: int
    batch_size: int
    chosen: Option
    train: dict  # train-stage fields (musubi dest names) to set; unset means musubi's default (off)
    cache_latents: dict  # cache_latents-stage fields
    why: dict[str, str]  # field -> explanation
    considered: list[Option] = field(default_factory=list)

    def memory_config(self) -> dict:
        """The Memory Optimizer node's dictionary (comfy_adapter.nodes_train.memory_fields reads it)."""
        s = self.chosen.settings
        return {"fp8": s.fp8, "fp8_scaled": bool(self.train.get("fp8_scaled")), "blocks_to_swap": s.blocks_to_swap,
                "gradient_checkpointing": s.gradient_checkpointing, "split_attn": bool(self.train.get("split_attn"))}

    def as_dict(self) -> dict:
        c = self.chosen
        return {"family": self.family, "task": self.task, "vram_gib": self.vram_gib, "limit_gib": round(self.limit_gib, 2),
                "tokens": self.tokens, "batch_size": self.batch_size, "train": self.train,
                "cache_latents": self.cache_latents, "why": self.why,
                "predicted": {"need_gib": round(c.need_gib, 2), "torch_peak_gib": round(c.torch_peak_gib, 2),
                              "device_peak_gib": round(c.device_peak_gib, 2),
                              "seconds_per_step_h100": round(c.seconds_per_step, 3)}}

    def explain(self) -> str:
        c = self.chosen
        lines = [f"{dit_for(self.family, self.task).title}, {self.tokens:,} tokens, batch {self.batch_size}, "
                 f"{self.vram_gib:g} GiB GPU (plan to {self.limit_gib:.1f} GiB):",
                 f"  predicted: needs {c.need_gib:.1f} GiB (torch peak {c.torch_peak_gib:.1f} + CUDA context); "
                 f"nvidia-smi would show up to {c.device_peak_gib:.1f} GiB on a larger GPU; ~{c.seconds_per_step:.2f} "
                 "s/step at H100 speed"]
        for name, text in self.why.items():
            lines.append(f"  {name}: {text}")
        return "\n".join(lines)


def _option(dit: DiT, s: Settings, tokens: int, rank: int, fit: Fit, fits: bool = False) -> Option:
    return Option(s, _torch_peak(dit, s, tokens, rank, fit), _device_peak(dit, s, tokens, rank, fit),
                  _seconds(dit, s, tokens, fit), fits)


def safety_margin(vram_gib: float) -> float:
    """What the plan leaves free: 5% of the GPU (the model's torch-peak error on the measured runs
    is under 3%, and fragmentation) and at least 0.75 GiB for the desktop and other processes."""
    return max(0.75, 0.05 * vram_gib)


def plan_memory(family: str, task: str | None, vram_gib: float, resolution: str | tuple[int, int] = (832, 480),
                frames: int = 33, batch_size: int = 1, rank: int = 32, allow_fp8: bool = True) -> MemoryPlan:
    """The fastest of gradient checkpointing on/off x fp8 on/off x blocks_to_swap 0..max whose predicted
    device peak fits in `vram_gib` less the safety margin; with an explanation of each choice."""
    family, task = resolve_task(family, task)
    if vram_gib <= 0:
        raise PipelineError([Problem(f"GPU memory must be positive, got {vram_gib}", path="vram", fix="give GiB, e.g. 24")])
    if batch_size < 1 or frames < 1 or rank < 1:
        raise PipelineError([Problem("batch size, frames and rank must be at least 1", fix="e.g. --frames 33 --batch-size 1")])
    w, h = parse_resolution(resolution) if isinstance(resolution, str) else resolution
    if registry.family(family).output == "image":
        frames = 1  # an image family trains on single images
    dit, fit = dit_for(family, task), fitted()
    tokens = tokens_for(w, h, frames) * batch_size
    fam_facts = registry.family(family)
    edits = bool(fam_facts.task(task if fam_facts.tasks else None).get("control_dataset"))
    if edits:
        tokens *= 2  # the control image's latents join the sequence (one control at the target's size)
    limit = vram_gib - safety_margin(vram_gib)
    options = []
    for gc in (False, True):
        for fp8 in ((False, True) if allow_fp8 else (False,)):
            for swap in range(0, dit.max_blocks_to_swap + 1):
                o = _option(dit, Settings(gc, fp8, swap), tokens, rank, fit)
                o.fits = o.need_gib <= limit
                options.append(o)
                if o.fits:
                    break  # more swap only costs time
    fitting = [o for o in options if o.fits]
    if not fitting:
        least = min(options, key=lambda o: o.need_gib)
        raise PipelineError([Problem(
            f"{dit.title} at {w}x{h}, {frames} frames, batch {batch_size} needs about {least.need_gib:.1f} GiB even "
            f"with gradient checkpointing, fp8 and {dit.max_blocks_to_swap} swapped blocks; the plan allows {limit:.1f} GiB of "
            f"{vram_gib:g}", path="resolution",
            fix="lower the resolution or the frame count (the activations grow with both), or use a larger GPU")])
    best = min(fitting, key=lambda o: (o.seconds_per_step, o.settings.fp8, o.settings.blocks_to_swap))
    train, why = _fields(dit, family, best, options, tokens, batch_size, rank, limit, fit)
    cache, cache_why = _cache_fields(family, vram_gib)
    why.update(cache_why)
    if not fam_facts.memory.get("measured"):
        why["estimate"] = (f"nothing was measured for {fam_facts.title}; the figures scale the runs measured on "
                           f"{_measured()[0].title} by its exact parameter counts"
                           + (", with the control image's tokens counted as a second image" if edits else ""))
    return MemoryPlan(family, task, vram_gib, limit, tokens, batch_size, best, train, cache, why,
                      sorted(fitting, key=lambda o: o.seconds_per_step)[:5])


def _fields(dit, family, best: Option, options, tokens, batch_size, rank, limit, fit: Fit):
    s = best.settings
    train: dict = {}
    why: dict[str, str] = {}

    def option_with(**change) -> Option:
        alt = Settings(**{**s.__dict__, **change})
        return next((o for o in options if o.settings == alt), None) or _option(dit, alt, tokens, rank, fit)

    if s.gradient_checkpointing:
        train["gradient_checkpointing"] = True
        off = option_with(gradient_checkpointing=False, blocks_to_swap=0)
        why["gradient_checkpointing"] = (
            f"on: without it the activations alone make the run need about {off.need_gib:.0f} GiB, more than "
            f"{limit:.1f}; it costs ~{(fit.checkpointing_factor - 1):.0%} more time per step (measured, runs a/d)")
    else:
        on = option_with(gradient_checkpointing=True)
        why["gradient_checkpointing"] = (
            f"off: the run fits without it ({best.need_gib:.1f} GiB of {limit:.1f}) and trains "
            f"{fit.checkpointing_factor:.2f}x faster than with it ({on.need_gib:.1f} GiB); measured on an H100: "
            f"{measured_runs()['d'][4]} vs {measured_runs()['a'][4]} s/it for {_reference('a').title}")
    if s.fp8:
        plain = [o for o in options if o.fits and not o.settings.fp8]
        versus = (f"{best.seconds_per_step:.2f} s/step, faster than the best setting without fp8 "
                  f"({min(o.seconds_per_step for o in plain):.2f} s/step)" if plain else "nothing fits without it")
        train["fp8_base"] = True
        if dit.fp8_scaled:
            train["fp8_scaled"] = True
        why["fp8_base"] = (f"on{' with fp8_scaled' if dit.fp8_scaled else ''}: block weights in one byte save "
                           f"{(_weight_bytes(dit, Settings(False, False, 0))[0] - _weight_bytes(dit, Settings(False, True, 0))[0]) / GIB:.1f} GiB "
                           f"for ~{fit.fp8_factor - 1:.0%} more time per step (runs a/b); {versus}; "
                           "fp8 can lower quality a little")
    else:
        why["fp8_base"] = "off: not needed to fit, and full-precision weights keep quality"
    if s.blocks_to_swap:
        train["blocks_to_swap"] = s.blocks_to_swap
        fewer = option_with(blocks_to_swap=s.blocks_to_swap - 1)
        why["blocks_to_swap"] = (
            f"{s.blocks_to_swap}: the fewest blocks in CPU memory that fit (with {s.blocks_to_swap - 1} the run would need "
            f"{fewer.need_gib:.1f} GiB); each swapped block costs time moving weights over PCIe (runs c, big_swap: "
            f"20 of 40 blocks made Wan 14B 1.9x slower); needs about "
            f"{_weight_bytes(dit, s)[1] / GIB:.1f} GiB of free CPU RAM")
    else:
        why["blocks_to_swap"] = "0: every block stays on the GPU (block swap only costs time when the run fits without it)"
    if batch_size > 1:
        train["split_attn"] = True
        why["split_attn"] = ("on: with batch size > 1, attention runs one sample at a time; FramePack's docs say sdpa "
                             "and xformers fail without it there, and it saves a little memory elsewhere")
    else:
        why["split_attn"] = "off: batch size 1 gains nothing from split attention, which is slightly slower"
    task = registry.family(dit.family).task(dit.task if dit.task in registry.family(dit.family).tasks else None)
    if task.get("experts"):
        why["note"] = f"{task.title}: planned for one expert per run (its DiT with its timestep range)"
    return train, why


def _cache_fields(family: str, vram: float) -> tuple[dict, dict]:
    """VAE options for the latent-caching stage: the family's first [[memory.cache]] rule whose
    below_gib the GPU is under (not measured: thresholds follow musubi's docs)."""
    for rule in registry.family(family).memory.get("cache", []):
        if vram < rule.get("below_gib", float("inf")):
            return dict(rule["set"]), dict(rule["why"])
    return {}, {}


def predict(family: str, task: str, settings: Settings, tokens: int = MEASURED_TOKENS, rank: int = MEASURED_RANK) -> Option:
    """The model's prediction for one setting (for tests and for showing alternatives)."""
    family, task = resolve_task(family, task)
    return _option(dit_for(family, task), settings, tokens, rank, fitted(), fits=True)
