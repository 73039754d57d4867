"""The compiler: examples compile, every argv passes musubi's recorded parsers (and a real
checkout's, when MUSUBI_TUNER_DIR is set), and plans carry the rules musubi checks at run time."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from musubi_pipe.compiler import compile_file, compile_pipeline
from musubi_pipe.compiler.plan import LAUNCH_TOOL, Plan
from musubi_pipe.dsl.load import parse_pipeline
from musubi_pipe.errors import PipelineError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p for p in (ROOT / "pipelines" / "examples").iterdir() if p.suffix in (".toml", ".yaml") and p.name != "dataset.toml")
CHECK_ARGV = ROOT.parent / "shared" / "musubi-cli" / "check_argv.py"


def wan_13b(name: str) -> str:
    """The head of a small Wan 2.1 T2V 1.3B pipeline with a dataset; tests add stages."""
    return f"""name = "{name}"
family = "wan"
task = "t2v-1.3B"
[models]
dit = "/m/wan2.1_t2v_1.3B_bf16.safetensors"
[dataset]
datasets = [{{ video_directory = "/clips" }}]
"""


def compile_text(text: str, fmt: str = "toml", folder: Path | None = None) -> Plan:
    pipeline, source = parse_pipeline(text, file=str((folder or ROOT) / f"p.{fmt}"), fmt=fmt)
    return compile_pipeline(pipeline, source)


def argvs(plans) -> list[dict]:
    # musubi-pipe's own tools (check_dataset, lora_merge) are not musubi scripts
    return [{"script": s.script, "args": s.args} for plan in plans for s in plan.steps if s.launcher != LAUNCH_TOOL]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_compiles(example):
    plan = compile_file(example)
    assert plan.steps
    assert [s.id for s in plan.steps][: len(plan.steps)]  # ordered
    seen = set()
    for step in plan.steps:
        assert set(step.needs) <= seen, f"{step.id} runs before {step.needs}"
        seen.add(step.id)


@pytest.mark.skipif(not CHECK_ARGV.exists(), reason="../shared/musubi-cli is not beside the checkout")
def test_every_example_argv_passes_the_recorded_parsers(tmp_path):
    file = tmp_path / "argvs.json"
    file.write_text(json.dumps(argvs(compile_file(e) for e in EXAMPLES)))
    run = subprocess.run([sys.executable, str(CHECK_ARGV), "--json", str(file)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert " 0 rejected" in run.stdout


def test_training_runs_under_accelerate_with_explicit_flags():
    train = compile_file(ROOT / "pipelines/examples/wan21_t2v_1.3b_lora.toml").step("train")
    argv = train.display_argv()
    assert argv[:2] == ["accelerate", "launch"]
    assert train.launch_args == ["--num_cpu_threads_per_process", "1", "--num_processes", "1", "--mixed_precision", "bf16"]
    # mixed precision on the script itself too: accelerate's alone fails Wan's dtype check
    assert train.args[train.args.index("--mixed_precision") + 1] == "bf16"
    for flag in ("--optimizer_type", "--sdpa", "--output_name", "--network_module", "--task"):
        assert flag in train.args
    assert train.args[train.args.index("--network_module") + 1] == "networks.lora_wan"
    assert train.args[train.args.index("--task") + 1] == "t2v-1.3B"
    command = train.command("/venv/bin/python", "/opt/musubi")
    # `python -m accelerate.commands.launch`, without the working directory on sys.path
    assert command[:2] == ["/venv/bin/python", "-c"] and command[3] == "accelerate.commands.launch"
    assert "/opt/musubi/src/musubi_tuner/wan_train_network.py" in command


def test_caching_keeps_user_caches():
    plan = compile_file(ROOT / "pipelines/examples/wan21_t2v_1.3b_lora.toml")
    for step in ("cache_latents", "cache_text"):
        assert "--keep_cache" in plan.step(step).args and "--skip_existing" in plan.step(step).args


def test_wan22_experts_train_their_own_file_and_timestep_range():
    plan = compile_file(ROOT / "pipelines/examples/wan22_a14b_high_low.toml")
    high, low = plan.step("train_high").args, plan.step("train_low").args
    assert "high_noise" in high[high.index("--dit") + 1] and "low_noise" in low[low.index("--dit") + 1]
    assert high[high.index("--min_timestep") + 1: high.index("--min_timestep") + 2] == ["875"]
    assert low[low.index("--max_timestep") + 1] == "875"
    assert "--preserve_distribution_shape" in high and "--preserve_distribution_shape" in low
    assert high[high.index("--mixed_precision") + 1] == "fp16"  # fp16 expert files
    gen = plan.step("preview").args
    assert "--dit_high_noise" in gen


def test_ema_gets_checkpoints_oldest_first_and_no_sort():
    plan = compile_file(ROOT / "pipelines/examples/posthoc_ema.yaml")
    ema = plan.step("ema")
    files = [a for a in ema.args[: ema.args.index("--no_sort")]]
    names = [Path(f).name for f in files]
    assert names == [f"wan-ema-{e:06d}.safetensors" for e in range(2, 20, 2)] + ["wan-ema.safetensors"]
    assert ema.needs == ["train"]
    assert "--sigma_rel" in ema.args and "--output_file" in ema.args
    assert plan.step("comfyui").args[plan.step("comfyui").args.index("--target") + 1] == "other"


def test_hunyuan_merges_with_merge_lora_and_wan_through_generate_with_lycoris():
    hv = compile_file(ROOT / "pipelines/examples/hunyuan_video_lora_comfyui.toml").step("merged")
    assert hv.script == "merge_lora.py"
    assert hv.args[hv.args.index("--lora_multiplier") + 1] == "0.8"
    text = """
name = "m"
family = "wan"
task = "t2v-1.3B"
[models]
dit = "/m/wan2.1_t2v_1.3B_bf16.safetensors"
vae = "/m/vae.safetensors"
t5 = "/m/t5.pth"
[stages.merge]
kind = "merge"
loras = ["/loras/a.safetensors", { path = "/loras/b.safetensors", multiplier = 0.5 }]
"""
    plan = compile_text(text)
    step = plan.step("merge")
    assert step.script == "wan_generate_video.py"
    assert "--lycoris" in step.args and "--save_merged_model" in step.args
    assert step.args[step.args.index("--lora_multiplier") + 1: step.args.index("--lora_multiplier") + 3] == ["1.0", "0.5"]
    assert any("lycoris-lora" in w for w in plan.warnings)


def test_framepack_sections_and_required_encoders():
    step = compile_file(ROOT / "pipelines/examples/framepack_i2v_sections.toml").step("video")
    prompt = step.args[step.args.index("--prompt") + 1]
    assert prompt == "0:the man starts walking;;;1-2:the man walks along the beach;;;-1:the man stops and waves"
    for flag in ("--image_encoder", "--text_encoder1", "--text_encoder2", "--image_path", "--video_seconds"):
        assert flag in step.args
    latents = compile_file(ROOT / "pipelines/examples/framepack_i2v_sections.toml").step("cache_latents")
    assert "--image_encoder" in latents.args


def test_defaults_precedence_template_then_pipeline_then_stage():
    text = """
name = "d"
family = "wan"
task = "t2v-1.3B"
[models]
dit = "/m/wan2.1_t2v_1.3B_bf16.safetensors"
[dataset]
datasets = [{ video_directory = "clips" }]
[defaults.train]
network_dim = 8
learning_rate = 1e-4
[stages.a]
kind = "train"
[stages.b]
kind = "train"
network_dim = 64
"""
    plan = compile_text(text)
    a, b = plan.step("a").args, plan.step("b").args
    assert a[a.index("--network_dim") + 1] == "8" and b[b.index("--network_dim") + 1] == "64"
    assert a[a.index("--learning_rate") + 1] == "0.0001"
    assert a[a.index("--network_alpha") + 1] == "32"  # from the template
    assert a[a.index("--output_name") + 1] == "d-a" and b[b.index("--output_name") + 1] == "d-b"


def test_changing_a_training_setting_changes_only_downstream_fingerprints(tmp_path):
    base = (ROOT / "pipelines/examples/wan21_t2v_1.3b_lora.toml").read_text()
    before = compile_text(base, folder=tmp_path)
    after = compile_text(base.replace("learning_rate = 2e-4", "learning_rate = 1e-4"), folder=tmp_path)
    changed = {s.id for s, t in zip(before.steps, after.steps) if s.fingerprint != t.fingerprint}
    assert changed == {"train", "preview"}


def test_yaml_and_toml_give_the_same_plan(tmp_path):
    from musubi_pipe.files import tomllib

    import yaml

    toml_path = ROOT / "pipelines/examples/framepack_i2v_sections.toml"
    yaml_path = tmp_path / "p.yaml"
    data = tomllib.loads(toml_path.read_text())
    yaml_path.write_text(yaml.safe_dump(data, sort_keys=False))
    toml_copy = tmp_path / "p.toml"
    toml_copy.write_text(toml_path.read_text())
    a, b = compile_file(toml_copy), compile_file(yaml_path)
    assert [s.args for s in a.steps] == [s.args for s in b.steps]


def test_plan_json_round_trip():
    plan = compile_file(ROOT / "pipelines/examples/hunyuan_video_lora_comfyui.toml")
    again = Plan.from_dict(json.loads(plan.to_json()))
    assert again == plan


def test_paths_with_spaces_and_non_ascii_stay_one_argument(tmp_path):
    text = """
name = "paths"
family = "hunyuan_video"
[models]
dit = "D:\\\\Models\\\\Hunyuan Video\\\\dit.pt"
[stages.c]
kind = "convert"
input = "/loras/モデル (v2).safetensors"
"""
    plan = compile_text(text)
    step = plan.step("c")
    assert step.args[step.args.index("--input") + 1] == "/loras/モデル (v2).safetensors"
    assert "'/loras/モデル (v2).safetensors'" in step.shell_line()


def test_generated_files_hold_the_dataset_with_absolute_folders(tmp_path):
    from musubi_pipe.files import tomllib

    plan = compile_file(ROOT / "pipelines/examples/wan21_t2v_1.3b_lora.toml")
    dataset = tomllib.loads(plan.files[0].content)
    folder = dataset["datasets"][0]["video_directory"]
    assert Path(folder).is_absolute() and folder.endswith("datasets/style/clips")
    assert dataset["datasets"][0]["target_frames"] == [1, 25, 45]


def test_sample_prompts_are_written_as_json():
    plan = compile_file(ROOT / "pipelines/examples/hunyuan_video_lora_comfyui.toml")
    train = plan.step("train")
    path = train.args[train.args.index("--sample_prompts") + 1]
    content = next(f.content for f in plan.files if f.path == path)
    assert json.loads(content)[0]["prompt"] == "a portrait of a woman, soft light"
    assert "--vae" in train.args  # sampling needs the VAE and text encoders


# --- generated pipelines ---------------------------------------------------------------------

FAMILY_TASKS = {"wan": ["t2v-1.3B", "t2v-14B", "i2v-14B", "t2v-A14B", "i2v-A14B"], "hunyuan_video": [None], "framepack": ["i2v", "f1"]}


@st.composite
def pipelines(draw):
    family = draw(st.sampled_from(sorted(FAMILY_TASKS)))
    task = draw(st.sampled_from(FAMILY_TASKS[family]))
    models = {"dit": "/m/dit_bf16.safetensors", "dit_high_noise": "/m/high_bf16.safetensors", "vae": "/m/vae.safetensors",
              "t5": "/m/t5.pth", "clip": "/m/clip.pth", "text_encoder1": "/m/llm.safetensors",
              "text_encoder2": "/m/clip_l.safetensors", "image_encoder": "/m/siglip.safetensors"}
    if family != "wan":
        for k in ("t5", "clip", "dit_high_noise"):
            models.pop(k)
    else:
        for k in ("text_encoder1", "text_encoder2", "image_encoder"):
            models.pop(k)
    epochs = draw(st.integers(2, 30))
    train = {"kind": "train",
             "network_dim": draw(st.sampled_from([4, 16, 32, 128])),
             "learning_rate": draw(st.sampled_from([1e-4, 2e-4, 5e-5])),
             "max_train_epochs": epochs,
             "save_every_n_epochs": draw(st.integers(1, epochs - 1)),
             "gradient_checkpointing": draw(st.booleans()),
             "blocks_to_swap": draw(st.sampled_from([None, 0, 10, 20])),
             "attention": draw(st.sampled_from(["sdpa", "flash_attn", "xformers"])),
             "optimizer_type": draw(st.sampled_from(["adamw8bit", "AdamW", "AdaFactor", "prodigyopt.Prodigy"])),
             "save_state": draw(st.booleans())}
    if family != "hunyuan_video" and draw(st.booleans()):
        train.update(fp8_base=True, fp8_scaled=True)
    if task and "A14B" in task:
        train["expert"] = draw(st.sampled_from(["high", "low"]))
    train = {k: v for k, v in train.items() if v is not None}
    stages = {"latents": {"kind": "cache_latents"}, "text": {"kind": "cache_text_encoder", "batch_size": draw(st.integers(1, 32))}, "train": train}
    generate = {"kind": "generate", "prompt": draw(st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40)),
                "loras": [{"path": "@train.lora", "multiplier": draw(st.floats(0.1, 1.5))}],
                "seed": draw(st.integers(0, 2**31))}
    if family == "framepack" or (task and "i2v" in task):
        generate["image_path"] = "/in/start.png"
    stages["gen"] = generate
    if draw(st.booleans()):
        stages["ema"] = {"kind": "ema", "checkpoints": "@train.checkpoints", "beta": 0.9}
    if draw(st.booleans()):
        stages["conv"] = {"kind": "convert", "input": "@train.lora"}
    doc = {"name": "gen", "family": family, "models": models, "stages": stages,
           "dataset": {"datasets": [{"video_directory": "/data/clips", "target_frames": [1, 25]}]}}
    if task:
        doc["task"] = task
    return doc


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pipelines())
def test_generated_pipelines_compile_to_argv_musubi_accepts(doc):
    from musubi_pipe.compiler import contract
    from musubi_pipe.dsl.load import Source, validate_pipeline

    source = Source(file=str(ROOT / "generated.toml"), text="", format="toml")
    pipeline = validate_pipeline(doc, source)
    plan = compile_pipeline(pipeline, source)
    for step in plan.steps:
        assert contract.check(step.script, step.args) is None, (step.script, step.args)
    if CHECK_ARGV.exists():
        sys.path.insert(0, str(CHECK_ARGV.parent))
        import check_argv

        for step in plan.steps:
            ok, why = check_argv.check(step.script, step.args)
            assert ok, (step.script, why)


# --- a real musubi-tuner checkout ------------------------------------------------------------

REAL = os.environ.get("MUSUBI_TUNER_DIR")

# Run each script's own argparse on our argv, then stop before it loads anything.
DRIVER = r"""
import argparse, json, runpy, sys
import torch
if not torch.cuda.is_available():
    torch.cuda.current_device = lambda: "cpu"   # Wan's T5 evaluates this at import time
try:
    import torchvision
except Exception:  # PyPI's torchvision is a CUDA build; only imported, not used, before parsing
    import importlib.machinery
    from unittest import mock
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.io", "torchvision.transforms.v2"):
        sys.modules[name] = mock.MagicMock(__spec__=importlib.machinery.ModuleSpec(name, None), __version__="0.28.0")
class Parsed(Exception):
    pass
real_parse = argparse.ArgumentParser.parse_args
def parse_then_stop(self, args=None, namespace=None):
    real_parse(self, args, namespace)
    raise Parsed()
argparse.ArgumentParser.parse_args = parse_then_stop
results = []
for item in json.load(open(sys.argv[1])):
    sys.argv = [item["path"]] + item["args"]
    try:
        runpy.run_path(item["path"], run_name="__main__")
        results.append([item["script"], "no parse"])
    except Parsed:
        results.append([item["script"], "ok"])
    except SystemExit as exc:
        results.append([item["script"], f"exit {exc.code}"])
print("RESULTS " + json.dumps(results))
"""


@pytest.mark.skipif(not REAL, reason="set MUSUBI_TUNER_DIR to a musubi-tuner checkout to run")
def test_real_musubi_parsers_accept_every_example_argv(tmp_path):
    checkout = Path(REAL)
    python = os.environ.get("MUSUBI_PIPE_PYTHON") or next(
        str(p) for p in (checkout / ".venv/bin/python", checkout / "venv/bin/python", Path(sys.executable)) if Path(p).exists())
    items = [{"script": a["script"], "args": a["args"], "path": str(checkout / "src/musubi_tuner" / a["script"])} for a in argvs(compile_file(e) for e in EXAMPLES)]
    (tmp_path / "items.json").write_text(json.dumps(items))
    (tmp_path / "driver.py").write_text(DRIVER)
    run = subprocess.run([python, str(tmp_path / "driver.py"), str(tmp_path / "items.json")], capture_output=True, text=True,
                         cwd=checkout, timeout=900)
    line = next((l for l in run.stdout.splitlines() if l.startswith("RESULTS ")), None)
    assert line, run.stderr[-3000:]
    results = json.loads(line[len("RESULTS "):])
    assert len(results) == len(items)
    assert all(r[1] == "ok" for r in results), [r for r in results if r[1] != "ok"]


def test_framepack_conversion_warns_about_musubis_key_names():
    plan = compile_text("""
name = "fp"
family = "framepack"
[stages.c]
kind = "convert"
input = "/loras/fp.safetensors"
""")
    assert any("wrong key names for most FramePack modules" in w for w in plan.warnings)
    assert plan.step("c").args[-2:] == ["--target", "other"]


def test_a_prompt_starting_with_a_dash_stays_a_value():
    plan = compile_text("""
name = "dash"
family = "hunyuan_video"
[models]
dit = "/m/dit.pt"
vae = "/m/vae.pt"
text_encoder1 = "/m/llm.safetensors"
text_encoder2 = "/m/clip.safetensors"
[stages.g]
kind = "generate"
prompt = "--- a dancer, -5 degrees"
negative_prompt = "-blurry"
""")
    args = plan.step("g").args
    assert "--prompt=--- a dancer, -5 degrees" in args and "--negative_prompt=-blurry" in args
    from musubi_pipe.compiler import contract

    parsed = contract.parser("hv_generate_video.py").parse_args(args)
    assert parsed.prompt == "--- a dancer, -5 degrees" and parsed.negative_prompt == "-blurry"


def test_a_length_in_steps_replaces_the_templates_epochs():
    plan = compile_text(wan_13b("steps") + """
[stages.t]
kind = "train"
max_train_steps = 2000
save_state = true
""")
    args = plan.step("t").args
    assert "--max_train_epochs" not in args and "--save_every_n_epochs" not in args
    assert args[args.index("--max_train_steps") + 1] == "2000"
    assert args[args.index("--save_every_n_steps") + 1] == "250"
    assert Path(plan.step("t").meta["checkpoints"][0]).name == "steps-step00000250.safetensors"


def test_converting_a_file_to_the_format_it_is_in_is_refused(tmp_path):
    from test_lora_tools import make_lora

    make_lora(tmp_path / "comfy.safetensors", layout="comfyui")
    with pytest.raises(PipelineError) as err:
        compile_text("""
name = "conv"
family = "wan"
[stages.c]
kind = "convert"
input = "comfy.safetensors"
to = "comfyui"
""", folder=tmp_path)
    assert "stages.c.input" in str(err.value) and "already in comfyui format" in str(err.value)


def test_training_can_start_from_another_stages_lora(tmp_path):
    plan = compile_text(wan_13b("chain") + """
[stages.first]
kind = "train"
[stages.second]
kind = "train"
network_weights = "@first.lora"
logging_dir = "logs"
""", folder=tmp_path)
    second = plan.step("second")
    assert second.needs == ["first"]
    assert second.args[second.args.index("--network_weights") + 1] == plan.step("first").output("lora").path
    assert second.args[second.args.index("--logging_dir") + 1] == str(tmp_path / "logs")


def test_fp8_text_encoder_is_the_familys_own_option():
    wan = compile_text(wan_13b("te").replace("[dataset]", 't5 = "/m/t5.pth"\n[dataset]')
                       + '[stages.text]\nkind = "cache_text_encoder"\nfp8_text_encoder = true\n')
    assert "--fp8_t5" in wan.step("text").args and "--fp8_llm" not in wan.step("text").args
    hv = compile_text("""
name = "te"
family = "hunyuan_video"
[models]
text_encoder1 = "/m/llm.safetensors"
text_encoder2 = "/m/clip.safetensors"
[dataset]
datasets = [{ image_directory = "/images" }]
[stages.text]
kind = "cache_text_encoder"
fp8_text_encoder = true
""")
    assert "--fp8_llm" in hv.step("text").args
