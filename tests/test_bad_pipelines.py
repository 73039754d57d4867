"""Every bad document gives its clear messages (file, line, field, fix), never a traceback."""
from pathlib import Path

import pytest
from click.testing import CliRunner

from musubi_pipe.cli import main

BAD = Path(__file__).parent / "bad_pipelines"


def expectations(path: Path) -> list[str]:
    return [line.split("expect:", 1)[1].strip() for line in path.read_text().splitlines() if line.startswith("# expect:")]


@pytest.mark.parametrize("doc", sorted(BAD.iterdir()), ids=lambda p: p.name)
def test_bad_document_reports_every_problem(doc):
    result = CliRunner().invoke(main, ["validate", str(doc)])
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == 1, output
    assert "Traceback" not in output and result.exception is None or isinstance(result.exception, SystemExit)
    assert str(doc) in output  # the file is named
    for expected in expectations(doc):
        assert expected in output, f"{expected!r} missing from:\n{output}"


def test_every_bad_document_states_a_fix():
    for doc in BAD.iterdir():
        result = CliRunner().invoke(main, ["validate", str(doc)])
        errors = [line for line in result.output.splitlines() if ": error: " in line]
        fixes = [line for line in result.output.splitlines() if line.strip().startswith("fix:")]
        assert errors, doc
        assert len(fixes) >= len(errors) - 1, f"{doc.name}: errors without a fix:\n{result.output}"


def test_missing_file_is_an_error_message():
    result = CliRunner().invoke(main, ["validate", "no/such/pipeline.toml"])
    assert result.exit_code == 1
    assert "no/such/pipeline.toml: error: no such file" in result.output
