"""ComfyUI figures: pack import time; /system_stats latency while a training node runs; Cancel
to the last musubi process gone. Needs a ComfyUI started the way the tests start it:

    eval "$(bash .ci/comfyui.sh test-env)"; bash .ci/comfyui.sh start "" 8190
    COMFYUI_URL=http://127.0.0.1:8190 python benchmarks/bench_comfy.py

Without COMFYUI_URL only the import time is measured (`--runs N` fresh interpreters, default 7).
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "comfy"), str(REPO / "tests")]

IMPORT = ("import time, sys; t = time.perf_counter(); import musubi_pipe; musubi_pipe.NODE_CLASS_MAPPINGS; "
          "print(time.perf_counter() - t, 'torch' in sys.modules)")


def pack_import(runs: int = 7) -> None:
    times = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", IMPORT], capture_output=True, text=True, check=True).stdout.split()
        times.append(float(out[0]))
        assert out[1] == "False", "the pack imported torch"
    print(f"pack import (musubi_pipe + NODE_CLASS_MAPPINGS, fresh interpreter, {runs} runs): "
          f"median {statistics.median(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms (target < 300 ms)")


def _prepare() -> Path:
    """The musubi test double and model files, as tests/comfy/conftest.py makes them."""
    from conftest import write_server_files
    from media_factory import make_video
    from musubi_double import make_fake_checkout

    double = Path(os.environ["MUSUBI_TUNER_DIR"])
    work = double.parent / "work"
    if not (double / "src").exists():
        make_fake_checkout(double)
    write_server_files(Path(os.environ["COMFYUI_DIR"]), Path(os.environ["MUSUBI_PIPE_CONFIG"]), work)
    clips = work / "bench-clips"
    if not clips.exists():
        for i in range(3):
            make_video(clips / f"clip{i}.mp4", n=25, fps=16.0, width=96, height=64)
            (clips / f"clip{i}.txt").write_text(f"clip {i}")
    return clips


def _musubi_pids(double: str) -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(double in part for part in (p.info["cmdline"] or [])):
                pids.append(p.pid)
        except psutil.Error:
            pass
    return pids


def server_under_training(url: str, samples: int = 400) -> None:
    from comfy_client import ComfyClient
    from workflows import wan_training

    clips = _prepare()
    client = ComfyClient(url)
    name = f"bench{int(time.time())}"
    prompt = wan_training(str(clips), name, epochs=100000, save_every=0,
                          base_folder=str(clips.parent / name))
    training = threading.Event()
    thread = threading.Thread(target=client.run, args=(prompt,), kwargs={
        "timeout": 600, "on_message": lambda m: m.get("type") == "progress_text" and "training" in m.get("text", "") and training.set()})
    thread.start()
    if not training.wait(120):
        raise SystemExit("training did not start")
    latencies = []
    for _ in range(samples):
        t = time.perf_counter()
        with urllib.request.urlopen(url + "/system_stats", timeout=10) as r:
            r.read()
        latencies.append(time.perf_counter() - t)
        time.sleep(0.01)
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(f"/system_stats while a training node runs ({samples} requests): median {statistics.median(latencies) * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms (target p99 < 50 ms)")

    double = os.environ["MUSUBI_TUNER_DIR"]
    before = len(_musubi_pids(double))
    t0 = time.perf_counter()
    client.post("/interrupt")
    while _musubi_pids(double) and time.perf_counter() - t0 < 30:
        time.sleep(0.01)
    gone = time.perf_counter() - t0
    thread.join(60)
    print(f"Cancel (POST /interrupt) to last musubi process gone ({before} processes: accelerate launcher + script): "
          f"{gone:.2f} s (target < 3 s)")


if __name__ == "__main__":
    pack_import(int(sys.argv[sys.argv.index("--runs") + 1]) if "--runs" in sys.argv else 7)
    if os.environ.get("COMFYUI_URL"):
        server_under_training(os.environ["COMFYUI_URL"].rstrip("/"))
    else:
        print("COMFYUI_URL not set: server figures skipped")
