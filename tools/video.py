"""Video reading and writing with PyAV: probe, frame extraction to arrays or PNGs, MP4/WebM encoding."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..files import atomic_path

# Encoders tried per output kind, best first. PyAV's wheels bundle libx264, libvpx-vp9 and
# libsvtav1; a system FFmpeg build may lack some, so each kind has a fallback.
ENCODERS = {
    "h264": ("libx264", "h264", "libopenh264"),
    "vp9": ("libvpx-vp9",),
    "av1": ("libsvtav1", "libaom-av1"),
}
CONTAINER_CODECS = {".mp4": ("h264",), ".m4v": ("h264",), ".mov": ("h264",), ".mkv": ("h264", "vp9", "av1"),
                    ".webm": ("vp9", "av1")}


class MediaError(ValueError):
    """A media file that cannot be used, with the file named and what to do about it."""

    def __init__(self, path: str | os.PathLike, message: str, fix: str = ""):
        self.path = str(path)
        self.message = message
        self.fix = fix
        super().__init__(f"{self.path}: {message}" + (f" (fix: {fix})" if fix else ""))


@dataclass(frozen=True)
class VideoInfo:
    path: str
    width: int
    height: int
    frames: int  # frames that can be read (counted from demuxed packets)
    fps: float
    duration_s: float
    codec: str
    declared_frames: int = 0  # what the header promises (0: unknown)

    @property
    def truncated(self) -> bool:
        # one frame of slack for rounding of container durations
        return self.declared_frames > 0 and self.frames < self.declared_frames - 1

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "truncated": self.truncated}


def _open(path: str | os.PathLike):
    import av

    p = Path(path)
    if not p.exists():
        raise MediaError(p, "file not found", "check the path")
    if p.is_dir():
        raise MediaError(p, "is a folder, not a video file", "give a video file such as clip.mp4")
    try:
        container = av.open(str(p))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise MediaError(p, f"cannot be opened as a video ({_reason(exc)})",
                         "re-encode or remove it; the file is damaged or not a video") from None
    if not container.streams.video:
        container.close()
        raise MediaError(p, "has no video stream", "give a file with a video track")
    return container


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def probe(path: str | os.PathLike, count_frames: bool = True) -> VideoInfo:
    """Size, frame count and rate of a video. The count comes from demuxed packets (no decoding),
    which is what a full decode delivers for the usual codecs; a file cut off mid-stream raises."""
    import av

    container = _open(path)
    try:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 0.0
        width, height = stream.codec_context.width, stream.codec_context.height
        frames = 0
        if count_frames:
            try:
                for packet in container.demux(stream):
                    if packet.size:
                        frames += 1
            except av.error.FFmpegError as exc:
                raise MediaError(path, f"is truncated or damaged after {frames} frames ({_reason(exc)})",
                                 "re-encode or remove it") from None
        else:
            frames = stream.frames
        if frames == 0:
            raise MediaError(path, "contains no video frames", "re-encode or remove it")
        if stream.duration is not None and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / 1_000_000
        else:
            duration = frames / fps if fps else 0.0
        declared = stream.frames or (round(duration * fps) if duration and fps else 0)
        return VideoInfo(str(path), width, height, frames, fps, duration, stream.codec_context.name, declared)
    finally:
        container.close()


def _iter_frames(path, *, reformat: dict | None = None) -> Iterator[Any]:
    """Decoded frames in order; decode errors become MediaError naming the frame reached."""
    import av

    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        n = 0
        try:
            for frame in container.decode(stream):
                yield frame.reformat(**reformat) if reformat else frame
                n += 1
        except av.error.FFmpegError as exc:
            raise MediaError(path, f"decoding failed after {n} frames ({_reason(exc)})",
                             "the file is truncated or damaged: re-encode or remove it") from None
        if n == 0:
            raise MediaError(path, "contains no decodable video frames", "re-encode or remove it")
    finally:
        container.close()


def fps_resample_indices(n_source: int, source_fps: float, target_fps: float) -> list[tuple[int, int]]:
    """(source index, target index) pairs kept when `n_source` frames at `source_fps` are taken
    at `target_fps`: a frame is dropped when it maps to the same whole target index as the one
    before (musubi's rule, so frame counts agree with what its caching sees)."""
    delta = target_fps / source_fps
    kept = []
    position, previous = 0.0, -1
    for i in range(n_source):
        index = int(position)
        position += delta
        if index == previous:
            continue
        previous = index
        kept.append((i, index))
    return kept


def select_frames(n_source: int, *, source_fps: float | None = None, fps: float | None = None,
                  start: int = 0, end: int | None = None, stride: int = 1, count: int | None = None) -> list[int]:
    """Source frame indices taken by `read_frames` options: first resample to `fps` (if given),
    then keep frames [start, end) of that sequence, every `stride`-th, at most `count`."""
    if stride < 1:
        raise ValueError(f"stride must be 1 or more, got {stride}")
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"bad frame range start={start} end={end}: need 0 <= start <= end")
    if count is not None and count < 1:
        raise ValueError(f"count must be 1 or more, got {count}")
    if fps is not None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if not source_fps:
            raise ValueError("the video's frame rate is unknown, so it cannot be resampled to a target fps")
        pairs = fps_resample_indices(n_source, source_fps, fps)
        sequence = [src for src, _ in pairs]
    else:
        sequence = list(range(n_source))
    picked = sequence[start:end:stride]
    return picked[:count] if count is not None else picked


def read_frames(path: str | os.PathLike, *, start: int = 0, end: int | None = None, stride: int = 1,
                count: int | None = None, fps: float | None = None, dtype: str = "float32",
                allow_truncated: bool = False):
    """Frames of a video as an array [N, H, W, 3]: float32 in 0..1 (a ComfyUI IMAGE batch without
    torch) or uint8 with dtype="uint8". See `select_frames` for the options. A file cut short
    (fewer frames than its header declares) raises unless allow_truncated."""
    import numpy as np

    info = probe(path)
    if info.truncated and not allow_truncated:
        raise MediaError(path, f"is truncated: its header declares {info.declared_frames} frames but only {info.frames} can be read",
                         f"re-encode or re-download it, or allow truncated files to use the {info.frames} frames")
    wanted = select_frames(info.frames, source_fps=info.fps, fps=fps, start=start, end=end, stride=stride, count=count)
    if not wanted:
        raise MediaError(path, f"the options select no frames (the video has {info.frames} frames"
                               f"{f' at {info.fps:g} fps' if info.fps else ''})", "lower start or stride, or widen the range")
    wanted_set, last = set(wanted), wanted[-1]
    out = np.empty((len(wanted), info.height, info.width, 3), dtype=np.uint8)
    k = 0
    for i, frame in enumerate(_iter_frames(path)):
        if i in wanted_set:
            out[k] = frame.to_ndarray(format="rgb24")
            k += 1
        if i >= last:
            break
    if k < len(wanted):
        out = out[:k]
    if dtype == "uint8":
        return out
    return out.astype(np.float32) / np.float32(255.0)


def grab_frames(path: str | os.PathLike, positions: Iterable[float], max_size: int | None = None) -> list:
    """PIL images at relative positions 0..1 of a video (0 first frame, 1 last), found by seeking
    to the nearest keyframe before each and decoding forward: fast thumbnails for long videos.
    `max_size` shrinks frames in FFmpeg before conversion."""
    import av

    container = _open(path)
    images = []
    try:
        stream = container.streams.video[0]
        tb = stream.time_base
        start = stream.start_time or 0
        duration = stream.duration
        if duration is None and container.duration:
            duration = int(container.duration / 1_000_000 / tb)
        rate = stream.average_rate or stream.guessed_rate or 0
        frame_ticks = int(1 / (rate * tb)) if rate and tb else 1
        w, h = stream.codec_context.width, stream.codec_context.height
        size = {}
        if max_size and max(w, h) > max_size:
            scale = max_size / max(w, h)
            size = {"width": max(2, int(w * scale)), "height": max(2, int(h * scale))}
        for pos in positions:
            target = start + int(max(0.0, min(1.0, pos)) * max(0, (duration or 0) - frame_ticks))
            try:
                container.seek(target, stream=stream, backward=True, any_frame=False)
                chosen = None
                for frame in container.decode(stream):
                    chosen = frame
                    if frame.pts is None or frame.pts >= target:
                        break
            except av.error.FFmpegError as exc:
                raise MediaError(path, f"cannot read a frame near {pos:.0%} ({_reason(exc)})",
                                 "the file is truncated or damaged: re-encode or remove it") from None
            if chosen is None:
                raise MediaError(path, f"no frame could be decoded near {pos:.0%}", "re-encode or remove it")
            images.append((chosen.reformat(**size) if size else chosen).to_image())
    finally:
        container.close()
    return images


def save_frames_png(frames, folder: str | os.PathLike, pattern: str = "frame_{:05d}.png") -> list[Path]:
    """Write frames ([N,H,W,3] float 0..1 or uint8) as PNG files, each atomically."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(_as_uint8(frames)):
        path = folder / pattern.format(i)
        with atomic_path(path) as tmp:
            Image.fromarray(frame).save(tmp, format="PNG")
        paths.append(path)
    return paths


def available_encoder(kind: str) -> str | None:
    """The FFmpeg encoder PyAV can use for `kind` (h264, vp9, av1), or None."""
    import av

    for name in ENCODERS[kind]:
        if name in av.codecs_available:
            try:
                av.codec.Codec(name, "w")
                return name
            except Exception:  # listed but not usable as an encoder
                continue
    return None


def write_video(frames, path: str | os.PathLike, fps: float = 16.0, *, codec: str | None = None,
                crf: int | None = None) -> Path:
    """Encode frames ([N,H,W,3] float 0..1 or uint8) to MP4 (H.264) or WebM (VP9, or AV1 with
    codec="av1"), written atomically. `crf` is the quality: lower is better (defaults 18 for
    H.264, 32 for VP9/AV1). Width and height must be even (yuv420p)."""
    import av

    path = Path(path)
    ext = path.suffix.lower()
    if ext not in CONTAINER_CODECS:
        raise MediaError(path, f"unsupported output type {ext or '(none)'}", "use .mp4 or .webm")
    kind = codec or CONTAINER_CODECS[ext][0]
    if kind not in CONTAINER_CODECS[ext]:
        raise MediaError(path, f"codec {kind} cannot go in a {ext} file", f"use one of {', '.join(CONTAINER_CODECS[ext])}")
    encoder = available_encoder(kind)
    if encoder is None:
        raise MediaError(path, f"this PyAV/FFmpeg build has no {kind} encoder (tried {', '.join(ENCODERS[kind])})",
                         "install PyAV's binary wheel (pip install av), which bundles them")
    data = _as_uint8(frames)
    if data.ndim != 4 or data.shape[-1] != 3 or len(data) == 0:
        raise MediaError(path, f"frames must be an array [N, H, W, 3] with N >= 1, got shape {tuple(data.shape)}")
    n, h, w, _ = data.shape
    if w % 2 or h % 2:
        raise MediaError(path, f"width and height must be even for yuv420p video, got {w}x{h}", "crop or resize the frames by one pixel")
    if fps <= 0:
        raise MediaError(path, f"fps must be positive, got {fps}")
    quality = crf if crf is not None else (18 if kind == "h264" else 32)
    options = {"crf": str(quality)}
    if encoder == "libvpx-vp9":
        options.update({"b:v": "0", "row-mt": "1", "deadline": "good", "cpu-used": "4"})
    elif encoder == "libx264":
        options.update({"preset": "medium"})
    elif encoder == "libsvtav1":
        options.update({"preset": "8"})
    elif encoder == "libaom-av1":
        options.update({"cpu-used": "6", "b:v": "0"})
    rate = Fraction(fps).limit_denominator(1001)

    def encode(tmp: Path):
        with av.open(str(tmp), mode="w", format="mp4" if ext in (".mp4", ".m4v") else ext[1:].replace("mkv", "matroska")) as out:
            stream = out.add_stream(encoder, rate=rate)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = options
            for i in range(n):
                frame = av.VideoFrame.from_ndarray(data[i], format="rgb24")
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)

    with atomic_path(path) as tmp:
        encode(tmp)
    return path


def _as_uint8(frames):
    import numpy as np

    data = np.asarray(frames)
    if data.dtype == np.uint8:
        return data
    if data.dtype.kind == "f":
        return (np.clip(data, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise ValueError(f"frames must be uint8 or float in 0..1, got {data.dtype}")
