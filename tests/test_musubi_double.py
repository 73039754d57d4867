"""The musubi-tuner test double behaves like the recorded musubi-tuner: flags, streams, file names, failures."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from musubi_double import DEFAULT_CONTRACT, double_python, make_fake_checkout, script_path

SCRIPTS = sorted(p.stem for p in DEFAULT_CONTRACT.glob("*.json"))
STEPS_BAR = re.compile(r"steps: +\d+%\|[█▏▎▍▌▋▊▉ ]{10}\| \d+/\d+ \[\d\d:\d\d<[\d:?]+, +[\d.]+(it/s|s/it), avr_loss=[\d.]+\]")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    return make_fake_checkout(tmp_path_factory.mktemp("double") / "musubi-tuner")


@pytest.fixture(scope="module")
def engine(checkout):
    spec = importlib.util.spec_from_file_location("_double_engine", checkout / "src/musubi_tuner/_double_engine.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(checkout, script, *args, cwd, env=None, accelerate=None, timeout=60):
    python = double_python(checkout)
    cmd = [python, script_path(checkout, script), *map(str, args)]
    if accelerate is not None:
        cmd = [python, "-m", "accelerate.commands.launch", *accelerate, *cmd[1:]]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    r = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, timeout=timeout)
    # decode by hand: text=True would turn tqdm's \r into \n
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


def make_images(folder: Path, names=("a", "b"), size=(64, 48)) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.new("RGB", size).save(folder / f"{n}.png")
        (folder / f"{n}.txt").write_text(f"a photo of {n}", encoding="utf-8")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def wan_project(tmp_path, checkout):
    """An image dataset with latent and text-encoder caches made by the double, ready to train."""
    make_images(tmp_path / "imgs")
    write(tmp_path / "ds.toml", '[general]\nresolution = [64, 48]\ncaption_extension = ".txt"\n'
          '[[datasets]]\nimage_directory = "imgs"\ncache_directory = "cache"\n')
    for f in ("vae.safetensors", "t5.pth", "wan_bf16.safetensors", "wan_fp16.safetensors"):
        write(tmp_path / f, "weights")
    assert run(checkout, "wan_cache_latents", "--dataset_config", "ds.toml", "--vae", "vae.safetensors", cwd=tmp_path).returncode == 0
    assert run(checkout, "wan_cache_text_encoder_outputs", "--dataset_config", "ds.toml", "--t5", "t5.pth", cwd=tmp_path).returncode == 0
    return tmp_path


TRAIN = ["--dataset_config", "ds.toml", "--dit", "wan_bf16.safetensors", "--sdpa", "--mixed_precision", "bf16",
         "--network_module", "networks.lora_wan", "--optimizer_type", "adamw8bit", "--output_dir", "out"]


# ---------------------------------------------------------------- flags

def test_checkout_has_every_recorded_script_and_version(checkout):
    made = sorted(p.stem for p in (checkout / "src/musubi_tuner").glob("*.py") if not p.stem.startswith("_"))
    assert made == SCRIPTS
    assert 'version = "0.3.4"' in (checkout / "pyproject.toml").read_text()


def test_unknown_flag_exits_2_with_argparse_message(checkout, tmp_path):
    r = run(checkout, "wan_train_network", "--train_batch_size", "4", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("usage: wan_train_network.py")
    assert r.stderr.rstrip().endswith("wan_train_network.py: error: unrecognized arguments: --train_batch_size 4")
    assert r.stdout == ""


def test_missing_required_flag_and_bad_choice_exit_2(checkout, tmp_path):
    r = run(checkout, "fpack_cache_latents", "--dataset_config", "d.toml", cwd=tmp_path)
    assert r.returncode == 2 and "error: the following arguments are required: --image_encoder" in r.stderr
    r = run(checkout, "convert_lora", "--input", "a", "--output", "b", "--target", "comfy", cwd=tmp_path)
    assert r.returncode == 2 and "argument --target: invalid choice: 'comfy'" in r.stderr


def _value(a: dict) -> list[str]:
    if a["action"] in ("_StoreTrueAction", "_StoreFalseAction"):
        return []
    choices = [c for c in a["choices"] or [] if c is not None]  # a None choice can never be typed
    one = choices[0] if choices else {"int": "3", "float": "0.5", "_int_or_float": "7", "int_or_float": "7"}.get(a["type"], "x")
    n = a["nargs"]
    count = n if isinstance(n, int) else 1
    return [str(one)] * count


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_recorded_flag_is_accepted(engine, script):
    spec = json.loads((DEFAULT_CONTRACT / f"{script}.json").read_text())
    argv = []
    for a in spec["args"]:
        flag = a["flags"][0]
        argv += ([flag] if flag.startswith("-") else []) + _value(a)
    ns = engine.build_parser(script).parse_args(argv)
    dests = [a["dest"] for a in spec["args"]]
    for a in spec["args"]:
        if a["action"] == "_StoreTrueAction" and dests.count(a["dest"]) == 1:
            assert getattr(ns, a["dest"]) is True, a["dest"]


def test_abbreviations_rejected_unless_asked_for(engine, monkeypatch):
    with pytest.raises(SystemExit) as e:
        engine.build_parser("lora_post_hoc_ema").parse_args(["a.safetensors", "--output", "o.safetensors"])
    assert e.value.code == 2
    monkeypatch.setenv("MUSUBI_DOUBLE_ALLOW_ABBREV", "1")  # musubi's real argparse: prefixes match silently
    ns = engine.build_parser("lora_post_hoc_ema").parse_args(["a.safetensors", "--output", "o.safetensors"])
    assert ns.output_file == "o.safetensors"


# ---------------------------------------------------------------- caching

def test_cache_files_have_real_names_and_stream_layout(checkout, tmp_path):
    make_images(tmp_path / "imgs", names=("cat",), size=(640, 360))
    vids = tmp_path / "vids"
    vids.mkdir()
    write(vids / "clip one.mp4", "not decoded: sidecar gives the size")
    write(vids / "clip one.mp4.size", "1280x720x81")
    write(vids / "clip one.txt", "a clip")
    write(tmp_path / "ds.toml", '[general]\ncaption_extension = ".txt"\n[[datasets]]\nimage_directory = "imgs"\n'
          '[[datasets]]\nvideo_directory = "vids"\ncache_directory = "vcache"\ntarget_frames = [1, 25, 46]\n')
    write(tmp_path / "vae.pt", "w")
    r = run(checkout, "cache_latents", "--dataset_config", "ds.toml", "--vae", "vae.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "imgs/cat_0640x0360_hv.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "vcache").iterdir()) == [
        "clip one_00000-001_1280x0720_hv.safetensors", "clip one_00000-025_1280x0720_hv.safetensors",
        "clip one_00000-045_1280x0720_hv.safetensors"]  # 46 rounds down to N*4+1
    assert r.stdout == ""  # logging and bars go to stderr
    assert "INFO:__main__:Load dataset config from ds.toml" in r.stderr
    assert "INFO:musubi_tuner.dataset.datasources:found 1 images" in r.stderr
    assert re.search(r"\r1it \[\d\d:\d\d, +[\d.]+it/s\]", r.stderr)  # tqdm with no total, redrawn with \r

    r = run(checkout, "cache_text_encoder_outputs", "--dataset_config", "ds.toml", "--text_encoder1", "vae.pt",
            "--text_encoder2", "vae.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "imgs/cat_hv_te.safetensors").exists() and (tmp_path / "vcache/clip one_hv_te.safetensors").exists()


def test_cache_removes_stale_files_unless_keep_cache_and_skip_existing_keeps_files(checkout, tmp_path):
    make_images(tmp_path / "imgs", names=("a",))
    write(tmp_path / "ds.toml", '[[datasets]]\nimage_directory = "imgs"\ncache_directory = "c"\n')
    write(tmp_path / "vae.pt", "w")
    (tmp_path / "c").mkdir()
    stale = write(tmp_path / "c/old_0064x0048_wan.safetensors", "stale")
    r = run(checkout, "wan_cache_latents", "--dataset_config", "ds.toml", "--vae", "vae.pt", "--keep_cache", cwd=tmp_path)
    assert stale.exists() and f"Keep cache file not in the dataset: {os.path.join('c', stale.name)}" in r.stderr
    made = tmp_path / "c/a_0064x0048_wan.safetensors"
    os.utime(made, (1, 1))
    r = run(checkout, "wan_cache_latents", "--dataset_config", "ds.toml", "--vae", "vae.pt", "--skip_existing", cwd=tmp_path)
    assert made.stat().st_mtime == 1  # not rewritten
    assert not stale.exists() and f"INFO:__main__:Removed old cache file: {os.path.join('c', stale.name)}" in r.stderr


def test_dataset_errors_read_like_voluptuous(checkout, tmp_path):
    write(tmp_path / "vae.pt", "w")
    write(tmp_path / "ds.toml", '[general]\ncache_directory = "x"\n[[datasets]]\nimage_directory = "i"\n')
    r = run(checkout, "wan_cache_latents", "--dataset_config", "ds.toml", "--vae", "vae.pt", cwd=tmp_path)
    assert r.returncode == 1
    assert "ERROR:musubi_tuner.dataset.config_utils:Invalid user config" in r.stderr
    assert r.stderr.rstrip().endswith("voluptuous.error.MultipleInvalid: extra keys not allowed @ data['general']['cache_directory']")
    write(tmp_path / "ds.toml", '[[datasets]]\nvideo_directory = "v"\nsource_fps = 30\n')
    r = run(checkout, "wan_cache_latents", "--dataset_config", "ds.toml", "--vae", "vae.pt", cwd=tmp_path)
    assert r.stderr.rstrip().endswith("expected float for dictionary value @ data['datasets'][0]['source_fps']")
    r = run(checkout, "wan_cache_latents", "--dataset_config", "nofile.toml", "--vae", "vae.pt", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.rstrip().endswith("ValueError: file not found / ファイルが見つかりません: nofile.toml")


# ---------------------------------------------------------------- training

def test_training_through_accelerate_writes_real_checkpoints_and_output(checkout, wan_project):
    from safetensors import safe_open

    r = run(checkout, "wan_train_network", *TRAIN, "--output_name", "lo", "--max_train_epochs", "3",
            "--save_every_n_epochs", "1", "--save_every_n_steps", "4", "--save_state", "--network_dim", "8",
            accelerate=["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "bf16",
                        "--num_cpu_threads_per_process", "1", "--dynamo_backend", "no"], cwd=wan_project)
    assert r.returncode == 0, r.stderr
    out = wan_project / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "lo-000001-state", "lo-000001.safetensors", "lo-000002-state", "lo-000002.safetensors",
        "lo-state", "lo-step00000004-state", "lo-step00000004.safetensors", "lo.safetensors"]
    assert sorted(p.name for p in (out / "lo-state").iterdir()) == ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "scheduler.bin"]
    with safe_open(str(out / "lo.safetensors"), framework="numpy") as f:
        meta = f.metadata()
        keys = set(f.keys())
        assert f.get_tensor("lora_unet_blocks_0_self_attn_q.lora_down.weight").shape == (8, 8)
    assert meta["ss_network_dim"] == "8" and meta["ss_steps"] == "6" and meta["modelspec.architecture"] == "wan2.1/lora"
    assert {"lora_unet_blocks_0_self_attn_q.lora_up.weight", "lora_unet_blocks_0_self_attn_q.alpha"} <= keys
    # stdout: the print() lines; stderr: logging and the bar
    assert "running training / 学習開始" in r.stdout and "total optimization steps / 学習ステップ数: 6" in r.stdout
    assert re.findall(r"^epoch (\d)/3$", r.stdout, re.M) == ["1", "2", "3"]
    assert f"saving checkpoint: {os.path.join('out', 'lo-000001.safetensors')}" in r.stdout
    assert STEPS_BAR.search(r.stderr) and "\rsteps: 100%|██████████| 6/6" in r.stderr
    assert r.stderr.rstrip().endswith("INFO:musubi_tuner.training.trainer_base:model saved.")
    assert "were not passed to `accelerate launch`" not in r.stderr


def tb_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    from musubi_pipe.tools.monitor import EventFileReader

    rows = []
    for f in sorted(folder.rglob("events.out.tfevents*")):
        rows += [(step, value) for _, step, t, value in EventFileReader(f, [tag]).read() if t == tag]
    return rows


COSINE = ["--learning_rate", "1e-4", "--lr_scheduler", "cosine", "--output_name", "lo", "--save_every_n_steps", "3", "--save_state"]


def test_resume_restores_the_scheduler_counter_and_restarts_the_loop_counters_as_musubi_does(checkout, wan_project):
    """The double reproduces musubi 30c658c: the schedule is built from the argv's length, the
    scheduler's step counter and the weights come from the state, the loop counts from 0."""
    from safetensors import safe_open

    whole = run(checkout, "wan_train_network", *TRAIN, *COSINE, "--max_train_steps", "8", "--logging_dir", "logs-whole",
                cwd=wan_project)
    assert whole.returncode == 0, whole.stderr
    lrs = [round(v / 1e-4, 3) for _, v in tb_scalars(wan_project / "logs-whole", "lr/unet")]
    assert lrs == [0.962, 0.854, 0.691, 0.5, 0.309, 0.146, 0.038, 0.0]
    shutil.move(str(wan_project / "out" / "lo.safetensors"), str(wan_project / "whole.safetensors"))

    cut = run(checkout, "wan_train_network", *TRAIN, *COSINE, "--max_train_steps", "8", cwd=wan_project,
              env={"MUSUBI_DOUBLE_FAIL": "wan_train_network:crash", "MUSUBI_DOUBLE_FAIL_AT": "4"})
    assert cut.returncode == 1 and (wan_project / "out" / "lo-step00000003-state").is_dir()
    # what musubi-pipe used to run: the steps left as the length; the schedule is then 5 steps long
    left = run(checkout, "wan_train_network", *TRAIN, *COSINE, "--max_train_steps", "5", "--resume", "out/lo-step00000003-state",
               "--logging_dir", "logs-left", "--output_name", "left", cwd=wan_project)
    assert left.returncode == 0, left.stderr
    assert "resume training from local state: out/lo-step00000003-state" in left.stderr
    assert "\rsteps: 100%|██████████| 5/5" in left.stderr  # the loop counts from 0 again
    assert [s for s, _ in tb_scalars(wan_project / "logs-left", "lr/unet")] == [1, 2, 3, 4, 5]
    assert [round(v / 1e-4, 3) for _, v in tb_scalars(wan_project / "logs-left", "lr/unet")] == [0.095, 0.0, 0.095, 0.345, 0.655]
    with safe_open(str(wan_project / "out/left.safetensors"), framework="numpy") as f:
        assert f.metadata()["ss_steps"] == "5"
        resumed = f.get_tensor("lora_unet_blocks_0_self_attn_q.lora_up.weight")
    with safe_open(str(wan_project / "whole.safetensors"), framework="numpy") as f:
        assert not np.allclose(f.get_tensor("lora_unet_blocks_0_self_attn_q.lora_up.weight"), resumed, rtol=1e-3)
    # the full length trains 8 more steps past the state's step 3
    full = run(checkout, "wan_train_network", *TRAIN, *COSINE, "--max_train_steps", "8", "--resume", "out/lo-step00000003-state",
               "--logging_dir", "logs-full", "--output_name", "full", cwd=wan_project)
    assert [round(v / 1e-4, 3) for _, v in tb_scalars(wan_project / "logs-full", "lr/unet")] == [
        0.5, 0.309, 0.146, 0.038, 0.0, 0.038, 0.146, 0.309]
    missing = run(checkout, "wan_train_network", *TRAIN, *COSINE, "--max_train_steps", "8", "--resume", "nostate", cwd=wan_project)
    assert missing.returncode == 1 and "No such file or directory: 'nostate/model.safetensors'" in missing.stderr


@pytest.mark.parametrize("change, final_line", [
    (("--optimizer_type", ""), "AttributeError: module 'torch.optim' has no attribute ''"),
    (("--sdpa", None), "ValueError: either --sdpa, --flash-attn, --flash3, --sage-attn or --xformers must be specified"),
    (("--mixed_precision", "fp16"), "AssertionError: DiT weights are in bf16, mixed precision must be bf16 or no"),
    (("--network_module", "networks.lora"), "RuntimeError: No LoRA modules found"),
])
def test_training_runtime_rules_fail_like_musubi(checkout, wan_project, change, final_line):
    flag, value = change
    argv = list(TRAIN) + ["--output_name", "lo", "--max_train_steps", "2"]
    i = argv.index(flag)
    if value is None:
        del argv[i]
    else:
        argv[i + 1] = value
    r = run(checkout, "wan_train_network", *argv, cwd=wan_project)
    assert r.returncode == 1
    assert "Traceback (most recent call last):" in r.stderr
    assert r.stderr.rstrip().splitlines()[-1].startswith(final_line)
    assert not (wan_project / "out").exists()


def test_fp16_dit_needs_fp16_and_fp8_scaled_needs_fp8_base(checkout, wan_project):
    argv = [a if a != "wan_bf16.safetensors" else "wan_fp16.safetensors" for a in TRAIN]
    r = run(checkout, "wan_train_network", *argv, "--output_name", "lo", cwd=wan_project)
    assert r.returncode == 1 and r.stderr.rstrip().endswith("AssertionError: DiT weights are in fp16, mixed precision must be fp16 or no")
    r = run(checkout, "wan_train_network", *TRAIN, "--output_name", "lo", "--fp8_scaled", cwd=wan_project)
    assert r.returncode == 1 and r.stderr.rstrip().endswith("AssertionError: fp8_scaled requires fp8_base / fp8_scaledはfp8_baseが必要です")


def test_missing_output_name_crashes_after_training_and_saves_nothing(checkout, wan_project):
    r = run(checkout, "wan_train_network", *TRAIN, "--max_train_steps", "2", cwd=wan_project)
    assert r.returncode == 1
    assert "\rsteps: 100%|██████████| 2/2" in r.stderr  # training ran first
    assert r.stderr.rstrip().endswith("TypeError: unsupported operand type(s) for +: 'NoneType' and 'str'")
    assert not list((wan_project / "out").glob("*.safetensors")) if (wan_project / "out").exists() else True


def test_no_caches_means_no_training_items(checkout, tmp_path):
    make_images(tmp_path / "imgs")
    write(tmp_path / "ds.toml", '[[datasets]]\nimage_directory = "imgs"\n')
    write(tmp_path / "wan_bf16.safetensors", "w")
    r = run(checkout, "wan_train_network", *TRAIN, "--output_name", "lo", cwd=tmp_path)
    assert r.returncode == 1 and "ValueError: No training items found in the dataset." in r.stderr


# ---------------------------------------------------------------- failures, signals, accelerate

@pytest.mark.parametrize("kind, final_line", [
    ("oom", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.55 GiB of which 1.06 GiB is free."),
    ("disk_full", "OSError: [Errno 28] No space left on device"),
    ("hub_download", "requests.exceptions.ConnectionError: (ProtocolError('Connection aborted.'"),
    ("missing_file", "FileNotFoundError: [Errno 2] No such file or directory: 'wan_bf16.safetensors'"),
])
def test_injected_training_failures_print_the_real_error(checkout, wan_project, kind, final_line):
    env = {"MUSUBI_DOUBLE_FAIL": f"wan_train_network:{kind}"}
    r = run(checkout, "wan_train_network", *TRAIN, "--output_name", "lo", "--max_train_steps", "3", cwd=wan_project, env=env)
    assert r.returncode == 1
    assert r.stderr.rstrip().splitlines()[-1].startswith(final_line)
    assert not (wan_project / "out/lo.safetensors").exists()


def test_tokenizer_offline_and_schema_injection(checkout, wan_project):
    r = run(checkout, "wan_cache_text_encoder_outputs", "--dataset_config", "ds.toml", "--t5", "t5.pth", cwd=wan_project,
            env={"MUSUBI_DOUBLE_FAIL": "wan_cache_text_encoder_outputs:tokenizer_offline"})
    assert r.returncode == 1
    assert "huggingface_hub.errors.LocalEntryNotFoundError" in r.stderr
    assert "OSError: We couldn't connect to 'https://huggingface.co' to load the files" in r.stderr
    r = run(checkout, "wan_cache_latents", "--dataset_config", "ds.toml", "--vae", "vae.safetensors", cwd=wan_project,
            env={"MUSUBI_DOUBLE_FAIL": "*:dataset_schema"})
    assert r.stderr.rstrip().endswith("MultipleInvalid: extra keys not allowed @ data['datasets'][0]['foo']")


def test_fail_once_lets_the_retry_succeed(checkout, wan_project):
    env = {"MUSUBI_DOUBLE_FAIL": "wan_cache_latents:hub_download", "MUSUBI_DOUBLE_FAIL_ONCE": "1"}
    args = ("--dataset_config", "ds.toml", "--vae", "vae.safetensors")
    try:
        assert run(checkout, "wan_cache_latents", *args, cwd=wan_project, env=env).returncode == 1
        assert run(checkout, "wan_cache_latents", *args, cwd=wan_project, env=env).returncode == 0
    finally:
        for marker in (checkout / ".double-state").glob("failed-once-*"):
            marker.unlink()


def test_accelerate_runs_the_script_as_a_child_and_reports_its_failure(checkout, wan_project):
    r = run(checkout, "wan_train_network", *TRAIN, "--output_name", "lo", cwd=wan_project,
            env={"MUSUBI_DOUBLE_FAIL": "wan_train_network:crash"}, accelerate=["--num_processes", "1"])
    assert r.returncode == 1
    assert "The following values were not passed to `accelerate launch`" in r.stderr
    assert "RuntimeError: CUDA error: an illegal memory access was encountered" in r.stderr
    assert re.search(r"subprocess.CalledProcessError: Command '\[.*wan_train_network.py.*\]' returned non-zero exit status 1.", r.stderr)


def test_hang_then_sigint_is_a_keyboard_interrupt_and_saves_nothing(checkout, wan_project):
    import psutil

    python = double_python(checkout)
    cmd = [python, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
           script_path(checkout, "wan_train_network"), *TRAIN, "--output_name", "lo", "--max_train_steps", "5"]
    env = {**os.environ, "MUSUBI_DOUBLE_FAIL": "wan_train_network:hang", "MUSUBI_DOUBLE_FAIL_AT": "2"}
    p = subprocess.Popen(cmd, cwd=wan_project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        deadline = time.time() + 20
        while len(psutil.Process(p.pid).children()) < 2 and time.time() < deadline:
            time.sleep(0.05)
        children = psutil.Process(p.pid).children()
        assert len(children) == 2  # one process per rank, under the launcher
        time.sleep(1.0)
        os.killpg(p.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
        err = p.communicate(timeout=20)[1].decode()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == -signal.SIGINT  # CPython dies by SIGINT after an uncaught KeyboardInterrupt
    assert "KeyboardInterrupt" in err
    assert not (wan_project / "out/lo.safetensors").exists()
    psutil.wait_procs(children, timeout=5)
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)


def test_killed_mode_dies_by_sigkill(checkout, wan_project):
    r = run(checkout, "wan_train_network", *TRAIN, "--output_name", "lo", cwd=wan_project,
            env={"MUSUBI_DOUBLE_FAIL": "wan_train_network:killed"})
    assert r.returncode == -signal.SIGKILL


# ---------------------------------------------------------------- generate, convert, EMA, merge

def test_generate_writes_timestamped_video(checkout, tmp_path):
    for f in ("dit.st", "vae.st", "t5.st"):
        write(tmp_path / f, "w")
    r = run(checkout, "wan_generate_video", "--task", "t2v-1.3B", "--dit", "dit.st", "--vae", "vae.st", "--t5", "t5.st",
            "--prompt", "a cat", "--save_path", "gen", "--seed", "7", "--infer_steps", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (video,) = (tmp_path / "gen").iterdir()
    assert re.fullmatch(r"\d{8}-\d{6}-\d{3}_7\.mp4", video.name)
    r = run(checkout, "hv_generate_video", "--dit", "dit.st", "--vae", "vae.st", "--text_encoder1", "t5.st",
            "--text_encoder2", "t5.st", "--prompt", "a cat", "--save_path", "hv", "--seed", "3", "--infer_steps", "2", cwd=tmp_path)
    (video,) = (tmp_path / "hv").iterdir()
    assert re.fullmatch(r"\d{8}-\d{6}-\d{3}_0_3\.mp4", video.name)


def test_wan_merge_without_lycoris_exits_0_and_writes_nothing(checkout, tmp_path):
    for f in ("dit.st", "vae.st", "t5.st"):
        write(tmp_path / f, "w")
    base = ["--dit", "dit.st", "--vae", "vae.st", "--t5", "t5.st", "--prompt", "x", "--save_path", "g", "--save_merged_model", "m.safetensors"]
    r = run(checkout, "wan_generate_video", *base, cwd=tmp_path)
    assert r.returncode == 0 and not (tmp_path / "m.safetensors").exists()
    r = run(checkout, "wan_generate_video", *base, "--lycoris", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "m.safetensors").exists()


def _lora(path: Path, value: float, alpha: float = 4.0, dim: int = 4) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"lora_unet_blocks_0_cross_attn_k.lora_down.weight": np.full((dim, 8), value, np.float32),
               "lora_unet_blocks_0_cross_attn_k.lora_up.weight": np.full((8, dim), value, np.float32),
               "lora_unet_blocks_0_cross_attn_k.alpha": np.array(alpha, np.float32)}, str(path), {"ss_network_dim": str(dim)})
    return path


def test_convert_lora_round_trip_uses_musubi_key_rules(checkout, tmp_path):
    from safetensors.numpy import load_file

    _lora(tmp_path / "m.safetensors", 1.0, alpha=1.0, dim=4)
    r = run(checkout, "convert_lora", "--input", "m.safetensors", "--output", "c.safetensors", "--target", "other", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    comfy = load_file(str(tmp_path / "c.safetensors"))
    assert sorted(comfy) == ["diffusion_model.blocks.0.cross_attn.k.lora_A.weight", "diffusion_model.blocks.0.cross_attn.k.lora_B.weight"]
    assert comfy["diffusion_model.blocks.0.cross_attn.k.lora_A.weight"][0, 0] == pytest.approx(0.5)  # sqrt(alpha 1 / dim 4)
    r = run(checkout, "convert_lora", "--input", "c.safetensors", "--output", "back.safetensors", "--target", "default", cwd=tmp_path)
    back = load_file(str(tmp_path / "back.safetensors"))
    assert back["lora_unet_blocks_0_cross_attn_k.alpha"] == 4  # diffusers has no alpha: alpha = rank
    assert back["lora_unet_blocks_0_cross_attn_k.lora_down.weight"][0, 0] == pytest.approx(0.5)


def test_post_hoc_ema_beta_and_sigma_rel_maths(checkout, tmp_path):
    from safetensors.numpy import load_file

    files = [_lora(tmp_path / f"e{i}.safetensors", v) for i, v in enumerate((1.0, 2.0, 4.0))]
    for i, f in enumerate(files):
        os.utime(f, (1000 + i, 1000 + i))
    key = "lora_unet_blocks_0_cross_attn_k.lora_down.weight"
    # list newest first: sorting by mtime must put them back in order
    r = run(checkout, "lora_post_hoc_ema", *reversed([f.name for f in files]), "--beta", "0.5", "--output_file", "ema.safetensors", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert load_file(str(tmp_path / "ema.safetensors"))[key][0, 0] == pytest.approx((1.0 * 0.5 + 2.0 * 0.5) * 0.5 + 4.0 * 0.5)
    run(checkout, "lora_post_hoc_ema", *[f.name for f in files], "--beta", "0.5", "--beta2", "0.9", "--output_file", "ema2.safetensors", cwd=tmp_path)
    assert load_file(str(tmp_path / "ema2.safetensors"))[key][0, 0] == pytest.approx(1.5 * 0.9 + 4.0 * 0.1)
    run(checkout, "lora_post_hoc_ema", *[f.name for f in files], "--sigma_rel", "0.2", "--output_file", "ema3.safetensors", cwd=tmp_path)
    import numpy as np

    t = 0.2 ** -2
    roots = np.roots([1, 7, 16 - t, 12 - t])
    gamma = roots[np.isreal(roots) & (roots.real >= 0)].real.max()
    b2 = (1 - 1 / 2) ** (gamma + 1)
    expected = 2.0 * b2 + 4.0 * (1 - b2)  # the oldest file gets weight 0 (musubi-facts §8)
    assert load_file(str(tmp_path / "ema3.safetensors"))[key][0, 0] == pytest.approx(expected, rel=1e-5)


def test_merge_lora_writes_the_merged_model(checkout, tmp_path):
    write(tmp_path / "dit.st", "w")
    _lora(tmp_path / "l.safetensors", 1.0)
    r = run(checkout, "merge_lora", "--dit", "dit.st", "--lora_weight", "l.safetensors", "--save_merged_model", "merged.safetensors", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "merged.safetensors").stat().st_size > 0
