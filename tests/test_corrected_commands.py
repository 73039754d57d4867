"""Commands the first round got wrong, each now a registry fact with a test (musubi-tuner 30c658c's
code and docs), and their plans parsed by the recorded parsers and, with MUSUBI_TUNER_DIR, by the
real scripts' own parsers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from musubi_pipe.compiler import contract
from musubi_pipe.errors import PipelineError

from test_compiler import DRIVER, REAL, compile_text

WAN22 = """
name = "wan22"
family = "wan"
task = "{task}"
[models]
dit = "/m/wan2.2_low_noise_14B_fp16.safetensors"
dit_high_noise = "/m/wan2.2_high_noise_14B_fp16.safetensors"
vae = "/m/wan_2.1_vae.safetensors"
t5 = "/m/umt5-xxl-enc-bf16.pth"
[dataset]
datasets = [{{ video_directory = "/clips", target_frames = [1, 25] }}]
[stages.train_high]
kind = "train"
expert = "high"
[stages.train_low]
kind = "train"
expert = "low"
"""

CASES = {
    "wan22_i2v_experts": WAN22.format(task="i2v-A14B") + """
[stages.both]
kind = "generate"
prompt = "a lighthouse at dusk"
image_path = "/in/start.png"
loras = ["@train_low.lora"]
loras_high_noise = [{ path = "@train_high.lora", multiplier = 0.8 }]
""",
    "wan22_t2v_experts": WAN22.format(task="t2v-A14B"),
    "generate_with_merged_model": """
name = "merged"
family = "hunyuan_video"
[models]
dit = "/m/dit.pt"
vae = "/m/vae.pt"
text_encoder1 = "/m/llm.safetensors"
text_encoder2 = "/m/clip.safetensors"
[stages.merge]
kind = "merge"
loras = ["/loras/style.safetensors"]
[stages.gen]
kind = "generate"
dit = "@merge.model"
prompt = "a lighthouse at dusk"
""",
    "framepack_one_frame_cache": """
name = "fp1f"
family = "framepack"
[models]
vae = "/m/vae.safetensors"
image_encoder = "/m/siglip.safetensors"
[dataset]
datasets = [{ image_directory = "/imgs" }]
[stages.cache]
kind = "cache_latents"
one_frame = true
one_frame_no_2x = true
""",
    "framepack_section_images": """
name = "fpsec"
family = "framepack"
[models]
dit = "/m/fp.safetensors"
vae = "/m/vae.safetensors"
text_encoder1 = "/m/llm.safetensors"
text_encoder2 = "/m/clip.safetensors"
image_encoder = "/m/siglip.safetensors"
[stages.gen]
kind = "generate"
section_prompts = { "0" = "a girl waves", "1" = "she turns" }
image_path = "/in/start.png"
section_images = { "1" = "/in/turn.png" }
end_image_path = "/in/end.png"
video_sections = 2
""",
    "framepack_one_frame_inference": """
name = "fpof"
family = "framepack"
[models]
dit = "/m/fp.safetensors"
vae = "/m/vae.safetensors"
text_encoder1 = "/m/llm.safetensors"
text_encoder2 = "/m/clip.safetensors"
image_encoder = "/m/siglip.safetensors"
[stages.gen]
kind = "generate"
prompt = "the same cat, smiling"
image_path = "/in/cat.png"
one_frame_inference = "target_index=1,control_index=0"
control_image_path = ["/in/cat.png"]
""",
    "wan_one_frame_inference": """
name = "wanof"
family = "wan"
task = "i2v-14B"
[models]
dit = "/m/wan2.1_i2v_480p_14B_bf16.safetensors"
vae = "/m/vae.safetensors"
t5 = "/m/t5.pth"
clip = "/m/clip.pth"
[stages.gen]
kind = "generate"
prompt = "the same cat, smiling"
image_path = "/in/cat.png"
one_frame_inference = "target_index=1,control_index=0"
control_image_path = ["/in/cat.png"]
""",
    "wan_fun_control": """
name = "wanfc"
family = "wan"
task = "t2v-1.3B-FC"
[models]
dit = "/m/wan2.1_fun_control_1.3B_bf16.safetensors"
vae = "/m/vae.safetensors"
t5 = "/m/t5.pth"
[stages.gen]
kind = "generate"
prompt = "a dancer"
control_path = "/in/pose.mp4"
""",
}


def plan_of(case: str):
    return compile_text(CASES[case])


def flag_value(args: list[str], flag: str) -> list[str]:
    i = args.index(flag)
    out = []
    for word in args[i + 1:]:
        if word.startswith("--"):
            break
        out.append(word)
    return out


def test_wan22_i2v_experts_use_the_i2v_timestep_table():
    plan = plan_of("wan22_i2v_experts")
    high, low = plan.step("train_high").args, plan.step("train_low").args
    assert (flag_value(high, "--min_timestep"), flag_value(high, "--max_timestep")) == (["900"], ["1000"])
    assert (flag_value(low, "--min_timestep"), flag_value(low, "--max_timestep")) == (["0"], ["900"])
    t2v = plan_of("wan22_t2v_experts")
    assert flag_value(t2v.step("train_high").args, "--min_timestep") == ["875"]
    assert flag_value(t2v.step("train_low").args, "--max_timestep") == ["875"]


def test_wan22_generation_puts_a_lora_on_each_expert_and_waits_for_both():
    plan = plan_of("wan22_i2v_experts")
    gen = plan.step("both")
    low_lora, high_lora = plan.step("train_low").output("lora").path, plan.step("train_high").output("lora").path
    assert flag_value(gen.args, "--lora_weight") == [low_lora] and flag_value(gen.args, "--lora_multiplier") == ["1.0"]
    assert flag_value(gen.args, "--lora_weight_high_noise") == [high_lora]
    assert flag_value(gen.args, "--lora_multiplier_high_noise") == ["0.8"]
    assert set(gen.needs) == {"train_low", "train_high"}
    assert [s.id for s in plan.steps].index("both") == len(plan.steps) - 1


def test_a_reference_where_no_reference_is_accepted_is_refused():
    text = CASES["wan22_i2v_experts"].replace('loras_high_noise = [{ path = "@train_high.lora", multiplier = 0.8 }]',
                                               'extra_args = { lora_weight_high_noise = "@train_high.lora" }')
    with pytest.raises(PipelineError) as err:
        compile_text(text)
    assert "extra_args.lora_weight_high_noise takes no reference" in str(err.value)
    with pytest.raises(PipelineError, match="image_path takes no reference"):
        compile_text(CASES["wan22_i2v_experts"].replace('image_path = "/in/start.png"', 'image_path = "@train_low.lora"'))


def test_a_family_without_a_high_noise_expert_refuses_its_loras():
    text = CASES["generate_with_merged_model"] + 'loras_high_noise = ["/loras/x.safetensors"]\n'
    with pytest.raises(PipelineError, match="takes no loras_high_noise"):
        compile_text(text)


def test_generate_can_use_the_merged_model():
    plan = plan_of("generate_with_merged_model")
    gen = plan.step("gen")
    assert flag_value(gen.args, "--dit") == [plan.step("merge").output("model").path]
    assert gen.args.count("--dit") == 1 and gen.needs == ["merge"]
    with pytest.raises(PipelineError, match="'@merge.model' is a model, but a lora is needed here"):
        compile_text(CASES["generate_with_merged_model"].replace('dit = "@merge.model"', 'loras = ["@merge.model"]'))


def test_caching_for_one_frame_training_runs_without_skip_existing():
    args = plan_of("framepack_one_frame_cache").step("cache").args
    assert "--skip_existing" not in args and "--keep_cache" in args
    assert "--one_frame" in args and "--one_frame_no_2x" in args
    normal = compile_text(CASES["framepack_one_frame_cache"].replace("one_frame = true\none_frame_no_2x = true\n", ""))
    assert "--skip_existing" in normal.step("cache").args
    assert normal.step("cache").fingerprint != plan_of("framepack_one_frame_cache").step("cache").fingerprint  # re-caches


def test_framepack_section_start_images_and_end_image():
    args = plan_of("framepack_section_images").step("gen").args
    assert flag_value(args, "--image_path") == ["0:/in/start.png;;;1:/in/turn.png"]
    assert flag_value(args, "--prompt") == ["0:a girl waves;;;1:she turns"]
    assert flag_value(args, "--end_image_path") == ["/in/end.png"]
    assert "--video_seconds" not in args and flag_value(args, "--video_sections") == ["2"]  # sections replace seconds


def test_one_frame_inference_and_control_images_without_flags_that_do_nothing():
    fp = plan_of("framepack_one_frame_inference").step("gen").args
    assert flag_value(fp, "--one_frame_inference") == ["target_index=1,control_index=0"]
    assert flag_value(fp, "--control_image_path") == ["/in/cat.png"] and "--video_seconds" not in fp
    wan = plan_of("wan_one_frame_inference").step("gen").args
    assert flag_value(wan, "--one_frame_inference") == ["target_index=1,control_index=0"] and "--video_length" not in wan


def test_fun_control_generation_needs_a_control_video():
    args = plan_of("wan_fun_control").step("gen").args
    assert flag_value(args, "--control_path") == ["/in/pose.mp4"]
    with pytest.raises(PipelineError, match="generates from a control video"):
        compile_text(CASES["wan_fun_control"].replace('control_path = "/in/pose.mp4"\n', ""))


def test_sample_prompts_carry_control_options():
    text = CASES["wan_fun_control"].replace("[stages.gen]", """[stages.train]
kind = "train"
sample_prompts = [{ text = "a dancer", control = "/in/pose.mp4", frames = 25 }]
[stages.gen]""").replace("[models]", "[dataset]\ndatasets = [{ video_directory = \"/clips\", control_directory = \"/ctrl\" }]\n[models]")
    plan = compile_text(text)
    sample = next(f for f in plan.files if f.path.endswith("sample-prompts.json"))
    assert json.loads(sample.content) == [{"prompt": "a dancer", "control_video_path": "/in/pose.mp4", "frame_count": 25}]


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_corrected_plan_passes_the_recorded_parsers(case):
    for step in plan_of(case).steps:
        if step.launcher == "python" or step.launcher == "accelerate":
            assert contract.check(step.script, step.args) is None, (step.id, step.args)


@pytest.mark.skipif(not REAL, reason="set MUSUBI_TUNER_DIR to a musubi-tuner checkout to run")
def test_real_musubi_parsers_accept_every_corrected_plan(tmp_path):
    checkout = Path(REAL)
    python = os.environ.get("MUSUBI_PIPE_PYTHON") or next(
        str(p) for p in (checkout / ".venv/bin/python", checkout / "venv/bin/python", Path(sys.executable)) if Path(p).exists())
    items = [{"script": s.script, "args": s.args, "path": str(checkout / "src/musubi_tuner" / s.script)}
             for case in CASES for s in plan_of(case).steps if s.launcher != "musubi-pipe"]
    (tmp_path / "items.json").write_text(json.dumps(items))
    (tmp_path / "driver.py").write_text(DRIVER)
    run = subprocess.run([python, str(tmp_path / "driver.py"), str(tmp_path / "items.json")], capture_output=True, text=True,
                         cwd=checkout, timeout=900)
    line = next((l for l in run.stdout.splitlines() if l.startswith("RESULTS ")), None)
    assert line, run.stderr[-3000:]
    results = json.loads(line[len("RESULTS "):])
    assert len(results) == len(items)
    assert all(r[1] == "ok" for r in results), [r for r in results if r[1] != "ok"]

