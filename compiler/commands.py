"""`validate`, `plan`, `dag` and `schema`: the commands that read a pipeline and run nothing."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from ..errors import PipelineError
from .plan import Plan


def compile_or_exit(path: str) -> Plan:
    """Compile a pipeline file, or print every problem and exit 1. Shared by the commands."""
    from . import compile_file

    try:
        plan = compile_file(path)
    except PipelineError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    for warning in plan.warnings:
        click.echo(warning, err=True)
    from ..dsl.inputs import check_file

    # Inputs may live on the machine that will run the pipeline: here, only a warning.
    for problem in check_file(path, "warning", produced_under=plan.workdir):
        click.echo(str(problem), err=True)
    return plan


@click.command()
@click.argument("pipeline", type=click.Path(dir_okay=False))
def validate(pipeline):
    """Check a pipeline file; print every problem with its place and fix."""
    plan = compile_or_exit(pipeline)
    click.echo(f"{pipeline}: ok, {len(plan.steps)} steps")


@click.command()
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def plan(pipeline, fmt):
    """Show the plan: the exact musubi-tuner commands, in order, and what each needs and makes."""
    result = compile_or_exit(pipeline)
    click.echo(result.to_json() if fmt == "json" else render_plan(result))


def render_plan(plan: Plan) -> str:
    lines = [f"plan {plan.name}: {len(plan.steps)} steps (musubi-tuner contract {plan.musubi_contract})",
             f"outputs under {plan.workdir}", ""]
    if plan.files:
        lines.append("files written before the steps run:")
        lines += [f"  {f.path}" for f in plan.files]
        lines.append("")
    labels = branch_labels(plan)
    for stage, sweep in plan.sweeps.items():
        legend = ", ".join(f"{short} = {setting}" for short, setting in sweep["settings"].items())
        lines.append(f"sweep of {stage}: {len(sweep['branches'])} branches ({legend}); the stages before it are shared")
        lines += [f"  {b['label']}" for b in sweep["branches"].values()]
        lines.append("")
    for number, step in enumerate(plan.steps, 1):
        after = f"  (after {', '.join(step.needs)})" if step.needs else ""
        label = f" {labels[step.id]}" if step.id in labels else ""
        lines.append(f"{number}. {step.id}{label}: {step.kind}{after}")
        lines.append("   " + _wrapped(step.display_argv()))
        for out in step.outputs:
            where = f"{out.path}/{out.pattern}" if out.pattern else out.path
            lines.append(f"   -> {out.name}: {where}")
        if step.fallbacks:
            lines.append("   if out of memory (run --retry), one at a time:")
            lines += [f"     {i}. {fb.why}" for i, fb in enumerate(step.fallbacks, 1)]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def branch_labels(plan: Plan) -> dict[str, str]:
    """Step id -> its branch's label, e.g. train-lr1e-4-nd16 -> train[lr=1e-4,nd=16]."""
    labels = {}
    for sweep in plan.sweeps.values():
        for branch in sweep["branches"].values():
            values = branch["label"][branch["label"].index("["):]
            labels.update({new: old + values for old, new in branch["stages"].items()})
    return labels


def _wrapped(argv: list[str]) -> str:
    """A pasteable command, one option per line."""
    parts: list[str] = []
    for word in argv:
        quoted = shlex.quote(word)
        if (word.startswith("--") or word.endswith(".py")) and parts:
            parts.append(" \\\n     " + quoted)
        else:
            parts.append((" " if parts else "") + quoted)
    return "".join(parts)


@click.command()
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["text", "mermaid", "dot"]), default="text", show_default=True)
def dag(pipeline, fmt):
    """Draw the stage graph as text, mermaid or Graphviz dot."""
    result = compile_or_exit(pipeline)
    click.echo(render_dag(result, fmt))


def render_dag(plan: Plan, fmt: str) -> str:
    edges = [(need, step.id) for step in plan.steps for need in step.needs]
    if fmt == "mermaid":
        body = [f"  {s.id}[\"{s.id}<br/>{s.kind}\"]" for s in plan.steps] + [f"  {a} --> {b}" for a, b in edges]
        return "flowchart LR\n" + "\n".join(body)
    if fmt == "dot":
        body = [f'  "{s.id}" [label="{s.id}\\n{s.kind}"];' for s in plan.steps] + [f'  "{a}" -> "{b}";' for a, b in edges]
        return "digraph pipeline {\n  rankdir=LR;\n" + "\n".join(body) + "\n}"
    return "\n".join(f"{s.id} ({s.kind})" + (f" <- {', '.join(s.needs)}" if s.needs else "") for s in plan.steps)


def pipeline_schema() -> dict:
    from ..dsl.model import Pipeline

    schema = Pipeline.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "musubi-pipe pipeline"
    return schema


SCHEMA_FILE = Path(__file__).resolve().parent.parent / "schemas" / "pipeline.schema.json"


@click.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="write to this file instead of printing")
def schema(output):
    """Print the JSON Schema of pipeline files (for editor completion and checking)."""
    text = json.dumps(pipeline_schema(), indent=2, ensure_ascii=False) + "\n"
    if output:
        from ..files import write_atomic

        write_atomic(Path(output), text)
    else:
        click.echo(text, nl=False)
