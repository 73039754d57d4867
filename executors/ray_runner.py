"""Steps on a Ray cluster (`run --executor ray --address ADDR`). Each step's process runs inside a
Ray actor that asks for the step's GPUs, so Ray chooses the node and sets CUDA_VISIBLE_DEVICES;
the actor starts the process in its own process group on that node and hands its output back in
chunks. The driver (this process) parses them, writes the log, events and state file itself: it
stays the only writer of run records. Ray is optional: imported only here, only when used."""
from __future__ import annotations

import os
import socket
import threading
import time
from collections import deque
from dataclasses import replace

from ..compiler.plan import Plan, flag_value
from ..errors import PipelineError, Problem
from . import events as ev
from .local import LocalExecutor, check_plan
from .musubi_env import MusubiConfig, config_path, is_inside

INSTALL = "pip install 'musubi-pipe[ray]'"
CHUNK = 256 * 1024  # most output one read hands back: a flood of output still streams in pieces


def import_ray():
    """The ray module, or a PipelineError that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise PipelineError([Problem(f"--executor ray needs the Ray package, which is not installed ({exc})",
                                     path="--executor", fix=f"{INSTALL} (in the Python that runs musubi-pipe and on every node)")])
    return ray


def check_cluster_plan(plan: Plan, config: MusubiConfig) -> None:
    """What a Ray run needs on top of the local executor's checks: a shared folder holding the
    plan's run records and outputs (every node reads and writes them at the same path), and steps
    that each fit on one node."""
    from ..pipelines import registry
    from .state import state_path

    where = str(config.file or config_path())
    if config.shared_root is None:
        raise PipelineError([Problem("--executor ray needs a folder every node of the cluster sees at the same path",
                                     path="shared_root", file=where,
                                     fix='add shared_root = "/mnt/shared/musubi" (your NFS or cluster file system) to the config')])
    root = [config.shared_root.expanduser().resolve()]
    paths = [(plan.workdir, "workdir"), (str(state_path(plan)), "state file")]
    paths += [(f.path, "files") for f in plan.files]
    paths += [(o.path, f"steps.{s.id}.outputs.{o.name}") for s in plan.steps for o in s.outputs if o.path]
    problems = [Problem(f"{path} is outside the shared folder {root[0]}: other nodes of the cluster cannot see it",
                        path=field, file=plan.source,
                        fix=f"put the pipeline's workdir and outputs under {root[0]}, or change shared_root in {where}")
                for path, field in paths if not is_inside(path, root)]
    machines = "--" + registry.launch_flags()["machines"]
    for step in plan.steps:
        n = flag_value(step.launch_args, machines)
        if n not in (None, "1"):
            problems.append(Problem(f"step {step.id} trains on {n} machines; the Ray executor runs each step on one node",
                                    path=f"steps.{step.id}", file=plan.source,
                                    fix="train on one machine's GPUs, or run it with the local executor on each machine"))
    if problems:
        raise PipelineError(problems)


class StepHost:
    """The body of a step's actor: runs one command on the actor's node with the local runner
    (its own process group, a watchdog that ends the tree if this actor's process dies) and keeps
    its output until the driver reads it. read() and stop() may overlap (a threaded actor)."""

    def __init__(self):
        self.proc = None
        self._chunks: deque = deque()
        self._streaming = False
        self._closed = False
        self._cond = threading.Condition()

    def where(self) -> dict:
        """The node, host and devices the step got (for run records and the display)."""
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
                "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "pid": self.proc.pid if self.proc else None}

    def start(self, argv: list[str], cwd: str, changed: dict[str, str], removed: list[str], gpu_flag: str,
              grace_s: float) -> dict:
        """Start the step on this node: this node's environment with the step's changes, pointed
        at the GPUs Ray gave this actor (CUDA_VISIBLE_DEVICES, and accelerate's `gpu_flag`)."""
        from .local import step_environment
        from .runner import LocalRunner

        self._chunks.clear()  # an actor runs one step after another (RayRunner keeps it for the next)
        self._closed = False
        env = step_environment(changed)
        for key in removed:
            env.pop(key, None)
        got = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = got.split(",") if got else []
        if devices:  # set by Ray for an actor with GPUs
            env["CUDA_VISIBLE_DEVICES"] = got
            argv = [got if i and argv[i - 1] == gpu_flag else w for i, w in enumerate(argv)]
        else:
            env.pop("CUDA_VISIBLE_DEVICES", None)
        self.proc = LocalRunner(grace_s).start(argv, cwd, env, devices)
        self._streaming = True
        threading.Thread(target=self._stream, daemon=True).start()
        return self.where()

    def _stream(self) -> None:
        def keep(name: str, chunk: bytes) -> None:
            with self._cond:
                self._chunks.append((name, chunk))
                self._cond.notify_all()

        try:
            self.proc.stream(keep)
        finally:
            with self._cond:
                self._streaming = False
                self._cond.notify_all()

    def read(self, wait_s: float = 0.2) -> tuple[list[tuple[str, bytes]], int | None]:
        """Output since the last read (waiting up to wait_s for some), and the exit code once the
        process has ended and all its output is handed back."""
        with self._cond:
            if not self._chunks and self._streaming:
                self._cond.wait(wait_s)
            out, size = [], 0
            while self._chunks and size < CHUNK:
                name, data = self._chunks.popleft()
                out.append((name, data))
                size += len(data)
            drained = not self._chunks and not self._streaming
        rc = self.proc.wait(10) if drained else None
        if rc is not None and not self._closed:
            self._closed = True
            self.proc.close(done=True)  # nothing the step started may outlive it
        return out, rc

    def stop(self, grace_s: float) -> int:
        """SIGTERM to the step's tree, SIGKILL after the grace period (the local runner's stop)."""
        return self.proc.stop(grace_s)


class NodeLost(Exception):
    """The step's node (or its actor) went away while the step ran."""


# The exit code a step gets when its node is lost (as ssh reports a lost connection); the cause is
# a line of the step's log, which failures.classify reads.
NODE_LOST_RC = 255
# How long one read waits on the node for output: it returns as soon as there is some, so this
# only sets how often a quiet step costs the driver a call (bench_ray.py: driver CPU per step).
POLL_S = 1.0
WAITING_NOTE_S = 30.0  # a step not placed after this long says what it waits for
IDLE_YIELD_S = 2.0  # a step not placed after this long makes the idle actors give their GPUs back


class RayProc:
    """A step on the cluster, as the driver sees it (the Proc of executors/runner.py). Its actor
    may still wait for a node with free GPUs: nothing streams until the process has started."""

    def __init__(self, ray, actor, started, gpus: int = 0, keep=None, afresh=None, waits=None):
        self._ray, self._actor, self._started, self.gpus = ray, actor, started, gpus
        self._keep = keep  # hands the actor back for the next step, once this one ended by itself
        self._afresh = afresh  # a kept actor found dead before the step started: a new one, once
        self._clean = False
        self._waits = waits  # told while the actor waits for a node, and when it stops waiting
        self._asked = time.monotonic()
        self.pid: int | None = None
        self.where: dict = {}
        self._rc: int | None = None
        self._ended = threading.Event()  # the exit code is known
        self._streamed = threading.Event()  # stream() has handed back everything

    def stream(self, callback) -> None:
        from .failures import RAY_NOTE
        from .runner import StopReading

        noted = False
        try:
            while True:
                if self._ended.is_set() and self._started is not None:
                    return  # stopped before it had a node: nothing ran
                placed = self._started is not None
                if placed and not noted and time.monotonic() - self._asked > WAITING_NOTE_S:
                    noted = True  # say it once: the step is not stuck, the cluster is full (or too small)
                    callback("stderr", f"{RAY_NOTE}waiting for a node with {self.gpus} free GPU(s) "
                                       f"(the cluster has {self._free_gpus()} free GPU(s) now, all nodes together)\n".encode())
                chunks, rc = self._read(POLL_S)
                if placed and self._started is None:  # the log and the display say where it runs
                    w = self.where
                    callback("stderr", f"{RAY_NOTE}step runs on node {w['host']} ({w['node']}), GPUs [{w['gpus']}], "
                                       f"pid {w['pid']}\n".encode())
                for name, data in chunks:
                    callback(name, data)
                if rc is not None:
                    self._clean = not self._ended.is_set()  # ended by itself, not stopped
                    self._end(rc)
                    return
        except StopReading:
            return
        except NodeLost as exc:
            try:
                callback("stderr", f"\n{RAY_NOTE}{exc}\n".encode())
            except StopReading:
                pass
            self._end(NODE_LOST_RC)
        finally:
            if self._waits:
                self._waits(self, False)
            self._streamed.set()

    def _read(self, wait_s: float) -> tuple[list, int | None]:
        try:
            if self._started is not None:
                ready, _ = self._ray.wait([self._started], timeout=wait_s)
                if not ready:
                    if self._waits and time.monotonic() - self._asked > IDLE_YIELD_S:
                        self._waits(self, True)  # idle actors may hold the GPUs it waits for
                    return [], None
                self.where, self._started = self._ray.get(self._started), None
                if self._waits:
                    self._waits(self, False)
                self.pid = self.where.get("pid")
            return self._ray.get(self._actor.read.remote(wait_s))
        except self._ray.exceptions.RayTaskError as exc:  # the actor's own error: the command could not start
            cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
            return [("stderr", f"cannot start: {cause}\n".encode())], 127
        except self._ray.exceptions.RayError as exc:
            if self._started is not None and self._afresh is not None:  # a kept actor whose node went away
                self._actor, self._started = self._afresh()
                self._afresh = None
                return [], None
            raise NodeLost(self._cause(exc)) from exc

    def _free_gpus(self) -> str:
        try:
            return f"{self._ray.available_resources().get('GPU', 0):g}"
        except Exception:  # noqa: BLE001 - only a note
            return "an unknown number of"

    def _end(self, rc: int) -> None:
        if self._rc is None:
            self._rc = rc
        self._ended.set()

    def wait(self, timeout: float | None = None) -> int | None:
        self._ended.wait(timeout)
        return self._rc

    def stop(self, grace_s: float) -> int:
        """End the step's processes on its node: SIGTERM to the tree, SIGKILL after grace_s."""
        if self._started is None:
            try:
                self._end(self._ray.get(self._actor.stop.remote(grace_s), timeout=grace_s + 30))
            except self._ray.exceptions.GetTimeoutError:  # close() kills the actor, its watchdog the rest
                self._end(-9)
            except self._ray.exceptions.RayError:  # the node is gone (stream() says so), its processes with it
                self._end(NODE_LOST_RC)
        else:  # not placed yet, or starting: killing the actor's worker makes its watchdog end the step
            self.release()
            self._end(-15)
        return self._rc

    def close(self, done: bool = True) -> None:
        if done:  # the last chunks of a stopped step are still on their way
            self._streamed.wait(5)
        if done and self._clean and self._keep is not None:
            self._keep(self._actor)  # its step's processes are gone (StepHost.read closed them)
        else:
            self.release()  # the worker's exit ends what the step left (its watchdog)
        self._end(self._rc if self._rc is not None else -9)

    def release(self) -> None:
        try:
            self._ray.kill(self._actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def _cause(self, exc: BaseException) -> str:
        node, host = self.where.get("node", ""), self.where.get("host", "")
        text = str(exc).strip()
        first = text.splitlines()[0] if text else ""
        on = f"node {host} ({node[:12]})" if node else "its node"
        return f"{on} lost while the step ran ({type(exc).__name__}{': ' + first if first else ''})"


def _reachable(address: str, timeout_s: float = 10.0) -> None:
    """Refuse an address nothing answers at: ray.init would retry it for minutes, logging each try."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in host:
        return  # not HOST:PORT ("auto", a URL): Ray's own messages say what is wrong
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise PipelineError([Problem(f"nothing answers at the Ray cluster's address {address} ({exc})", path="--address",
                                     fix="start the cluster (`ray start --head --port 6379` on the head node) or give "
                                         "its head's address, e.g. --address 10.0.0.1:6379")])


class RayRunner:
    """Starts steps as actors on a Ray cluster (the Runner of executors/runner.py). One per run;
    close() disconnects."""

    def __init__(self, address: str, grace_s: float = 5.0):
        self.ray = import_ray()
        self.address = address
        self.grace_s = grace_s
        self._owns = not self.ray.is_initialized()  # a caller's own connection stays open
        if self._owns:
            _reachable(address)
            try:
                self.ray.init(address=address, logging_level="WARNING", log_to_driver=False, configure_logging=False)
            except Exception as exc:  # noqa: BLE001 - ConnectionError, ValueError, RuntimeError: all say the same
                raise PipelineError([Problem(f"cannot connect to the Ray cluster at {address}: {exc}", path="--address",
                                             fix="start it (`ray start --head` on the head node) or give its address, "
                                                 "e.g. --address 10.0.0.1:6379")])
        self._host = self.ray.remote(max_concurrency=4)(StepHost)
        # Actors whose step ended, by GPU count: the next step of that size starts in one at once
        # instead of waiting about a second for a new worker process (bench_ray.py).
        # An idle actor keeps its GPUs: while a step waits for a node, none is kept (and those kept
        # are ended), or two steps could wait for each other's idle actors forever.
        self._idle: dict[int, list] = {}
        self._waiting: set[int] = set()
        self._lock = threading.Lock()

    def gpus(self) -> tuple[int, int]:
        """The GPUs of the cluster's live nodes: all together, and the most one node has."""
        per_node = [int(n.get("Resources", {}).get("GPU", 0)) for n in self.ray.nodes() if n.get("Alive")]
        return sum(per_node), max(per_node, default=0)

    def start(self, argv: list[str], cwd: str, env: dict[str, str], devices=()) -> RayProc:
        """The step's actor asks for len(devices) GPUs (num_cpus=0: a step is bounded by its GPUs,
        and musubi sets its own CPU threads); Ray places it on a node that has them, now or later,
        and the actor points the command at the GPUs it got. Only the entries the executor added
        to this process's environment travel: each node keeps its own PATH, HOME and the rest."""
        from ..pipelines import registry

        changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
        removed = [k for k in os.environ if k not in env]
        gpu_flag = "--" + registry.launch_flags()["gpu_ids"]
        gpus = len(devices)

        def begin(actor):
            return actor, actor.start.remote(argv, cwd, changed, removed, gpu_flag, self.grace_s)

        def new():
            return begin(self._host.options(num_gpus=gpus, num_cpus=0, max_restarts=0).remote())

        with self._lock:
            kept = self._idle.get(gpus)
            reused = kept.pop() if kept else None
            if reused is None and gpus:  # idle actors of other sizes hold GPUs this step may need
                for size in [n for n in self._idle if n]:
                    for idle in self._idle.pop(size):
                        self._kill(idle)
        actor, started = begin(reused) if reused is not None else new()
        return RayProc(self.ray, actor, started, gpus, keep=lambda a: self._return(gpus, a),
                       afresh=new if reused is not None else None, waits=self._note_waiting)

    def _return(self, gpus: int, actor) -> None:
        with self._lock:
            if not self._waiting:
                self._idle.setdefault(gpus, []).append(actor)
                return
        self._kill(actor)

    def _note_waiting(self, proc: RayProc, waiting: bool) -> None:
        drop = []
        with self._lock:
            if not waiting:
                self._waiting.discard(id(proc))
            elif id(proc) not in self._waiting:
                self._waiting.add(id(proc))
                drop = [a for actors in self._idle.values() for a in actors]
                self._idle = {}
        for actor in drop:
            self._kill(actor)

    def _kill(self, actor) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def close(self) -> None:
        with self._lock:
            idle, self._idle = [a for actors in self._idle.values() for a in actors], {}
        for actor in idle:
            self._kill(actor)
        if self._owns and self.ray.is_initialized():
            self.ray.shutdown()


class RayExecutor(LocalExecutor):
    """The local executor (what runs, skipping, retries, resume, run records, the state file, the
    same plan checks, the parallel scheduler) with each step's process on a Ray cluster. This
    process stays the only writer of the run records and the state file; nodes only run commands."""

    def __init__(self, config: MusubiConfig, address: str, grace_s: float | None = None, **kw):
        super().__init__(config, grace_s=grace_s, **kw)
        self.address = address

    def run(self, plan: Plan, listeners=(), jobs: int | None = None, **kw):
        # everything the local executor refuses, and what a cluster needs, before connecting
        self.config.require()
        check_plan(plan, self.config)
        check_cluster_plan(plan, self.config)
        runner = RayRunner(self.address, self.grace_s)
        try:
            total, largest = runner.gpus()
            check_fits(plan, largest, self.address)
            self.runner = runner
            # The scheduler's GPU pool is the cluster's count: it never runs more GPU steps at once
            # than the cluster holds, and hands each step as many (placeholder) devices as it asks
            # Ray for; the runner points the command at the devices Ray actually gives it.
            mine, self.config = self.config, replace(self.config, gpus=",".join(str(i) for i in range(total)))
            try:
                return super().run(plan, listeners, jobs=jobs or max(1, total), **kw)
            finally:
                self.config = mine
        finally:
            runner.close()

    def _emit(self, event: ev.Event) -> None:
        from .failures import RAY_NOTE

        if event.kind == ev.STEP_START:  # placeholders: the step's own line says which node and GPUs it got
            event = replace(event, data={k: v for k, v in event.data.items() if k != "devices"})
        text = event.data.get("text", "") if event.kind == ev.LOG else ""
        if text.startswith(RAY_NOTE):  # the runner's lines (where the step runs, its node lost) read as musubi-pipe's notes
            event = replace(event, data={**event.data, "stream": "musubi-pipe", "text": "ray: " + text[len(RAY_NOTE):]})
        super()._emit(event)


def check_fits(plan: Plan, largest: int, address: str) -> None:
    """Refuse a step that needs more GPUs than any one node has: Ray would wait for it forever."""
    from .schedule import step_gpus

    problems = [Problem(f"step {s.id} needs {step_gpus(s)} GPUs and the largest node of the Ray cluster at {address} "
                        f"has {largest}", path=f"steps.{s.id}", file=plan.source,
                        fix="add nodes with more GPUs (`ray start --num-gpus N`), or ask for fewer (num_processes)")
                for s in plan.steps if step_gpus(s) > largest]
    if problems:
        raise PipelineError(problems)
