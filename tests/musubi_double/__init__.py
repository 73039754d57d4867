"""A musubi-tuner TEST DOUBLE for CI: a fake checkout whose scripts accept exactly the recorded flags.

    root = make_fake_checkout(tmp_path / "musubi-tuner")
    python = double_python(root)          # root/.venv/bin/python: has the fake `accelerate`
    subprocess.run([python, str(root / "src/musubi_tuner/wan_train_network.py"), ...])
    subprocess.run([python, "-m", "accelerate.commands.launch", "--num_processes", "1", script, ...])

The checkout holds:
  src/musubi_tuner/<script>.py       one stub per script of the recorded contract
  src/musubi_tuner/_double_engine.py the shared behaviour (copied from engine.py here)
  src/musubi_tuner/_double_contract/ the recorded parsers (JSON) the stubs parse argv with
  pyproject.toml                     name musubi-tuner, version 0.3.4
  .venv/                             a venv (system site-packages visible) holding a fake
                                     `accelerate` package; found like a real checkout's .venv
  .double-site/accelerate/           the same fake package, for PYTHONPATH use: double_env(root)

Failure injection and timing are set with environment variables; see engine.py's docstring.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_CONTRACT = REPO / "pipelines" / "musubi_cli" / "30c658c"
VERSION = "0.3.4"
COMMIT = "30c658c4f4b0bf05038b3346eff9670259b10fc7"

STUB = '''"""musubi-tuner TEST DOUBLE stub for {name}.py (not the real script)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _double_engine import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(__file__))
'''

PYPROJECT = f'''# musubi-tuner TEST DOUBLE checkout (made by tests/musubi_double)
[project]
name = "musubi-tuner"
version = "{VERSION}"
requires-python = ">=3.10,<3.13"
'''


def _install_accelerate(site: Path) -> None:
    pkg = site / "accelerate"
    (pkg / "commands").mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text('"""accelerate TEST DOUBLE (musubi-pipe tests)."""\n__version__ = "1.6.0"\n')
    (pkg / "commands" / "__init__.py").write_text("")
    shutil.copyfile(HERE / "accelerate_launch.py", pkg / "commands" / "launch.py")


def _venv_site(venv: Path) -> Path:
    if os.name == "nt":
        return venv / "Lib" / "site-packages"
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def make_fake_checkout(root: Path, contract_dir: Path | None = None, venv: bool = True) -> Path:
    """Write a fake musubi-tuner checkout (a test double) at `root` and return `root`.

    One stub script per recorded parser in `contract_dir` (default: the project's copy of the
    30c658c contract). With `venv`, `root/.venv` is a venv of this Python that sees its
    site-packages (numpy, safetensors) plus the fake accelerate.
    """
    root = Path(root)
    contract = Path(contract_dir) if contract_dir else DEFAULT_CONTRACT
    pkg = root / "src" / "musubi_tuner"
    (pkg / "_double_contract").mkdir(parents=True, exist_ok=True)
    scripts = sorted(contract.glob("*.json"))
    if not scripts:
        raise FileNotFoundError(f"{contract}: no recorded parsers (*.json) to build the musubi-tuner test double from")
    for spec in scripts:
        shutil.copyfile(spec, pkg / "_double_contract" / spec.name)
        (pkg / f"{spec.stem}.py").write_text(STUB.format(name=spec.stem), encoding="utf-8")
    (pkg / "__init__.py").write_text('"""musubi-tuner TEST DOUBLE package."""\n')
    shutil.copyfile(HERE / "engine.py", pkg / "_double_engine.py")
    (root / "pyproject.toml").write_text(PYPROJECT, encoding="utf-8")
    (root / "README.md").write_text("musubi-tuner TEST DOUBLE made by musubi-pipe's tests; not musubi-tuner.\n")
    _install_accelerate(root / ".double-site")
    if venv and not (root / ".venv").exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(root / ".venv")],
                       check=True, capture_output=True)
        _install_accelerate(_venv_site(root / ".venv"))
        # `--system-site-packages` shows the base interpreter's packages only; when the tests run
        # in a venv (as in CI), the double needs that venv's numpy and safetensors too.
        parents = [p for p in sys.path if p and Path(p).is_dir() and Path(p).name in ("site-packages", "dist-packages")]
        (_venv_site(root / ".venv") / "_test_double_parent_site.pth").write_text("\n".join(parents) + "\n", encoding="utf-8")
    return root


def double_python(root: Path) -> str:
    """The Python of the double's venv (what musubi-pipe's `.venv` discovery finds)."""
    venv = Path(root) / ".venv"
    return str(venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))


def double_env(root: Path, **extra: str) -> dict[str, str]:
    """Environment for running the double with this test's own Python instead of its venv."""
    env = dict(os.environ)
    site = str(Path(root) / ".double-site")
    env["PYTHONPATH"] = site + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def script_path(root: Path, script: str) -> str:
    name = script if script.endswith(".py") else script + ".py"
    return str(Path(root) / "src" / "musubi_tuner" / name)
