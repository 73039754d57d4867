"""HiDream-O1, Ideogram 4 and Krea 2: the rules their musubi-tuner 30c658c scripts enforce, checked by
the compiler with a message and a fix; the plans (PNG outputs, positional prompts, one-file outputs,
--task and --model_type); LoRA modules and memory facts; every example run through the test double.
With MUSUBI_TUNER_DIR, the parameter counts and LoRA modules are rebuilt from musubi's own classes on
the meta device and the generated datasets pass musubi's checks for each architecture."""
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
EXAMPLES = {"hidream_o1": ROOT / "pipelines/examples/hidream_o1_i2i_lora.toml",
            "ideogram4": ROOT / "pipelines/examples/ideogram4_lora.toml",
            "krea2": ROOT / "pipelines/examples/krea2_lora.toml"}
FAMILIES = tuple(EXAMPLES)
REAL = os.environ.get("MUSUBI_TUNER_DIR")
REAL_PY = Path(REAL or "/nonexistent") / ".venv/bin/python"
JSON_PROMPT = '{"compositional_deconstruction": {"background": "sea", "elements": []}}'


def compile_text(text: str):
    pipeline, source = parse_pipeline(text, file=str(ROOT / "p.toml"), fmt="toml")
    return compile_pipeline(pipeline, source)


def problems(text: str) -> str:
    with pytest.raises(PipelineError) as exc:
        compile_text(text)
    return "\n".join(f"{p.message} | fix: {p.fix}" for p in exc.value.problems if p.severity == "error")


def pipeline(family: str, stages: str, task: str | None = None, dataset: str = "", models: str = "") -> str:
    fam = registry.family(family)
    head = f'name = "p"\nfamily = "{family}"\n' + (f'task = "{task}"\n' if task else "")
    slots = "".join(f'{s} = "/m/{s}.safetensors"\n' for s in fam.models if s not in ("turbo_dit", "unconditional_dit"))
    dataset = dataset or '[[dataset.datasets]]\nimage_directory = "/d/img"\ncache_directory = "/d/cache"\nresolution = [512, 512]\n'
    return head + "[models]\n" + slots + models + dataset + stages


TRAIN = '[stages.train]\nkind = "train"\nmax_train_epochs = 1\n'


def arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


# --- identity --------------------------------------------------------------------------------

def test_families_are_known_by_musubis_names_and_caches():
    assert registry.family("ho1").name == "hidream_o1" and registry.family("hidream_o1_image").name == "hidream_o1"
    assert registry.family("i4").name == "ideogram4" and registry.family("kr2").name == "krea2"
    assert registry.family_of_modelspec("HiDream-O1-Image/lora") == "hidream_o1"
    assert registry.family_of_modelspec("Ideogram-4/lora") == "ideogram4" and registry.family_of_modelspec("Krea-2/lora") == "krea2"
    plan = compile_text(pipeline("hidream_o1", '[stages.px]\nkind = "cache_latents"\n[stages.te]\nkind = "cache_text_encoder"\n'))
    assert plan.step("px").script == "hidream_o1_cache_pixel.py" and plan.step("px").outputs[0].pattern == "*_ho1.safetensors"
    assert "--vae" not in plan.step("px").args  # the pixel cache needs no VAE
    assert plan.step("te").outputs[0].pattern == "*_ho1_te.safetensors" and "--dit" not in plan.step("te").args


# --- HiDream-O1 --------------------------------------------------------------------------------

def test_hidream_dev_tasks_give_musubis_task_and_model_type_to_every_script_that_takes_them():
    text = pipeline("hidream_o1", '[stages.te]\nkind = "cache_text_encoder"\n' + TRAIN + '[stages.g]\nkind = "generate"\nprompt = "a"\n', task="dev-t2i")
    plan = compile_text(text)
    train = plan.step("train").args
    assert arg(train, "--task") == "t2i" and arg(train, "--model_type") == "dev" and "--skip_t2i_visual_dummy" in train
    assert arg(plan.step("te").args, "--model_type") == "dev" and arg(plan.step("g").args, "--model_type") == "dev"
    full = compile_text(pipeline("hidream_o1", TRAIN)).step("train").args
    assert arg(full, "--task") == "t2i" and "--model_type" not in full  # musubi's default is full
    assert arg(full, "--timestep_sampling") == "uniform" and arg(full, "--learning_rate") == "4e-05"
    assert arg(full, "--network_module") == "networks.lora_hidream_o1"


def test_hidream_task_must_match_the_dataset():
    control = '[[dataset.datasets]]\nimage_directory = "/d/img"\ncontrol_directory = "/d/ref"\nresolution = [512, 512]\n'
    found = problems(pipeline("hidream_o1", TRAIN, task="t2i", dataset=control))
    assert "refuses a dataset with control images (musubi raises)" in found and "set task to one of i2i, dev-i2i" in found
    found = problems(pipeline("hidream_o1", TRAIN, task="i2i"))
    assert "pairs of control and target images" in found and "control_directory" in found
    assert arg(compile_text(pipeline("hidream_o1", TRAIN, task="dev-i2i", dataset=control)).step("train").args, "--task") == "i2i"


def test_hidream_block_swap_needs_batch_one_on_the_per_sample_paths():
    batch2 = '[dataset.general]\nbatch_size = 2\n[[dataset.datasets]]\nimage_directory = "/d/img"\ncontrol_directory = "/d/ref"\nresolution = [512, 512]\n'
    found = problems(pipeline("hidream_o1", TRAIN + "blocks_to_swap = 8\n", task="i2i", dataset=batch2))
    assert "with task i2i swaps blocks only with a dataset batch_size of 1, got 2" in found and "batch_size = 1" in found
    t2i = batch2.replace('control_directory = "/d/ref"\n', "")
    compile_text(pipeline("hidream_o1", TRAIN + "blocks_to_swap = 8\n", dataset=t2i))  # the batched t2i path swaps any batch
    assert "with attention flash_attn swaps blocks" in problems(pipeline("hidream_o1", TRAIN + 'blocks_to_swap = 8\nattention = "flash_attn"\n', dataset=t2i))


def test_hidream_options_its_scripts_refuse():
    assert "refuses weighting_scheme 'logit_normal'" in problems(pipeline("hidream_o1", TRAIN + 'weighting_scheme = "logit_normal"\n'))
    assert "fp8_base requires fp8_scaled" in problems(pipeline("hidream_o1", TRAIN + "fp8_base = true\n"))
    found = problems(pipeline("hidream_o1", '[stages.te]\nkind = "cache_text_encoder"\nextra_args = { fp8_te = true }\n'))
    assert "fp8_te requires dit" in found
    compile_text(pipeline("hidream_o1", '[stages.te]\nkind = "cache_text_encoder"\nextra_args = { fp8_te = true, dit = "/m/d.safetensors" }\n'))
    off = '[[dataset.datasets]]\nimage_directory = "/d/img"\nresolution = [1000, 520]\n'
    assert "not a multiple of 32" in problems(pipeline("hidream_o1", TRAIN, dataset=off))
    assert "HiDream-O1 has no merge stage" in problems(pipeline("hidream_o1", '[stages.m]\nkind = "merge"\nloras = ["/l/a.safetensors"]\n'))


def test_hidream_generation_writes_one_png_and_takes_reference_images():
    step = compile_text(pipeline("hidream_o1", '[stages.g]\nkind = "generate"\nprompt = "a"\ncontrol_image_path = ["refs/a.png"]\n')).step("g")
    assert arg(step.args, "--output_image") == str(Path(step.meta["save_path"]) / "g.png")
    assert step.outputs[0].pattern == "*.png" and arg(step.args, "--ref_images") == str(ROOT / "refs/a.png")
    assert contract.check(step.script, step.args) is None
    assert "generates from a control image" in problems(pipeline("hidream_o1", '[stages.g]\nkind = "generate"\nprompt = "a"\n', task="i2i"))
    assert "image_size [1000, 1024] is not a multiple of 32" in problems(pipeline("hidream_o1", '[stages.g]\nkind = "generate"\nprompt = "a"\nimage_size = [1000, 1024]\n'))
    assert "no batch mode" in problems(pipeline("hidream_o1", '[stages.g]\nkind = "generate"\nprompts = [{ text = "a" }]\n'))


# --- Ideogram 4 ----------------------------------------------------------------------------------

def test_ideogram_prompt_is_a_structured_json_caption_unless_told_to_warn():
    gen = '[stages.g]\nkind = "generate"\nprompt = {}\n'
    found = problems(pipeline("ideogram4", gen.format('"a cat"')))
    assert "structured JSON prompt, and this one is not a JSON object" in found and "warn_on_caption_issues = true" in found
    assert "has no compositional_deconstruction" in problems(pipeline("ideogram4", gen.format("'{\"high_level_description\": \"x\"}'")))
    step = compile_text(pipeline("ideogram4", gen.format(repr(JSON_PROMPT)))).step("g")
    assert step.outputs[0].pattern == "*.png" and arg(step.args, "--save_path") == step.meta["save_path"]
    compile_text(pipeline("ideogram4", gen.format('"a cat"') + "extra_args = { warn_on_caption_issues = true }\n"))


def test_ideogram_rules():
    assert "refuses weighting_scheme 'sigma_sqrt'" in problems(pipeline("ideogram4", TRAIN + 'weighting_scheme = "sigma_sqrt"\n'))
    assert "refuses attn_mode 'sageattn'" in problems(pipeline("ideogram4", f"[stages.g]\nkind = \"generate\"\nprompt = {JSON_PROMPT!r}\nattn_mode = \"sageattn\"\n"))
    found = problems(pipeline("ideogram4", TRAIN + "fp8_scaled = true\n"))
    assert "fp8_scaled is not an option of ideogram4_train_network.py" in found and "already FP8" in found
    assert "cannot merge a LoRA into Ideogram 4's FP8 base weights" in problems(pipeline("ideogram4", '[stages.m]\nkind = "merge"\nloras = ["/l/a.safetensors"]\n'))
    plan = compile_text(pipeline("ideogram4", TRAIN + f"[stages.g]\nkind = \"generate\"\nprompt = {JSON_PROMPT!r}\n", models='unconditional_dit = "/m/u.safetensors"\n'))
    assert arg(plan.step("g").args, "--unconditional_dit") == "/m/u.safetensors"
    assert arg(plan.step("train").args, "--unconditional_dit") == "/m/u.safetensors"  # optional slot: passed when set
    assert "--unconditional_dit" not in compile_text(pipeline("ideogram4", TRAIN)).step("train").args


# --- Krea 2 ------------------------------------------------------------------------------------------

def test_krea_generation_takes_a_positional_prompt_first_and_its_own_size_options():
    step = compile_text(pipeline("krea2", '[stages.g]\nkind = "generate"\nprompt = "a fox"\nloras = ["/l/a.safetensors"]\nimage_size = [768, 1280]\ninfer_steps = 8\n')).step("g")
    assert step.args[0] == "a fox" and "--prompt" not in step.args
    assert arg(step.args, "--height") == "768" and arg(step.args, "--width") == "1280" and arg(step.args, "--steps") == "8"
    assert contract.check(step.script, step.args) is None and step.outputs[0].pattern == "*.png"
    assert arg(step.args, "--save_path") == step.meta["save_path"]  # a folder: <time>_<seed>.png


def test_krea_rules():
    assert "fp8_base requires fp8_scaled" in problems(pipeline("krea2", TRAIN + "fp8_base = true\n"))
    compile_text(pipeline("krea2", TRAIN + "fp8_base = true\nfp8_scaled = true\n"))
    turbo = 'turbo_dit = "/m/turbo.safetensors"\n'
    assert "turbo_dit and blocks_to_swap cannot be used together" in problems(pipeline("krea2", TRAIN + "blocks_to_swap = 4\n", models=turbo))
    assert "turbo_dit_cache requires turbo_dit" in problems(pipeline("krea2", TRAIN + "extra_args = { turbo_dit_cache = true }\n"))
    assert "swaps at most 26 blocks" in problems(pipeline("krea2", TRAIN + "blocks_to_swap = 27\n"))
    assert "Krea 2 ignores control images" in "\n".join(compile_text(pipeline(
        "krea2", TRAIN, dataset='[[dataset.datasets]]\nimage_directory = "/d/img"\ncontrol_directory = "/d/c"\nresolution = [512, 512]\n')).warnings)
    train = compile_text(pipeline("krea2", TRAIN, models=turbo)).step("train").args
    assert arg(train, "--vae") == "/m/vae.safetensors" and arg(train, "--turbo_dit") == "/m/turbo.safetensors"
    assert arg(train, "--discrete_flow_shift") == "2.5" and arg(train, "--network_alpha") == "32"
    assert "txtfusion" in "\n".join(compile_text(pipeline("krea2", '[stages.c]\nkind = "convert"\ninput = "/l/a.safetensors"\n')).warnings)


# --- memory and LoRA modules -----------------------------------------------------------------------------

def test_planner_says_estimate():
    from musubi_pipe.tools.memory import plan_memory

    for family, task in (("hidream_o1", "i2i"), ("ideogram4", None), ("krea2", None)):
        plan = plan_memory(family, task, 24.0, (1024, 1024))
        assert "estimate" in plan.explain() and "nothing was measured" in plan.why["estimate"]
        assert plan.chosen.settings.blocks_to_swap <= registry.family(family).dit(task).max_blocks_to_swap


def _lora(path: Path, names_shapes: dict[str, tuple[int, int]]) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    tensors = {}
    for name, (fin, fout) in names_shapes.items():
        tensors[f"{name}.lora_down.weight"] = np.zeros((4, fin), np.float32)
        tensors[f"{name}.lora_up.weight"] = np.zeros((fout, 4), np.float32)
        tensors[f"{name}.alpha"] = np.array(4, np.float32)
    save_file(tensors, str(path))
    return path


def test_lora_modules_match_musubis_network_and_tell_the_families_apart(tmp_path):
    from musubi_pipe.tools.lora import read_lora, target_modules

    assert len(target_modules("krea2")) == 264 and len(target_modules("ideogram4")) == 170
    assert len(target_modules("hidream_o1", "t2i")) == 255 and len(target_modules("hidream_o1", "i2i")) == 365
    for family, variant in (("krea2", None), ("ideogram4", None), ("hidream_o1", "t2i")):
        modules = target_modules(family, variant)
        path = _lora(tmp_path / f"{family}.safetensors", {n: (m.in_features, m.out_features) for n, m in list(modules.items())[-12:]})
        report = read_lora(path)
        assert report.family == family, (family, report.family)
        assert not report.coverage.unknown and not report.coverage.wrong_shape
    z = _lora(tmp_path / "z.safetensors", {"lora_unet_layers_3_attention_to_k": (3840, 3840), "lora_unet_layers_3_feed_forward_w2": (10240, 3840)})
    assert read_lora(z).family == "zimage"  # Z-Image's layers.N.feed_forward is not Ideogram 4's


# --- the test double runs every example ----------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_every_example_runs_through_the_test_double(family, tmp_path, tmp_path_factory):
    from PIL import Image

    from executor_plans import Recorder, config_for
    from musubi_double import make_fake_checkout
    from musubi_pipe.executors.local import LocalExecutor

    text = EXAMPLES[family].read_text().replace("/models/", f"{tmp_path}/models/").replace('data = "datasets/', f'data = "{tmp_path}/data/')
    (tmp_path / "p.toml").write_text(text)
    for line in text.splitlines():  # the model files the example names (empty: the double only checks they exist)
        if line.split("=")[0].strip() in registry.family(family).models:
            model = Path(line.split("=", 1)[1].strip().strip('"').replace("{{ models }}", f"{tmp_path}/models/{family}"))
            model.parent.mkdir(parents=True, exist_ok=True)
            model.write_bytes(b"")
    plan = compile_file(tmp_path / "p.toml")
    folders = [Path(json.loads(line.split("=", 1)[1])) for f in plan.files for line in f.content.splitlines()
               if line.split("=")[0].strip() in ("image_directory", "control_directory")]
    references = [Path(i.path) for s in plan.steps for i in s.inputs if i.name.startswith("control_image")]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        for n in ("a", "b"):
            Image.new("RGB", (64, 64)).save(folder / f"{n}.png")
            (folder / f"{n}.txt").write_text("a picture")
    assert all(r.exists() for r in references)
    checkout = make_fake_checkout(tmp_path_factory.mktemp("double") / "musubi-tuner")
    result = LocalExecutor(config_for(checkout)).run(plan, [Recorder()])
    assert result.status == "succeeded", result.steps
    gen = next(s for s in plan.steps if s.kind == "generate")
    images = list(Path(gen.outputs[0].path).glob("*.png"))
    assert len(images) == 1, list(Path(gen.outputs[0].path).iterdir())


# --- a real musubi-tuner checkout ----------------------------------------------------------------------------

FACTS = r"""
import json, sys, logging, warnings
logging.disable(logging.CRITICAL); warnings.filterwarnings("ignore")
import torch, torch.nn as nn
def facts(model, blocks, net):
    lora = net.create_arch_network(1.0, 4, 1.0, None, [], model)
    return {"params": sum(p.numel() for p in model.parameters()), "count": len(blocks),
            "block": sum(p.numel() for p in blocks[0].parameters()),
            "linear": sum(m.weight.numel() for m in blocks[0].modules() if isinstance(m, nn.Linear)),
            "lora": {m.lora_name: [m.lora_down.in_features, m.lora_up.out_features] for m in lora.unet_loras}}
out = {}
with torch.device("meta"):
    from musubi_tuner.krea2.krea2_mmdit import SingleStreamDiT
    from musubi_tuner.krea2 import krea2_utils
    from musubi_tuner.networks import lora_krea2, lora_ideogram4, lora_hidream_o1
    m = SingleStreamDiT(krea2_utils.single_mmdit_large_wide)
    out["krea2"] = facts(m, m.blocks, lora_krea2)
    from musubi_tuner.ideogram4.ideogram4_model import Ideogram4Transformer, Ideogram4Config
    m = Ideogram4Transformer(Ideogram4Config())
    out["ideogram4"] = facts(m, m.layers, lora_ideogram4)
    # HiDream-O1's own config is on Hugging Face: the Qwen3-VL-8B config musubi bundles stands in (an estimate)
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLConfig
    from musubi_tuner.hidream_o1.qwen3_vl_transformers import Qwen3VLForConditionalGeneration
    from musubi_tuner.ideogram4.ideogram4_utils import QWEN3_VL_8B_INSTRUCT_CONFIG
    m = Qwen3VLForConditionalGeneration(Qwen3VLConfig.from_dict(QWEN3_VL_8B_INSTRUCT_CONFIG))
    m.lm_head = nn.Identity(); m.model.visual.deepstack_visual_indexes = []; m.model.visual.deepstack_merger_list = nn.ModuleList()
    for task in ("t2i", "i2i"):
        m.hidream_o1_task = task
        out["hidream_o1/" + task] = facts(m, m.model.language_model.layers, lora_hidream_o1)
print("FACTS " + json.dumps(out))
"""


@pytest.mark.skipif(not REAL_PY.exists(), reason="set MUSUBI_TUNER_DIR to a musubi-tuner checkout with .venv")
def test_memory_facts_and_lora_modules_are_musubis_own(tmp_path):
    from musubi_pipe.tools.lora import target_modules

    (tmp_path / "facts.py").write_text(FACTS)
    run = subprocess.run([str(REAL_PY), str(tmp_path / "facts.py")], capture_output=True, text=True, timeout=900, cwd=REAL)
    line = next((l for l in run.stdout.splitlines() if l.startswith("FACTS ")), None)
    assert line, run.stderr[-3000:]
    measured = json.loads(line[len("FACTS "):])
    for key, got in measured.items():
        family, _, task = key.partition("/")
        dit = registry.family(family).dit(task or None)
        assert (dit.params, dit.blocks[-1].count, dit.blocks[-1].params, dit.blocks[-1].linear_weights) == \
               (got["params"], got["count"], got["block"], got["linear"]), key
        assert {n: [m.in_features, m.out_features] for n, m in target_modules(family, task or None).items()} == got["lora"], key


@pytest.mark.skipif(not REAL_PY.exists(), reason="set MUSUBI_TUNER_DIR to a musubi-tuner checkout with .venv")
@pytest.mark.parametrize("family", FAMILIES)
def test_generated_dataset_passes_musubis_checks_for_the_architecture(family, tmp_path):
    plan = compile_file(EXAMPLES[family])
    [dataset] = [f for f in plan.files if f.path.endswith("dataset.toml")]
    (tmp_path / "dataset.toml").write_text(dataset.content)
    code = ("import sys, argparse; from musubi_tuner.dataset.config_utils import BlueprintGenerator, ConfigSanitizer, load_user_config;"
            "user = load_user_config(sys.argv[1]); BlueprintGenerator(ConfigSanitizer()).generate(user, argparse.Namespace(), architecture=sys.argv[2]);"
            "print('valid')")
    run = subprocess.run([str(REAL_PY), "-c", code, str(tmp_path / "dataset.toml"), registry.family(family).short],
                         capture_output=True, text=True, timeout=300, cwd=REAL)
    assert run.stdout.strip().endswith("valid"), run.stderr[-2000:]
