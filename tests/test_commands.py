"""validate, plan and dag as a user calls them."""
import json
import shlex
from pathlib import Path

from click.testing import CliRunner

from musubi_pipe.cli import main
from musubi_pipe.compiler import compile_file

EXAMPLE = Path(__file__).resolve().parent.parent / "pipelines" / "examples" / "hunyuan_video_lora_comfyui.toml"


def invoke(*args):
    result = CliRunner().invoke(main, [*args])
    assert result.exit_code == 0, result.output
    return result.stdout  # warnings (such as "not found here" for the example's /models) go to stderr


def test_plan_text_commands_can_be_pasted():
    text = invoke("plan", str(EXAMPLE))
    plan = compile_file(EXAMPLE)
    blocks = text.split("\n\n")
    for step in plan.steps:
        block = next(b for b in blocks if b.lstrip().startswith(f"{plan.steps.index(step) + 1}. {step.id}:"))
        lines = block.splitlines()[1:]
        end = next(i for i, line in enumerate(lines) if not line.endswith("\\"))  # the command's last line
        command = "\n".join(lines[:end + 1])
        assert all(line.startswith("   ->") or line.startswith("   if out of memory") or line.startswith("     ")
                   for line in lines[end + 1:])
        assert shlex.split(command.replace("\\\n", " ")) == step.display_argv()


def test_plan_json_is_the_plan():
    data = json.loads(invoke("plan", "--format", "json", str(EXAMPLE)))
    assert [s["id"] for s in data["steps"]] == ["cache_latents", "cache_text", "train", "comfyui", "merged"]
    assert data["musubi_contract"] == "30c658c"


def test_dag_in_three_formats():
    text = invoke("dag", str(EXAMPLE))
    assert "train (train) <- cache_latents, cache_text" in text
    mermaid = invoke("dag", "--format", "mermaid", str(EXAMPLE))
    assert mermaid.startswith("flowchart LR") and "train --> comfyui" in mermaid and "train --> merged" in mermaid
    dot = invoke("dag", "--format", "dot", str(EXAMPLE))
    assert dot.startswith("digraph pipeline {") and '"cache_text" -> "train";' in dot


def test_validate_says_ok_with_the_step_count():
    assert invoke("validate", str(EXAMPLE)).strip().endswith("ok, 5 steps")
