"""Runners: where a step's processes run. The executor decides what runs, when, on which devices,
and what its output means; a runner only starts one command, hands back its output, and stops it.

    proc = runner.start(argv, cwd, env, devices=["2", "3"])
    reader = threading.Thread(target=proc.stream, args=(on_chunk,))   # on_chunk(stream, bytes)
    reader.start()
    rc = proc.wait(0.05)            # None while it runs; poll, and proc.stop(grace_s) to cancel
    reader.join(); proc.close(done=True)

Device assignment is explicit: `devices` lists the GPUs (CUDA ordinals as strings, in the
machine's own numbering) the step is pinned to; [] means the step uses no GPU (or, when the
configuration names no GPUs, whatever the environment gives it: today's one-step-at-a-time use).
The executor has already written that choice into the command: `env["CUDA_VISIBLE_DEVICES"] ==
",".join(devices)` and, for a multi-GPU accelerate step, `--gpu_ids` with the same list in argv.
LocalRunner therefore needs nothing more; a runner that places steps elsewhere (Ray) may use
`len(devices)` to reserve GPUs there and rewrite both to the ones it got.

The contract, which a runner for another engine keeps too:
- `start` raises OSError when the command cannot be started (the step fails with exit code 127).
- `Proc.stream(callback)` calls `callback(name, chunk)` with "stdout"/"stderr" and the bytes as
  they come (not split into lines), and returns once both streams have ended (or the callback
  raised StopReading). It may call the callback from more than one thread: the callback must be
  thread-safe.
- `Proc.wait(timeout)` returns the exit code, or None if the command still runs after `timeout`
  seconds.
- `Proc.stop(grace_s)` asks every process the step started to end (SIGTERM to the whole tree),
  kills what is left after `grace_s` seconds, also descendants that left the process group, and
  returns the exit code.
- `Proc.close(done)` is called exactly once, after wait() or stop() returned (or the executor
  failed), possibly while `stream` still delivers the last chunks: it kills whatever the step
  may have left running (so that `stream` ends) and releases the runner's resources. `done=False` means the
  executor itself is failing and could not stop the step properly; the step must still not
  outlive it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from typing import Callable, Protocol, Sequence

Chunk = Callable[[str, bytes], None]


class Proc(Protocol):
    pid: int | None

    def stream(self, callback: Chunk) -> None: ...

    def wait(self, timeout: float | None = None) -> int | None: ...

    def stop(self, grace_s: float) -> int: ...

    def close(self, done: bool = True) -> None: ...


class Runner(Protocol):
    def start(self, argv: list[str], cwd: str, env: dict[str, str], devices: Sequence[str] = ()) -> Proc: ...


class LocalRunner:
    """Subprocesses on this machine, each in its own process group, with a watchdog that ends the
    step's tree if musubi-pipe dies without doing so (executors/watchdog.py)."""

    def __init__(self, grace_s: float = 5.0):
        self.grace_s = grace_s  # what the watchdog waits between SIGTERM and SIGKILL

    def start(self, argv: list[str], cwd: str, env: dict[str, str], devices: Sequence[str] = ()) -> "LocalProc":
        # devices are already in env and argv (see the module's docstring): nothing to do here
        kw: dict = {}
        if os.name == "nt":
            kw["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kw["start_new_session"] = True  # its own process group: one signal reaches the tree
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, **kw)
        return LocalProc(proc, self.grace_s)


class LocalProc:
    def __init__(self, proc: subprocess.Popen, grace_s: float):
        from .watchdog import Watchdog

        self.proc = proc
        self.pid = proc.pid
        self._watchdog = Watchdog.start(proc.pid, grace_s)

    def stream(self, callback: Chunk) -> None:
        other = threading.Thread(target=_pump, args=("stderr", self.proc.stderr, callback), daemon=True)
        other.start()
        _pump("stdout", self.proc.stdout, callback)
        other.join()

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace_s: float) -> int:
        """Polite signal to the whole process group, then SIGKILL after the grace period, also
        for descendants that left the group."""
        import psutil

        try:
            tree = [psutil.Process(self.pid)] + psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        if os.name == "nt":
            try:
                self.proc.send_signal(signal.CTRL_BREAK_EVENT)
            except OSError:
                pass
        else:
            _signal_group(self.pid, signal.SIGTERM)
        alive = wait_dead(tree, grace_s)
        if alive:
            _kill_group(self.pid)
            for p in alive:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            wait_dead(alive, 5.0)
        return self.proc.wait()

    def close(self, done: bool = True) -> None:
        if done:
            _kill_group(self.pid)  # nothing the step started may outlive it
        self._watchdog.close(done=done)  # not done: the watchdog ends what is left


def _pump(name: str, pipe, callback: Chunk) -> None:
    fd = pipe.fileno()
    try:
        while True:
            try:
                chunk = os.read(fd, 65536)  # returns what is there: no waiting for a full line
            except OSError:
                return
            if not chunk:
                return
            try:
                callback(name, chunk)
            except StopReading:
                return
    finally:
        pipe.close()  # the reader owns the pipe: closed once nothing reads it any more


class StopReading(Exception):
    """A stream callback raises this when it can take no more (its log is closed): the stream
    stops being read."""


def wait_dead(procs: list, timeout: float) -> list:
    """Wait until every process has exited; a zombie counts as exited (it runs nothing, and
    an orphan's zombie is reaped by init whenever init gets to it). Returns those still alive."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.01)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_group(pid: int) -> None:
    if os.name != "nt":
        _signal_group(pid, signal.SIGKILL)
