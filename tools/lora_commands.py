"""`lora inspect`, `lora merge`, `plan-memory` and `gpu`: LoRA files and GPU memory from the command line."""
from __future__ import annotations

import json
import sys

import click

from ..errors import PipelineError


def _exit_with(err: PipelineError) -> None:
    click.echo(str(err), err=True)
    sys.exit(1)


@click.group()
def lora():
    """Inspect LoRA files and merge several into one."""


@lora.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--family", help="check key coverage against this family: wan, hunyuan_video, framepack")
@click.option("--variant", help="model variant for coverage, e.g. t2v-14B (default: from the shapes)")
@click.option("--json", "as_json", is_flag=True, help="print everything as JSON")
@click.option("--modules", is_flag=True, help="list every module with its rank and alpha")
def inspect(file, family, variant, as_json, modules):
    """Format, architecture, ranks, alphas, metadata and key coverage of a LoRA file.
    Exits 1 when the file has errors (keys that would not load, broken tensors)."""
    from .lora import read_lora

    try:
        r = read_lora(file, family, variant)
    except PipelineError as err:
        _exit_with(err)
    if as_json:
        data = r.as_dict()
        if not modules:
            data.pop("per_module")
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(_inspect_text(r, modules))
    if r.errors:
        sys.exit(1)


def _inspect_text(r, modules: bool) -> str:
    lines = [f"{r.path}",
             f"  format:  {r.layout} ({r.kind})",
             f"  family:  {r.family or 'unknown'}" + (f" {r.variant}" if r.variant else "") +
             (f"  [{r.family_source}]" if r.family_source else ""),
             f"  modules: {len(r.modules)}; rank " + ", ".join(f"{k} x{v}" for k, v in r.ranks().items()) +
             "; alpha " + ", ".join(f"{k} x{v}" for k, v in r.alphas().items()),
             "  dtypes:  " + ", ".join(f"{k} x{v}" for k, v in r.dtypes.items())]
    if r.coverage:
        c = r.coverage
        lines.append(f"  coverage: {c.matched} of {c.expected} {c.family} {c.variant} modules; "
                     f"{len(c.unknown) + len(c.misnamed)} would not load; {len(c.wrong_shape)} shaped for another size")
    shown = {k: v for k, v in r.metadata.items() if k.startswith(("ss_network", "ss_base", "ss_output", "ss_epoch",
                                                                   "ss_steps", "modelspec.", "musubi_pipe."))}
    for k, v in sorted(shown.items()):
        lines.append(f"  {k} = {v if len(v) < 100 else v[:97] + '...'}")
    if len(r.metadata) > len(shown):
        lines.append(f"  ({len(r.metadata) - len(shown)} more metadata keys: --json shows them)")
    for p in r.problems:
        lines.append(f"  {p.severity}: {p.message}" + (f"\n    fix: {p.fix}" if p.fix else ""))
    if modules:
        for m in r.modules.values():
            lines.append(f"    {m.module or m.lora_name}: {m.kind} rank {m.rank} alpha {m.alpha} "
                         f"{m.in_features}->{m.out_features}")
    return "\n".join(lines)


@lora.command()
@click.argument("output", type=click.Path(dir_okay=False))
@click.argument("inputs", nargs=-1, required=True)
@click.option("--rank", type=click.IntRange(min=1), help="re-factorise to this rank by SVD (default: exact, ranks add up)")
@click.option("--format", "layout", type=click.Choice(["musubi", "comfyui"]), help="output layout (default: the first input's)")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="output dtype (default: the widest input's)")
@click.option("--family", help="refuse inputs that are not for this family")
@click.option("--force", is_flag=True, help="overwrite OUTPUT if it exists")
def merge(output, inputs, rank, layout, dtype, family, force):
    """Merge LoRAs into OUTPUT. Each input is FILE or FILE:WEIGHT (default weight 1.0)."""
    from .lora import merge_loras, parse_weighted

    try:
        result = merge_loras(output, [parse_weighted(s) for s in inputs], rank=rank, layout=layout, dtype=dtype,
                             family=family, force=force)
    except PipelineError as err:
        _exit_with(err)
    click.echo(result.summary())


@click.command("plan-memory")
@click.option("--family", required=True, help="wan, hunyuan_video or framepack")
@click.option("--task", help="Wan: t2v-1.3B, t2v-14B, i2v-14B, t2v-A14B, ...; FramePack: i2v/f1")
@click.option("--vram", type=float, help="GPU memory in GiB (default: the free memory of the largest GPU found)")
@click.option("--resolution", default="832x480", show_default=True, help="WIDTHxHEIGHT of the training videos")
@click.option("--frames", type=click.IntRange(min=1), default=33, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--rank", type=click.IntRange(min=1), default=32, show_default=True, help="LoRA network_dim")
@click.option("--no-fp8", is_flag=True, help="never propose fp8 (keeps full-precision weights)")
@click.option("--json", "as_json", is_flag=True)
def plan_memory_command(family, task, vram, resolution, frames, batch_size, rank, no_fp8, as_json):
    """The fastest memory settings that fit the GPU, with the reason for each."""
    from .memory import plan_memory
    from .resources import gpu_report

    if vram is None:
        report = gpu_report()
        if not report.available:
            click.echo(f"{report.message}\ngive --vram GIB to plan for a GPU that is not here", err=True)
            sys.exit(1)
        vram = max(g.memory_free_mib for g in report.gpus) / 1024
    try:
        plan = plan_memory(family, task, vram, resolution, frames, batch_size, rank, allow_fp8=not no_fp8)
    except PipelineError as err:
        _exit_with(err)
    click.echo(json.dumps(plan.as_dict(), indent=2) if as_json else plan.explain())


@click.command()
@click.option("--family", help="family for the advice (default: the first in the registry's order)")
@click.option("--task", help="task for the advice (default: the family's largest)")
@click.option("--json", "as_json", is_flag=True)
def gpu(family, task, as_json):
    """GPU memory, load and processes, with advice on musubi's memory options."""
    from .resources import gpu_report, report_text

    report = gpu_report()
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else report_text(report, family, task))
    if not report.available:
        sys.exit(1)
