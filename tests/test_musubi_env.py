"""Finding musubi-tuner: config file, environment variables, the checkout's venv, output roots,
init and doctor."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from musubi_pipe.cli import main
from musubi_pipe.errors import PipelineError
from musubi_pipe.executors.musubi_env import (config_path, doctor, load_config, probe_python, venv_python,
                                              write_config)


def fake_checkout(root: Path, venv: str = ".venv") -> Path:
    (root / "src" / "musubi_tuner").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "musubi-tuner"\nversion = "0.3.4"\n')
    py = root / venv / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.symlink_to(sys.executable)
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / ".git" / "packed-refs").write_text("# pack-refs\n30c658c4f4b0bf05038b3346eff9670259b10fc7 refs/heads/main\n")
    return root


@pytest.fixture
def env(tmp_path):
    return {"MUSUBI_PIPE_CONFIG": str(tmp_path / "cfg" / "config.toml")}


def test_config_dir_follows_xdg_on_linux(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    assert config_path({"XDG_CONFIG_HOME": str(tmp_path)}) == tmp_path / "musubi-pipe" / "config.toml"
    monkeypatch.setattr(sys, "platform", "win32")
    assert config_path({"APPDATA": str(tmp_path)}) == tmp_path / "musubi-pipe" / "config.toml"


def test_nothing_configured_says_how_to_fix(env):
    cfg = load_config(env)
    with pytest.raises(PipelineError) as err:
        cfg.require()
    assert "musubi-pipe init --musubi-dir" in str(err.value)


@pytest.mark.parametrize("venv", [".venv", "venv"])
def test_checkout_venv_is_found_automatically(tmp_path, env, venv):
    root = fake_checkout(tmp_path / "musubi tuner ü", venv)  # spaces and non-ASCII in the path
    cfg = load_config({**env, "MUSUBI_TUNER_DIR": str(root)}).require()
    assert cfg.python == root / venv / "bin" / "python"
    assert cfg.origin["python"] == "venv inside the checkout"


def test_environment_overrides_the_config_file(tmp_path, env):
    a, b = fake_checkout(tmp_path / "a"), fake_checkout(tmp_path / "b")
    write_config(Path(env["MUSUBI_PIPE_CONFIG"]), {"musubi_tuner_dir": str(a), "gpus": "1"})
    assert load_config(env).musubi_dir == a.resolve()
    assert load_config(env).step_env() == {"CUDA_VISIBLE_DEVICES": "1"}
    cfg = load_config({**env, "MUSUBI_TUNER_DIR": str(b), "MUSUBI_PIPE_PYTHON": sys.executable})
    assert cfg.musubi_dir == b.resolve() and cfg.python == Path(sys.executable)


def test_unknown_config_key_is_an_error_naming_the_file(env):
    Path(env["MUSUBI_PIPE_CONFIG"]).parent.mkdir(parents=True)
    Path(env["MUSUBI_PIPE_CONFIG"]).write_text('musubi_dir = "/x"\n')
    with pytest.raises(PipelineError) as err:
        load_config(env)
    assert "unknown key 'musubi_dir'" in str(err.value) and "config.toml" in str(err.value)


def test_output_roots_resolve_links_and_dotdot(tmp_path, env):
    allowed = tmp_path / "loras"
    allowed.mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    write_config(Path(env["MUSUBI_PIPE_CONFIG"]), {"allowed_output_roots": [str(allowed)]})
    cfg = load_config(env)
    assert cfg.is_allowed_output(allowed / "a" / "x.safetensors")
    assert not cfg.is_allowed_output(allowed / ".." / "x.safetensors")
    assert not cfg.is_allowed_output(tmp_path / "loras-evil" / "x")
    (allowed / "sneaky").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert not cfg.is_allowed_output(allowed / "sneaky" / "x")
    assert cfg.is_allowed_output(tmp_path / "other" / "x", extra_roots=[tmp_path / "other"])


def test_init_writes_once_and_needs_force_to_replace(tmp_path, env, monkeypatch):
    root = fake_checkout(tmp_path / "mt")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    r = CliRunner().invoke(main, ["init", "--musubi-dir", str(root), "--gpus", "0"])
    assert r.exit_code == 0, r.output
    assert "no `accelerate config` needed" in r.output
    text = Path(env["MUSUBI_PIPE_CONFIG"]).read_text()
    assert f'musubi_tuner_dir = "{root}"' in text and 'gpus = "0"' in text
    r = CliRunner().invoke(main, ["init", "--musubi-dir", str(root)])
    assert r.exit_code == 1 and "--force" in r.output
    assert Path(env["MUSUBI_PIPE_CONFIG"]).read_text() == text
    assert CliRunner().invoke(main, ["init", "--musubi-dir", str(root), "--force"]).exit_code == 0
    assert "gpus" not in Path(env["MUSUBI_PIPE_CONFIG"]).read_text()


def test_init_refuses_a_folder_that_is_not_a_checkout(tmp_path, env, monkeypatch):
    monkeypatch.setenv("MUSUBI_PIPE_CONFIG", env["MUSUBI_PIPE_CONFIG"])
    r = CliRunner().invoke(main, ["init", "--musubi-dir", str(tmp_path)])
    assert r.exit_code == 2 and "not a musubi-tuner checkout" in r.output
    assert not Path(env["MUSUBI_PIPE_CONFIG"]).exists()


def test_doctor_reports_versions_commit_and_missing_packages(tmp_path, env):
    root = fake_checkout(tmp_path / "mt")
    cfg = load_config({**env, "MUSUBI_TUNER_DIR": str(root)})
    checks = {c.name: c for c in doctor(cfg, tmp_path, timeout=60)}
    assert "version 0.3.4 commit 30c658c" in checks["musubi-tuner"].detail
    assert checks["python"].ok
    # this test's Python has no torch: a problem with a fix, not a crash
    assert not checks["torch"].ok and "pytorch.org" in checks["torch"].fix
    assert checks["accelerate config"].ok and "not needed" in checks["accelerate config"].detail
    assert "GiB free" in checks["free disk"].detail


def test_probe_of_a_python_that_cannot_start_is_a_message(tmp_path):
    assert "cannot start" in probe_python(tmp_path / "nope" / "python")["error"]
    assert venv_python(tmp_path) is None


def test_a_grace_period_that_is_not_a_number_names_the_file(tmp_path, env):
    Path(env["MUSUBI_PIPE_CONFIG"]).parent.mkdir(parents=True, exist_ok=True)
    Path(env["MUSUBI_PIPE_CONFIG"]).write_text('cancel_grace_s = "abc"\n')
    with pytest.raises(PipelineError) as err:
        load_config(env)
    assert "cancel_grace_s" in str(err.value) and "config.toml" in str(err.value) and "cancel_grace_s = 5.0" in str(err.value)
