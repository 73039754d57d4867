"""The README's walkthrough, "From a folder of clips to a LoRA in ComfyUI", run as written: its
bash block is extracted and run as a script against the musubi-tuner test double, in a fresh home
folder holding only clips, the double and the model files the README's table names (small dummy
files: the double does not read them)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from media_factory import make_video  # noqa: E402
from musubi_double import make_fake_checkout  # noqa: E402

from musubi_pipe.pipelines import registry  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## From a folder of clips to a LoRA in ComfyUI"


def walkthrough() -> tuple[str, str]:
    """(the section's text, its first bash block)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index(HEADING):]
    section = section[:section.index("\n## ", len(HEADING))]
    return section, re.search(r"```bash\n(.*?)```", section, re.S)[1]


def model_table(section: str) -> list[tuple[str, str, str]]:
    """(slot, file, folder) rows of the section's model-file table."""
    return [(m[1], m[2], m[3]) for m in re.finditer(r"^\s*\| `(\w+)` \| `([^`]+)` \| `ComfyUI/models/(\w+)/` \|", section, re.M)]


def test_the_readme_names_the_registry_files_for_its_family_and_task():
    section, script = walkthrough()
    fam_name, task = re.search(r"new \S+ --family (\S+) --task (\S+)", script).groups()
    fam = registry.family(fam_name)
    rows = model_table(section)
    assert [slot for slot, _, _ in rows] == list(fam.needed_slots(task, ("cache_latents", "cache_text_encoder", "train")))
    for slot, name, folder in rows:
        names, url = fam.models[slot].published(task)
        assert name in names and folder == fam.models[slot].folder and url in section


def test_the_walkthrough_runs_as_written(tmp_path):
    section, script = walkthrough()
    home = tmp_path / "home"
    make_fake_checkout(home / "musubi-tuner")
    clips = home / "datasets" / "my-style"
    for i, n in enumerate((40, 48, 56)):
        make_video(clips / f"walk_{i:02d}.mp4", n=n, fps=24, width=96, height=64)
    (clips / "walk_00.txt").write_text("a figure walks across a misty field\n", encoding="utf-8")
    for _, name, folder in model_table(section):
        (home / "ComfyUI" / "models" / folder).mkdir(parents=True, exist_ok=True)
        (home / "ComfyUI" / "models" / folder / name).write_bytes(b"dummy")
    (home / "ComfyUI" / "models" / "loras").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MUSUBI_", "COMFYUI_", "XDG_"))}
    env.update(HOME=str(home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               MUSUBI_DOUBLE_STEP_SECONDS="0")
    res = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                         text=True, stdin=subprocess.DEVNULL, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "wrote 2 caption stub(s)" in out and (clips / "walk_01.txt").read_text() == "walk 01\n"
    assert (clips / "walk_00.txt").read_text() == "a figure walks across a misty field\n"
    lora = home / "musubi-out" / "my-style" / "train" / "my-style.safetensors"
    assert lora.is_file() and (home / "ComfyUI" / "models" / "loras" / "my-style.safetensors").is_file()
    assert f"  train: {lora}" in out  # the run's summary names the LoRA
    for slot, name, folder in model_table(section):  # found where the README says to put them
        path = home / "ComfyUI" / "models" / folder / name
        assert f"{slot}: found {path}" in out and f'{slot} = "{path}"' in (home / "my-style.toml").read_text()
    assert "step train (train)" in out  # monitor shows the training step
