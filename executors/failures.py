"""Why a musubi-tuner step failed, in one line with the fix, from the end of its log and its exit code."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..pipelines.registry import TRAINING_KINDS


@dataclass(frozen=True)
class Failure:
    cause: str  # one line: what went wrong
    fix: str  # one line: what to change
    category: str  # oom, host_oom, signal, missing_file, dataset, argparse, offline_hf_cache, network_module,
    #                dtype, config, disk_full, network, unknown
    transient: bool = False  # worth retrying unchanged (a hub download, a lost connection)


# ---------------------------------------------------------------- classification

# a failed dataset check names its problems up to a screenful; the log has them all
DATASET_PROBLEMS_SHOWN = 20
_OOM = re.compile(r"(?:torch\.(?:cuda\.)?OutOfMemoryError: )?CUDA out of memory\.(?P<rest>[^\n]*)|CUDA error: out of memory|"
                  r"HIP out of memory|MPS backend out of memory")
_OOM_DETAIL = re.compile(r"Tried to allocate (?P<want>[\d.]+ [GMK]iB)\. GPU (?P<gpu>\d+) has a total capacity of "
                         r"(?P<cap>[\d.]+ [GMK]iB) of which (?P<free>[\d.]+ [GMK]iB) is free")
_DISK = re.compile(r"\[Errno 28\] No space left on device(?:: '(?P<path>[^']+)')?")
_HF_OFFLINE = re.compile(r"We couldn't connect to 'https://huggingface\.co'|LocalEntryNotFoundError|"
                         r"Can't load tokenizer for '(?P<repo>[^']+)'|outgoing traffic has been disabled|HF_HUB_OFFLINE")
_HF_REPO = re.compile(r"""(?:name=|from_pretrained\(|Can't load tokenizer for |repo_id=)["'](?P<repo>[\w.-]+/[\w.-]+)["']""")
_CONNECTION = re.compile(r"requests\.exceptions\.(?:ConnectionError|ReadTimeout|ChunkedEncodingError|ConnectTimeout)|"
                         r"ConnectionResetError|Connection aborted|Max retries exceeded|Temporary failure in name resolution|"
                         r"urllib3\.exceptions\.\w+|IncompleteRead|huggingface_hub\.errors\.HfHubHTTPError: 5\d\d|"
                         r"(?:502|503|504) Server Error")
_VOLUPTUOUS = re.compile(r"(?:voluptuous\.error\.)?(?:MultipleInvalid|Invalid): (?P<msg>.+?)(?: @ (?P<path>data(?:\[[^\]]+\])+))?\s*$", re.M)
_TOML = re.compile(r"(?:toml\.decoder\.TomlDecodeError|tomllib\.TOMLDecodeError): (?P<msg>.+)$", re.M)
_NOT_FOUND = re.compile(r"""FileNotFoundError: (?:\[Errno 2\] )?No such file or directory: (?P<q>['"])(?P<path>.+?)(?P=q)|"""
                        r"ValueError: file not found / ファイルが見つかりません: (?P<path2>.+)$", re.M)
_ARGPARSE = re.compile(r"^(?P<prog>[\w.\- <>\[\]]+): error: (?P<msg>.+)$", re.M)
_DTYPE = re.compile(r"DiT weights are in (?P<dtype>fp16|bf16), mixed precision must be (?P=dtype) or no")
_OPTIMIZER = re.compile(r"AttributeError: module 'torch\.optim' has no attribute '(?P<name>[^']*)'")
# how accelerate's CalledProcessError reports the script's end: an exit status, or a signal as -N
_EXIT_STATUS = re.compile(r"returned non-zero exit status (?P<rc>-?\d+)|died with <Signals\.\w+: (?P<sig>\d+)>")
_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(?:\w*(?:Error|Exception|Interrupt|Invalid|Exit))\b.*$", re.M)

SIGNALS = {2: ("interrupted (SIGINT, Ctrl-C)", "signal"), 9: ("killed (SIGKILL)", "host_oom"),
           15: ("terminated (SIGTERM)", "signal"), 11: ("crashed (SIGSEGV, segmentation fault)", "signal"),
           6: ("aborted (SIGABRT)", "signal"), 7: ("crashed (SIGBUS: often a full /dev/shm or a truncated file)", "signal")}


def _last(rx: re.Pattern, text: str):
    found = None
    for found in rx.finditer(text):
        pass
    return found


def _voluptuous_path(path: str) -> str:
    """data['datasets'][0]['source_fps'] -> datasets[0].source_fps"""
    out = ""
    for part in re.findall(r"\[([^\]]+)\]", path):
        out += f"[{part}]" if part.isdigit() else ("." if out else "") + part.strip("'\"")
    return out


def classify(log_tail: str, returncode: int, step_kind: str, meta: dict | None = None) -> Failure:
    """The one-line cause and fix of a failed step. `meta` may carry the step's family and, for an
    out-of-memory failure, `next_memory`: the plan's next memory-saving setting, which the fix names."""
    meta = meta or {}
    text = log_tail.replace("\r\n", "\n").replace("\r", "\n")
    # the executor's own header and footer lines in the log are not the step's output
    text = "\n".join(line for line in text.split("\n") if not line.startswith("=== musubi-pipe"))
    rc = returncode
    child = _last(_EXIT_STATUS, text)  # accelerate re-raises the script's exit status
    child_rc = (int(child["rc"]) if child["rc"] else -int(child["sig"])) if child else None
    if child_rc is not None and rc in (1, 0):
        rc = child_rc

    m = _last(_OOM, text)
    if m:
        return _oom(text, step_kind, meta)
    if rc == 2 or (rc != 0 and _last(_ARGPARSE, text) and "usage:" in text):
        m = _last(_ARGPARSE, text)
        if m:
            return _argparse(m["prog"].strip(), m["msg"].strip())
    m = _last(_DISK, text)
    if m:
        where = m["path"] or meta.get("output_dir") or meta.get("save_path") or "the output folder"
        return Failure(f"disk full while writing ({where})", f"free space on the disk holding {where}, or point the outputs "
                       "(output_dir, cache_directory) at a disk with room", "disk_full")
    m = _last(_HF_OFFLINE, text)
    if m:
        repo = m["repo"] if m["repo"] else (_last(_HF_REPO, text)["repo"] if _last(_HF_REPO, text) else "")
        what = f"tokenizer/model files of {repo}" if repo else "files from the Hugging Face hub (a tokenizer)"
        dl = f"`huggingface-cli download {repo}`" if repo else "`huggingface-cli download <repo>`"
        return Failure(f"{what} are not in the Hugging Face cache and the hub cannot be reached",
                       f"run once with network access, or fetch them with {dl} into the HF cache (HF_HOME) on this machine",
                       "offline_hf_cache")
    m = _last(_VOLUPTUOUS, text)
    if m and ("voluptuous" in text or "Invalid user config" in text):
        return _dataset(m["msg"].strip(), m["path"] or "")
    m = _last(_TOML, text)
    if m:
        return Failure(f"the dataset config is not valid TOML: {m['msg'].strip()}",
                       "fix the TOML syntax of the dataset config (musubi-pipe writes it: re-run `musubi-pipe plan`)", "dataset")
    if "No training items found in the dataset" in text:
        return Failure("no training items: the latent and text-encoder caches for the dataset are missing",
                       "run the cache_latents and cache_text_encoder stages for this dataset before training", "dataset")
    if "cache directory should be unique for each dataset" in text:
        return Failure("two datasets share a cache directory", "give each dataset its own cache_directory", "dataset")
    m = _last(_DTYPE, text)
    if m:
        want = m["dtype"]
        return Failure(f"the DiT file is {want} but mixed precision is not {want}",
                       f"set mixed_precision = \"{want}\" for training (it must reach the training script, not only accelerate)", "dtype")
    if "fp8_scaled requires fp8_base" in text:
        return Failure("fp8_scaled is set without fp8_base", "turn on fp8_base as well, or turn off fp8_scaled", "config")
    m = _last(_OPTIMIZER, text)
    if m:
        if not m["name"]:
            return Failure("no optimizer_type was given (musubi's default of \"\" crashes)",
                           "set optimizer_type, e.g. \"adamw8bit\" or \"AdamW\"", "config")
        return Failure(f"unknown optimizer_type {m['name']!r}",
                       "use AdamW, AdamW8bit, AdaFactor or a dotted class path such as torch.optim.SGD", "config")
    if "either --sdpa, --flash-attn, --flash3, --sage-attn or --xformers must be specified" in text:
        return Failure("no attention implementation was chosen", "set attention = \"sdpa\" (or flash_attn / xformers)", "config")
    if "SageAttention doesn't support training" in text:
        return Failure("SageAttention cannot be used for training", "use attention = \"sdpa\" (or flash_attn / xformers)", "config")
    if "No LoRA modules found" in text:
        from ..pipelines import registry

        fam = registry.canonical(str(meta.get("family") or ""))
        fix = f"use network_module = \"{registry.family(fam).network_module}\" for this model family" if fam else \
            "use the family's network module: " + ", ".join(f"{f.title} {f.network_module}" for f in registry.families())
        return Failure("the network module does not match the model: no LoRA modules found", fix, "network_module")
    if "unsupported operand type(s) for +: 'NoneType' and 'str'" in text and step_kind in TRAINING_KINDS:
        return Failure("training crashed at saving: output_name is not set", "set output_name for the training stage", "config")
    if rc < 0 or rc in (130, 137, 143):
        sig = -rc if rc < 0 else rc - 128
        what, category = SIGNALS.get(sig, (f"killed by signal {sig}", "signal"))
        if sig == 9:
            return Failure(f"{what}: most likely the system ran out of RAM (the kernel's OOM killer)",
                           "free system RAM, lower blocks_to_swap or max_data_loader_n_workers, or add swap; `dmesg` confirms an OOM kill",
                           category)
        return Failure(what, "run again; finished steps are skipped and training resumes from its newest saved state", category)
    m = _last(_NOT_FOUND, text)
    if m:
        path = m["path"] or m["path2"]
        return Failure(f"file not found: {path}", f"check the path {path} in the pipeline (or the local model folders)", "missing_file")
    m = _last(_CONNECTION, text)
    if m:
        return Failure(f"a download or connection failed ({m.group().strip()})", "retry; if it keeps failing, check the "
                       "network or pre-download the files into the Hugging Face cache", "network", transient=True)
    if step_kind == "check_dataset":
        # `musubi-pipe dataset inspect` lists each problem as "    - <item>: <what>"
        problems = [ln.strip()[2:] for ln in text.split("\n") if ln.startswith("    - ")]
        if problems:  # every one, up to a screenful: a user fixes them all before the next try
            shown = "; ".join(problems[:DATASET_PROBLEMS_SHOWN])
            rest = len(problems) - DATASET_PROBLEMS_SHOWN
            more = f"; and {rest} more in the log" if rest > 0 else ""
            return Failure(f"the dataset has {len(problems)} problem{'s' if len(problems) > 1 else ''}: {shown}{more}",
                           "fix the captions or media listed in the log (or the dataset config), then run again", "dataset")
    line = _last_error_line(text)
    return Failure(f"exited with code {returncode}" + (f": {line}" if line else ""), "read the full log of this step", "unknown")



def _last_error_line(text: str) -> str:
    m = _last(_ERROR_LINE, text)
    if m and "CalledProcessError" in m.group():  # accelerate's wrapper: the script's own error is above
        before = text[:m.start()]
        m = _last(_ERROR_LINE, before) or m
    if m:
        return m.group().strip()[:300]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _oom(text: str, kind: str, meta: dict) -> Failure:
    d = _last(_OOM_DETAIL, text)
    detail = f" (tried to allocate {d['want']}; GPU {d['gpu']} has {d['cap']}, {d['free']} free)" if d else ""
    nxt = meta.get("next_memory")  # the plan's next memory-saving setting (compiler.ladder)
    if nxt:
        fix = f"run with --retry, or set {nxt}"
        if kind in TRAINING_KINDS:
            fix += "; or lower the resolution / target_frames of the dataset"
    elif kind in (*TRAINING_KINDS, "cache_latents"):
        fix = "the memory switches are all on: lower the dataset's resolution or target_frames (fewer frames)"
    elif kind == "generate":
        fix = "lower the video size (video_size) or length (video_length / video_seconds)"
    else:
        fix = "free GPU memory used by other programs"
    return Failure(f"CUDA out of memory{detail}", fix, "oom")


def _argparse(prog: str, msg: str) -> Failure:
    script = prog.split()[-1] if prog else "the script"
    m = re.match(r"unrecognized arguments: (?P<args>.+)", msg)
    if m:
        flag = next((a for a in m["args"].split() if a.startswith("-")), m["args"].split()[0])
        return Failure(f"{script} does not accept {flag}",
                       f"remove {flag}: it is not an option of {script} in this musubi-tuner version", "argparse")
    m = re.match(r"the following arguments are required: (?P<flags>.+)", msg)
    if m:
        return Failure(f"{script} needs {m['flags']}", f"set {m['flags']} for this stage", "argparse")
    m = re.match(r"argument (?P<flag>[^:]+): (?P<why>.+)", msg)
    if m:
        return Failure(f"{script}: bad value for {m['flag'].split('/')[0]}: {m['why']}", f"change the value of {m['flag'].split('/')[0]}", "argparse")
    m = re.match(r"ambiguous option: (?P<flag>\S+) could match (?P<cands>.+)", msg)
    if m:
        return Failure(f"{script}: {m['flag']} is ambiguous", f"spell the flag in full: one of {m['cands']}", "argparse")
    return Failure(f"{script} rejected its arguments: {msg}", "fix the arguments named in the message", "argparse")


def _dataset(msg: str, path: str) -> Failure:
    field = _voluptuous_path(path) if path else ""
    name = field.rsplit(".", 1)[-1] if field else ""
    where = f" at {field}" if field else ""
    if msg.startswith("extra keys not allowed"):
        fix = f"remove {name!r} or correct its spelling; it is not a key musubi accepts there" if name else "remove the unknown key"
        if name == "cache_directory" and field.startswith("general"):
            fix = "move cache_directory from [general] into each [[datasets]] entry"
        return Failure(f"dataset config: unknown key{where}", fix, "dataset")
    m = re.match(r"expected (?P<type>\w+)", msg)
    if m:
        example = {"float": " such as 30.0", "int": " such as 1", "list": " such as [1, 25]", "bool": " (true or false)"}.get(m["type"], "")
        return Failure(f"dataset config: {field or 'a value'} must be a {m['type']}",
                       f"write {name or 'the value'} as a {m['type']}{example}", "dataset")
    return Failure(f"dataset config: {msg}{where}", f"fix {field or 'the dataset config'}", "dataset")
