"""Inspect a musubi dataset as musubi will see it: items, captions, unreadable media, buckets,
frame windows and cache files per family. Reimplements musubi's rules (dataset/bucket.py,
image_video_dataset.py, datasources.py at 30c658c) without importing musubi or torch."""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..dsl.dataset import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, round_target_frames
from ..errors import PipelineError, Problem
from .video import fps_resample_indices

RESOLUTION_STEPS = 16  # bucket sizes are multiples of 16 for HV, Wan and FramePack
DEFAULTS = {"resolution": (960, 544), "caption_extension": None, "batch_size": 1, "num_repeats": 1,
            "enable_bucket": False, "bucket_no_upscale": False}
VIDEO_DEFAULTS = {"target_frames": [1], "frame_extraction": "head", "frame_stride": 1, "frame_sample": 1,
                  "max_frames": 129, "source_fps": None, "fp_latent_window_size": 9}


def family_suffix(family: str | None) -> tuple[str, float]:
    """musubi's architecture suffix for cache files and its target fps for source_fps."""
    from ..pipelines import registry

    try:
        fam = registry.family(family or registry.default_family())
    except registry.UnknownFamily as exc:
        raise ValueError(str(exc)) from None
    return fam.short, float(fam.target_fps)


# ---- musubi's rules, reimplemented -------------------------------------------------------

def _down(n: int, step: int) -> int:
    return n - n % step


def bucket_resolutions(resolution: tuple[int, int], step: int = RESOLUTION_STEPS) -> list[tuple[int, int]]:
    """The bucket sizes musubi makes for a resolution: widths from half the square side up to the
    side, each paired with the height that keeps the area, in both orientations, sorted."""
    area = resolution[0] * resolution[1]
    side = int(math.sqrt(area))
    sizes = set()
    for w in range(_down(side // 2, step), side + step, step):
        h = _down(area // w, step)
        sizes.update({(w, h), (h, w)})
    return sorted(sizes)


def bucket_for(size: tuple[int, int], resolution: tuple[int, int], enable_bucket: bool, no_upscale: bool,
               step: int = RESOLUTION_STEPS) -> tuple[int, int]:
    """The (width, height) an item of `size` is resized and cropped to."""
    if not enable_bucket:
        return tuple(resolution)
    area = resolution[0] * resolution[1]
    if no_upscale and size[0] * size[1] <= area:
        return _down(size[0], step), _down(size[1], step)
    buckets = bucket_resolutions(resolution, step)
    aspect = size[0] / size[1]
    # first bucket with the smallest aspect-ratio error, as numpy's argmin picks it
    return min(buckets, key=lambda b: abs(b[0] / b[1] - aspect))


def frames_loaded(n_source: int, start: int | None, end: int | None, source_fps: float | None,
                  target_fps: float | None) -> int:
    """How many frames musubi's video loader returns for a video of n_source frames."""
    if source_fps is None or target_fps is None:
        lo, hi = start or 0, n_source if end is None else min(end, n_source)
        return max(0, hi - lo)
    kept = fps_resample_indices(n_source, source_fps, target_fps)
    return sum(1 for _, index in kept if (start is None or index >= start) and (end is None or index < end))


def frame_windows(frame_count: int, target_frames: list[int], extraction: str, stride: int, sample: int,
                  max_frames: int) -> list[tuple[int, int]]:
    """(start, length) of each clip musubi cuts from a video of frame_count loaded frames."""
    out: list[tuple[int, int]] = []
    if extraction == "head":
        out = [(0, t) for t in target_frames if frame_count >= t]
    elif extraction == "chunk":
        out = [(i, t) for t in target_frames for i in range(0, frame_count, t) if i + t <= frame_count]
    elif extraction == "slide":
        out = [(i, t) for t in target_frames if frame_count >= t for i in range(0, frame_count - t + 1, stride)]
    elif extraction == "uniform":
        for t in target_frames:
            if frame_count >= t:
                span = frame_count - t
                # numpy.linspace(0, span, sample, dtype=int): k * step truncated, the last one exact
                step = span / (sample - 1) if sample > 1 else 0.0
                starts = [int(k * step) for k in range(sample - 1)] + [span] if sample > 1 else [0]
                out += [(s, t) for s in starts]
    elif extraction == "full":
        out = [(0, round_target_frames([min(frame_count, max_frames)])[0])]
    return out


def framepack_sections(frames: int, window: int) -> int:
    latent_f = (frames - 1) // 4 + 1
    return max(1, (latent_f - 1) // window)


# ---- report --------------------------------------------------------------------------------

@dataclass
class Item:
    path: str
    kind: str  # "image" or "video"
    caption: str | None = None  # None: no caption file / entry
    caption_path: str = ""
    size: tuple[int, int] | None = None  # original (width, height)
    bucket: tuple[int, int] | None = None
    frames: int | None = None  # frames in the file
    fps: float | None = None
    frames_loaded: int | None = None  # after source_fps conversion and head limit
    windows: list[tuple[int, int]] = field(default_factory=list)
    skipped: str = ""  # why musubi will not use it
    error: str = ""  # unreadable media
    flags: list[str] = field(default_factory=list)  # short, for contact sheets

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "", [])}


@dataclass
class CacheStatus:
    directory: str
    suffix: str
    present: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # older than their media or caption
    orphans: list[str] = field(default_factory=list)  # musubi's caching deletes these without --keep_cache

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DatasetReport:
    index: int
    kind: str
    source: str  # the folder or JSONL file
    settings: dict[str, Any]
    items: list[Item] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    cache: CacheStatus | None = None

    @property
    def used(self) -> list[Item]:
        return [i for i in self.items if not i.skipped and not i.error]

    def buckets(self) -> Counter:
        if self.kind == "image":
            return Counter(i.bucket for i in self.used if i.bucket)
        return Counter((*i.bucket, n) for i in self.used if i.bucket for _, n in i.windows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "kind": self.kind, "source": self.source, "settings": self.settings,
            "items": [i.to_dict() for i in self.items],
            "summary": self.summary(),
            "problems": [p.__dict__ for p in self.problems],
            "cache": self.cache.to_dict() if self.cache else None,
        }

    def summary(self) -> dict[str, Any]:
        s = {
            "items": len(self.items), "used": len(self.used),
            "no_caption": sum(1 for i in self.items if i.caption is None),
            "empty_caption": sum(1 for i in self.items if i.caption is not None and not i.caption.strip()),
            "unreadable": sum(1 for i in self.items if "unreadable" in i.flags or "missing file" in i.flags),
            "buckets": {"x".join(map(str, k)): v for k, v in sorted(self.buckets().items())},
        }
        if self.kind == "video":
            s["clips"] = sum(len(i.windows) for i in self.used)
            s["too_short"] = sum(1 for i in self.used if not i.windows)
        s["repeats"] = self.settings["num_repeats"]
        return s


@dataclass
class InspectionReport:
    family: str
    suffix: str
    file: str
    datasets: list[DatasetReport]
    problems: list[Problem] = field(default_factory=list)

    def all_problems(self) -> list[Problem]:
        return self.problems + [p for d in self.datasets for p in d.problems]

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "suffix": self.suffix, "file": self.file,
                "problems": [p.__dict__ for p in self.problems], "datasets": [d.to_dict() for d in self.datasets]}

    def format(self, max_list: int = 10) -> str:
        lines = [f"dataset config {self.file or '(in memory)'}, family {self.family} (cache suffix _{self.suffix})"]
        for p in self.problems:
            lines.append(f"  {p}")
        for d in self.datasets:
            s = d.summary()
            st = d.settings
            lines.append(f"[{d.index}] {d.kind} dataset {d.source}")
            lines.append(f"    resolution {st['resolution'][0]}x{st['resolution'][1]}, bucketing "
                         f"{'on' if st['enable_bucket'] else 'off'}, repeats {st['num_repeats']}, batch {st['batch_size']}")
            lines.append(f"    {s['items']} found, {s['used']} used, {s['no_caption']} without caption, "
                         f"{s['empty_caption']} empty captions, {s['unreadable']} unreadable")
            if d.kind == "video":
                lines.append(f"    frames: {st['frame_extraction']} of {st['target_frames']}"
                             + (f", source_fps {st['source_fps']} -> {st['target_fps']}" if st['source_fps'] else "")
                             + f": {s['clips']} clips, {s['too_short']} videos too short")
            if s["buckets"]:
                lines.append("    buckets: " + ", ".join(f"{k} x{v}" for k, v in s["buckets"].items()))
            for item in d.items:
                note = item.error or item.skipped or ", ".join(item.flags)
                if note:
                    lines.append(f"    - {Path(item.path).name}: {note}")
            if d.cache:
                c = d.cache
                lines.append(f"    cache {c.directory}: {len(c.present)} present, {len(c.missing)} missing, "
                             f"{len(c.stale)} stale, {len(c.orphans)} orphans (deleted by caching without --keep_cache)")
                for label, names in (("missing", c.missing), ("stale", c.stale), ("orphan", c.orphans)):
                    for name in names[:max_list]:
                        lines.append(f"      {label}: {name}")
                    if len(names) > max_list:
                        lines.append(f"      ... {len(names) - max_list} more {label}")
            for p in d.problems:
                lines.append(f"    {p.severity}: {p.path}: {p.message}" + (f"\n      fix: {p.fix}" if p.fix else ""))
        return "\n".join(lines)


# ---- loading the config --------------------------------------------------------------------

def load_config(source: Any) -> tuple[dict[str, Any], str, list[Problem]]:
    """(musubi-shaped dict with folders made absolute, file name, musubi's later checks as
    Problems) from a TOML/JSON path, a dict or a DatasetConfig. Relative folders are taken
    against the config file's folder (the current folder for a dict)."""
    from ..dsl.dataset import DatasetConfig

    file, base = "", Path.cwd()
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise PipelineError([Problem("dataset config file not found", file=str(path), fix="check the path")])
        file, base = str(path), path.resolve().parent
        from ..dsl.limits import read_document

        text = read_document(path, "dataset config")  # a regular file of bounded size, or a clear refusal
        if _is_pipeline(path, text):
            return _pipeline_dataset(path)
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                from ..files import tomllib

                data = tomllib.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            raise PipelineError([Problem(f"cannot parse: {exc}", file=file, fix="fix the syntax")]) from None
        if not isinstance(data, dict) or not isinstance(data.get("datasets"), list):
            raise PipelineError([Problem("no [[datasets]] found (neither a musubi dataset config nor a pipeline with one)",
                                         file=file, fix="give a dataset TOML with [[datasets]] tables")])
    elif isinstance(source, DatasetConfig):
        data = source.to_musubi_dict()
    elif isinstance(source, dict):
        data = source
    else:
        raise TypeError(f"expected a path, dict or DatasetConfig, got {type(source).__name__}")
    try:
        config = DatasetConfig.model_validate(data)
    except Exception as exc:  # pydantic.ValidationError
        problems = []
        for e in getattr(exc, "errors", lambda: [])():
            loc = ".".join(str(x) for x in e.get("loc", ()) if not str(x).endswith("Dataset"))
            problems.append(Problem(e.get("msg", str(exc)), path=loc, file=file, fix=_fix_for(e)))
        raise PipelineError(problems or [Problem(str(exc), file=file)]) from None
    problems = [Problem(msg.removeprefix("warning: "), path=where, file=file, fix=fix,
                        severity="warning" if msg.startswith("warning:") else "error")
                for where, msg, fix in config.problems()]
    return config.with_paths_resolved(base).to_musubi_dict(), file, problems


def _is_pipeline(path: Path, text: str) -> bool:
    """A musubi-pipe pipeline document (rather than a musubi dataset config)."""
    if path.suffix.lower() in (".yaml", ".yml"):
        return True
    if path.suffix.lower() == ".json":
        return False
    from ..files import tomllib

    try:
        data = tomllib.loads(text)
    except (ValueError, RecursionError):
        return False  # reported as a dataset config's syntax error
    return "datasets" not in data and ("stages" in data or "family" in data or "dataset" in data)


def _pipeline_dataset(path: Path) -> tuple[dict[str, Any], str, list[Problem]]:
    """The dataset of a pipeline file, read by the pipeline language itself ({{ vars }} and all)."""
    from ..dsl.dataset import DatasetConfig
    from ..dsl.load import load_pipeline

    pipeline, source = load_pipeline(path)
    if pipeline.dataset is None:
        raise PipelineError([Problem("the pipeline has no dataset", path="dataset", file=str(path),
                                     fix="add a [dataset] table or dataset = \"path/to/dataset.toml\"")])
    if isinstance(pipeline.dataset, str):
        target = Path(pipeline.dataset)
        return load_config(target if target.is_absolute() else source.folder / target)
    config: DatasetConfig = pipeline.dataset
    problems = [Problem(msg.removeprefix("warning: "), path=f"dataset.{where}", file=str(path), fix=fix,
                        severity="warning" if msg.startswith("warning:") else "error")
                for where, msg, fix in config.problems()]
    return config.with_paths_resolved(source.folder).to_musubi_dict(), str(path), problems


def _fix_for(error: dict) -> str:
    if error.get("type") == "extra_forbidden":
        return "remove this key: musubi rejects unknown keys (cache_directory belongs in a [[datasets]] table)"
    return ""


# ---- inspection ----------------------------------------------------------------------------

def inspect_dataset(source: Any, family: str | None = None, read_media: bool = True, check_cache: bool = True) -> InspectionReport:
    """Inspect every dataset of a config as musubi's caching and training for `family` will see it.
    Bad media never raises: each item carries its error; config errors raise PipelineError."""
    from ..pipelines import registry

    family = family or registry.default_family()
    suffix, target_fps = family_suffix(family)
    data, file, problems = load_config(source)
    general = {**DEFAULTS, **(data.get("general") or {})}
    reports = []
    for index, entry in enumerate(data.get("datasets", [])):
        settings = {k: entry.get(k, general[k]) for k in DEFAULTS}
        if isinstance(settings["resolution"], int):
            settings["resolution"] = (settings["resolution"], settings["resolution"])
        settings["resolution"] = tuple(settings["resolution"])
        if not settings["enable_bucket"]:
            settings["bucket_no_upscale"] = False
        is_video = "video_directory" in entry or "video_jsonl_file" in entry
        if is_video:
            for k, v in VIDEO_DEFAULTS.items():
                settings[k] = entry.get(k, v)
            settings["target_frames"] = round_target_frames(settings["target_frames"])
            settings["target_fps"] = target_fps
            if settings["frame_extraction"] == "uniform" and settings["frame_sample"] == 1:
                settings["frame_extraction"] = "head"  # musubi switches with a warning
        jsonl = entry.get("video_jsonl_file" if is_video else "image_jsonl_file")
        folder = entry.get("video_directory" if is_video else "image_directory")
        cache_dir = entry.get("cache_directory") or folder
        report = DatasetReport(index, "video" if is_video else "image", folder or jsonl or "", settings)
        report.problems = [p for p in problems if p.path.startswith(f"datasets[{index}]")]
        where = f"datasets[{index}]"
        if folder:
            _list_folder(report, Path(folder), is_video, settings["caption_extension"], where, file)
        elif jsonl:
            _list_jsonl(report, Path(jsonl), is_video, where, file)
        if read_media:
            for item in report.items:
                if not item.skipped:
                    _read_item(item, settings, suffix, target_fps)
        if check_cache and cache_dir:
            report.cache = _cache_status(report, Path(cache_dir), suffix, is_video, read_media,
                                         settings.get("fp_latent_window_size", 9), Path(jsonl) if jsonl else None)
        _name_collisions(report, where, file)
        reports.append(report)
    top = [p for p in problems if not p.path.startswith("datasets[")]
    return InspectionReport(family, suffix, file, reports, top)


def _has_ext(name: str, exts: tuple[str, ...]) -> bool:
    # musubi globs each extension in lower and in upper case only (".Png" is not found)
    ext = os.path.splitext(name)[1]
    return ext in exts or ext in tuple(e.upper() for e in exts)


def frame_files(folder: Path) -> list[Path]:
    """The frames of a folder-of-frames video, as musubi lists them: its images, sorted by name."""
    return sorted(p for p in folder.iterdir() if _has_ext(p.name, IMAGE_EXTENSIONS))


def _list_folder(report: DatasetReport, folder: Path, is_video: bool, caption_ext: str | None, where: str, file: str):
    key = "video_directory" if is_video else "image_directory"
    if not folder.is_dir():
        report.problems.append(Problem(f"folder not found: {folder}", path=f"{where}.{key}", file=file,
                                       fix="create it or correct the path (relative paths are from the config file's folder)"))
        return
    if not caption_ext:
        report.problems.append(Problem("caption_extension is not set, so musubi cannot read any caption "
                                       "(it opens an empty file name)", path=f"{where}.caption_extension", file=file,
                                       fix='set caption_extension = ".txt" in [general] or in this dataset'))
    names = sorted(n for n in os.listdir(folder) if _has_ext(n, VIDEO_EXTENSIONS if is_video else IMAGE_EXTENSIONS)
                   and (folder / n).is_file())
    kind = "video" if is_video else "image"
    for name in names:
        path = folder / name
        item = Item(str(path), kind)
        if caption_ext:
            cap = path.with_name(path.stem + caption_ext)
            item.caption_path = str(cap)
            if cap.is_file():
                try:
                    item.caption = cap.read_text(encoding="utf-8").strip()
                except (UnicodeDecodeError, OSError) as exc:
                    item.error = f"caption {cap.name} cannot be read as UTF-8 text ({exc.__class__.__name__})"
        if item.caption is None:
            item.flags.append("no caption")
            missing = f"no caption file {Path(item.caption_path).name or '(caption_extension unset)'}"
            if is_video:
                item.error = item.error or f"{missing}: musubi's caching stops with FileNotFoundError"
            else:
                item.skipped = f"{missing}: musubi skips this image"
        elif not item.caption:
            item.flags.append("empty caption")
        report.items.append(item)
    if not names:
        report.problems.append(Problem(f"no {kind}s found in {folder} (extensions: {', '.join(VIDEO_EXTENSIONS if is_video else IMAGE_EXTENSIONS)})",
                                       path=f"{where}.{key}", file=file, severity="warning", fix="check the folder"))


def _list_jsonl(report: DatasetReport, jsonl: Path, is_video: bool, where: str, file: str):
    key = "video_jsonl_file" if is_video else "image_jsonl_file"
    media_key = "video_path" if is_video else "image_path"
    if not jsonl.is_file():
        report.problems.append(Problem(f"JSONL file not found: {jsonl}", path=f"{where}.{key}", file=file, fix="correct the path"))
        return
    for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            report.problems.append(Problem(f"line {number} is not JSON ({exc.msg}); musubi stops here", path=key,
                                           file=str(jsonl), line=number, fix="fix or remove the line"))
            continue
        media = None
        if isinstance(entry, dict):  # musubi reads image_path_0 where an image line has no image_path
            media = entry.get(media_key) or (None if is_video else entry.get("image_path_0"))
        if not media:
            report.problems.append(Problem(f"line {number} has no {media_key!r}", path=key, file=str(jsonl), line=number,
                                           fix=f'write {{"{media_key}": "...", "caption": "..."}}'))
            continue
        # a relative path is opened from musubi's working folder, as musubi does
        item = Item(str(Path(media)), "video" if is_video else "image", caption=entry.get("caption"), caption_path=f"{jsonl.name}:{number}")
        if item.caption is None:
            item.flags.append("no caption")
            item.error = f'line {number} has no "caption": musubi stops with KeyError'
        elif not str(item.caption).strip():
            item.flags.append("empty caption")
        report.items.append(item)


def _read_item(item: Item, settings: dict, suffix: str, target_fps: float) -> None:
    path = Path(item.path)
    if not path.exists():
        item.error = item.error or "file not found"
        item.flags.append("missing file")
        return
    if item.kind == "image":
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im.load()  # decode fully: truncated files fail here, as they would in musubi
                item.size = im.size
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            item.error = f"unreadable image ({str(exc).splitlines()[0][:160] or type(exc).__name__}); musubi's latent caching stops on it"
            item.flags.append("unreadable")
            return
        item.bucket = bucket_for(item.size, settings["resolution"], settings["enable_bucket"], settings["bucket_no_upscale"])
        return
    from .video import MediaError, probe

    if path.is_dir():
        # a folder of frames (video_jsonl_file allows it)
        frames = frame_files(path)
        if not frames:
            item.error = "frame folder holds no images"
            item.flags.append("unreadable")
            return
        from PIL import Image

        try:
            with Image.open(frames[0]) as im:
                item.size = im.size
        except OSError as exc:
            item.error = f"first frame unreadable ({exc})"
            item.flags.append("unreadable")
            return
        item.frames = len(frames)
    else:
        try:
            info = probe(path)
        except MediaError as exc:
            item.error = exc.message
            item.flags.append("unreadable")
            return
        item.size, item.frames, item.fps = (info.width, info.height), info.frames, info.fps
        if info.truncated:
            item.flags.append(f"truncated ({info.frames}/{info.declared_frames} frames)")
    # musubi caches video latents with bucketing always on, whatever enable_bucket says
    item.bucket = bucket_for(item.size, settings["resolution"], True, False)
    end = max(settings["target_frames"]) if settings["frame_extraction"] == "head" else None
    src = settings["source_fps"]
    item.frames_loaded = frames_loaded(item.frames, 0 if end else None, end, src, target_fps if src else None)
    item.windows = frame_windows(item.frames_loaded, settings["target_frames"], settings["frame_extraction"],
                                 settings["frame_stride"], settings["frame_sample"], settings["max_frames"])
    if not item.windows:
        item.flags.append(f"too short: {item.frames_loaded} frames < {min(settings['target_frames'])}")
        item.skipped = f"too short for target_frames {settings['target_frames']} ({item.frames_loaded} frames): no clip is cut"


def _expected_cache(item: Item, suffix: str, window: int) -> tuple[list[str], str]:
    from ..pipelines import registry

    sections = registry.by_short_name(suffix).rule("cache_sections", False)
    stem = Path(item.path).stem
    te = f"{stem}_{suffix}_te.safetensors"
    if item.size is None:
        return [], te
    if item.kind == "image":
        w, h = item.size
        return [f"{stem}_{w:04d}x{h:04d}_{suffix}.safetensors"], te
    # musubi resizes video frames to the bucket while loading them, so a video's latent file is
    # named by its bucket size, not by the size of the file (checked against musubi's VideoDataset)
    w, h = item.bucket
    names = []
    for start, n in item.windows:
        if sections:  # FramePack: one file per section
            names += [f"{stem}_{start:05d}-{n:03d}-{s:04d}_{w:04d}x{h:04d}_{suffix}.safetensors"
                      for s in range(framepack_sections(n, window))]
        else:
            names.append(f"{stem}_{start:05d}-{n:03d}_{w:04d}x{h:04d}_{suffix}.safetensors")
    return names, te


def _cache_status(report: DatasetReport, cache_dir: Path, suffix: str, is_video: bool, read_media: bool,
                  window: int, jsonl: Path | None) -> CacheStatus:
    status = CacheStatus(str(cache_dir), suffix)
    existing = {}
    if cache_dir.is_dir():
        for name in os.listdir(cache_dir):
            if name.endswith(f"_{suffix}.safetensors") or name.endswith(f"_{suffix}_te.safetensors"):
                existing[name] = (cache_dir / name).stat().st_mtime
    expected: set[str] = set()
    unknown_stems: set[str] = set()  # items of unknown size: their latent names cannot be known
    for item in report.items:
        if item.kind == "image" and item.skipped:
            continue  # musubi never lists an image without a caption
        # the text-encoder cache covers every listed item, even videos too short for a clip
        latents, te = _expected_cache(item, suffix, window)
        if item.size is None:
            unknown_stems.add(Path(item.path).stem)
        media_time = _mtime(item.path)
        for name in latents:
            expected.add(name)
            _classify(status, name, existing, media_time)
        expected.add(te)
        _classify(status, te, existing, _mtime(jsonl) if jsonl else _mtime(item.caption_path))
    for name in sorted(existing):
        if name in expected or any(name.startswith(s + "_") for s in unknown_stems):
            continue
        if not name.endswith("_te.safetensors") and not read_media:
            continue  # latent names need the media sizes
        status.orphans.append(name)
    status.missing.sort(), status.present.sort(), status.stale.sort()
    return status


def _classify(status: CacheStatus, name: str, existing: dict, source_time: float | None) -> None:
    if name not in existing:
        status.missing.append(name)
        return
    status.present.append(name)
    if source_time is not None and existing[name] < source_time:
        status.stale.append(name)


def _mtime(path: Any) -> float | None:
    try:
        return os.stat(path).st_mtime if path else None
    except OSError:
        return None


def _name_collisions(report: DatasetReport, where: str, file: str) -> None:
    stems = Counter(Path(i.path).stem for i in report.items if not i.skipped)
    for stem, n in stems.items():
        if n > 1:
            report.problems.append(Problem(
                f"{n} files share the name {stem!r} with different extensions: they share one text-encoder cache "
                f"file ({stem}_*_te.safetensors), so one caption overwrites the other", path=where, file=file,
                severity="warning", fix="rename all but one of them"))
