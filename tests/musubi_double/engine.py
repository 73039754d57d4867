"""Test double of musubi-tuner's scripts: same flags, streams, log lines, file names and failures, no models.

This file is copied into a fake checkout as ``src/musubi_tuner/_double_engine.py``; every fake
script there (``wan_train_network.py`` ...) is a two-line stub calling ``main(__file__)``. It is a
TEST DOUBLE, not musubi-tuner: it parses argv with a parser rebuilt from the recorded contract
(``_double_contract/*.json``), then imitates what the real script prints and writes (musubi-facts
§3-§5, §8). Tensors are tiny; LoRA files are real safetensors with musubi's key names.

Behaviour kept from the real scripts: argparse errors print usage and ``error: ...`` to stderr
and exit 2; runtime failures print a Python traceback to stderr and exit 1; logging and tqdm
bars (redrawn with ``\\r``) go to stderr, ``print`` output (``epoch N/M``, ``saving checkpoint``)
to stdout; no signal handlers (SIGINT -> KeyboardInterrupt traceback, then CPython exits by
SIGINT: rc -2, 130 in a shell; nothing saved; SIGTERM kills at once).

Training is a small numeric model of musubi's loop, so resume can be checked end to end: the
learning-rate schedule is built from the args (``--lr_scheduler`` constant, constant_with_warmup,
linear, cosine; ``--lr_warmup_steps`` int or fraction; length = ``--max_train_steps`` after the
``--max_train_epochs`` override, as in ``get_lr_scheduler``); each epoch shuffles the batches with a
seed of (dataset seed + epoch number), as musubi's ``shuffle_buckets`` does; each step moves one
weight by ``lr * grad(batch)``. ``-state`` folders hold that weight, the optimizer's current lr and
the scheduler's step counter and base lr. ``--resume`` restores them (as ``accelerator.load_state``
does) while the loop's own step and epoch counters restart at 0 (as in musubi 30c658c), so a resumed
run's epochs are shuffled as the first epochs were. With ``--logging_dir``, the
scalars musubi logs (``loss/current``, ``loss/average``, ``lr/unet`` per step, ``loss/epoch`` per
epoch) go to a TensorBoard event file under ``<logging_dir>/<log_prefix><time>/network_train/``.

Environment variables read by the double:
  MUSUBI_DOUBLE_FAIL        ``<script>:<kind>[,<script>:<kind>...]``; ``<script>`` is a script
                            name with or without ``.py``, or ``*``. Kinds: oom, crash, hang,
                            missing_file, dataset_schema, tokenizer_offline, disk_full,
                            network_module, dtype, hub_download (transient), killed (SIGKILLs
                            itself, like the host OOM killer). Each prints the real error text.
  MUSUBI_DOUBLE_FAIL_ONCE   ``1``: each injected failure happens only on the first run; a marker
                            under ``<checkout>/.double-state/`` makes later runs succeed.
  MUSUBI_DOUBLE_FAIL_AT     training step at which oom/crash/hang/killed/disk_full strike
                            (default 1; ``0`` = before training starts).
  MUSUBI_DOUBLE_STEP_SECONDS  seconds per training step / cache batch / sampling step (default 0.01).
  MUSUBI_DOUBLE_ALLOW_ABBREV  ``1``: accept flag prefixes like real argparse; default off, so the
                            double rejects abbreviations as check_argv.py does.
  MUSUBI_DOUBLE_RECORD      a file; each run appends one JSON line {script, argv, cwd, pid, devices
                            (its CUDA_VISIBLE_DEVICES or null), rank, start (time.time())}.
  MUSUBI_DOUBLE_TIMES       a file; each run that ends appends {script, pid, devices, rank, start, end}:
                            step intervals, to see steps overlap.
  MUSUBI_DOUBLE_RUN_SECONDS  seconds every script sleeps after parsing its arguments (default 0):
                            a fixed cost per step, for the scheduler's tests and benchmark.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import shutil
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(os.path.dirname(HERE))  # <root>/src/musubi_tuner -> <root>

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".avif")
VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".flv", ".wmv", ".m4v", ".mpg", ".mpeg")

# script-name prefix -> cache architecture (musubi-facts §1); longest prefix first
ARCH_PREFIXES = [
    ("hv_1_5_", "hv15"), ("hv_", "hv"), ("wan_", "wan"), ("fpack_", "fp"), ("flux_kontext_", "fk"),
    ("flux_2_", "f2d"), ("qwen_image_", "qi"), ("zimage_", "zi"), ("kandinsky5_", "k5"),
    ("hidream_o1_", "ho1"), ("ideogram4_", "i4"), ("krea2_", "kr2"),
    ("cache_latents", "hv"), ("cache_text_encoder_outputs", "hv"),
]
# Qwen-Image's caches carry the --model_version's architecture (qwen_image_utils.resolve_model_version_args)
QWEN_VERSION_ARCH = {"edit": "qie", "edit-2509": "qie", "edit-2511": "qie", "layered": "qil"}
# FLUX.2's caches and LoRAs carry the --model_version's architecture (flux2_utils.FLUX2_MODEL_INFO)
FLUX2_VERSION_ARCH = {"dev": "f2d", "klein-4b": "f2k4b", "klein-base-4b": "f2k4b", "klein-9b": "f2k9b", "klein-base-9b": "f2k9b"}
ARCH_FULL_NAME = {"hv": "hunyuan_video", "wan": "wan", "fp": "framepack", "qi": "qwen_image", "qie": "qwen_image",
                  "qil": "qwen_image", "zi": "z_image", "hv15": "hunyuan_video_1_5", "k5": "kandinsky5",
                  "fk": "flux_kontext", "f2d": "flux_2_dev", "f2k4b": "flux_2_klein_4b", "f2k9b": "flux_2_klein_9b"}
NETWORK_MODULE = {
    "hv": "networks.lora", "wan": "networks.lora_wan", "fp": "networks.lora_framepack", "fk": "networks.lora_flux",
    "f2d": "networks.lora_flux_2", "f2k4b": "networks.lora_flux_2", "f2k9b": "networks.lora_flux_2", "qi": "networks.lora_qwen_image", "zi": "networks.lora_zimage",
    "qie": "networks.lora_qwen_image", "qil": "networks.lora_qwen_image",
    "hv15": "networks.lora_hv_1_5", "k5": "networks.lora_kandinsky", "ho1": "networks.lora_hidream_o1",
    "i4": "networks.lora_ideogram4", "kr2": "networks.lora_krea2",
}
# a few real module names per family, for LoRA keys lora_unet_<module>
LORA_MODULES = {
    "hv": ["double_blocks_0_img_attn_qkv", "double_blocks_0_txt_mlp_fc1", "single_blocks_0_linear1"],
    "wan": ["blocks_0_self_attn_q", "blocks_0_cross_attn_k", "blocks_1_ffn_0"],
    "fp": ["transformer_blocks_0_attn_to_q", "single_transformer_blocks_0_attn_to_k", "transformer_blocks_1_ff_net_0_proj"],
    "qi": ["transformer_blocks_0_attn_to_q", "transformer_blocks_0_attn_add_k_proj", "transformer_blocks_1_img_mlp_net_0_proj"],
    "zi": ["layers_0_attention_to_q", "layers_0_attention_to_out_0", "layers_1_feed_forward_w1"],
    "hv15": ["double_blocks_0_img_attn_q", "double_blocks_0_txt_mlp_fc1", "double_blocks_1_img_mod_linear"],
    "k5": ["visual_transformer_blocks_0_self_attention_to_query", "visual_transformer_blocks_0_feed_forward_in_layer",
           "text_transformer_blocks_0_self_attention_to_key"],
}
LORA_MODULES["qie"] = LORA_MODULES["qil"] = LORA_MODULES["qi"]
LORA_MODULES["fk"] = LORA_MODULES["f2d"] = LORA_MODULES["f2k4b"] = LORA_MODULES["f2k9b"] = [
    "double_blocks_0_img_attn_qkv", "double_blocks_0_txt_mlp_0", "single_blocks_1_linear2"]
MODELSPEC_ARCH = {"hv": "hunyuan-video/lora", "wan": "wan2.1/lora", "fp": "framepack/lora", "qi": "Qwen-Image/lora",
                  "qie": "Qwen-Image-Edit/lora", "qil": "Qwen-Image-Layered/lora", "zi": "Z-Image/lora",
                  "hv15": "hunyuan-video-1.5/lora", "k5": "Kandinsky-5/lora", "fk": "Flux.1-dev/lora",
                  "f2d": "Flux.2-dev/lora", "f2k4b": "Flux.2-klein-4b/lora", "f2k9b": "Flux.2-klein-9b/lora"}
TORCH_OPTIMIZERS = {"adamw", "adamw8bit", "adafactor", "adam", "sgd", "rmsprop", "adagrad", "lion", "radam", "nadam"}

DATASET_GENERAL_KEYS = {"resolution", "caption_extension", "batch_size", "num_repeats", "enable_bucket", "bucket_no_upscale"}
IMAGE_KEYS = DATASET_GENERAL_KEYS | {
    "image_directory", "image_jsonl_file", "cache_directory", "control_directory", "multiple_target",
    "fp_latent_window_size", "fp_1f_clean_indices", "fp_1f_target_index", "fp_1f_no_post", "no_resize_control",
    "control_resolution", "flux_kontext_no_resize_control", "qwen_image_edit_no_resize_control",
    "qwen_image_edit_control_resolution",
}
VIDEO_KEYS = DATASET_GENERAL_KEYS | {
    "video_directory", "video_jsonl_file", "control_directory", "cache_directory", "target_frames",
    "frame_extraction", "frame_stride", "frame_sample", "max_frames", "source_fps", "fp_latent_window_size",
}
KEY_TYPES = {"batch_size": int, "num_repeats": int, "frame_stride": int, "frame_sample": int, "max_frames": int,
             "fp_latent_window_size": int, "source_fps": float, "caption_extension": str, "image_directory": str,
             "video_directory": str, "cache_directory": str, "enable_bucket": bool, "bucket_no_upscale": bool,
             "frame_extraction": str}


class InjectedFailure(Exception):
    pass


# ---------------------------------------------------------------- output helpers

def log(name: str, msg: str, level: str = "INFO") -> None:
    sys.stderr.write(f"{level}:{name}:{msg}\n")
    sys.stderr.flush()


def out(msg: str = "") -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def step_seconds() -> float:
    return float(os.environ.get("MUSUBI_DOUBLE_STEP_SECONDS", "0.01"))


def _fmt_time(s: float) -> str:
    s = int(s)
    m, s = divmod(s, 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Bar:
    """Writes tqdm 4.67's non-tty format: '\\r' + meter per redraw, '\\n' on close."""

    BLOCKS = " ▏▎▍▌▋▊▉█"

    def __init__(self, total: int | None = None, desc: str = ""):
        self.total, self.desc, self.n, self.postfix = total, desc, 0, ""
        self.start = time.time()
        self.draw()

    def meter(self) -> str:
        elapsed = time.time() - self.start
        rate = self.n / elapsed if self.n and elapsed > 0 else None
        if rate is None:
            rate_s = "?it/s"
        elif rate < 1:
            rate_s = f"{1 / rate:5.2f}s/it"
        else:
            rate_s = f"{rate:5.2f}it/s"
        post = f", {self.postfix}" if self.postfix else ""
        prefix = f"{self.desc}: " if self.desc else ""
        if self.total is None:
            return f"{prefix}{self.n}it [{_fmt_time(elapsed)}, {rate_s}{post}]"
        frac = self.n / self.total if self.total else 1.0
        remaining = _fmt_time((self.total - self.n) / rate) if rate else "?"
        eighths = int(frac * 10 * 8)
        bar = "█" * (eighths // 8)
        if len(bar) < 10:
            bar += (self.BLOCKS[eighths % 8] if eighths % 8 else " ") + " " * (9 - len(bar))
        return f"{prefix}{frac * 100:3.0f}%|{bar}| {self.n}/{self.total} [{_fmt_time(elapsed)}<{remaining}, {rate_s}{post}]"

    def draw(self) -> None:
        sys.stderr.write("\r" + self.meter())
        sys.stderr.flush()

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.n += n
        if postfix is not None:
            self.postfix = postfix
        self.draw()

    def close(self) -> None:
        self.draw()
        sys.stderr.write("\n")
        sys.stderr.flush()


# ---------------------------------------------------------------- argv

def _int_or_float(value: str):
    try:
        return int(value)
    except ValueError:
        return float(value)


TYPES = {"int": int, "float": float, "_int_or_float": _int_or_float, "int_or_float": _int_or_float}


def build_parser(script: str) -> argparse.ArgumentParser:
    """The script's parser rebuilt from the recorded contract, the way check_argv.py does it."""
    spec_path = os.path.join(HERE, "_double_contract", script + ".json")
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    allow_abbrev = os.environ.get("MUSUBI_DOUBLE_ALLOW_ABBREV") == "1"
    p = argparse.ArgumentParser(prog=spec["prog"], allow_abbrev=allow_abbrev)
    for a in spec["args"]:
        optional = a["flags"][0].startswith("-")
        kw = {"dest": a["dest"]} if optional else {}
        act = a["action"]
        if act == "_StoreTrueAction":
            kw["action"] = "store_true"
        elif act == "_StoreFalseAction":
            kw["action"] = "store_false"
        elif act == "_AppendAction":
            kw["action"] = "append"
        elif act == "_CountAction":
            kw["action"] = "count"
        if act in ("_StoreAction", "_AppendAction"):
            if a["nargs"] is not None:
                kw["nargs"] = a["nargs"]
            if a["choices"]:
                kw["choices"] = a["choices"]
            if a["type"] in TYPES:
                kw["type"] = TYPES[a["type"]]
        if a["default"] is not None and a["default"] != "<long text omitted>":
            kw["default"] = a["default"]
        if a["required"] and optional:
            kw["required"] = True
        p.add_argument(*a["flags"], **kw)
    return p


# ---------------------------------------------------------------- failure injection

def injected(script: str) -> str | None:
    spec = os.environ.get("MUSUBI_DOUBLE_FAIL", "")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        target, _, kind = item.partition(":")
        target = target[:-3] if target.endswith(".py") else target
        if target in ("*", script):
            if os.environ.get("MUSUBI_DOUBLE_FAIL_ONCE") == "1":
                marker = os.path.join(CHECKOUT, ".double-state", f"failed-once-{script}-{kind}")
                if os.path.exists(marker):
                    return None
                os.makedirs(os.path.dirname(marker), exist_ok=True)
                open(marker, "w").close()
            return kind
    return None


def fail_at() -> int:
    return int(os.environ.get("MUSUBI_DOUBLE_FAIL_AT", "1"))


def traceback_exit(frames: list[tuple[str, int, str, str]], final: str, chained: str = "") -> None:
    """Print a traceback in CPython's format and exit 1, as an uncaught exception would."""
    text = ""
    if chained:
        text += chained + "\n\nThe above exception was the direct cause of the following exception:\n\n"
    text += "Traceback (most recent call last):\n"
    for file, line, func, code in frames:
        text += f'  File "{file}", line {line}, in {func}\n    {code}\n'
    sys.stderr.write(text + final + "\n")
    sys.stderr.flush()
    sys.exit(1)


def _frame(mod: str, line: int, func: str, code: str) -> tuple[str, int, str, str]:
    return (os.path.join(HERE, *mod.split("/")) + ".py", line, func, code)


MAIN_FRAMES = lambda script: [_frame(script, 9999, "<module>", "main()")]  # noqa: E731

OOM_TEXT = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.55 GiB "
    "of which 1.06 GiB is free. Including non-PyTorch memory, this process has 22.48 GiB memory in use. Of the "
    "allocated memory 21.78 GiB is allocated by PyTorch, and 254.12 MiB is reserved by PyTorch but unallocated. If "
    "reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid "
    "fragmentation.  See documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)
HF_OFFLINE_CHAINED = (
    "Traceback (most recent call last):\n"
    '  File "/venv/lib/python3.10/site-packages/transformers/utils/hub.py", line 479, in cached_files\n'
    "    hf_hub_download(\n"
    "huggingface_hub.errors.LocalEntryNotFoundError: An error happened while trying to locate the file on the Hub and "
    "we cannot find the requested files in the local cache. Please check your connection and try again or make sure "
    "your Internet connection is on."
)
HF_OFFLINE_TEXT = (
    "OSError: We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the cached "
    "files.\nCheck your internet connection or see how to run the library in offline mode at "
    "'https://huggingface.co/docs/transformers/installation#offline-mode'."
)
HUB_DOWNLOAD_TEXT = (
    "requests.exceptions.ConnectionError: (ProtocolError('Connection aborted.', ConnectionResetError(104, "
    "'Connection reset by peer')), '(Request ID: 6f1c2a9e-4b7d-4e0a-9d8c-2f5e1b3a7c11)')"
)


def raise_injected(kind: str, script: str, args: argparse.Namespace) -> None:
    """Fail the way the real program fails for `kind`: same final line, same exit status."""
    f = MAIN_FRAMES(script)
    if kind == "oom":
        traceback_exit(f + [_frame("../torch/nn/modules/module", 1784, "_call_impl", "return forward_call(*args, **kwargs)")], OOM_TEXT)
    if kind == "crash":
        traceback_exit(f, "RuntimeError: CUDA error: an illegal memory access was encountered\n"
                       "CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be incorrect.")
    if kind == "hang":
        while True:  # like a stuck NCCL call: only a signal ends it
            time.sleep(1)
    if kind == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "missing_file":
        path = getattr(args, "dit", None) or getattr(args, "vae", None) or "/models/missing.safetensors"
        traceback_exit(f + [_frame("utils/safetensors_utils", 53, "__init__", 'self.file = open(filename, "rb")')],
                       f'FileNotFoundError: [Errno 2] No such file or directory: {path!r}')
    if kind == "dataset_schema":
        log("musubi_tuner.dataset.config_utils", "Invalid user config / ユーザ設定の形式が正しくないようです", "ERROR")
        traceback_exit(f + [_frame("dataset/config_utils", 362, "sanitize_user_config", "return self.user_config_validator(user_config)")],
                       "voluptuous.error.MultipleInvalid: extra keys not allowed @ data['datasets'][0]['foo']")
    if kind == "tokenizer_offline":
        traceback_exit(f + [_frame("wan/modules/t5", 503, "__init__", 'self.tokenizer = HuggingfaceTokenizer(name="google/umt5-xxl", seq_len=text_len, clean="whitespace")')],
                       HF_OFFLINE_TEXT, chained=HF_OFFLINE_CHAINED)
    if kind == "hub_download":
        traceback_exit(f + [_frame("../huggingface_hub/file_download", 1484, "_get_metadata_or_catch_error", "metadata = get_hf_file_metadata(")],
                       HUB_DOWNLOAD_TEXT)
    if kind == "disk_full":
        traceback_exit(f + [_frame("../safetensors/torch", 286, "save_file", "serialize_file(_flatten(tensors), filename, metadata=metadata)")],
                       "OSError: [Errno 28] No space left on device")
    if kind == "network_module":
        traceback_exit(f + [_frame("networks/lora", 740, "__init__", 'raise RuntimeError("No LoRA modules found")')],
                       "RuntimeError: No LoRA modules found")
    if kind == "dtype":
        traceback_exit(f + [_frame("wan_train_network", 63, "handle_model_specific_args", 'assert args.mixed_precision in ["fp16", "no"], "DiT weights are in fp16, mixed precision must be fp16 or no"')],
                       "AssertionError: DiT weights are in fp16, mixed precision must be fp16 or no")
    raise SystemExit(f"test double: unknown MUSUBI_DOUBLE_FAIL kind {kind!r}")


# ---------------------------------------------------------------- files

def save_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    from safetensors.numpy import save_file

    disk_full_check(path)
    save_file(tensors, path, metadata=metadata)


def disk_full_check(path: str) -> None:
    full = os.environ.get("_MUSUBI_DOUBLE_DISK_FULL")
    if full:
        traceback_exit(MAIN_FRAMES(full), "OSError: [Errno 28] No space left on device")


def load_safetensors(path: str) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(path, framework="numpy") as f:
        metadata = f.metadata() or {}
    return load_file(path), metadata


def require_file(script: str, path: str | None, what: str) -> None:
    if path and not os.path.exists(path):
        traceback_exit(MAIN_FRAMES(script) + [_frame("utils/safetensors_utils", 53, "__init__", 'self.file = open(filename, "rb")')],
                       f'FileNotFoundError: No such file or directory: "{path}"')


# ---------------------------------------------------------------- dataset

def dataset_error(script: str, message: str) -> None:
    log("musubi_tuner.dataset.config_utils", "Invalid user config / ユーザ設定の形式が正しくないようです", "ERROR")
    traceback_exit(MAIN_FRAMES(script) + [_frame("dataset/config_utils", 362, "sanitize_user_config",
                                                 "return self.user_config_validator(user_config)")],
                   f"voluptuous.error.MultipleInvalid: {message}")


def _check_value(script: str, where: str, key: str, value) -> None:
    want = KEY_TYPES.get(key)
    if want is float and (isinstance(value, bool) or not isinstance(value, float)):
        dataset_error(script, f"expected float for dictionary value @ {where}['{key}']")
    if want is int and (isinstance(value, bool) or not isinstance(value, int)):
        dataset_error(script, f"expected int for dictionary value @ {where}['{key}']")
    if want is str and not isinstance(value, str):
        dataset_error(script, f"expected str for dictionary value @ {where}['{key}']")
    if want is bool and not isinstance(value, bool):
        dataset_error(script, f"expected bool for dictionary value @ {where}['{key}']")
    if key == "resolution":
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value))
        if not ok:
            dataset_error(script, f"expected int for dictionary value @ {where}['{key}']")
    if key == "target_frames" and not (isinstance(value, list) and all(isinstance(v, int) for v in value)):
        dataset_error(script, f"expected list for dictionary value @ {where}['{key}']")


def load_dataset_config(script: str, path: str | None, logger: str) -> list[dict]:
    """Read and check the dataset TOML like musubi's ConfigSanitizer; returns resolved datasets."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    if path is None:
        traceback_exit(MAIN_FRAMES(script), "ValueError: dataset_config is required / dataset_configが必要です")
    log(logger, f"Load dataset config from {path}")
    if not os.path.exists(path):
        traceback_exit(MAIN_FRAMES(script) + [_frame("dataset/config_utils", 391, "load_user_config",
                                                     'raise ValueError(f"file not found / ファイルが見つかりません: {file}")')],
                       f"ValueError: file not found / ファイルが見つかりません: {path}")
    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        traceback_exit(MAIN_FRAMES(script), f"toml.decoder.TomlDecodeError: {e}")
    for key in config:
        if key not in ("general", "datasets"):
            dataset_error(script, f"extra keys not allowed @ data['{key}']")
    general = config.get("general", {})
    for key, value in general.items():
        if key not in DATASET_GENERAL_KEYS:
            dataset_error(script, f"extra keys not allowed @ data['general']['{key}']")
        _check_value(script, "data['general']", key, value)
    resolved = []
    for i, ds in enumerate(config.get("datasets", [])):
        video = "video_directory" in ds or "video_jsonl_file" in ds
        allowed = VIDEO_KEYS if video else IMAGE_KEYS
        for key, value in ds.items():
            if key not in allowed:
                dataset_error(script, f"extra keys not allowed @ data['datasets'][{i}]['{key}']")
            _check_value(script, f"data['datasets'][{i}]", key, value)
        merged = {"resolution": [960, 544], "batch_size": 1, "num_repeats": 1, "caption_extension": None,
                  "target_frames": [1], "frame_extraction": "head", "max_frames": 129, **general, **ds}
        if isinstance(merged["resolution"], int):
            merged["resolution"] = [merged["resolution"]] * 2
        merged["video"] = video
        media = merged.get("video_directory") or merged.get("image_directory")
        if merged.get("cache_directory") is None:
            if media is None:
                traceback_exit(MAIN_FRAMES(script), "AssertionError: cache_directory is required / cache_directoryは必須です")
            merged["cache_directory"] = media
        resolved.append(merged)
    caches = [os.path.normpath(d["cache_directory"]) for d in resolved]
    if len(set(caches)) != len(caches):
        traceback_exit(MAIN_FRAMES(script), "ValueError: cache directory should be unique for each dataset (note that cache "
                       "directory is image/video directory if not specified) / cache directory は各データセットごとに異なる必要があります"
                       "（指定されていない場合はimage/video directoryが使われるので注意）")
    return resolved


def media_items(ds: dict) -> list[dict]:
    """Media files of one dataset with their original size and frame count."""
    items = []
    if ds["video"]:
        directory = ds.get("video_directory")
        log("musubi_tuner.dataset.datasources", f"glob videos in {directory}")
        paths = sorted(p for p in glob.glob(os.path.join(glob.escape(directory or ""), "*")) if p.lower().endswith(VIDEO_EXTS))
        log("musubi_tuner.dataset.datasources", f"found {len(paths)} videos")
    else:
        directory = ds.get("image_directory")
        log("musubi_tuner.dataset.datasources", f"glob images in {directory}")
        paths = sorted(p for p in glob.glob(os.path.join(glob.escape(directory or ""), "*")) if p.lower().endswith(IMAGE_EXTS))
        log("musubi_tuner.dataset.datasources", f"found {len(paths)} images")
    for p in paths:
        w, h, frames = media_size(p, ds["video"])
        items.append({"path": p, "stem": os.path.splitext(os.path.basename(p))[0], "w": w, "h": h, "frames": frames})
    return items


def media_size(path: str, video: bool) -> tuple[int, int, int]:
    """Original width, height, frame count: from a `<file>.size` sidecar ("WxHxF"), else the file, else 960x544x1."""
    sidecar = path + ".size"
    if os.path.exists(sidecar):
        parts = [int(x) for x in open(sidecar).read().strip().split("x")]
        return parts[0], parts[1], parts[2] if len(parts) > 2 else 1
    try:
        if video:
            import av

            with av.open(path) as c:
                s = c.streams.video[0]
                frames = s.frames or sum(1 for _ in c.decode(video=0))
                return s.codec_context.width, s.codec_context.height, frames
        from PIL import Image

        with Image.open(path) as im:
            return im.size[0], im.size[1], 1
    except Exception:
        return 960, 544, 1


def latent_cache_names(ds: dict, item: dict, arch: str) -> list[str]:
    w, h = item["w"], item["h"]
    if not ds["video"]:
        return [f"{item['stem']}_{w:04d}x{h:04d}_{arch}.safetensors"]
    names = []
    for target in ds["target_frames"]:
        target = (target - 1) // 4 * 4 + 1  # musubi rounds to N*4+1
        if ds["frame_extraction"] == "full":
            target = (min(item["frames"], ds["max_frames"]) - 1) // 4 * 4 + 1
        if item["frames"] >= target:
            sec = "-0000" if arch == "fp" else ""
            names.append(f"{item['stem']}_{0:05d}-{target:03d}{sec}_{w:04d}x{h:04d}_{arch}.safetensors")
    return names


def dataset_summary(logger: str, datasets: list[dict], counts: list[int]) -> None:
    for i, (ds, n) in enumerate(zip(datasets, counts)):
        kind = "video" if ds["video"] else "image"
        log(logger, f"[Dataset {i}]\n  is_image_dataset: {not ds['video']}\n  resolution: {tuple(ds['resolution'])}\n"
                    f"  batch_size: {ds['batch_size']}\n  num_repeats: {ds['num_repeats']}\n"
                    f"  caption_extension: \"{ds['caption_extension']}\"\n  {kind}_directory: \"{ds.get(kind + '_directory')}\"\n"
                    f"  cache_directory: \"{ds['cache_directory']}\"\n  items: {n}\n")


# ---------------------------------------------------------------- scripts

def read_dataset(script: str, args, logger: str, fail: str | None) -> tuple[list[dict], list[list]]:
    """What both caching scripts do first: load and check the dataset config, find the media, print the summary."""
    if fail == "dataset_schema":
        log(logger, f"Load dataset config from {args.dataset_config}")
        raise_injected(fail, script, args)
    datasets = load_dataset_config(script, args.dataset_config, logger)
    all_items = [media_items(ds) for ds in datasets]
    dataset_summary("musubi_tuner.dataset.config_utils", datasets, [len(x) for x in all_items])
    return datasets, all_items


def cache_latents(script: str, arch: str, args, fail: str | None) -> None:
    logger = "__main__"
    datasets, all_items = read_dataset(script, args, logger, fail)
    pixels = script == "hidream_o1_cache_pixel"  # HiDream-O1 caches pixel patch tokens: no VAE
    if getattr(args, "vae", None) is None and not pixels:
        traceback_exit(MAIN_FRAMES(script), "AssertionError: vae checkpoint is required")
    if not pixels:
        require_file(script, args.vae, "vae")
    if arch == "fk" and getattr(args, "vae_dtype", None) is not None:
        traceback_exit(MAIN_FRAMES(script), "ValueError: VAE dtype is not supported in FLUX.1 Kontext.")
    for extra in ("image_encoder", "clip"):
        require_file(script, getattr(args, extra, None), extra)
    if fail in ("missing_file", "tokenizer_offline", "hub_download", "network_module", "dtype"):
        raise_injected(fail, script, args)
    if not pixels:
        log(logger, f"Loading VAE model from {args.vae}")
    for i, (ds, items) in enumerate(zip(datasets, all_items)):
        log(logger, f"Encoding dataset [{i}]")
        os.makedirs(ds["cache_directory"], exist_ok=True)
        wanted = []
        bar = Bar(None)
        batch = max(1, ds["batch_size"])
        for start in range(0, len(items), batch):
            if fail in ("oom", "crash", "hang", "killed") and bar.n + 1 >= fail_at():
                raise_injected(fail, script, args)
            for item in items[start:start + batch]:
                for name in latent_cache_names(ds, item, arch):
                    path = os.path.join(ds["cache_directory"], name)
                    wanted.append(os.path.normpath(path))
                    if args.skip_existing and os.path.exists(path):
                        continue
                    if fail == "disk_full":
                        raise_injected(fail, script, args)
                    write_latent(path, arch, item)
            time.sleep(step_seconds())
            bar.update(1)
        bar.close()
        remove_old_caches(ds["cache_directory"], f"*_{arch}.safetensors", wanted, args.keep_cache, logger)


def write_latent(path: str, arch: str, item: dict) -> None:
    import numpy as np

    f = 1 if item["frames"] <= 1 else (item["frames"] - 1) // 4 + 1
    lat = np.zeros((16, f, max(1, item["h"] // 64), max(1, item["w"] // 64)), dtype=np.float32)
    meta = {"architecture": ARCH_FULL_NAME.get(arch, arch), "width": str(item["w"]), "height": str(item["h"]),
            "format_version": "1.0.1"}
    if item["frames"] > 1:
        meta["frame_count"] = str(item["frames"])
    save_safetensors({f"latents_{f}x{lat.shape[2]}x{lat.shape[3]}_float32": lat}, path, meta)


def cache_text_encoder(script: str, arch: str, args, fail: str | None) -> None:
    import numpy as np

    logger = "__main__"
    datasets, all_items = read_dataset(script, args, logger, fail)
    for flag in ("t5", "text_encoder1", "text_encoder2", "text_encoder", "byt5"):
        if flag in vars(args):
            require_file(script, getattr(args, flag), flag)
            if getattr(args, flag):
                log(logger, f"Loading text encoder from {getattr(args, flag)}")
    if fail in ("missing_file", "tokenizer_offline", "hub_download", "network_module", "dtype"):
        raise_injected(fail, script, args)
    for i, (ds, items) in enumerate(zip(datasets, all_items)):
        log(logger, f"Encoding dataset [{i}]")
        os.makedirs(ds["cache_directory"], exist_ok=True)
        batch = args.batch_size or ds["batch_size"] or 1
        batches = [items[s:s + batch] for s in range(0, len(items), batch)]
        bar = Bar(len(batches))
        wanted = []
        for b in batches:
            if fail in ("oom", "crash", "hang", "killed") and bar.n + 1 >= fail_at():
                raise_injected(fail, script, args)
            for item in b:
                path = os.path.join(ds["cache_directory"], f"{item['stem']}_{arch}_te.safetensors")
                wanted.append(os.path.normpath(path))
                if args.skip_existing and os.path.exists(path):
                    continue
                if fail == "disk_full":
                    raise_injected(fail, script, args)
                caption = read_caption(item["path"], ds["caption_extension"])
                save_safetensors({"varlen_t5_float32" if arch == "wan" else "llm_float32": np.zeros((4, 8), np.float32)},
                                 path, {"architecture": ARCH_FULL_NAME.get(arch, arch), "caption1": caption, "format_version": "1.0.1"})
            time.sleep(step_seconds())
            bar.update(1)
        bar.close()
        remove_old_caches(ds["cache_directory"], f"*_{arch}_te.safetensors", wanted, args.keep_cache, logger)


def read_caption(media: str, ext: str | None) -> str:
    cap = os.path.splitext(media)[0] + (ext or ".txt")
    return open(cap, encoding="utf-8").read().strip() if os.path.exists(cap) else ""


def lora_tensors(arch: str, dim: int, alpha: float, step: int, precision: str | None, value: float | None = None) -> dict:
    """`value` is the trained weight of the double's numeric model (lora_up); default step * 0.001."""
    import numpy as np

    dtype = np.float16 if precision == "fp16" else np.float32
    rng = np.random.default_rng(1234)
    t = {}
    for module in LORA_MODULES.get(arch, LORA_MODULES["wan"]):
        name = f"lora_unet_{module}"
        t[f"{name}.lora_down.weight"] = (rng.standard_normal((dim, 8)) * 0.01 + step * 0.001).astype(dtype)
        t[f"{name}.lora_up.weight"] = (np.full((8, dim), step * 0.001 if value is None else value)).astype(dtype)
        t[f"{name}.alpha"] = np.array(alpha, dtype=np.float32)
    return t


def model_tensors(step: int, value: float) -> dict:
    """A full fine-tune's saved DiT: the model's own weight names (no lora_ prefix), the trained value in them."""
    import numpy as np

    return {"blocks.0.attn.qkv.weight": np.full((8, 8), value, np.float32), "blocks.0.attn.qkv.bias": np.full((8,), step * 0.001, np.float32)}


def training_items(datasets: list[dict], arch: str) -> list[tuple[int, int]]:
    """(items, batches) per dataset, counted from cache files that have a text-encoder partner, as musubi does."""
    result = []
    for ds in datasets:
        n = 0
        for cache in glob.glob(os.path.join(glob.escape(ds["cache_directory"]), f"*_{arch}.safetensors")):
            tokens = os.path.basename(cache).split("_")
            key = "_".join(tokens[:-3] if ds["video"] else tokens[:-2])
            te = os.path.join(ds["cache_directory"], f"{key}_{arch}_te.safetensors")
            if os.path.exists(te):
                n += 1
            else:
                log("musubi_tuner.dataset.image_video_dataset", f"Text encoder output cache file not found: {te}", "WARNING")
        n *= ds["num_repeats"]
        result.append((n, math.ceil(n / max(1, ds["batch_size"]))))
    return result


TRAIN_FIELDS = ("dataset_config", "dit", "config_file", "mixed_precision", "resume", "network_module", "optimizer_type",
                "gradient_accumulation_steps", "max_train_epochs", "max_train_steps", "network_dim", "network_alpha",
                "output_name", "output_dir", "learning_rate", "save_precision", "save_state", "save_state_on_train_end",
                "save_every_n_steps", "save_every_n_epochs", "save_last_n_steps", "save_last_n_epochs", "save_last_n_steps_state",
                "save_last_n_epochs_state", "sample_prompts",
                "sample_at_first", "sample_every_n_steps", "sample_every_n_epochs", "lr_scheduler", "lr_warmup_steps",
                "logging_dir", "log_prefix")


def train(script: str, arch: str, args, fail: str | None) -> None:
    tb = "musubi_tuner.training.trainer_base"
    # full-finetune scripts lack some LoRA flags: missing ones read as None
    args = argparse.Namespace(**{**{k: None for k in TRAIN_FIELDS}, **vars(args)})
    if args.max_train_steps is None:
        args.max_train_steps = 1600
    a = vars(args)
    if args.dataset_config is None:
        traceback_exit(MAIN_FRAMES(script), "ValueError: dataset_config is required / dataset_configが必要です")
    if args.dit is None:
        traceback_exit(MAIN_FRAMES(script), "ValueError: path to DiT model is required / DiTモデルのパスが必要です")
    if a.get("fp8_scaled") and not a.get("fp8_base"):
        traceback_exit(MAIN_FRAMES(script) + [_frame("training/trainer_base", 1398, "train", 'assert not args.fp8_scaled or args.fp8_base, "fp8_scaled requires fp8_base / fp8_scaledはfp8_baseが必要です"')],
                       "AssertionError: fp8_scaled requires fp8_base / fp8_scaledはfp8_baseが必要です")
    if a.get("sage_attn"):
        traceback_exit(MAIN_FRAMES(script), "ValueError: SageAttention doesn't support training currently. Please use `--sdpa` or `--xformers` etc. instead. / SageAttentionは現在学習をサポートしていないようです。`--sdpa`や`--xformers`などの他のオプションを使ってください")
    if args.config_file:
        cfg = args.config_file if args.config_file.endswith(".toml") else args.config_file + ".toml"
        if not os.path.exists(cfg):
            log("__main__", f"{cfg} not found.")
            sys.exit(1)
    if arch == "wan" or fail == "dtype":
        name = os.path.basename(args.dit).lower()
        if fail == "dtype" or ("fp16" in name and args.mixed_precision not in ("fp16", "no")):
            raise_injected("dtype", script, args)
        if "bf16" in name and args.mixed_precision not in ("bf16", "no"):
            traceback_exit(MAIN_FRAMES(script) + [_frame("wan_train_network", 65, "handle_model_specific_args", 'assert args.mixed_precision in ["bf16", "no"], "DiT weights are in bf16, mixed precision must be bf16 or no"')],
                           "AssertionError: DiT weights are in bf16, mixed precision must be bf16 or no")
    full = script.endswith("_train")  # full fine-tuning: the whole DiT, no network
    if full and (a.get("fp8_base") or a.get("fp8_scaled")):
        log("__main__", "FP8 training is not supported for fine-tuning. Set --fp8-base or --fp8-scaled to False.", "WARNING")
        args.fp8_base = args.fp8_scaled = False
    out("accelerator device: cpu")
    if fail == "dataset_schema":
        log("musubi_tuner.dataset.config_utils", f"Load dataset config from {args.dataset_config}")
        raise_injected(fail, script, args)
    datasets = load_dataset_config(script, args.dataset_config, "musubi_tuner.dataset.config_utils")
    counts = training_items(datasets, arch)
    dataset_summary("musubi_tuner.dataset.config_utils", datasets, [c[0] for c in counts])
    num_items = sum(c[0] for c in counts)
    if num_items == 0:
        traceback_exit(MAIN_FRAMES(script) + [_frame("training/trainer_base", 1449, "train", "raise ValueError(")],
                       "ValueError: No training items found in the dataset. Please ensure that the latent/Text Encoder cache "
                       "has been created beforehand. / データセットに学習データがありません。latent/Text Encoderキャッシュを事前に作成したか確認してください")
    if args.mixed_precision is None:
        args.mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        log(tb, f"mixed precision set to {args.mixed_precision} / mixed precisionを{args.mixed_precision}に設定")
    log(tb, f"Loading DiT model from {args.dit}")
    if not any(a.get(k) for k in ("sdpa", "flash_attn", "sage_attn", "xformers", "flash3")):
        traceback_exit(MAIN_FRAMES(script) + [_frame("training/trainer_base", 1512, "train", "raise ValueError(")],
                       "ValueError: either --sdpa, --flash-attn, --flash3, --sage-attn or --xformers must be specified / --sdpa, --flash-attn, --flash3, --sage-attn, --xformersのいずれかを指定してください")
    require_file(script, args.dit, "dit")
    if fail in ("missing_file", "tokenizer_offline", "hub_download"):
        raise_injected(fail, script, args)
    bar = Bar(10, f"Loading {os.path.basename(args.dit)}")
    for _ in range(10):
        bar.update(1)
    bar.close()
    if args.resume:
        log(tb, f"resume training from local state: {args.resume}")
        for f in ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
            if not os.path.exists(os.path.join(args.resume, f)):  # accelerate.load_state reads each
                traceback_exit(MAIN_FRAMES(script), f"FileNotFoundError: [Errno 2] No such file or directory: '{os.path.join(args.resume, f)}'")
    if not script.endswith("_train"):  # full finetune scripts have no network module
        out(f"import network module: {args.network_module}")
        if fail == "network_module" or args.network_module not in (NETWORK_MODULE.get(arch), "networks.loha", "networks.lokr"):
            raise_injected("network_module", script, args)
    out("prepare optimizer, data loader etc.")
    if full:
        out("number of trainable parameters: 64")
    opt = args.optimizer_type or ""
    if "." not in opt and opt.lower() not in TORCH_OPTIMIZERS:
        traceback_exit(MAIN_FRAMES(script) + [_frame("training/trainer_base", 237, "get_optimizer", "optimizer_class = getattr(torch.optim, optimizer_type)")],
                       f"AttributeError: module 'torch.optim' has no attribute '{opt}'")

    ga = max(1, args.gradient_accumulation_steps or 1)
    batches_per_epoch = sum(c[1] for c in counts)
    steps_per_epoch = math.ceil(batches_per_epoch / ga)
    if args.max_train_epochs is not None:
        args.max_train_steps = args.max_train_epochs * steps_per_epoch
        out(f"override steps. steps for {args.max_train_epochs} epochs is / 指定エポックまでのステップ数: {args.max_train_steps}")
    total = args.max_train_steps
    epochs = math.ceil(total / steps_per_epoch)
    out("running training / 学習開始")
    out(f"  num train items / 学習画像、動画数: {num_items}")
    out(f"  num batches per epoch / 1epochのバッチ数: {batches_per_epoch}")
    out(f"  num epochs / epoch数: {epochs}")
    out(f"  batch size per device / バッチサイズ: {', '.join(str(d['batch_size']) for d in datasets)}")
    out(f"  gradient accumulation steps / 勾配を合計するステップ数 = {ga}")
    out(f"  total optimization steps / 学習ステップ数: {total}")
    if full and a.get("full_bf16"):
        if args.mixed_precision != "bf16":
            traceback_exit(MAIN_FRAMES(script) + [_frame(script, 257, "train", 'assert args.mixed_precision == "bf16", (')],
                           "AssertionError: full_bf16 requires mixed precision='bf16' / full_bf16を使う場合はmixed_precision='bf16'を指定してください。")
        out("enable full bf16 training.")
    dim = args.network_dim or 4
    alpha = float(args.network_alpha if args.network_alpha is not None else 1)
    # the numeric model: schedule from the args, then what accelerator.load_state restores
    base_lr = float(args.learning_rate if args.learning_rate is not None else 2e-6)
    schedule = lr_schedule(args.lr_scheduler or "constant", args.lr_warmup_steps or 0, total)
    weight, counter, lr = 0.0, 0, base_lr * schedule(0)
    dataset_seed = 1000 + (args.seed or 0)
    if args.resume:
        tensors, _ = load_safetensors(os.path.join(args.resume, "model.safetensors"))
        weight = float(tensors["double.weight"][0]) if "double.weight" in tensors else 0.0
        with open(os.path.join(args.resume, "optimizer.bin"), "rb") as fh:
            lr = json.loads(fh.read() or b"{}").get("lr", lr)
        with open(os.path.join(args.resume, "scheduler.bin"), "rb") as fh:
            sched = json.loads(fh.read() or b"{}")
        counter, base_lr = sched.get("last_epoch", 0), sched.get("base_lrs", [base_lr])[0]
        log(tb, f"test double: resumed from {args.resume} at scheduler step {counter}; loop counters restart at 0 as in musubi-tuner")

    meta_base = {} if full else {"ss_network_module": args.network_module, "ss_network_dim": str(dim), "ss_network_alpha": str(alpha)}
    meta_base.update({"ss_output_name": str(args.output_name), "ss_max_train_steps": str(total), "ss_num_epochs": str(epochs),
                 "ss_mixed_precision": str(args.mixed_precision), "ss_learning_rate": str(args.learning_rate),
                 "modelspec.architecture": MODELSPEC_ARCH.get(arch, arch + "/lora"),
                 "modelspec.title": str(args.output_name), "musubi_double": "1"})
    if full:  # a model's modelspec, not a LoRA's
        meta_base["modelspec.architecture"] = meta_base["modelspec.architecture"].removesuffix("/lora")
        meta_base["ss_full_bf16"] = str(bool(a.get("full_bf16")))
    if args.resume:
        meta_base["musubi_double_resumed_from"] = os.path.abspath(args.resume)
    tb_writer = TBWriter(args.logging_dir, args.log_prefix) if args.logging_dir else None

    def save(name_suffix: str, step: int, epoch: int, final: bool = False) -> None:
        if args.output_name is None:
            traceback_exit(MAIN_FRAMES(script) + [_frame("training/trainer_base", 2160, "train", "ckpt_name = train_utils.get_last_ckpt_name(args.output_name)"),
                                                  _frame("utils/train_utils", 118, "get_last_ckpt_name", 'return model_name + "." + "safetensors"')],
                           "TypeError: unsupported operand type(s) for +: 'NoneType' and 'str'")
        os.makedirs(args.output_dir, exist_ok=True)
        ckpt = os.path.join(args.output_dir, f"{args.output_name}{name_suffix}.safetensors")
        out(f"\nsaving checkpoint: {ckpt}")
        meta = {**meta_base, "ss_steps": str(step), "ss_epoch": str(epoch), "ss_training_finished_at": str(time.time())}
        tmp_meta = dict(meta)
        tensors = model_tensors(counter, weight) if full else lora_tensors(arch, dim, alpha, counter, args.save_precision, weight)
        meta["sshs_model_hash"] = str(abs(hash(tuple(sorted(tmp_meta.items())))))
        save_safetensors(tensors, ckpt, meta)
        if args.save_state or (final and args.save_state_on_train_end):
            state = os.path.join(args.output_dir, f"{args.output_name}{name_suffix}-state")
            log("accelerate.accelerator", f"Saving current state to {state}")
            os.makedirs(state, exist_ok=True)
            import numpy as np

            save_safetensors({**lora_tensors(arch, dim, alpha, counter, None, weight),
                              "double.weight": np.array([weight], dtype=np.float64)}, os.path.join(state, "model.safetensors"))
            for f, blob in (("optimizer.bin", {"lr": lr}), ("scheduler.bin", {"last_epoch": counter, "base_lrs": [base_lr]}),
                            ("random_states_0.pkl", {})):
                with open(os.path.join(state, f), "wb") as fh:
                    fh.write(json.dumps(blob).encode())

    def prune(kind: str, current: int, every: int | None, keep: int | None) -> None:
        if not every or not keep:
            return
        old = current - every * keep
        if old <= 0:
            return
        suffix = f"-step{old:08d}" if kind == "step" else f"-{old:06d}"
        path = os.path.join(args.output_dir, f"{args.output_name}{suffix}.safetensors")
        if os.path.exists(path):
            log(tb, f"removing old checkpoint: {path}")
            os.remove(path)
        # musubi's train_utils.save_and_remove_state_*: states follow save_last_n_*_state, else
        # save_last_n_* (the epoch one with the checkpoints' rule, the step one with its own).
        keep_state = (args.save_last_n_steps_state if kind == "step" else args.save_last_n_epochs_state) or keep
        if kind == "step":
            old_state = current - keep_state - 1
            old_state -= old_state % every
        else:
            old_state = current - every * keep_state
        state = os.path.join(args.output_dir, f"{args.output_name}{'-step%08d' % old_state if kind == 'step' else '-%06d' % old_state}-state")
        if old_state > 0 and os.path.isdir(state):
            log(tb, f"removing old state: {state}")
            shutil.rmtree(state)

    def sample(step: int, epoch: int, by_epoch: bool) -> None:
        if not args.sample_prompts:
            return
        log(tb, f"generating sample images at step / サンプル画像生成 ステップ: {step}")
        d = os.path.join(args.output_dir, "sample")
        os.makedirs(d, exist_ok=True)
        tag = f"e{epoch:06d}" if by_epoch else f"{step:06d}"
        stamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
        sbar = Bar(3)
        for _ in range(3):
            time.sleep(step_seconds())
            sbar.update(1)
        sbar.close()
        with open(os.path.join(d, f"{args.output_name}_{tag}_00_{stamp}.png"), "wb") as fh:
            fh.write(png_bytes(16, 16, (200, 120, 40)))  # a picture that decodes, as musubi's samples do

    if args.sample_at_first:
        sample(0, 0, False)
    bar = Bar(total, "steps")
    step, loss_sum = 0, 0.0
    for epoch in range(epochs):
        out(f"\nepoch {epoch + 1}/{epochs}")
        import numpy as np

        # musubi: random.seed(dataset seed + current epoch), and the epoch restarts at 1 on --resume
        order = np.random.default_rng(dataset_seed + epoch + 1).permutation(steps_per_epoch)
        epoch_loss = []
        for pos in range(steps_per_epoch):
            if fail in ("oom", "crash", "hang", "killed") and step + 1 >= fail_at():
                raise_injected(fail, script, args)
            if fail == "disk_full" and step + 1 >= fail_at():
                os.environ["_MUSUBI_DOUBLE_DISK_FULL"] = script
            time.sleep(step_seconds())
            grad = (1.0 + int(order[pos])) * (1 + pos)  # the batch and its place in the epoch: order matters
            weight -= lr * grad  # optimizer.step() with the lr the optimizer holds
            counter += 1  # lr_scheduler.step()
            lr = base_lr * schedule(counter)
            step += 1
            loss = 0.1 + grad / 10
            loss_sum += loss
            epoch_loss.append(loss)
            bar.update(1, f"avr_loss={loss_sum / step:.3g}")
            if tb_writer:
                tb_writer.add(step, {"loss/current": loss, "loss/average": loss_sum / step, "lr/unet": lr})
            if args.save_every_n_steps and step % args.save_every_n_steps == 0 and step < total:
                save(f"-step{step:08d}", step, epoch + 1)
                prune("step", step, args.save_every_n_steps, args.save_last_n_steps)
            if args.sample_every_n_steps and step % args.sample_every_n_steps == 0:
                sample(step, epoch + 1, False)
            if step >= total:
                break
        if tb_writer:
            tb_writer.add(epoch + 1, {"loss/epoch": sum(epoch_loss) / len(epoch_loss)})
        if args.save_every_n_epochs and (epoch + 1) % args.save_every_n_epochs == 0 and epoch + 1 < epochs:
            save(f"-{epoch + 1:06d}", step, epoch + 1)
            prune("epoch", epoch + 1, args.save_every_n_epochs, args.save_last_n_epochs)
        if args.sample_every_n_epochs and (epoch + 1) % args.sample_every_n_epochs == 0:
            sample(step, epoch + 1, True)
        if step >= total:
            break
    bar.close()
    save("", step, epochs, final=True)
    log(tb, "model saved.")


def lr_schedule(name: str, warmup, total: int):
    """transformers' schedule lambdas as musubi's get_lr_scheduler builds them (num_training_steps
    = max_train_steps); unknown names train at a constant rate in the double."""
    warm = int(warmup * total) if isinstance(warmup, float) else int(warmup)

    def factor(s: int) -> float:
        if name == "constant":
            return 1.0
        if s < warm:
            return s / max(1, warm)
        if name == "linear":
            return max(0.0, (total - s) / max(1, total - warm))
        if name == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
        return 1.0
    return factor


class TBWriter:
    """Scalars as TensorBoard events (simple_value), where accelerate's tracker puts musubi's."""

    def __init__(self, logging_dir: str, prefix: str | None):
        import socket

        folder = os.path.join(logging_dir, (prefix or "") + time.strftime("%Y%m%d%H%M%S"), "network_train")
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.0")
        self.add(0, {}, b"brain.Event:2")

    def add(self, step: int, scalars: dict, version: bytes = b"") -> None:
        import struct

        def key(n, wire):
            return _varint_bytes(n << 3 | wire)
        ev = key(1, 1) + struct.pack("<d", time.time()) + (key(2, 0) + _varint_bytes(step) if step else b"")
        if version:
            ev += key(3, 2) + _varint_bytes(len(version)) + version
        summary = b""
        for tag, value in scalars.items():
            v = key(1, 2) + _varint_bytes(len(tag.encode())) + tag.encode() + key(2, 5) + struct.pack("<f", value)
            summary += key(1, 2) + _varint_bytes(len(v)) + v
        if summary:
            ev += key(5, 2) + _varint_bytes(len(summary)) + summary
        header = struct.pack("<Q", len(ev))
        with open(self.path, "ab") as fh:  # TFRecord framing; readers here do not check the CRCs
            fh.write(header + struct.pack("<I", _masked_crc(header)) + ev + struct.pack("<I", _masked_crc(ev)))


def _varint_bytes(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _masked_crc(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


TINY_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
)


def png_bytes(width: int, height: int, rgb: tuple[int, int, int], alpha: int | None = None) -> bytes:
    """A PNG of one colour (RGBA when alpha is given), without PIL."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    pixel = bytes(rgb) + (bytes([alpha]) if alpha is not None else b"")
    raw = (b"\x00" + pixel * width) * height
    header = struct.pack(">IIBBBBB", width, height, 8, 2 if alpha is None else 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def write_video(path: str, frames: int = 4, size: int = 64) -> None:
    try:
        import av
        import numpy as np

        with av.open(path, "w") as c:
            s = c.add_stream("mpeg4", rate=16)
            s.width = s.height = size
            s.pix_fmt = "yuv420p"
            for i in range(frames):
                img = np.full((size, size, 3), i * 40, dtype=np.uint8)
                for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    c.mux(pkt)
            for pkt in s.encode():
                c.mux(pkt)
    except Exception:  # PyAV missing or without an encoder: any bytes will do for a test double
        with open(path, "wb") as fh:
            fh.write(b"\x00\x00\x00\x18ftypmp42musubi-double")


def remove_old_caches(folder: str, pattern: str, wanted: set, keep_cache: bool, logger: str) -> None:
    """musubi deletes cache files of items no longer in the dataset, unless --keep_cache."""
    for cache_file in sorted(glob.glob(os.path.join(glob.escape(folder), pattern))):
        if os.path.normpath(cache_file) not in wanted:
            if keep_cache:
                log(logger, f"Keep cache file not in the dataset: {cache_file}")
            else:
                os.remove(cache_file)
                log(logger, f"Removed old cache file: {cache_file}")


def generate(script: str, arch: str, args, fail: str | None) -> None:
    import numpy as np

    logger = "__main__"
    a = vars(args)
    for flag in ("dit", "vae", "t5", "text_encoder1", "text_encoder2", "text_encoder", "byt5", "image_encoder", "clip", "image_path", "image"):
        if a.get(flag):
            require_file(script, a[flag], flag)
    controls = a.get("control_image_path") or []
    for control in [controls] if isinstance(controls, str) else controls:  # FLUX.1 Kontext: one path
        require_file(script, control, "control_image_path")
    for lora in a.get("lora_weight") or []:
        require_file(script, lora, "lora_weight")
    if fail in ("missing_file", "tokenizer_offline", "hub_download", "network_module", "dtype"):
        raise_injected(fail, script, args)
    if a.get("dit"):
        log(logger, f"Loading DiT model from {a['dit']}")
    for lora in a.get("lora_weight") or []:
        log(logger, f"Loading LoRA weights from {lora}")
    if a.get("save_merged_model"):
        if arch in ("wan", "fp", "f2d", "f2k4b", "f2k9b") and not a.get("lycoris"):
            # musubi-facts §8: without --lycoris the real script exits 0 and writes nothing (FLUX.2 too:
            # generate() returns after load_dit_model, which merged the LoRA while loading)
            log(logger, "LoRA weights loaded")
            return
        log(logger, f"Saving merged model to {a['save_merged_model']}")
        save_safetensors({"blocks.0.self_attn.q.weight": np.zeros((8, 8), np.float32)}, a["save_merged_model"])
        log(logger, "Merged model saved")
        return
    if fail in ("oom", "crash", "hang", "killed", "disk_full"):
        raise_injected(fail, script, args)
    steps = a.get("infer_steps") or a.get("steps") or 25
    bar = Bar(steps)
    for _ in range(steps):
        time.sleep(step_seconds())
        bar.update(1)
    bar.close()
    if a.get("output"):  # kandinsky5_generate_video.py: one file by name (and its first frame as .png)
        os.makedirs(os.path.dirname(os.path.abspath(a["output"])), exist_ok=True)
        write_video(a["output"])
        with open(os.path.splitext(a["output"])[0] + ".png", "wb") as fh:
            fh.write(TINY_PNG)
        log(logger, f"Saved video to {a['output']}")
        return
    save_path = a.get("save_path") or "."
    if script.endswith("generate_image") and "output_type" not in a and os.path.splitext(save_path)[1]:
        # HiDream-O1 (and Ideogram 4 given a file name) write one image to the file --save_path names
        os.makedirs(os.path.dirname(os.path.abspath(save_path)), exist_ok=True)
        with open(save_path, "wb") as fh:
            fh.write(TINY_PNG)
        log(logger, f"Saved image to {save_path}")
        return
    os.makedirs(save_path, exist_ok=True)
    seeds = [a.get("seed") if a.get("seed") is not None else 42]
    if a.get("from_file"):
        # Batch mode: one output per prompt line, each with the seed of its `--d` option.
        seeds = []
        with open(a["from_file"], encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                options = dict((part.split(" ", 1) + [""])[:2] for part in line.split(" --")[1:])
                seeds.append(int(options["d"]) if options.get("d", "").strip().isdigit() else seeds_default(a))
    for seed in seeds:
        save_generated(script, a, save_path, seed, logger)
        time.sleep(0.002)  # real outputs are named by a millisecond timestamp
    log(logger, "Done!")


def seeds_default(a: dict) -> int:
    return a.get("seed") if a.get("seed") is not None else 42


def save_generated(script: str, a: dict, save_path: str, seed: int, logger: str) -> None:
    import numpy as np

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]
    base = f"{stamp}_0_{seed}" if script == "hv_generate_video" else f"{stamp}_{seed}"
    output_type = a.get("output_type") or "video"
    if script.endswith("generate_image") and "output_type" not in a:
        # scripts without --output_type (Krea 2: <time>_<seed>.png; Ideogram 4: ideogram4_00.png) save PNGs only
        p = os.path.join(save_path, f"{base}.png" if script.startswith("krea2") else "ideogram4_00.png")
        with open(p, "wb") as fh:
            fh.write(TINY_PNG)
        log(logger, f"Saved image: {p}")
        return
    if script.endswith("generate_image"):
        # save_output / save_images: <time>_<seed>_latent.safetensors, <time>_<seed>_000.png
        if output_type in ("latent", "latent_images"):
            p = os.path.join(save_path, f"{base}_latent.safetensors")
            save_safetensors({"latent": np.zeros((16, 1, 2, 2), np.float32)}, p, {"seeds": str(seed)})
            log(logger, f"Latent saved to: {p}")
        if output_type in ("images", "latent_images"):
            # save_images: a picture of --image_size ([height, width]) in a colour of the seed;
            # Layered: the composite and --output_layers layers, <time>_layer<i>_<seed>_000.png, with alpha.
            height, width = a.get("image_size") or (256, 256)
            colour = (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256)
            layered = (a.get("model_version") or "").lower() == "layered"
            names = [f"{stamp}_layer{i}_{seed}" for i in range((a.get("output_layers") or 4) + 1)] if layered else [base]
            for i, name in enumerate(names):
                with open(os.path.join(save_path, f"{name}_000.png"), "wb") as fh:
                    fh.write(png_bytes(width, height, colour, 255 - 40 * i if layered else None))
            log(logger, f"Sample images saved to: {save_path}/{names[-1]}")
        return
    if output_type in ("latent", "both"):
        p = os.path.join(save_path, f"{base}_latent.safetensors")
        save_safetensors({"latent": np.zeros((16, 1, 2, 2), np.float32)}, p, {"seeds": str(seed)})
        log(logger, f"Latent saved to: {p}")
    if output_type in ("video", "both"):
        if script.endswith("generate_image"):
            p = os.path.join(save_path, f"{base}.png")
            with open(p, "wb") as fh:
                fh.write(TINY_PNG)
            log(logger, f"Image saved to: {p}")
        else:
            p = os.path.join(save_path, f"{base}.mp4")
            write_video(p)
            log(logger, f"Video saved to: {p}")


# ---------------------------------------------------------------- LoRA utilities

def _module_name(lora_name: str) -> str:
    """musubi LoRA name (without prefix) -> base-model module path, by musubi's naming rules."""
    m = lora_name.replace("_", ".")
    if ".cross.attn." in m or ".self.attn." in m:  # Wan
        for a, b in (("cross.attn", "cross_attn"), ("self.attn", "self_attn"), ("k.img", "k_img"), ("v.img", "v_img")):
            m = m.replace(a, b)
    elif ".attention.to." in m or ".feed.forward." in m:  # Z-Image
        for a, b in (("to.q", "to_q"), ("to.k", "to_k"), ("to.v", "to_v"), ("to.out", "to_out"), ("feed.forward", "feed_forward")):
            m = m.replace(a, b)
    elif "double.blocks." in m or "single.blocks." in m:  # HunyuanVideo, FLUX
        for a, b in (("double.blocks.", "double_blocks."), ("single.blocks.", "single_blocks."), ("img.", "img_"), ("txt.", "txt_"), ("attn.", "attn_")):
            m = m.replace(a, b)
    return m


def convert_lora(script: str, args, fail: str | None) -> None:
    import numpy as np

    logger = "__main__"
    require_file(script, args.input, "input")
    if fail:
        raise_injected(fail, script, args)
    log(logger, f"loading {args.input}")
    sd, meta = load_safetensors(args.input)
    log(logger, f"converting to {args.target}")
    prefix = "lora_unet_"
    new = {}
    if args.target == "default":
        dims = {}
        for key, w in sd.items():
            head, body = key.split(".", 1)
            if head not in ("diffusion_model", "transformer"):
                log(logger, f"unexpected key: {key} in diffusers format", "WARNING")
                continue
            module, _, tail = body.rpartition(".lora_") if ".lora_" in body else (body, "", "")
            if tail:
                kind = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight",
                        "down.weight": "lora_down.weight", "up.weight": "lora_up.weight"}.get(tail, tail)
                new_key = prefix + module.replace(".", "_") + "." + kind
            else:  # LoHa/LoKr/alpha keep their leaf names
                mod, _, leaf = body.rpartition(".")
                new_key = prefix + mod.replace(".", "_") + "." + leaf
            new[new_key] = w
            name = new_key.split(".")[0]
            if "lora_down" in new_key and name not in dims:
                dims[name] = w.shape[0]
        for name, dim in dims.items():
            new.setdefault(f"{name}.alpha", np.array(dim))
    else:
        dprefix = args.diffusers_prefix or "diffusion_model"
        alphas = {k.split(".", 1)[0]: v for k, v in sd.items() if k.startswith(prefix) and "alpha" in k}
        kinds = set()
        for key, w in sd.items():
            if not key.startswith(prefix) or "alpha" in key:
                continue
            name, leaf = key.split(".", 1)
            module = _module_name(name[len(prefix):])
            if "lora_down" in key:
                new_key, dim = f"{dprefix}.{module}.lora_A.weight", w.shape[0]
            elif "lora_up" in key:
                new_key, dim = f"{dprefix}.{module}.lora_B.weight", w.shape[1]
            elif "hada" in key or "lokr" in key:
                new_key, dim = f"{dprefix}.{module}.{leaf}", None
                kinds.add("LoHa" if "hada" in key else "LoKr")
                if name in alphas:
                    new[f"{dprefix}.{module}.alpha"] = alphas[name]
            else:
                log(logger, f"unexpected key: {key} in default LoRA format", "WARNING")
                continue
            if dim is not None:
                kinds.add("LoRA")
                if name in alphas:  # diffusers has no alpha: fold sqrt(alpha/dim) into both factors
                    w = (w.astype(np.float32) * math.sqrt(float(alphas[name]) / dim)).astype(w.dtype)
                else:
                    log(logger, f"missing alpha for {name}", "WARNING")
            new[new_key] = w
        log(logger, f"estimated type: {', '.join(sorted(kinds)) or None}")
    log(logger, f"saving to {args.output}")
    save_safetensors(new, args.output, meta or None)
    log(logger, "done")


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Karras et al. 2023 (arXiv 2312.02696), Algorithm 2: the positive root of the cubic in gamma."""
    import numpy as np

    t = sigma_rel ** -2
    roots = np.roots([1, 7, 16 - t, 12 - t])
    return float(roots[np.isreal(roots) & (roots.real >= 0)].real.max())


def post_hoc_ema(script: str, args, fail: str | None) -> None:
    import numpy as np

    paths = list(args.path)
    for p in paths:
        require_file(script, p, "path")
    if fail:
        raise_injected(fail, script, args)
    if not args.no_sort:
        out("Sorting files by modification time...")
        paths.sort(key=os.path.getmtime)
    out(f"Loading metadata from {paths[-1]}")
    _, metadata = load_safetensors(paths[-1])
    out("Metadata found, using metadata from the last file." if metadata else
        "No metadata found in the last file, proceeding without metadata.")
    out(f"Loading weights from {paths[0]}")
    state, _ = load_safetensors(paths[0])
    dtypes = {k: v.dtype for k, v in state.items() if np.issubdtype(v.dtype, np.floating)}
    state = {k: (v.astype(np.float32) if k in dtypes else v) for k, v in state.items()}
    beta1 = args.beta
    beta2 = args.beta if args.beta2 is None else args.beta2
    count = len(paths) - 1
    gamma = sigma_rel_to_gamma(args.sigma_rel) if args.sigma_rel is not None else None
    for i, path in enumerate(paths[1:]):
        if gamma is not None:
            beta = (1 - 1 / (i + 1)) ** (gamma + 1)  # first merge gets beta 0: oldest file weighs nothing
        else:
            beta = beta1 + (beta2 - beta1) * (i / (count - 1)) if count > 1 else beta1
        out(f"Loading weights from {path} for merging with beta={beta:.4f}")
        sd, _ = load_safetensors(path)
        for key, value in sd.items():
            if key.endswith(".alpha"):
                if key in state and not np.allclose(state[key], value.astype(np.float32)):
                    traceback_exit(MAIN_FRAMES(script), f"ValueError: Alpha tensors for key {key} do not match across files.")
                continue
            if not np.issubdtype(value.dtype, np.floating):
                out(f"Skipping non-floating point tensor: {key}")
                continue
            if key not in state:
                traceback_exit(MAIN_FRAMES(script), f"KeyError: 'Key {key} not found in the initial state_dict.'")
            state[key] = state[key] * beta + value.astype(np.float32) * (1 - beta)
    state = {k: (v.astype(dtypes[k]) if k in dtypes else v) for k, v in state.items()}
    if metadata:
        out("Updating metadata with new hashes.")
        metadata["sshs_model_hash"] = str(abs(hash(tuple(sorted(state)))))
    out(f"Saving merged weights to {args.output_file}")
    save_safetensors(state, args.output_file, metadata or None)
    out("Merging completed successfully.")


def merge_lora(script: str, args, fail: str | None) -> None:
    import numpy as np

    require_file(script, args.dit, "dit")
    for lora in args.lora_weight or []:
        require_file(script, lora, "lora_weight")
    if fail:
        raise_injected(fail, script, args)
    log("__main__", f"Loading DiT model from {args.dit}")
    merged = {"double_blocks.0.img_attn_qkv.weight": np.zeros((8, 8), np.float32)}
    multipliers = list(args.lora_multiplier or [])
    for i, lora in enumerate(args.lora_weight or []):
        m = multipliers[i] if i < len(multipliers) else 1.0  # a missing multiplier silently means 1.0 (facts §8)
        log("__main__", f"Loading LoRA weights from {lora} with multiplier {m}")
        sd, _ = load_safetensors(lora)
        if not any(k.startswith("lora_unet_") for k in sd):
            log("__main__", f"No LoRA keys in musubi format found in {lora}", "WARNING")
    log("__main__", f"Saving merged model to {args.save_merged_model}")
    save_safetensors(merged, args.save_merged_model)
    log("__main__", "Merged model saved")


# ---------------------------------------------------------------- entry point

def main(script_file: str) -> int:
    started = time.time()
    script = os.path.splitext(os.path.basename(script_file))[0]
    seen = {"script": script, "pid": os.getpid(), "devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "rank": os.environ.get("RANK"), "start": started}
    record = os.environ.get("MUSUBI_DOUBLE_RECORD")
    if record:
        with open(record, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**seen, "argv": sys.argv[1:], "cwd": os.getcwd()}) + "\n")
    times = os.environ.get("MUSUBI_DOUBLE_TIMES")
    try:
        return _main(script, started)
    finally:
        if times:
            with open(times, "a", encoding="utf-8") as fh:  # one short line: appends stay whole
                fh.write(json.dumps({**seen, "end": time.time()}) + "\n")


def _main(script: str, started: float) -> int:
    args = build_parser(script).parse_args()  # argparse: usage + error to stderr, exit 2
    if os.environ.get("MUSUBI_DOUBLE_SILENT_RANK") == "1":
        while True:  # a non-zero rank of a multi-GPU run: alive until the launcher ends it
            time.sleep(1)
    fixed = float(os.environ.get("MUSUBI_DOUBLE_RUN_SECONDS", "0"))
    if fixed:
        time.sleep(max(0.0, started + fixed - time.time()))
    arch = next((a for p, a in ARCH_PREFIXES if script.startswith(p)), "hv")
    if arch == "qi":
        arch = QWEN_VERSION_ARCH.get((getattr(args, "model_version", None) or "").lower(), arch)
    elif arch == "f2d":
        arch = FLUX2_VERSION_ARCH.get(getattr(args, "model_version", None) or "dev", arch)
    fail = injected(script)
    if fail and fail_at() == 0 and fail in ("oom", "crash", "hang", "killed"):
        raise_injected(fail, script, args)
    if script.endswith("cache_latents") or script == "hidream_o1_cache_pixel":
        cache_latents(script, arch, args, fail)
    elif script.endswith("cache_text_encoder_outputs"):
        cache_text_encoder(script, arch, args, fail)
    elif script.endswith(("_train_network", "_train_network_self_flow", "_train")):
        train(script, arch, args, fail)
    elif script.endswith(("generate_video", "generate_image")):
        generate(script, arch, args, fail)
    elif script == "convert_lora":
        convert_lora(script, args, fail)
    elif script == "lora_post_hoc_ema":
        post_hoc_ema(script, args, fail)
    elif script == "merge_lora":
        merge_lora(script, args, fail)
    else:
        if fail:
            raise_injected(fail, script, args)
        log("__main__", f"test double: {script} has no behaviour beyond argument parsing")
    return 0
