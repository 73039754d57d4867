"""Fixtures for tests against a real ComfyUI started by .ci/comfyui.sh (see its test-env command):
they skip without COMFYUI_URL, and fail without it when MUSUBI_PIPE_REQUIRE_COMFYUI=1."""
from __future__ import annotations

import os
import shutil
import time
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # comfy_client; musubi_double, media_factory

MODEL_FILES = {
    "diffusion_models": ["musubi-test-dit_bf16.safetensors"],
    "vae": ["musubi-test-vae.safetensors"],
    "text_encoders": ["musubi-test-te1.safetensors", "musubi-test-te2.safetensors", "musubi-test-t5.safetensors"],
    "clip_vision": ["musubi-test-clip.safetensors", "musubi-test-siglip.safetensors"],
}


def write_server_files(comfy_dir: Path, config: Path, work: Path) -> None:
    """What the server reads at each run: the local config (outputs only under `work`) and the
    placeholder model files its pickers list."""
    config.write_text(f'allowed_output_roots = ["{work}"]\ncancel_grace_s = 1.0\n')
    for folder, names in MODEL_FILES.items():
        (comfy_dir / "models" / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (comfy_dir / "models" / folder / name).write_bytes(b"\0" * 16)


def _need(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        message = f"{name} is not set: start ComfyUI with `eval \"$(bash .ci/comfyui.sh test-env)\"; bash .ci/comfyui.sh start`"
        if os.environ.get("MUSUBI_PIPE_REQUIRE_COMFYUI") == "1":
            pytest.fail(message + " (MUSUBI_PIPE_REQUIRE_COMFYUI=1)")
        pytest.skip(message)
    return value


def _server_side_paths() -> tuple[Path, Path, Path]:
    """The test double, local config and double's record that the server was started with
    (`.ci/comfyui.sh test-env` puts them in test/ beside ComfyUI). Only COMFYUI_DIR reaches the
    tests, so the server's MUSUBI_TUNER_DIR and config do not leak into every other test."""
    test = Path(_need("COMFYUI_DIR")).parent / "test"
    return test / "musubi-tuner", test / "config.toml", test / "double-record.jsonl"


@pytest.fixture(scope="session")
def comfy():
    from comfy_client import ComfyClient

    url = _need("COMFYUI_URL")
    client = ComfyClient(url)
    client.get("/system_stats")
    return client


@pytest.fixture(scope="session")
def comfy_dir(comfy) -> Path:
    return Path(_need("COMFYUI_DIR"))


@pytest.fixture(scope="session")
def test_root(comfy) -> Path:
    """Fresh musubi double, record file, config and model files for this session."""
    from musubi_double import make_fake_checkout

    double, config, _ = _server_side_paths()
    root = double.parent
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    make_fake_checkout(double)
    (root / "work").mkdir()
    write_server_files(Path(_need("COMFYUI_DIR")), config, root / "work")
    return root


@pytest.fixture()
def record(test_root) -> Path:
    """The double's run record (one JSON line per script run), emptied for this test."""
    path = _server_side_paths()[2]
    path.write_text("")
    return path


@pytest.fixture()
def unique(test_root, request) -> str:
    """A pipeline name no earlier session used (LoRAs land in ComfyUI's shared loras folder)."""
    return f"t{int(time.time() * 1000) % 10**9}-{request.node.name[5:25].replace('_', '-')}".rstrip("-")


@pytest.fixture(scope="session")
def clips(test_root) -> Path:
    """A folder of three short captioned clips (25 frames each)."""
    from media_factory import make_video

    folder = test_root / "work" / "clips"
    folder.mkdir(parents=True)
    for i in range(3):
        make_video(folder / f"clip{i}.mp4", n=25, fps=16.0, width=96, height=64)
        (folder / f"clip{i}.txt").write_text(f"a test clip number {i}")
    return folder
