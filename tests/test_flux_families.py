"""FLUX.1 Kontext and FLUX.2 (dev, klein 4B/9B and their base models) from their registry files: the
rules musubi-tuner 30c658c's flux_kontext_*.py and flux_2_*.py enforce at run time (or silently get
wrong), checked by the compiler with a fix; their memory facts and LoRA modules.

With MUSUBI_TUNER_DIR (a checkout with .venv), the facts are rebuilt from musubi's own model classes and
network modules on the meta device, and the generated dataset files pass musubi's dataset-config checks
for each architecture."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from musubi_pipe.compiler import compile_file, contract
from musubi_pipe.compiler.build import compile_pipeline
from musubi_pipe.dsl.load import parse_pipeline
from musubi_pipe.errors import PipelineError
from musubi_pipe.pipelines import registry

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = {"flux_kontext": ROOT / "pipelines/examples/flux_kontext_lora.toml",
            "flux_2": ROOT / "pipelines/examples/flux_2_klein_base_4b_lora.toml"}
REAL = os.environ.get("MUSUBI_TUNER_DIR")
REAL_PY = Path(REAL or "/nonexistent") / ".venv/bin/python"

KONTEXT = """
name = "fk"
family = "flux_kontext"
[models]
dit = "/m/flux1-kontext-dev.safetensors"
vae = "/m/ae.safetensors"
text_encoder1 = "/m/t5xxl_fp16.safetensors"
text_encoder2 = "/m/clip_l.safetensors"
"""
FLUX2 = """
name = "f2"
family = "flux_2"
task = "{task}"
[models]
dit = "/m/flux2.safetensors"
vae = "/m/ae.safetensors"
text_encoder = "/m/te-00001-of-00002.safetensors"
"""
PAIRS = '[[dataset.datasets]]\nimage_directory = "/d/img"\ncontrol_directory = "/d/ctl"\ncache_directory = "/d/cache"\nresolution = [512, 512]\n'
IMAGES = '[[dataset.datasets]]\nimage_directory = "/d/img"\ncache_directory = "/d/cache"\nresolution = [512, 512]\n'
TRAIN = '[stages.train]\nkind = "train"\nmax_train_epochs = 1\n'


def compile_text(text: str):
    pipeline, source = parse_pipeline(text, file=str(ROOT / "p.toml"), fmt="toml")
    return compile_pipeline(pipeline, source)


def problems(text: str) -> str:
    with pytest.raises(PipelineError) as err:
        compile_text(text)
    return str(err.value)


def kontext(dataset: str = PAIRS, stages: str = TRAIN) -> str:
    return KONTEXT + dataset + stages


def flux2(task: str = "klein-base-4b", dataset: str = IMAGES, stages: str = TRAIN) -> str:
    return FLUX2.format(task=task) + dataset + stages


def option(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


# --- identity ----------------------------------------------------------------------------------

def test_families_are_known_by_musubis_names_and_flux2_versions_are_its_model_versions():
    assert registry.family("fk").name == "flux_kontext" and registry.family("flux_2_klein_9b").name == "flux_2"
    assert registry.family_of_modelspec("Flux.1-dev/lora") == "flux_kontext"
    assert registry.family_of_modelspec("Flux.2-klein-4b/lora") == "flux_2"
    choices = contract.options("flux_2_train_network.py")["model_version"].choices
    assert set(registry.family("flux_2").tasks) == set(choices)
    recorded = json.loads((ROOT / "pipelines/musubi_cli" / contract.CONTRACT / "flux_2_train_network.json").read_text())
    default = next(a["default"] for a in recorded["args"] if a["dest"] == "model_version")
    assert registry.family("flux_2").default_task == default == "dev"


# --- FLUX.1 Kontext ----------------------------------------------------------------------------

def test_kontext_trains_only_on_control_image_pairs():
    assert "trains on pairs of control and target images" in problems(kontext(IMAGES))
    plan = compile_text(kontext(stages='[stages.lat]\nkind = "cache_latents"\n[stages.te]\nkind = "cache_text_encoder"\nfp8_text_encoder = true\n' + TRAIN))
    assert plan.step("lat").outputs[0].pattern == "*_fk.safetensors"
    te = plan.step("te").args
    assert "--fp8_t5" in te and option(te, "--text_encoder1").endswith("t5xxl_fp16.safetensors") and "--text_encoder2" in te
    train = plan.step("train").args
    assert option(train, "--network_module") == "networks.lora_flux" and option(train, "--timestep_sampling") == "flux_shift"
    assert "--vae" not in train and "--text_encoder1" not in train  # loaded only for samples


def test_kontext_samples_need_both_text_encoders():
    text = kontext(stages='[stages.train]\nkind = "train"\nmax_train_epochs = 1\nsample_prompts = [{ text = "x" }]\n')
    train = compile_text(text).step("train").args
    assert "--text_encoder1" in train and "--text_encoder2" in train and "--vae" in train
    assert "models.text_encoder2 is required to make samples" in problems(text.replace('text_encoder2 = "/m/clip_l.safetensors"\n', ""))


def test_kontext_caching_refuses_a_vae_dtype():
    found = problems(kontext(stages='[stages.lat]\nkind = "cache_latents"\nvae_dtype = "bfloat16"\n'))
    assert "VAE dtype is not supported in FLUX.1 Kontext" in found and "fix: remove vae_dtype" in found


def test_kontext_generation_takes_exactly_one_control_image():
    gen = '[stages.gen]\nkind = "generate"\nprompt = "make it blue"\n'
    assert "generates from a control image" in problems(kontext(" ", gen))
    assert "takes 1 control image(s), got 2" in problems(kontext(" ", gen + 'control_image_path = ["/a.png", "/b.png"]\n'))
    step = compile_text(kontext(" ", gen + 'control_image_path = ["/a.png"]\n')).step("gen")
    assert option(step.args, "--control_image_path") == "/a.png" and step.outputs[0].pattern == "*.png"
    assert "not a multiple of 16" in problems(kontext(" ", gen + 'control_image_path = ["/a.png"]\nimage_size = [1000, 1024]\n'))


def test_kontext_block_swap_is_at_most_34():
    assert "swaps at most 34 blocks, got 35" in problems(kontext(stages='[stages.train]\nkind = "train"\nmax_train_epochs = 1\nblocks_to_swap = 35\n'))


# --- FLUX.2 ------------------------------------------------------------------------------------

def test_flux2_version_picks_model_version_and_cache_architecture():
    for task, arch in (("dev", "f2d"), ("klein-4b", "f2k4b"), ("klein-base-4b", "f2k4b"), ("klein-9b", "f2k9b"), ("klein-base-9b", "f2k9b")):
        plan = compile_text(flux2(task, stages='[stages.lat]\nkind = "cache_latents"\n[stages.te]\nkind = "cache_text_encoder"\n' + TRAIN))
        for step in plan.steps:
            assert option(step.args, "--model_version") == task, step.id
        assert plan.step("lat").outputs[0].pattern == f"*_{arch}.safetensors"
        assert plan.step("te").outputs[0].pattern == f"*_{arch}_te.safetensors"
        train = plan.step("train").args
        assert option(train, "--network_module") == "networks.lora_flux_2" and option(train, "--timestep_sampling") == "flux2_shift"


def test_flux2_control_images_are_optional_and_several_are_allowed():
    plain, pairs = compile_text(flux2(dataset=IMAGES)), compile_text(flux2(dataset=PAIRS))
    assert not any("control" in w for w in plain.warnings + pairs.warnings)
    gen = '[stages.gen]\nkind = "generate"\nprompt = "a cat"\n'
    assert "--control_image_path" not in compile_text(flux2(dataset=" ", stages=gen)).step("gen").args
    step = compile_text(flux2(dataset=" ", stages=gen + 'control_image_path = ["/a.png", "/b.png", "/c.png"]\n')).step("gen")
    i = step.args.index("--control_image_path")
    assert step.args[i + 1:i + 4] == ["/a.png", "/b.png", "/c.png"]


def test_flux2_dev_refuses_an_fp8_text_encoder_that_klein_takes():
    te = '[stages.te]\nkind = "cache_text_encoder"\nfp8_text_encoder = true\n'
    found = problems(flux2("dev", stages=te))
    assert "fp8_text_encoder is only for klein-4b" in found and "not dev" in found
    assert "--fp8_text_encoder" in compile_text(flux2("klein-9b", stages=te)).step("te").args
    # the memory ladder never reaches for it either
    for fallback in compile_text(flux2("dev", stages='[stages.te]\nkind = "cache_text_encoder"\n')).step("te").fallbacks:
        assert "--fp8_text_encoder" not in fallback.args


def test_flux2_distilled_klein_generates_in_4_steps():
    gen = '[stages.gen]\nkind = "generate"\nprompt = "a cat"\n'
    assert option(compile_text(flux2("klein-4b", " ", gen)).step("gen").args, "--infer_steps") == "4"
    assert "--infer_steps" not in compile_text(flux2("klein-base-4b", " ", gen)).step("gen").args  # the script's 50
    assert option(compile_text(flux2("klein-9b", " ", gen + "infer_steps = 8\n")).step("gen").args, "--infer_steps") == "8"


def test_flux2_block_swap_maxima_follow_the_docs_table():
    fam = registry.family("flux_2")
    assert [fam.dit(t).max_blocks_to_swap for t in ("dev", "klein-4b", "klein-base-9b")] == [29, 13, 16]
    assert "swaps at most 13 blocks, got 14" in problems(flux2("klein-4b", stages='[stages.train]\nkind = "train"\nmax_train_epochs = 1\nblocks_to_swap = 14\n'))


def test_flux2_merge_goes_through_generate_with_lycoris():
    m = compile_text(flux2("dev", stages='[stages.m]\nkind = "merge"\nloras = ["/l/a.safetensors"]\n')).step("m")
    assert m.script == "flux_2_generate_image.py" and "--lycoris" in m.args and option(m.args, "--model_version") == "dev"


# --- memory and LoRA tools ---------------------------------------------------------------------

def test_planner_says_its_flux_figures_are_estimates():
    from musubi_pipe.tools.memory import plan_memory

    for family, task in (("flux_kontext", None), ("flux_2", "klein-base-9b")):
        plan = plan_memory(family, task, 24.0, (1024, 1024))
        assert "nothing was measured" in plan.why["estimate"] and "control image" in plan.why["estimate"]
        assert plan.tokens == 2 * 64 * 64
        assert plan.chosen.settings.blocks_to_swap <= registry.family(family).dit(plan.task).max_blocks_to_swap


def test_lora_modules_are_told_apart_by_names_and_shapes():
    """FLUX.1 Kontext, FLUX.2 and HunyuanVideo share module names; a LoRA without metadata still finds its family."""
    from musubi_pipe.tools.lora import LoraModule, _guess_family, target_modules

    counts = {("flux_kontext", "kontext"): 228, ("flux_2", "dev"): 160, ("flux_2", "klein-4b"): 80, ("flux_2", "klein-9b"): 112,
              ("hunyuan_video", "t2v"): 240}
    for (family, variant), count in counts.items():
        targets = target_modules(family, variant)
        assert len(targets) == count
        modules = {n: LoraModule(n, m.module, "lora", {}, 4, 4.0, m.in_features, m.out_features) for n, m in targets.items()}
        assert _guess_family(modules) == (family, variant)


def test_comfyui_conversion_names_flux_modules_as_the_model_does():
    from musubi_pipe.tools.lora import target_modules

    names = {m.module for m in target_modules("flux_2", "klein-4b").values()}
    assert {"double_blocks.0.img_attn_qkv", "double_blocks.4.txt_mlp.2", "single_blocks.19.linear1"} <= names


# --- a real musubi-tuner checkout --------------------------------------------------------------

FACTS = r"""
import json, logging, warnings
logging.disable(logging.CRITICAL); warnings.filterwarnings("ignore")
import torch, torch.nn as nn
from musubi_tuner.flux import flux_models
from musubi_tuner.flux_2 import flux2_models, flux2_utils
from musubi_tuner.networks import lora_flux, lora_flux_2
def kind(b):
    return [len(b), sum(p.numel() for p in b[0].parameters()), sum(m.weight.numel() for m in b[0].modules() if isinstance(m, nn.Linear))]
def facts(model, net):
    lora = net.create_arch_network(1.0, 4, 1.0, None, [], model)
    return {"params": sum(p.numel() for p in model.parameters()), "blocks": [kind(model.double_blocks), kind(model.single_blocks)],
            "lora": {m.lora_name: [m.lora_down.in_features, m.lora_up.out_features] for m in lora.unet_loras}}
out = {}
with torch.device("meta"):
    out["kontext"] = facts(flux_models.Flux(flux_models.configs_flux_dev_context.params, "torch", False), lora_flux)
    for version, info in flux2_utils.FLUX2_MODEL_INFO.items():
        out[version] = facts(flux2_models.Flux2(info.params, "torch", False), lora_flux_2)
print("FACTS " + json.dumps(out))
"""


@pytest.mark.skipif(not REAL_PY.exists(), reason="set MUSUBI_TUNER_DIR to a musubi-tuner checkout with .venv")
def test_memory_facts_and_lora_modules_are_musubis_own(tmp_path):
    from musubi_pipe.tools.lora import target_modules

    (tmp_path / "facts.py").write_text(FACTS)
    run = subprocess.run([str(REAL_PY), str(tmp_path / "facts.py")], capture_output=True, text=True, timeout=600)
    line = next((l for l in run.stdout.splitlines() if l.startswith("FACTS ")), None)
    assert line, run.stderr[-3000:]
    measured = json.loads(line[len("FACTS "):])
    for family, task in [("flux_kontext", None)] + [("flux_2", t) for t in registry.family("flux_2").tasks]:
        fam = registry.family(family)
        dit, got = fam.dit(task), measured[task or "kontext"]
        assert dit.params == got["params"], task
        assert [[b.count, b.params, b.linear_weights] for b in dit.blocks] == got["blocks"], task
        assert {n: [m.in_features, m.out_features] for n, m in target_modules(family, dit.task).items()} == got["lora"], task


@pytest.mark.skipif(not REAL_PY.exists(), reason="set MUSUBI_TUNER_DIR to a musubi-tuner checkout with .venv")
@pytest.mark.parametrize("family", sorted(EXAMPLES))
def test_generated_dataset_passes_musubis_checks_for_the_architecture(family, tmp_path):
    plan = compile_file(EXAMPLES[family])
    [dataset] = [f for f in plan.files if f.path.endswith("dataset.toml")]
    (tmp_path / "dataset.toml").write_text(dataset.content)
    arch = plan.step("train").meta["cache_arch"]
    code = ("import sys, argparse; from musubi_tuner.dataset.config_utils import BlueprintGenerator, ConfigSanitizer, load_user_config;"
            "user = load_user_config(sys.argv[1]); BlueprintGenerator(ConfigSanitizer()).generate(user, argparse.Namespace(), architecture=sys.argv[2]);"
            "print('valid')")
    run = subprocess.run([str(REAL_PY), "-c", code, str(tmp_path / "dataset.toml"), arch], capture_output=True, text=True, timeout=300, cwd=REAL)
    assert run.stdout.strip().endswith("valid"), run.stderr[-2000:]
