"""Shared pipelines are untrusted: every document a hostile user could write is refused with a
message (file, line, fix) in bounded time and memory, never a traceback or a hang (issue 13).

Each attack runs `musubi-pipe validate` in a child process limited to MEMORY_LIMIT of address
space and TIMEOUT seconds: on main these documents took 2-8 GB or ran for minutes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from musubi_pipe.cli import main

MEMORY_LIMIT = 512 << 20  # validate needs about 50 MB resident
TIMEOUT = 60  # generous for a loaded 2-core box: these finish in well under a second

HEAD = 'name = "hostile"\nfamily = "wan"\ntask = "t2v-1.3B"\n'
STAGE = '[stages.train]\nkind = "train"\n'


def validate(path: Path) -> tuple[int, str]:
    """(exit code, stdout+stderr) of `musubi-pipe validate path`, in a bounded child process."""
    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    proc = subprocess.run([sys.executable, "-m", "musubi_pipe.cli", "validate", str(path)], capture_output=True, text=True,
                          timeout=TIMEOUT, preexec_fn=limit if sys.platform != "win32" else None, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout + proc.stderr


def refused(tmp_path: Path, name: str, text: str | bytes, *expected: str) -> str:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    code, out = validate(path)
    assert code == 1, out
    assert "Traceback" not in out and "MemoryError" not in out, out
    assert "error: " in out and "fix: " in out, out
    for piece in expected:
        assert piece in out, f"{piece!r} not in:\n{out}"
    return out


# ---------------------------------------------------------------- documents that cost too much

def test_yaml_alias_bomb_is_refused_fast(tmp_path):
    lines = ["name: hostile", "family: wan", 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{cur}: &{cur} [{','.join(['*' + prev] * 9)}]")
    text = "\n".join(lines) + "\n"
    assert len(text) < 600  # 9**9 = 387 million strings once expanded
    refused(tmp_path, "bomb.yaml", text, "bomb.yaml:", "expands to more than 100000 values (through YAML aliases)")


def test_yaml_alias_inside_itself_is_refused(tmp_path):
    refused(tmp_path, "cycle.yaml", "name: hostile\nfamily: wan\nvars: &v\n  x: [*v]\n", "cycle.yaml:4:", "inside the value it names")


def test_yaml_duplicate_stage_is_refused_with_its_line(tmp_path):
    text = "name: hostile\nfamily: wan\nstages:\n  train:\n    kind: train\n    network_dim: 32\n  train:\n    kind: train\n    network_dim: 4\n"
    refused(tmp_path, "dup.yaml", text, "dup.yaml:7:", "duplicate key 'train' (first on line 4)")


def test_json_dataset_duplicate_key_is_refused(tmp_path):
    (tmp_path / "ds.json").write_text('{"datasets": [{"image_directory": "a", "image_directory": "b"}]}')
    refused(tmp_path, "p.toml", HEAD + 'dataset = "ds.json"\n', "ds.json", "duplicate key 'image_directory'")


@pytest.mark.parametrize("fmt", ["toml", "yaml", "json"])
def test_twenty_thousand_levels_of_nesting(tmp_path, fmt):
    deep = "[" * 20000 + "]" * 20000
    if fmt == "json":
        (tmp_path / "ds.json").write_text('{"datasets": ' + deep + "}")
        refused(tmp_path, "p.toml", HEAD + 'dataset = "ds.json"\n', "ds.json:1:", "nested more than 32 levels deep")
    elif fmt == "yaml":
        refused(tmp_path, "deep.yaml", f"name: hostile\nfamily: wan\nvars: {deep}\n", "deep.yaml:3:", "nested more than 32 levels deep")
    else:
        refused(tmp_path, "deep.toml", HEAD + f"a = {deep}\n", "deep.toml:4:", "nested more than 32 levels deep")


def test_deep_yaml_block_nesting(tmp_path):
    text = "name: hostile\nfamily: wan\nvars:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(200)) + "  " * 201 + "x\n"
    refused(tmp_path, "block.yaml", text, "nested more than 32 levels deep")


def test_too_many_values(tmp_path):
    refused(tmp_path, "many.toml", HEAD + "[vars]\nx = [" + ",".join(["1"] * 200_000) + "]\n", "many.toml:5:", "more than 100000 values")


@pytest.mark.parametrize("what", ["int", "float"])
def test_huge_numbers(tmp_path, what):
    number = "9" * 5000 if what == "int" else "1e999"
    out = refused(tmp_path, f"big-{what}.toml", HEAD + STAGE + f"network_dim = {number}\n", "big-")
    assert ("finite" in out or "TOML syntax error" in out or "valid integer" in out)


def test_huge_yaml_integer(tmp_path):
    refused(tmp_path, "big.yaml", "name: hostile\nfamily: wan\nstages:\n  t:\n    kind: train\n    network_dim: " + "9" * 5000 + "\n",
            "big.yaml", "YAML value cannot be read")


def test_yaml_python_object_tag(tmp_path):
    refused(tmp_path, "tag.yaml", "name: !!python/object/apply:os.system ['echo pwned']\nfamily: wan\n", "tag.yaml:1:", "YAML syntax error")


# ---------------------------------------------------------------- templates

@pytest.mark.parametrize("template, expected", [
    ("{{ 'a' * 2000000000 }}", "the repeated value would be longer than 65536 characters"),
    ("{{ 'ab' * 40000 }}", "the repeated value would be longer than 65536 characters"),
    ("{{ 7 ** 99999999 }}", "the power is too large a number"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", "loops ({% for %}) are not allowed"),
    ("{{ range(100000) | list }}", "the filter 'list' is not allowed"),
    ("{{ 'a' | center(2000000000) }}", "the filter 'center' is not allowed"),
    ("{{ 'a'.ljust(2000000000) }}", "calls such as f(x) are not allowed"),
    ("{{ name.__class__ }}", "attributes such as x.y are not allowed"),
    ("{{ '%2000000000d' % 1 }}", "string formatting with % is not allowed"),
    ("{{ ('a' * 60000) | replace('', 'bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb') }}", "the replaced value would be longer"),
    ("{% set x = 1 %}", "{% set %} are not allowed"),
    ("{{ lipsum(1000000000) }}", "calls such as f(x) are not allowed"),
    ("{% include '/etc/passwd' %}", "include are not allowed"),
    ("{{ foo( }}", "template syntax error"),
    ("{% if x %}", "template syntax error"),
    ("{{ nothing_defined }}", "'nothing_defined' is undefined"),
    ("{{ 1 / 0 }}", "ZeroDivisionError: division by zero"),
])
def test_template_is_bounded(tmp_path, template, expected):
    text = HEAD + f"workdir = '''{template}'''\n"
    refused(tmp_path, "tpl.toml", text, "tpl.toml:4: error: workdir: cannot interpolate", expected)


def test_template_deep_parentheses(tmp_path):
    template = "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}"
    refused(tmp_path, "paren.toml", HEAD + f"workdir = '{template}'\n", "the template nests too deeply")


def test_variables_doubling_each_other_stay_bounded(tmp_path):
    # each variable twice the one before: 2**60 characters at the end without a bound
    lines = ['v0 = "ab"'] + [f'v{i} = "{{{{ v{i - 1} }}}}{{{{ v{i - 1} }}}}"' for i in range(1, 61)]
    refused(tmp_path, "double.toml", HEAD + "[vars]\n" + "\n".join(lines) + "\n", "vars.v", "longer than 65536 characters")


def test_variables_joined_with_tilde_stay_bounded(tmp_path):
    lines = ['v0 = "ab"'] + [f'v{i} = "{{{{ v{i - 1} ~ v{i - 1} ~ v{i - 1} }}}}"' for i in range(1, 40)]
    refused(tmp_path, "tilde.toml", HEAD + "[vars]\n" + "\n".join(lines) + "\n", "vars.v", "longer than 65536 characters")


def test_one_string_referring_to_a_large_variable_many_times(tmp_path):
    big = "a" * 60000
    refs = "{{ v }}" * 9000  # 540 MB if rendered
    refused(tmp_path, "refs.toml", HEAD + f'workdir = "{refs}"\n[vars]\nv = "{big}"\n', "refs.toml:4:", "longer than 65536 characters")


def test_many_distinct_templates(tmp_path):
    values = ",".join(f'"{{{{ {i} + 1 }}}}"' for i in range(3000))
    refused(tmp_path, "many-tpl.toml", HEAD + f"[vars]\nx = 1\n[stages.g]\nkind = \"generate\"\nprompt = \"p\"\nextra_args = {{ a = [{values}] }}\n",
            "more than 1000 templates")


def test_plain_interpolation_still_works(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text(HEAD + 'workdir = "{{ root }}/{{ name }}-{{ n * 2 }}{% if flag %}-on{% endif %}"\n[vars]\nroot = "out"\nn = 3\nflag = true\n')
    from musubi_pipe.dsl.load import load_pipeline

    pipeline, _ = load_pipeline(path)
    assert pipeline.workdir == "out/hostile-6-on"


# ---------------------------------------------------------------- files that are not documents

@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_dataset_dev_zero(tmp_path):
    refused(tmp_path, "zero.toml", HEAD + 'dataset = "/dev/zero"\n', "/dev/zero: error: this is not a regular file")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_dataset_fifo_does_not_block(tmp_path):
    os.mkfifo(tmp_path / "ds.toml")
    refused(tmp_path, "fifo.toml", HEAD + 'dataset = "ds.toml"\n', "ds.toml: error: this is not a regular file")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_pipeline_fifo_does_not_block(tmp_path):
    os.mkfifo(tmp_path / "p.toml")
    code, out = validate(tmp_path / "p.toml")
    assert code == 1 and "this is not a regular file" in out and "Traceback" not in out


def test_dataset_folder(tmp_path):
    (tmp_path / "ds").mkdir()
    refused(tmp_path, "dir.toml", HEAD + 'dataset = "ds"\n', "ds: error: this is a folder, not a file")


def test_huge_dataset_file(tmp_path):
    with open(tmp_path / "big.toml", "wb") as f:
        f.truncate(8 << 30)  # sparse: 8 GiB that cost nothing on disk
    refused(tmp_path, "p.toml", HEAD + 'dataset = "big.toml"\n', "big.toml: error: the file is 8192.0 MiB; a dataset config may be at most 1.0 MiB")


def test_huge_pipeline(tmp_path):
    refused(tmp_path, "huge.toml", HEAD.replace("hostile", "a" * (5 << 20)), "the file is 5.0 MiB; a pipeline may be at most 1.0 MiB")


def test_binary_pipeline(tmp_path):
    refused(tmp_path, "bin.toml", HEAD.encode() + b"\xff\xfe\x00garbage\n", "bin.toml:4: error: the file is not UTF-8 text")


# ---------------------------------------------------------------- values that are accepted but wrong

@pytest.mark.parametrize("setting, expected", [
    ("network_dim = -4", "stages.train.network_dim: input should be greater than or equal to 1, got -4\n    fix: set network_dim to 1 or more"),
    ("learning_rate = -1e-4", "stages.train.learning_rate: input should be greater than 0"),
    ("learning_rate = nan", "fix: write learning_rate as an ordinary number (nan and inf are not allowed)"),
    ("network_alpha = inf", "stages.train.network_alpha: input should be a finite number"),
    ("blocks_to_swap = -1", "fix: set blocks_to_swap to 0 or more"),
    ("num_processes = 0", "fix: set num_processes to 1 or more"),
    ("max_train_epochs = 0", "fix: set max_train_epochs to 1 or more"),
    ("max_train_steps = -5", "fix: set max_train_steps to 1 or more"),
    ("gradient_accumulation_steps = 0", "fix: set gradient_accumulation_steps to 1 or more"),
    ("save_every_n_epochs = 0", "fix: set save_every_n_epochs to 1 or more"),
    ("network_dropout = 1.5", "fix: set network_dropout to less than 1"),
    ("seed = 4294967296", "fix: set seed to 4294967295 or less"),
    ("max_timestep = 5000", "fix: set max_timestep to 1000 or less"),
    ("gpu_memory_gib = -24", "fix: set gpu_memory_gib to more than 0"),
    ("extra_args = { max_grad_norm = nan }", "nan and inf are not allowed"),
])
def test_wrong_training_values(tmp_path, setting, expected):
    refused(tmp_path, "values.toml", HEAD + STAGE + setting + "\n", "values.toml:6: error:", expected)


def test_wrong_dataset_values(tmp_path):
    text = HEAD + '[dataset.general]\nresolution = [0, -480]\n[[dataset.datasets]]\nimage_directory = "x"\nnum_repeats = 0\nbatch_size = -1\n'
    out = refused(tmp_path, "ds.toml", text, "dataset.general.resolution[0]: input should be greater than or equal to 1, got 0",
                  "dataset.general.resolution[1]", "fix: set resolution to 1 or more", "num_repeats", "batch_size")
    assert "valid integer" not in out  # no noise from the whole-number-or-list union


def test_wrong_generate_values(tmp_path):
    text = HEAD + '[stages.g]\nkind = "generate"\nprompt = "p"\nvideo_size = [0, 480]\ninfer_steps = 0\nflow_shift = -1\nloras = [{ path = "l.safetensors", multiplier = nan }]\n'
    refused(tmp_path, "gen.toml", text, "video_size[0]", "infer_steps", "flow_shift", "loras[0].multiplier: input should be a finite number")


def test_source_fps_inf(tmp_path):
    text = HEAD + '[[dataset.datasets]]\nvideo_directory = "v"\nsource_fps = inf\n'
    refused(tmp_path, "fps.toml", text, "source_fps", "frame rate")


def test_long_name(tmp_path):
    refused(tmp_path, "name.toml", HEAD.replace("hostile", "a" * 5000), "name.toml:1: error: name: string should have at most 100 characters",
            "fix: shorten name to at most 100 characters")


def test_long_string_anywhere(tmp_path):
    refused(tmp_path, "long.toml", HEAD + f'[vars]\nx = "{"a" * 70000}"\n', "long.toml:5:", "a string of 70000 characters (at most 65536)")


# ---------------------------------------------------------------- inputs that are not there

MISSING = HEAD + """
[models]
dit = "models/dit.safetensors"
vae = "models/vae.safetensors"
t5 = "models/t5.pth"

[dataset.general]
resolution = [64, 48]
caption_extension = ".txt"

[[dataset.datasets]]
image_directory = "images"
cache_directory = "cache"

[stages.cache_latents]
kind = "cache_latents"

[stages.cache_text]
kind = "cache_text_encoder"

[stages.train]
kind = "train"
network_dim = 4
max_train_epochs = 1
"""


def _models(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    for name in ("dit.safetensors", "vae.safetensors", "t5.pth"):
        (tmp_path / "models" / name).write_text("weights")


def test_validate_and_plan_warn_about_a_missing_dataset_folder(tmp_path):
    _models(tmp_path)
    path = tmp_path / "p.toml"
    path.write_text(MISSING)
    for command in ("validate", "plan"):
        result = CliRunner().invoke(main, [command, str(path)])
        assert result.exit_code == 0, result.output
        assert f"p.toml:15: warning: dataset.datasets[0].image_directory: folder not found here: {tmp_path / 'images'}" in result.stderr
        assert "ignore this if the pipeline runs on another machine" in result.stderr


def test_run_refuses_a_missing_dataset_folder_before_anything_runs(tmp_path, monkeypatch):
    from musubi_double import double_python, make_fake_checkout

    checkout = make_fake_checkout(tmp_path / "musubi-tuner")
    monkeypatch.setenv("MUSUBI_PIPE_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.setenv("MUSUBI_TUNER_DIR", str(checkout))
    monkeypatch.setenv("MUSUBI_PIPE_PYTHON", double_python(checkout))
    _models(tmp_path)
    path = tmp_path / "p.toml"
    path.write_text(MISSING.replace('dit = "models/dit.safetensors"', 'dit = "models/gone.safetensors"'))
    result = CliRunner().invoke(main, ["run", str(path), "--plain"])
    assert result.exit_code == 2, result.output
    assert "p.toml:6: error: models.dit: not found: " in result.output
    assert "dataset.datasets[0].image_directory: folder not found: " in result.output
    assert not (tmp_path / "musubi-out" / "hostile" / "runs").exists()  # nothing started


def test_missing_captions_and_prompt_files(tmp_path):
    from musubi_pipe.dsl.inputs import check_file

    _models(tmp_path)
    (tmp_path / "clips").mkdir()
    for n in ("a", "b", "c"):
        (tmp_path / "clips" / f"{n}.mp4").write_bytes(b"x")
    (tmp_path / "clips" / "a.txt").write_text("a clip")
    os.mkfifo(tmp_path / "prompts.txt") if hasattr(os, "mkfifo") else (tmp_path / "prompts.txt").mkdir()
    text = MISSING.replace('image_directory = "images"', 'video_directory = "clips"') + 'sample_prompts = "prompts.txt"\n[stages.g]\nkind = "generate"\nprompt = "p"\nimage_path = "start.png"\nloras = ["@train.lora", "other.safetensors"]\n'
    path = tmp_path / "p.toml"
    path.write_text(text)
    found = {p.path: p for p in check_file(path, "error")}
    assert "2 of 3 videos have no caption (first: b.mp4" in found["dataset.datasets[0]"].message
    assert "is not a prompt file" in found["stages.train.sample_prompts"].message
    assert found["stages.g.image_path"].message.startswith("not found: ")
    assert "stages.g.loras[1].path" in found and "stages.g.loras[0].path" not in found  # a reference is made by the run
    assert not any(p.startswith("models") for p in found)
