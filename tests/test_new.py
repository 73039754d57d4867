"""`musubi-pipe new`: a folder of clips or images -> a commented pipeline that validates and plans;
captions listed and stubbed without overwriting; model files found by the registry's published names."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from media_factory import make_image, make_video  # noqa: E402

from musubi_pipe.cli import main  # noqa: E402
from musubi_pipe.compiler import compile_file  # noqa: E402
from musubi_pipe.errors import PipelineError  # noqa: E402
from musubi_pipe.pipelines import registry  # noqa: E402
from musubi_pipe.tools import proposal as P  # noqa: E402

KINDS = ("cache_latents", "cache_text_encoder", "train", "generate", "merge")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No model folder, config or ComfyUI of this machine is seen."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MUSUBI_PIPE_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.delenv("COMFYUI_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(P, "detect_gpu_gib", lambda: None)
    return home


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    for i, n in enumerate((40, 50, 60)):
        make_video(root / "clips" / f"walk_{i}.mp4", n=n, fps=24, width=320, height=240)
    (root / "clips" / "walk_0.txt").write_text("a person walking\n", encoding="utf-8")
    for i in range(3):
        make_image(root / "images" / f"red_car-{i}.png", 96, 128)
    return root


def copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def new(*args, input=None):
    return CliRunner().invoke(main, ["new", *map(str, args)], input=input)


# ---- the registry's data ----------------------------------------------------------------------

@pytest.mark.parametrize("name", registry.family_names())
def test_every_model_slot_of_every_task_has_a_published_file_name_and_download_page(name):
    fam = registry.family(name)
    for task in fam.tasks or [None]:
        for slot in fam.needed_slots(task, KINDS, sampling=True):
            names, url = fam.models[slot].published(task)
            assert names and all(n and "/" not in n for n in names), (name, task, slot)
            assert url.startswith("https://"), (name, task, slot, url)
    assert set(fam.slots(*KINDS)) <= set(fam.models)


def test_published_names_differ_per_task_where_the_model_does():
    wan = registry.family("wan")
    small, _ = wan.models["dit"].published(wan.resolve_task("1.3b"))
    big, _ = wan.models["dit"].published(wan.default_task)
    assert small and big and not set(small) & set(big)


# ---- the command ----------------------------------------------------------------------------

def test_new_on_clips_writes_a_pipeline_that_validates_and_plans(tmp_path, media):
    clips = copy(media / "clips", tmp_path / "clips")
    fam = registry.family(registry.default_family())
    res = new(clips, "--gpu-gb", 24)  # CliRunner's stdin is not a terminal: nothing is asked
    assert res.exit_code == 0, res.output
    out = res.output
    assert "2 of 3 without a .txt caption" in out and "walk_1.mp4 -> walk_1.txt" in out and "walk_0.mp4" not in out
    text = (tmp_path / "pipeline.toml").read_text()
    assert f'family = "{fam.name}"' in text and f'task = "{fam.default_task}"' in text
    frames = [int(x) for x in re.search(r"target_frames = \[([\d, ]+)\]", text)[1].split(",")]
    assert frames == sorted(frames) and all((f - 1) % 4 == 0 for f in frames) and max(frames) > 1
    # 24 fps clips are read at the family's rate: the shortest (40 frames) gives 27 frames at 16 fps
    assert "source_fps = 24.0" in text and max(frames) <= 40 * fam.target_fps / 24
    assert "gpu_memory_gib = 24" in text and "NOT FOUND" in out
    plan = compile_file(tmp_path / "pipeline.toml")
    assert [s.kind for s in plan.steps] == ["cache_latents", "cache_text_encoder", "train"]
    assert CliRunner().invoke(main, ["validate", "pipeline.toml"]).exit_code == 0
    res = CliRunner().invoke(main, ["plan", "pipeline.toml"])
    assert res.exit_code == 0 and "not found here" in res.output  # missing models: warnings, not errors


def test_new_on_images_for_an_image_family_and_the_bucket_from_their_size(tmp_path, media):
    images = copy(media / "images", tmp_path / "images")
    fam = next(f for f in registry.families() if f.output == "image" and not any(
        t.get("control_dataset") is True for t in (f.tasks.values() or [f.model])))
    res = new(images, "--family", fam.name, "--yes", "-o", "img.toml", "--gpu-gb", 80)
    assert res.exit_code == 0, res.output
    text = (tmp_path / "img.toml").read_text()
    assert "image_directory" in text and "video_directory" not in text and "target_frames" not in text
    assert "resolution = [96, 128]" in text and "bucket_no_upscale = true" in text  # small images are not enlarged
    compile_file(tmp_path / "img.toml")


def test_write_captions_writes_stubs_only_where_none_exists(tmp_path, media):
    clips = copy(media / "clips", tmp_path / "clips")
    res = new(clips, "--write-captions", "--gpu-gb", 24)
    assert res.exit_code == 0, res.output
    assert "wrote 2 caption stub(s)" in res.output and "every file has its .txt caption" in res.output
    assert (clips / "walk_0.txt").read_text() == "a person walking\n"  # kept as it was
    assert (clips / "walk_1.txt").read_text() == "walk 1\n"
    assert not [p for p in clips.iterdir() if p.name.endswith(".tmp")]


def test_write_new_never_replaces_a_file(tmp_path):
    target = tmp_path / "a.txt"
    assert P.write_new(target, "one") and target.read_text() == "one"
    assert not P.write_new(target, "two") and target.read_text() == "one"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert P.caption_from_name(Path("red_car-driving.01.mp4")) == "red car driving 01"


def test_an_existing_pipeline_is_never_replaced_without_force(tmp_path, media):
    clips = copy(media / "clips", tmp_path / "clips")
    (tmp_path / "pipeline.toml").write_text("mine\n")
    res = new(clips, "--yes")
    assert res.exit_code == 1 and "already exists" in res.output and "--force" in res.output
    assert (tmp_path / "pipeline.toml").read_text() == "mine\n"
    assert not (clips / "walk_1.txt").exists()  # a refused run writes nothing at all
    res = new(clips, "--yes", "--force", "--gpu-gb", 24)
    assert res.exit_code == 0 and (tmp_path / "pipeline.toml").read_text().startswith("# A pipeline for")


def test_refusals_name_the_problem_and_the_fix(tmp_path, media):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    res = new(tmp_path / "empty", "--yes")
    assert res.exit_code == 1 and "no images or videos here" in res.output and "fix:" in res.output
    res = new(copy(media / "clips", tmp_path / "clips"), "--family", "no-such-family", "--yes")
    assert res.exit_code == 1 and "unknown family 'no-such-family'" in res.output
    assert registry.default_family() in res.output
    res = new(tmp_path / "missing", "--yes")
    assert res.exit_code == 1 and "not a folder" in res.output
    image_family = next(f for f in registry.families() if f.output == "image")
    res = new(tmp_path / "clips", "--family", image_family.name, "--yes")
    assert res.exit_code == 1 and "trains on images" in res.output
    assert not (tmp_path / "pipeline.toml").exists()


def test_at_a_terminal_it_asks_family_task_and_gpu(tmp_path, media, monkeypatch):
    from musubi_pipe.tools import new_command

    clips = copy(media / "clips", tmp_path / "clips")
    monkeypatch.setattr(new_command, "_interactive", lambda yes: not yes)
    fam = registry.family(registry.default_family())
    task = fam.task_names()[1]
    res = new(clips, input=f"{fam.name}\n{task}\n12\n")
    assert res.exit_code == 0, res.output
    assert "family" in res.output and "task" in res.output and "GPU memory" in res.output
    text = (tmp_path / "pipeline.toml").read_text()
    assert f'task = "{task}"' in text and "gpu_memory_gib = 12" in text
    # --yes asks nothing, even at a terminal
    res = new(clips, "--yes", "-o", "b.toml", input="")
    assert res.exit_code == 0 and "family [" not in res.output and "gpu_memory_gib = 24" in (tmp_path / "b.toml").read_text()


def test_models_are_found_in_comfyui_home_models_and_the_config(tmp_path, media, isolated, monkeypatch):
    fam = registry.family(registry.default_family())
    task = fam.default_task
    slots = fam.needed_slots(task, ("cache_latents", "cache_text_encoder", "train"))
    comfy = tmp_path / "ComfyUI"
    spec = fam.models[slots[0]]
    dit = comfy / "models" / spec.folder / "sub" / spec.published(task)[0][-1]  # a subfolder, the last name
    dit.parent.mkdir(parents=True)
    dit.write_bytes(b"x")
    spec = fam.models[slots[1]]
    second = isolated / "models" / spec.published(task)[0][0]
    second.parent.mkdir(parents=True)
    second.write_bytes(b"x")
    cfg_models = tmp_path / "mine"
    spec = fam.models[slots[2]]
    (cfg_models / spec.published(task)[0][0]).parent.mkdir(parents=True)
    (cfg_models / spec.published(task)[0][0]).write_bytes(b"x")
    (tmp_path / "config.toml").write_text(f'model_dirs = ["{cfg_models.as_posix()}"]\n')
    monkeypatch.setenv("MUSUBI_PIPE_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setenv("COMFYUI_DIR", str(comfy))
    prop = P.propose(media / "clips", gpu_gib=24)
    paths = {m.slot: m.path for m in prop.models}
    assert paths[slots[0]] == dit and paths[slots[1]] == second
    assert paths[slots[2]] == cfg_models / fam.models[slots[2]].published(task)[0][0]
    text = prop.pipeline_toml(tmp_path / "p.toml")
    assert f'{slots[0]} = "{dit}"' in text
    # a slot not found gets ComfyUI's folder for it as the place to download to
    for slot in slots[3:]:
        assert str(comfy / "models" / fam.models[slot].folder) in text


@pytest.mark.parametrize("name", registry.family_names())
def test_every_family_and_task_gets_a_pipeline_that_validates(tmp_path, media, name):
    fam = registry.family(name)
    folders = [media / "images"] + ([media / "clips"] if fam.output == "video" else [])
    for task in fam.tasks or [None]:
        if fam.task(task).get("one_frame_only") or fam.task(task).get("multiple_target"):
            with pytest.raises(PipelineError, match="one-frame|several target images"):
                P.propose(folders[0], name, task, gpu_gib=48)
            continue
        for folder in folders:
            prop = P.propose(folder, name, task, gpu_gib=48)
            path = tmp_path / f"{folder.name}-{task}.toml"
            path.write_text(prop.pipeline_toml(path))
            try:
                compile_file(path)
            except PipelineError as exc:
                pytest.fail(f"{name} {task} {folder.name}:\n{exc}\n{path.read_text()}")


def test_long_clips_are_cut_into_windows_and_a_small_gpu_drops_what_does_not_fit(tmp_path):
    fam = registry.family(registry.default_family())
    for i in range(2):
        make_video(tmp_path / "long" / f"c{i}.mp4", n=200, fps=fam.target_fps, width=320, height=240)
    prop = P.propose(tmp_path / "long", gpu_gib=80)
    assert prop.source_fps is None and prop.frame_extraction == "chunk"
    assert max(prop.target_frames) == P.LONGEST_WINDOW
    assert all(len(prop.windows(m)) >= 2 for m in prop.videos)
    small = P.propose(tmp_path / "long", fam.name, fam.resolve_task("1.3b"), gpu_gib=2)
    assert small.memory is None or max(small.target_frames) <= P.LONGEST_WINDOW
    assert any("does not fit" in n or "memory:" in n for n in small.notes)


def test_unreadable_media_are_listed_not_fatal(tmp_path, media):
    clips = copy(media / "clips", tmp_path / "clips")
    (clips / "broken.mp4").write_bytes(b"not a video")
    prop = P.propose(clips, gpu_gib=24)
    assert "unreadable: broken.mp4" in prop.report() and len(prop.videos) == 3
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.mp4").write_bytes(b"nope")
    with pytest.raises(PipelineError, match="none of the 1 media files can be read"):
        P.propose(tmp_path / "bad", gpu_gib=24)


def test_no_file_is_written_by_a_proposal(tmp_path, media):
    clips = copy(media / "clips", tmp_path / "clips")
    before = sorted(os.listdir(clips))
    P.propose(clips, gpu_gib=24).report()
    assert sorted(os.listdir(clips)) == before


# ---- the ComfyUI node ---------------------------------------------------------------------------

def test_comfy_node_reports_and_writes_nothing_unless_asked(tmp_path, media):
    from musubi_pipe import NODE_CLASS_MAPPINGS
    from musubi_pipe.comfy_adapter.base import DEFAULT_TASK, NodeError

    node = NODE_CLASS_MAPPINGS["MusubiTuner_NewPipeline"]()
    fam = registry.family(registry.default_family())
    clips = copy(media / "clips", tmp_path / "clips")
    before = sorted(os.listdir(clips))
    out = node.propose("clips", fam.name, DEFAULT_TASK, 24.0, False)  # relative: from the input folder (here: cwd)
    report, toml = out["result"]
    assert "walk_1.mp4 -> walk_1.txt" in report and out["ui"]["text"] == [report]
    assert f'family = "{fam.name}"' in toml and "target_frames" in toml
    assert sorted(os.listdir(clips)) == before
    report = node.propose(str(clips), fam.name, fam.task_names()[1], 24.0, True)["result"][0]
    assert report.startswith("wrote 2 caption stub(s)") and (clips / "walk_2.txt").read_text() == "walk 2\n"
    assert (clips / "walk_0.txt").read_text() == "a person walking\n"
    # a folder a workflow may not write into: refused, nothing written
    with pytest.raises(NodeError, match="outside ComfyUI's input/output folders"):
        node.propose(str(media / "clips"), fam.name, DEFAULT_TASK, 24.0, True)
    assert not (media / "clips" / "walk_1.txt").exists()
    with pytest.raises(NodeError, match="no images or videos"):
        node.propose(str(tmp_path / "home"), fam.name, DEFAULT_TASK, 24.0, False)
    with pytest.raises(NodeError, match="media_folder is empty"):
        node.propose(" ", fam.name, DEFAULT_TASK, 0.0, False)


def test_an_output_in_a_missing_folder_is_refused_clearly(tmp_path, media):
    res = new(media / "clips", "--yes", "-o", tmp_path / "nope" / "p.toml")
    assert res.exit_code == 1 and "does not exist" in res.output and not (tmp_path / "nope").exists()


def test_init_records_model_folders_that_new_searches(tmp_path, monkeypatch):
    from musubi_pipe.executors.musubi_env import load_config

    (tmp_path / "musubi" / "src" / "musubi_tuner").mkdir(parents=True)
    (tmp_path / "weights").mkdir()
    res = CliRunner().invoke(main, ["init", "--musubi-dir", str(tmp_path / "musubi"), "--models-dir", str(tmp_path / "weights")])
    assert res.exit_code == 0, res.output
    assert load_config().model_dirs == [(tmp_path / "weights").resolve()]
    assert (tmp_path / "weights").resolve() in [p.resolve() for p in P.model_folders()]
    (tmp_path / "no-config.toml").write_text('model_dirs = "/one/folder"\n')
    with pytest.raises(PipelineError, match="expected a list of folder paths"):
        load_config()


def test_a_file_name_other_models_share_is_flagged_for_checking(tmp_path, media, monkeypatch):
    # the same generic file name published for different models (an autoencoder's ae.safetensors, say)
    by_name: dict = {}
    for fam in registry.families():
        for slot in fam.models.values():
            for task in (*fam.tasks, None):
                names, url = slot.published(task)
                for n in names:
                    by_name.setdefault(n, {})[url] = (fam, slot, task)
    name, pages = next((n, p) for n, p in by_name.items() if len(p) > 1 and any(
        f.output == "image" and s.name in f.needed_slots(t, ("cache_latents",)) for f, s, t in p.values()))
    fam, slot, task = next(v for v in pages.values() if v[0].output == "image" and v[1].name in v[0].needed_slots(v[2], ("cache_latents",)))
    comfy = tmp_path / "ComfyUI"
    (comfy / "models" / slot.folder).mkdir(parents=True)
    (comfy / "models" / slot.folder / name).write_bytes(b"x")
    monkeypatch.setenv("COMFYUI_DIR", str(comfy))
    prop = P.propose(media / "images", fam.name, task, gpu_gib=80)
    found = next(m for m in prop.models if m.slot == slot.name)
    assert found.path == comfy / "models" / slot.folder / name and found.also
    assert "check it is this one" in prop.report() and f"# CHECK: {name}" in prop.pipeline_toml(tmp_path / "p.toml")


def test_a_folder_a_pipeline_would_read_as_a_template_is_refused(tmp_path):
    make_image(tmp_path / "we{{ird}}" / "a.png", 64, 64)
    res = new(tmp_path / "we{{ird}}", "--yes")
    assert res.exit_code == 1 and "rename the folder" in res.output and not (tmp_path / "pipeline.toml").exists()
