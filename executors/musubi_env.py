"""Where musubi-tuner and its Python live, which GPUs and output folders may be used: the local
configuration (a TOML file in the user's config directory plus environment variables), never a
pipeline file; and `doctor`, which checks what the configuration points at."""
from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..compiler.plan import SAFE_PATH, flag_value
from ..errors import PipelineError, Problem
from ..files import write_atomic

CONFIG_ENV = "MUSUBI_PIPE_CONFIG"  # path of the config file itself (tests, several setups)
DIR_ENV = "MUSUBI_TUNER_DIR"
PYTHON_ENV = "MUSUBI_PIPE_PYTHON"
GPUS_ENV = "MUSUBI_PIPE_GPUS"
APP = "musubi-pipe"
KEYS = ("musubi_tuner_dir", "python", "gpus", "allowed_output_roots", "cancel_grace_s", "allow_code", "allow_upload",
        "allowed_imports", "machine_rank", "main_process_ip", "main_process_port", "model_dirs", "shared_root")


def config_path(environ: dict | None = None) -> Path:
    """The config file: $MUSUBI_PIPE_CONFIG, else the platform's user config directory."""
    env = os.environ if environ is None else environ
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]).expanduser()
    if sys.platform == "win32":
        base = Path(env.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / APP / "config.toml"


def venv_python(musubi_dir: Path) -> Path | None:
    """The Python of a `.venv` or `venv` inside the checkout, if there is one."""
    for venv in (".venv", "venv"):
        for rel in ("bin/python", "Scripts/python.exe"):
            candidate = musubi_dir / venv / rel
            if candidate.exists():
                return candidate
    return None


@dataclass
class MusubiConfig:
    """The resolved local configuration. `origin` says where each value came from, for doctor."""

    musubi_dir: Path | None = None
    python: Path | None = None
    gpus: str = ""  # CUDA_VISIBLE_DEVICES for every step ("" leaves the environment's own); with --jobs, the pool each step takes its own devices from
    allowed_output_roots: list[Path] = field(default_factory=list)
    model_dirs: list[Path] = field(default_factory=list)  # where `musubi-pipe new` looks for model files
    cancel_grace_s: float = 5.0
    # What only this machine's owner may allow, never a shared pipeline: options that make musubi
    # load code a document names (config files, pickled states, dotted class paths), class paths
    # allowed one by one, and options that upload weights or logs.
    allow_code: bool = False
    allow_upload: bool = False
    allowed_imports: list[str] = field(default_factory=list)
    # This machine's part in a training spread over several machines (a plan's --num_machines > 1):
    # each machine's own configuration, never the shared pipeline, says which rank it is and where
    # the main process listens.
    machine_rank: int | None = None
    main_process_ip: str = ""
    main_process_port: int | None = None
    # The folder every machine of a Ray cluster sees at the same path (NFS, a cluster file
    # system): `run --executor ray` runs only plans whose records and outputs lie inside it.
    shared_root: Path | None = None
    file: Path | None = None
    origin: dict[str, str] = field(default_factory=dict)

    def problems(self) -> list[Problem]:
        """What stops steps from running, each with its fix."""
        where = str(self.file or config_path())
        out = []
        if self.musubi_dir is None:
            out.append(Problem(
                "musubi-tuner's location is not configured", path="musubi_tuner_dir", file=where,
                fix=f"run `musubi-pipe init --musubi-dir /path/to/musubi-tuner` or set {DIR_ENV}"))
        elif not (self.musubi_dir / "src" / "musubi_tuner").is_dir():
            out.append(Problem(
                f"{self.musubi_dir} is not a musubi-tuner checkout (no src/musubi_tuner/)",
                path="musubi_tuner_dir", file=where,
                fix="point it at the folder you cloned kohya-ss/musubi-tuner into"))
        if self.musubi_dir is not None and self.python is None:
            out.append(Problem(
                f"no Python found for musubi-tuner: no .venv or venv inside {self.musubi_dir}",
                path="python", file=where,
                fix=f"create the venv there (python -m venv .venv; .venv/bin/pip install -e .) "
                    f"or set `python` in the config / {PYTHON_ENV}"))
        elif self.python is not None and not self.python.exists():
            out.append(Problem(f"the configured Python {self.python} does not exist", path="python",
                               file=where, fix="fix the path, or remove it to use the checkout's venv"))
        return out

    def require(self) -> "MusubiConfig":
        """Raise PipelineError unless steps can be started with this configuration."""
        problems = self.problems()
        if problems:
            raise PipelineError(problems)
        return self

    def step_env(self, devices: list[str] | None = None) -> dict[str, str]:
        """Environment entries the configuration adds to every step; with `devices` (the parallel
        scheduler's choice from the `gpus` pool) the step sees only those ([]: no GPU at all)."""
        if devices is not None:
            return {"CUDA_VISIBLE_DEVICES": ",".join(devices)}
        return {"CUDA_VISIBLE_DEVICES": self.gpus} if self.gpus else {}

    def launch_args(self, planned: list[str], devices: list[str] | None = None) -> list[str]:
        """The accelerate flags this machine adds to a plan's: its GPUs for a multi-GPU step (the
        step's `devices` when the scheduler pinned it), and its rank and the main process's address
        for a step on several machines. Raises PipelineError (with the fix) when a multi-machine
        step meets a configuration without them."""
        from ..pipelines import registry

        flag = {role: "--" + option for role, option in registry.launch_flags().items()}
        out: list[str] = []
        gpus = self.gpus if devices is None else ",".join(devices)
        if flag["multi_gpu"] in planned and gpus:
            # accelerate writes --gpu_ids into the ranks' CUDA_VISIBLE_DEVICES as they are: the
            # same physical ids as the step's own CUDA_VISIBLE_DEVICES, so the two agree
            out += [flag["gpu_ids"], gpus]
        machines = flag_value(planned, flag["machines"])
        if machines is not None and machines != "1":
            where = str(self.file or config_path())
            missing = [k for k in ("machine_rank", "main_process_ip", "main_process_port") if getattr(self, k) in (None, "")]
            if missing:
                raise PipelineError([Problem(
                    f"this step trains on {machines} machines, and this machine's configuration does not say "
                    f"{', '.join(missing)}", path=missing[0], file=where,
                    fix='on every machine: machine_rank = 0 (1, 2, ...), main_process_ip = "10.0.0.1" and '
                        'main_process_port = 29500 (the rank-0 machine\'s address)')])
            if self.machine_rank >= int(machines):
                raise PipelineError([Problem(f"machine_rank {self.machine_rank} is not below the plan's {machines} machines",
                                             path="machine_rank", file=where, fix=f"use 0 to {int(machines) - 1}")])
            out += [flag["machine_rank"], str(self.machine_rank), flag["main_process_ip"], self.main_process_ip,
                    flag["main_process_port"], str(self.main_process_port)]
        return out

    def output_roots(self, extra: list[str | Path] = ()) -> list[Path]:
        return [Path(p).expanduser().resolve() for p in [*self.allowed_output_roots, *extra]]

    def is_allowed_output(self, path: str | Path, extra_roots: list[str | Path] = ()) -> bool:
        """True if `path` (resolved, links followed) lies inside one of the allowed roots."""
        return is_inside(path, self.output_roots(extra_roots))


def is_inside(path: str | Path, roots: list[Path]) -> bool:
    target = Path(path).expanduser().resolve()
    return any(target == root or root in target.parents for root in roots)


def _read_toml(path: Path) -> dict:
    from ..files import tomllib

    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PipelineError([Problem(f"cannot read the config file: {exc}", file=str(path),
                                     fix="fix the TOML, or write a fresh one with `musubi-pipe init --force`")])


def load_config(environ: dict | None = None) -> MusubiConfig:
    """Resolve the configuration: environment variables override the config file; the Python
    defaults to the checkout's own venv."""
    env = os.environ if environ is None else environ
    path = config_path(env)
    data = _read_toml(path) if path.exists() else {}
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise PipelineError([Problem(f"unknown key {k!r}", path=k, file=str(path),
                                     fix=f"known keys: {', '.join(KEYS)}") for k in unknown])
    cfg = MusubiConfig(file=path)

    def pick(key: str, env_name: str):
        if env.get(env_name):
            cfg.origin[key] = f"${env_name}"
            return env[env_name]
        if data.get(key) not in (None, ""):
            cfg.origin[key] = str(path)
            return data[key]
        return None

    musubi_dir = pick("musubi_tuner_dir", DIR_ENV)
    if musubi_dir:
        cfg.musubi_dir = Path(str(musubi_dir)).expanduser().resolve()
    python = pick("python", PYTHON_ENV)
    if python:
        # Absolute now: steps start in the pipeline's folder, where a relative path would name a
        # program the document's folder provides. Not resolve(): a venv's python is a symlink.
        python = Path(str(python)).expanduser()
        if not python.is_absolute():
            python = (Path.cwd() if cfg.origin["python"].startswith("$") else path.parent) / python
        cfg.python = Path(os.path.abspath(python))
    elif cfg.musubi_dir is not None:
        cfg.python = venv_python(cfg.musubi_dir)
        if cfg.python:
            cfg.origin["python"] = "venv inside the checkout"
    gpus = pick("gpus", GPUS_ENV)
    if gpus is not None:
        cfg.gpus = ",".join(str(g) for g in gpus) if isinstance(gpus, list) else str(gpus)
    roots = data.get("allowed_output_roots", [])
    if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
        raise PipelineError([Problem("expected a list of folder paths", path="allowed_output_roots",
                                     file=str(path), fix='allowed_output_roots = ["/data/loras"]')])
    cfg.allowed_output_roots = [Path(r).expanduser() for r in roots]
    model_dirs = data.get("model_dirs", [])
    if not isinstance(model_dirs, list) or not all(isinstance(r, str) for r in model_dirs):
        raise PipelineError([Problem("expected a list of folder paths", path="model_dirs", file=str(path),
                                     fix='model_dirs = ["/data/models"]')])
    cfg.model_dirs = [Path(r).expanduser() for r in model_dirs]
    for key in ("allow_code", "allow_upload"):
        if key in data:
            if not isinstance(data[key], bool):
                raise PipelineError([Problem(f"expected true or false, got {data[key]!r}", path=key, file=str(path),
                                             fix=f"{key} = false")])
            setattr(cfg, key, data[key])
    imports = data.get("allowed_imports", [])
    if not isinstance(imports, list) or not all(isinstance(i, str) for i in imports):
        raise PipelineError([Problem("expected a list of module or class paths", path="allowed_imports", file=str(path),
                                     fix='allowed_imports = ["prodigyopt.Prodigy"]')])
    cfg.allowed_imports = imports
    if "machine_rank" in data:
        cfg.machine_rank = _whole(data["machine_rank"], "machine_rank", path, 0, 65535, "machine_rank = 0")
    if "main_process_port" in data:
        cfg.main_process_port = _whole(data["main_process_port"], "main_process_port", path, 1, 65535, "main_process_port = 29500")
    if "main_process_ip" in data:
        ip = data["main_process_ip"]
        # a host name or address only: it becomes one argv word of accelerate's
        if not isinstance(ip, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.:-]{0,252}", ip):
            raise PipelineError([Problem(f"expected a host name or IP address, got {ip!r}", path="main_process_ip",
                                         file=str(path), fix='main_process_ip = "10.0.0.1"')])
        cfg.main_process_ip = ip
    if "shared_root" in data:
        root = data["shared_root"]
        if not isinstance(root, str) or not root or not Path(root).expanduser().is_absolute():
            raise PipelineError([Problem(f"expected an absolute folder path, got {root!r}", path="shared_root",
                                         file=str(path), fix='shared_root = "/mnt/shared/musubi"')])
        cfg.shared_root = Path(root).expanduser()
    if "cancel_grace_s" in data:
        grace = data["cancel_grace_s"]
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or grace < 0:
            raise PipelineError([Problem(f"expected seconds as a number, got {grace!r}", path="cancel_grace_s",
                                         file=str(path), fix="cancel_grace_s = 5.0")])
        cfg.cancel_grace_s = float(grace)
    return cfg


def _whole(value, key: str, path: Path, low: int, high: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PipelineError([Problem(f"expected a whole number from {low} to {high}, got {value!r}", path=key,
                                     file=str(path), fix=fix)])
    return value



# ---------------------------------------------------------------------------------- init


def write_config(path: Path, values: dict, force: bool = False) -> Path:
    """Write the config file atomically; an existing one is replaced only with force."""
    import tomli_w

    if path.exists() and not force:
        raise PipelineError([Problem("a config file already exists", file=str(path),
                                     fix="edit it, or pass --force to replace it")])
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (
        "# musubi-pipe local configuration (written by `musubi-pipe init`).\n"
        "# Pipelines never choose which program runs: only this file and the environment do.\n"
        "# accelerate needs no `accelerate config`: musubi-pipe passes explicit launch flags.\n"
        + tomli_w.dumps({k: v for k, v in values.items() if v not in (None, "", [])})
    )
    write_atomic(path, text)
    return path



# -------------------------------------------------------------------------------- doctor


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False  # a problem that does not stop runs


# Runs inside musubi's venv: versions from metadata, then torch for CUDA facts.
PROBE = r"""
import json, sys
from importlib import metadata
out = {"python": sys.version.split()[0], "executable": sys.executable, "packages": {}}
for name in ("torch", "accelerate", "tensorboard", "lycoris-lora", "safetensors", "transformers", "musubi-tuner"):
    try:
        out["packages"][name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        out["packages"][name] = None
if "--torch" in sys.argv:
    try:
        import torch
        out["cuda_available"] = torch.cuda.is_available()
        out["cuda_version"] = torch.version.cuda
        out["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if out["cuda_available"] else []
    except Exception as exc:
        out["torch_error"] = f"{type(exc).__name__}: {exc}"
print("MUSUBI_PIPE_PROBE " + json.dumps(out))
"""


def probe_python(python: Path, torch: bool = True, timeout: float = 60.0, env: dict | None = None) -> dict:
    """Versions (and CUDA facts with torch=True) as seen by musubi's Python. Never raises."""
    argv = [str(python), "-c", SAFE_PATH + PROBE.strip()] + (["--torch"] if torch else [])
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"the probe did not finish in {timeout:.0f} s"}
    except OSError as exc:
        return {"error": f"cannot start {python}: {exc}"}
    for line in done.stdout.splitlines():
        if line.startswith("MUSUBI_PIPE_PROBE "):
            return json.loads(line.split(" ", 1)[1])
    return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}


def musubi_version(musubi_dir: Path) -> str | None:
    try:
        text = (musubi_dir / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    for line in text.splitlines():
        if line.strip().startswith("version") and "=" in line:
            return line.split("=", 1)[1].strip().strip('"\'')
    return None


def git_commit(folder: Path) -> str | None:
    """HEAD of a git checkout, read from .git directly so git need not be installed."""
    git = folder / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).exists():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        return None
    return None


def gpus() -> list[dict] | str:
    """GPUs as NVML or nvidia-smi see them, or a sentence saying why none are listed."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            found = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(h)
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                found.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                              "memory_total_mib": mem.total // 2**20, "memory_free_mib": mem.free // 2**20})
            return found
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library, no driver: fall back to nvidia-smi
        pass
    smi = shutil.which("nvidia-smi")
    if not smi:
        return "no NVIDIA driver found (neither NVML nor nvidia-smi)"
    try:
        done = subprocess.run([smi, "--query-gpu=index,name,memory.total,memory.free",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi failed: {exc}"
    found = []
    for line in done.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            found.append({"index": int(parts[0]), "name": parts[1],
                          "memory_total_mib": int(float(parts[2])), "memory_free_mib": int(float(parts[3]))})
    return found or f"nvidia-smi listed no GPU: {done.stderr.strip()}"


def free_disk(path: Path) -> int:
    """Free bytes on the disk holding `path` (its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def environment_facts(cfg: MusubiConfig) -> dict:
    """What a run record keeps: versions (metadata only, no torch import: fast) and GPUs."""
    facts: dict = {"musubi_pipe_python": sys.version.split()[0], "platform": sys.platform}
    if cfg.musubi_dir:
        facts["musubi_tuner"] = {"dir": str(cfg.musubi_dir), "version": musubi_version(cfg.musubi_dir),
                                 "commit": git_commit(cfg.musubi_dir)}
    if cfg.python:
        facts["python"] = probe_python(cfg.python, torch=False, timeout=30)
    facts["gpus"] = gpus()
    facts["CUDA_VISIBLE_DEVICES"] = cfg.gpus or os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return facts


def doctor(cfg: MusubiConfig, output_dir: Path | None = None, timeout: float = 120.0) -> list[Check]:
    """Everything a run needs, each with what was found and, when wrong, the fix."""
    checks = [Check("config file", True, f"{cfg.file}" + ("" if cfg.file and cfg.file.exists() else " (absent)"))]
    for p in cfg.problems():
        checks.append(Check(p.path, False, p.message, p.fix))
    if cfg.musubi_dir and (cfg.musubi_dir / "src" / "musubi_tuner").is_dir():
        version, commit = musubi_version(cfg.musubi_dir), git_commit(cfg.musubi_dir)
        checks.append(Check("musubi-tuner", True, f"{cfg.musubi_dir} version {version or '?'} "
                            f"commit {commit[:7] if commit else '? (not a git checkout)'}"
                            f" [{cfg.origin.get('musubi_tuner_dir', '')}]"))
    if cfg.python and cfg.python.exists():
        facts = probe_python(cfg.python, torch=True, timeout=timeout, env=cfg.step_env())
        if "error" in facts:
            checks.append(Check("python", False, f"{cfg.python}: {facts['error']}",
                                "check that this Python starts: run it with --version"))
        else:
            pk = facts["packages"]
            checks.append(Check("python", True, f"{facts['python']} at {facts['executable']}"))
            if pk["torch"] is None:
                checks.append(Check("torch", False, "not installed in musubi's venv",
                                    "install torch from https://pytorch.org for your CUDA version"))
            elif "torch_error" in facts:
                checks.append(Check("torch", False, f"{pk['torch']}: import failed: {facts['torch_error']}",
                                    "reinstall torch and torchvision from the same index (cpu or cuXXX)"))
            else:
                cuda = facts.get("cuda_available")
                checks.append(Check("torch", bool(cuda), f"{pk['torch']}, CUDA "
                                    + (f"{facts.get('cuda_version')} with {', '.join(facts['devices'])}" if cuda
                                       else "not available"),
                                    "" if cuda else "install a CUDA build of torch, and check the driver "
                                    "(nvidia-smi) and CUDA_VISIBLE_DEVICES / `gpus`", warning=not cuda))
            checks.append(Check("accelerate", pk["accelerate"] is not None, pk["accelerate"] or "not installed",
                                "pip install -e <musubi-tuner> installs it (training is launched with it)"))
            checks.append(Check("accelerate config", True,
                                "not needed: musubi-pipe passes explicit `accelerate launch` flags"))
            checks.append(Check("tensorboard", pk["tensorboard"] is not None, pk["tensorboard"] or "not installed",
                                "pip install tensorboard in musubi's venv: without it --logging_dir logs nothing",
                                warning=True))
            checks.append(Check("lycoris", pk["lycoris-lora"] is not None, pk["lycoris-lora"] or "not installed",
                                "pip install lycoris-lora in musubi's venv: Wan/FramePack merges need it",
                                warning=True))
    found = gpus()
    if isinstance(found, str):
        checks.append(Check("GPUs", False, found, "install the NVIDIA driver; training on CPU is not practical",
                            warning=True))
    else:
        visible = f" (CUDA_VISIBLE_DEVICES={cfg.gpus})" if cfg.gpus else ""
        checks.append(Check("GPUs", True, "; ".join(
            f"{g['index']}: {g['name']} {g['memory_free_mib']}/{g['memory_total_mib']} MiB free" for g in found)
            + visible))
    where = Path(output_dir or Path.cwd())
    free = free_disk(where)
    checks.append(Check("free disk", free > 20 * 2**30, f"{free / 2**30:.1f} GiB free at {where}",
                        "free some space: checkpoints, states and caches take tens of GB", warning=True))
    for root in cfg.allowed_output_roots:
        checks.append(Check("output root", root.is_dir(), str(root), "create it or fix allowed_output_roots",
                            warning=True))
    return checks
