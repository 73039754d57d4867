"""The `run`, `doctor` and `init` commands: run a pipeline, check the local setup, write the config."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from ..errors import PipelineError


def _fail(err: PipelineError, code: int = 2):
    _say(str(err))
    sys.exit(code)


def _say(text: str) -> None:
    """A line on stderr that never raises: the terminal may be gone (SIGHUP) or the pipe closed
    (`| tee log` ended by the same Ctrl-C)."""
    try:
        click.echo(text, err=True)
    except (OSError, ValueError):
        pass


def _silence_dead_output() -> None:
    """Point stdout/stderr at the null device if they are broken, so the interpreter's final
    flush neither prints a BrokenPipeError nor changes the exit code."""
    import os

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, stream.fileno())
                os.close(devnull)
            except (OSError, ValueError):
                pass


@click.command()
@click.argument("pipeline", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Run the selected steps even if they are up to date.")
@click.option("--only", multiple=True, metavar="STEP", help="Run only this step (repeatable).")
@click.option("--from", "from_", metavar="STEP", help="Start at this step (earlier ones are not run).")
@click.option("--until", metavar="STEP", help="Stop after this step.")
@click.option("--retry", is_flag=True,
              help="Retry transient failures (hub downloads, lost connections) and an out-of-memory failure "
                   "once with the next memory-saving setting.")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=None, metavar="N",
              help="Run up to N steps at once when their dependencies are done, each on its own GPUs from the "
                   "configuration's `gpus` pool (e.g. gpus = \"0,1,2,3\"). A failed step skips only what depends on it.")
@click.option("--quiet", is_flag=True, help="Print only failures and the final result.")
@click.option("--plain", is_flag=True, help="Plain progress lines instead of live bars (automatic when not a terminal or CI=true).")
@click.option("--executor", type=click.Choice(["local", "dry", "comfy"]), default="local", show_default=True,
              help="`dry` shows what would run and why, and runs nothing; `comfy` runs the exported workflow in a running ComfyUI.")
@click.option("--comfy-url", default="http://127.0.0.1:8188", show_default=True, help="The ComfyUI server for --executor comfy.")
def run(pipeline, force, only, from_, until, retry, jobs, quiet, plain, executor, comfy_url):
    """Run PIPELINE: skip steps that are up to date, run the rest in musubi-tuner's venv, resume
    interrupted training. Ctrl-C stops every process the run started."""
    from ..compiler import compile_file
    from .local import LocalExecutor, RetryPolicy
    from .musubi_env import load_config
    from .terminal import TerminalDisplay, choose_mode

    if executor == "comfy" and (force or only or from_ or until or retry or jobs):
        raise click.UsageError("--force, --only, --from, --until, --retry and --jobs apply to the local executor; "
                               "ComfyUI decides itself which nodes re-run")
    try:
        plan = compile_file(pipeline)
        if executor == "comfy":
            from .comfy import ComfyExecutor

            runner = ComfyExecutor(comfy_url)
        elif executor == "dry":
            from .dry import DryExecutor

            runner = DryExecutor(load_config())
        else:
            runner = LocalExecutor(load_config().require())
        from ..dsl.inputs import check_file

        # Missing model files, LoRAs or dataset folders stop a local run (and its dry run, which
        # decides the same) before any step starts; ComfyUI may run elsewhere, and --only/--from/
        # --until may skip the steps that read them: there they are warnings.
        strict = executor in ("local", "dry") and not (only or from_ or until)
        missing = check_file(pipeline, "error" if strict else "warning", produced_under=plan.workdir)
        if any(p.severity == "error" for p in missing):
            raise PipelineError(missing)
    except PipelineError as err:
        _fail(err)
    for w in plan.warnings:
        _say(f"warning: {w}")
    if jobs and jobs > 1 and executor == "local" and not runner.config.gpus:
        _say("note: no GPU pool configured (`gpus` in the configuration or MUSUBI_PIPE_GPUS): steps that use a GPU "
             "run one at a time; set e.g. gpus = \"0,1,2,3\" to run branches side by side")
    for problem in missing:
        _say(str(problem))
    display = TerminalDisplay(choose_mode(quiet, plain))
    got: list[int] = []

    def stop(signum, frame):
        runner.cancel()  # first: the message may fail, and nothing may skip the cancel
        got.append(signum)
        _say("\nmusubi-pipe: stopping the running step(s)…")

    # Ctrl-C, `kill`, and SIGHUP from a closed SSH session or terminal all cancel the run. A signal
    # the caller ignores (nohup, a background job) stays ignored.
    names = ("SIGINT", "SIGTERM", "SIGHUP")
    old = {}
    for sig in (getattr(signal, n) for n in names if hasattr(signal, n)):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            old[sig] = signal.signal(sig, stop)
    try:
        if executor == "comfy":
            result = runner.run(pipeline, [display])
        else:
            kw = {"jobs": jobs} if executor == "local" else {}
            result = runner.run(plan, [display], force=force, only=only or None, from_=from_, until=until,
                                retry=RetryPolicy(enabled=retry), **kw)
    except PipelineError as err:
        display.close()
        _fail(err)
    finally:
        display.close()
        for s, handler in old.items():
            signal.signal(s, handler)
    comparison = Path(result.run_dir or ".") / "sweep.txt"
    if executor == "local" and plan.sweeps and result.run_dir and comparison.is_file():
        try:
            click.echo(comparison.read_text(encoding="utf-8"), nl=False)
        except (OSError, ValueError):
            pass
    _silence_dead_output()
    cancelled = 128 + got[0] if got else 130  # as a shell reports the signal that stopped it
    sys.exit({"succeeded": 0, "dry-run": 0, "cancelled": cancelled}.get(result.status, 1))


@click.command()
@click.option("--where", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder whose free disk space to report (default: the current folder).")
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for musubi's Python to answer.")
def doctor(where, timeout):
    """Check the local setup: musubi-tuner, its Python, torch and CUDA, accelerate, tensorboard,
    lycoris, GPUs and free disk, each problem with its fix."""
    from .musubi_env import doctor as run_doctor
    from .musubi_env import load_config

    try:
        config = load_config()
    except PipelineError as err:
        _fail(err)
    bad = 0
    for check in run_doctor(config, where, timeout=timeout):
        mark = "ok " if check.ok else ("warn" if check.warning else "FAIL")
        bad += not check.ok and not check.warning
        click.echo(f"[{mark}] {check.name}: {check.detail}")
        if not check.ok and check.fix:
            click.echo(f"       fix: {check.fix}")
    sys.exit(1 if bad else 0)


@click.command()
@click.option("--musubi-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Your musubi-tuner checkout (default: $MUSUBI_TUNER_DIR).")
@click.option("--python", "python", type=click.Path(dir_okay=False, path_type=Path),
              help="musubi-tuner's Python (default: .venv or venv inside the checkout, found at run time).")
@click.option("--gpus", help="CUDA_VISIBLE_DEVICES for every step, e.g. 0 or 0,1; with `run --jobs`, the pool each step takes its own GPUs from.")
@click.option("--allow-output", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="A folder runs may write into (repeatable). Pipelines and workflows cannot write elsewhere.")
@click.option("--models-dir", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="A folder holding model files (repeatable): `musubi-pipe new` looks there.")
@click.option("--force", is_flag=True, help="Replace an existing config file.")
def init(musubi_dir, python, gpus, allow_output, models_dir, force):
    """Write the local configuration file. accelerate needs no `accelerate config`: musubi-pipe
    passes explicit `accelerate launch` flags."""
    import os

    from .musubi_env import DIR_ENV, config_path, venv_python, write_config

    musubi_dir = musubi_dir or (Path(os.environ[DIR_ENV]) if os.environ.get(DIR_ENV) else None)
    if musubi_dir is None:
        raise click.UsageError(f"give --musubi-dir /path/to/musubi-tuner (or set {DIR_ENV})")
    musubi_dir = musubi_dir.expanduser().resolve()
    if not (musubi_dir / "src" / "musubi_tuner").is_dir():
        raise click.UsageError(f"{musubi_dir} is not a musubi-tuner checkout (no src/musubi_tuner/)")
    values = {"musubi_tuner_dir": str(musubi_dir), "python": str(python.expanduser().resolve()) if python else None,
              "gpus": gpus, "allowed_output_roots": [str(p.expanduser().resolve()) for p in allow_output],
              "model_dirs": [str(p.expanduser().resolve()) for p in models_dir]}
    try:
        path = write_config(config_path(), values, force=force)
    except PipelineError as err:
        _fail(err, 1)
    click.echo(f"wrote {path}")
    found = python or venv_python(musubi_dir)
    click.echo(f"musubi-tuner: {musubi_dir}\npython: {found or 'NOT FOUND: create .venv inside the checkout'}")
    click.echo("accelerate: no `accelerate config` needed; musubi-pipe passes --num_processes, "
               "--mixed_precision and --num_cpu_threads_per_process itself.")
    click.echo("next: musubi-pipe doctor")
