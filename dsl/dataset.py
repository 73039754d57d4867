"""musubi-tuner's dataset config (its `[general]` and `[[datasets]]` TOML), reproduced exactly:
the same keys per section and dataset type, the same types, the checks musubi makes later."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, StrictBool, StrictInt, StrictStr, Tag, field_validator

FRAME_EXTRACTIONS = ("head", "chunk", "slide", "uniform", "full")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".avif")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".flv", ".wmv", ".m4v", ".mpg", ".mpeg")
# musubi maps these old image-dataset keys to new ones (with a warning) when it loads a file.
DEPRECATED_KEYS = {
    "flux_kontext_no_resize_control": "no_resize_control",
    "qwen_image_edit_no_resize_control": "no_resize_control",
    "qwen_image_edit_control_resolution": "control_resolution",
}
VAE_FRAME_STRIDE = 4  # target_frames are rounded down to N*4+1

Count = Annotated[StrictInt, Field(ge=1)]  # sizes, counts: musubi fails or makes nothing below 1
Resolution = Union[Count, tuple[Count, Count]]


def _strict_float(value: Any) -> Any:
    # voluptuous checks isinstance(value, float): 30 is rejected, 30.0 accepted.
    if isinstance(value, bool) or not isinstance(value, float):
        raise ValueError(f"expected a float such as {value!r}.0, got {value!r} (musubi rejects a whole number here)")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"expected a frame rate such as 30.0, got {value!r}")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The "ascendable" keys: allowed in [general] and in every dataset.
    resolution: Resolution | None = None
    caption_extension: StrictStr | None = None
    batch_size: Count | None = None
    num_repeats: Count | None = None
    enable_bucket: StrictBool | None = None
    bucket_no_upscale: StrictBool | None = None


class General(_Section):
    """`[general]`: only the ascendable keys (cache_directory is not allowed here)."""


class ImageDataset(_Section):
    image_directory: StrictStr | None = None
    image_jsonl_file: StrictStr | None = None
    cache_directory: StrictStr | None = None
    control_directory: StrictStr | None = None
    multiple_target: StrictBool | None = None
    fp_latent_window_size: Count | None = None
    fp_1f_clean_indices: list[Annotated[StrictInt, Field(ge=0)]] | None = None
    fp_1f_target_index: Annotated[StrictInt, Field(ge=0)] | None = None
    fp_1f_no_post: StrictBool | None = None
    no_resize_control: StrictBool | None = None
    control_resolution: Resolution | None = None

    @property
    def is_video(self) -> bool:
        return False

    @property
    def media_directory(self) -> str | None:
        return self.image_directory


class VideoDataset(_Section):
    video_directory: StrictStr | None = None
    video_jsonl_file: StrictStr | None = None
    control_directory: StrictStr | None = None
    cache_directory: StrictStr | None = None
    target_frames: list[StrictInt] | None = None
    frame_extraction: Literal["head", "chunk", "slide", "uniform", "full"] | None = None
    frame_stride: StrictInt | None = None
    frame_sample: StrictInt | None = None
    max_frames: StrictInt | None = None
    source_fps: float | None = None
    fp_latent_window_size: Count | None = None

    @field_validator("source_fps", mode="before")
    @classmethod
    def _source_fps_is_float(cls, value: Any) -> Any:
        return value if value is None else _strict_float(value)

    @property
    def is_video(self) -> bool:
        return True

    @property
    def media_directory(self) -> str | None:
        return self.video_directory


def _dataset_type(item: Any) -> str:
    # musubi's own rule: a dataset with video_directory or video_jsonl_file is a video dataset.
    keys = item if isinstance(item, dict) else vars(item)
    return "video" if "video_directory" in keys or "video_jsonl_file" in keys else "image"


def _upgrade_deprecated_keys(item: Any) -> Any:
    if isinstance(item, dict):
        return {DEPRECATED_KEYS.get(k, k): v for k, v in item.items()}
    return item


DatasetEntry = Annotated[
    Union[Annotated[VideoDataset, Tag("video")], Annotated[ImageDataset, Tag("image")]],
    Discriminator(_dataset_type),
    BeforeValidator(_upgrade_deprecated_keys),
]

PATH_KEYS = ("image_directory", "image_jsonl_file", "video_directory", "video_jsonl_file", "cache_directory", "control_directory")


def round_target_frames(frames: list[int]) -> list[int]:
    """What musubi does to target_frames: each rounded down to N*4+1, deduplicated, sorted."""
    return sorted({(f - 1) // VAE_FRAME_STRIDE * VAE_FRAME_STRIDE + 1 for f in frames})


class DatasetConfig(BaseModel):
    """A whole musubi dataset config. Video datasets are those with video_directory or
    video_jsonl_file, exactly as musubi decides."""

    model_config = ConfigDict(extra="forbid")

    general: General = General()
    datasets: list[DatasetEntry] = []

    def cache_directory(self, index: int) -> str | None:
        """The folder musubi writes this dataset's caches to (defaults to its media folder)."""
        d = self.datasets[index]
        return d.cache_directory or d.media_directory

    def problems(self) -> list[tuple[str, str, str]]:
        """musubi's later checks, as (field path, message, fix); warnings start with 'warning:'."""
        found: list[tuple[str, str, str]] = []
        if not self.datasets:
            found.append(("datasets", "the dataset config has no [[datasets]]", "add at least one [[datasets]] table with image_directory or video_directory"))
        caches: dict[str, int] = {}
        for i, d in enumerate(self.datasets):
            where = f"datasets[{i}]"
            jsonl = d.video_jsonl_file if d.is_video else d.image_jsonl_file
            if d.media_directory is None and jsonl is None:
                key = "video_directory" if d.is_video else "image_directory"
                found.append((where, "a dataset needs a media folder or a JSONL file", f"set {key} (or {key.replace('directory', 'jsonl_file')})"))
            if jsonl is not None and d.cache_directory is None:
                found.append((f"{where}.cache_directory", "cache_directory is required for a JSONL dataset (musubi asserts it)", "set cache_directory to a folder of its own"))
            cache = self.cache_directory(i)
            if cache is not None:
                key = os.path.normcase(os.path.normpath(cache))
                if key in caches:
                    found.append((f"{where}.cache_directory", f"cache directory {cache!r} is also used by datasets[{caches[key]}]; musubi needs one per dataset (it defaults to the media folder)", "give each dataset its own cache_directory"))
                caches.setdefault(key, i)
            if d.is_video:
                if d.target_frames is not None:
                    bad = [f for f in d.target_frames if f < 1]
                    if bad:
                        found.append((f"{where}.target_frames", f"frame counts must be at least 1, got {bad}", "use counts of the form N*4+1 such as 1, 25, 45"))
                    elif round_target_frames(d.target_frames) != sorted(set(d.target_frames)):
                        found.append((f"{where}.target_frames", f"warning: musubi rounds {d.target_frames} down to N*4+1: {round_target_frames(d.target_frames)}", f"write target_frames = {round_target_frames(d.target_frames)}"))
                if d.max_frames is not None and d.target_frames and max(d.target_frames) > d.max_frames and d.frame_extraction == "full":
                    found.append((f"{where}.max_frames", f"max_frames {d.max_frames} is below the largest target_frames", "raise max_frames or lower target_frames"))
                for key in ("frame_stride", "frame_sample", "max_frames"):
                    v = getattr(d, key)
                    if v is not None and v < 1:
                        found.append((f"{where}.{key}", f"must be at least 1, got {v}", f"set {key} to 1 or more"))
                if d.source_fps is not None and d.source_fps <= 0:
                    found.append((f"{where}.source_fps", f"must be positive, got {d.source_fps}", "give the videos' frame rate, such as 30.0"))
        return found

    def with_paths_resolved(self, base: Path) -> "DatasetConfig":
        """A copy whose relative folders are made absolute against `base` (the folder of the
        file that declared them), so musubi finds them whatever its working directory."""
        datasets = []
        for d in self.datasets:
            updates = {}
            for key in PATH_KEYS:
                value = getattr(d, key, None)
                if value and not _is_absolute(value):
                    updates[key] = str((base / value).resolve())
            datasets.append(d.model_copy(update=updates))
        return self.model_copy(update={"datasets": datasets})

    def to_musubi_dict(self) -> dict[str, Any]:
        """The config as musubi reads it: only the keys that were set, tuples as lists."""
        out: dict[str, Any] = {}
        general = _plain(self.general.model_dump(exclude_none=True))
        if general:
            out["general"] = general
        out["datasets"] = [_plain(d.model_dump(exclude_none=True)) for d in self.datasets]
        return out

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_musubi_dict())


def _is_absolute(path: str) -> bool:
    # Windows paths in a pipeline written on Windows stay absolute when checked elsewhere.
    return os.path.isabs(path) or (len(path) > 2 and path[1] == ":" and path[2] in "\\/")


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
