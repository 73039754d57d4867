"""Video IO: probing, frame extraction options, MP4/WebM encoding round trips, damaged files."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from media_factory import frame_index_of, gradient_frames, make_garbage, make_video, truncate  # noqa: E402

from musubi_pipe.tools import video as V


@pytest.fixture
def clip(tmp_path):
    return make_video(tmp_path / "clip.mp4", n=30, fps=30, width=64, height=48)


def test_probe_reports_size_frames_fps(clip):
    info = V.probe(clip)
    assert (info.width, info.height, info.frames, info.fps) == (64, 48, 30, 30.0)
    assert info.duration_s == pytest.approx(1.0, abs=0.05) and not info.truncated


def test_read_frames_is_a_comfy_image_batch(clip):
    frames = V.read_frames(clip)
    assert frames.shape == (30, 48, 64, 3) and frames.dtype == np.float32
    assert 0.0 <= frames.min() and frames.max() <= 1.0
    assert [frame_index_of(f, 30) for f in frames[[0, 15, 29]]] == [0, 15, 29]


def test_stride_range_and_count_select_the_right_frames(clip):
    got = V.read_frames(clip, start=4, end=20, stride=5, dtype="uint8")
    assert [frame_index_of(f, 30) for f in got] == [4, 9, 14, 19]
    got = V.read_frames(clip, stride=2, count=3, dtype="uint8")
    assert [frame_index_of(f, 30) for f in got] == [0, 2, 4]


def test_target_fps_drops_frames_like_musubi(clip):
    got = V.read_frames(clip, fps=15, dtype="uint8")
    assert [frame_index_of(f, 30) for f in got] == list(range(0, 30, 2))
    assert len(V.read_frames(clip, fps=16)) == 16  # 30 -> 16 fps keeps 16 of 30


def test_bad_options_are_explained(clip):
    with pytest.raises(ValueError, match="stride"):
        V.read_frames(clip, stride=0)
    with pytest.raises(V.MediaError, match="select no frames"):
        V.read_frames(clip, start=100)


@pytest.mark.parametrize("name,codec,tol", [("out.mp4", None, 0.02), ("out.webm", None, 0.03), ("av1.webm", "av1", 0.03)])
def test_encode_round_trip(tmp_path, name, codec, tol):
    if V.available_encoder(codec or ("h264" if name.endswith(".mp4") else "vp9")) is None:
        pytest.skip("encoder not in this PyAV build")
    src = gradient_frames(20, 64, 48)
    out = V.write_video(src.astype(np.float32) / 255.0, tmp_path / name, fps=12, codec=codec)
    info = V.probe(out)
    assert (info.width, info.height, info.frames, info.fps) == (64, 48, 20, 12.0)
    back = V.read_frames(out)
    assert np.abs(back - src / 255.0).mean() < tol
    assert [frame_index_of(f, 20) for f in back[[0, 10, 19]]] == [0, 10, 19]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_quality_setting_changes_size(tmp_path):
    src = gradient_frames(20, 64, 48)
    hi = V.write_video(src, tmp_path / "hi.mp4", fps=12, crf=5).stat().st_size
    lo = V.write_video(src, tmp_path / "lo.mp4", fps=12, crf=45).stat().st_size
    assert hi > lo


def test_h264_is_available_in_pyav_build():
    # the project promises H.264 MP4 output; PyAV's wheels bundle libx264
    assert V.available_encoder("h264") is not None


def test_encode_refuses_bad_input(tmp_path):
    with pytest.raises(V.MediaError, match="even"):
        V.write_video(np.zeros((2, 11, 10, 3), np.uint8), tmp_path / "x.mp4")
    with pytest.raises(V.MediaError, match="unsupported output type"):
        V.write_video(np.zeros((2, 10, 10, 3), np.uint8), tmp_path / "x.avi")
    with pytest.raises(V.MediaError, match="cannot go in"):
        V.write_video(np.zeros((2, 10, 10, 3), np.uint8), tmp_path / "x.webm", codec="h264")
    with pytest.raises(V.MediaError, match=r"\[N, H, W, 3\]"):
        V.write_video(np.zeros((10, 10, 3), np.uint8), tmp_path / "x.mp4")
    assert not list(tmp_path.iterdir())


def test_frames_to_png_files(tmp_path, clip):
    paths = V.save_frames_png(V.read_frames(clip, count=3), tmp_path / "png")
    from PIL import Image

    assert [p.name for p in paths] == ["frame_00000.png", "frame_00001.png", "frame_00002.png"]
    assert frame_index_of(np.asarray(Image.open(paths[2])), 30) == 2


def test_grab_frames_seeks_first_middle_last(tmp_path):
    long = make_video(tmp_path / "long.mp4", n=120, fps=24, gop=10)
    ims = V.grab_frames(long, (0.0, 0.5, 1.0), max_size=32)
    assert all(max(im.size) == 32 for im in ims)
    idx = [frame_index_of(np.asarray(im), 120) for im in V.grab_frames(long, (0.0, 0.5, 1.0))]
    # 120 frames share 200 blue levels: allow a frame or two of colour error
    assert idx[0] <= 1 and abs(idx[1] - 60) <= 3 and idx[2] >= 116


def test_unreadable_and_truncated_files_give_clear_errors(tmp_path):
    with pytest.raises(V.MediaError, match="file not found"):
        V.probe(tmp_path / "none.mp4")
    with pytest.raises(V.MediaError, match="cannot be opened"):
        V.probe(make_garbage(tmp_path / "junk.mp4"))
    with pytest.raises(V.MediaError, match="is a folder"):
        V.probe(tmp_path)
    cut_mp4 = truncate(make_video(tmp_path / "cut.mp4", n=40), 0.5)  # index at the end: lost
    with pytest.raises(V.MediaError, match="cannot be opened"):
        V.read_frames(cut_mp4)
    cut_webm = truncate(V.write_video(gradient_frames(40), tmp_path / "cut.webm", fps=12), 0.6)
    info = V.probe(cut_webm)
    assert info.truncated and info.frames < info.declared_frames == 40
    with pytest.raises(V.MediaError, match="truncated"):
        V.read_frames(cut_webm)
    assert len(V.read_frames(cut_webm, allow_truncated=True)) == info.frames


def test_cli_video_info_prints_a_table_and_json_on_request(tmp_path, clip):
    import json

    from click.testing import CliRunner

    from musubi_pipe.cli import main

    other = make_video(tmp_path / "wide.mp4", n=12, fps=24, width=96, height=48)
    res = CliRunner().invoke(main, ["video", "info", str(clip), str(other)])
    assert res.exit_code == 0, res.output
    head, first, second = res.output.splitlines()
    assert head.split() == ["file", "size", "frames", "fps", "length", "codec"]
    assert first.split()[:6] == [str(clip), "64x48", "30", "30", "1.00", "s"]
    assert second.split()[:4] == [str(other), "96x48", "12", "24"]
    assert head.index("codec") == first.index("h264") == second.index("h264")  # columns line up
    assert json.loads(CliRunner().invoke(main, ["video", "info", str(clip), "--json"]).output)["frames"] == 30
    bad = make_garbage(tmp_path / "bad.mp4")
    res = CliRunner().invoke(main, ["video", "info", str(clip), str(bad)])
    bad_line = next(line for line in res.output.splitlines() if line.startswith(str(bad)))
    assert res.exit_code == 1 and bad_line.split()[1:6] == ["error:", "cannot", "be", "opened", "as"] and "64x48" in res.output
