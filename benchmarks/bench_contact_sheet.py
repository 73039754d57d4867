"""Benchmark: inspect and draw the contact sheet of a 200-item dataset (150 JPEG images, 50 videos).
Prints figures; asserts nothing."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from media_factory import make_video  # noqa: E402

from musubi_pipe.tools.contact_sheet import make_contact_sheet, save_png  # noqa: E402
from musubi_pipe.tools.dataset import inspect_dataset  # noqa: E402


def build(root: Path, images: int, videos: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    for i in range(images):
        w, h = (1024, 768) if i % 2 else (768, 1152)
        base = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
        Image.fromarray(base).resize((w, h)).save(root / "img" / f"im{i:03d}.jpg", quality=90)
        (root / "img" / f"im{i:03d}.txt").write_text(f"photo number {i}, a test image with a caption " * 2)
    for i in range(videos):
        make_video(root / "vid" / f"v{i:03d}.mp4", n=81, fps=24, width=640, height=360, gop=24)
        (root / "vid" / f"v{i:03d}.txt").write_text(f"video {i}")
    toml = root / "ds.toml"
    toml.write_text('[general]\nresolution = [960, 544]\ncaption_extension = ".txt"\nenable_bucket = true\n'
                    '[[datasets]]\nimage_directory = "img"\n'
                    '[[datasets]]\nvideo_directory = "vid"\ntarget_frames = [1, 25, 45]\n')
    return toml


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=150)
    ap.add_argument("--videos", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        toml = build(root, args.images, args.videos)
        print(f"made {args.images} images (1024x768 JPEG) and {args.videos} videos (640x360, 81 frames) "
              f"in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        report = inspect_dataset(toml, "wan")
        print(f"inspect (decode every image, count every video's frames, cache status): {time.perf_counter() - t:.2f} s")
        items = [i for d in report.datasets for i in d.items]
        t = time.perf_counter()
        sheet = make_contact_sheet(items, columns=10, thumb=128)
        dt = time.perf_counter() - t
        print(f"contact sheet of {len(items)} items ({sheet.width}x{sheet.height}): {dt:.2f} s "
              f"({dt / len(items) * 1e3:.1f} ms per item)")
        t = time.perf_counter()
        save_png(sheet, root / "sheet.png")
        print(f"save PNG: {time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    sys.exit(main())
