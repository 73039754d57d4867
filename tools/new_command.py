"""`musubi-pipe new FOLDER`: a commented pipeline for a folder of clips or images."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import PipelineError


def _interactive(yes: bool) -> bool:
    """Questions only with a person at a terminal: a script, CI or a pipe gets the defaults."""
    return not yes and sys.stdin.isatty()


@click.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--family", help="model family (a name or alias; default: asked at a terminal, else the registry's first)")
@click.option("--task", help="the family's task (default: asked at a terminal, else the family's default)")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("pipeline.toml"),
              show_default=True, help="the pipeline file to write")
@click.option("--write-captions", is_flag=True, help="write a caption file from the file name for each medium "
              "without one (existing caption files are never changed)")
@click.option("--gpu-gb", type=click.FloatRange(min=0, min_open=True),
              help="GPU memory in GiB to plan for (default: the largest GPU here, asked at a terminal)")
@click.option("--yes", "-y", is_flag=True, help="ask nothing: use the defaults")
@click.option("--force", is_flag=True, help="replace an existing pipeline file")
def new(folder, family, task, output, write_captions, gpu_gb, yes, force):
    """Look at a folder of clips or images and write a commented pipeline for it."""
    from ..pipelines import registry
    from .proposal import detect_gpu_gib, propose, write_caption_stubs, write_new

    ask = _interactive(yes)
    if not output.resolve().parent.is_dir():
        _fail(f"{output}: its folder {output.resolve().parent} does not exist: create it, or give -o another file")
    if output.exists() and not force:
        _fail(f"{output} already exists: nothing written (pass --force to replace it, or -o another file)")
    if ask and family is None:
        names = list(registry.family_names())
        family = click.prompt("family", type=click.Choice(names), default=names[0])
    if ask and task is None:
        try:
            fam = registry.family(family or registry.default_family())
        except registry.UnknownFamily as exc:
            _fail(f"error: {exc}")
        if fam.tasks:
            task = click.prompt(f"{fam.title} task", type=click.Choice(fam.task_names()), default=fam.default_task)
    if ask and gpu_gb is None and detect_gpu_gib() is None:
        gpu_gb = click.prompt("no GPU found here: GPU memory to plan for, in GiB", type=click.FloatRange(min=1), default=24.0)
    try:
        proposal = propose(folder, family, task, gpu_gb)
    except PipelineError as exc:
        _fail("\n".join(str(p) for p in exc.problems))
    if write_captions:
        written = write_caption_stubs(proposal.missing_captions())
        click.echo(f"wrote {len(written)} caption stub(s) from file names: edit them to describe each file")
    click.echo(proposal.report())
    text = proposal.pipeline_toml(output)
    if force:
        from ..files import write_atomic

        write_atomic(output, text)
    elif not write_new(output, text):
        _fail(f"{output} appeared while writing: nothing written (pass --force to replace it)")
    click.echo(f"\nwrote {output}; next: musubi-pipe validate {output} && musubi-pipe plan {output}")


def _fail(message: str) -> None:
    click.echo(message, err=True)
    sys.exit(1)
