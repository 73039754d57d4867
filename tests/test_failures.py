"""Each failure class, fed the real error text of musubi-tuner / torch / HF, gives a one-line cause and fix."""
from __future__ import annotations

import pytest

from musubi_pipe.executors.failures import classify

TB = 'Traceback (most recent call last):\n  File "/mt/src/musubi_tuner/wan_train_network.py", line 1, in <module>\n    main()\n'
OOM = (TB + "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.55 GiB "
       "of which 1.06 GiB is free. Including non-PyTorch memory, this process has 22.48 GiB memory in use. Of the allocated "
       "memory 21.78 GiB is allocated by PyTorch, and 254.12 MiB is reserved by PyTorch but unallocated.\n")
ACCELERATE_TAIL = ("Traceback (most recent call last):\n  File \"/venv/lib/python3.10/site-packages/accelerate/commands/launch.py\", "
                   "line 795, in simple_launcher\nsubprocess.CalledProcessError: Command '['/venv/bin/python', "
                   "'src/musubi_tuner/wan_train_network.py', '--dit', 'x']' returned non-zero exit status {rc}.\n")


def test_cuda_oom_names_the_plans_next_memory_setting():
    f = classify("\rsteps:   0%|          | 0/100 [00:00<?, ?it/s]" + OOM + ACCELERATE_TAIL.format(rc=1), 1, "train",
                 {"family": "wan", "next_memory": "fp8_base, fp8_scaled: DiT weights in scaled fp8"})
    assert f.category == "oom" and not f.transient
    assert f.cause == "CUDA out of memory (tried to allocate 2.00 GiB; GPU 0 has 23.55 GiB, 1.06 GiB free)"
    assert f.fix.startswith("run with --retry, or set fp8_base, fp8_scaled: DiT weights in scaled fp8")
    f = classify(OOM, 1, "train", {"family": "hunyuan_video", "next_memory": None})
    assert "resolution or target_frames" in f.fix
    assert "video_size" in classify(OOM, 1, "generate", {}).fix


def test_killed_by_sigkill_is_likely_host_oom():
    f = classify("\rsteps:  12%|█▏        | 12/100 [00:30<03:40,  2.50s/it, avr_loss=0.12]", -9, "train", {})
    assert f.category == "host_oom" and "ran out of RAM" in f.cause and "blocks_to_swap" in f.fix
    assert classify("", 137, "train", {}).category == "host_oom"
    # under accelerate: the launcher exits 1 and reports the child's signal
    assert classify(ACCELERATE_TAIL.format(rc=-9), 1, "train", {}).category == "host_oom"
    died = ACCELERATE_TAIL.format(rc=1).replace("returned non-zero exit status 1.", "died with <Signals.SIGKILL: 9>.")
    assert classify(died, 1, "train", {}).category == "host_oom"
    f = classify("KeyboardInterrupt\n", -2, "train", {})
    assert f.cause == "interrupted (SIGINT, Ctrl-C)" and f.category == "signal"


def test_missing_file_names_the_file():
    f = classify(TB + 'FileNotFoundError: No such file or directory: "/models/wan2.1_t2v_14B_bf16.safetensors"\n', 1, "train", {})
    assert f.category == "missing_file" and f.cause == "file not found: /models/wan2.1_t2v_14B_bf16.safetensors"
    f = classify(TB + "ValueError: file not found / ファイルが見つかりません: nofile.toml\n", 1, "cache_latents", {})
    assert f.cause == "file not found: nofile.toml"


@pytest.mark.parametrize("error, cause, fix", [
    ("voluptuous.error.MultipleInvalid: extra keys not allowed @ data['datasets'][0]['foo']",
     "dataset config: unknown key at datasets[0].foo", "remove 'foo' or correct its spelling"),
    ("voluptuous.error.MultipleInvalid: expected float for dictionary value @ data['datasets'][0]['source_fps']",
     "dataset config: datasets[0].source_fps must be a float", "write source_fps as a float such as 30.0"),
    ("voluptuous.error.MultipleInvalid: extra keys not allowed @ data['general']['cache_directory']",
     "dataset config: unknown key at general.cache_directory", "move cache_directory from [general] into each [[datasets]]"),
])
def test_dataset_schema_error_names_the_field(error, cause, fix):
    log = "ERROR:musubi_tuner.dataset.config_utils:Invalid user config / ユーザ設定の形式が正しくないようです\n" + TB + error + "\n"
    f = classify(log, 1, "cache_latents", {})
    assert f.category == "dataset" and f.cause == cause and f.fix.startswith(fix)


def test_no_training_items_means_run_the_caches_first():
    f = classify(TB + "ValueError: No training items found in the dataset. Please ensure that the latent/Text Encoder cache "
                 "has been created beforehand. / データセットに学習データがありません。\n", 1, "train", {})
    assert f.category == "dataset" and "cache_latents and cache_text_encoder" in f.fix


@pytest.mark.parametrize("stderr, cause, fix", [
    ("usage: wan_train_network.py [-h] ...\nwan_train_network.py: error: unrecognized arguments: --train_batch_size 4\n",
     "wan_train_network.py does not accept --train_batch_size", "remove --train_batch_size"),
    ("usage: fpack_cache_latents.py [-h]\nfpack_cache_latents.py: error: the following arguments are required: --image_encoder\n",
     "fpack_cache_latents.py needs --image_encoder", "set --image_encoder"),
    ("usage: convert_lora.py\nconvert_lora.py: error: argument --target: invalid choice: 'comfy' (choose from 'other', 'default')\n",
     "convert_lora.py: bad value for --target: invalid choice: 'comfy' (choose from 'other', 'default')", "change the value of --target"),
    ("usage: x\nfpack_cache_text_encoder_outputs.py: error: ambiguous option: --text_encoder could match --text_encoder1, --text_encoder2\n",
     "fpack_cache_text_encoder_outputs.py: --text_encoder is ambiguous", "spell the flag in full: one of --text_encoder1, --text_encoder2"),
])
def test_argparse_error_names_the_flag(stderr, cause, fix):
    f = classify(stderr, 2, "train", {})
    assert f.category == "argparse" and f.cause == cause and f.fix.startswith(fix)


def test_tokenizer_not_in_offline_hf_cache():
    log = (TB + "huggingface_hub.errors.LocalEntryNotFoundError: An error happened while trying to locate the file on the Hub "
           "and we cannot find the requested files in the local cache.\n\nThe above exception was the direct cause of the "
           "following exception:\n\n" + TB.replace("    main()\n", '    self.tokenizer = HuggingfaceTokenizer(name="google/umt5-xxl", seq_len=512)\n')
           + "OSError: We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the cached "
           "files.\nCheck your internet connection or see how to run the library in offline mode at "
           "'https://huggingface.co/docs/transformers/installation#offline-mode'.\n")
    f = classify(log, 1, "cache_text_encoder", {})
    assert f.category == "offline_hf_cache" and not f.transient
    assert f.cause == "tokenizer/model files of google/umt5-xxl are not in the Hugging Face cache and the hub cannot be reached"
    assert "huggingface-cli download google/umt5-xxl" in f.fix


def test_wrong_network_module_names_the_right_one():
    f = classify(TB + "RuntimeError: No LoRA modules found\n", 1, "train", {"family": "wan"})
    assert f.category == "network_module" and f.fix == 'use network_module = "networks.lora_wan" for this model family'


def test_dit_dtype_vs_mixed_precision():
    f = classify(TB + "AssertionError: DiT weights are in fp16, mixed precision must be fp16 or no\n", 1, "train", {})
    assert f.category == "dtype" and f.cause == "the DiT file is fp16 but mixed precision is not fp16"
    assert f.fix.startswith('set mixed_precision = "fp16"')


def test_fp8_scaled_without_fp8_base():
    f = classify(TB + "AssertionError: fp8_scaled requires fp8_base / fp8_scaledはfp8_baseが必要です\n", 1, "train", {})
    assert (f.category, f.cause) == ("config", "fp8_scaled is set without fp8_base") and "fp8_base" in f.fix


def test_missing_optimizer_type():
    f = classify(TB + "AttributeError: module 'torch.optim' has no attribute ''\n", 1, "train", {})
    assert f.cause == 'no optimizer_type was given (musubi\'s default of "" crashes)' and "adamw8bit" in f.fix
    assert classify(TB + "AttributeError: module 'torch.optim' has no attribute 'Adamw9'\n", 1, "train", {}).cause == "unknown optimizer_type 'Adamw9'"


def test_missing_attention_and_output_name():
    f = classify(TB + "ValueError: either --sdpa, --flash-attn, --flash3, --sage-attn or --xformers must be specified / ...\n", 1, "train", {})
    assert f.cause == "no attention implementation was chosen"
    f = classify(TB + "TypeError: unsupported operand type(s) for +: 'NoneType' and 'str'\n", 1, "train", {})
    assert f.fix == "set output_name for the training stage"


def test_disk_full():
    f = classify(TB + "OSError: [Errno 28] No space left on device\n", 1, "train", {"output_dir": "/runs/out"})
    assert f.category == "disk_full" and f.cause == "disk full while writing (/runs/out)" and "/runs/out" in f.fix


def test_hub_download_and_lost_connection_are_transient():
    log = TB + ("requests.exceptions.ConnectionError: (ProtocolError('Connection aborted.', ConnectionResetError(104, "
                "'Connection reset by peer')), '(Request ID: 6f1c)')\n")
    f = classify(log, 1, "cache_text_encoder", {})
    assert f.transient and f.category == "network" and f.cause.startswith("a download or connection failed")
    f = classify(TB + "huggingface_hub.errors.HfHubHTTPError: 503 Server Error: Service Unavailable for url: https://huggingface.co/x\n", 1, "train", {})
    assert f.transient


def test_unknown_failure_reports_the_last_error_line():
    log = TB + "RuntimeError: CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be asynchronously reported\n" \
        + ACCELERATE_TAIL.format(rc=1)
    f = classify(log, 1, "train", {})
    assert f.category == "unknown" and not f.transient
    assert f.cause == "exited with code 1: RuntimeError: CUDA error: an illegal memory access was encountered"
    assert classify("something odd\n", 3, "convert", {}).cause == "exited with code 3: something odd"


@pytest.mark.parametrize("kind, category", [
    ("oom", "oom"), ("crash", "unknown"), ("missing_file", "missing_file"), ("dataset_schema", "dataset"),
    ("tokenizer_offline", "offline_hf_cache"), ("disk_full", "disk_full"), ("network_module", "network_module"),
    ("dtype", "dtype"), ("hub_download", "network"), ("killed", "host_oom"),
])
def test_classifies_what_the_musubi_test_double_prints(tmp_path_factory, kind, category):
    import os
    import subprocess

    from musubi_double import double_python, make_fake_checkout, script_path

    root = tmp_path_factory.getbasetemp() / "double-for-failures"
    if not (root / "pyproject.toml").exists():
        make_fake_checkout(root)
    work = tmp_path_factory.mktemp(kind)
    (work / "ds.toml").write_text('[[datasets]]\nimage_directory = "imgs"\ncache_directory = "cache"\n')
    (work / "imgs").mkdir()
    (work / "vae.st").write_text("w")
    env = {**os.environ, "MUSUBI_DOUBLE_FAIL": f"*:{kind}", "MUSUBI_DOUBLE_FAIL_AT": "0"}
    cmd = [double_python(root), "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "bf16",
           "--num_machines", "1", "--dynamo_backend", "no", script_path(root, "wan_cache_latents"),
           "--dataset_config", "ds.toml", "--vae", "vae.st"]
    if kind == "disk_full":  # needs one item to write
        from PIL import Image

        Image.new("RGB", (32, 32)).save(work / "imgs/a.png")
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, timeout=60)
    f = classify(r.stderr.decode(), r.returncode, "cache_latents", {"family": "wan"})
    assert r.returncode != 0 and f.category == category, (f, r.stderr.decode()[-500:])


def test_a_failed_dataset_check_names_every_problem():
    log = """=== musubi-pipe: check attempt 1: python -c '...' dataset inspect d.toml
[0] video dataset /data/clips
    4 found, 2 used, 2 without caption
    - c1.mp4: no caption file c1.txt: musubi's caching stops with FileNotFoundError
    - c3.mp4: cannot be opened as a video
=== musubi-pipe: exit code 1
"""
    f = classify(log, 1, "check_dataset", {})
    assert f.category == "dataset"
    assert f.cause == ("the dataset has 2 problems: c1.mp4: no caption file c1.txt: musubi's caching stops with "
                       "FileNotFoundError; c3.mp4: cannot be opened as a video")


def test_a_failed_dataset_check_with_many_problems_stays_readable():
    lines = "".join(f"    - c{i}.mp4: no caption file c{i}.txt\n" for i in range(30))
    f = classify(f"[0] video dataset /data/clips\n{lines}=== musubi-pipe: exit code 1\n", 1, "check_dataset", {})
    assert f.cause.startswith("the dataset has 30 problems: c0.mp4: no caption file c0.txt; c1.mp4")
    assert "c19.mp4" in f.cause and "c20.mp4" not in f.cause and f.cause.endswith("; and 10 more in the log")


def test_the_executors_own_log_lines_are_not_the_cause():
    log = "Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: boom\n\n=== musubi-pipe: exit code 1\n"
    assert classify(log, 1, "generate", {}).cause == "exited with code 1: RuntimeError: boom"
