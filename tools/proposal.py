"""`musubi-pipe new` and its ComfyUI node: look at a folder of clips or images and propose a
pipeline for it. Captions (which media lack one; stubs from file names on request), a dataset
(resolution and buckets from the media sizes, frame windows from the clips' lengths and frame
rates, by the family's frame rule), the model files found where people keep them (by the names
the registry says each family publishes), and the memory setting that fits the GPU.

Nothing here writes unless asked: `propose` only reads; `write_caption_stubs` and `write_new`
write files that do not exist yet, atomically, and never replace one."""
from __future__ import annotations

import os
import re
import statistics
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..dsl.dataset import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, round_target_frames
from ..errors import PipelineError, Problem
from ..pipelines import registry
from .dataset import _has_ext, bucket_for, frame_windows, frames_loaded

CAPTION_EXTENSION = ".txt"
# The training area a proposal aims for: musubi buckets every item to about this many pixels.
# Video: the memory planner's measured shape (832x480); images: a megapixel.
VIDEO_AREA = (832, 480)
IMAGE_AREA = (1024, 1024)
LONGEST_WINDOW = 81  # frames: about five seconds at 16 fps, the usual generation length
DEFAULT_GPU_GIB = 24.0  # planned for when no GPU is found and nobody says
MAX_MEDIA = 10_000  # a folder with more is refused: the proposal probes each file
MODEL_SEARCH_DEPTH = 3  # subfolders searched below each model folder (ComfyUI allows subfolders)
# Where ComfyUI usually lives when COMFYUI_DIR is not set (relative to the home folder).
COMFY_PLACES = ("ComfyUI", "comfy/ComfyUI", "ComfyUI_windows_portable/ComfyUI", "Documents/ComfyUI")
# ComfyUI's older names for some model folders (it still reads them).
COMFY_OLD_FOLDERS = {"diffusion_models": ("unet",), "text_encoders": ("clip",)}


@dataclass
class Media:
    path: Path
    kind: str  # "video" or "image"
    size: tuple[int, int] | None = None
    frames: int | None = None
    fps: float | None = None
    error: str = ""

    @property
    def caption_path(self) -> Path:
        return self.path.with_name(self.path.stem + CAPTION_EXTENSION)


@dataclass
class FoundModel:
    slot: str
    help: str
    folder: str  # ComfyUI's model folder for it
    names: tuple[str, ...]  # the file names it is published as
    download: str
    path: Path | None = None  # where it was found here
    hub: str = ""  # a Hugging Face model ID the slot accepts instead of a file
    also: tuple[str, ...] = ()  # other models published under the found file's name (check which one it is)


@dataclass
class Proposal:
    folder: Path
    family: registry.Family
    task: str | None
    media: list[Media]
    resolution: tuple[int, int]
    bucket_no_upscale: bool
    target_frames: list[int]
    frame_extraction: str
    source_fps: float | None
    models: list[FoundModel]
    searched: list[Path]
    gpu_gib: float
    gpu_source: str  # "detected", "given" or "default"
    memory: object | None  # tools.memory.MemoryPlan
    notes: list[str] = field(default_factory=list)

    @property
    def videos(self) -> list[Media]:
        return [m for m in self.media if m.kind == "video" and not m.error]

    @property
    def images(self) -> list[Media]:
        return [m for m in self.media if m.kind == "image" and not m.error]

    @property
    def uses_videos(self) -> bool:
        return self.family.output == "video" and bool(self.videos)

    @property
    def uses_images(self) -> bool:
        return bool(self.images)

    def missing_captions(self) -> list[Media]:
        return [m for m in self.used() if not m.caption_path.is_file()]

    def used(self) -> list[Media]:
        return (self.videos if self.uses_videos else []) + (self.images if self.uses_images else [])

    def buckets(self) -> Counter:
        """(width, height[, frames]) -> how many training samples musubi will cut into it."""
        found: Counter = Counter()
        for m in self.used():
            if m.kind == "image":
                found[bucket_for(m.size, self.resolution, True, self.bucket_no_upscale)] += 1
                continue
            bucket = bucket_for(m.size, self.resolution, True, False)  # musubi always buckets videos
            for _, n in self.windows(m):
                found[(*bucket, n)] += 1
        return found

    def windows(self, m: Media) -> list[tuple[int, int]]:
        """(start, length) of the clips musubi cuts from video `m` (as `dataset inspect` computes them)."""
        end = max(self.target_frames) if self.frame_extraction == "head" else None
        rate = self.family.target_fps if self.source_fps else None
        loaded = frames_loaded(m.frames or 0, 0 if end else None, end, self.source_fps, rate)
        return frame_windows(loaded, self.target_frames, self.frame_extraction, 1, 1, 129)

    # ---- the text report (the command's output and the ComfyUI node's text) ----

    def report(self, max_list: int = 10) -> str:
        fam = self.family
        task = f" {self.task}" if self.task else ""
        unreadable = [m for m in self.media if m.error]
        lines = [f"{self.folder}: {len(self.videos)} video(s), {len(self.images)} image(s)"
                 + (f", {len(unreadable)} unreadable" if unreadable else "") + f"; for {fam.title}{task}"]
        for m in unreadable[:max_list]:
            lines.append(f"  unreadable: {m.path.name}: {m.error}")
        missing = self.missing_captions()
        if missing:
            lines.append(f"captions: {len(missing)} of {len(self.used())} without a {CAPTION_EXTENSION} caption file "
                         "(musubi trains on the text of <name>.txt beside each file):")
            lines += [f"  {m.path.name} -> {m.caption_path.name}" for m in missing[:max_list]]
            if len(missing) > max_list:
                lines.append(f"  ... and {len(missing) - max_list} more")
            lines.append("  write one sentence per file describing it; stubs from the file names can be written on request")
        else:
            lines.append(f"captions: every file has its {CAPTION_EXTENSION} caption")
        lines.append(f"dataset: resolution {self.resolution[0]}x{self.resolution[1]} with aspect-ratio buckets"
                     + (", no upscaling" if self.bucket_no_upscale else ""))
        if self.uses_videos:
            fps = f", source_fps {self.source_fps:g} -> {fam.target_fps} fps" if self.source_fps else ""
            rule = fam.rule("frame_rule") or "4n+1"
            lines.append(f"  frames: target_frames {self.target_frames} ({rule}), {self.frame_extraction} extraction{fps}")
            lengths = sorted(m.frames for m in self.videos)
            span = f"{lengths[0]}" if lengths[0] == lengths[-1] else f"{lengths[0]}-{lengths[-1]}"
            lines.append(f"  clips: {span} frames at "
                         + ", ".join(f"{f:g}" for f in sorted({round(m.fps or 0, 2) for m in self.videos})) + " fps")
        buckets = self.buckets()
        if buckets:
            lines.append("  buckets: " + ", ".join(f"{'x'.join(map(str, k))} x{v}" for k, v in sorted(buckets.items())))
        lines += [f"  note: {n}" for n in self.notes]
        lines.append("models (searched: " + (", ".join(str(p) for p in self.searched) or "nowhere: no model folder found") + "):")
        for m in self.models:
            if m.path:
                lines.append(f"  {m.slot}: found {m.path}" + (f" (check it is this one: {', '.join(m.also)} "
                                                               "publish a file of the same name)" if m.also else ""))
            else:
                alt = f"; or leave the Hugging Face ID {m.hub}" if m.hub else ""
                lines.append(f"  {m.slot}: NOT FOUND: download {' or '.join(m.names)} from {m.download} into "
                             f"{Path(self.model_root()) / m.folder}/{alt}")
        lines.append(f"memory: planned for {self.gpu_gib:g} GiB ({self.gpu_source})")
        if self.memory is not None:
            lines += ["  " + line for line in self.memory.explain().splitlines()]
        return "\n".join(lines)

    # ---- the pipeline file ----

    def pipeline_toml(self, pipeline_path: Path) -> str:
        fam, base = self.family, pipeline_path.resolve().parent
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", self.folder.name)[:100].strip("-._") or "lora"  # the language's name rule
        folder = _rel(self.folder, base)
        out = [
            f"# A pipeline for {self.folder}, written by `musubi-pipe new`. Edit it freely; then",
            f"#   musubi-pipe validate {pipeline_path.name}   # every problem, with its fix",
            f"#   musubi-pipe plan {pipeline_path.name}       # the exact commands (missing model files are warnings)",
            f"#   musubi-pipe run {pipeline_path.name}        # train; the LoRA lands in musubi-out/{name}/",
            f"name = {_q(name)}   # output names and the folder musubi-out/<name>",
            f"family = {_q(fam.name)}   # {fam.title}; others: {', '.join(registry.family_names())}",
        ]
        if self.task:
            out.append(f"task = {_q(self.task)}   # {fam.task(self.task).title}; others: {', '.join(fam.task_names())}")
        out += ["", "# Model files, by the names their publishers use. A file not found here is given the path",
                "# to download it to (ComfyUI's model folders when ComfyUI was found): put it there or edit the path.",
                "[models]"]
        for m in self.models:
            out.append(f"# {m.help}: {' or '.join(m.names)} from {m.download}")
            if m.path and m.also:
                out.append(f"# CHECK: {m.path.name} is also the name of {', '.join(m.also)}")
            if m.path:
                value = str(m.path)
            elif m.hub:
                value = m.hub
            else:
                value = str(Path(self.model_root()) / m.folder / m.names[0])
            out.append(f"{m.slot} = {_q(value)}")
        out += ["", "# The dataset, in musubi's own dataset format (docs/dataset_config.md). Captions are the",
                f"# {CAPTION_EXTENSION} file beside each image or clip, same name.", "[dataset.general]",
                f"resolution = [{self.resolution[0]}, {self.resolution[1]}]   # training size: each item is "
                "resized to the bucket of its aspect ratio with about this area",
                f"caption_extension = {_q(CAPTION_EXTENSION)}", "batch_size = 1", "enable_bucket = true",
                f"bucket_no_upscale = {'true' if self.bucket_no_upscale else 'false'}   # true: small media are not enlarged"]
        both = self.uses_videos and self.uses_images
        if self.uses_videos:
            out += ["", "[[dataset.datasets]]", f"video_directory = {_q(folder)}",
                    f"cache_directory = {_q(folder + ('/cache/videos' if both else '/cache'))}   # latents and text-encoder outputs",
                    f"target_frames = {self.target_frames}   # clip lengths cut from each video "
                    f"({fam.rule('frame_rule') or '4n+1'}; longer = more memory)",
                    f"frame_extraction = {_q(self.frame_extraction)}   # head: from the start; chunk: every window in a row"]
            if self.source_fps:
                out.append(f"source_fps = {self.source_fps!r}   # the clips' frame rate: musubi drops frames to "
                           f"{fam.target_fps} fps")
            out += self._control(folder, "videos" if both else "")
        if self.uses_images:
            out += ["", "[[dataset.datasets]]", f"image_directory = {_q(folder)}",
                    f"cache_directory = {_q(folder + ('/cache/images' if both else '/cache'))}"]
            out += self._control(folder, "images" if both else "")
        train = ["", "# The steps: cache latents, cache text-encoder outputs, train the LoRA.",
                 "[stages.cache_latents]", 'kind = "cache_latents"', "", "[stages.cache_text]",
                 'kind = "cache_text_encoder"', "", "[stages.train]", 'kind = "train"',
                 f"gpu_memory_gib = {self.gpu_gib:g}   # picks gradient checkpointing, fp8 and block swap: "
                 "the fastest setting that fits (musubi-pipe plan-memory explains it)"]
        if fam.task(self.task).get("experts"):
            required = [s for s, mode in fam.stages["train"].models.items() if mode == "required"]
            experts = fam.experts.get("slots", {})
            mine = next((e for e, slot in experts.items() if slot in required), next(iter(experts), ""))
            others = ", ".join(f"{e} (models.{slot})" for e, slot in experts.items() if e != mine)
            train.append(f"expert = {_q(mine)}   # one expert per run; copy this stage for the other: {others}")
        if self.memory is not None:
            train += [f"#   {line}" for line in self.memory.explain().splitlines()[1:]]
        defaults = fam.stages["train"].defaults
        for key in ("max_train_epochs", "save_every_n_epochs", "network_dim", "learning_rate"):
            if key in defaults:
                train.append(f"# {key} = {defaults[key]!r}   # the family's default; uncomment to change")
        return "\n".join(out + train) + "\n"

    def _control(self, folder: str, sub: str) -> list[str]:
        """A dataset's control_directory line, for tasks that train on (control, target) pairs."""
        task = self.family.task(self.task)
        if not (task.get("control_dataset") is True or task.get("control")):
            return []
        return [f"control_directory = {_q(folder + '/control' + ('/' + sub if sub else ''))}   # the control "
                "(input) file of each target, same file name: put them there"]

    def model_root(self) -> str:
        """Where missing model files are expected: the first folder searched (ComfyUI's models
        folder when one was found), else ~/models."""
        return str(self.searched[0] if self.searched else Path.home() / "models")


def _templated(path: Path) -> bool:
    """A path a pipeline file would read as a {{ template }} (so it cannot be written into one)."""
    return any(mark in str(path) for mark in ("{{", "{%", "{#"))


def _q(text: str) -> str:
    """A TOML basic string."""
    import json

    return json.dumps(text, ensure_ascii=False)


def _rel(path: Path, base: Path) -> str:
    """`path` relative to the pipeline's folder when inside it (the pipeline moves with it), else absolute."""
    path = path.resolve()
    try:
        return path.relative_to(base).as_posix() or "."
    except ValueError:
        return str(path)


# ---- the folder -----------------------------------------------------------------------------

def scan(folder: Path) -> list[Media]:
    """The images and videos directly in `folder` (musubi does not look into subfolders), each
    probed for its size, and a video's frame count and rate. Unreadable files carry their error."""
    if not folder.is_dir():
        raise PipelineError([Problem(f"{folder}: not a folder", path="folder",
                                     fix="give the folder that holds your clips or images")])
    names = sorted(n for n in os.listdir(folder) if not n.startswith(".") and (folder / n).is_file()
                   and (_has_ext(n, VIDEO_EXTENSIONS) or _has_ext(n, IMAGE_EXTENSIONS)))
    if not names:
        raise PipelineError([Problem(
            f"{folder}: no images or videos here (musubi reads {', '.join(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)}, "
            "in lower or upper case, not in subfolders)", path="folder",
            fix="put your clips or images directly in this folder, or give the folder that holds them")])
    if len(names) > MAX_MEDIA:
        raise PipelineError([Problem(f"{folder}: {len(names)} media files, more than {MAX_MEDIA}", path="folder",
                                     fix="split the dataset into folders, or write its dataset config by hand")])
    found = []
    for n in names:
        m = Media(folder / n, "video" if _has_ext(n, VIDEO_EXTENSIONS) else "image")
        _probe(m)
        found.append(m)
    return found


def _probe(m: Media) -> None:
    if m.kind == "image":
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(m.path) as im:
                m.size = im.size
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            m.error = f"not a readable image ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})"
        return
    from .video import MediaError, probe

    try:
        info = probe(m.path)
    except MediaError as exc:
        m.error = exc.message
        return
    m.size, m.frames, m.fps = (info.width, info.height), info.frames, info.fps


def caption_from_name(path: Path) -> str:
    """A caption stub from a file name: 'red_car-driving_01.mp4' -> 'red car driving 01'."""
    words = re.sub(r"[_\-.]+", " ", path.stem).split()
    return " ".join(words) or path.stem


def write_new(path: Path, text: str) -> bool:
    """Write `text` to `path` atomically only if no file is there; False if one is (never replaced,
    even one that appears while writing: the final step is a hard link, which refuses to replace)."""
    path = Path(path)
    if path.exists():
        return False
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create, then the content
            try:
                with open(path, "xb") as f:
                    f.write(text.encode("utf-8"))
            except FileExistsError:
                return False
        return True
    finally:
        os.unlink(tmp)


def write_caption_stubs(media: list[Media]) -> list[Path]:
    """A caption file from the file name for each medium without one; existing files are kept."""
    written = []
    for m in media:
        if not m.error and write_new(m.caption_path, caption_from_name(m.path) + "\n"):
            written.append(m.caption_path)
    return written


# ---- the dataset ----------------------------------------------------------------------------

def _resolution(media: list[Media], area: tuple[int, int]) -> tuple[tuple[int, int], bool]:
    """(resolution, bucket_no_upscale): the target area in the media's usual orientation; media
    smaller than it keep their own size (rounded to musubi's 16-pixel grid) and are not enlarged."""
    landscape = sum(1 for m in media if m.size[0] > m.size[1])
    portrait = sum(1 for m in media if m.size[0] < m.size[1])
    side = int((area[0] * area[1]) ** 0.5) // 16 * 16
    if landscape > portrait and landscape >= len(media) / 2:
        target = (max(area), min(area))
    elif portrait > landscape and portrait >= len(media) / 2:
        target = (min(area), max(area))
    else:
        target = (side, side)
    typical = sorted(media, key=lambda m: m.size[0] * m.size[1])[len(media) // 2].size
    if typical[0] * typical[1] < target[0] * target[1]:
        return (max(64, typical[0] // 16 * 16), max(64, typical[1] // 16 * 16)), True
    return target, False


def _frames(fam: registry.Family, videos: list[Media]) -> tuple[list[int], str, float | None, list[str]]:
    """(target_frames, frame_extraction, source_fps, notes) from the clips' lengths and rates."""
    notes = []
    rates = {round(m.fps or 0, 3) for m in videos}
    source_fps = None
    if len(rates) == 1 and fam.target_fps and abs(next(iter(rates)) - fam.target_fps) > 0.5:
        source_fps = float(next(iter(rates)))
    elif len(rates) > 1 and fam.target_fps:
        notes.append(f"the clips have different frame rates ({', '.join(f'{r:g}' for r in sorted(rates))}); "
                     f"musubi reads every frame, so motion speed differs: convert them to {fam.target_fps} fps "
                     "or split the folder by rate (source_fps applies to a whole dataset)")
    loaded = sorted(frames_loaded(m.frames, None, None, source_fps, fam.target_fps if source_fps else None)
                    for m in videos)
    # the longest window every clip can give, on musubi's N*4+1 grid
    longest = round_target_frames([max(1, min(loaded[0], LONGEST_WINDOW))])[0]
    target = sorted({1, longest, *round_target_frames([max(1, longest // 2)])}) if longest > 1 else [1]
    extraction = "chunk" if statistics.median(loaded) >= 2 * longest and longest > 1 else "head"
    if loaded[0] < 5:
        notes.append(f"the shortest clip has {loaded[0]} frame(s) at the training rate, so windows are single "
                     "frames; remove very short clips to train on motion")
    return target, extraction, source_fps, notes


# ---- model files ----------------------------------------------------------------------------

def model_folders(environ: dict | None = None) -> list[Path]:
    """The folders searched for model files, in order: ComfyUI's models folder ($COMFYUI_DIR, the
    ComfyUI this pack is installed in, or a usual place), ~/models, and the local configuration's
    model_dirs."""
    env = os.environ if environ is None else environ
    home = Path(env.get("HOME") or Path.home())
    comfy = []
    if env.get("COMFYUI_DIR"):
        comfy.append(Path(env["COMFYUI_DIR"]).expanduser())
    here = Path(__file__).resolve().parents[2]  # <ComfyUI>/custom_nodes/<this pack>/tools/...
    if here.name == "custom_nodes":
        comfy.append(here.parent)
    comfy += [home / p for p in COMFY_PLACES]
    found = [c / "models" for c in comfy if (c / "models").is_dir()][:1]
    found += [p for p in [home / "models"] if p.is_dir()]
    try:
        from ..executors.musubi_env import load_config

        found += [p for p in load_config(env).model_dirs if p.is_dir()]
    except PipelineError:
        pass  # a broken config is `doctor`'s to report; the search goes on without it
    unique = []
    for p in found:
        if p.resolve() not in [u.resolve() for u in unique]:
            unique.append(p)
    return unique


def _find(names: tuple[str, ...], roots: list[Path], folder: str) -> Path | None:
    """The first file (or, for a Hugging Face snapshot, folder) with one of `names` in a root's
    ComfyUI folder for the slot (and its old name), then anywhere in the root, a few levels deep."""
    wanted = {n.lower(): n for n in names}
    for root in roots:
        places = [root / f for f in (folder, *COMFY_OLD_FOLDERS.get(folder, ()))] + [root]
        for place in places:
            hit = _search(place, wanted, MODEL_SEARCH_DEPTH)
            if hit is not None:
                return hit
    return None


def _search(folder: Path, wanted: dict[str, str], depth: int) -> Path | None:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return None
    for order in wanted:  # the registry's order: the preferred file first
        for e in entries:
            if e.name.lower() == order:
                return Path(e.path)
    if depth > 0:
        for e in entries:
            if e.is_dir(follow_symlinks=False) and not e.name.startswith(".") and not _templated(Path(e.name)):
                hit = _search(Path(e.path), wanted, depth - 1)
                if hit is not None:
                    return hit
    return None


def find_models(fam: registry.Family, task: str | None, roots: list[Path]) -> list[FoundModel]:
    """Each model slot training needs for `task`, found by its published names, or not."""
    found = []
    for slot in fam.needed_slots(task, ("cache_latents", "cache_text_encoder", "train")):
        spec = fam.models[slot]
        names, url = spec.published(task)
        hub = url.removeprefix("https://huggingface.co/") if spec.hub else ""
        path = _find(names, roots, spec.folder)
        found.append(FoundModel(slot, spec.help, spec.folder, names, url, path, hub if spec.hub_id(hub) else "",
                                _same_name(path.name, url) if path else ()))
    return found


def _same_name(name: str, download: str) -> tuple[str, ...]:
    """Other families' models published as `name` from another page: a generic name such as
    ae.safetensors may be a different model than the one wanted."""
    others = []
    for fam in registry.families():
        for slot in fam.models.values():
            for task in (*fam.tasks, None):
                names, url = slot.published(task)
                if name.lower() in (n.lower() for n in names) and url != download:
                    others.append(f"{fam.title} {slot.name}")
                    break
    return tuple(dict.fromkeys(others))


# ---- the GPU --------------------------------------------------------------------------------

def detect_gpu_gib() -> float | None:
    """The memory of the largest GPU here, in GiB; None without one (or without NVML)."""
    from .resources import gpu_report

    report = gpu_report()
    if not report.available or not report.gpus:
        return None
    return round(max(g.memory_total_mib for g in report.gpus) / 1024, 1)


# ---- the proposal ---------------------------------------------------------------------------

def resolve(family: str | None, task: str | None) -> tuple[registry.Family, str | None]:
    """The family (default: the registry's first) and task (default: the family's), or a clear refusal."""
    try:
        fam = registry.family(family or registry.default_family())
    except registry.UnknownFamily as exc:
        raise PipelineError([Problem(str(exc), path="family", fix=f"use one of: {', '.join(registry.family_names())}")]) from None
    if not fam.tasks:
        if task:
            raise PipelineError([Problem(f"{fam.title} has no tasks (got {task!r})", path="task", fix="leave out --task")])
        return fam, None
    name = fam.resolve_task(task)
    if name is None:
        raise PipelineError([Problem(f"{fam.title} has no task {task!r}", path="task",
                                     fix=f"use one of: {', '.join(fam.task_names())}")])
    if fam.task(name).get("multiple_target"):
        raise PipelineError([Problem(f"{fam.task(name).title} trains on several target images per item (its layers), "
                                     "which a plain folder is not", path="task",
                                     fix="choose another task, or name the targets <name>_0, <name>_1, ... and write the "
                                     "dataset by hand (musubi's docs/dataset_config.md, multiple_target)")])
    if fam.task(name).get("one_frame_only"):
        raise PipelineError([Problem(f"{fam.task(name).title} trains only as one-frame training, on a dataset of "
                                     "control and target images that a folder of clips is not", path="task",
                                     fix="choose another task, or write the one-frame dataset by hand (musubi's one-frame docs)")])
    return fam, name


def propose(folder: str | os.PathLike, family: str | None = None, task: str | None = None,
            gpu_gib: float | None = None, environ: dict | None = None) -> Proposal:
    """Look at `folder` and propose a pipeline for `family`/`task`. Reads only."""
    fam, task = resolve(family, task)
    folder = Path(folder).expanduser().resolve()
    if _templated(folder):
        raise PipelineError([Problem(f"{folder}: the path holds '{{{{', '{{%' or '{{#', which a pipeline file reads as a "
                                     "template", path="folder", fix="rename the folder")])
    media = scan(folder)
    readable = [m for m in media if not m.error]
    videos = [m for m in readable if m.kind == "video"]
    images = [m for m in readable if m.kind == "image"]
    notes = []
    if not readable:
        raise PipelineError([Problem(f"{folder}: none of the {len(media)} media files can be read "
                                     f"({media[0].path.name}: {media[0].error})", path="folder",
                                     fix="re-encode or replace the files")])
    if fam.output == "image" and not images:
        raise PipelineError([Problem(f"{folder}: only videos, and {fam.title} trains on images", path="family",
                                     fix="give a folder of images, or choose a video family: " + ", ".join(
                                         f.name for f in registry.families() if f.output == "video"))])
    if fam.output == "image" and videos:
        notes.append(f"{len(videos)} video(s) left out: {fam.title} trains on images")
    used = (videos if fam.output == "video" else []) + images
    resolution, no_upscale = _resolution(used, VIDEO_AREA if fam.output == "video" and videos else IMAGE_AREA)
    target, extraction, source_fps = [1], "head", None
    if fam.output == "video" and videos:
        target, extraction, source_fps, more = _frames(fam, videos)
        notes += more
    switches = fam.task(task).switches
    if switches.get("control_dataset") is True or switches.get("control"):
        notes.append(f"{fam.task(task).title} trains on pairs: put the control (input) image for each target "
                     f"image in {folder / 'control'}, with the same file name")
    elif switches.get("control_dataset"):
        notes.append(f"{fam.task(task).title} can also train with control media (control_directory in the dataset)")
    roots = [r for r in model_folders(environ) if not _templated(r)]  # paths a pipeline can name
    models = find_models(fam, task, roots)
    source = "given"
    if gpu_gib is None:
        gpu_gib, source = detect_gpu_gib(), "detected"
        if gpu_gib is None:
            gpu_gib, source = DEFAULT_GPU_GIB, "no GPU found here: give --gpu-gb N for yours"
    memory, target = _memory(fam, task, gpu_gib, resolution, target, notes)
    return Proposal(folder, fam, task, media, resolution, no_upscale, target, extraction, source_fps, models, roots,
                    gpu_gib, source, memory, notes)


def _memory(fam, task, gpu_gib, resolution, target, notes):
    """The memory planner's setting for the largest sample; windows too long for the GPU are dropped."""
    from .memory import plan_memory

    frames = list(target)
    while True:
        try:
            return plan_memory(fam.name, task, gpu_gib, resolution, max(frames)), frames
        except PipelineError as exc:
            if len(frames) == 1:
                notes.append(f"memory: {exc.problems[0].message}; {exc.problems[0].fix}")
                return None, frames
            notes.append(f"target_frames {max(frames)} left out: it does not fit {gpu_gib:g} GiB")
            frames = frames[:-1]
