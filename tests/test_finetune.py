"""Full fine-tuning (`kind = "finetune"`): musubi's *_train.py scripts from the registry, the options
their docs recommend, a model file as the artifact that generate and train stages take as `dit`, the
rules the scripts assert or silently ignore checked with message and fix, the memory ladder, resume,
and runs against the test double (and, with MUSUBI_TUNER_DIR, the real parsers and a real CPU run)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from musubi_pipe.compiler import compile_file, compile_pipeline
from musubi_pipe.dsl.load import parse_pipeline
from musubi_pipe.errors import PipelineError
from musubi_pipe.pipelines import registry

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "pipelines" / "examples" / "zimage_full_finetune.toml"
REAL = os.environ.get("MUSUBI_TUNER_DIR")

HEADS = {
    "zimage": '[models]\ndit = "/m/z_image_bf16.safetensors"\nvae = "/m/ae.safetensors"\ntext_encoder = "/m/qwen_3_4b.safetensors"\n',
    "qwen_image": '[models]\ndit = "/m/qwen_image_bf16.safetensors"\nvae = "/m/vae.safetensors"\ntext_encoder = "/m/qwen_2.5_vl_7b.safetensors"\n',
    "hidream_o1": '[models]\ndit = "/m/hidream_o1_image_bf16.safetensors"\n',
}


def pipeline(family: str = "zimage", ft: str = "", more: str = "", task: str = "") -> str:
    return (f'name = "ft"\nfamily = "{family}"\n' + (f'task = "{task}"\n' if task else "") + HEADS[family]
            + '[[dataset.datasets]]\nimage_directory = "/d/img"\nresolution = [512, 512]\n'
            + '[stages.ft]\nkind = "finetune"\nmax_train_epochs = 2\n' + ft + more)


def compile_text(text: str, folder: Path = ROOT):
    doc, source = parse_pipeline(text, file=str(folder / "p.toml"), fmt="toml")
    return compile_pipeline(doc, source)


def problems(text: str) -> list[str]:
    with pytest.raises(PipelineError) as exc:
        compile_text(text)
    return [str(p) for p in exc.value.problems if p.severity == "error"]


def warnings(text: str) -> list[str]:
    return compile_text(text).warnings


def value(args: list[str], flag: str):
    return args[args.index(flag) + 1] if flag in args else None


# --- the stage ---------------------------------------------------------------------------------


def test_the_example_fine_tunes_with_the_docs_settings_and_generates_with_the_model():
    plan = compile_file(EXAMPLE)
    ft, preview = plan.step("ft"), plan.step("preview")
    assert ft.script == registry.family("zimage").stages["finetune"].script == "zimage_train.py"
    assert ft.launcher == "accelerate"
    # docs/zimage.md "Finetuning": Adafactor with its arguments, the fused backward pass, no clipping, a short warmup
    assert value(ft.args, "--optimizer_type") == "adafactor" and "--fused_backward_pass" in ft.args
    assert ft.args[ft.args.index("--optimizer_args") + 1:][:3] == ["relative_step=False", "scale_parameter=False", "warmup_init=False"]
    assert value(ft.args, "--max_grad_norm") == "0" and value(ft.args, "--lr_scheduler") == "constant_with_warmup"
    assert "--full_bf16" in ft.args and "--mem_eff_save" in ft.args and value(ft.args, "--mixed_precision") == "bf16"
    assert not [a for a in ft.args if a.startswith("--network_")]
    model = ft.output("model").path
    assert model.endswith("/ft/zimage-style-ft.safetensors")
    assert value(preview.args, "--dit") == model and "ft" in preview.needs
    assert [i.from_step for i in preview.inputs if i.name == "dit"] == ["ft"]
    # the checkpoints musubi saves, by its own names (train_utils.get_epoch_ckpt_name), kept as save_last_n_epochs says
    assert [Path(p).name for p in ft.meta["checkpoints"]] == ["zimage-style-ft-000004.safetensors", "zimage-style-ft-000006.safetensors",
                                                             "zimage-style-ft.safetensors"]
    assert ft.output("state").path.endswith("zimage-style-ft-state")


def test_qwen_image_fine_tunes_each_version_and_a_lora_trains_on_the_fine_tuned_model():
    plan = compile_text(pipeline("qwen_image", task="edit-2511", ft="", more=(
        '[stages.lora]\nkind = "train"\ndit = "@ft.model"\nmax_train_epochs = 1\n'))
        .replace('image_directory = "/d/img"', 'image_directory = "/d/img"\ncontrol_directory = "/d/ctl"'))
    ft, lora = plan.step("ft"), plan.step("lora")
    assert ft.script == "qwen_image_train.py" and value(ft.args, "--model_version") == "edit-2511"
    assert value(lora.args, "--dit") == ft.output("model").path and lora.needs[0] == "ft"
    assert value(lora.args, "--network_module") == "networks.lora_qwen_image"
    assert "--network_module" not in ft.args


def test_hunyuan_video_has_no_fine_tune_because_musubis_script_stops_before_training():
    text = ('name = "hvft"\nfamily = "hunyuan_video"\n[models]\ndit = "/m/dit.pt"\n'
            '[[dataset.datasets]]\nvideo_directory = "/v"\n[stages.ft]\nkind = "finetune"\nmax_train_epochs = 1\n')
    (only,) = problems(text)
    assert "HunyuanVideo has no finetune stage" in only and "collator_class" in only
    assert 'kind = "train"' in only  # the fix: a LoRA, merged


def test_a_network_option_is_not_a_field_of_a_fine_tune():
    found = problems(pipeline(ft="network_dim = 32\n"))
    assert any("network_dim" in p for p in found)


@pytest.mark.parametrize("ft, message, fix", [
    ('extra_args = { network_dim = 32 }\n', "network_dim does nothing in a full fine-tune", 'for a LoRA use kind = "train"'),
    ('extra_args = { fp8_base = true }\n', "FP8 training is not supported for fine-tuning", "remove fp8_base"),
    ('extra_args = { save_precision = "bf16" }\n', "saves the model in its training dtype", "remove save_precision"),
    ('full_bf16 = true\nmixed_precision = "fp16"\n', "full_bf16 needs mixed_precision bf16 (musubi asserts it), got fp16", 'set mixed_precision = "bf16"'),
    ('optimizer_type = "adamw8bit"\n', "fused_backward_pass works only with adafactor", 'set optimizer_type = "adafactor"'),
    ('gradient_accumulation_steps = 4\n', "fused_backward_pass does not support gradient accumulation", "remove gradient_accumulation_steps"),
    ('fused_backward_pass = false\noptimizer_type = "adamw"\nblocks_to_swap = 8\n', "leaves gradients on another device", "block_swap_optimizer_patch_params = true"),
    ('fused_backward_pass = false\noptimizer_type = "adamw8bit"\nblocks_to_swap = 8\nblock_swap_optimizer_patch_params = true\n',
     "does not work with adamw8bit", 'optimizer_type = "adamw"'),
    ('blocks_to_swap = 29\n', "swaps at most 28 blocks", "blocks_to_swap = 28"),
])
def test_each_rule_of_musubis_fine_tuning_scripts_has_a_message_and_a_fix(ft, message, fix):
    found = problems(pipeline(ft=ft))
    assert any(message in p and fix in p for p in found), found


def test_qwen_image_swaps_blocks_only_with_the_fused_step():
    found = problems(pipeline("qwen_image", ft='fused_backward_pass = false\noptimizer_type = "adamw"\nblocks_to_swap = 8\n'))
    assert any("swaps blocks only with fused_backward_pass" in p and "qwen_image_train.py has no block_swap_optimizer_patch_params" in p
               for p in found), found
    # with the fused step (the default) block swap is fine
    assert compile_text(pipeline("qwen_image", ft="blocks_to_swap = 8\n")).step("ft")


def test_the_swap_patch_works_without_the_fused_step_where_the_script_has_it():
    args = compile_text(pipeline(ft='fused_backward_pass = false\noptimizer_type = "adamw"\nmax_grad_norm = 1.0\n'
                                    'blocks_to_swap = 8\nblock_swap_optimizer_patch_params = true\n')).step("ft").args
    assert "--fused_backward_pass" not in args and "--block_swap_optimizer_patch_params" in args


def test_clipping_with_the_fused_step_and_many_large_files_are_warnings():
    clip = warnings(pipeline(ft="max_grad_norm = 1.0\n"))
    assert any("clips each weight's gradient on its own" in w and "max_grad_norm = 0" in w for w in clip), clip
    # Qwen-Image in float32: 16 epochs, one file each, about 76 GiB each
    disk = warnings(pipeline("qwen_image", ft="max_train_epochs = 16\n").replace("max_train_epochs = 2\n", "", 1))
    assert any("keeps 16 model files of 76 GiB each" in w and "save_last_n_epochs" in w for w in disk), disk
    kept = warnings(pipeline("qwen_image", ft="max_train_epochs = 16\nsave_last_n_epochs = 1\nfull_bf16 = true\n").replace("max_train_epochs = 2\n", "", 1))
    assert not any("model files" in w for w in kept), kept


def test_references_to_a_fine_tune_are_to_its_model():
    found = problems(pipeline(more='[stages.gen]\nkind = "generate"\nprompt = "x"\nloras = ["@ft.lora"]\n'))
    assert any("stage 'ft' (finetune) makes no 'lora'" in p for p in found), found
    found = problems(pipeline(more='[stages.ema]\nkind = "ema"\ncheckpoints = "@ft.checkpoints"\n', ft="save_every_n_epochs = 1\n"))
    assert any("post-hoc EMA here averages LoRA checkpoints" in p for p in found), found


def test_out_of_memory_falls_back_to_bf16_weights_then_block_swap():
    ft = compile_text(pipeline()).step("ft")
    settings = [f.settings for f in ft.fallbacks]
    assert settings[0] == {"full_bf16": True}
    assert settings[1] == {"full_bf16": True, "blocks_to_swap": 7} and settings[-1]["blocks_to_swap"] == 28
    assert all("--full_bf16" in f.args for f in ft.fallbacks)


def test_pipeline_defaults_for_fine_tunes_are_their_own():
    plan = compile_text(pipeline(more='[stages.lora]\nkind = "train"\nmax_train_epochs = 1\n[stages.gen]\nkind = "generate"\nprompt = "x"\ndit = "@ft"\n')
                        + '[defaults.finetune]\nlearning_rate = 3e-6\n[defaults.train]\nnetwork_dim = 8\n')
    assert value(plan.step("ft").args, "--learning_rate") == "3e-06" and "--network_dim" not in plan.step("ft").args
    assert value(plan.step("lora").args, "--network_dim") == "8"
    assert value(plan.step("gen").args, "--dit") == plan.step("ft").output("model").path


def test_every_fine_tune_argv_passes_the_recorded_parsers():
    from musubi_pipe.compiler import contract

    for text in (pipeline(), pipeline("qwen_image", task="original"), pipeline(ft='fused_backward_pass = false\noptimizer_type = "adamw"\n'
                                                                                  'blocks_to_swap = 4\nblock_swap_optimizer_patch_params = true\n')):
        step = compile_text(text).step("ft")
        assert contract.check(step.script, step.args) is None
        for f in step.fallbacks:
            assert contract.check(step.script, f.args) is None


def test_the_comfy_trainer_nodes_are_unchanged_and_a_fine_tune_says_it_has_no_node():
    from musubi_pipe.comfy_adapter.base import FAMILY_NODE_SUFFIX
    from musubi_pipe.comfy_adapter.export import export_workflow

    assert "finetune" not in FAMILY_NODE_SUFFIX
    with pytest.raises(PipelineError) as exc:
        export_workflow(EXAMPLE)
    assert "a finetune stage has no node that runs it inside a workflow" in str(exc.value)


# --- against the test double -------------------------------------------------------------------


def _project(tmp_path: Path, ft: str) -> Path:
    from executor_plans import make_images

    models = tmp_path / "models"
    models.mkdir()
    for name in ("z_image_bf16.safetensors", "ae.safetensors", "qwen_3_4b.safetensors"):
        (models / name).write_text("weights")
    make_images(tmp_path / "img", names=("a",))
    text = pipeline(ft=ft, more='[stages.cache_latents]\nkind = "cache_latents"\n[stages.cache_text]\nkind = "cache_text_encoder"\n'
                                '[stages.gen]\nkind = "generate"\nprompt = "x"\ndit = "@ft.model"\n')
    text = text.replace("/m/", f"{models}/").replace('"/d/img"', f'"{tmp_path / "img"}"').replace("resolution = [512, 512]", f'resolution = [64, 64]\ncaption_extension = ".txt"\ncache_directory = "{tmp_path / "cache"}"')
    path = tmp_path / "ft.toml"
    path.write_text(text.replace("max_train_epochs = 2\n", "", 1))
    return path


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    from musubi_double import make_fake_checkout

    return make_fake_checkout(tmp_path_factory.mktemp("double") / "musubi-tuner")


@pytest.fixture
def cli(checkout, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from musubi_double import double_python
    from musubi_pipe.cli import main

    monkeypatch.setenv("MUSUBI_PIPE_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.setenv("MUSUBI_TUNER_DIR", str(checkout))
    monkeypatch.setenv("MUSUBI_PIPE_PYTHON", double_python(checkout))
    for k in ("MUSUBI_DOUBLE_FAIL", "MUSUBI_DOUBLE_FAIL_ONCE", "MUSUBI_DOUBLE_FAIL_AT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MUSUBI_DOUBLE_RECORD", str(tmp_path / "runs.jsonl"))
    return lambda *args: CliRunner().invoke(main, list(args))


def test_a_fine_tune_runs_saves_models_by_musubis_names_and_generates_with_it(cli, tmp_path):
    from safetensors import safe_open

    path = _project(tmp_path, "max_train_epochs = 3\nsave_every_n_epochs = 1\n")
    r = cli("run", str(path), "--plain")
    assert r.exit_code == 0, r.output
    out = tmp_path / "musubi-out" / "ft" / "ft"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["ft-000001.safetensors", "ft-000002.safetensors", "ft.safetensors"]
    with safe_open(str(out / "ft.safetensors"), framework="numpy") as f:
        assert not [k for k in f.keys() if k.startswith("lora_")] and "ss_network_module" not in f.metadata()
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    gen = next(r["argv"] for r in runs if r["script"] == "zimage_generate_image")
    assert gen[gen.index("--dit") + 1] == str(out / "ft.safetensors")
    r = cli("run", str(path), "--plain")
    assert r.exit_code == 0 and "running 0 step(s)" in r.output, r.output


def test_an_interrupted_fine_tune_resumes_from_its_newest_state(cli, tmp_path, monkeypatch):
    path = _project(tmp_path, "max_train_epochs = 4\nsave_every_n_epochs = 1\nsave_state = true\n")
    monkeypatch.setenv("MUSUBI_DOUBLE_FAIL", "zimage_train:crash")
    monkeypatch.setenv("MUSUBI_DOUBLE_FAIL_AT", "3")  # one batch an epoch: states of epochs 1 and 2
    monkeypatch.setenv("MUSUBI_DOUBLE_FAIL_ONCE", "1")
    assert cli("run", str(path), "--plain").exit_code != 0
    r = cli("run", str(path), "--plain")
    assert r.exit_code == 0, r.output
    assert "resumed from ft-000002-state: 2 of 4 epochs left" in r.output
    argv = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines() if '"zimage_train"' in line][-1]["argv"]
    assert argv[argv.index("--resume") + 1].endswith("ft-000002-state")
    out = tmp_path / "musubi-out" / "ft" / "ft"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["ft-000001.safetensors", "ft-000002.safetensors", "ft-000003.safetensors",
                                                                 "ft.safetensors"]


# --- a real musubi-tuner checkout --------------------------------------------------------------


@pytest.mark.skipif(not REAL, reason="set MUSUBI_TUNER_DIR to a musubi-tuner checkout to run")
def test_real_musubi_parsers_accept_every_fine_tune_argv(tmp_path):
    from test_compiler import DRIVER

    steps = [compile_text(t).step("ft") for t in (pipeline(), pipeline("qwen_image", task="edit-2509")
                                                 .replace('image_directory = "/d/img"', 'image_directory = "/d/img"\ncontrol_directory = "/d/c"'),
                                                 pipeline(ft='fused_backward_pass = false\noptimizer_type = "adamw"\nblocks_to_swap = 4\n'
                                                             'block_swap_optimizer_patch_params = true\n'),
                                                 pipeline("hidream_o1", task="dev-t2i"))]
    argvs = [(s.script, s.args) for s in steps] + [(s.script, f.args) for s in steps for f in s.fallbacks]
    items = [{"script": script, "args": args, "path": str(Path(REAL) / "src/musubi_tuner" / script)} for script, args in argvs]
    (tmp_path / "items.json").write_text(json.dumps(items))
    (tmp_path / "driver.py").write_text(DRIVER)
    run = subprocess.run([str(Path(REAL) / ".venv/bin/python"), str(tmp_path / "driver.py"), str(tmp_path / "items.json")],
                         capture_output=True, text=True, cwd=REAL, timeout=900)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RESULTS ")), None)
    assert line, run.stderr[-3000:]
    results = json.loads(line[len("RESULTS "):])
    assert {r[0] for r in results} == {"zimage_train.py", "qwen_image_train.py", "hidream_o1_train.py"}
    assert all(r[1] == "ok" for r in results), results


@pytest.mark.skipif(not REAL, reason="set MUSUBI_TUNER_DIR to a musubi-tuner checkout to run")
def test_real_qwen_image_full_fine_tune_on_cpu_through_musubi_pipe_run(tmp_path, monkeypatch):
    """`musubi-pipe run` fine-tunes a random one-layer Qwen-Image DiT with the real qwen_image_train.py
    (Adafactor, fused backward pass) and saves whole models that differ from the start."""
    from click.testing import CliRunner
    from PIL import Image
    from musubi_pipe.cli import main
    from test_image_families import TINY_PIPELINE, TINY_QWEN

    monkeypatch.setenv("MUSUBI_PIPE_CONFIG", str(tmp_path / "no-config.toml"))
    (tmp_path / "images").mkdir()
    for n in ("a", "b"):
        Image.new("RGB", (64, 64), (200, 40 * ord(n) % 255, 50)).save(tmp_path / "images" / f"{n}.png")
        (tmp_path / "images" / f"{n}.txt").write_text(f"a square {n}")
    text = TINY_PIPELINE.format(dit=tmp_path / "dit.safetensors", data=tmp_path).replace('kind = "train"', 'kind = "finetune"')
    text = text.replace('optimizer_type = "AdamW"          # adamw8bit\'s bitsandbytes wants a GPU\n', "").replace("network_dim = 4\n", "")
    pipeline_file = tmp_path / "tiny.toml"
    pipeline_file.write_text(text.replace("extra_args = {{ num_layers = 1 }}", "extra_args = { num_layers = 1 }"))
    dataset = next(f for f in compile_file(pipeline_file).files if "[[datasets]]" in f.content)
    (tmp_path / "dataset.toml").write_text(dataset.content)
    (tmp_path / "tiny_qwen.py").write_text(TINY_QWEN)
    made = subprocess.run([str(Path(REAL) / ".venv/bin/python"), str(tmp_path / "tiny_qwen.py"), str(tmp_path / "dit.safetensors"),
                           str(tmp_path / "dataset.toml")], capture_output=True, text=True, cwd=REAL, timeout=600)
    assert made.returncode == 0, made.stderr[-3000:]

    r = CliRunner().invoke(main, ["run", str(pipeline_file), "--plain"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "musubi-out" / "tiny-qwen" / "train"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["tiny-qwen-step00000002.safetensors", "tiny-qwen.safetensors"]
    # musubi's venv has torch (the start DiT is bfloat16, which numpy cannot read)
    compare = ("import sys, json; from safetensors.torch import load_file\n"
               "a, b = load_file(sys.argv[1]), load_file(sys.argv[2]); k = 'transformer_blocks.0.attn.to_q.weight'\n"
               "print(json.dumps([sorted(a) == sorted(b), str(b[k].dtype), bool((a[k].float() - b[k].float()).abs().max() > 0)]))")
    got = subprocess.run([str(Path(REAL) / ".venv/bin/python"), "-c", compare, str(tmp_path / "dit.safetensors"), str(out / "tiny-qwen.safetensors")],
                         capture_output=True, text=True, timeout=300)
    # the whole DiT by its own names, saved in float32 (no full_bf16), and trained
    assert json.loads(got.stdout.strip().splitlines()[-1]) == [True, "torch.float32", True], got.stderr[-2000:]


@pytest.mark.skipif(not REAL, reason="set MUSUBI_TUNER_DIR to a musubi-tuner checkout to run")
def test_real_hv_train_stops_before_training_as_the_registry_says(tmp_path):
    """Why HunyuanVideo has no finetune stage: the real hv_train.py fails before it loads a model."""
    (tmp_path / "v").mkdir()
    (tmp_path / "ds.toml").write_text(f'[general]\nresolution = [64, 64]\ncaption_extension = ".txt"\nbatch_size = 1\n'
                                      f'[[datasets]]\nvideo_directory = "{tmp_path / "v"}"\ncache_directory = "{tmp_path / "c"}"\ntarget_frames = [1]\n')
    run = subprocess.run([str(Path(REAL) / ".venv/bin/python"), "src/musubi_tuner/hv_train.py", "--dataset_config", str(tmp_path / "ds.toml"),
                          "--dit", str(tmp_path / "none.safetensors"), "--sdpa", "--max_data_loader_n_workers", "0",
                          "--output_dir", str(tmp_path / "out"), "--output_name", "x"], capture_output=True, text=True, cwd=REAL, timeout=600)
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode != 0 and last in registry.family("hunyuan_video").rule("missing_stages")["finetune"], last


def test_hidream_o1_fine_tunes_with_its_docs_settings_for_each_task():
    from musubi_pipe.compiler import contract

    t2i = compile_text(pipeline("hidream_o1", task="t2i")).step("ft")
    assert t2i.script == "hidream_o1_train.py"
    for flag in ("--full_bf16", "--fused_backward_pass", "--skip_t2i_visual_dummy", "--mem_eff_save"):
        assert flag in t2i.args
    assert value(t2i.args, "--task") == "t2i" and value(t2i.args, "--optimizer_type") == "adafactor"
    assert value(t2i.args, "--mixed_precision") == "bf16"  # full_bf16 needs it
    dev = compile_text(pipeline("hidream_o1", task="dev-i2i").replace('image_directory = "/d/img"',
                                                                      'image_directory = "/d/img"\ncontrol_directory = "/d/c"')).step("ft")
    assert value(dev.args, "--task") == "i2i" and value(dev.args, "--model_type") == "dev"
    for step in (t2i, dev):
        assert contract.check(step.script, step.args) is None
        assert [f.settings for f in step.fallbacks][0] == {"blocks_to_swap": 6}
        for f in step.fallbacks:
            assert contract.check(step.script, f.args) is None
