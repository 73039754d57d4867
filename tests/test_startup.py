"""Start-up: `--help` and `--version` import no subcommand, and importing the compiler package or
the plan format loads neither pydantic nor networkx. Module sets, not times (those are in
benchmarks/bench_startup.py)."""
import json
import subprocess
import sys
from pathlib import Path

import click
from click.testing import CliRunner

from musubi_pipe import __version__
from musubi_pipe.cli import COMMANDS, main
from musubi_pipe.files import tomllib

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("pydantic", "networkx", "numpy", "yaml", "jinja2", "rich", "psutil", "importlib.metadata")


def modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code`."""
    out = subprocess.run([sys.executable, "-c", code + "\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_help_lists_each_commands_own_short_help():
    # The listing click makes when it imports every command, at two terminal widths.
    real = click.Group(name="musubi-pipe", commands={name: main.get_command(None, name) for name in COMMANDS})
    for width in (80, 200):
        ours = CliRunner().invoke(main, ["--help"], terminal_width=width).output
        theirs = CliRunner().invoke(real, ["--help"], terminal_width=width).output
        assert ours.split("Commands:")[1] == theirs.split("Commands:")[1]
    assert "plan-memory" in ours


def test_help_and_version_import_no_subcommand():
    for argv in (["--help"], ["--version"]):
        loaded = modules_after(f"import sys\nfrom musubi_pipe.cli import main\ntry:\n    main({argv!r})\n"
                               "except SystemExit:\n    pass")
        ours = {m for m in loaded if m.startswith("musubi_pipe")}
        assert ours == {"musubi_pipe", "musubi_pipe.cli"}, (argv, ours)
        assert not [m for m in loaded if m.split(".")[0] in HEAVY or m in HEAVY], argv


def test_version_is_the_projects():
    result = CliRunner().invoke(main, ["--version"])
    with open(ROOT / "pyproject.toml", "rb") as f:
        assert __version__ == tomllib.load(f)["project"]["version"]
    assert result.output.strip().endswith(f"version {__version__}")


def test_reading_plans_loads_no_compiler_machinery():
    loaded = modules_after("import musubi_pipe.compiler.plan, musubi_pipe.pipelines.registry, musubi_pipe.compiler.contract")
    assert not [m for m in loaded if m.split(".")[0] in ("pydantic", "networkx")]
    assert "musubi_pipe.compiler.build" not in loaded


def test_networkx_is_imported_when_a_graph_is_built():
    loaded = modules_after("from musubi_pipe.compiler import build")
    assert "musubi_pipe.compiler.build" in loaded and "networkx" not in loaded
    example = ROOT / "pipelines" / "examples" / "wan21_t2v_1.3b_lora.toml"
    assert "networkx" in modules_after(f"from musubi_pipe.compiler import compile_file\ncompile_file({str(example)!r})")
