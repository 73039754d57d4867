"""Image families (Qwen-Image and its Edit/Layered versions, Z-Image): what the compiler checks
before anything runs, what the plans declare, and the LoRA tools' knowledge of them. Each rule here
is one musubi-tuner enforces at run time (or silently gets wrong) in 30c658c's scripts and docs."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from musubi_pipe.compiler import compile_pipeline
from musubi_pipe.dsl.load import parse_pipeline
from musubi_pipe.errors import PipelineError
from musubi_pipe.pipelines import registry

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "pipelines" / "examples"
IMAGE_FAMILIES = [f.name for f in registry.families() if f.output == "image"]

QWEN_MODELS = """
[models]
dit = "/m/qwen_image_bf16.safetensors"
vae = "/m/vae.safetensors"
text_encoder = "/m/qwen_2.5_vl_7b.safetensors"
"""


def compile_text(text: str, folder: Path = ROOT):
    pipeline, source = parse_pipeline(text, file=str(folder / "p.toml"), fmt="toml")
    return compile_pipeline(pipeline, source)


def problems(text: str, folder: Path = ROOT) -> list[str]:
    with pytest.raises(PipelineError) as exc:
        compile_text(text, folder)
    return [str(p) for p in exc.value.problems]


def qwen(task: str | None, dataset: str = "", stages: str = "") -> str:
    head = f'name = "q"\nfamily = "qwen_image"\n' + (f'task = "{task}"\n' if task else "")
    dataset = dataset.strip() + "\n" if dataset else '[[dataset.datasets]]\nimage_directory = "/d/img"\nresolution = [512, 512]\n'
    stages = stages or '[stages.train]\nkind = "train"\nmax_train_epochs = 1\n'
    return head + QWEN_MODELS + dataset + stages


# --- identity and tasks ------------------------------------------------------------------

def test_image_families_are_known_by_their_musubi_names():
    assert {"qwen_image", "zimage"} <= set(IMAGE_FAMILIES)
    assert registry.family("qie").name == "qwen_image"  # the Edit caches' architecture
    assert registry.family("z_image").name == "zimage"  # musubi's full name
    assert registry.family_of_modelspec("Qwen-Image-Edit-2511/lora") == "qwen_image"
    assert registry.family_of_modelspec("Z-Image/lora") == "zimage"
    assert set(registry.family("qwen_image").tasks) == {"original", "edit", "edit-2509", "edit-2511", "layered"}


def test_the_version_goes_to_every_script_as_model_version_and_picks_the_cache_architecture():
    plan = compile_text(qwen("edit-2509", '[[dataset.datasets]]\nimage_directory = "/d/img"\ncontrol_directory = "/d/ctl"\nresolution = [512, 512]\n',
                             '[stages.lat]\nkind = "cache_latents"\n[stages.te]\nkind = "cache_text_encoder"\n'
                             '[stages.train]\nkind = "train"\nmax_train_epochs = 1\n'
                             '[stages.gen]\nkind = "generate"\nprompt = "x"\ncontrol_image_path = ["/d/a.png", "/d/b.png"]\n'))
    for step in plan.steps:
        assert step.args[step.args.index("--model_version") + 1] == "edit-2509", step.id
        assert "--task" not in step.args
    assert plan.step("lat").outputs[0].pattern == "*_qie.safetensors"
    assert plan.step("te").outputs[0].pattern == "*_qie_te.safetensors"
    assert plan.step("train").meta["cache_arch"] == "qie"
    gen = plan.step("gen")
    assert gen.args[gen.args.index("--control_image_path") + 1: gen.args.index("--control_image_path") + 3] == ["/d/a.png", "/d/b.png"]
    assert [i.path for i in gen.inputs if i.name.startswith("control_image")] == ["/d/a.png", "/d/b.png"]


def test_a_family_without_tasks_refuses_one():
    text = 'name = "z"\nfamily = "zimage"\ntask = "t2i"\n[stages.g]\nkind = "generate"\nprompt = "x"\n'
    assert any("Z-Image has no tasks" in p for p in problems(text))


# --- datasets ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen_image", "zimage"])
def test_a_video_dataset_is_refused_for_an_image_family(family):
    text = (f'name = "v"\nfamily = "{family}"\n[models]\ndit = "/m/d.safetensors"\n'
            '[[dataset.datasets]]\nvideo_directory = "/d/clips"\nresolution = [512, 512]\ntarget_frames = [1]\n'
            '[stages.t]\nkind = "train"\nmax_train_epochs = 1\n')
    found = problems(text)
    assert any("trains on images, and this is a video dataset" in p and "image_directory" in p for p in found), found


@pytest.mark.parametrize("task", ["edit", "edit-2509", "edit-2511"])
def test_edit_training_needs_control_images(task):
    found = problems(qwen(task))
    assert any("pairs of control and target images" in p and "control_directory" in p for p in found), found
    compile_text(qwen(task, '[[dataset.datasets]]\nimage_directory = "/d/img"\ncontrol_directory = "/d/ctl"\nresolution = [512, 512]\n'))


def test_a_jsonl_dataset_gives_its_control_images_per_line(tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(json.dumps({"image_path": "a.png", "control_path_0": "c.png", "caption": "x"}) + "\n")
    bad.write_text(json.dumps({"image_path": "a.png", "caption": "x"}) + "\n")
    ds = '[[dataset.datasets]]\nimage_jsonl_file = "{}"\ncache_directory = "/d/cache"\nresolution = [512, 512]\n'
    compile_text(qwen("edit", ds.format(good)), tmp_path)
    found = problems(qwen("edit", ds.format(bad)), tmp_path)
    assert any("no control images" in p and "control_path" in p for p in found), found


def test_control_images_where_the_model_uses_none_are_a_warning():
    plan = compile_text('name = "z"\nfamily = "zimage"\n[models]\ndit = "/m/d.safetensors"\n'
                        '[[dataset.datasets]]\nimage_directory = "/d/img"\ncontrol_directory = "/d/ctl"\nresolution = [512, 512]\n'
                        '[stages.t]\nkind = "train"\nmax_train_epochs = 1\n')
    assert any("Z-Image ignores control images" in w and "remove control_directory" in w for w in plan.warnings)
    plan = compile_text(qwen(None, '[[dataset.datasets]]\nimage_directory = "/d/img"\ncontrol_directory = "/d/ctl"\nresolution = [512, 512]\n'))
    assert any("only the edit tasks" in w and "edit-2511" in w for w in plan.warnings)


def test_layered_training_needs_several_targets_and_only_it_takes_them():
    found = problems(qwen("layered"))
    assert any("several target images" in p and "multiple_target = true" in p for p in found), found
    multi = '[[dataset.datasets]]\nimage_directory = "/d/img"\nmultiple_target = true\nresolution = [512, 512]\n'
    compile_text(qwen("layered", multi))
    assert any("multiple_target is for layered training" in p for p in problems(qwen("edit", multi.replace("multiple_target", 'control_directory = "/d/c"\nmultiple_target'))))


def test_a_resolution_off_the_16_pixel_grid_is_refused_without_buckets():
    off = '[[dataset.datasets]]\nimage_directory = "/d/img"\nresolution = [1000, 520]\n'
    found = problems(qwen(None, off))
    assert any("not a multiple of 16" in p and "[992, 512]" in p for p in found), found
    compile_text(qwen(None, off + "enable_bucket = true\n"))  # buckets land on the grid themselves


# --- training ----------------------------------------------------------------------------

def test_training_uses_the_familys_network_and_its_docs_settings():
    train = compile_text(qwen(None)).step("train")
    a = train.args
    assert a[a.index("--network_module") + 1] == "networks.lora_qwen_image"
    assert a[a.index("--discrete_flow_shift") + 1] == "2.2" and a[a.index("--network_dim") + 1] == "16"
    assert "--vae" not in a and "--text_encoder" not in a  # loaded only for samples during training


def test_options_of_one_version_are_refused_on_the_others():
    found = problems(qwen(None, stages='[stages.train]\nkind = "train"\nmax_train_epochs = 1\nextra_args = { remove_first_image_from_target = true }\n'))
    assert any("remove_first_image_from_target is only for layered" in p for p in found), found
    compile_text(qwen("layered", '[[dataset.datasets]]\nimage_directory = "/d/img"\nmultiple_target = true\nresolution = [512, 512]\n',
                      '[stages.train]\nkind = "train"\nmax_train_epochs = 1\nextra_args = { remove_first_image_from_target = true }\n'))


def test_sample_prompts_of_an_image_family_have_no_frame_count():
    found = problems(qwen(None, stages='[stages.train]\nkind = "train"\nmax_train_epochs = 1\nsample_prompts = [{ text = "x", frames = 9 }]\n'))
    assert any("makes images, not videos" in p for p in found), found


# --- generation --------------------------------------------------------------------------

def gen(task: str | None, body: str) -> str:
    return qwen(task, " ", '[stages.gen]\nkind = "generate"\nprompt = "a cat"\n' + body)  # no dataset


def test_generation_declares_png_images_or_latents():
    step = compile_text(gen(None, "")).step("gen")
    assert step.outputs[0].name == "images" and step.outputs[0].pattern == "*.png"
    assert compile_text(gen(None, 'output_type = "latent"\n')).step("gen").outputs[0].pattern == "*.safetensors"
    assert any("video_length is not an option" in p for p in problems(gen(None, "video_length = 9\n")))


def test_edit_generation_needs_its_control_image_and_2511_the_official_size():
    assert any("generates from a control image" in p for p in problems(gen("edit", "")))
    assert any("takes 1 control image(s), got 2" in p for p in problems(gen("edit", 'control_image_path = ["/a.png", "/b.png"]\n')))
    assert any("takes no control image" in p for p in problems(gen(None, 'control_image_path = ["/a.png"]\n')))
    step = compile_text(gen("edit-2511", 'control_image_path = ["/a.png"]\n')).step("gen")
    assert "--resize_control_to_official_size" in step.args
    found = problems(gen("edit-2511", 'control_image_path = ["/a.png"]\nextra_args = { resize_control_to_image_size = true }\n'))
    assert any("cannot be used together" in p for p in found), found


def test_the_image_size_is_on_the_16_pixel_grid():
    found = problems(gen(None, "image_size = [1000, 1024]\n"))
    assert any("not a multiple of 16" in p and "[992, 1024]" in p for p in found), found


def test_merging_goes_through_the_generate_script_with_lycoris():
    plan = compile_text(qwen(None, stages='[stages.m]\nkind = "merge"\nloras = ["/l/a.safetensors"]\n'))
    m = plan.step("m")
    assert m.script == "qwen_image_generate_image.py" and "--lycoris" in m.args and "--save_merged_model" in m.args


# --- memory ------------------------------------------------------------------------------

def test_the_planner_says_its_figures_for_an_image_family_are_estimates():
    from musubi_pipe.tools.memory import plan_memory

    plan = plan_memory("zimage", None, 24, (1024, 1024), frames=33)
    assert plan.tokens == 64 * 64  # one image: the frame count is ignored
    assert "nothing was measured for Z-Image" in plan.why["estimate"]
    edit = plan_memory("qwen_image", "edit-2511", 24, (1024, 1024))
    assert edit.tokens == 2 * 64 * 64 and "control image" in edit.why["estimate"]


# --- LoRA tools --------------------------------------------------------------------------

def _lora(path: Path, names_shapes: dict[str, tuple[int, int]], rank: int = 4) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    tensors = {}
    for name, (fin, fout) in names_shapes.items():
        tensors[f"{name}.lora_down.weight"] = np.zeros((rank, fin), np.float32)
        tensors[f"{name}.lora_up.weight"] = np.zeros((fout, rank), np.float32)
        tensors[f"{name}.alpha"] = np.array(rank, np.float32)
    save_file(tensors, str(path))
    return path


def test_lora_inspect_tells_image_families_from_module_names(tmp_path):
    from musubi_pipe.tools.lora import read_lora, target_modules

    qwen_targets = target_modules("qwen_image")
    assert len(qwen_targets) == 60 * 14 and len(target_modules("zimage")) == 30 * 7
    q = _lora(tmp_path / "q.safetensors", {f"lora_unet_transformer_blocks_0_{m}": s for m, s in (
        ("attn_to_q", (3072, 3072)), ("attn_add_k_proj", (3072, 3072)), ("img_mlp_net_0_proj", (3072, 12288)),
        ("txt_mlp_net_2", (12288, 3072)))})
    report = read_lora(q)
    assert report.family == "qwen_image" and not report.coverage.wrong_shape and not report.coverage.unknown
    z = _lora(tmp_path / "z.safetensors", {"lora_unet_layers_3_attention_to_k": (3840, 3840), "lora_unet_layers_3_feed_forward_w2": (10240, 3840)})
    assert read_lora(z).family == "zimage"
    # FramePack shares attention names with Qwen-Image; its feed-forward names still decide.
    fp = _lora(tmp_path / "fp.safetensors", {"lora_unet_transformer_blocks_0_attn_to_q": (3072, 3072),
                                             "lora_unet_transformer_blocks_0_ff_net_0_proj": (3072, 12288),
                                             "lora_unet_transformer_blocks_0_ff_context_net_2": (12288, 3072)})
    assert read_lora(fp).family == "framepack"


# --- the design goal: a family is a data file --------------------------------------------

@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_no_product_file_spells_an_image_family(family):
    """Files an image family touched outside its registry file, examples and tests: 0."""
    from test_registry_design import product_files

    fam = registry.family(family)
    words = {fam.name, fam.short, fam.full, *fam.aliases, *(t.get("cache_arch") for t in fam.tasks.values() if t.get("cache_arch"))}
    others = {s.script for f in registry.families() if f.name != family for s in f.stages.values()}
    words |= {s.script for s in fam.stages.values() if s.script not in others} | {fam.network_module}
    hits = []
    for path in product_files():
        text = path.read_text(encoding="utf-8")
        hits += [f"{path.relative_to(ROOT)}: {w}" for w in words if f'"{w}"' in text or f"'{w}'" in text]
    assert hits == []


# --- a real musubi-tuner checkout --------------------------------------------------------

REAL = os.environ.get("MUSUBI_TUNER_DIR")


@pytest.mark.skipif(not REAL, reason="set MUSUBI_TUNER_DIR to a musubi-tuner checkout to run")
def test_real_musubi_accepts_every_generated_dataset_config(tmp_path):
    from musubi_pipe.compiler import compile_file

    python = Path(REAL) / ".venv/bin/python"
    files = []
    for example in sorted(EXAMPLES.glob("*.toml")) + sorted(EXAMPLES.glob("*.yaml")):
        if example.name == "dataset.toml":
            continue
        for gen in compile_file(example).files:
            if "[[datasets]]" in gen.content:
                f = tmp_path / f"{example.stem}.toml"
                f.write_text(gen.content)
                files.append(str(f))
    assert any("qwen" in f for f in files) and any("zimage" in f for f in files)
    code = ("import sys; from musubi_tuner.dataset.config_utils import ConfigSanitizer, load_user_config\n"
            "for f in sys.argv[1:]: ConfigSanitizer().sanitize_user_config(load_user_config(f))\nprint('valid')")
    run = subprocess.run([str(python), "-c", code, *files], capture_output=True, text=True, timeout=300)
    assert run.stdout.strip().endswith("valid"), run.stderr[-2000:]


# A random one-layer Qwen-Image DiT (musubi's own class and key names; --num_layers 1 is musubi's
# option) and synthetic caches written by musubi's own dataset code and cache writers: the text
# encoder (Qwen2.5-VL 7B) and the VAE are too large to run here, the DiT block is real.
TINY_QWEN = r'''
import argparse, sys
import torch
from safetensors.torch import save_file
from musubi_tuner.qwen_image import qwen_image_model
from musubi_tuner.dataset import config_utils
from musubi_tuner.dataset.config_utils import BlueprintGenerator, ConfigSanitizer
from musubi_tuner.dataset.image_video_dataset import ARCHITECTURE_QWEN_IMAGE
from musubi_tuner.dataset.cache_io import save_latent_cache_qwen_image, save_text_encoder_output_cache_qwen_image

dit_path, dataset_config = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = qwen_image_model.QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=1,
    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
save_file({k: (v * 0.02 if v.ndim > 1 else v).to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}, dit_path)
del model
blueprint = BlueprintGenerator(ConfigSanitizer()).generate(config_utils.load_user_config(dataset_config),
                                                           argparse.Namespace(debug_dataset=False), architecture=ARCHITECTURE_QWEN_IMAGE)
for dataset in config_utils.generate_dataset_group_by_blueprint(blueprint.dataset_group).datasets:
    for _, batch in dataset.retrieve_latent_cache_batches(1):
        for item in batch:
            w, h = item.bucket_size
            save_latent_cache_qwen_image(item, torch.randn(16, 1, h // 8, w // 8), None)
    for batch in dataset.retrieve_text_encoder_output_cache_batches(1):
        for item in batch:
            save_text_encoder_output_cache_qwen_image(item, torch.randn(7, 3584, dtype=torch.bfloat16))
'''

TINY_PIPELINE = """
name = "tiny-qwen"
family = "qwen_image"
[models]
dit = "{dit}"
[dataset.general]
resolution = [64, 64]
caption_extension = ".txt"
batch_size = 1
[[dataset.datasets]]
image_directory = "{data}/images"
cache_directory = "{data}/cache"
[stages.train]
kind = "train"
optimizer_type = "AdamW"          # adamw8bit's bitsandbytes wants a GPU
gradient_checkpointing = false
network_dim = 4
max_train_steps = 3
save_every_n_steps = 2
max_data_loader_n_workers = 0
persistent_data_loader_workers = false
extra_args = {{ num_layers = 1 }}
"""


@pytest.mark.skipif(not REAL, reason="set MUSUBI_TUNER_DIR to a musubi-tuner checkout to run")
def test_real_qwen_image_lora_steps_on_cpu_through_musubi_pipe_run(tmp_path, monkeypatch):
    """`musubi-pipe run` trains a few LoRA steps with the real qwen_image_train_network.py on a tiny random DiT."""
    from click.testing import CliRunner
    from PIL import Image

    from musubi_pipe.cli import main
    from musubi_pipe.compiler import compile_file
    from musubi_pipe.tools.lora import read_lora

    monkeypatch.setenv("MUSUBI_PIPE_CONFIG", str(tmp_path / "no-config.toml"))
    (tmp_path / "images").mkdir()
    for n in ("a", "b"):
        Image.new("RGB", (64, 64), (200, 40 * ord(n) % 255, 50)).save(tmp_path / "images" / f"{n}.png")
        (tmp_path / "images" / f"{n}.txt").write_text(f"a square {n}")
    pipeline = tmp_path / "tiny.toml"
    pipeline.write_text(TINY_PIPELINE.format(dit=tmp_path / "dit.safetensors", data=tmp_path))
    dataset = next(f for f in compile_file(pipeline).files if "[[datasets]]" in f.content)
    (tmp_path / "dataset.toml").write_text(dataset.content)
    (tmp_path / "tiny_qwen.py").write_text(TINY_QWEN)
    made = subprocess.run([str(Path(REAL) / ".venv/bin/python"), str(tmp_path / "tiny_qwen.py"), str(tmp_path / "dit.safetensors"),
                           str(tmp_path / "dataset.toml")], capture_output=True, text=True, cwd=REAL, timeout=600)
    assert made.returncode == 0, made.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "a_0064x0064_qi.safetensors", "a_qi_te.safetensors", "b_0064x0064_qi.safetensors", "b_qi_te.safetensors"]

    r = CliRunner().invoke(main, ["run", str(pipeline), "--plain"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "musubi-out" / "tiny-qwen" / "train"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["tiny-qwen-step00000002.safetensors", "tiny-qwen.safetensors"]
    report = read_lora(out / "tiny-qwen.safetensors")
    # the registry's module list is what musubi trained: every module of the one block, real shapes
    assert report.family == "qwen_image" and report.coverage.matched == 14
    assert not report.coverage.unknown and not report.coverage.wrong_shape
    r = CliRunner().invoke(main, ["run", str(pipeline), "--plain"])
    assert r.exit_code == 0 and "running 0 step(s)" in r.output, r.output
