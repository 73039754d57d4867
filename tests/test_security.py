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
