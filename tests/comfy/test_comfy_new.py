"""The New Pipeline from a Folder node in a real ComfyUI: a media folder in ComfyUI's input folder,
the report and the proposed pipeline, model files found in ComfyUI's own model folders, caption
stubs only on request and only where a workflow may write."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


def new_node(folder: str, family: str, task: str = "(default)", stubs: bool = False) -> dict:
    return {"class_type": "MusubiTuner_NewPipeline", "inputs": {
        "media_folder": folder, "family": family, "task": task, "gpu_memory_gib": 24.0, "write_caption_stubs": stubs}}


def test_new_pipeline_node_reports_finds_models_and_writes_only_when_asked(comfy, comfy_dir, test_root, unique):
    from media_factory import make_video

    from musubi_pipe.pipelines import registry

    fam = registry.family(registry.default_family())
    task = fam.resolve_task("1.3b") or fam.default_task
    media = comfy_dir / "input" / unique
    for i in range(2):
        make_video(media / f"walk_{i}.mp4", n=33, fps=16.0, width=96, height=64)
    (media / "walk_0.txt").write_text("a walk")
    dit = fam.models["dit"]
    model = comfy_dir / "models" / dit.folder / dit.published(task)[0][0]
    created = not model.exists()
    if created:
        model.write_bytes(b"\0" * 16)
    try:
        prompt = {"1": new_node(unique, fam.name, task),  # relative: inside ComfyUI's input folder
                  "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}
        outcome = comfy.run(prompt, timeout=120)
        assert outcome.ended == "execution_success", outcome.error()
        report = "".join(outcome.outputs("1")["text"])
        assert "walk_1.mp4 -> walk_1.txt" in report and f"dit: found {model}" in report, report
        toml = "".join(outcome.outputs("2")["text"])
        assert f'family = "{fam.name}"' in toml and f'dit = "{model}"' in toml
        assert sorted(p.name for p in media.iterdir()) == ["walk_0.mp4", "walk_0.txt", "walk_1.mp4"]

        outcome = comfy.run({"1": new_node(str(media), fam.name, task, stubs=True)}, timeout=120)
        assert outcome.ended == "execution_success", outcome.error()
        assert (media / "walk_1.txt").read_text() == "walk 1\n" and (media / "walk_0.txt").read_text() == "a walk"

        outside = Path(tempfile.mkdtemp(prefix="musubi-new-outside-"))
        try:
            shutil.copy(media / "walk_1.mp4", outside / "x.mp4")
            outcome = comfy.run({"1": new_node(str(outside), fam.name, task, stubs=True)}, timeout=120)
            assert outcome.ended == "execution_error"
            assert "outside ComfyUI's input/output folders" in str(outcome.error())
            assert not (outside / "x.txt").exists()
        finally:
            shutil.rmtree(outside)
    finally:
        if created:
            model.unlink()
