"""Shared pipelines are untrusted: what a document may not make musubi-pipe or musubi do."""
from __future__ import annotations

import pytest

from musubi_pipe.errors import PipelineError

from test_compiler import compile_text
from test_corrected_commands import CASES


@pytest.mark.parametrize("field", ["network_args", "optimizer_args", "lr_scheduler_args"])
def test_a_list_item_is_never_read_as_a_flag(field):
    text = CASES["wan22_t2v_experts"] + f'{field} = ["--network_module", "antigravity", "--config_file", "other.toml"]\n'
    with pytest.raises(PipelineError) as err:
        compile_text(text)
    assert f"{field} item '--network_module' starts with '-'" in str(err.value)
    extra = CASES["wan22_t2v_experts"] + 'extra_args = { base_weights = ["/w/a.safetensors", "--config_file"] }\n'
    with pytest.raises(PipelineError, match="base_weights item '--config_file' starts with '-'"):
        compile_text(extra)
    fine = compile_text(CASES["wan22_t2v_experts"] + f'{field} = ["decay=0.1", "-1"]\n')  # a negative number is a value
    assert "decay=0.1" in fine.step("train_low").args


# ------------------------------------------------ options only the local configuration may allow

from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

from musubi_pipe.executors.local import check_plan, redact  # noqa: E402
from musubi_pipe.executors.musubi_env import MusubiConfig  # noqa: E402

TRAIN = CASES["wan22_t2v_experts"]


def refused(extra: str, config: MusubiConfig | None = None) -> str:
    """check_plan's message for the pipeline with `extra` on its last stage ("" if accepted)."""
    plan = compile_text(TRAIN + extra)
    try:
        check_plan(plan, config or MusubiConfig())
    except PipelineError as err:
        return str(err)
    return ""


@pytest.mark.parametrize("extra, allow", [
    ('extra_args = { config_file = "other.toml" }', "allow_code"),
    ('extra_args = { resume = "/elsewhere/state" }', "allow_code"),
    ('extra_args = { log_tracker_config = "t.toml" }', "allow_code"),
    ('optimizer_type = "evil.module.Optimizer"', "allowed_imports"),
    ('extra_args = { lr_scheduler_type = "evil.Scheduler" }', "allow_code"),
    ('extra_args = { huggingface_repo_id = "someone/loras" }', "allow_upload"),
    ('extra_args = { wandb_api_key = "k" }', "allow_upload"),
    ('log_with = "wandb"', "allow_upload"),
])
def test_options_that_load_code_or_send_data_need_the_local_configuration(extra, allow):
    message = refused(extra + "\n")
    assert allow in message, message
    allowing = {"allow_code": MusubiConfig(allow_code=True), "allow_upload": MusubiConfig(allow_upload=True),
                "allowed_imports": MusubiConfig(allowed_imports=["evil.module.Optimizer"])}[allow]
    assert refused(extra + "\n", allowing) == ""


def test_plain_settings_and_the_familys_own_modules_pass():
    assert refused('optimizer_type = "AdamW"\nlog_with = "tensorboard"\n') == ""


def test_every_written_path_is_inside_the_allowed_roots(tmp_path):
    roots = MusubiConfig(allowed_output_roots=[tmp_path])
    text = TRAIN.replace('name = "wan22"', f'name = "wan22"\nworkdir = "{tmp_path}/w"')
    plan = compile_text(text + 'logging_dir = "/var/tmp/elsewhere"\n', folder=tmp_path)
    with pytest.raises(PipelineError, match="--logging_dir /var/tmp/elsewhere writes outside the allowed output folders"):
        check_plan(plan, roots)
    check_plan(compile_text(text + f'logging_dir = "{tmp_path}/logs"\n', folder=tmp_path), roots)


def test_secrets_never_reach_the_run_records():
    assert redact(["--wandb_api_key", "s3cret", "--huggingface_token=tok", "--seed", "1"]) == \
        ["--wandb_api_key", "***", "--huggingface_token=***", "--seed", "1"]


def test_the_dry_run_refuses_what_a_real_run_refuses(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from musubi_double import make_fake_checkout
    from musubi_pipe.cli import main
    from musubi_pipe.executors.dry import DryExecutor

    monkeypatch.setenv("MUSUBI_PIPE_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("MUSUBI_TUNER_DIR", str(make_fake_checkout(tmp_path / "musubi-tuner")))
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(TRAIN)
    for executor in ("dry", "local"):  # missing inputs stop both
        res = CliRunner().invoke(main, ["run", "--executor", executor, str(pipeline)])
        assert res.exit_code == 2 and "not found: /m/wan2.2_low_noise_14B_fp16.safetensors" in res.output, (executor, res.output)
    with pytest.raises(PipelineError, match="allow_code"):  # and so do options only the local config may allow
        DryExecutor(MusubiConfig()).run(compile_text(TRAIN + 'extra_args = { config_file = "other.toml" }\n'))


def test_an_exported_workflow_names_no_folder_of_this_machine(tmp_path):
    from click.testing import CliRunner

    from musubi_pipe.cli import main

    pipeline = tmp_path / "share.toml"
    pipeline.write_text(CASES["wan22_t2v_experts"].replace('"/m/', '"models/').replace('"/clips"', '"clips"'))
    out = tmp_path / "wf.json"
    res = CliRunner().invoke(main, ["export-comfy", str(pipeline), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert str(tmp_path) not in out.read_text() and "models/wan2.2_low_noise_14B_fp16.safetensors" in out.read_text()
    res = CliRunner().invoke(main, ["export-comfy", str(pipeline), "-o", str(out), "--here"])
    assert res.exit_code == 0 and str(tmp_path) in out.read_text()
