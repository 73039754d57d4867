"""The terminal front end: live progress bars per step (rich), or plain lines for logs and CI,
or quiet; it only listens to events."""
from __future__ import annotations

import os
import shlex
import sys
import threading
import time
from typing import TextIO

from . import events as ev

PLAIN_PROGRESS_EVERY_S = 10.0  # plain mode: one progress line per step this often, plus phase changes


def choose_mode(quiet: bool = False, plain: bool = False, stream: TextIO | None = None) -> str:
    if quiet:
        return "quiet"
    stream = stream or sys.stdout
    if plain or os.environ.get("CI", "").lower() in ("1", "true") or not stream.isatty():
        return "plain"
    return "rich"


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def progress_text(e: ev.Event) -> str:
    """One line for a progress event: phase, step/total, epoch, loss, it/s, ETA."""
    parts = [e.phase or "running"]
    if e.current is not None:
        parts.append(f"{e.current}/{e.total}" if e.total else f"{e.current}")
    if e.epoch is not None:
        parts.append(f"epoch {e.epoch}/{e.epochs}" if e.epochs else f"epoch {e.epoch}")
    if e.loss is not None:
        parts.append(f"loss {e.loss:.4f}")
    if e.rate:
        parts.append(f"{e.rate:.2f} it/s" if e.rate >= 1 else f"{1 / e.rate:.1f} s/it")
    if e.eta_s is not None:
        parts.append(f"ETA {_fmt_eta(e.eta_s)}")
    return "  ".join(parts)


def end_text(e: ev.Event) -> list[str]:
    d = e.data
    if d.get("status") == "dry-run":
        return []
    if d.get("status") == "succeeded":
        lines = [f"✓ {e.step} succeeded"]
    elif d.get("status") == "cancelled":
        lines = [f"■ {e.step} cancelled", f"  {d.get('fix', '')}"]
    else:
        lines = [f"✗ {e.step} failed: {d.get('cause', '')}", f"  fix: {d.get('fix', '')}"]
    if d.get("changes"):
        lines.append("  changed: " + "; ".join(d["changes"]))
    if d.get("log") and d.get("status") != "succeeded":
        lines.append(f"  log: {d['log']}")
    return [line for line in lines if line.strip()]


def start_text(e: ev.Event) -> str:
    """'▶ step (attempt 2) on GPU 2,3: log path': the GPUs tell steps that run side by side apart."""
    extra = f" (attempt {e.data['attempt']})" if e.data.get("attempt", 1) > 1 else ""
    if e.data.get("devices"):
        extra += f" on GPU {','.join(e.data['devices'])}"
    where = f"log {e.data['log']}" if e.data.get("log") else shlex.join(e.data.get("argv", []))
    return f"▶ {e.step}{extra}: {where}"


def run_end_text(e: ev.Event) -> list[str]:
    """The run's last lines: how it ended, its record folder, and where its results are."""
    lines = [f"run {e.data.get('status')}" + (f": {e.data['run_dir']}" if e.data.get("run_dir") else "")]
    for step, paths in (e.data.get("files") or {}).items():
        shown = paths if len(paths) <= 3 else paths[:2] + [f"... and {len(paths) - 2} more in {os.path.dirname(paths[-1])}"]
        lines += [f"  {step}: {p}" for p in shown]
    return lines


class TerminalDisplay:
    """A listener. `mode` is rich (bars), plain (lines) or quiet (failures and the summary)."""

    def __init__(self, mode: str = "plain", stream: TextIO | None = None):
        self.mode = mode
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()
        self._last_plain: dict[str, tuple[float, str]] = {}
        self._progress = None
        self._tasks: dict[str, int] = {}
        self.broken = False  # the stream failed once: nothing more is written to it

    def __call__(self, e: ev.Event) -> None:
        with self._lock:
            if self.broken:
                return
            try:
                getattr(self, f"_{self.mode}")(e)
            except (OSError, ValueError):  # the terminal is gone or the pipe closed: the run goes on
                self.broken = True

    def close(self) -> None:
        with self._lock:
            if self._progress is not None:
                try:
                    self._progress.stop()
                except (OSError, ValueError):
                    self.broken = True
                self._progress = None

    def _print(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    # -- quiet
    def _quiet(self, e: ev.Event) -> None:
        if e.kind == ev.STEP_END and e.data.get("status") != "succeeded":
            for line in end_text(e):
                self._print(line)
        elif e.kind == ev.RUN_END:
            for line in run_end_text(e):
                self._print(line)

    # -- plain
    def _plain(self, e: ev.Event) -> None:
        if e.kind == ev.PLAN:
            steps = e.data.get("steps", [])
            self._print(f"running {len(steps)} step(s): {', '.join(steps) or 'none'}"
                        + (f"  (record: {e.data['run_dir']})" if e.data.get("run_dir") else ""))
        elif e.kind == ev.STEP_SKIPPED:
            self._print(f"- {e.step} skipped: {e.data.get('reason', '')}")
        elif e.kind == ev.STEP_START:
            self._print(start_text(e))
            for change in e.data.get("changes", []):
                self._print(f"  {change}")
        elif e.kind == ev.PROGRESS:
            text = progress_text(e)
            last_t, last_phase = self._last_plain.get(e.step, (0.0, ""))
            now = time.monotonic()
            if e.phase != last_phase or now - last_t >= PLAIN_PROGRESS_EVERY_S or (e.total and e.current == e.total):
                self._last_plain[e.step] = (now, e.phase)
                self._print(f"  {e.step}: {text}")
        elif e.kind == ev.LOG and e.data.get("stream") == "musubi-pipe":
            self._print(f"  {e.step}: {e.data.get('text', '')}")
        elif e.kind == ev.STEP_END:
            for line in end_text(e):
                self._print(line)
        elif e.kind == ev.RUN_END:
            for line in run_end_text(e):
                self._print(line)

    # -- rich
    def _rich(self, e: ev.Event) -> None:
        from rich.text import Text  # plain Text: paths and musubi lines may contain [brackets]

        if self._progress is None:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn

            self._progress = Progress(TextColumn("{task.fields[step]}", markup=False, style="bold"), BarColumn(),
                                      TextColumn("{task.fields[info]}", markup=False),
                                      console=Console(file=self.stream), refresh_per_second=8)
            self._progress.start()
        p = self._progress
        if e.kind == ev.STEP_SKIPPED:
            p.console.print(Text(f"- {e.step} skipped: {e.data.get('reason', '')}", style="dim"))
        elif e.kind == ev.STEP_START:
            if e.step not in self._tasks:
                self._tasks[e.step] = p.add_task("", total=None, step=e.step, info="starting")
            p.console.print(Text(start_text(e)))
            for change in e.data.get("changes", []):
                p.console.print(Text(f"  {change}", style="yellow"))
        elif e.kind == ev.PROGRESS and e.step in self._tasks:
            p.update(self._tasks[e.step], total=e.total, completed=e.current or 0, info=progress_text(e))
        elif e.kind == ev.LOG and e.data.get("stream") == "musubi-pipe":
            p.console.print(Text(f"  {e.step}: {e.data.get('text', '')}", style="yellow"))
        elif e.kind == ev.STEP_END:
            if e.step in self._tasks:
                task = self._tasks[e.step]
                done = e.data.get("status") == "succeeded"
                total = p.tasks[[t.id for t in p.tasks].index(task)].total
                p.update(task, info=e.data.get("status", ""), **({"completed": total or 1, "total": total or 1} if done else {}))
            style = {"succeeded": "green", "cancelled": "yellow"}.get(e.data.get("status"), "red")
            for line in end_text(e):
                p.console.print(Text(line, style=style))
        elif e.kind == ev.RUN_END:
            p.stop()
            self._progress = None
            for line in run_end_text(e):
                p.console.print(Text(line))
