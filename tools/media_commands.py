"""`dataset inspect`, `video extract|encode|info` and `monitor`: the command-line faces of the media tools."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from ..errors import PipelineError


def _fail(message: str) -> None:
    click.echo(message, err=True)
    sys.exit(1)


@click.group()
def dataset():
    """Look at a musubi dataset the way musubi will see it."""


@dataset.command("inspect")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--family", help="model family (a name or alias): picks cache suffix and target fps; default: the first in the registry's order")
@click.option("--json", "as_json", is_flag=True, help="print the full report as JSON")
@click.option("--sheet", type=click.Path(dir_okay=False), help="also write a contact sheet PNG here")
@click.option("--no-media", is_flag=True, help="only list files; do not open images and videos")
@click.option("--report", "report_file", type=click.Path(dir_okay=False), help="also write the full report as JSON here")
def inspect(config, family, as_json, sheet, no_media, report_file):
    """Items, captions, unreadable media, buckets, frame windows and cache files of CONFIG
    (a musubi dataset TOML/JSON, or a pipeline file holding one)."""
    from .dataset import inspect_dataset

    try:
        report = inspect_dataset(config, family, read_media=not no_media)
    except PipelineError as exc:
        _fail(str(exc))
    except ValueError as exc:
        _fail(f"error: {exc}")
    report_json = json.dumps(report.to_dict(), indent=1, default=str) if as_json or report_file else ""
    click.echo(report_json if as_json else report.format())
    if report_file:
        from ..files import write_atomic

        write_atomic(report_file, report_json + "\n")
    if sheet:
        from .contact_sheet import make_contact_sheet, save_png

        items = [i for d in report.datasets for i in d.items]
        save_png(make_contact_sheet(items, title=f"{config} ({len(items)} items)"), sheet)
        click.echo(f"contact sheet: {sheet}", err=as_json)
    errors = [p for p in report.all_problems() if p.severity == "error"]
    bad = sum(1 for d in report.datasets for i in d.items if i.error)
    sys.exit(1 if errors or bad else 0)


@click.group()
def video():
    """Read frames from videos and encode frames to MP4/WebM."""


@video.command("info")
@click.argument("paths", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the facts as JSON (one object; a list for several files)")
def info(paths, as_json):
    """Size, frame count, frame rate, length and codec of videos, as a table."""
    from .video import MediaError, probe

    rows, failed = [], False
    for path in paths:
        try:
            rows.append(probe(path))
        except MediaError as exc:
            failed = True
            rows.append(exc)
    if as_json:
        found = [r.to_dict() if not isinstance(r, MediaError) else {"path": r.path, "error": r.message, "fix": r.fix}
                 for r in rows]
        click.echo(json.dumps(found[0] if len(found) == 1 else found, indent=1))
    else:
        click.echo(video_table(rows))
    sys.exit(1 if failed else 0)


def video_table(rows: list) -> str:
    """One line per video under a header; a file that cannot be read says why on its line."""
    from .video import MediaError

    head = ("file", "size", "frames", "fps", "length", "codec")
    lines = []
    for r in rows:
        if isinstance(r, MediaError):
            lines.append((r.path, f"error: {r.message}" + (f" (fix: {r.fix})" if r.fix else "")))
            continue
        frames = f"{r.frames}" + (f" of {r.declared_frames} (truncated)" if r.truncated else "")
        lines.append((r.path, f"{r.width}x{r.height}", frames, f"{r.fps:g}", f"{r.duration_s:.2f} s", r.codec))
    widths = [max(len(row[i]) for row in [head, *lines] if len(row) == len(head)) for i in range(len(head))]

    def fmt(row):
        if len(row) == 2 and row[1].startswith("error:"):
            return f"{row[0]:<{widths[0]}}  {row[1]}"
        return "  ".join(f"{v:<{w}}" if i in (0, 5) else f"{v:>{w}}" for i, (v, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join(fmt(r) for r in [head, *lines])


@video.command("extract")
@click.argument("path", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--start", type=int, default=0, show_default=True, help="first frame (after --fps)")
@click.option("--end", type=int, default=None, help="stop before this frame")
@click.option("--stride", type=int, default=1, show_default=True, help="take every Nth frame")
@click.option("--count", type=int, default=None, help="at most this many frames")
@click.option("--fps", type=float, default=None, help="resample to this frame rate first (musubi's frame dropping)")
@click.option("--allow-truncated", is_flag=True, help="use what can be read of a cut-off file")
def extract(path, out_dir, start, end, stride, count, fps, allow_truncated):
    """Write frames of a video to OUT_DIR as PNG files."""
    from .video import MediaError, read_frames, save_frames_png

    try:
        frames = read_frames(path, start=start, end=end, stride=stride, count=count, fps=fps, dtype="uint8",
                             allow_truncated=allow_truncated)
    except (MediaError, ValueError) as exc:
        _fail(str(exc))
    paths = save_frames_png(frames, out_dir)
    click.echo(f"{len(paths)} frames written to {out_dir}")


@video.command("encode")
@click.argument("frames_dir", type=click.Path(file_okay=False, exists=True))
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--fps", type=float, default=16.0, show_default=True)
@click.option("--crf", type=int, default=None, help="quality: lower is better (default 18 H.264, 32 VP9/AV1)")
@click.option("--codec", type=click.Choice(["h264", "vp9", "av1"]), default=None, help="default: h264 for .mp4, vp9 for .webm")
def encode(frames_dir, output, fps, crf, codec):
    """Encode the images of FRAMES_DIR (sorted by name) to OUTPUT (.mp4 or .webm)."""
    import numpy as np
    from PIL import Image

    from .video import MediaError, write_video

    files = sorted(p for p in Path(frames_dir).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
    if not files:
        _fail(f"{frames_dir}: no images (.png, .jpg, .webp, .bmp) to encode")
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    if len({f.shape for f in frames}) > 1:
        _fail(f"{frames_dir}: the images differ in size; resize them to one size first")
    try:
        write_video(np.stack(frames), output, fps=fps, codec=codec, crf=crf)
    except MediaError as exc:
        _fail(str(exc))
    click.echo(f"{len(frames)} frames encoded to {output}")


@click.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--follow", is_flag=True, help="keep polling until the run ends (Ctrl+C to stop)")
@click.option("--png", type=click.Path(dir_okay=False), help="write the loss/lr chart here (rewritten each poll)")
@click.option("--interval", type=float, default=2.0, show_default=True, help="seconds between polls with --follow")
@click.option("--smoothing", type=click.FloatRange(0, 0.999), default=0.6, show_default=True, help="TensorBoard-style EMA weight")
@click.option("--step", "step_id", default=None, help="show this step of the run (default: the one running, else the training step)")
@click.option("--list", "list_runs", is_flag=True, help="list the runs of a workdir (PATH/runs/) and their steps")
@click.option("--json", "as_json", is_flag=True, help="print the status as JSON")
def monitor(path, follow, png, interval, smoothing, step_id, list_runs, as_json):
    """Loss, learning rate, progress, ETA and samples of a run folder or a TensorBoard log folder."""
    from .contact_sheet import save_png
    from .monitor import TrainingMonitor, current_step, draw_chart, find_run, run_steps, runs_of

    root = Path(path)
    if list_runs:
        runs = runs_of(root)
        if not runs:
            _fail(f"{root}: no runs: expected a workdir with runs/<time>/events.jsonl (made by `musubi-pipe run`)")
        for run in runs:
            steps, ended = run_steps(run)
            click.echo(f"{run}  {ended or 'running'}  " + ", ".join(f"{s.id} ({s.status or 'running'})" for s in steps))
        return
    try:
        root = find_run(root)
    except FileNotFoundError as exc:
        _fail(str(exc))
    monitors: dict = {}
    shown = None
    try:
        while True:
            steps, _ = run_steps(root) if (root / "events.jsonl").is_file() else ([], "")
            if step_id and steps and step_id not in [s.id for s in steps]:
                _fail(f"{root}: no step {step_id!r} in this run; its steps: {', '.join(s.id for s in steps)}")
            step = next((s for s in steps if s.id == step_id), None) if step_id else current_step(steps)
            key = step.id if step else step_id
            if key not in monitors:
                monitors[key] = TrainingMonitor(root, step=key)
            status = monitors[key].poll()
            if step and shown != step.id and not as_json:
                others = [f"{s.id} ({s.kind or '?'}, {s.status or 'running'})" for s in steps if s.id != step.id]
                click.echo(f"{root}: step {step.id} ({step.kind or '?'})"
                           + (f"; other steps: {', '.join(others)} (--step ID shows one)" if others else ""))
                shown = step.id
            if as_json:
                click.echo(json.dumps({"step": key, **status.to_dict(smoothing)}))
            else:
                click.echo((f"{step.id}: " if step else "") + status.summary_line())
            for warning in status.warnings:
                click.echo(f"warning: {warning}", err=True)
            if png:
                save_png(draw_chart(status, smoothing=smoothing), png)
            if not follow or status.finished:
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        pass
