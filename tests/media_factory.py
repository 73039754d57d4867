"""Makes the images, videos and damaged files that the media tool tests run on (PyAV, Pillow, numpy)."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path


def gradient_frames(n: int, width: int = 64, height: int = 48, seed: int = 0):
    """n RGB uint8 frames [n, H, W, 3] that change smoothly over time (compress well, so round-trip
    errors stay small) and differ from frame to frame (so frame order and selection can be checked)."""
    import numpy as np

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = np.empty((n, height, width, 3), dtype=np.uint8)
    for i in range(n):
        t = i / max(1, n - 1)
        frames[i, ..., 0] = (x / width * 200 + 20 * np.sin(t * 6.28 + seed)).clip(0, 255)
        frames[i, ..., 1] = (y / height * 200 + 40 * t).clip(0, 255)
        frames[i, ..., 2] = (30 + 200 * t)  # brightness of blue encodes the frame index
    return frames


def frame_index_of(frame, n: int) -> int:
    """Recover which gradient frame (0..n-1) an RGB frame is, from its mean blue level."""
    blue = float(frame[..., 2].mean())
    if frame.dtype.kind == "f":
        blue *= 255.0
    return round((blue - 30) / 200 * max(1, n - 1))


def make_video(path: Path, n: int = 24, fps: float = 24.0, width: int = 64, height: int = 48,
               codec: str = "libx264", gop: int = 12) -> Path:
    """Encode a gradient video directly with PyAV (independent of the code under test)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "10", "g": str(gop)} if codec == "libx264" else {"g": str(gop)}
        for frame in gradient_frames(n, width, height):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def make_image(path: Path, width: int = 64, height: int = 48, color=(200, 80, 40)) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), color).save(path)
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut a file to a fraction of its size, as an interrupted copy or download leaves it."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])
    return Path(path)


def make_garbage(path: Path, size: int = 2000) -> Path:
    """A file with a media extension that holds no media."""
    import random

    rng = random.Random(1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(bytes(rng.randrange(256) for _ in range(size)))
    return Path(path)
