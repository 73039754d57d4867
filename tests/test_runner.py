"""The Runner interface (executors/runner.py) as LocalRunner keeps it: output comes back as
(stream, bytes), wait polls, stop ends the whole tree (also a child that left the group)."""
from __future__ import annotations

import os
import sys
import threading

import psutil
import pytest

from musubi_pipe.executors.runner import LocalRunner

pytestmark = pytest.mark.skipif(os.name == "nt", reason="process-group signals are POSIX")


def test_streams_and_exit_code(tmp_path):
    code = "import sys; print('out', flush=True); print('err', file=sys.stderr, flush=True); sys.exit(3)"
    proc = LocalRunner().start([sys.executable, "-c", code], str(tmp_path), dict(os.environ), devices=[])
    got: dict[str, bytes] = {"stdout": b"", "stderr": b""}
    lock = threading.Lock()

    def take(name, chunk):
        with lock:
            got[name] += chunk

    reader = threading.Thread(target=proc.stream, args=(take,))
    reader.start()
    rc = None
    while rc is None:
        rc = proc.wait(0.05)
    proc.close(done=True)
    reader.join(5)
    assert rc == 3 and not reader.is_alive()
    assert got == {"stdout": b"out\n", "stderr": b"err\n"}


def test_stop_ends_the_tree_even_a_child_that_left_the_group(tmp_path):
    # the parent starts a child in its own session (as a careless launcher might), then both sleep
    code = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
            "print('ready', flush=True); time.sleep(60)")
    proc = LocalRunner(grace_s=1).start([sys.executable, "-c", code], str(tmp_path), dict(os.environ))
    ready = threading.Event()
    reader = threading.Thread(target=proc.stream, args=(lambda n, c: ready.set(),), daemon=True)
    reader.start()
    assert ready.wait(20)
    family = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    assert len(family) == 2
    assert proc.wait(0.1) is None
    rc = proc.stop(1.0)
    proc.close(done=True)
    assert rc != 0
    gone, alive = psutil.wait_procs(family, timeout=5)
    assert not alive
