"""One run of a pipeline at a time, and one pipeline per workdir.

The lock is an OS lock on an open file, `<workdir>/.musubi-pipe/lock` (flock on POSIX, msvcrt on
Windows): the kernel releases it however the run ends, kill -9 included, so a dead run never
holds it. The file also says who holds it, for the message a second run prints.

`<workdir>/.musubi-pipe/owner.json` records which pipeline file uses the workdir: two pipelines with the
same `name` get the same default workdir (`musubi-out/<name>` beside them) and would overwrite
each other's LoRA and state. Input identities leave that folder out (state.made_by_plan).
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..compiler.plan import Plan
from ..errors import PipelineError, Problem
from ..files import write_atomic

HOME = ".musubi-pipe"  # beside runs/, which holds only run folders
_WINDOWS_LOCK_AT = 1 << 30  # msvcrt locks bytes: lock one far past the text, which stays readable


def lock_path(plan: Plan) -> Path:
    return Path(plan.workdir) / HOME / "lock"


def owner_path(plan: Plan) -> Path:
    return Path(plan.workdir) / HOME / "owner.json"


class RunLock:
    """Held from `acquire` to `release` (or the end of the process)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.path = lock_path(plan)
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise PipelineError([Problem(f"cannot open the run lock {self.path}: {exc.strerror or exc}", file=self.plan.source,
                                         path="workdir", fix="make the workdir writable, or set `workdir` to a folder you can write")]) from None
        try:
            _lock(fd)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise PipelineError([self._busy(holder)]) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "pipeline": os.path.abspath(self.plan.source) if self.plan.source else ""}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode("utf-8"))
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the file releases the lock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _busy(self, holder: dict) -> Problem:
        pid = holder.get("pid")
        who = f"pid {pid}" if pid else "a process that is starting"
        if holder.get("host") and holder["host"] != socket.gethostname():
            who += f" on {holder['host']}"
        if holder.get("started"):
            who += f", started {holder['started']}"
        other = holder.get("pipeline")
        same = not other or _same_file(other, self.plan.source)
        what = "another run of this pipeline is running" if same else f"a run of {other} is running in the same workdir"
        stop = f"`kill {pid}` (as Ctrl-C would)" if pid else "stopping it"
        if pid == os.getpid() and holder.get("host") == socket.gethostname():
            who, stop = "in this process: a queued ComfyUI workflow or another thread runs it", "its Cancel button"
        return Problem(f"{what} ({who}); its lock is {self.path}", file=self.plan.source,
                       fix=f"wait for it to finish, or end it with {stop}; a run that died holds no lock")


def _lock(fd: int) -> None:
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_AT, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 65536).decode("utf-8") or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # the holder is writing it right now


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one is not a file (a ComfyUI workflow's pipeline has no file)
        return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def owner_problem(plan: Plan) -> Problem | None:
    """A problem when another pipeline file uses this plan's workdir; None when it is this
    pipeline's, unclaimed, or its recorded owner file is gone (renamed or moved: this one takes over)."""
    if not plan.source:
        return None
    path = owner_path(plan)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        owner = data["pipeline"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # never claimed, or unreadable: claimed anew
    if _same_file(owner, plan.source):
        return None
    if data.get("file") and not os.path.exists(owner):
        return None
    default = Path(plan.workdir).name == plan.name and Path(plan.workdir).parent.name == "musubi-out"
    why = (f"both pipelines are named {plan.name!r}, and musubi-out/{plan.name} is the default workdir of both"
           if default else "both pipelines set this workdir")
    return Problem(f"the workdir {plan.workdir} belongs to another pipeline, {owner}: {why}, "
                   f"so they would overwrite each other's LoRA and records", file=plan.source,
                   path="name" if default else "workdir",
                   fix="give this pipeline another `name`, or set `workdir = \"...\"` to a folder of its own; "
                       f"if {owner} no longer uses this folder, delete {path}")


def claim(plan: Plan) -> None:
    """Record this pipeline as the workdir's owner; refuse if another one owns it (checked again
    holding the lock: another pipeline may have claimed it since the first look)."""
    check_owner(plan)
    if not plan.source:
        return
    path = owner_path(plan)
    me = os.path.abspath(plan.source)
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("pipeline") == me:
            return
    except (OSError, ValueError, AttributeError):
        pass
    write_atomic(path, json.dumps({"pipeline": me, "file": os.path.exists(me), "name": plan.name}, indent=1) + "\n")


def check_owner(plan: Plan) -> None:
    problem = owner_problem(plan)
    if problem:
        raise PipelineError([problem])
