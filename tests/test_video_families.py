"""HunyuanVideo 1.5 and Kandinsky 5 from their registry files alone: the rules their musubi scripts
enforce at run time, checked by the compiler with a fix; their memory facts and LoRA modules; and
every registry family handled by generic code (no product file spells a family's words).

With MUSUBI_TUNER_DIR (a checkout with .venv), the facts are rebuilt from musubi's own model classes
on the meta device, and the generated dataset files pass musubi's dataset-config checks."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from musubi_pipe.compiler import compile_file, contract
from musubi_pipe.dsl.load import parse_pipeline
from musubi_pipe.errors import PipelineError
from musubi_pipe.pipelines import registry
from musubi_pipe.compiler.build import compile_pipeline

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = {"hunyuan_video_1_5": ROOT / "pipelines/examples/hunyuan_video_1_5_i2v_lora.toml",
            "kandinsky5": ROOT / "pipelines/examples/kandinsky5_pro_t2v_lora.toml"}
VIDEO_FAMILIES = tuple(EXAMPLES)
REAL = os.environ.get("MUSUBI_TUNER_DIR")
REAL_PY = Path(REAL or "/nonexistent") / ".venv/bin/python"

HV15 = """
name = "hv15"
family = "hunyuan_video_1_5"
task = "{task}"
[models]
dit = "/m/dit_bf16.safetensors"
vae = "/m/vae.safetensors"
text_encoder = "/m/qwen_2.5_vl_7b.safetensors"
byt5 = "/m/byt5.safetensors"
{models}
[dataset]
datasets = [{{ video_directory = "/clips", cache_directory = "/cache", target_frames = [1, 25] }}]
"""
K5 = """
name = "k5"
family = "kandinsky5"
task = "{task}"
[models]
dit = "/m/kandinsky5pro_t2v_sft_5s.safetensors"
vae = "/m/vae.safetensors"
text_encoder_qwen = "Qwen/Qwen2.5-VL-7B-Instruct"
text_encoder_clip = "openai/clip-vit-large-patch14"
[dataset]
datasets = [{{ video_directory = "/clips", cache_directory = "/cache", target_frames = [17] }}]
"""


def compile_text(text: str, folder: Path = ROOT):
    pipeline, source = parse_pipeline(text, file=str(folder / "p.toml"), fmt="toml")
    return compile_pipeline(pipeline, source)


def hv15(stages: str, task: str = "t2v", models: str = "") -> str:
    return HV15.format(task=task, models=models) + stages


def k5(stages: str, task: str = "k5-pro-t2v-5s-sd") -> str:
    return K5.format(task=task) + stages


def problems(text: str) -> str:
    with pytest.raises(PipelineError) as err:
        compile_text(text)
    return str(err.value)


def option(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


# --- HunyuanVideo 1.5 -----------------------------------------------------------------------------

def test_hv15_i2v_caches_image_latents_with_siglip_and_recaches():
    plan = compile_text(hv15('[stages.c]\nkind = "cache_latents"\n', "i2v", 'image_encoder = "/m/siglip.safetensors"'))
    args = plan.step("c").args
    assert "--i2v" in args and option(args, "--image_encoder") == "/m/siglip.safetensors"
    assert "--skip_existing" not in args  # --i2v changes what a cache file holds under the same name
    assert plan.step("c").outputs[0].pattern == "*_hv15.safetensors"
    t2v = compile_text(hv15('[stages.c]\nkind = "cache_latents"\n')).step("c").args
    assert "--i2v" not in t2v and "--image_encoder" not in t2v and "--skip_existing" in t2v
    text = problems(hv15('[stages.c]\nkind = "cache_latents"\n', "i2v"))
    assert "models.image_encoder is required for task i2v" in text and "set models.image_encoder" in text


def test_hv15_text_encoder_cache_needs_qwen_and_byt5_and_uses_fp8_vl():
    plan = compile_text(hv15('[stages.t]\nkind = "cache_text_encoder"\nfp8_text_encoder = true\n'))
    args = plan.step("t").args
    assert option(args, "--text_encoder").endswith("qwen_2.5_vl_7b.safetensors") and option(args, "--byt5") == "/m/byt5.safetensors"
    assert "--fp8_vl" in args and plan.step("t").outputs[0].pattern == "*_hv15_te.safetensors"
    text = problems(hv15('[stages.t]\nkind = "cache_text_encoder"\n').replace('byt5 = "/m/byt5.safetensors"\n', ""))
    assert "models.byt5 is required" in text


def test_hv15_training_follows_the_docs_and_checks_i2v_samples():
    plan = compile_text(hv15('[stages.train]\nkind = "train"\n'))
    args = plan.step("train").args
    assert option(args, "--task") == "t2v" and option(args, "--network_module") == "networks.lora_hv_1_5"
    assert option(args, "--discrete_flow_shift") == "2.0" and option(args, "--weighting_scheme") == "none"
    assert option(args, "--learning_rate") == "0.0001" and "--sdpa" in args and "--vae" not in args
    samples = '[stages.train]\nkind = "train"\nsample_every_n_epochs = 1\nsample_prompts = [{ text = "a cat" }]\n'
    text = problems(hv15(samples, "i2v", 'image_encoder = "/m/siglip.safetensors"'))
    assert "stages.train.sample_prompts[0].image" in text and "image_path should be set" in text
    ok = compile_text(hv15(samples.replace('text = "a cat"', 'text = "a cat", image = "/i/start.png"'), "i2v",
                           'image_encoder = "/m/siglip.safetensors"')).step("train").args
    assert option(ok, "--image_encoder") == "/m/siglip.safetensors"  # sampling encodes the start image with SigLIP


def test_hv15_fp16_dit_refuses_a_higher_dit_dtype_and_warns_on_bf16():
    stages = '[stages.train]\nkind = "train"\nextra_args = { dit_dtype = "bfloat16" }\n'
    text = problems(hv15(stages).replace("dit_bf16", "hunyuanvideo1.5_720p_t2v_fp16"))
    assert "stages.train.extra_args.dit_dtype" in text and "weights are float16" in text and "remove dit_dtype" in text
    plan = compile_text(hv15('[stages.train]\nkind = "train"\nmixed_precision = "bf16"\n').replace("dit_bf16", "hunyuanvideo1.5_720p_t2v_fp16"))
    assert any("does not match the DiT's fp16 weights" in w for w in plan.warnings)
    assert "--dit_dtype" in compile_text(hv15(stages)).step("train").args  # a bf16 file may ask for it


def test_hv15_block_swap_is_at_most_51():
    assert registry.family("hv15").dit("t2v").max_blocks_to_swap == 51
    compile_text(hv15('[stages.train]\nkind = "train"\nblocks_to_swap = 51\n'))
    text = problems(hv15('[stages.train]\nkind = "train"\nblocks_to_swap = 52\n'))
    assert "stages.train.blocks_to_swap" in text and "at most 51 blocks, got 52" in text and "set blocks_to_swap = 51" in text
    assert "at most 51" in problems(hv15('[stages.g]\nkind = "generate"\nprompt = "x"\nblocks_to_swap = 60\n'))


def test_hv15_generation_rules():
    plan = compile_text(hv15('[stages.g]\nkind = "generate"\nprompt = "a cat"\n'))
    args = plan.step("g").args
    assert option(args, "--video_length") == "121" and "--image_encoder" not in args and "--task" not in args
    assert option(args, "--save_path").endswith("musubi-out/hv15/g")
    size = problems(hv15('[stages.g]\nkind = "generate"\nprompt = "a"\nvideo_size = [540, 960]\n'))
    assert "stages.g.video_size" in size and "divisible by 16" in size and "[528, 960]" in size
    assert "4*N+1" in problems(hv15('[stages.g]\nkind = "generate"\nprompt = "a"\nvideo_length = 24\n'))
    i2v = problems(hv15('[stages.g]\nkind = "generate"\nprompt = "a"\n', "i2v", 'image_encoder = "/m/siglip.safetensors"'))
    assert "stages.g.image_path" in i2v and "starts from an image" in i2v
    t2v = problems(hv15('[stages.g]\nkind = "generate"\nprompt = "a"\nimage_path = "/i/a.png"\n'))
    assert "image-to-video model" in t2v and "set task = 'i2v'" in t2v
    ok = compile_text(hv15('[stages.g]\nkind = "generate"\nprompt = "a"\nimage_path = "/i/a.png"\n', "i2v",
                           'image_encoder = "/m/siglip.safetensors"')).step("g").args
    assert option(ok, "--image_path") == "/i/a.png" and option(ok, "--image_encoder") == "/m/siglip.safetensors"


def test_hv15_batch_prompts_use_its_prompt_line_options():
    plan = compile_text(hv15('[stages.g]\nkind = "generate"\nprompts = [{ text = "a cat", width = 960, height = 544, frames = 25, seed = 3, steps = 20, flow_shift = 5.0 }]\n'))
    [line] = [f.content for f in plan.files if f.path.endswith("g-batch-prompts.txt")]
    assert line.strip() == "a cat --w 960 --h 544 --f 25 --d 3 --s 20 --fs 5.0"
    text = problems(hv15('[stages.g]\nkind = "generate"\nprompts = [{ text = "a", control = "/v.mp4" }]\n'))
    assert "no per-prompt option for control" in text


def test_hv15_merges_through_generate_with_lycoris_and_a_frame_count():
    plan = compile_text(hv15('[stages.m]\nkind = "merge"\nloras = ["/l/a.safetensors"]\n'))
    args = plan.step("m").args
    assert plan.step("m").script == "hv_1_5_generate_video.py"
    assert "--lycoris" in args and option(args, "--video_length") == "1" and option(args, "--save_merged_model").endswith("hv15-merged.safetensors")
    assert contract.check("hv_1_5_generate_video.py", args) is None
    assert any("lycoris-lora" in w for w in plan.warnings)


def test_hv15_conversion_to_comfyui_warns_with_its_own_reason():
    plan = compile_text(hv15('[stages.c]\nkind = "convert"\ninput = "/l/a.safetensors"\n'))
    assert any("fused img_attn_qkv" in w and "lora inspect --family hunyuan_video_1_5" in w for w in plan.warnings)


# --- Kandinsky 5 ----------------------------------------------------------------------------------

def test_k5_text_encoders_may_be_hugging_face_ids(tmp_path):
    plan = compile_text(k5('[stages.t]\nkind = "cache_text_encoder"\n'), folder=tmp_path)
    args = plan.step("t").args
    assert option(args, "--text_encoder_qwen") == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert option(args, "--text_encoder_clip") == "openai/clip-vit-large-patch14"
    assert sum("read as a Hugging Face model ID" in w for w in plan.warnings) == 2
    (tmp_path / "Qwen" / "Qwen2.5-VL-7B-Instruct").mkdir(parents=True)  # a local folder of that name wins
    args = compile_text(k5('[stages.t]\nkind = "cache_text_encoder"\n'), folder=tmp_path).step("t").args
    assert option(args, "--text_encoder_qwen") == str(tmp_path / "Qwen" / "Qwen2.5-VL-7B-Instruct")
    # a model slot without hub = true never takes an ID: it is a path
    dit = compile_text(k5('[stages.train]\nkind = "train"\n').replace("/m/kandinsky5pro_t2v_sft_5s.safetensors", "org/dit"), folder=tmp_path)
    assert option(dit.step("train").args, "--dit") == str(tmp_path / "org" / "dit")


def test_k5_missing_inputs_skip_hub_ids_but_not_files(tmp_path):
    from musubi_pipe.dsl.inputs import input_problems

    pipeline, source = parse_pipeline(k5(""), file=str(tmp_path / "p.toml"), fmt="toml")
    where = {p.path for p in input_problems(pipeline, source)}
    assert "models.dit" in where and "models.vae" in where
    assert not {"models.text_encoder_qwen", "models.text_encoder_clip"} & where


def test_k5_training_follows_the_docs():
    args = compile_text(k5('[stages.train]\nkind = "train"\n')).step("train").args
    assert option(args, "--task") == "k5-pro-t2v-5s-sd" and option(args, "--network_module") == "networks.lora_kandinsky"
    assert option(args, "--discrete_flow_shift") == "5.0" and option(args, "--lr_scheduler") == "constant_with_warmup"
    assert "--fp8_base" in args and args[args.index("--optimizer_args") + 1:args.index("--optimizer_args") + 3] == ["weight_decay=0.001", "betas=(0.9,0.95)"]
    assert contract.check("kandinsky5_train_network.py", args) is None


def test_k5_nabla_tasks_cache_with_nabla_resize_and_generate_on_a_128_grid():
    plan = compile_text(k5('[stages.c]\nkind = "cache_latents"\n', "k5-pro-t2v-10s-sd"))
    assert "--nabla_resize" in plan.step("c").args and "--skip_existing" not in plan.step("c").args
    assert "--nabla_resize" not in compile_text(k5('[stages.c]\nkind = "cache_latents"\n')).step("c").args
    text = problems(k5('[stages.g]\nkind = "generate"\nprompt = "a"\nvideo_size = [720, 1280]\n', "k5-pro-t2v-10s-sd"))
    assert "divisible by 128" in text and "[640, 1280]" in text
    compile_text(k5('[stages.g]\nkind = "generate"\nprompt = "a"\nvideo_size = [720, 1280]\n'))  # 16-pixel grid elsewhere


def test_k5_generation_writes_one_named_file_with_its_own_option_names():
    plan = compile_text(k5('[stages.g]\nkind = "generate"\nprompt = "a cat"\nvideo_size = [512, 768]\ninfer_steps = 30\n'
                           'guidance_scale = 4.0\nimage_path = "start.png"\nend_image_path = "/i/end.png"\n', "k5-pro-i2v-5s-sd"))
    step = plan.step("g")
    args = step.args
    assert option(args, "--height") == "512" and option(args, "--width") == "768"
    assert option(args, "--steps") == "30" and option(args, "--guidance") == "4.0"
    assert option(args, "--image") == str(ROOT / "start.png") and option(args, "--image_last") == "/i/end.png"
    assert option(args, "--output") == str(Path(step.meta["save_path"]) / "g.mp4")
    assert step.outputs[0].path == step.meta["save_path"] and step.outputs[0].pattern == "*.mp4"
    assert contract.check("kandinsky5_generate_video.py", args) is None
    assert "starts from an image" in problems(k5('[stages.g]\nkind = "generate"\nprompt = "a"\n', "k5-pro-i2v-5s-sd"))


def test_k5_refusals_name_what_to_write_instead():
    length = problems(k5('[stages.g]\nkind = "generate"\nprompt = "a"\nvideo_length = 81\n'))
    assert "video_length is not an option of kandinsky5_generate_video.py" in length and "latent frames" in length and "frames = N" in length
    assert "no batch mode" in problems(k5('[stages.g]\nkind = "generate"\nprompts = [{ text = "a" }]\n'))
    merge = problems(k5('[stages.m]\nkind = "merge"\nloras = ["/l/a.safetensors"]\n'))
    assert "Kandinsky 5 has no merge stage: kandinsky5_generate_video.py cannot save a merged DiT" in merge
    assert "lora_merge stage" in merge
    plan = compile_text(k5('[stages.c]\nkind = "convert"\ninput = "/l/a.safetensors"\n'))
    assert any("visual.transformer.blocks" in w for w in plan.warnings)


def test_k5_block_swap_above_its_maximum_is_clamped_with_a_warning():
    plan = compile_text(k5('[stages.train]\nkind = "train"\nblocks_to_swap = 70\n'))
    assert any("swaps at most 58 blocks; musubi clamps 70" in w for w in plan.warnings)
    assert registry.family("k5").dit("k5-lite-t2v-5s-sd").max_blocks_to_swap == 30


# --- memory facts and LoRA modules ------------------------------------------------------------------

def test_planner_says_estimate_for_families_without_measurements():
    from musubi_pipe.tools.memory import plan_memory

    for family, task, size, frames in (("hunyuan_video_1_5", "i2v", (960, 544), 45), ("kandinsky5", "k5-pro-t2v-5s-sd", (512, 512), 17),
                                       ("kandinsky5", "lite", (960, 544), 45)):
        plan = plan_memory(family, task, 24.0, size, frames)
        assert "estimate" in plan.explain() and "nothing was measured" in plan.why["estimate"]
        assert plan.chosen.settings.blocks_to_swap <= registry.family(family).dit(plan.task).max_blocks_to_swap
    assert "estimate" not in plan_memory("wan", "t2v-1.3B", 24.0).why


def test_lora_modules_match_musubis_network_counts_and_are_told_apart():
    from musubi_pipe.tools.lora import _guess_family, LoraModule, target_modules

    assert len(target_modules("hunyuan_video_1_5", "i2v")) == 756
    assert len(target_modules("kandinsky5", "k5-pro-i2v-5s-hd")) == 624
    assert len(target_modules("kandinsky5", "k5-lite-t2v-5s-sd")) == 332
    for family, variant, other in (("hunyuan_video_1_5", "t2v", "hunyuan_video"), ("hunyuan_video", "t2v", "hunyuan_video_1_5")):
        modules = {n: LoraModule(n, m.module, "lora", {}, 4, 4.0, m.in_features, m.out_features)
                   for n, m in target_modules(family, variant).items()}
        assert _guess_family(modules)[0] == family != other
    lite = {n: LoraModule(n, m.module, "lora", {}, 4, 4.0, m.in_features, m.out_features)
            for n, m in target_modules("kandinsky5", "k5-lite-t2v-5s-sd").items()}
    fam, variant = _guess_family(lite)
    assert fam == "kandinsky5" and target_modules(fam, variant) == target_modules("kandinsky5", "k5-lite-t2v-5s-sd")


# --- every family through generic code -------------------------------------------------------------

def _minimal_pipeline(fam: registry.Family) -> str:
    """A pipeline with every stage kind the family has, its required models set to made-up files."""
    lines = [f'name = "every-{fam.name.replace("_", "-")}"', f'family = "{fam.name}"']
    if fam.tasks:
        lines.append(f'task = "{fam.default_task}"')
    lines.append("[models]")
    lines += [f'{slot} = "/m/{slot}.safetensors"' for slot in fam.models if slot != "dit_high_noise"]
    media = ('image_directory = "/images"' if fam.output == "image" else 'video_directory = "/clips", target_frames = [1, 25]')
    model = fam.task(None)
    if model.get("control_dataset") is True:  # an edit model trains on control/target pairs
        media += ', control_directory = "/control"'
    lines.append(f'[dataset]\ndatasets = [{{ {media}, cache_directory = "/cache" }}]')
    stages = {"cache_latents": "", "cache_text_encoder": "", "train": "", "finetune": "", "ema": 'checkpoints = "@train.checkpoints"',
              "convert": 'input = "@train.lora"', "generate": 'prompt = "a"\nimage_path = "/i/a.png"' if model.get("start_image") else
              'prompt = "a"\ncontrol_image_path = ["/i/a.png"]' if model.get("control_generate") is True else 'prompt = "a"',
              "merge": 'loras = ["@train.lora"]', "lora_merge": 'loras = ["@train.lora", "@ema.lora"]'}
    if fam.rule("json_prompt"):  # a plain prompt, verified by musubi only as a warning
        stages["generate"] += f'\nextra_args = {{ {fam.rule("json_prompt")["unless"]} = true }}'
    for kind, body in stages.items():
        if kind in fam.stages:
            lines.append(f'[stages.{kind}]\nkind = "{kind}"\n{body}')
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("family", registry.family_names())
def test_every_family_file_plans_through_generic_code(family):
    fam = registry.family(family)
    plan = compile_text(_minimal_pipeline(fam))
    kinds = {s.kind for s in plan.steps}
    assert kinds == set(fam.stages) - {"check_dataset"}
    for step in plan.steps:
        if step.launcher != "musubi-pipe":
            assert contract.check(step.script, step.args) is None, (step.script, step.args)
            assert step.script == fam.stages[step.kind].script
    assert plan.step("train").meta["cache_arch"] == fam.short


def test_no_product_file_spells_a_video_familys_words():
    """The new families live in their registry files only: not one product file names them, their
    aliases or their tasks (the design scan of test_registry_design, for these families' words)."""
    from test_registry_design import spelled_knowledge

    words = set()
    for family in VIDEO_FAMILIES:
        fam = registry.family(family)
        words |= {fam.name, fam.short, fam.full, *fam.aliases, *fam.modelspec, *fam.tasks}
    shared = {w for other in registry.families() if other.name not in VIDEO_FAMILIES
              for w in (other.name, other.short, other.full, *other.aliases, *other.tasks)}
    found = [hit for hit in spelled_knowledge() if hit[2] in words - shared]
    assert not found, found


def test_comfyui_nodes_are_made_for_every_family():
    from musubi_pipe.comfy_adapter import base

    if not hasattr(base, "FAMILY_NODE_SUFFIX"):
        pytest.xfail("this tree's ComfyUI trainer and generator nodes are hand-written per family; branch comfy-reg makes them from the registry")
    from musubi_pipe import NODE_CLASS_MAPPINGS

    for fam in registry.families():
        for kind in ("train", "generate"):
            node = NODE_CLASS_MAPPINGS[f"MusubiTuner_{fam.comfy_name}{base.FAMILY_NODE_SUFFIX[kind]}"]
            assert node.FAMILY == fam.name


# --- against a real musubi-tuner checkout --------------------------------------------------------------

FACTS = r"""
import json, sys, logging, warnings
logging.disable(logging.CRITICAL); warnings.filterwarnings("ignore")
import torch, torch.nn as nn
from musubi_tuner.hunyuan_video_1_5.hunyuan_video_1_5_models import HunyuanVideo_1_5_DiffusionTransformer
from musubi_tuner.kandinsky5.configs import TASK_CONFIGS
from musubi_tuner.kandinsky5.models.dit import get_dit
from musubi_tuner.networks import lora_hv_1_5, lora_kandinsky
def facts(model, blocks, net):
    b = getattr(model, blocks)
    lora = net.create_arch_network(1.0, 4, 1.0, None, [], model)
    return {"params": sum(p.numel() for p in model.parameters()), "count": len(b),
            "block": sum(p.numel() for p in b[0].parameters()),
            "linear": sum(m.weight.numel() for m in b[0].modules() if isinstance(m, nn.Linear)),
            "lora": {m.lora_name: [m.lora_down.in_features, m.lora_up.out_features] for m in lora.unet_loras}}
out = {}
with torch.device("meta"):
    for task in ("t2v", "i2v"):
        out[task] = facts(HunyuanVideo_1_5_DiffusionTransformer(task_type=task), "double_blocks", lora_hv_1_5)
    for task in sys.argv[1:]:
        out[task] = facts(get_dit(dict(TASK_CONFIGS[task].dit_params.__dict__)), "visual_transformer_blocks", lora_kandinsky)
print("FACTS " + json.dumps(out))
"""


@pytest.mark.skipif(not REAL_PY.exists(), reason="set MUSUBI_TUNER_DIR to a musubi-tuner checkout with .venv")
def test_memory_facts_and_lora_modules_are_musubis_own(tmp_path):
    from musubi_pipe.tools.lora import target_modules

    k5 = registry.family("kandinsky5")
    (tmp_path / "facts.py").write_text(FACTS)
    run = subprocess.run([str(REAL_PY), str(tmp_path / "facts.py"), *k5.tasks], capture_output=True, text=True, timeout=600)
    line = next((l for l in run.stdout.splitlines() if l.startswith("FACTS ")), None)
    assert line, run.stderr[-3000:]
    measured = json.loads(line[len("FACTS "):])
    for family in VIDEO_FAMILIES:
        fam = registry.family(family)
        for task in fam.tasks:
            got, dit = measured[task], fam.dit(task)
            assert (dit.params, dit.blocks[-1].count, dit.blocks[-1].params, dit.blocks[-1].linear_weights) == \
                   (got["params"], got["count"], got["block"], got["linear"]), task
            assert {n: [m.in_features, m.out_features] for n, m in target_modules(family, task).items()} == got["lora"], task


@pytest.mark.skipif(not REAL_PY.exists(), reason="set MUSUBI_TUNER_DIR to a musubi-tuner checkout with .venv")
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
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
