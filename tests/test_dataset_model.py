"""musubi's dataset schema: loading, checking and writing a dataset TOML without changing its meaning."""
from musubi_pipe.files import tomllib
from pathlib import Path

import pytest

from musubi_pipe.dsl.dataset import DatasetConfig, round_target_frames
from musubi_pipe.dsl.load import load_dataset_file
from musubi_pipe.errors import PipelineError

MUSUBI_DOC = """
[general]
resolution = [960, 544]
caption_extension = ".txt"
batch_size = 1
enable_bucket = true
bucket_no_upscale = false

[[datasets]]
image_directory = "/data/images"
cache_directory = "/data/cache_images"
num_repeats = 2
resolution = 512

[[datasets]]
video_directory = "/data/videos"
cache_directory = "/data/cache_videos"
target_frames = [1, 25, 45]
frame_extraction = "uniform"
frame_sample = 4
max_frames = 129
source_fps = 30.0

[[datasets]]
video_jsonl_file = "/data/videos.jsonl"
cache_directory = "/data/cache_jsonl"
frame_extraction = "slide"
frame_stride = 10
"""


def test_round_trip_keeps_meaning(tmp_path):
    src = tmp_path / "d.toml"
    src.write_text(MUSUBI_DOC)
    config = load_dataset_file(src)
    assert [d.is_video for d in config.datasets] == [False, True, True]
    written = tmp_path / "out.toml"
    written.write_text(config.to_toml())
    assert tomllib.loads(written.read_text()) == tomllib.loads(MUSUBI_DOC)
    assert load_dataset_file(written) == config


def test_source_fps_must_be_a_float(tmp_path):
    f = tmp_path / "d.toml"
    f.write_text('[[datasets]]\nvideo_directory = "v"\nsource_fps = 30\n')
    with pytest.raises(PipelineError) as err:
        load_dataset_file(f)
    assert "datasets[0].source_fps: expected a float such as 30.0, got 30" in str(err.value)
    assert f"{f}:3" in str(err.value)


def test_video_keys_in_an_image_dataset_are_rejected(tmp_path):
    f = tmp_path / "d.toml"
    f.write_text('[[datasets]]\nimage_directory = "i"\ntarget_frames = [1]\n')
    with pytest.raises(PipelineError) as err:
        load_dataset_file(f)
    assert "target_frames is a video-dataset key" in str(err.value)


def test_target_frames_rounding_matches_musubi():
    assert round_target_frames([1, 24, 25, 50, 81]) == [1, 21, 25, 49, 81]
    config = DatasetConfig.model_validate({"datasets": [{"video_directory": "v", "target_frames": [24]}]})
    [(path, message, fix)] = config.problems()
    assert path == "datasets[0].target_frames" and message.startswith("warning:") and "[21]" in fix


def test_cache_directories_must_be_unique_including_defaults():
    config = DatasetConfig.model_validate({"datasets": [{"video_directory": "/v"}, {"image_directory": "/i", "cache_directory": "/v"}]})
    assert any("also used by datasets[0]" in m for _, m, _ in config.problems())


def test_deprecated_keys_are_upgraded():
    config = DatasetConfig.model_validate({"datasets": [{"image_directory": "i", "qwen_image_edit_control_resolution": [512, 512]}]})
    assert config.datasets[0].control_resolution == (512, 512)


def test_relative_folders_resolve_against_the_declaring_file(tmp_path):
    config = DatasetConfig.model_validate({"datasets": [{"video_directory": "clips", "cache_directory": "C:\\cache"}]})
    resolved = config.with_paths_resolved(tmp_path)
    assert resolved.datasets[0].video_directory == str(tmp_path / "clips")
    assert resolved.datasets[0].cache_directory == "C:\\cache"


def test_real_musubi_accepts_what_we_write(tmp_path):
    import os
    import subprocess

    checkout = os.environ.get("MUSUBI_TUNER_DIR")
    if not checkout:
        pytest.skip("set MUSUBI_TUNER_DIR to a musubi-tuner checkout to run")
    python = Path(checkout) / ".venv/bin/python"
    written = tmp_path / "d.toml"
    written.write_text(DatasetConfig.model_validate(tomllib.loads(MUSUBI_DOC)).to_toml())
    code = ("import sys, toml; from musubi_tuner.dataset.config_utils import ConfigSanitizer, load_user_config;"
            "ConfigSanitizer().sanitize_user_config(load_user_config(sys.argv[1])); print('valid')")
    run = subprocess.run([str(python), "-c", code, str(written)], capture_output=True, text=True, timeout=300)
    assert run.stdout.strip().endswith("valid"), run.stderr[-2000:]
