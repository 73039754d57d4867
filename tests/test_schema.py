"""The committed JSON Schema is the one the models generate."""
import json
from pathlib import Path

from click.testing import CliRunner

from musubi_pipe.cli import main
from musubi_pipe.compiler.commands import SCHEMA_FILE, pipeline_schema


def test_committed_schema_is_current():
    assert json.loads(SCHEMA_FILE.read_text()) == pipeline_schema(), "run: musubi-pipe schema -o schemas/pipeline.schema.json"


def test_schema_command_prints_it():
    result = CliRunner().invoke(main, ["schema"])
    assert result.exit_code == 0
    assert json.loads(result.output)["title"] == "musubi-pipe pipeline"


def test_schema_describes_stage_kinds():
    text = json.dumps(pipeline_schema())
    for kind in ("cache_latents", "cache_text_encoder", "train", "ema", "convert", "merge", "generate"):
        assert f'"{kind}"' in text
