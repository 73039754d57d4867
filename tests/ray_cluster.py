"""A real local Ray cluster for tests and CI: a head and one worker node, each its own raylet with
fake GPUs, on loopback, in a temporary folder of its own. Teardown ends only the processes of this
cluster (found by its folder, with their descendants), never another Ray on the machine.

    python tests/ray_cluster.py start /tmp/mpray 16380     # prints the address
    python tests/ray_cluster.py stop /tmp/mpray
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

GPUS_PER_NODE = 2
OBJECT_STORE = 100 * 1024 * 1024


def _ray_cli() -> str:
    found = Path(sys.executable).parent / "ray"
    return str(found) if found.exists() else (shutil.which("ray") or "ray")


def _ports(base: int, node: int) -> list[str]:
    """Every port a node opens, apart from the other node's (both share 127.0.0.1)."""
    p = base + 20 * node
    return ["--node-manager-port", str(p + 1), "--object-manager-port", str(p + 2),
            "--dashboard-agent-listen-port", str(p + 3), "--dashboard-agent-grpc-port", str(p + 4),
            "--runtime-env-agent-port", str(p + 5), "--metrics-export-port", str(p + 6),
            "--min-worker-port", str(p + 10), "--max-worker-port", str(p + 19)]  # p + 8: the head's dashboard


def free_base_port() -> int:
    """The first of 40 consecutive free ports (both nodes' servers and workers)."""
    import socket

    for base in range(21000, 30000, 40):
        try:
            for p in range(base, base + 40):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports for a local Ray cluster")


def _ray_start(argv: list[str], env: dict) -> None:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


class LocalRayCluster:
    def __init__(self, root: Path, port: int, env: dict[str, str] | None = None, fast_health: bool = True):
        # Ray's socket paths live under the temp dir and must stay short (108 bytes on Linux)
        self.root, self.port, self.extra_env, self.fast_health = Path(root), port, dict(env or {}), fast_health
        self.address = f"127.0.0.1:{port}"

    def _env(self) -> dict:
        env = {**os.environ, **self.extra_env, "RAY_USAGE_STATS_ENABLED": "0", "RAY_BACKEND_LOG_LEVEL": "warning"}
        if self.fast_health:  # a lost node is noticed within seconds (Ray's defaults: see bench_ray.py)
            env.update(RAY_health_check_period_ms="500", RAY_health_check_failure_threshold="3",
                       RAY_health_check_initial_delay_ms="0")
        return env

    def start(self) -> "LocalRayCluster":
        self.root.mkdir(parents=True, exist_ok=True)
        head = [_ray_cli(), "start", "--head", "--port", str(self.port), "--include-dashboard=false",
                "--dashboard-port", str(self.port + 8), "--temp-dir", str(self.root), *self._common(), *_ports(self.port, 0)]
        try:
            _ray_start(head, self._env())
            self.add_worker()
        except BaseException:
            self.stop()
            raise
        return self

    def _common(self) -> list[str]:
        return ["--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--num-gpus", str(GPUS_PER_NODE),
                "--object-store-memory", str(OBJECT_STORE), "--disable-usage-stats", "--include-log-monitor=false"]

    def add_worker(self) -> None:
        """Start the worker node (again, after a test lost it)."""
        argv = [_ray_cli(), "start", "--address", self.address, *self._common(), *_ports(self.port, 1)]
        _ray_start(argv, self._env())
        self.wait_nodes(2)

    def wait_nodes(self, n: int, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if len(self.raylets()) >= n:
                return
            time.sleep(0.2)
        raise RuntimeError(f"the Ray cluster in {self.root} did not get {n} nodes")

    def raylets(self) -> list[tuple[psutil.Process, list[str]]]:
        """This cluster's raylets (one per node), each with its command line."""
        out = []
        for p in self.processes():
            try:
                if p.name() == "raylet":
                    out.append((p, p.cmdline()))
            except psutil.Error:
                pass
        return out

    def worker_raylet(self) -> psutil.Process | None:
        """The worker node's raylet (not the head's): killing it loses that node."""
        port = f"--node_manager_port={self.port + 21}"
        return next((p for p, argv in self.raylets() if port in argv), None)

    def worker_node_id(self) -> str:
        port = f"--node_manager_port={self.port + 21}"
        argv = next(argv for _, argv in self.raylets() if port in argv)
        return next(a.split("=", 1)[1] for a in argv if a.startswith("--node_id="))

    def processes(self) -> list[psutil.Process]:
        """This cluster's processes: those naming its folder, and everything they started."""
        mark = str(self.root)
        me = psutil.Process()
        mine = {me.pid, *(p.pid for p in me.parents())}  # the command that names the folder to stop it
        found = {}
        for p in psutil.process_iter():
            try:
                if p.pid not in mine and any(mark in a for a in p.cmdline()):
                    found[p.pid] = p
            except psutil.Error:
                pass
        for p in list(found.values()):
            try:
                for child in p.children(recursive=True):
                    found.setdefault(child.pid, child)
            except psutil.Error:
                pass
        return list(found.values())

    def stop(self) -> None:
        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        shutil.rmtree(self.root, ignore_errors=True)


if __name__ == "__main__":
    what, folder = sys.argv[1], Path(sys.argv[2])
    if what == "start":
        print(LocalRayCluster(folder, int(sys.argv[3])).start().address)
    else:
        LocalRayCluster(folder, 0).stop()
