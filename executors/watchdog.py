"""A watchdog per step: when musubi-pipe dies without ending the step (kill -9, a crash, the
host's OOM killer), it ends the step's processes as a cancel would. Without it accelerate and the
trainer keep running, adopted by init, until they next write to their dead pipe.

The watchdog is a small process in its own session, whose stdin is a pipe musubi-pipe holds open
(a lifeline): the kernel closes it however musubi-pipe ends. A byte before the close means
"the step is over, leave it"; a bare end of file means "end everything the step started":
SIGTERM to the step's process group and every descendant it has seen, SIGKILL after the grace
period. This works on every platform (Linux's PR_SET_PDEATHSIG reaches only the direct child,
not accelerate's trainer, and needs a preexec_fn, which is unsafe in a threaded ComfyUI).
"""
from __future__ import annotations

import os
import subprocess
import sys

from ..compiler.plan import SAFE_PATH

WATCHDOG = SAFE_PATH + r'''
import signal, threading, time
import psutil
pid, grace = int(sys.argv[1]), float(sys.argv[2])
said, heard = [], threading.Event()
def listen():
    try:
        said.append(sys.stdin.buffer.read(1))
    except (OSError, ValueError):
        said.append(b"")
    heard.set()
threading.Thread(target=listen, daemon=True).start()
try:
    root = psutil.Process(pid)
except psutil.Error:
    sys.exit(0)
known = {pid: root}
while not heard.wait(0.5):  # remember descendants, also those that leave the group or lose their parent
    try:
        known.update((p.pid, p) for p in root.children(recursive=True))
    except psutil.Error:
        pass
if said and said[0]:
    sys.exit(0)
def alive():
    out = []
    for p in known.values():
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out
def send(sig):
    live = alive()
    if hasattr(os, "killpg") and live:  # the group holds children born since the last look
        try:
            os.killpg(pid, sig)
        except OSError:
            pass
    for p in live:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass
send(signal.SIGTERM)
end = time.monotonic() + grace
while alive() and time.monotonic() < end:
    time.sleep(0.05)
if alive():
    send(getattr(signal, "SIGKILL", signal.SIGTERM))
'''


class Watchdog:
    """The lifeline to one step's watchdog. `close(done=True)` once the step's processes are
    gone; `close(done=False)` (or musubi-pipe's death) makes the watchdog end them."""

    def __init__(self, proc: subprocess.Popen | None):
        self.proc = proc

    @classmethod
    def start(cls, pid: int, grace_s: float) -> "Watchdog":
        kw: dict = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt" else {"start_new_session": True}
        try:
            proc = subprocess.Popen([sys.executable, "-c", WATCHDOG, str(pid), str(grace_s)], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True, **kw)
        except OSError:  # the step still runs; only the death of musubi-pipe would leave it behind
            proc = None
        return cls(proc)

    def close(self, done: bool = True) -> None:
        if self.proc is None:
            return
        try:
            if done:
                self.proc.stdin.write(b"x")
            self.proc.stdin.close()
        except OSError:  # the watchdog is gone already
            pass
        if done:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None
