"""Dataset inspection: what musubi will find, read, bucket, cut and cache; and the contact sheet."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from media_factory import make_garbage, make_image, make_video, truncate  # noqa: E402

from musubi_pipe.errors import PipelineError
from musubi_pipe.tools import dataset as D

# Tests against a real checkout run only when MUSUBI_TUNER_DIR names one (with its venv in .venv).
MUSUBI = Path(os.environ.get("MUSUBI_TUNER_DIR") or "/nonexistent/musubi-tuner")
MUSUBI_PY = MUSUBI / ".venv" / "bin" / "python"


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def image_set(tmp_path):
    img = tmp_path / "img"
    make_image(img / "wide.png", 640, 360)
    (img / "wide.txt").write_text("a wide shot", encoding="utf-8")
    make_image(img / "tall.jpg", 300, 900)
    (img / "tall.txt").write_text("   \n", encoding="utf-8")
    make_image(img / "nocap.png", 100, 100)
    make_garbage(img / "broken.png")
    (img / "broken.txt").write_text("broken", encoding="utf-8")
    make_image(img / "odd.Png", 64, 64)  # musubi only globs lower- or upper-case extensions
    (img / "odd.txt").write_text("never found", encoding="utf-8")
    toml = write_toml(tmp_path / "ds.toml", """
[general]
resolution = [256, 256]
caption_extension = ".txt"
enable_bucket = true

[[datasets]]
image_directory = "img"
""")
    return tmp_path, toml


def by_name(report, name):
    return next(i for i in report.items if Path(i.path).name == name)


def test_image_dataset_items_captions_and_unreadable(image_set):
    _, toml = image_set
    d = D.inspect_dataset(toml, "wan").datasets[0]
    names = sorted(Path(i.path).name for i in d.items)
    assert names == ["broken.png", "nocap.png", "tall.jpg", "wide.png"]
    assert "musubi skips" in by_name(d, "nocap.png").skipped
    assert by_name(d, "tall.jpg").flags == ["empty caption"]
    broken = by_name(d, "broken.png")
    assert "unreadable image" in broken.error and broken.size is None
    s = d.summary()
    assert (s["items"], s["used"], s["no_caption"], s["empty_caption"], s["unreadable"]) == (4, 2, 1, 1, 1)


def test_buckets_follow_aspect_ratio(image_set):
    _, toml = image_set
    d = D.inspect_dataset(toml, "wan").datasets[0]
    wide, tall = by_name(d, "wide.png").bucket, by_name(d, "tall.jpg").bucket
    assert wide[0] > wide[1] and tall[1] > tall[0]
    assert all(v % 16 == 0 for v in wide + tall)
    assert sum(d.summary()["buckets"].values()) == 2


def test_bucket_off_and_no_upscale():
    assert D.bucket_for((123, 77), (960, 544), False, False) == (960, 544)
    assert D.bucket_for((500, 301), (960, 544), True, True) == (496, 288)  # small image: no upscale, floor to 16
    assert D.bucket_for((1920, 1080), (960, 544), True, True) == (960, 544)


@pytest.mark.skipif(not MUSUBI_PY.exists(), reason="no musubi-tuner checkout with a venv (MUSUBI_TUNER_DIR)")
def test_buckets_and_uniform_starts_match_musubi():
    sizes = [(1920, 1080), (300, 900), (640, 640), (1000, 333), (720, 1280), (333, 1000), (4000, 3000), (50, 60)]
    cases = [((960, 544), True, False), ((512, 512), True, True), ((256, 256), False, False)]
    code = f"""
import json, sys, numpy as np
sys.path.insert(0, {str(MUSUBI / 'src')!r})
from musubi_tuner.dataset.bucket import BucketSelector
out = []
for reso, on, nu in {cases!r}:
    b = BucketSelector(reso, on, nu, 'wan')
    out.append([list(map(int, b.get_bucket_resolution(s))) for s in {sizes!r}])
lin = [[int(i) for i in np.linspace(0, span, n, dtype=int)] for span in range(0, 40, 7) for n in (2, 3, 5, 7)]
print(json.dumps([out, lin]))
"""
    res = subprocess.run([str(MUSUBI_PY), "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    theirs, lin = json.loads(res.stdout.strip().splitlines()[-1])
    ours = [[list(D.bucket_for(s, reso, on, nu)) for s in sizes] for reso, on, nu in cases]
    assert ours == theirs
    ours_lin = [[s for s, _ in D.frame_windows(span + 1, [1], "uniform", 1, n, 129)] for span in range(0, 40, 7) for n in (2, 3, 5, 7)]
    assert ours_lin == lin


def test_frame_windows_per_extraction_mode():
    assert D.frame_windows(30, [1, 13], "head", 1, 1, 129) == [(0, 1), (0, 13)]
    assert D.frame_windows(30, [13], "chunk", 1, 1, 129) == [(0, 13), (13, 13)]
    assert D.frame_windows(20, [13], "slide", 3, 1, 129) == [(0, 13), (3, 13), (6, 13)]
    assert D.frame_windows(21, [9], "uniform", 1, 3, 129) == [(0, 9), (6, 9), (12, 9)]
    assert D.frame_windows(50, [1], "full", 1, 1, 33) == [(0, 33)]
    assert D.frame_windows(8, [9], "head", 1, 1, 129) == []


def test_source_fps_conversion_counts_like_musubi():
    # 30 fps -> 16 fps keeps 16 of 30 frames; head extraction stops at max(target_frames)
    assert D.frames_loaded(30, None, None, 30.0, 16.0) == 16
    assert D.frames_loaded(90, 0, 25, 30.0, 16.0) == 25
    assert D.frames_loaded(90, 0, 25, None, None) == 25
    assert D.frames_loaded(10, None, None, None, None) == 10


def test_video_dataset_frames_windows_and_flags(tmp_path):
    vid = tmp_path / "vid"
    make_video(vid / "long.mp4", n=40, fps=30, width=96, height=64)
    (vid / "long.txt").write_text("long", encoding="utf-8")
    make_video(vid / "short.mp4", n=6, fps=30)
    (vid / "short.txt").write_text("short", encoding="utf-8")
    make_video(vid / "nocap.mp4", n=20)
    make_video(vid / "cut.mp4", n=30)
    truncate(vid / "cut.mp4", 0.5)
    (vid / "cut.txt").write_text("cut", encoding="utf-8")
    toml = write_toml(tmp_path / "v.toml", """
[general]
caption_extension = ".txt"
[[datasets]]
video_directory = "vid"
target_frames = [9, 17]
frame_extraction = "head"
source_fps = 30.0
""")
    d = D.inspect_dataset(toml, "wan").datasets[0]
    long = by_name(d, "long.mp4")
    assert long.frames == 40 and long.size == (96, 64)
    assert long.frames_loaded == 17 and long.windows == [(0, 9), (0, 17)]
    short = by_name(d, "short.mp4")
    assert short.windows == [] and any(f.startswith("too short") for f in short.flags)
    assert "FileNotFoundError" in by_name(d, "nocap.mp4").error
    assert "cannot be opened" in by_name(d, "cut.mp4").error
    assert d.summary()["clips"] == 2
    # FramePack runs at 30 fps: no frames are dropped, and its caches have section indices
    fp = D.inspect_dataset(toml, "framepack").datasets[0]
    assert by_name(fp, "long.mp4").frames_loaded == 17
    bucket = by_name(fp, "long.mp4").bucket  # video latents are named by their bucket size
    assert f"long_00000-017-0000_{bucket[0]:04d}x{bucket[1]:04d}_fp.safetensors" in fp.cache.missing


def test_cache_status_present_missing_stale_orphan(image_set):
    root, toml = image_set
    img = root / "img"
    present = img / "wide_0640x0360_wan.safetensors"
    present.write_bytes(b"x")
    te = img / "wide_wan_te.safetensors"
    te.write_bytes(b"x")
    old = os.stat(img / "wide.txt").st_mtime - 100
    os.utime(te, (old, old))  # older than the caption: stale
    (img / "gone_0064x0064_wan.safetensors").write_bytes(b"x")
    (img / "gone_wan_te.safetensors").write_bytes(b"x")
    (img / "wide_0640x0360_hv.safetensors").write_bytes(b"x")  # another family: not ours
    c = D.inspect_dataset(toml, "wan").datasets[0].cache
    assert "wide_0640x0360_wan.safetensors" in c.present
    assert c.stale == ["wide_wan_te.safetensors"]
    assert "tall_0300x0900_wan.safetensors" in c.missing and "tall_wan_te.safetensors" in c.missing
    assert c.orphans == ["gone_0064x0064_wan.safetensors", "gone_wan_te.safetensors"]
    assert not any("nocap" in n for n in c.missing)  # musubi never lists an uncaptioned image
    hv = D.inspect_dataset(toml, "hunyuan_video").datasets[0].cache
    assert hv.present == ["wide_0640x0360_hv.safetensors"]


def test_missing_directory_and_missing_caption_extension(tmp_path):
    toml = write_toml(tmp_path / "d.toml", '[[datasets]]\nimage_directory = "nowhere"\n')
    r = D.inspect_dataset(toml)
    messages = [str(p) for p in r.datasets[0].problems]
    assert any("folder not found" in m and "image_directory" in m for m in messages)
    (tmp_path / "img").mkdir()
    make_image(tmp_path / "img" / "a.png")
    toml = write_toml(tmp_path / "e.toml", '[[datasets]]\nimage_directory = "img"\n')
    problems = D.inspect_dataset(toml).datasets[0].problems
    assert any(p.path.endswith("caption_extension") for p in problems)


def test_bad_config_raises_with_file_and_field(tmp_path):
    toml = write_toml(tmp_path / "bad.toml", '[general]\ncache_directory = "x"\n[[datasets]]\nimage_directory = "i"\n')
    with pytest.raises(PipelineError) as info:
        D.inspect_dataset(toml)
    text = str(info.value)
    assert "bad.toml" in text and "cache_directory" in text
    with pytest.raises(PipelineError, match="not found"):
        D.inspect_dataset(tmp_path / "none.toml")
    (tmp_path / "syntax.toml").write_text("[[datasets]\n", encoding="utf-8")
    with pytest.raises(PipelineError, match="cannot parse"):
        D.inspect_dataset(tmp_path / "syntax.toml")


def test_dict_input_and_jsonl_dataset(tmp_path):
    make_image(tmp_path / "p" / "one.png", 320, 240)
    lines = [json.dumps({"image_path": str(tmp_path / "p" / "one.png"), "caption": "one"}),
             "{not json", json.dumps({"image_path": str(tmp_path / "p" / "two.png"), "caption": "two"})]
    (tmp_path / "list.jsonl").write_text("\n".join(lines), encoding="utf-8")
    cfg = {"general": {"resolution": 256}, "datasets": [{"image_jsonl_file": str(tmp_path / "list.jsonl"),
                                                          "cache_directory": str(tmp_path / "c")}]}
    d = D.inspect_dataset(cfg).datasets[0]
    assert [Path(i.path).name for i in d.items] == ["one.png", "two.png"]
    assert by_name(d, "two.png").error == "file not found"
    assert any(p.line == 2 for p in d.problems)
    assert d.cache.missing == ["one_0320x0240_wan.safetensors", "one_wan_te.safetensors", "two_wan_te.safetensors"]


def test_frame_folder_frames_are_the_images_musubi_lists(tmp_path):
    frames = tmp_path / "clip"
    for i in range(5):
        make_image(frames / f"f{i}.png")
    make_image(frames / "f9.Png")  # musubi globs lower- or upper-case extensions only
    (frames / "notes.txt").write_text("x", encoding="utf-8")
    assert [p.name for p in D.frame_files(frames)] == ["f0.png", "f1.png", "f2.png", "f3.png", "f4.png"]
    (tmp_path / "list.jsonl").write_text(json.dumps({"video_path": str(frames), "caption": "c"}), encoding="utf-8")
    d = D.inspect_dataset({"datasets": [{"video_jsonl_file": str(tmp_path / "list.jsonl"),
                                         "cache_directory": str(tmp_path / "c")}]}).datasets[0]
    assert d.items[0].frames == 5


def test_same_stem_collision_is_warned(tmp_path):
    for ext in ("png", "jpg"):
        make_image(tmp_path / "i" / f"x.{ext}")
    (tmp_path / "i" / "x.txt").write_text("x", encoding="utf-8")
    r = D.inspect_dataset({"general": {"caption_extension": ".txt"}, "datasets": [{"image_directory": str(tmp_path / "i")}]})
    assert any("share the name" in p.message for p in r.datasets[0].problems)


def test_report_is_json_and_text(image_set):
    _, toml = image_set
    r = D.inspect_dataset(toml, "wan")
    assert json.loads(json.dumps(r.to_dict()))["datasets"][0]["summary"]["used"] == 2
    text = r.format()
    assert "broken.png" in text and "empty caption" in text


def test_pipeline_file_with_embedded_dataset(tmp_path):
    make_image(tmp_path / "i" / "a.png")
    (tmp_path / "i" / "a.txt").write_text("a", encoding="utf-8")
    toml = write_toml(tmp_path / "pipe.toml", """
name = "p"
family = "wan"
task = "t2v-1.3B"
[vars]
images = "i"
[dataset.general]
caption_extension = ".txt"
[[dataset.datasets]]
image_directory = "{{ images }}"
""")
    # read by the pipeline language: {{ vars }} are interpolated, folders are from the pipeline's
    report = D.inspect_dataset(toml)
    assert report.datasets[0].summary()["used"] == 1


def test_contact_sheet_draws_flags_and_saves(image_set, tmp_path):
    from PIL import Image

    from musubi_pipe.tools.contact_sheet import make_contact_sheet, save_png

    _, toml = image_set
    make_video(tmp_path / "v" / "clip.mp4", n=20)
    (tmp_path / "v" / "clip.txt").write_text("clip " * 40, encoding="utf-8")
    r = D.inspect_dataset(toml)
    rv = D.inspect_dataset({"general": {"caption_extension": ".txt"},
                            "datasets": [{"video_directory": str(tmp_path / "v"), "target_frames": [33]}]})
    sheet = make_contact_sheet(r.datasets[0].items + rv.datasets[0].items, columns=3, thumb=96)
    wide = make_contact_sheet(r.datasets[0].items + rv.datasets[0].items, columns=5, thumb=96)
    assert sheet.width < wide.width and sheet.height > wide.height  # 5 tiles: 2 rows of 3, or 1 row of 5
    out = save_png(sheet, tmp_path / "sheet.png")
    back = Image.open(out)
    assert back.size == sheet.size
    # flagged tiles carry a red band: count strongly red pixels
    import numpy as np

    px = np.asarray(back.convert("RGB")).astype(int)
    assert ((px[..., 0] > 180) & (px[..., 1] < 80) & (px[..., 2] < 80)).sum() > 100
    assert not list(tmp_path.glob(".sheet*"))  # no temp file left behind


def test_cli_dataset_inspect_json_sheet_and_exit_code(image_set, tmp_path):
    from click.testing import CliRunner

    from musubi_pipe.cli import main

    _, toml = image_set
    res = CliRunner().invoke(main, ["dataset", "inspect", str(toml), "--family", "framepack", "--json",
                                    "--sheet", str(tmp_path / "s.png")])
    assert res.exit_code == 1  # broken.png is unreadable
    data = json.loads(res.stdout)
    assert data["suffix"] == "fp" and data["datasets"][0]["summary"]["unreadable"] == 1
    assert (tmp_path / "s.png").stat().st_size > 0
    res = CliRunner().invoke(main, ["dataset", "inspect", str(toml), "--family", "sdxl"])
    assert res.exit_code == 1 and "unknown family" in res.output


@pytest.mark.skipif(not MUSUBI_PY.exists(), reason="no musubi-tuner checkout with a venv (MUSUBI_TUNER_DIR)")
def test_expected_cache_names_match_musubis_own_datasets(tmp_path):
    """musubi's ImageDataset/VideoDataset list the latent files they would cache; ours must agree."""
    make_image(tmp_path / "img" / "a.png", 640, 360)
    (tmp_path / "img" / "a.txt").write_text("a", encoding="utf-8")
    make_image(tmp_path / "img" / "b.jpg", 300, 500)
    (tmp_path / "img" / "b.txt").write_text("b", encoding="utf-8")
    make_video(tmp_path / "vid" / "v1.mp4", n=40, fps=30, width=96, height=64)
    (tmp_path / "vid" / "v1.txt").write_text("v1", encoding="utf-8")
    make_video(tmp_path / "vid" / "v2.mp4", n=10, fps=30)
    (tmp_path / "vid" / "v2.txt").write_text("v2", encoding="utf-8")
    code = f"""
import sys, json, os
sys.path.insert(0, {str(MUSUBI / 'src')!r})
from musubi_tuner.dataset.image_video_dataset import ImageDataset, VideoDataset
names = []
i = ImageDataset((256, 256), '.txt', 1, 1, True, False, image_directory={str(tmp_path / 'img')!r}, architecture='wan')
v = VideoDataset((256, 256), '.txt', 1, 1, False, False, frame_extraction='chunk', target_frames=[1, 13, 25],
                 source_fps=30.0, video_directory={str(tmp_path / 'vid')!r}, architecture='wan')
for ds in (i, v):
    for _, batch in ds.retrieve_latent_cache_batches(1):
        names += [os.path.basename(it.latent_cache_path) for it in batch]
print(json.dumps(sorted(names)))
"""
    res = subprocess.run([str(MUSUBI_PY), "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    theirs = json.loads(res.stdout.strip().splitlines()[-1])
    r = D.inspect_dataset({"general": {"resolution": 256, "caption_extension": ".txt"},
                           "datasets": [{"image_directory": str(tmp_path / "img"), "enable_bucket": True},
                                        {"video_directory": str(tmp_path / "vid"), "frame_extraction": "chunk",
                                         "target_frames": [1, 13, 25], "source_fps": 30.0}]})
    ours = sorted(n for d in r.datasets for n in d.cache.missing if not n.endswith("_te.safetensors"))
    assert ours == theirs and len(ours) > 20
