"""The plan: ordered steps with concrete musubi-tuner argv lists. The contract between the
compiler and every executor; plain data, serialisable to JSON and back."""
from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import asdict, dataclass, field
from typing import Any

# How a musubi-tuner script is started. Which Python (and so which venv) runs it is never
# part of a plan: that comes from the local configuration, at run time.
LAUNCH_PYTHON = "python"
LAUNCH_ACCELERATE = "accelerate"
# Python puts the working directory first on sys.path for `-c` and `-m`, and steps run in the
# pipeline's folder (a ComfyUI workflow's base folder): places a shared document chooses. So every
# Python musubi-pipe starts with `-c` first drops that entry, and any relative one, before it imports
# anything (only builtins are imported before). `-P` does the same from 3.11 on; musubi's venvs are
# often 3.10. `python script.py` is safe already: its sys.path[0] is the script's own folder.
SAFE_PATH = ("import sys; sys.path[:] = [p for p in sys.path if p]; "
             "import os; sys.path[:] = [p for p in sys.path if os.path.isabs(p)]; ")
# `python -m MODULE args` without the working directory on sys.path: same argv and __main__.
MODULE_BOOT = SAFE_PATH + "import runpy; runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)"
# musubi-pipe's own tools (LoRA merge, dataset check), run in musubi-pipe's Python. The package is
# loaded from its own folder, so this works where ComfyUI imported it from custom_nodes/ too.
LAUNCH_TOOL = "musubi-pipe"
TOOL_COMMANDS = (("lora", "merge"), ("dataset", "inspect"))
_TOOL_BOOT = SAFE_PATH + (  # one line, so logs and commands.txt show it on one line
    "import importlib.util; root = sys.argv.pop(1); "
    "spec = importlib.util.spec_from_file_location('musubi_pipe', root + '/__init__.py', submodule_search_locations=[root]); "
    "module = importlib.util.module_from_spec(spec); sys.modules['musubi_pipe'] = module; spec.loader.exec_module(module); "
    "from musubi_pipe.cli import main; main(args=sys.argv[1:], prog_name='musubi-pipe')"
)


@dataclass(frozen=True)
class Output:
    """Something a step promises to make. `pattern` is a glob (relative to `path`, a folder)
    for outputs whose names musubi decides at run time (timestamps, step numbers)."""

    name: str  # artifact name other stages refer to: "lora", "checkpoints", "videos", ...
    kind: str  # "file", "dir", "files"
    path: str
    pattern: str = ""
    required: bool = True  # a step succeeded only if every required output exists


@dataclass(frozen=True)
class Input:
    """A file or folder a step reads. `from_step` is set when another step makes it."""

    name: str
    path: str
    from_step: str = ""


@dataclass(frozen=True)
class GeneratedFile:
    """A file musubi-pipe writes before the steps run (dataset TOML, prompt files)."""

    path: str
    content: str


@dataclass(frozen=True)
class Fallback:
    """A memory-saving setting an out-of-memory retry may use: the settings changed from the
    plan's (cumulative), why, and the whole argv with them (checked by musubi's parser)."""

    settings: dict[str, Any]
    why: str
    args: list[str]


@dataclass(frozen=True)
class Step:
    id: str  # the stage name in the pipeline
    kind: str  # cache_latents, cache_text_encoder, train, ema, convert, merge, generate
    family: str
    script: str  # file name inside musubi-tuner's src/musubi_tuner/, e.g. "wan_train_network.py"
    args: list[str]  # the script's own argv (what the recorded parsers check)
    launcher: str = LAUNCH_PYTHON
    launch_args: list[str] = field(default_factory=list)  # accelerate launch flags
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = ""
    needs: list[str] = field(default_factory=list)
    inputs: list[Input] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    fingerprint: str = ""
    # Facts executors need and cannot read back from argv cheaply: training length, save
    # cadence, state folders for resume, which progress phases to expect.
    meta: dict[str, Any] = field(default_factory=dict)
    fallbacks: list[Fallback] = field(default_factory=list)  # out-of-memory retries, cheapest first

    def display_argv(self) -> list[str]:
        """The command as a user would type it from a musubi-tuner checkout."""
        script = f"src/musubi_tuner/{self.script}"
        if self.launcher == LAUNCH_TOOL:
            return ["musubi-pipe", *self.args]
        if self.launcher == LAUNCH_ACCELERATE:
            return ["accelerate", "launch", *self.launch_args, script, *self.args]
        return ["python", script, *self.args]

    def command(self, python: str, musubi_dir: str) -> list[str]:
        """The argv to execute, given the local configuration's Python and checkout."""
        if self.launcher == LAUNCH_TOOL:
            import sys
            from pathlib import Path

            return [sys.executable, "-c", _TOOL_BOOT, str(Path(__file__).resolve().parent.parent), *self.args]
        script = f"{musubi_dir.rstrip('/')}/src/musubi_tuner/{self.script}"
        if self.launcher == LAUNCH_ACCELERATE:
            return [python, "-c", MODULE_BOOT, "accelerate.commands.launch", *self.launch_args, script, *self.args]
        return [python, script, *self.args]

    def shell_line(self) -> str:
        return shlex.join(self.display_argv())

    def output(self, name: str) -> Output:
        for out in self.outputs:
            if out.name == name:
                return out
        raise KeyError(f"step {self.id} has no output {name!r}")


@dataclass
class Plan:
    name: str
    source: str  # the pipeline file
    workdir: str  # where generated files, outputs and run records go by default
    steps: list[Step] = field(default_factory=list)
    files: list[GeneratedFile] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    musubi_contract: str = ""  # musubi-tuner commit whose recorded parsers checked the argv
    # The document's sweeps (dsl/sweep.py): stage -> {settings, branches: {name: {label, values, stages}}}
    sweeps: dict[str, Any] = field(default_factory=dict)

    def step(self, step_id: str) -> Step:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        steps = [
            Step(
                **{
                    **s,
                    "inputs": [Input(**i) for i in s.get("inputs", [])],
                    "outputs": [Output(**o) for o in s.get("outputs", [])],
                    "fallbacks": [Fallback(**f) for f in s.get("fallbacks", [])],
                }
            )
            for s in data.get("steps", [])
        ]
        files = [GeneratedFile(**f) for f in data.get("files", [])]
        rest = {k: v for k, v in data.items() if k not in ("steps", "files")}
        return cls(steps=steps, files=files, **rest)


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def flag_value(args: list[str], flag: str) -> str | None:
    """The value an argv gives `flag` (`--flag value` or `--flag=value`), None if it has none."""
    for i, word in enumerate(args):
        if word == flag and i + 1 < len(args):
            return args[i + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None
